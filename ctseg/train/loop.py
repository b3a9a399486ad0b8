"""The training run: cases -> split -> cache -> slice batches -> DiceCE -> whole-volume validation.

`train()` is what `ctseg train` and `make train` call. One run folder holds everything a user or a
later stage needs: `config.yaml` (resolved), `split.json`, `checkpoints/{best,last}.pt`,
`metrics.json`, `history.csv`, `qc/{best,median,worst}.png` and `tracking.json` (the MLflow run
it logs to); MLflow gets the same (see `tracking`).

Validation runs every epoch on whole validation volumes through `predict_volume` and the model's
post-processing (`infer.postprocess`), i.e. what `ctseg predict` does, scored at the CT's original
resolution; the best checkpoint is the one with the best mean volume Dice. With
`train.selection: last` the run is fixed-length instead: no plateau LR, no early stopping, `best.pt`
is the last epoch, and validation (which may then be empty) only monitors, so cases scored later
(`ctseg cv`'s test folds) cannot have steered the run. With `optim.schedule: cosine` the LR follows
the budget (`ctseg.train.schedule`), never validation, and early stopping is off; with `train.ema`
validation and the checkpoints' `model` use the weights' moving average (`raw_model` and
`ema_updates` keep what resume needs). `metrics.json`'s
`train_seconds` is the wall time of the epochs (training + validation), `slices_per_second` the
training slices over the time spent in training steps.

Reproducibility: MONAI's `set_determinism(train.seed)` seeds model initialisation, and every
epoch's slice order and augmentation come from a generator seeded by (seed, epoch) alone, so two
CPU runs with one seed give the same metrics, and `--resume` (model, optimizer, scheduler, RNG
states, history and early-stopping state restored from `last.pt`) reproduces the run it continues.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader
from monai.losses import DiceCELoss
from monai.utils import set_determinism
from tqdm import tqdm

from ctseg import distributed
from ctseg.config import Config, check_resume, config_view, resolve_config, save_config
from ctseg.data import discover_cases
from ctseg.data.cache import CachedCase, cache_cases, default_cache_dir
from ctseg.data.dataset import ForegroundRatioSampler, SliceDataset, context_slices
from ctseg.data.phantom import ensure_phantom
from ctseg.data.split import check_split, make_split, save_split
from ctseg.errors import CTSegError, ConfigError, MaskError
from ctseg.evaluate.metrics import prediction_scores
from ctseg.infer.model_loader import BEST, LAST, build_model, load_checkpoint, network_spec
from ctseg.infer.postprocess import case_body, postprocess_labels, postprocess_steps
from ctseg.infer.volume import predict_volume
from ctseg.train.checkpoint import rng_state, save_checkpoint, set_rng_state
from ctseg.train.preflight import check_output_location
from ctseg.train.qc import QCCase, write_qc_images
from ctseg.train.run_record import RUN_RECORD, RunRecord, new_run_record, read_run_record, write_run_record
from ctseg.train.schedule import BudgetCosine, WarmEMA, budget_progress
from ctseg.train.tracking import Tracker
from ctseg.transforms import num_classes, train_transforms
from ctseg.utils import atomic_write_text

logger = logging.getLogger(__name__)

VAL_KEYS = ("dice", "raw_dice", "iou", "precision", "recall", "slice_dice")
HISTORY_COLUMNS = ("epoch", "train_loss", "val_dice", "val_iou", "val_precision", "val_recall",
                   "val_slice_dice", "lr", "epoch_seconds", "slices_per_second")
#: Consecutive batches with a NaN/inf loss or gradient after which the run stops: one is noise
#: (a bad slice), this many mean the weights or the data are broken.
MAX_BAD_BATCHES = 5


@dataclass
class RunState:
    """What survives an interruption besides the weights: restored from `last.pt` on resume."""

    epoch: int = 0
    best_val_dice: float = -1.0
    best_epoch: int = 0
    elapsed_seconds: float = 0.0
    train_seconds: float = 0.0  # time in training steps only (for slices/s)
    train_slices: int = 0
    history: list[dict] = field(default_factory=list)


def train(config: dict, case_dir: Path | None = None, output: Path | None = None,
          device: str | None = None, resume: Path | None = None) -> Path:
    """Train the network `config` describes; returns the run folder.

    `case_dir=None` trains on the built-in phantom (generated once into the cache folder).
    `resume=RUN_DIR` continues that run from `checkpoints/last.pt` (its split is kept; `config`
    may extend e.g. `train.epochs`); `output` is then ignored.
    Under torchrun every process calls this: they train one DistributedDataParallel model on
    disjoint shares of each epoch, and rank 0 alone writes the run folder and MLflow
    (`ctseg.distributed`, docs/scaling.md).
    """
    with distributed.session(device) as dev:
        return _train(config, case_dir, output, dev, resume)


def _train(config: dict, case_dir: Path | None, output: Path | None, dev: torch.device,
           resume: Path | None) -> Path:
    output, resume = distributed.broadcast((output, resume))  # rank 0's (a default name holds a time)
    checkpoint = None
    if resume is not None:
        run_dir = Path(resume)
        checkpoint = load_checkpoint(run_dir / "checkpoints" / LAST)
    elif output is None:
        raise ConfigError("train: an output folder is needed (or resume=RUN_DIR)")
    else:
        run_dir = Path(output)
        if (run_dir / "checkpoints" / LAST).exists():
            raise ConfigError(f"{run_dir}: already holds a training run; continue it with "
                              f"--resume {run_dir} or choose another --output")

    config = resolve_config(config)  # every value checked before anything is written
    case_dir, cache_root = _locations(config, case_dir, run_dir if checkpoint is not None else None)
    config["data"].update(case_dir=None, cache_dir=None)  # run locations go to run.json, not the model
    cfg = config_view(config)
    if checkpoint is not None:
        check_resume(checkpoint.get("config") or {}, config, str(run_dir))
        if network_spec(config) != checkpoint["network"]:
            raise ConfigError(f"{run_dir}: the config describes network {network_spec(config)} but "
                              f"the run was trained with {checkpoint['network']}; resume cannot change it")
    postprocess_steps(config, cfg.data.num_classes)  # refuses bad post-processing before any write
    set_determinism(seed=cfg.train.seed)
    check_output_location(run_dir, network_spec(config))  # before any case is read

    with distributed.main_first():  # rank 0 writes the phantom and the cache, the others read them
        cases = _load_cases(config, case_dir, cache_root)
        if checkpoint is not None:
            split = checkpoint["split"]
            check_split(split, [c.name for c in cases])
        else:
            split = make_split([c.name for c in cases], config["split"])
        if not split["val"] and cfg.train.selection == "best":
            raise ConfigError("split: training needs at least one validation case (split.val_fraction > 0), "
                              "or train.selection=last (fixed length, no validation)")
        if distributed.is_main():
            save_config(config, run_dir / "config.yaml")
            save_split(split, run_dir / "split.json")
            write_run_record(run_dir, new_run_record(case_dir, cache_root))

        by_name = {c.name: c for c in cases}
        train_cases = cache_cases([by_name[n] for n in split["train"]], config, cache_root)
        val_cases = cache_cases([by_name[n] for n in split["val"]], config, cache_root)
    _check_labels(train_cases + val_cases, config)
    logger.info("%d training case(s) (%d slices), %d validation case(s), device %s",
                len(train_cases), sum(c.shape[0] for c in train_cases), len(val_cases), dev)

    trainer = _Trainer(config, cfg, dev, train_cases, val_cases, split, run_dir)
    tracker = Tracker(config, run_dir, enabled=distributed.is_main())
    if checkpoint is not None:
        trainer.restore(checkpoint)
        logger.info("resuming %s after epoch %d", run_dir, trainer.state.epoch)
    tracker.start(config, resume=checkpoint is not None)
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.log_artifact(run_dir / "split.json")
    tracker.log_artifact(run_dir / RUN_RECORD)
    try:
        trainer.fit(tracker)
        if distributed.is_main():
            trainer.finish(tracker)
        distributed.barrier()  # the other ranks return once the run folder is complete
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except Exception:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return run_dir


def _locations(config: dict, case_dir: Path | None, resumed: Path | None) -> tuple[Path | None, Path]:
    """The case folder (None: the phantom) and the cache folder: given (argument, then config),
    else those the resumed run recorded, else the defaults."""
    data = config_view(config).data
    recorded = read_run_record(resumed) if resumed is not None else RunRecord(None, None)
    case_dir = case_dir if case_dir is not None else data.case_dir or recorded.case_dir
    cache_dir = data.cache_dir or recorded.cache_dir or default_cache_dir()
    return (Path(case_dir).resolve() if case_dir else None), Path(cache_dir)


def _load_cases(config: dict, case_dir: Path | None, cache_root: Path) -> list:
    if case_dir is None:
        case_dir = ensure_phantom({**config, "data": {**config["data"], "cache_dir": str(cache_root)}})
    cases = discover_cases(Path(case_dir))
    unlabeled = [c.name for c in cases if c.label is None]
    if unlabeled:
        raise MaskError(f"{case_dir}: case(s) {unlabeled} have no mask; training needs one per case")
    return cases


def _check_labels(cases: list[CachedCase], config: dict) -> None:
    k = num_classes(config)
    for case in cases:
        if case.label_values and max(case.label_values) >= k:
            raise MaskError(f"case {case.name}: mask holds labels {list(case.label_values)} but "
                            f"data.num_classes={k} allows 0..{k - 1}")


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class _Trainer:
    def __init__(self, config: dict, cfg: Config, device: torch.device, train_cases: list[CachedCase],
                 val_cases: list[CachedCase], split: dict, run_dir: Path) -> None:
        self.config = config  # the resolved dict: saved in checkpoints, read by predict_volume
        self.cfg = cfg
        self.device = device
        self.cuda = device.type == "cuda"
        self.val_cases = val_cases
        self.split = split
        self.run_dir = run_dir
        self.seed = cfg.train.seed
        self.select_best = cfg.train.selection == "best"
        self.num_classes = cfg.data.num_classes
        self.binary = self.num_classes == 2
        self.dataset = SliceDataset(train_cases, context_slices(config), train_transforms(config))
        if len(self.dataset) == 0:
            raise ConfigError("no training slices (the training cases are empty)")

        self.spec = network_spec(config)
        self.model = build_model(self.spec)
        if cfg.train.sync_bn:
            self.model = distributed.sync_batchnorm(self.model, device)
        self.model = self.model.to(device)
        if self.cuda and cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp = self.cuda and cfg.train.amp
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        # Targets are soft per-class channels (see ctseg.transforms.resize_transform): sigmoid
        # with one foreground channel for binary, softmax with one channel per class otherwise.
        self.loss_fn = DiceCELoss(
            sigmoid=self.binary, softmax=not self.binary,
            include_background=cfg.loss.include_background, batch=cfg.loss.batch,
            lambda_dice=float(cfg.loss.lambda_dice), lambda_ce=float(cfg.loss.lambda_ce),
        )
        self.optimizer = self._optimizer()
        self.cosine = cfg.optim.schedule == "cosine"
        self.scheduler = self._scheduler()
        self.ema = WarmEMA(self.model, float(cfg.train.ema)) if cfg.train.ema is not None else None
        self.postprocess = postprocess_steps(config, self.num_classes)
        self.state = RunState()
        # Training steps go through `net` (DDP when several processes); checkpoints, validation
        # and prediction use `model` itself.
        self.net = distributed.data_parallel(self.model, device)
        self.bad_batches = 0  # consecutive batches skipped for a non-finite loss or gradient

    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.name == "rmsprop":
            return torch.optim.RMSprop(self.model.parameters(), lr=float(o.lr),
                                       weight_decay=float(o.weight_decay), momentum=float(o.momentum))
        return torch.optim.Adam(self.model.parameters(), lr=float(o.lr), weight_decay=float(o.weight_decay))

    def _scheduler(self) -> BudgetCosine | torch.optim.lr_scheduler.ReduceLROnPlateau:
        o = self.cfg.optim
        if self.cosine:
            return BudgetCosine(self.optimizer, float(o.lr), float(o.min_lr), float(o.warmup_fraction))
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=float(o.plateau_factor), patience=o.plateau_patience,
            min_lr=float(o.min_lr))

    def _after_step(self, epoch: int, step: int, steps: int, epoch_start: float) -> None:
        """Per optimizer step: the budget schedule's next LR and the weights' moving average."""
        if self.cosine:
            t = self.cfg.train
            limit = None if t.time_limit_minutes is None else float(t.time_limit_minutes) * 60
            elapsed = self.state.elapsed_seconds + time.perf_counter() - epoch_start
            progress = budget_progress(epoch, step, steps, t.epochs, elapsed, limit)
            if limit is not None:  # every rank takes the furthest progress, so their LRs agree
                (progress,) = distributed.all_reduce([progress], op="max")
            self.scheduler.step(progress)
        if self.ema is not None:
            self.ema.update(self.model)

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights validated and saved as the model: the moving average with `train.ema`."""
        return self.ema.module if self.ema is not None else self.model

    # --- checkpoints -------------------------------------------------------------------------
    def _checkpoint(self) -> dict:
        s = self.state
        ema = {} if self.ema is None else {"raw_model": self.model.state_dict(),
                                           "ema_updates": self.ema.updates}
        return {
            "model": self.eval_model.state_dict(),
            **ema,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": s.epoch,
            "config": self.config,
            "split": self.split,
            "rng": rng_state(),
            "network": self.spec,
            "best_val_dice": s.best_val_dice,
            "best_epoch": s.best_epoch,
            "elapsed_seconds": s.elapsed_seconds,
            "train_seconds": s.train_seconds,
            "train_slices": s.train_slices,
            "history": s.history,
        }

    def restore(self, ckpt: dict) -> None:
        if self.ema is not None:  # `model` holds the average, `raw_model` the trained weights
            self.model.load_state_dict(ckpt["raw_model"])
            self.ema.load(ckpt["model"], int(ckpt["ema_updates"]))
        else:
            self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = RunState(epoch=int(ckpt["epoch"]), best_val_dice=float(ckpt["best_val_dice"]),
                              best_epoch=int(ckpt["best_epoch"]),
                              elapsed_seconds=float(ckpt["elapsed_seconds"]),
                              train_seconds=float(ckpt["train_seconds"]),
                              train_slices=int(ckpt["train_slices"]), history=list(ckpt["history"]))
        set_rng_state(ckpt["rng"])

    # --- the loop ----------------------------------------------------------------------------
    def _stop_reason(self) -> str | None:
        s = self.state
        t = self.cfg.train
        if s.epoch >= t.epochs:
            return "reached train.epochs"
        patience = t.early_stopping
        early = self.select_best and not self.cosine  # the cosine schedule runs to its end
        if early and patience is not None and s.epoch - s.best_epoch >= patience:
            return f"early stopping: no better validation Dice for {patience} epochs"
        limit = t.time_limit_minutes
        if limit is not None and s.elapsed_seconds >= float(limit) * 60:
            return f"time limit of {limit} min reached"
        return None

    def fit(self, tracker: Tracker) -> None:
        total = self.cfg.train.epochs
        while (reason := self._stop_reason()) is None:
            epoch = self.state.epoch + 1
            start = time.perf_counter()
            loss, slices, step_seconds = self._train_epoch(epoch, total, start)
            val = self._validate() if self.val_cases else dict.fromkeys(VAL_KEYS, math.nan)
            if self.select_best and not self.cosine:
                self.scheduler.step(val["dice"])
            # The slowest rank's time, so every rank takes the same time-limit decision.
            (seconds,) = distributed.all_reduce([time.perf_counter() - start], op="max")

            s = self.state
            s.epoch = epoch
            s.elapsed_seconds += seconds
            s.train_seconds += step_seconds
            s.train_slices += slices
            row = {"epoch": epoch, "train_loss": loss, "val_dice": val["dice"], "val_iou": val["iou"],
                   "val_precision": val["precision"], "val_recall": val["recall"],
                   "val_slice_dice": val["slice_dice"], "lr": self.optimizer.param_groups[0]["lr"],
                   "epoch_seconds": seconds, "slices_per_second": slices / max(step_seconds, 1e-9)}
            s.history.append(row)
            improved = val["dice"] > s.best_val_dice if self.select_best else True  # last: keep every epoch
            if improved:
                s.best_val_dice, s.best_epoch = val["dice"], epoch
            if distributed.is_main():
                ckpt = self._checkpoint()
                if improved:
                    save_checkpoint(self.run_dir / "checkpoints" / BEST, ckpt)
                save_checkpoint(self.run_dir / "checkpoints" / LAST, ckpt)
                self._write_history()
                self._write_metrics()
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch" and math.isfinite(v)}, step=epoch)
            logger.info("epoch %d/%d  loss %.4f  val Dice %.4f (raw %.4f, best %.4f @ %d)  slice Dice %.4f"
                        "  lr %.2g  %.1fs  %.1f slices/s", epoch, total, loss, val["dice"], val["raw_dice"],
                        s.best_val_dice, s.best_epoch, val["slice_dice"], row["lr"], seconds,
                        row["slices_per_second"])
        logger.info("stopped after epoch %d: %s", self.state.epoch, reason)

    def _train_epoch(self, epoch: int, total: int, start: float) -> tuple[float, int, float]:
        n = self.cfg.train.slices_per_epoch or len(self.dataset)
        generator = _epoch_generator(self.seed, epoch)
        sampler = ForegroundRatioSampler(self.dataset.foreground, int(n),
                                         self.cfg.data.foreground_ratio, generator)
        if distributed.world_size() > 1:  # this rank's share of the epoch's n slices
            sampler, generator = distributed.ShardSampler(sampler), distributed.rank_generator(generator)
        loader = DataLoader(self.dataset, batch_size=self.cfg.train.batch_size,
                            sampler=sampler, num_workers=self.cfg.train.num_workers,
                            generator=generator, pin_memory=self.cuda)
        clip = self.cfg.train.clip_grad_norm
        self.model.train()
        loss_sum, slices, seconds = 0.0, 0, 0.0
        steps = len(loader)
        batches = tqdm(loader, desc=f"epoch {epoch}/{total}", unit="batch", leave=False,
                       disable=None if distributed.is_main() else True)
        for step, batch in enumerate(batches, start=1):
            t0 = time.perf_counter()
            images = batch["image"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True)
            if self.cuda and self.cfg.train.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            self.optimizer.zero_grad(set_to_none=True)
            # the forward pass updates normalisation statistics: kept to undo a skipped batch
            buffers = [b.detach().clone() for b in self.model.buffers()]
            with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp):
                logits = self.net(images)
            loss = self.loss_fn(logits.float(), labels)
            if not distributed.all_finite(loss):  # every rank skips it: DDP needs matching backward passes
                self._skip_batch(epoch, f"loss {loss.item()}" if not torch.isfinite(loss)
                                 else "loss NaN/inf on another rank", buffers)
                continue
            self.scaler.scale(loss).backward()
            if clip is not None:
                self.scaler.unscale_(self.optimizer)
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(clip))
                if not self.amp and not torch.isfinite(norm):  # AMP's scaler skips these steps itself
                    self._skip_batch(epoch, f"gradient norm {norm.item()}", buffers)
                    continue
            self.bad_batches = 0
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self._after_step(epoch, step, steps, start)
            seconds += time.perf_counter() - t0
            loss_sum += loss.item() * images.shape[0]
            slices += images.shape[0]
        # Over all ranks: the mean loss of the epoch, its slices, the slowest rank's step time.
        loss_sum, slices = distributed.all_reduce([loss_sum, slices])
        (seconds,) = distributed.all_reduce([seconds], op="max")
        return (loss_sum / slices if slices else math.nan), int(slices), seconds

    def _skip_batch(self, epoch: int, what: str, buffers: list[torch.Tensor]) -> None:
        """Leave the model untouched by a batch with a NaN/inf loss or gradient (no step, and the
        normalisation statistics its forward pass changed are restored); stop the run (its
        checkpoints are from the last finished epoch) when that keeps happening."""
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), buffers):
                buffer.copy_(saved)
        self.bad_batches += 1
        logger.warning("epoch %d: skipped a batch with %s (%d in a row)", epoch, what, self.bad_batches)
        if self.bad_batches >= MAX_BAD_BATCHES:
            kept = (f"{self.run_dir / 'checkpoints' / LAST} (epoch {self.state.epoch}) is the last "
                    "good state" if self.state.epoch else "no checkpoint was written")
            raise CTSegError(
                f"training stopped in epoch {epoch}: {self.bad_batches} batches in a row had a NaN or "
                f"infinite {what.split()[0]}; {kept}. Lower optim.lr, keep train.clip_grad_norm on, "
                "or check the training images for NaN")

    def _validate(self, distances: bool = False, keep: bool = False, sharded: bool = True) -> dict:
        """Mean over validation cases of volume metrics at original resolution (+ per-slice Dice).

        Predictions go through `predict_volume` and the model's post-processing, exactly as
        `ctseg predict` runs them, so the validation Dice is the Dice users get. `raw_dice` is
        the network's own output before post-processing. Under torchrun (`sharded`) each rank
        scores its share of the cases and all ranks average the gathered per-case metrics, so
        they agree on the best epoch; `sharded=False` scores every case in this process.
        """
        per_case, kept = {}, []
        for case in (distributed.shard(self.val_cases) if sharded else self.val_cases):
            raw, _ = predict_volume(self.eval_model, case.hu, self.config, self.device,
                                    spacing_yx=case.spacing[1:])
            pred = postprocess_labels(raw, self.postprocess, case_body(self.config, case.hu))
            truth = np.asarray(case.label)
            per_case[case.name] = prediction_scores(pred, raw, truth, case.spacing, self.num_classes,
                                                    distances)
            if keep:
                kept.append(QCCase(case.name, np.asarray(case.hu), truth, pred, tuple(case.spacing[1:])))
        if sharded:
            per_case = distributed.gather_dict(per_case)
        per_case = {c.name: per_case[c.name] for c in self.val_cases}  # one order on every rank
        keys = next(iter(per_case.values())).keys()
        mean = {k: float(np.nanmean([m[k] for m in per_case.values()])) for k in keys}
        mean["cases"] = per_case
        mean["qc"] = kept
        return mean

    # --- outputs -----------------------------------------------------------------------------
    def _write_history(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        for row in self.state.history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        atomic_write_text(self.run_dir / "history.csv", buf.getvalue())

    def _write_metrics(self, extra: dict | None = None) -> dict:
        s = self.state
        metrics = {
            "best_val_dice": s.best_val_dice,
            "best_epoch": s.best_epoch,
            "epochs": s.epoch,
            "train_seconds": s.elapsed_seconds,
            "slices_per_second": s.train_slices / max(s.train_seconds, 1e-9),
            "device": str(self.device),
            "network": self.spec["name"],
            "train_cases": len(self.split["train"]),
            "val_cases": len(self.split["val"]),
            "selection": "best" if self.select_best else "last",
            "schedule": self.cfg.optim.schedule,
            "ema": self.cfg.train.ema,
            **(extra or {}),
        }
        atomic_write_text(self.run_dir / "metrics.json", json.dumps(_finite(metrics), indent=2) + "\n")
        return metrics

    def finish(self, tracker: Tracker) -> None:
        """Score the best checkpoint fully (with surface distances), write QC images and artifacts."""
        best_path = self.run_dir / "checkpoints" / BEST
        if not self.val_cases:  # fixed length without validation: nothing to score
            self._write_metrics()
            for name in ("config.yaml", "split.json", "metrics.json", "history.csv"):
                tracker.log_artifact(self.run_dir / name)
            tracker.log_artifact(best_path, "checkpoints")
            logger.info("kept the last epoch (%d), no validation cases; run folder %s", self.state.epoch,
                        self.run_dir)
            return
        if best_path.is_file():
            self.eval_model.load_state_dict(load_checkpoint(best_path, map_location=self.device)["model"])
        val = self._validate(distances=True, keep=True, sharded=False)  # rank 0 only
        qc_paths = write_qc_images(val["qc"], self.run_dir / "qc", self.num_classes)
        summary = {f"best_val_{k}": v for k, v in val.items()
                   if k in ("iou", "precision", "recall", "slice_dice", "hd95_mm", "assd_mm", "nsd", "raw_dice")}
        metrics = self._write_metrics({**summary, "val_per_case": val["cases"]})
        tracker.log_metrics({k: v for k, v in summary.items() if math.isfinite(v)}, step=self.state.epoch)
        tracker.log_metrics({"best_val_dice": metrics["best_val_dice"]}, step=self.state.epoch)
        for name in ("config.yaml", "split.json", "metrics.json", "history.csv"):
            tracker.log_artifact(self.run_dir / name)
        tracker.log_artifact(best_path, "checkpoints")
        for path in qc_paths:
            tracker.log_artifact(path, "qc")
        logger.info("best validation Dice %.4f at epoch %d; HD95 %.2f mm; run folder %s",
                    metrics["best_val_dice"], metrics["best_epoch"], summary.get("best_val_hd95_mm", math.nan),
                    self.run_dir)


def _finite(obj):
    """JSON has no inf/NaN: write them as null (an empty-mask HD95 is inf by convention)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
