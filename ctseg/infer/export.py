"""`ctseg export-bundle RUN_DIR`: a trained run as a complete MONAI bundle.

The committed `bundles/lung_ct_segmentation/` is the template: its `configs/inference.yaml`,
`configs/metadata.json`, `configs/logging.conf`, `docs/` and `LICENSE`. The export fills in what
belongs to the run, leaving the rest of the template as it is:

- inference.yaml: `network_def` (ctseg's registry by `_target_`, the run's network arguments),
  `ctseg_config` (the run's preprocessing and inference settings: HU window, size, 2.5D context,
  classes, threshold, TTA, post-processing) and `postprocessing` (discretisation, the MONAI
  post-processing transforms `ctseg predict` applies, the NIfTI writer);
- metadata.json: library versions of this environment, network input/output format, metrics;
- docs/README.md: the part between the `ctseg-export` markers (training run, measured metrics);
- models/model.pt: the state_dict (loadable with `torch.load(weights_only=True)`);
- models/model.ts: TorchScript (MONAI's `convert_to_torchscript`, metadata embedded as MONAI's
  `ckpt_export` does) and models/model.pt2: a `torch.export` program (TorchScript is deprecated
  in recent PyTorch). Both run without ctseg installed and are checked against the network.

The bundle is assembled in a temporary folder beside OUTPUT and swapped in whole, so OUTPUT is
never left half-written.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
import yaml

from ctseg.config import get
from ctseg.errors import ConfigError, CTSegError, ModelError
from ctseg.infer.model_loader import LoadedModel, load_model
from ctseg.infer.postprocess import bundle_postprocess, postprocess_settings, postprocess_steps
from ctseg.infer.predictor import num_classes
from ctseg.transforms import hu_window, training_size
from ctseg.utils import atomic_write_text

log = logging.getLogger(__name__)

BUNDLE_NAME = "lung_ct_segmentation"
TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "bundles" / BUNDLE_NAME
TEMPLATE_FILES = ("configs/inference.yaml", "configs/metadata.json", "configs/logging.conf",
                  "docs/README.md", "LICENSE")
CARD_START, CARD_END = "<!-- ctseg-export:start -->", "<!-- ctseg-export:end -->"
REQUIRED_PACKAGES = ("ctseg", "pytorch-ignite", "nibabel", "pydicom", "scikit-image", "scipy", "pyyaml")
CONFIG_HEADER = """\
# MONAI bundle: 2D CT segmentation run slice by slice over each 3D series (see docs/README.md).
# network_def, ctseg_config and postprocessing were written by `ctseg export-bundle` from the
# trained run; the rest is the template in ctseg's bundles/lung_ct_segmentation/.
#   python -m monai.bundle run --config_file <bundle>/configs/inference.yaml \\
#       --dataset_dir <DICOM case folder> --output_dir <mask folder> [--tracking mlflow]
"""
LABEL_NAMES = {2: {"0": "background", "1": "lungs"}}


def export_bundle(run_dir: str | Path, output: str | Path | None = None, *,
                  evaluate_dir: str | Path | None = None, template: Path = TEMPLATE_DIR) -> Path:
    """Write the bundle for `run_dir` (best checkpoint) to `output` (default RUN_DIR/lung_ct_segmentation).

    With `evaluate_dir` (a labelled case folder), the exported model is run on its cases and the
    per-case Dice, HD95 and surface Dice go into the model card and metadata.
    """
    run_dir = Path(run_dir)
    output = Path(output) if output is not None else run_dir / BUNDLE_NAME
    texts = _read_template(Path(template))
    _check_replaceable(output)
    loaded = load_model(run_dir, device="cpu")
    if loaded.network is None:
        raise ModelError(f"{run_dir}: only registry networks can be bundled")
    run = {"name": run_dir.resolve().name, "metrics": _read_json(run_dir / "metrics.json"),
           "split": _read_json(run_dir / "split.json")}
    evaluation = evaluate_model(loaded, Path(evaluate_dir), run["split"]) if evaluate_dir else []

    ctseg_config = bundle_ctseg_config(loaded.config)
    inference = inference_settings(yaml.safe_load(texts["configs/inference.yaml"]), loaded.network,
                                   ctseg_config)
    meta = bundle_metadata(json.loads(texts["configs/metadata.json"]), loaded, ctseg_config, run, evaluation)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for name in ("configs/logging.conf", "LICENSE"):
            _write(staging / name, texts[name])
        for extra in sorted((Path(template) / "docs").glob("*")):
            if extra.is_file() and extra.name != "README.md":
                _write(staging / "docs" / extra.name, extra.read_text())
        inference_text = CONFIG_HEADER + yaml.safe_dump(inference, sort_keys=False, width=100, default_flow_style=None)
        _write(staging / "configs/inference.yaml", inference_text)
        meta_text = json.dumps(meta, indent=4) + "\n"
        _write(staging / "configs/metadata.json", meta_text)
        _write(staging / "docs/README.md", model_card(texts["docs/README.md"], loaded, ctseg_config, run,
                                                      evaluation))
        write_models(loaded.model, loaded.network, ctseg_config, staging / "models",
                     {"metadata.json": meta_text, "inference.yaml": inference_text})
        _make_shareable(staging)
        _swap_in(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("exported %s to %s", run_dir, output)
    return output


# --------------------------------------------------------------------------- configs
def bundle_ctseg_config(config: dict) -> dict:
    """The parts of a run's config inference reads; no local paths, post-processing made explicit."""
    data = {k: v for k, v in (get(config, "data", {}) or {}).items() if k not in ("case_dir", "cache_dir")}
    infer = copy.deepcopy(get(config, "infer", {}) or {})
    infer["postprocess"] = postprocess_settings(config)
    out = {"data": copy.deepcopy(data), "infer": infer, "train": {"amp": bool(get(config, "train.amp", True))}}
    flip = get(config, "augment.flip")
    if flip:
        out["augment"] = {"flip": copy.deepcopy(flip)}  # `ctseg predict --tta` flips what training flipped
    return out


