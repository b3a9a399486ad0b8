"""`ctseg predict`: segment every case of an input and write one NIfTI label map per case.

INPUT is a DICOM series folder, a case folder in any layout `ctseg.data.discover_cases` knows,
or a NIfTI file. Each case is read through `ctseg.io` (so its geometry is exactly what
`ctseg convert` writes), segmented by `ctseg.infer.predictor.predict_volume` (the inference path
training validated with), post-processed (`ctseg.infer.postprocess`) and written as
`OUT_DIR/<case>.nii.gz` (uint8 labels, the CT's affine, original resolution). With
probabilities on, `OUT_DIR/probabilities/<case>.nii.gz` holds the float32 foreground probability
(binary models) or one volume per class (4D, class last).

A case that fails is recorded and skipped, and its output of an earlier run removed (so a stale
mask cannot be scored as this run's); `OUT_DIR/predictions.csv` lists every case with its
status, time, slices per second and foreground volume, merged by case with the rows already
there (newest wins) under a folder lock after each case. Outputs never replace an input or a
file ctseg did not write (`ctseg.outputs`); case names in the CSV are escaped (`csv_cell`).
"""

from __future__ import annotations

import copy
import csv
import gzip
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from ctseg import distributed
from ctseg.config import get
from ctseg.data.cases import Case
from ctseg.errors import CTSegError, DicomError
from ctseg.infer.model_loader import LoadedModel
from ctseg.infer.postprocess import postprocess_labels, postprocess_steps
from ctseg.infer.predictor import num_classes, predict_volume
from ctseg.io import CTVolume, load_image, save_nifti
from ctseg.io.dicom_seg import save_dicom_seg
from ctseg.io.formats import image_stem, is_image_file
from ctseg.outputs import check_replaceable, check_writable_dir, folder_lock, is_ours, record, remove_ours
from ctseg.utils import atomic_path, atomic_write_text, csv_cell, csv_uncell, log_text

log = logging.getLogger(__name__)

CSV_NAME = "predictions.csv"
CSV_COLUMNS = ("case", "status", "slices", "seconds", "slices_per_second", "foreground_ml",
               "output", "error")


@dataclass
class CaseResult:
    case: str
    status: str  # "ok" or "failed"
    slices: int = 0
    seconds: float = 0.0
    foreground_ml: float = 0.0
    output: Path | None = None
    error: str = ""

    @property
    def slices_per_second(self) -> float:
        return self.slices / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def find_inputs(path: str | Path) -> list[Case]:
    """The cases of INPUT: an image file is one case named after the file, a folder is searched."""
    from ctseg.data import discover_cases

    path = Path(path).resolve()
    if path.is_file():  # NIfTI, NRRD, MHA/MHD, or a DICOM file (multi-frame or one slice)
        if not is_image_file(path):
            raise DicomError(f"{path}: a file input must be an image (NIfTI, NRRD, MHA/MHD or a "
                             "DICOM file); give a DICOM series as its folder")
        return [Case(image_stem(path) or path.stem, path)]
    if not path.exists():
        raise DicomError(f"{path}: no such file or folder")
    return discover_cases(path)


def load_volume(image: Path, series: str | None = None) -> CTVolume:
    """A case image as a CT volume in any input format (`series` chooses among several DICOM
    series, as `ctseg series` lists them)."""
    return load_image(image, series)


def output_path(output_dir: Path, case: str, suffix: str = ".nii.gz") -> Path:
    """`output_dir/<case><suffix>`, refused when the case name would leave `output_dir`."""
    if case in ("", ".", "..") or any(c in case for c in ("/", "\\", "\x00")):
        raise CTSegError(f"case name {case!r} cannot be used as a file name")
    root = Path(output_dir).resolve()
    path = (root / f"{case}{suffix}").resolve()
    if path.parent != root:
        raise CTSegError(f"case name {case!r} would write outside {root}")
    return path


def inference_config(config: dict, tta: bool | None = None) -> dict:
    """The model's config with the command line's TTA choice applied (None keeps the model's).

    `tta=True` keeps the model's own flip axes when it has some, else flips the axes training
    augmented (`augment.flip.axes`), else left-right: only flips the network has learned to see.
    """
    config = copy.deepcopy(config)
    if tta is None:
        return config
    infer = config.setdefault("infer", {})
    if not tta:
        infer["tta"] = []
    elif not infer.get("tta"):
        flip = get(config, "augment.flip", {}) or {}
        infer["tta"] = list(flip.get("axes", [1])) if float(flip.get("prob", 0.0)) > 0 else [1]
    return config


