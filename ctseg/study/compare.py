"""`ctseg compare RUN_DIR...`: the study's comparison table, measured on this machine.

For each trained run: network, epochs, volume Dice and accuracy, inference time per slice,
parameter count and size, checkpoint size. Dice and accuracy are measured by running the run's
best checkpoint through the same slice-wise inference path as `ctseg predict` on the run's
validation cases, read from the case folder the run trained on (or `--case-dir`). Only when that
folder is gone is the Dice recorded in metrics.json shown (accuracy blank); the `dice_source`
column says which.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ctseg.config import config_view
from ctseg.data import discover_cases
from ctseg.data.cache import cache_case
from ctseg.data.phantom import ensure_phantom
from ctseg.data.split import load_split
from ctseg.errors import CTSegError
from ctseg.evaluate.metrics import prediction_scores
from ctseg.evaluate.report import read_run
from ctseg.infer.model_loader import LoadedModel, load_model
from ctseg.infer.postprocess import case_body, postprocess_labels, postprocess_steps
from ctseg.infer.volume import inference_batch_size, num_classes, predict_volume
from ctseg.train.run_record import RunRecord, read_run_record
from ctseg.transforms import training_size
from ctseg.utils import atomic_write_text, pick_device

log = logging.getLogger(__name__)

MIB = 2**20
COLUMNS = ("run", "network", "epochs", "dice", "accuracy", "dice_source", "val_cases",
           "ms_per_slice", "params", "param_mb", "checkpoint_mb")


def validation_cases(run_dir: Path, case_dir: Path) -> list:
    """The labelled cases of `case_dir` in the run's validation set (its test set if none)."""
    split = load_split(Path(run_dir) / "split.json")
    names = split.get("val") or split.get("test") or []
    cases = [c for c in discover_cases(case_dir) if c.name in set(names) and c.label is not None]
    if not cases:
        raise CTSegError(f"{case_dir}: none of the run's validation cases {names} found with a mask")
    return cases


def measure_cases(
    run: LoadedModel, cases: Sequence, device: torch.device | str, noise_hu: float = 0.0, seed: int = 0,
    cache_dir: str | Path | None = None,
) -> list[dict]:
    """Volume metrics (no distances) per case, optionally with Gaussian noise of `noise_hu` HU added.

    Labels come from `predict_volume` and the model's post-processing, as `ctseg predict` and the
    training validation produce them; `raw_dice` is the network's output before post-processing.
    Cases are read through the preprocessing cache, so evaluating many runs on the same cases
    parses each DICOM series once (in `cache_dir`; None: the default cache folder).
    """
    rng = np.random.default_rng(seed)
    n_classes = num_classes(run.config)
    steps = postprocess_steps(run.config, n_classes)
    rows = []
    for case in cases:
        cached = cache_case(case, run.config, cache_dir)
        hu = np.asarray(cached.hu, dtype=np.float32)
        if noise_hu > 0:
            hu = hu + rng.normal(0.0, noise_hu, size=hu.shape).astype(np.float32)
        raw, _ = predict_volume(run.model, hu, run.config, device, spacing_yx=cached.spacing[1:])
        labels = postprocess_labels(raw, steps, case_body(run.config, hu))
        truth = np.asarray(cached.label)
        metrics = prediction_scores(labels, raw, truth, cached.spacing, n_classes)
        rows.append({"case": case.name, "noise_hu": noise_hu, **metrics})
    return rows