def network_def(spec: dict) -> dict:
    """A `_target_` entry that builds the network through ctseg's registry."""
    return {"_target_": "ctseg.networks.build_network", "name": spec["name"],
            "in_channels": int(spec["in_channels"]), "out_channels": int(spec["out_channels"]),
            "features": spec.get("features"), **(spec.get("kwargs") or {}),
            **({"variant": spec["variant"]} if "variant" in spec else {})}


def inference_settings(template: dict, spec: dict, ctseg_config: dict) -> dict:
    """The template's inference config with the run's network, settings and post-processing."""
    if not isinstance(template, dict) or "postprocessing" not in template:
        raise ConfigError("bundle template: configs/inference.yaml lacks `postprocessing`")
    settings = copy.deepcopy(template)
    settings["ctseg_config"] = ctseg_config
    settings["network_def"] = network_def(spec)
    classes = num_classes(ctseg_config)
    discretize = ({"_target_": "AsDiscreted", "keys": "pred", "argmax": True} if classes > 2 else
                  {"_target_": "AsDiscreted", "keys": "pred",
                   "threshold": float(get(ctseg_config, "infer.threshold", 0.5))})
    saver = {"_target_": "ctseg.infer.bundle_transforms.SaveCTMaskd", "keys": "pred",
             "output_dir": "@output_dir"}
    settings["postprocessing"] = {"_target_": "Compose", "transforms": [
        discretize, *bundle_postprocess(postprocess_steps(ctseg_config, classes)), saver]}
    return settings


def bundle_metadata(template: dict, loaded: LoadedModel, ctseg_config: dict, run: dict,
                    evaluation: list[dict]) -> dict:
    """metadata.json: the template's descriptive fields, this environment's versions, the run's I/O."""
    meta = copy.deepcopy(template)
    spec = loaded.network
    classes = num_classes(ctseg_config)
    lo, hi = hu_window(ctseg_config)
    size = list(training_size(ctseg_config))
    k = int(spec["in_channels"])
    labels = LABEL_NAMES.get(classes, {str(c): f"class {c}" for c in range(classes)})
    meta.update({
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {name: _version(name) for name in REQUIRED_PACKAGES},
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield", "modality": "CT", "num_channels": k,
                "spatial_shape": size, "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                "channel_def": {str(c): (f"axial CT slice {c - k // 2:+d} around the one segmented"
                                         if k > 1 else "axial CT slice") +
                                f", HU clipped to [{lo:g}, {hi:g}] and scaled to [0, 1]" for c in range(k)},
            }},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": int(spec["out_channels"]),
                "spatial_shape": size, "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": ({"0": f"{labels['1']} (logit; sigmoid >= "
                                      f"{get(ctseg_config, 'infer.threshold', 0.5)} is {labels['1']})"}
                                if classes == 2 else {c: f"{name} (logit; softmax argmax)" for c, name in labels.items()}),
            }},
        },
        "label_classes": ", ".join(f"{c} is {name}" for c, name in labels.items()),
        "pred_classes": "one uint8 label map per CT series, on the CT's own voxel grid: "
                        + ", ".join(f"{c} is {name}" for c, name in labels.items()),
    })
    metrics = run["metrics"] or {}
    eval_metrics = {}
    if metrics.get("best_val_dice") is not None:
        eval_metrics["val_mean_dice"] = round(float(metrics["best_val_dice"]), 4)
    if evaluation:
        eval_metrics["mean_dice"] = round(float(np.mean([e["dice"] for e in evaluation])), 4)
        held_out = [e["dice"] for e in evaluation if e["group"] in ("val", "test")]
        if held_out:
            eval_metrics["held_out_mean_dice"] = round(float(np.mean(held_out)), 4)
    meta["eval_metrics"] = eval_metrics
    return meta


