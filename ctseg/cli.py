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

    root = write_phantom_dataset(args.out_dir, n_cases=args.cases, seed=args.seed)
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

    rows = compare_runs(args.run_dirs, args.output, case_dir=args.case_dir, device=args.device)
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
    config = load_config(base, args.overrides)
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


def _cmd_models(args: argparse.Namespace) -> int:
    import json

    from ctseg.networks.report import network_report

    rows = network_report(in_channels=args.in_channels, features=args.features, size=args.size,
                          repeats=args.repeats, variant=args.variant)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"variant {args.variant}, input 1x{args.in_channels}x{args.size}x{args.size}, "
          f"features {','.join(map(str, args.features))}, "
          f"CPU {rows[0]['threads'] if rows else '?'} threads; activation = est. forward+backward, batch 1")
    header = (f"{'name':<12} {'layers':>6} {'params':>12} {'trainable':>12} {'param MB':>9} "
              f"{'activ. MB':>10} {'CPU ms/slice':>13}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<12} {r['layers']:>6} {r['params']:>12,} {r['trainable_params']:>12,} {r['param_mb']:>9.2f} "
              f"{r['activation_mb']:>10.1f} {r['cpu_ms_per_slice']:>13.1f}")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _output_formats(text: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    unknown = [f for f in formats if f not in ("nifti", "dicom-seg")]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"unknown output format {', '.join(unknown) or text!r}; "
                                         "choose from nifti, dicom-seg")
    return formats


def _cmd_experiment(args: argparse.Namespace) -> int:
    from ctseg.study.experiments import run_experiment

    doc = run_experiment(args.name, size=args.size, runs_root=args.runs_root, output=args.output,
                         doc_dir=args.doc_dir, device=args.device)
    print(f"wrote {doc}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from ctseg import distributed

    with distributed.session(args.device) as device:  # under torchrun: the cases split across ranks
        return _predict(args, device, distributed.is_main())


def _predict(args: argparse.Namespace, device, main: bool) -> int:
    from ctseg.infer.model_loader import load_model
    from ctseg.infer.predict import CSV_NAME, predict_cases
    from ctseg.outputs import check_writable_dir
    from ctseg.utils import log_text

    check_writable_dir(args.output)  # before loading the model, not after the cases
    loaded = load_model(args.model, device=device, trust_bundle=args.trust_bundle)
    if main:
        print(f"model: {loaded.kind} {loaded.source} on {next(loaded.model.parameters()).device}")

    def report(r) -> None:
        if r.ok:
            print(f"{log_text(r.case)}: {r.slices} slices in {r.seconds:.1f} s ({r.slices_per_second:.1f} slices/s), "
                  f"foreground {r.foreground_ml:.1f} mL -> {log_text(r.output)}")
        else:
            print(f"{log_text(r.case)}: FAILED: {log_text(r.error)}", file=sys.stderr)

    results = predict_cases(loaded, args.input, args.output, tta=args.tta,
                            postprocess=args.postprocess, probabilities=args.probabilities,
                            on_result=report, series=args.series, formats=args.formats)
    failed = [r.case for r in results if not r.ok]
    if main:
        print(f"{len(results) - len(failed)}/{len(results)} case(s) written; wrote {args.output / CSV_NAME}")
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


def _cmd_cv(args: argparse.Namespace) -> int:
    from ctseg.config import load_config
    from ctseg.study.cv import run_cv

    summary = run_cv(load_config(args.config, args.overrides), args.case_dir, args.output,
                     folds=args.folds, device=args.device)
    dice, hd95 = summary["metrics"]["dice"], summary["metrics"]["hd95_mm"]
    sd = f" ± {dice['sd']:.4f}" if dice["sd"] is not None else ""
    print(f"{summary['method']} cross-validation, {summary['cases']} case(s) in {summary['folds']} folds: "
          f"test volume Dice {dice['mean']:.4f}{sd} (worst {summary['worst_case']['case']} "
          f"{summary['worst_case']['dice']:.4f})"
          + (f", HD95 mean {hd95['mean']:.2f} mm" if hd95["mean"] is not None else ""))
    print(f"wrote {args.output / 'cv.csv'} and {args.output / 'summary.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctseg", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("models", help="parameters, memory and CPU time of each registered network")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--features", type=_int_list, default=[64, 128, 256, 512],
                   help="encoder widths, comma-separated (default 64,128,256,512)")
    p.add_argument("--size", type=int, default=512, help="square slice size in pixels")
    p.add_argument("--repeats", type=int, default=2, help="timed forward passes per network")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--variant", choices=("default", "thesis"), default="default",
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
    p.add_argument("--model", type=Path, required=True, help="run folder, checkpoint file or bundle folder")
    p.add_argument("--input", type=Path, required=True,
                   help="DICOM series folder, case folder (any layout), or an image file: "
                        "NIfTI, NRRD, MHA/MHD, multi-frame DICOM")
    p.add_argument("--output", type=Path, required=True, help="folder for <case>.nii.gz and predictions.csv")
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
                   metavar="nifti[,dicom-seg]",
                   help="outputs per case; NIfTI is always written, dicom-seg adds <case>.seg.dcm "
                        "referencing the source series (it copies the patient's identifiers, as "
                        "the standard requires)")
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

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    secondary = os.environ.get("RANK", "0") != "0"  # torchrun's other ranks: warnings and errors only
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if secondary else logging.INFO,
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
