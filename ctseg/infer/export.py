"""`ctseg export-bundle RUN_DIR`: a trained run as a MONAI bundle that runs without ctseg.

The committed `bundles/lung_ct_segmentation/` is the template (configs, docs, LICENSE; no weights,
no measured figures). The export fills in what belongs to the run:

- configs/inference.yaml: `network_def` (the bundle's own registry, the run's network arguments
  passed through as they are), `ctseg_config` (the run's preprocessing and inference settings, read
  by `ctseg predict --model BUNDLE`), and the same values written into MONAI's own transforms:
  the HU window (`ScaleIntensityRanged`), the size (`Resized`), the 2.5D context, `SliceInferer`'s
  ROI and batch, the discretisation and post-processing;
- configs/train.yaml (fine-tuning with `monai.bundle run training`) and configs/evaluate.yaml (Dice
  of the bundle's masks), with the same preprocessing;
- scripts/: the Python the configs name, copied from ctseg with imports rewritten (`ctseg.` ->
  `scripts.`): `ctseg.infer.bundle_transforms` as `scripts/transforms.py`, and every ctseg module it
  and the network registry import. The copy is refused if it would need more than torch, MONAI,
  numpy, pydicom, nibabel and the standard library;
- configs/metadata.json (schema 20240725): versions, network format, metrics; the version is the
  previous export's (or the template's) with the patch number bumped, and a changelog line added;
- docs/README.md: the part between the `ctseg-export` markers (training run, measured metrics);
- honest labels in both: a figure called held-out averages only cases that influenced nothing
  (`test`, or not in the run's split); validation cases picked the checkpoint and are reported as
  selection-biased; training cases enter no mean. With `cv_dir`, the `ctseg cv` figures (read from
  its summary.json, not recomputed) are reported with how they were obtained;
- models/model.pt (state_dict), model.ts (TorchScript) and model.pt2 (`torch.export`);
  large_files.yml lists them with their SHA-256, as MONAI's `download_large_files` reads it.

An existing OUTPUT is replaced only with `overwrite=True`, and then only the files listed above
are replaced (each atomically); anything else in it (`eval/`, the user's files) stays.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
import yaml

from ctseg.config import config_view, resolve_config
from ctseg.data import discover_cases
from ctseg.errors import ConfigError, CTSegError, ModelError
from ctseg.evaluate.evaluate import evaluate_case
from ctseg.evaluate.groups import HELD_OUT_GROUPS, UNSEEN
from ctseg.infer.cases import predict_cases
from ctseg.infer.model_loader import LoadedModel, load_model
from ctseg.infer.postprocess import body_mask_enabled, postprocess_settings, postprocess_steps
from ctseg.infer.volume import AUTO_BATCH, num_classes
from ctseg.transforms import hu_window, training_size
from ctseg.utils import atomic_write_text

log = logging.getLogger(__name__)

BUNDLE_NAME = "lung_ct_segmentation"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_DIR = PACKAGE_ROOT.parent / "bundles" / BUNDLE_NAME
SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
              "meta_schema_20240725.json")
TEMPLATE_FILES = ("configs/inference.yaml", "configs/train.yaml", "configs/evaluate.yaml",
                  "configs/metadata.json", "configs/logging.conf", "docs/README.md", "LICENSE")
CARD_START, CARD_END = "<!-- ctseg-export:start -->", "<!-- ctseg-export:end -->"
#: What the bundle needs beyond MONAI, torch and numpy (their versions have their own fields):
#: DICOM reading (pydicom, its pixel-data plugins), NIfTI (nibabel), and what MONAI itself needs
#: for `monai.bundle run` (fire, pyyaml, pytorch-ignite engines) and for
#: KeepLargestConnectedComponent on the CPU (scikit-image), and NRRD/MetaImage input (SimpleITK,
#: imported only when such a file is given).
REQUIRED_PACKAGES = ("scipy", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",
                     "pylibjpeg-rle", "nibabel", "SimpleITK", "pytorch-ignite", "scikit-image", "fire", "pyyaml")
#: Third-party imports the copied scripts may use (scipy: the body mask; psutil only behind
#: `except ImportError`: the memory guard falls back to /proc/meminfo, so the bundle does not
#: require it).
SCRIPT_IMPORTS = frozenset({"numpy", "scipy", "torch", "monai", "pydicom", "nibabel", "SimpleITK", "psutil"})
#: Where ctseg modules go in the bundle's `scripts` package (others keep their path).
SCRIPT_RENAMES = {"ctseg.infer.bundle_transforms": "scripts.transforms"}
SCRIPT_ROOTS = ("ctseg.infer.bundle_transforms", "ctseg.networks")
LABEL_NAMES = {2: {"0": "background", "1": "lungs"}}
MODEL_FILES = ("models/model.pt", "models/model.ts", "models/model.pt2")


def export_bundle(run_dir: str | Path, output: str | Path | None = None, *,
                  evaluate_dir: str | Path | None = None, overwrite: bool = False,
                  template: Path = TEMPLATE_DIR, cv_dir: str | Path | None = None) -> Path:
    """Write the bundle for `run_dir` (best checkpoint) to `output` (default RUN_DIR/lung_ct_segmentation).

    With `evaluate_dir` (a labelled case folder), the exported model is run on its cases and the
    per-case Dice, HD95 and surface Dice go into the model card; the metadata gets the mean over
    held-out cases only. With `cv_dir` (a `ctseg cv` output folder), the card and metadata report
    its cross-validation figures.
    """
    run_dir = Path(run_dir)
    output = Path(output) if output is not None else run_dir / BUNDLE_NAME
    template = Path(template)
    texts = _read_template(template)
    previous = _check_output(output, template, overwrite)
    loaded = load_model(run_dir, device="cpu")
    if loaded.network is None:
        raise ModelError(f"{run_dir}: only registry networks can be bundled")
    run = {"name": run_dir.resolve().name, "metrics": _read_json(run_dir / "metrics.json"),
           "split": _read_json(run_dir / "split.json"), "cv": read_cv_summary(Path(cv_dir)) if cv_dir else None}
    evaluation = evaluate_model(loaded, Path(evaluate_dir), run["split"]) if evaluate_dir else []

    ctseg_config = bundle_ctseg_config(loaded.config)
    inference = inference_settings(yaml.safe_load(texts["configs/inference.yaml"]), loaded.network,
                                   ctseg_config)
    training = training_settings(yaml.safe_load(texts["configs/train.yaml"]), loaded.network, ctseg_config,
                                 loaded.config)
    meta = bundle_metadata(json.loads(texts["configs/metadata.json"]), loaded, ctseg_config, run,
                           evaluation, previous)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for name in ("configs/logging.conf", "configs/evaluate.yaml", "LICENSE"):
            _write(staging / name, texts[name])
        for extra in sorted((template / "docs").glob("*")):
            if extra.is_file() and extra.name != "README.md":
                _write(staging / "docs" / extra.name, extra.read_text())
        inference_text = _yaml_text(texts["configs/inference.yaml"], inference)
        _write(staging / "configs/inference.yaml", inference_text)
        _write(staging / "configs/train.yaml", _yaml_text(texts["configs/train.yaml"], training))
        meta_text = json.dumps(meta, indent=4) + "\n"
        _write(staging / "configs/metadata.json", meta_text)
        _write(staging / "docs/README.md", model_card(texts["docs/README.md"], loaded, ctseg_config, run,
                                                      evaluation))
        for name, text in bundle_scripts().items():
            _write(staging / name, text)
        write_models(loaded.model, loaded.network, ctseg_config, staging / "models",
                     {"metadata.json": meta_text, "inference.yaml": inference_text})
        _write(staging / "large_files.yml", large_files(staging))
        _make_shareable(staging)
        _move_in(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("exported %s to %s (version %s)", run_dir, output, meta["version"])
    return output


# --------------------------------------------------------------------------- configs
def bundle_ctseg_config(config: dict) -> dict:
    """The parts of a run's config inference reads, post-processing made explicit (the model config
    holds no local paths: a run's locations are in its run record)."""
    resolved = resolve_config(config)
    data, infer = resolved["data"], resolved["infer"]
    infer["postprocess"] = postprocess_settings(config)
    infer["body_mask"] = body_mask_enabled(config)
    data["num_classes"] = num_classes(config)  # evaluate.yaml reads it
    out = {"data": data, "infer": infer, "train": {"amp": resolved["train"]["amp"]}}
    if "flip" in resolved["augment"]:  # `ctseg predict --tta` flips what training flipped
        out["augment"] = {"flip": resolved["augment"]["flip"]}
    return out