def predict_cases(loaded: LoadedModel, input_path: str | Path, output_dir: str | Path, *,
                  tta: bool | None = None, postprocess: bool = True, probabilities: bool = False,
                  on_result: Callable[[CaseResult], None] | None = None,
                  series: str | None = None,
                  formats: tuple[str, ...] = ("nifti",)) -> list[CaseResult]:
    """Segment every case under `input_path` into `output_dir`; a failing case does not stop the rest.

    Under torchrun each rank segments its share of the cases (every case exactly once); the
    results are gathered so every rank returns all of them, and rank 0 writes the CSV.
    """
    output_dir = check_writable_dir(output_dir).resolve()
    cases = find_inputs(input_path)
    refusal = None
    if distributed.is_main():  # one check for all ranks, before any of them writes
        try:
            check_outputs(cases, output_dir, probabilities, formats)
        except CTSegError as exc:
            refusal = str(exc)
    refusal = distributed.broadcast(refusal)
    if refusal:
        raise CTSegError(refusal)
    config = inference_config(loaded.config, tta)
    classes = num_classes(config)
    steps = postprocess_steps(config, classes) if postprocess else []
    device = next(loaded.model.parameters()).device
    log.info("predicting %d case(s) on %s (tta axes %s, post-processing %s)", len(cases), device,
             get(config, "infer.tta", []) or "off", [name for name, _ in steps] or "off")
    results: list[CaseResult] = []
    for case in distributed.shard(cases):
        start = time.perf_counter()
        written: list[Path] = []
        try:
            labels_path = output_path(output_dir, case.name)
            written = [labels_path] + ([output_path(output_dir / "probabilities", case.name)]
                                       if probabilities else [])
            if "dicom-seg" in formats:
                written.append(output_path(output_dir, case.name, ".seg.dcm"))
            volume = load_volume(case.image, series)
            labels, probs = predict_volume(loaded.model, volume.array, config, device)
            if probabilities:
                save_probabilities(probs, volume.affine, written[1])
            del probs  # (classes, z, y, x) float32: the largest array of a case
            labels = postprocess_labels(labels, steps)
            save_nifti(labels, volume.affine, labels_path, kind="label")
            if "dicom-seg" in formats:  # carries the patient's identifiers: only on request
                save_dicom_seg(labels, volume, written[-1])
            with folder_lock(output_dir):
                record(output_dir, *written)
            voxel_ml = float(np.prod(volume.spacing)) / 1000.0
            result = CaseResult(case.name, "ok", slices=int(labels.shape[0]),
                                seconds=time.perf_counter() - start,
                                foreground_ml=float(np.count_nonzero(labels)) * voxel_ml,
                                output=labels_path)
        except Exception as exc:  # one bad case must not stop the others; the CSV records why
            if not isinstance(exc, CTSegError):
                log.exception("case %s failed unexpectedly", log_text(case.name))
            with folder_lock(output_dir):  # an earlier run's mask must not pass for this run's
                for stale in remove_ours(output_dir, *written):
                    log.warning("case %s failed: removed its earlier output %s", log_text(case.name),
                                log_text(stale.name))
            result = CaseResult(case.name, "failed", seconds=time.perf_counter() - start,
                                error=f"{type(exc).__name__}: {exc}")
        results.append(result)
        if distributed.world_size() == 1:
            write_csv(results, output_dir / CSV_NAME)
        if on_result is not None:
            on_result(result)
    if distributed.world_size() > 1:
        results = distributed.unshard(distributed.all_gather(results))
        if distributed.is_main():
            write_csv(results, output_dir / CSV_NAME)
    return results


def check_outputs(cases: list[Case], output_dir: Path, probabilities: bool,
                  formats: tuple[str, ...] = ("nifti",)) -> None:
    """Refuse the run before any work if an output would replace an input or a user's file."""
    planned = [output_dir / CSV_NAME]
    for case in cases:
        try:
            planned.append(output_path(output_dir, case.name))
            if probabilities:
                planned.append(output_path(output_dir / "probabilities", case.name))
            if "dicom-seg" in formats:
                planned.append(output_path(output_dir, case.name, ".seg.dcm"))
        except CTSegError:
            continue  # an unusable case name fails on its own, as its CSV row says
    inputs = [p for case in cases for p in (case.image, case.label) if p is not None]
    check_replaceable(output_dir, planned, inputs)


def save_probabilities(probs: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Class probabilities (C, z, y, x) as float32 NIfTI on the CT's grid: binary models store the
    foreground only (3D), others one volume per class (4D, class last)."""
    data = probs[1].transpose(2, 1, 0) if probs.shape[0] == 2 else probs.transpose(3, 2, 1, 0)
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:  # bytes, as nibabel infers compression from the temp name
        tmp.write_bytes(gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))
    return path


def write_csv(results: list[CaseResult], path: Path) -> None:
    """Merge `results` into the CSV by case (newest wins), under the folder lock, so runs into
    one folder, at once or one after another, keep each other's rows."""
    folder = path.parent
    with folder_lock(folder):
        rows: dict[str, dict] = {}
        if is_ours(folder, path):
            with open(path, newline="") as fh:
                rows = {csv_uncell(row["case"]): row for row in csv.DictReader(fh) if row.get("case")}
        for r in results:
            rows[r.case] = {"case": csv_cell(r.case), "status": r.status, "slices": r.slices,
                            "seconds": f"{r.seconds:.3f}", "slices_per_second": f"{r.slices_per_second:.2f}",
                            "foreground_ml": f"{r.foreground_ml:.2f}",
                            "output": csv_cell(r.output.name) if r.output else "", "error": csv_cell(r.error)}
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows.values())
        atomic_write_text(path, buffer.getvalue())
        record(folder, path)