def _version(package: str) -> str:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- evaluation + card
def evaluate_model(loaded: LoadedModel, case_dir: Path, split: dict | None) -> list[dict]:
    """Per-case metrics of the exported model on the labelled cases of `case_dir`."""
    from ctseg.data import discover_cases
    from ctseg.evaluate.evaluate import evaluate_case
    from ctseg.infer.predict import predict_cases

    groups = {name: group for group in ("train", "val", "test") for name in (split or {}).get(group, [])}
    cases = {c.name: c for c in discover_cases(case_dir) if c.label is not None}
    if not cases:
        raise CTSegError(f"{case_dir}: no labelled cases to evaluate the bundle on")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ctseg-export-eval-") as tmp:
        for result in predict_cases(loaded, case_dir, Path(tmp)):
            if not result.ok or result.case not in cases:
                if not result.ok:
                    raise CTSegError(f"evaluating the bundle: case {result.case} failed ({result.error})")
                continue
            case_result = evaluate_case(cases[result.case], result.output,
                                        num_classes=num_classes(loaded.config))
            m = case_result.metrics
            rows.append({"case": result.case, "group": groups.get(result.case, "unseen"),
                         "slices": result.slices, "dice": float(m["dice"]),
                         "hd95_mm": float(m.get("hd95_mm", float("nan"))),
                         "nsd": float(m.get("nsd", float("nan")))})
    return rows


def model_card(template: str, loaded: LoadedModel, ctseg_config: dict, run: dict,
               evaluation: list[dict]) -> str:
    """The template README with the run's section (between the ctseg-export markers) filled in."""
    if CARD_START not in template or CARD_END not in template:
        raise ConfigError(f"bundle template: docs/README.md lacks the {CARD_START} ... {CARD_END} markers")
    head, rest = template.split(CARD_START, 1)
    _, tail = rest.split(CARD_END, 1)
    return head + CARD_START + "\n" + run_section(loaded, ctseg_config, run, evaluation) + CARD_END + tail


