"""The `ctseg` command: parses arguments, calls the library, turns ctseg's errors into one message.

Library code never prints or exits; this module does. Each subcommand's handler imports its
library module lazily so `ctseg --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ctseg.errors import CTSegError


def _environment_cache() -> Path | None:
    """`$CTSEG_CACHE_DIR`: the environment is read here only; the library takes values."""
    value = os.environ.get("CTSEG_CACHE_DIR")
    return Path(value) if value else None


def _with_environment(config: dict, cache: bool = True) -> dict:
    """`config` with what the environment sets: `$MLFLOW_TRACKING_URI` replaces `tracking.uri`
    (MLflow's own convention), `$CTSEG_CACHE_DIR` is `data.cache_dir` when the config names none
    (with `cache`)."""
    uri, cache_dir = os.environ.get("MLFLOW_TRACKING_URI"), _environment_cache()
    if uri:
        config["tracking"] = {**(config.get("tracking") or {}), "uri": uri}
    data = config.get("data") or {}
    if cache and cache_dir is not None and not data.get("cache_dir"):
        config["data"] = {**data, "cache_dir": str(cache_dir)}
    return config


def _cmd_convert(args: argparse.Namespace) -> int:
    from ctseg.io import load_image, save_nifti
    from ctseg.outputs import check_writable_file
    from ctseg.utils import log_text

    check_writable_file(args.output)  # before reading the input, not after
    volume = load_image(args.dicom_dir, series=args.series)
    save_nifti(volume.array, volume.affine, args.output)
    print(f"wrote {log_text(args.output)}: {volume.shape[0]} slices, spacing (z,y,x) "
          f"{tuple(round(s, 3) for s in volume.spacing)} mm, ordered by {volume.metadata.get('order_key')}")
    return 0


def _cmd_series(args: argparse.Namespace) -> int:
    from ctseg.io.dicom import scan_series

    found = scan_series(args.dicom_dir)
    print(f"{'index':>5}  {'series':<13} {'modality':<8} {'slices':>6}  {'spacing z,y,x mm':<18} "
          f"{'usable':<6}  description / why not usable")
    for info in found:
        spacing = ",".join(f"{s:.3g}" for s in info.spacing) if info.spacing else "?"
        why = info.problem or info.description or "(no description)"
        print(f"{info.index:>5}  {info.masked_uid:<13} {info.modality or '?':<8} {info.slices:>6}  "
              f"{spacing:<18} {'yes' if info.usable else 'no':<6}  {why}")
    return 0


def _cmd_phantom(args: argparse.Namespace) -> int:
    from ctseg.data.phantom import write_phantom_dataset

    size = {"rows": args.size, "cols": args.size} if args.size else {}
    root = write_phantom_dataset(args.out_dir, n_cases=args.cases, seed=args.seed, **size,
                                 **({"slices": args.slices} if args.slices else {}),
                                 pixel_spacing=args.pixel_spacing, z_range=tuple(args.z_range),
                                 reconstruction_radius=args.reconstruction_radius, padding_hu=args.padding_hu)
    print(f"wrote {args.cases} phantom cases to {root}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ctseg.evaluate.evaluate import evaluate_predictions, format_value

    summary = evaluate_predictions(args.pred, args.truth, args.output, tolerance_mm=args.tolerance_mm,
                                   empty_threshold=args.empty_threshold, split=args.split,
                                   num_classes=args.num_classes, run=args.run)
    dice = summary["metrics"]["dice"]
    print(f"evaluated {summary['cases']} case(s): volume Dice mean {format_value(dice['mean'])} "
          f"(min {format_value(dice['min'])}), per-slice Dice mean {format_value(summary['slice_dice']['mean'])}")
    if summary["failed_predictions"]:
        print(f"not scored, failed in ctseg predict: {', '.join(summary['failed_predictions'])}",
              file=sys.stderr)
    if summary["grouping"]["warning"]:
        print(f"WARNING: {summary['grouping']['warning']}", file=sys.stderr)
    for group, s in summary["groups"].items():
        if len(summary["groups"]) > 1 or not summary["grouping"]["warning"]:
            print(f"  {group} ({len(s['cases'])}): volume Dice mean {format_value(s['metrics']['dice']['mean'])}; {s['role']}")
    held = summary["held_out"]
    if held is not None:
        print(f"held-out volume Dice mean {format_value(held['metrics']['dice']['mean'])} over {len(held['cases'])} case(s)")
    print(f"wrote {args.output / 'report.md'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ctseg.evaluate.report import write_run_report

    print(f"wrote {write_run_report(args.run_dir, args.output)}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from ctseg.study.compare import compare_runs, to_markdown
    from ctseg.utils import pick_device

    rows = compare_runs(args.run_dirs, args.output, case_dir=args.case_dir, device=args.device,
                        cache_dir=_environment_cache())
    print(to_markdown(rows, device=str(pick_device(args.device))), end="")
    if args.output:
        print(f"wrote {args.output / 'compare.md'} and {args.output / 'compare.csv'}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import json
    import time

    from ctseg import distributed
    from ctseg.config import load_config
    from ctseg.train import train

    if args.resume is not None:
        # A resumed run keeps its own resolved config; only explicit overrides change it.
        if args.config is not None:
            logging.getLogger("ctseg.cli").info("--resume: using %s; --config %s is not used",
                                                args.resume / "config.yaml", args.config)
        base = args.resume / "config.yaml"
    elif args.config is None:
        raise CTSegError("--config is needed (or --resume RUN_DIR)")
    else:
        base = args.config
    # On resume the run's recorded cache folder is kept unless an override names another.
    config = _with_environment(load_config(base, args.overrides), cache=args.resume is None)
    output = args.output
    if args.resume is None and output is None:
        output = Path("runs") / f"{Path(base).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = train(config, case_dir=args.case_dir, output=output, device=args.device, resume=args.resume)
    if not distributed.is_main():  # under torchrun rank 0 reports
        return 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    hd95 = metrics.get("best_val_hd95_mm")
    print(f"run folder: {run_dir}")
    dice = metrics.get("best_val_dice")
    print((f"best validation Dice {dice:.4f} at epoch {metrics['best_epoch']}" if dice is not None
           else f"kept epoch {metrics['best_epoch']} (no validation cases)")
          + (f", HD95 {hd95:.2f} mm" if hd95 is not None else "")
          + f"; {metrics['epochs']} epochs in {metrics['train_seconds']:.0f} s, "
          f"{metrics['slices_per_second']:.1f} training slices/s")
    return 0


#: `ctseg models` measures the shipped lung model's shape (pipelines/lctsc.yaml) unless told otherwise.
MODELS_DEFAULTS = {"in_channels": 1, "features": [8, 16, 32, 64], "size": 256, "variant": "default"}


def _models_settings(args: argparse.Namespace) -> dict:
    """Explicit options over the --config's model (widths, slice size, 2.5D channels, variant)
    over the shipped lung model's."""
    settings = dict(MODELS_DEFAULTS)
    if args.config is not None:
        from ctseg.config import config_view, load_config

        view = config_view(load_config(args.config), str(args.config))
        settings.update(in_channels=view.data.context, size=max(view.size), variant=view.model.variant)
        if view.model.features:
            settings["features"] = list(view.model.features)
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return settings


def _cmd_models(args: argparse.Namespace) -> int:
    import json

    import torch

    from ctseg.networks.report import iter_network_report

    s = _models_settings(args)
    rows = iter_network_report(in_channels=s["in_channels"], features=s["features"], size=s["size"],
                               repeats=args.repeats, variant=s["variant"])
    if args.json:
        print(json.dumps(list(rows), indent=2))
        return 0
    print(f"variant {s['variant']}, input 1x{s['in_channels']}x{s['size']}x{s['size']}, "
          f"features {','.join(map(str, s['features']))}, CPU {torch.get_num_threads()} threads; "
          "activation = est. forward+backward, batch 1", flush=True)
    header = (f"{'name':<12} {'layers':>6} {'params':>12} {'trainable':>12} {'param MB':>9} "
              f"{'activ. MB':>10} {'CPU ms/slice':>13}")
    print(header)
    print("-" * len(header), flush=True)
    for r in rows:  # each row as soon as it is measured
        print(f"{r['name']:<12} {r['layers']:>6} {r['params']:>12,} {r['trainable_params']:>12,} {r['param_mb']:>9.2f} "
              f"{r['activation_mb']:>10.1f} {r['cpu_ms_per_slice']:>13.1f}", flush=True)
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


OUTPUT_FORMATS = ("nifti", "dicom-seg", "rtstruct")  # ctseg.infer.cases.FORMATS, without importing torch


def _output_formats(text: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    unknown = [f for f in formats if f not in OUTPUT_FORMATS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"unknown output format {', '.join(unknown) or text!r}; "
                                         f"choose from {', '.join(OUTPUT_FORMATS)}")
    return formats


def _cmd_experiment(args: argparse.Namespace) -> int:
    from ctseg.study.experiments import run_experiment

    doc = run_experiment(args.name, size=args.size, runs_root=args.runs_root, output=args.output,
                         doc_dir=args.doc_dir, device=args.device, cache_dir=_environment_cache(),
                         tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None)
    print(f"wrote {doc}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from ctseg import distributed

    with distributed.session(args.device) as device:  # under torchrun: the cases split across ranks
        return _predict(args, device, distributed.is_main())


class _Progress:
    """tqdm bars for `ctseg predict` on stderr: one over cases, one over the slices of a long case.

    Off with --quiet, on ranks other than 0, and when stderr is not a terminal (logs, CI), where
    the per-case lines say enough. Lines printed meanwhile go through `tqdm.write`, so bars and
    lines do not garble each other.
    """

    #: Forward-passed slices (TTA passes included) from which a case gets its own bar.
    LONG_CASE = 64

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.case_bar = None
        self.slice_bar = None

    def cases(self, total: int) -> None:
        from tqdm import tqdm

        self.case_bar = tqdm(total=total, unit="case", desc="cases", file=sys.stderr,
                             disable=not self.enabled, dynamic_ncols=True)

    def slices(self, case: str, done: int, total: int) -> None:
        if not self.enabled or total < self.LONG_CASE:
            return
        if self.slice_bar is not None and self.slice_bar.desc != case:  # the next case runs before
            self.slice_bar.close()                                       # the previous one's row
            self.slice_bar = None
        if self.slice_bar is None:
            from tqdm import tqdm

            self.slice_bar = tqdm(total=total, unit="slice", desc=case, file=sys.stderr, leave=False,
                                  dynamic_ncols=True)
        self.slice_bar.update(done - self.slice_bar.n)

    def line(self, text: str, err: bool = False) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr if err else sys.stdout)

    def done(self) -> None:
        """After each case: close its slice bar, advance the case bar."""
        if self.slice_bar is not None:
            self.slice_bar.close()
            self.slice_bar = None
        if self.case_bar is not None:
            self.case_bar.update(1)

    def close(self) -> None:
        for bar in (self.slice_bar, self.case_bar):
            if bar is not None:
                bar.close()


def _predict(args: argparse.Namespace, device, main: bool) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ctseg.infer.cases import CSV_NAME, STATISTICS_NAME, predict_cases
    from ctseg.infer.segmenter import Segmenter
    from ctseg.outputs import check_writable_dir
    from ctseg.utils import log_text

    check_writable_dir(args.output)  # before loading the model, not after the cases
    segmenter = Segmenter.load(args.model, device=device, trust_bundle=args.trust_bundle, tta=args.tta,
                               postprocess=args.postprocess, split_lungs=args.split_lungs,
                               default_model=os.environ.get(DEFAULT_MODEL_ENV) or None)
    loaded = segmenter.loaded
    if main:
        print(f"model: {loaded.kind} {loaded.source} (sha256 {loaded.sha256[:12]}) on {segmenter.device}")
    progress = _Progress(main and not args.quiet and sys.stderr.isatty())

    def report(r) -> None:
        progress.done()
        if r.ok and not args.quiet:
            lungs = ""
            if r.statistics and "right lung" in r.statistics["labels"]:
                right, left = (r.statistics["labels"][f"{side} lung"]["volume_ml"] for side in ("right", "left"))
                lungs = f" (right {right:.1f}, left {left:.1f})"
            progress.line(f"{log_text(r.case)}: {r.slices} slices in {r.seconds:.1f} s "
                          f"({r.slices_per_second:.1f} slices/s), foreground {r.foreground_ml:.1f} mL"
                          f"{lungs} -> {log_text(r.output)}")
        elif not r.ok:
            progress.line(f"{log_text(r.case)}: FAILED: {log_text(r.error)}", err=True)

    try:
        with logging_redirect_tqdm():
            results = predict_cases(segmenter, args.input, args.output, probabilities=args.probabilities,
                                    on_result=report, series=args.series, formats=args.formats,
                                    on_cases=progress.cases, on_slices=progress.slices)
    finally:
        progress.close()
    failed = [r.case for r in results if not r.ok]
    if main:
        print(f"{len(results) - len(failed)}/{len(results)} case(s) written; wrote {args.output / CSV_NAME} "
              f"and {args.output / STATISTICS_NAME}")
        if failed:
            print(f"ctseg predict: {len(failed)} case(s) failed: {log_text(', '.join(failed))}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_export_bundle(args: argparse.Namespace) -> int:
    from ctseg.infer.export import export_bundle

    out = export_bundle(args.run_dir, args.output, evaluate_dir=args.evaluate, overwrite=args.overwrite,
                        cv_dir=args.cv)
    print(f"wrote MONAI bundle {out}; run it from that folder with\n  python -m monai.bundle run "
          "--config_file configs/inference.yaml --dataset_dir CASES --output_dir MASKS")
    return 0


#: Another file as `ctseg predict`'s default model (read here only, passed down as an argument).
DEFAULT_MODEL_ENV = "CTSEG_DEFAULT_MODEL"


def _cmd_package_model(args: argparse.Namespace) -> int:
    from ctseg.infer.package import package_model
    from ctseg.train.run_record import read_run_record

    case_dir = read_run_record(args.run).case_dir if args.run.is_dir() else None  # its README: the data note
    weights = package_model(args.run, args.output, cv_dir=args.cv, data_note=args.data_note,
                            case_dir=case_dir, command=args.train_command)
    print(f"wrote {weights} ({weights.stat().st_size:,} bytes) and {weights.parent / 'MODEL_CARD.md'}")
    return 0


def _cmd_cv(args: argparse.Namespace) -> int:
    from ctseg.config import load_config
    from ctseg.study.cv import run_cv

    summary = run_cv(_with_environment(load_config(args.config, args.overrides)), args.case_dir, args.output,
                     folds=args.folds, device=args.device)
    dice, hd95 = summary["metrics"]["dice"], summary["metrics"]["hd95_mm"]
    sd = f" ± {dice['sd']:.4f}" if dice["sd"] is not None else ""
    print(f"{summary['method']} cross-validation, {summary['cases']} case(s) in {summary['folds']} folds: "
          f"test volume Dice {dice['mean']:.4f}{sd} (worst {summary['worst_case']['case']} "
          f"{summary['worst_case']['dice']:.4f})"
          + (f", HD95 mean {hd95['mean']:.2f} mm" if hd95["mean"] is not None else ""))
    print(f"wrote {args.output / 'cv.csv'} and {args.output / 'summary.json'}")
    return 0


def _version() -> str:
    """ctseg's version and the versions that decide its numbers, without importing them (fast)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from ctseg import __version__

    found = []
    for name in ("torch", "monai"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing")
    return f"ctseg {__version__} (python {platform.python_version()}, {', '.join(found)})"


def _logging_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """-v/--quiet before the subcommand (`top`) and after it; a subcommand's copy defaults to
    SUPPRESS so it does not overwrite what was given before the subcommand."""
    default = False if top else argparse.SUPPRESS
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="warnings and errors only; no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctseg", description=__doc__.splitlines()[0],
                                     epilog="exit status: 0 done, 1 a case failed or a bug (a "
                                            "traceback), 2 refused input, config or usage, "
                                            "130 interrupted")
    parser.add_argument("--version", action="version", version=_version())
    _logging_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="one DICOM series (or NRRD, MHA/MHD, multi-frame DICOM) to "
                                       "NIfTI (HU, int16)")
    p.add_argument("dicom_dir", type=Path, metavar="INPUT")
    p.add_argument("output", type=Path)
    p.add_argument("--series", default=None, metavar="UID|INDEX",
                   help="series to read (UID, masked UID or index from `ctseg series`); default: "
                        "the CT series with the most slices")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("series", help="list the image series of a DICOM folder (no identifiers)")
    p.add_argument("dicom_dir", type=Path)
    p.set_defaults(func=_cmd_series)

    p = sub.add_parser("phantom", help="write the synthetic CT phantom dataset as real DICOM")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="rows and columns (default 256)")
    p.add_argument("--slices", type=int, default=None, help="slices per case (default 48)")
    p.add_argument("--pixel-spacing", type=float, default=None,
                   help="in-plane pixel size in mm (default: the field of view fits the body)")
    p.add_argument("--z-range", type=float, nargs=2, default=(0.0, 1.0), metavar=("START", "END"),
                   help="part of the chest covered, 0 below the lung bases to 1 above the apex "
                        "(lung bases only: 0.1 0.45)")
    p.add_argument("--reconstruction-radius", type=float, default=None,
                   help="the scanner's reconstruction circle, radius as a fraction of the field's width "
                        "(0.5 touches the edges; default: none)")
    p.add_argument("--padding-hu", type=float, default=-1000.0,
                   help="HU outside the reconstruction circle (default -1000, air; scanners write "
                        "-1024, -2000 or -3024)")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("models", help="parameters, memory and CPU time of each registered network")
    p.add_argument("--config", type=Path, default=None,
                   help="measure this pipeline's model (widths, slice size, context, variant); "
                        "default: the shipped lung model's (pipelines/lctsc.yaml)")
    p.add_argument("--in-channels", type=int, default=None, help="input channels (default 1)")
    p.add_argument("--features", type=_int_list, default=None,
                   help="encoder widths, comma-separated (default 8,16,32,64)")
    p.add_argument("--size", type=int, default=None, help="square slice size in pixels (default 256)")
    p.add_argument("--repeats", type=int, default=2, help="timed forward passes per network")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--variant", choices=("default", "thesis"), default=None,
                   help="ctseg's blocks (default) or the study's, with its counts (thesis)")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("train", help="train a 2D segmentation network on a case folder (or the phantom)")
    p.add_argument("--config", type=Path, default=None, help="pipeline YAML, e.g. pipelines/train.yaml")
    p.add_argument("--case-dir", type=Path, default=None, help="case folder; omit for the built-in phantom")
    p.add_argument("--output", type=Path, default=None, help="run folder (default runs/<config>-<time>)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue a run from its checkpoints/last.pt with its own config.yaml")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="score predicted NIfTI masks against a case folder's masks")
    p.add_argument("--pred", type=Path, required=True, help="folder of <case>.nii.gz predictions")
    p.add_argument("--truth", type=Path, required=True, help="case folder (seed or one-folder-per-case layout)")
    p.add_argument("--output", type=Path, required=True, help="folder for cases.csv, slices.csv, summary.json, report.md")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="surface tolerance of normalised surface Dice")
    p.add_argument("--empty-threshold", type=int, default=10,
                   help="pixels below which a prediction on a slice without truth counts as empty")
    p.add_argument("--split", type=Path, default=None,
                   help="a run's split.json: group cases (train, val, test; unlisted cases are unseen)")
    p.add_argument("--run", type=Path, default=None, metavar="RUN_DIR",
                   help="the run that made the predictions: group cases by its split.json")
    p.add_argument("--num-classes", type=int, default=None, help="classes incl. background (default: from the labels)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("report", help="training curves of a run folder as PNG + Markdown")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--output", type=Path, default=None, help="default: RUN_DIR/report")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("compare", help="one table of trained runs: Dice, speed, size")
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--case-dir", type=Path, default=None,
                   help="where the runs' validation cases are (default: the folder each run trained on)")
    p.add_argument("--output", type=Path, default=None, help="folder for compare.md and compare.csv")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("experiment", help="run a study experiment pipeline (pipelines/experiments/NAME.yaml)")
    p.add_argument("name", help="versions, noise, train_size, or a pipeline YAML path")
    p.add_argument("--size", default="auto",
                   help="a size of the pipeline: cpu (2 cores), gpu (the study's budget), smoke (seconds; "
                        "report beside the runs); auto: gpu with CUDA, else cpu")
    p.add_argument("--runs-root", type=Path, default=Path("runs"), help="runs and the MLflow store live here")
    p.add_argument("--output", type=Path, default=None,
                   help="folder for the run folders (default RUNS_ROOT/experiments/NAME-SIZE-TIME)")
    p.add_argument("--doc-dir", type=Path, default=None,
                   help="where NAME.md and its plot go (default docs/experiments; the output folder for smoke)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.set_defaults(func=_cmd_experiment)

    p = sub.add_parser("predict", help="segment CT cases into one NIfTI label map per case")
    p.add_argument("--model", type=Path, default=None,
                   help="run folder, checkpoint file or bundle folder (default: the lung model shipped "
                        f"in the package, ctseg/pretrained/lungs.pt; ${DEFAULT_MODEL_ENV} names another)")
    p.add_argument("-i", "--input", type=Path, required=True,
                   help="DICOM series folder, case folder (any layout), or an image file: "
                        "NIfTI, NRRD, MHA/MHD, multi-frame DICOM")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="folder for <case>.nii.gz, <case>.statistics.json, statistics.json and "
                        "predictions.csv")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average flipped copies (default: as the model's config says)")
    p.add_argument("--no-postprocess", dest="postprocess", action="store_false",
                   help="skip the model's post-processing (largest components, hole filling)")
    p.add_argument("--probabilities", action="store_true",
                   help="also write float32 probability maps to OUTPUT/probabilities/")
    p.add_argument("--trust-bundle", action="store_true",
                   help="evaluate a bundle's config with MONAI's parser (runs its code)")
    p.add_argument("--series", default=None, metavar="UID|INDEX",
                   help="series to read from each DICOM case (as `ctseg series` lists them); "
                        "default: the CT series with the most slices")
    p.add_argument("--format", dest="formats", type=_output_formats, default=("nifti",),
                   metavar="nifti[,dicom-seg][,rtstruct]",
                   help="outputs per case; NIfTI is always written, dicom-seg adds <case>.seg.dcm, "
                        "rtstruct <case>.rtstruct.dcm, both referencing the source series (they "
                        "copy the patient's identifiers, as the standard requires)")
    p.add_argument("--split-lungs", action=argparse.BooleanOptionalAction, default=None,
                   help="label the right lung 1 and the left lung 2 (default: the model's "
                        "infer.split_lungs, false unless set)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export-bundle", help="a trained run as a complete MONAI bundle")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--output", type=Path, default=None, help="bundle folder (default: RUN_DIR/lung_ct_segmentation)")
    p.add_argument("--evaluate", type=Path, default=None, metavar="CASE_DIR",
                   help="measure the exported model on these labelled cases for the model card")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files an export writes in an existing bundle (keeps eval/ and other files)")
    p.add_argument("--cv", type=Path, default=None, metavar="CV_DIR",
                   help="a `ctseg cv` output folder: its cross-validation figures go into the model card and metadata")
    p.set_defaults(func=_cmd_export_bundle)

    p = sub.add_parser("cv", help="patient-level K-fold cross-validation (each case tested by a fold "
                                  "that never saw it)")
    p.add_argument("--config", type=Path, required=True, help="pipeline YAML, e.g. pipelines/lctsc.yaml")
    p.add_argument("--case-dir", type=Path, default=None, help="case folder; omit for the built-in phantom")
    p.add_argument("--output", type=Path, required=True, help="folder for fold_<k>/, cv.csv, summary.json")
    p.add_argument("--folds", type=int, default=None,
                   help="number of folds (default: leave-one-case-out up to 5 cases, else 5)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(func=_cmd_cv)

    p = sub.add_parser("package-model", help="a trained run as the package's default lung model "
                                             "(half precision, <= 2 MB) with its model card")
    p.add_argument("--run", type=Path, required=True, metavar="RUN_DIR",
                   help="trained run folder (its kept checkpoint, checkpoints/best.pt)")
    p.add_argument("--output", type=Path, default=None,
                   help="folder for lungs.pt and MODEL_CARD.md (default: the package's ctseg/pretrained/)")
    p.add_argument("--cv", type=Path, default=None, metavar="CV_DIR",
                   help="a `ctseg cv` output folder of the same recipe: its figures go into the card")
    p.add_argument("--data-note", type=Path, default=None, metavar="README",
                   help="the training data's README (source, licence, citation are quoted); default: "
                        "README.md of the run's case folder, when there is one")
    p.add_argument("--train-command", default=None, metavar="TEXT",
                   help="the command that trained the run, quoted in the card")
    p.set_defaults(func=_cmd_package_model)

    for command in sub.choices.values():
        _logging_options(command, top=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    secondary = os.environ.get("RANK", "0") != "0"  # torchrun's other ranks: warnings and errors only
    logging.basicConfig(
        level=(logging.DEBUG if args.verbose else
               logging.WARNING if secondary or args.quiet else logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except CTSegError as exc:
        print(f"ctseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