def network_def(spec: dict) -> dict:
    """A `_target_` entry building the network with the bundle's registry; every argument passed on."""
    args = {k: copy.deepcopy(v) for k, v in spec.items() if k != "kwargs"}
    return {"_target_": "scripts.networks.build_network", **args, **copy.deepcopy(spec.get("kwargs") or {})}


def _yaml_spacing(config: dict) -> float | list[float] | None:
    """`data.spacing` as written in the config, in a form YAML keeps (FieldOfViewd takes both)."""
    spacing = config_view(config).data.spacing
    return list(spacing) if isinstance(spacing, (list, tuple)) else spacing


def _set(transforms: list[dict], target: str, where: str, **values: Any) -> None:
    """Set `values` on the one transform of `transforms` whose `_target_` is `target`."""
    found = [t for t in transforms if isinstance(t, dict) and t.get("_target_") == target]
    if len(found) != 1:
        raise ConfigError(f"bundle template: {where} needs exactly one {target}, found {len(found)}")
    found[0].update(values)


def _preprocessing(settings: dict, key: str, ctseg_config: dict) -> None:
    """The run's field of view, window, size and 2.5D context written into the MONAI transforms of `key`."""
    lo, hi = hu_window(ctseg_config)
    transforms = _transforms(settings, key)
    _set(transforms, "scripts.transforms.FieldOfViewd", key, spacing=_yaml_spacing(ctseg_config),
         size=list(training_size(ctseg_config)))
    _set(transforms, "ScaleIntensityRanged", key, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    _set(transforms, "Resized", key, spatial_size=list(training_size(ctseg_config)))
    _set(transforms, "scripts.transforms.StackContextd", key, context=config_view(ctseg_config).data.context)


def _transforms(settings: dict, key: str) -> list[dict]:
    node: Any = settings
    for part in key.split("#"):
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or not isinstance(node.get("transforms"), list):
        raise ConfigError(f"bundle template: `{key}` must be a Compose with a transforms list")
    return node["transforms"]


def inference_settings(template: dict, spec: dict, ctseg_config: dict) -> dict:
    """The template's inference config with the run's network, preprocessing and post-processing."""
    if not isinstance(template, dict) or "postprocessing" not in template:
        raise ConfigError("bundle template: configs/inference.yaml lacks `postprocessing`")
    settings = copy.deepcopy(template)
    settings["ctseg_config"] = ctseg_config
    settings["network_def"] = network_def(spec)
    _preprocessing(settings, "preprocessing", ctseg_config)
    if config_view(ctseg_config).infer.body_mask:  # the HU body mask, taken right after loading
        transforms = _transforms(settings, "preprocessing")
        load = next((i for i, t in enumerate(transforms)
                     if t.get("_target_") == "scripts.transforms.LoadCTSeriesd"), None)
        if load is None:
            raise ConfigError("bundle template: preprocessing needs scripts.transforms.LoadCTSeriesd")
        transforms.insert(load + 1, {"_target_": "scripts.transforms.BodyMaskd", "keys": "image",
                                     "body_key": "body"})
    batch = config_view(ctseg_config).infer.batch_size
    settings["inferer"].update(
        roi_size=list(training_size(ctseg_config)),
        sw_batch_size=(f"$%d if @device.type == 'cpu' else %d" % (AUTO_BATCH["cpu"], AUTO_BATCH["cuda"])
                       if batch in (None, "auto") else int(batch)))
    settings["evaluator"]["amp"] = _amp(ctseg_config)
    if config_view(ctseg_config).infer.tta:
        log.warning("the run's flip TTA (infer.tta) is not part of the bundle's inference.yaml; "
                    "`ctseg predict --model BUNDLE` applies it")
    saver = next((t for t in _transforms(settings, "postprocessing")
                  if t.get("_target_") == "scripts.transforms.SaveCTMaskd"), None)
    if saver is None:
        raise ConfigError("bundle template: postprocessing needs scripts.transforms.SaveCTMaskd")
    settings["postprocessing"] = {"_target_": "Compose",
                                  "transforms": [*discretize(ctseg_config), *postprocess(ctseg_config), saver]}
    return settings


def _amp(ctseg_config: dict) -> str | bool:
    """Mixed precision on CUDA when the run trained with it, as `ctseg predict` does."""
    return "$@device.type == 'cuda'" if config_view(ctseg_config).train.amp else False


def discretize(ctseg_config: dict) -> list[dict]:
    """Logits of the slices -> a (1, x, y, z) uint8 label map on the CT's grid, as `ctseg predict`."""
    binary = num_classes(ctseg_config) == 2
    return [{"_target_": "CastToTyped", "keys": "pred", "dtype": "$torch.float32"},
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": binary, "softmax": not binary},
            {"_target_": "scripts.transforms.RestoreSlicesd", "keys": "pred", "image_key": "image"},
            ({"_target_": "AsDiscreted", "keys": "pred",
              "threshold": float(config_view(ctseg_config).infer.threshold)} if binary else
             {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}),
            {"_target_": "CastToTyped", "keys": "pred", "dtype": "$torch.uint8"}]


def postprocess(ctseg_config: dict, key: str = "pred") -> list[dict]:
    """The run's post-processing as MONAI transforms, run in the foreground's box as `ctseg predict` does."""
    steps = postprocess_steps(ctseg_config, num_classes(ctseg_config))
    body = ([{"_target_": "scripts.transforms.RestrictToBodyd", "keys": key, "body_key": "body"}]
            if config_view(ctseg_config).infer.body_mask else [])
    if not steps:
        return body
    return [*body, {"_target_": "scripts.transforms.InForegroundBoxd", "keys": key,
                    "transforms": [{"_target_": name, **kwargs} for name, kwargs in steps]}]


def training_settings(template: dict, spec: dict, ctseg_config: dict, run_config: dict) -> dict:
    """The template's fine-tuning config with the run's network, preprocessing and loss.

    Binary models train on soft (bilinearly resized) foreground targets as ctseg does; others on
    nearest-resized labels made one-hot by the loss.
    """
    if not isinstance(template, dict) or not isinstance(template.get("train"), dict):
        raise ConfigError("bundle template: configs/train.yaml lacks the `train` section")
    settings = copy.deepcopy(template)
    settings["network_def"] = network_def(spec)
    settings["train"]["trainer"]["amp"] = _amp(ctseg_config)
    _preprocessing(settings, "train#preprocessing", ctseg_config)
    binary = num_classes(ctseg_config) == 2
    transforms = _transforms(settings, "train#preprocessing")
    _set(transforms, "Resized", "train#preprocessing", keys=["image", "label"],
         mode=["bilinear", "bilinear" if binary else "nearest"], anti_aliasing=[True, False])
    ratio = config_view(ctseg_config).data.foreground_ratio
    if ratio is None:  # the run sampled slices as they come: one uniform random slice per sample
        index = next(i for i, s in enumerate(transforms) if s.get("_target_") == "RandCropByPosNegLabeld")
        crop = transforms[index]
        transforms[index] = {"_target_": "RandSpatialCropSamplesd", "keys": crop["keys"],
                             "roi_size": crop["spatial_size"], "num_samples": crop["num_samples"],
                             "random_size": False}
    else:
        _set(transforms, "RandCropByPosNegLabeld", "train#preprocessing", pos=float(ratio), neg=1.0 - float(ratio))
    loss = config_view(run_config).loss
    settings["loss"] = {"_target_": "DiceCELoss", "sigmoid": binary, "softmax": not binary,
                        "to_onehot_y": not binary,
                        "include_background": loss.include_background, "batch": loss.batch,
                        "lambda_dice": float(loss.lambda_dice), "lambda_ce": float(loss.lambda_ce)}
    return settings


def _yaml_text(template_text: str, settings: dict) -> str:
    """The settings as YAML under the template's leading comment block."""
    head = []
    for line in template_text.splitlines(keepends=True):
        if not line.startswith("#"):
            break
        head.append(line)
    return "".join(head) + yaml.safe_dump(settings, sort_keys=False, width=100, default_flow_style=None)


def bundle_metadata(template: dict, loaded: LoadedModel, ctseg_config: dict, run: dict,
                    evaluation: list[dict], previous: dict | None = None) -> dict:
    """metadata.json: the template's descriptive fields, this environment's versions, the run's I/O.

    The version is `previous`'s (the bundle being replaced) or the template's, patch bumped, with a
    changelog line for this export on top of the earlier ones.
    """
    meta = copy.deepcopy(template)
    base = previous or template
    version = bump_patch(str(base.get("version", "0.0.0")))
    changelog = {version: f"exported from run `{run['name']}` by ctseg export-bundle "
                          f"(network {loaded.network['name']}, best checkpoint)"}
    changelog.update(base.get("changelog") or {})
    spec = loaded.network
    classes = num_classes(ctseg_config)
    lo, hi = hu_window(ctseg_config)
    size = list(training_size(ctseg_config))
    k = int(spec["in_channels"])
    labels = LABEL_NAMES.get(classes, {str(c): f"class {c}" for c in range(classes)})
    meta.update({
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": changelog,
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
                                      f"{config_view(ctseg_config).infer.threshold} is {labels['1']})"}
                                if classes == 2 else {c: f"{name} (logit; softmax argmax)" for c, name in labels.items()}),
            }},
        },
        "label_classes": ", ".join(f"{c} is {name}" for c, name in labels.items()),
        "pred_classes": "one uint8 label map per CT series, on the CT's own voxel grid: "
                        + ", ".join(f"{c} is {name}" for c, name in labels.items()),
    })
    meta["eval_metrics"], meta["eval_metrics_method"] = eval_metrics(run, evaluation)
    return meta