def run_section(loaded: LoadedModel, ctseg_config: dict, run: dict, evaluation: list[dict]) -> str:
    spec = loaded.network
    params = sum(p.numel() for p in loaded.model.parameters())
    lo, hi = hu_window(ctseg_config)
    h, w = training_size(ctseg_config)
    metrics = run["metrics"] or {}
    split = run["split"] or {}
    steps = postprocess_steps(ctseg_config, num_classes(ctseg_config))
    tta = get(ctseg_config, "infer.tta", []) or []
    lines = [
        "## This export",
        "",
        f"- Run: `{run['name']}`; network `{spec['name']}` from ctseg's registry, features "
        f"{spec.get('features') or 'default'}, {params / 1e6:.2f} M parameters.",
        f"- Input: axial slices resized to {h}x{w}, HU window [{lo:g}, {hi:g}] scaled to [0, 1], "
        f"{spec['in_channels']} slice(s) per input; output: {spec['out_channels']} channel(s) of logits.",
        f"- Post-processing: {', '.join(_describe_step(s) for s in steps) or 'none'}; "
        f"flip TTA: {('axes ' + ', '.join(map(str, tta))) if tta else 'off'}.",
    ]
    if split:
        lines.append("- Split (by patient): " + "; ".join(
            f"{group} {len(split.get(group) or [])} ({', '.join(split.get(group) or []) or '-'})"
            for group in ("train", "val", "test") if split.get(group) is not None) + ".")
    if metrics:
        lines.append(f"- Training: {metrics.get('epochs', '?')} epochs, best validation Dice "
                     f"{_fmt(metrics.get('best_val_dice'))} at epoch {metrics.get('best_epoch', '?')}, "
                     f"{_fmt(metrics.get('train_seconds'), '.0f')} s, "
                     f"{_fmt(metrics.get('slices_per_second'), '.1f')} slices/s.")
    if evaluation:
        lines += ["", "Measured with this export (`ctseg export-bundle --evaluate`), through the same "
                  "inference path as the bundle, at each CT's original resolution:", "",
                  "| case | group | slices | Dice | HD95 (mm) | surface Dice (2 mm) |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for e in evaluation:
            lines.append(f"| {e['case']} | {e['group']} | {e['slices']} | {e['dice']:.4f} | "
                         f"{e['hd95_mm']:.2f} | {e['nsd']:.4f} |")
        lines.append(f"| mean | | | {np.mean([e['dice'] for e in evaluation]):.4f} | "
                     f"{np.nanmean([e['hd95_mm'] for e in evaluation]):.2f} | "
                     f"{np.nanmean([e['nsd'] for e in evaluation]):.4f} |")
        lines += ["", "Cases in the `train` group were seen in training; only `val`/`test` "
                  "rows estimate performance on new patients."]
    return "\n".join(lines) + "\n"


def _describe_step(step: tuple[str, dict]) -> str:
    name, kw = step
    if name == "KeepLargestConnectedComponent":
        return f"keep the {kw['num_components']} largest connected component(s) of label(s) {kw['applied_labels']}"
    if name == "FillHoles":
        return f"fill holes in label(s) {kw['applied_labels']}"
    return name


def _fmt(value: Any, spec: str = ".4f") -> str:
    return format(float(value), spec) if isinstance(value, (int, float)) else "?"


# --------------------------------------------------------------------------- models
def write_models(model: torch.nn.Module, spec: dict, ctseg_config: dict, folder: Path,
                 extra_files: dict[str, str]) -> None:
    """model.pt (state_dict), model.ts (TorchScript) and model.pt2 (torch.export), each verified."""
    from monai.networks.utils import convert_to_torchscript

    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    torch.save(model.state_dict(), folder / "model.pt")
    h, w = training_size(ctseg_config)
    example = torch.rand(2, int(spec["in_channels"]), h, w, generator=torch.Generator().manual_seed(0))
    try:
        with warnings.catch_warnings():
            # Tracing fixes shape-dependent branches (e.g. padding odd sizes) at the training size,
            # the only size the predictor ever feeds; the model card says so.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            convert_to_torchscript(model, filename_or_obj=str(folder / "model.ts"), extra_files=extra_files,
                                   verify=True, inputs=[example], use_trace=True, rtol=1e-4, atol=1e-4)
    except Exception as exc:  # tracing failures surface as many types
        raise ModelError(f"network {spec['name']!r} cannot be exported as TorchScript ({exc})") from exc
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # torch.export raises several error types
        raise ModelError(f"network {spec['name']!r} cannot be exported with torch.export ({exc})") from exc
    with torch.no_grad():
        expected, got = model(example), program.module()(example)
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-4):
        raise ModelError(f"network {spec['name']!r}: the torch.export program disagrees with the network")
    torch.export.save(program, str(folder / "model.pt2"), extra_files=extra_files)


# --------------------------------------------------------------------------- files
def _read_template(template: Path) -> dict[str, str]:
    missing = [name for name in TEMPLATE_FILES if not (template / name).is_file()]
    if missing:
        raise ConfigError(f"{template}: bundle template incomplete, missing {', '.join(missing)} "
                          "(export needs ctseg's source tree, bundles/lung_ct_segmentation/)")
    return {name: (template / name).read_text() for name in TEMPLATE_FILES}


def _check_replaceable(output: Path) -> None:
    """Only an empty folder or an earlier bundle is replaced, never an unrelated folder."""
    if output.exists() and (not output.is_dir() or (any(output.iterdir())
                                                     and not (output / "configs" / "metadata.json").is_file())):
        raise CTSegError(f"{output}: exists and is not a MONAI bundle; choose another --output")


def _make_shareable(folder: Path) -> None:
    """Usual permissions (umask) instead of the owner-only ones of temporary files and folders."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _swap_in(staging: Path, output: Path) -> None:
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
    os.replace(staging, output)
    if old is not None:
        shutil.rmtree(old)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