def ms_per_slice(run: LoadedModel, device: torch.device, repeats: int = 10) -> float:
    """Median over `repeats` of the forward time of one batch of slices, per slice.

    The batch is `infer.batch_size` slices at the training size, as `ctseg predict` runs them;
    a whole batch per timing also keeps a scheduler stall on a shared CPU from dominating. On
    CUDA with the settings inference uses there (channels_last, fp16 autocast with infer.amp).
    """
    cuda = device.type == "cuda"
    batch = inference_batch_size(run.config, device)
    x = torch.randn(batch, int(run.network["in_channels"]), *training_size(run.config), device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = cuda and config_view(run.config).infer.amp
    times = []
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
        for i in range(repeats + 1):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run.model(x)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= 1:  # the first call pays for allocation and kernel selection
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0 / batch


def run_facts(run_dir: Path, run: LoadedModel, device: torch.device, repeats: int = 10) -> dict:
    """Network, epochs, size and speed of a loaded run (everything but its Dice)."""
    _, metrics = read_run(run_dir)
    params = list(run.model.parameters())
    return {
        "run": Path(run_dir).name,
        "network": run.network["name"],
        "epochs": metrics.get("epochs"),
        "params": sum(p.numel() for p in params),
        "param_mb": sum(p.numel() * p.element_size() for p in params) / MIB,
        "checkpoint_mb": run.source.stat().st_size / MIB,
        "ms_per_slice": ms_per_slice(run, device, repeats),
    }


def mean_metrics(rows: Sequence[dict],
                 keys: Sequence[str] = ("dice", "raw_dice", "accuracy", "slice_dice")) -> dict:
    """Mean over cases of `keys` from `measure_cases` rows."""
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def summarize_run(run_dir: Path, case_dir: Path | None = None, device: str | None = None,
                  repeats: int = 10, cache_dir: Path | None = None) -> dict:
    """One row of the comparison table for `run_dir` (`cache_dir`: where to cache its cases when
    its run record names no cache folder)."""
    run_dir = Path(run_dir)
    dev = pick_device(device)
    run = load_model(run_dir, dev)  # the run's best checkpoint
    row = run_facts(run_dir, run, dev, repeats)
    record = read_run_record(run_dir)
    cache_dir = record.cache_dir or cache_dir
    case_root = run_case_dir(record, run.config, case_dir, cache_dir)
    if case_root.is_dir():
        rows = measure_cases(run, validation_cases(run_dir, case_root), dev, cache_dir=cache_dir)
        row.update(mean_metrics(rows, ("dice", "accuracy")), dice_source="measured", val_cases=len(rows))
    else:
        log.warning("%s: case folder %s not found; showing the Dice recorded in metrics.json", run_dir, case_root)
        row.update(dice=read_run(run_dir)[1].get("best_val_dice"), accuracy=None, dice_source="metrics.json",
                   val_cases=None)
    return row


def run_case_dir(record: RunRecord, config: dict, case_dir: Path | None = None,
                 cache_dir: str | Path | None = None) -> Path:
    """`case_dir` if given, else the folder the run trained on (its run record), the cached
    phantom (in `cache_dir`) for phantom runs."""
    if case_dir is not None:
        return Path(case_dir)
    if record.case_dir:
        return Path(record.case_dir)
    data = {**config["data"], "cache_dir": str(cache_dir) if cache_dir is not None else None}
    return ensure_phantom({**config, "data": data})


def compare_runs(run_dirs: Iterable[Path], output: Path | None = None, case_dir: Path | None = None,
                 device: str | None = None, repeats: int = 10, cache_dir: Path | None = None) -> list[dict]:
    """Rows for every run; with `output`, also writes compare.md and compare.csv there."""
    rows = [summarize_run(r, case_dir, device, repeats, cache_dir) for r in run_dirs]
    if output is not None:
        output = Path(output)
        atomic_write_text(output / "compare.csv", to_csv(rows))
        atomic_write_text(output / "compare.md", to_markdown(rows, device=str(pick_device(device))))
    return rows


def to_csv(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def to_markdown(rows: Sequence[dict], device: str | None = None) -> str:
    head = ["run", "network", "epochs", "volume Dice", "accuracy", "ms / slice", "params",
            "param MB", "checkpoint MB"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for r in rows:
        lines.append("| " + " | ".join([
            str(r["run"]), str(r["network"]), _num(r["epochs"], "d"), _num(r["dice"], ".4f"),
            _num(r["accuracy"], ".4f"), _num(r["ms_per_slice"], ".2f"), f"{r['params']:,}",
            _num(r["param_mb"], ".2f"), _num(r["checkpoint_mb"], ".2f")]) + " |")
    notes = []
    if any(r["dice_source"] == "measured" for r in rows):
        notes.append("volume Dice, accuracy: best checkpoint run through `ctseg predict`'s inference path "
                     "and post-processing on the run's validation cases, mean over cases")
    stale = [str(r["run"]) for r in rows if r["dice_source"] != "measured"]
    if stale:
        notes.append(f"{', '.join(stale)}: case folder not found, Dice as recorded in metrics.json")
    notes.append("ms / slice: median forward pass of one inference batch (infer.batch_size slices at the "
                 "trained input size), divided by the batch size"
                 + (f" on {device}" if device else ""))
    notes.append("MB = 2^20 bytes; checkpoint MB includes the optimizer state")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _num(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(int(value) if spec == "d" else float(value), spec)