def eval_metrics(run: dict, evaluation: list[dict]) -> tuple[dict, dict]:
    """metadata.json's `eval_metrics` and a sentence per figure on how it was obtained.

    No mean includes a training case: `held_out_*` average test/unseen cases only, the best
    validation Dice is named selection-biased, and `cv_*` come from `ctseg cv`'s summary.json.
    """
    figures: dict[str, float] = {}
    method: dict[str, str] = {}
    best_val = (run["metrics"] or {}).get("best_val_dice")
    if best_val is not None:
        figures["val_dice_selection_biased"] = round(float(best_val), 4)
        method["val_dice_selection_biased"] = (
            "Dice on the run's validation case(s), which also picked this checkpoint: selection-biased, "
            "not an estimate for new patients")
    held_out = [e for e in evaluation if e["group"] in HELD_OUT_GROUPS]
    if held_out:
        dice = [e["dice"] for e in held_out]
        figures.update(held_out_mean_dice=round(float(np.mean(dice)), 4),
                       held_out_worst_dice=round(float(np.min(dice)), 4), held_out_cases=len(held_out))
        method["held_out_mean_dice"] = (
            "this export run by `ctseg export-bundle --evaluate` on labelled cases the run never loaded "
            f"(its split's test list, or not in its split): {', '.join(e['case'] for e in held_out)}")
    cv = run.get("cv")
    if cv:
        stats = cv["metrics"]
        figures.update(cv_mean_dice=_round(stats["dice"]["mean"]), cv_sd_dice=_round(stats["dice"].get("sd")),
                       cv_worst_dice=_round(stats["dice"]["min"]), cv_folds=int(cv["folds"]),
                       cv_cases=int(cv["cases"]))
        for key in ("hd95_mm", "nsd"):
            if key in stats:
                figures[f"cv_mean_{key}"] = _round(stats[key].get("mean"))
        method["cv_mean_dice"] = cv_method(cv)
    return {k: v for k, v in figures.items() if v is not None}, method


def _round(value: Any) -> float | None:
    return round(float(value), 4) if isinstance(value, (int, float)) else None


def read_cv_summary(cv_dir: Path) -> dict:
    """`ctseg cv`'s summary.json, checked for the fields the card reports (read, not recomputed)."""
    path = cv_dir / "summary.json"
    summary = _read_json(path)
    if summary is None:
        raise CTSegError(f"{path}: missing or unreadable; --cv takes the output folder of `ctseg cv`")
    try:
        dice = summary["metrics"]["dice"]
        ok = (isinstance(summary["method"], str) and int(summary["folds"]) > 0 and int(summary["cases"]) > 0
              and all(isinstance(dice[k], (int, float)) for k in ("mean", "min"))
              and isinstance(summary["worst_case"]["case"], str))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise CTSegError(f"{path}: not a `ctseg cv` summary (expected method, folds, cases, "
                         "metrics.dice.mean/min and worst_case)")
    return {**summary, "source": cv_dir.resolve().name}


def cv_method(cv: dict) -> str:
    """How the CV figures were obtained, in one sentence for the card and metadata."""
    return (f"`ctseg cv` ({cv['method']}, {cv['folds']} folds, {cv['cases']} cases, folder `{cv['source']}`): "
            "each case segmented by the fold that never loaded it, whose checkpoint, learning rate and "
            "stopping came only from its own training cases; figures are over cases (sd: sample) and "
            "describe the training recipe, of which this export is one run")


def bump_patch(version: str) -> str:
    """"0.1.3" -> "0.1.4"; a version not of the form MAJOR.MINOR.PATCH is refused."""
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", version.strip())
    if match is None:
        raise ConfigError(f"bundle version {version!r} is not MAJOR.MINOR.PATCH")
    major, minor, patch = (int(g) for g in match.groups())
    return f"{major}.{minor}.{patch + 1}"


def _version(package: str) -> str:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- scripts
def bundle_scripts() -> dict[str, str]:
    """The bundle's `scripts/` package: ctseg's modules the configs need, imports rewritten.

    Starting from `SCRIPT_ROOTS`, every `ctseg` module imported (and the packages above it) is
    copied; anything else imported must be the standard library or `SCRIPT_IMPORTS`.
    """
    files = {"scripts/__init__.py": '"""Code of this bundle, copied from ctseg by `ctseg export-bundle`."""\n'}
    todo, seen = list(SCRIPT_ROOTS), set()
    while todo:
        module = todo.pop()
        if module in seen or module == "ctseg":
            continue
        seen.add(module)
        source, is_package = _module_source(module)
        tree = ast.parse(source)
        for node in ast.walk(tree):
            for name in _imported(node, module, is_package):
                top = name.split(".")[0]
                if top == "ctseg":
                    todo.append(name)
                elif top not in SCRIPT_IMPORTS and top not in sys.stdlib_module_names and top != "__future__":
                    raise ModelError(f"{module} imports {name}, which the bundle cannot require; "
                                     f"its scripts may use only {', '.join(sorted(SCRIPT_IMPORTS))}")
        parent = module.rsplit(".", 1)[0]
        if parent != "ctseg" and module not in SCRIPT_RENAMES:
            todo.append(parent)
        target = SCRIPT_RENAMES.get(module, "scripts" + module[len("ctseg"):])
        path = target.replace(".", "/") + ("/__init__.py" if is_package else ".py")
        files[path] = _rewrite_imports(source, module)
    return files


def _module_source(module: str) -> tuple[str, bool]:
    base = PACKAGE_ROOT.parent / module.replace(".", "/")
    if (base / "__init__.py").is_file():
        return (base / "__init__.py").read_text(), True
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py").read_text(), False
    raise ModelError(f"{module}: not found under {PACKAGE_ROOT} (export needs ctseg's source tree)")


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Modules an import statement loads: `from a.b import c` gives a.b, or a.b.c for a submodule."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        raise ModelError(f"{module}: relative imports are not supported in bundle scripts")
    base = node.module or ""
    out = [base]
    if base.startswith("ctseg"):
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            path = PACKAGE_ROOT.parent / candidate.replace(".", "/")
            if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
                out.append(candidate)
    return out


_IMPORT_LINE = re.compile(r"^(\s*)(from|import)\s+(ctseg(?:\.\w+)*)")


def _rewrite_imports(source: str, module: str) -> str:
    def target(name: str) -> str:
        for old, new in SCRIPT_RENAMES.items():
            if name == old or name.startswith(old + "."):
                return new + name[len(old):]
        return "scripts" + name[len("ctseg"):]

    lines = [_IMPORT_LINE.sub(lambda m: f"{m[1]}{m[2]} {target(m[3])}", line)
             for line in source.splitlines(keepends=True)]
    text = "".join(lines)
    left = [n for node in ast.walk(ast.parse(text)) for n in _imported(node, module, False)
            if n.split(".")[0] == "ctseg"]
    if left:
        raise ModelError(f"{module}: could not rewrite the import(s) of {', '.join(left)} for the bundle")
    return f"# Copied from ctseg's {module} by `ctseg export-bundle`; imports rewritten to `scripts`.\n" + text


# --------------------------------------------------------------------------- evaluation + card
def evaluate_model(loaded: LoadedModel, case_dir: Path, split: dict | None) -> list[dict]:
    """Per-case metrics of the exported model on the labelled cases of `case_dir`."""
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
            rows.append({"case": result.case, "group": groups.get(result.case, UNSEEN),
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
    body = (["drop labels outside the body (HU > -500, largest component)"]
            if config_view(ctseg_config).infer.body_mask else [])
    tta = list(config_view(ctseg_config).infer.tta)
    lines = [
        "## This export",
        "",
        f"- Run: `{run['name']}`; network `{spec['name']}` (the registry in scripts/networks), features "
        f"{spec.get('features') or 'default'}, {params / 1e6:.2f} M parameters.",
        f"- Input: axial slices resized to {h}x{w}, HU window [{lo:g}, {hi:g}] scaled to [0, 1], "
        f"{spec['in_channels']} slice(s) per input; output: {spec['out_channels']} channel(s) of logits.",
        f"- Post-processing: {', '.join(body + [_describe_step(s) for s in steps]) or 'none'}; "
        f"flip TTA: {('axes ' + ', '.join(map(str, tta)) + ' (`ctseg predict` only)') if tta else 'off'}.",
    ]
    if split:
        lines.append("- Split (by patient): " + "; ".join(
            f"{group} {len(split.get(group) or [])} ({', '.join(split.get(group) or []) or '-'})"
            for group in ("train", "val", "test") if split.get(group) is not None) + ".")
    if metrics:
        lines.append(f"- Training: {metrics.get('epochs', '?')} epochs, best validation Dice "
                     f"{_fmt(metrics.get('best_val_dice'))} at epoch {metrics.get('best_epoch', '?')} "
                     "(selection-biased: the validation case(s) picked this checkpoint), "
                     f"{_fmt(metrics.get('train_seconds'), '.0f')} s, "
                     f"{_fmt(metrics.get('slices_per_second'), '.1f')} slices/s.")
    if run.get("cv"):
        lines += cv_lines(run["cv"])
    if evaluation:
        lines += evaluation_lines(evaluation)
    return "\n".join(lines) + "\n"


def cv_lines(cv: dict) -> list[str]:
    """The card's cross-validation figures, as `ctseg cv` wrote them."""
    stats, worst = cv["metrics"], cv["worst_case"]
    dice = stats["dice"]
    lines = ["", "### Cross-validation", "",
             f"Volume Dice mean {_fmt(dice['mean'])}, sd {_fmt(dice.get('sd'))}, worst case "
             f"{_fmt(dice['min'])} (`{worst['case']}`, fold {worst.get('fold', '?')}), best {_fmt(dice.get('max'))}"
             + (f"; HD95 mean {_fmt(stats['hd95_mm'].get('mean'), '.2f')} mm" if "hd95_mm" in stats else "")
             + (f"; surface Dice (2 mm) mean {_fmt(stats['nsd'].get('mean'))}" if "nsd" in stats else "") + ".",
             "", f"How obtained: {cv_method(cv)}."]
    return lines


def evaluation_lines(evaluation: list[dict]) -> list[str]:
    """The card's per-case table, labelled by what each case did in training, and the held-out mean."""
    roles = {"train": "trained on", "val": "validation (picked the checkpoint)",
             "test": "held out", UNSEEN: "held out (not in the split)"}
    lines = ["", "### Measured with this export", "",
             "Measured by `ctseg export-bundle --evaluate`, through the same inference path as the bundle, "
             "at each CT's original resolution:", "",
             "| case | group | slices | Dice | HD95 (mm) | surface Dice (2 mm) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for e in evaluation:
        lines.append(f"| {e['case']} | {roles.get(e['group'], e['group'])} | {e['slices']} | {e['dice']:.4f} | "
                     f"{e['hd95_mm']:.2f} | {e['nsd']:.4f} |")
    held_out = [e for e in evaluation if e["group"] in HELD_OUT_GROUPS]
    if held_out:
        lines.append(f"| held-out mean ({len(held_out)}) | | | {np.mean([e['dice'] for e in held_out]):.4f} | "
                     f"{np.nanmean([e['hd95_mm'] for e in held_out]):.2f} | "
                     f"{np.nanmean([e['nsd'] for e in held_out]):.4f} |")
    lines += ["", "Only held-out rows estimate performance on new patients, and only they enter a mean: "
              "training cases were learned, and validation cases picked the checkpoint (selection-biased)."
              + ("" if held_out else " **None of these cases is held out**, so this table gives no "
                 "held-out figure.")]
    return lines


def _describe_step(step: tuple[str, dict]) -> str:
    name, kw = step
    if name == "KeepLargestConnectedComponent":
        return f"keep the {kw['num_components']} largest connected component(s) of label(s) {kw['applied_labels']}"
    if name == "FillHoles":
        return f"fill holes in label(s) {kw['applied_labels']}"
    return name


def _fmt(value: Any, spec: str = ".4f") -> str:
    return format(float(value), spec) if isinstance(value, (int, float)) else "n/a"


# --------------------------------------------------------------------------- models
def write_models(model: torch.nn.Module, spec: dict, ctseg_config: dict, folder: Path,
                 extra_files: dict[str, str]) -> None:
    """model.pt (state_dict), model.ts (TorchScript) and model.pt2 (torch.export), each verified."""
    from monai.networks.utils import convert_to_torchscript

    folder.mkdir(parents=True, exist_ok=True)
    # The plain layout: `ctseg predict` may have run this model channels-last (its evaluation).
    model = model.eval().cpu().to(memory_format=torch.contiguous_format)
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


def _check_output(output: Path, template: Path, overwrite: bool) -> dict | None:
    """Refuse an output inside the template, or an existing one without `overwrite` (or not a bundle).

    Returns the metadata of the bundle being replaced (its version and changelog carry on).
    """
    resolved = output.resolve()
    for protected in {template.resolve(), TEMPLATE_DIR.parent.resolve()}:
        if resolved == protected or protected in resolved.parents:
            raise CTSegError(f"{output}: inside the bundle template {protected}; an export never "
                             "writes there, choose another --output")
    if not output.exists():
        return None
    if not output.is_dir():
        raise CTSegError(f"{output}: exists and is not a folder; choose another --output")
    if not any(output.iterdir()):
        return None
    metadata = output / "configs" / "metadata.json"
    if not metadata.is_file():
        raise CTSegError(f"{output}: exists and is not a MONAI bundle; choose another --output")
    if not overwrite:
        raise CTSegError(f"{output}: a bundle is already there; pass --overwrite to replace the files "
                         "an export writes (other files, e.g. eval/, are kept)")
    previous = _read_json(metadata)
    if not isinstance(previous, dict):
        raise CTSegError(f"{metadata}: unreadable; remove the old bundle or choose another --output")
    return previous


def large_files(bundle: Path) -> str:
    """large_files.yml: the weights with their SHA-256 (no URL: they ship inside the bundle)."""
    entries = []
    for name in MODEL_FILES:
        digest = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
        entries.append({"path": name, "url": "", "hash_val": digest, "hash_type": "sha256"})
    return yaml.safe_dump({"large_files": entries}, sort_keys=False)


def _make_shareable(folder: Path) -> None:
    """Usual permissions (umask) instead of the owner-only ones of temporary files and folders."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _move_in(staging: Path, output: Path) -> None:
    """Move every staged file onto its place in `output`, one atomic rename each; nothing else is touched."""
    output.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        target = output / path.relative_to(staging)
        if target.is_dir() or target.is_symlink():
            raise CTSegError(f"{target}: in the way of the exported file (a folder or link); remove it")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
