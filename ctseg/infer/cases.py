"""`ctseg predict`: segment every case of an input and write one NIfTI label map per case.

INPUT is a DICOM series folder, a case folder in any layout `ctseg.data.discover_cases` knows,
or a NIfTI file. Each case is read through `ctseg.io` (so its geometry is exactly what
`ctseg convert` writes), segmented by `ctseg.infer.segmenter.Segmenter` (the Python API:
`predict_volume`, the inference path training validated with, then post-processing and, on
request, right/left lungs) and written as `OUT_DIR/<case>.nii.gz` (uint8 labels, the CT's affine,
original resolution), with `OUT_DIR/<case>.statistics.json` (volume and mean HU per label,
`ctseg.infer.statistics`), also gathered in `OUT_DIR/statistics.json`. With probabilities on,
`OUT_DIR/probabilities/<case>.nii.gz` holds the float32 foreground probability (binary models)
or one volume per class (4D, class last). `formats` adds DICOM outputs that reference the source
series (`<case>.seg.dcm`, `<case>.rtstruct.dcm`): they carry the patient's identifiers, as the
standard requires, so they are written only on request.

A case that fails is recorded and skipped, and its output of an earlier run removed (so a stale
mask cannot be scored as this run's); `OUT_DIR/predictions.csv` lists every case with its
status, time, slices per second and foreground volume, merged by case with the rows already
there (newest wins) under a folder lock after each case. A background thread reads the next case
and writes the previous one while the network runs (at most two cases in memory). Outputs never
replace an input or a file ctseg did not write (`ctseg.outputs`); case names in the CSV are
escaped (`csv_cell`).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from ctseg import distributed
from ctseg.config import config_view
from ctseg.data import discover_cases
from ctseg.data.cases import Case
from ctseg.errors import CTSegError, DicomError
from ctseg.infer.model_loader import LoadedModel
from ctseg.infer.segmenter import Segmentation, Segmenter, inference_config
from ctseg.infer.statistics import label_statistics
from ctseg.io import load_image, save_nifti
from ctseg.io.dicom_seg import save_dicom_seg
from ctseg.io.rtstruct import save_rtstruct
from ctseg.io.formats import image_stem, is_image_file
from ctseg.io.volume import CTVolume
from ctseg.outputs import check_replaceable, check_writable_dir, folder_lock, is_ours, record, remove_ours
from ctseg.utils import atomic_path, atomic_write_text, csv_cell, csv_uncell, log_text

log = logging.getLogger(__name__)

__all__ = ["CSV_NAME", "CasePrediction", "FORMATS", "STATISTICS_NAME", "inference_config", "predict_cases"]

CSV_NAME = "predictions.csv"
STATISTICS_NAME = "statistics.json"
#: Per-label statistics in the CSV: the lungs as one (all foreground) and, when split, each lung.
STAT_COLUMNS = ("mean_hu", "right_lung_ml", "right_lung_mean_hu", "left_lung_ml", "left_lung_mean_hu")
CSV_COLUMNS = ("case", "status", "slices", "seconds", "slices_per_second", "foreground_ml",
               *STAT_COLUMNS, "output", "error")
#: Output formats of `predict`; NIfTI is always written, the others add `<case><suffix>`.
FORMATS = {"nifti": ".nii.gz", "dicom-seg": ".seg.dcm", "rtstruct": ".rtstruct.dcm"}


@dataclass
class CasePrediction:
    """How predicting one case went: its status, timing, foreground volume and output file (a row of
    predictions.csv)."""

    case: str
    status: str  # "ok" or "failed"
    slices: int = 0
    seconds: float = 0.0
    foreground_ml: float = 0.0
    output: Path | None = None
    error: str = ""
    statistics: dict | None = None  # `ctseg.infer.statistics.label_statistics` of the case

    @property
    def slices_per_second(self) -> float:
        return self.slices / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _CaseRun:
    """One case on its way through read -> segment -> write: the stage that fails keeps its error
    and the later stages skip; `seconds` adds up the case's own stages."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.outputs: dict[str, Path] = {}
        self.volume: CTVolume | None = None
        self.segmentation: Segmentation | None = None
        self.slices, self.statistics = 0, None
        self.seconds = 0.0
        self.error: Exception | None = None

    def stage(self, step: Callable[[_CaseRun], None]) -> None:
        if self.error is not None:
            return
        start = time.perf_counter()
        try:
            step(self)
        except Exception as exc:  # noqa: BLE001 - reported per case by `finish`
            self.error = exc
        finally:
            self.seconds += time.perf_counter() - start


def find_inputs(path: str | Path) -> list[Case]:
    """The cases of INPUT: an image file is one case named after the file, a folder is searched."""
    path = Path(path).resolve()
    if path.is_file():  # NIfTI, NRRD, MHA/MHD, or a DICOM file (multi-frame or one slice)
        if not is_image_file(path):
            raise DicomError(f"{path}: a file input must be an image (NIfTI, NRRD, MHA/MHD or a "
                             "DICOM file); give a DICOM series as its folder")
        return [Case(image_stem(path) or path.stem, path)]
    if not path.exists():
        raise DicomError(f"{path}: no such file or folder")
    return discover_cases(path)


def output_path(output_dir: Path, case: str, suffix: str = ".nii.gz") -> Path:
    """`output_dir/<case><suffix>`, refused when the case name would leave `output_dir`."""
    if case in ("", ".", "..") or any(c in case for c in ("/", "\\", "\x00")):
        raise CTSegError(f"case name {case!r} cannot be used as a file name")
    root = Path(output_dir).resolve()
    path = (root / f"{case}{suffix}").resolve()
    if path.parent != root:
        raise CTSegError(f"case name {case!r} would write outside {root}")
    return path


def predict_cases(loaded: LoadedModel | Segmenter, input_path: str | Path, output_dir: str | Path, *,
                  tta: bool | None = None, postprocess: bool = True, probabilities: bool = False,
                  on_result: Callable[[CasePrediction], None] | None = None,
                  series: str | None = None,
                  formats: tuple[str, ...] = ("nifti",), split_lungs: bool | None = None,
                  on_cases: Callable[[int], None] | None = None,
                  on_slices: Callable[[str, int, int], None] | None = None) -> list[CasePrediction]:
    """Segment every case under `input_path` into `output_dir`; a failing case does not stop the rest.

    `loaded` is a loaded model (then `tta`, `postprocess` and `split_lungs` apply) or a ready
    `Segmenter`. Progress: `on_cases(n)` once with this process's case count, `on_slices(case,
    done, total)` during each case, `on_result(result)` after each.
    Under torchrun each rank segments its share of the cases (every case exactly once); the
    results are gathered so every rank returns all of them, and rank 0 writes the CSV.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise CTSegError(f"unknown output format(s) {unknown}; choose from {', '.join(FORMATS)}")
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
    segmenter = (loaded if isinstance(loaded, Segmenter) else
                 Segmenter(loaded, tta=tta, postprocess=postprocess, split_lungs=split_lungs))
    log.info("predicting %d case(s) on %s (tta axes %s, post-processing %s%s)", len(cases),
             segmenter.device, list(config_view(segmenter.config).infer.tta) or "off",
             [name for name, _ in segmenter.steps] or "off",
             ", right/left lungs" if segmenter.split_lungs else "")
    results: list[CasePrediction] = []
    mine = [_CaseRun(case) for case in distributed.shard(cases)]
    if on_cases is not None:
        on_cases(len(mine))

    def read(run: _CaseRun) -> None:
        run.outputs = case_outputs(output_dir, run.case.name, probabilities, formats)
        run.volume = load_image(run.case.image, series)  # `series` as `ctseg series` lists them

    def segment(run: _CaseRun) -> None:
        name = run.case.name
        progress = None if on_slices is None else (lambda done, total: on_slices(name, done, total))
        run.segmentation = segmenter.segment(run.volume, probabilities=probabilities, on_slices=progress)

    def write(run: _CaseRun) -> None:
        outputs, volume, segmentation = run.outputs, run.volume, run.segmentation
        run.volume = run.segmentation = None  # written cases hold no arrays: two cases in flight at most
        if probabilities:
            save_probabilities(segmentation.probabilities, volume.affine, outputs["probabilities"])
        labels = segmentation.labels
        del segmentation  # (classes, z, y, x) float32 probabilities: the largest array of a case
        save_nifti(labels, volume.affine, outputs["nifti"], kind="label")
        stats = label_statistics(labels, volume.array, volume.spacing, segmenter.label_names)
        atomic_write_text(outputs["statistics"], json.dumps({"case": run.case.name, **stats}, indent=2) + "\n")
        names = {v: n.capitalize() for v, n in segmenter.label_names.items()}
        if "dicom-seg" in formats:  # carries the patient's identifiers: only on request
            save_dicom_seg(labels, volume, outputs["dicom-seg"], names=names if segmenter.split_lungs else None)
        if "rtstruct" in formats:  # as DICOM-SEG: identifiers copied, only on request
            save_rtstruct(labels, volume, outputs["rtstruct"], names=names)
        run.slices, run.statistics = int(labels.shape[0]), stats

    def finish(run: _CaseRun) -> None:
        """Record the case's files (or remove them if it failed) and its row, in case order."""
        name = run.case.name
        written = list(run.outputs.values())
        if run.error is None:
            with folder_lock(output_dir):
                record(output_dir, *written)
            result = CasePrediction(name, "ok", slices=run.slices, seconds=run.seconds,
                                    foreground_ml=run.statistics["foreground"]["volume_ml"],
                                    output=run.outputs["nifti"], statistics=run.statistics)
        else:  # one bad case must not stop the others; the CSV records why
            exc = run.error
            if not isinstance(exc, CTSegError):
                log.error("case %s failed unexpectedly", log_text(name), exc_info=exc)
            with folder_lock(output_dir):  # an earlier run's mask must not pass for this run's
                for stale in remove_ours(output_dir, *written):
                    log.warning("case %s failed: removed its earlier output %s", log_text(name),
                                log_text(stale.name))
            result = CasePrediction(name, "failed", seconds=run.seconds, error=f"{type(exc).__name__}: {exc}")
        results.append(result)
        if distributed.world_size() == 1:
            write_csv(results, output_dir / CSV_NAME)
            write_statistics(results, output_dir / STATISTICS_NAME)
        if on_result is not None:
            on_result(result)

    # One background thread reads the next case and writes the previous one (in that queue order)
    # while this thread runs the network: at most two cases hold arrays at any time, torch keeps
    # its threads, and every case goes through the same steps as alone.
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctseg-io")
    try:
        reading = background.submit(mine[0].stage, read) if mine else None
        writing: Future | None = None
        for i, run in enumerate(mine):
            reading.result()
            if i + 1 < len(mine):  # queued behind the previous case's write
                reading = background.submit(mine[i + 1].stage, read)
            run.stage(segment)
            if writing is not None:
                writing.result()
                finish(mine[i - 1])
            writing = background.submit(run.stage, write)
        if writing is not None:
            writing.result()
            finish(mine[-1])
    finally:  # an interrupted run does not wait for a queued read
        background.shutdown(cancel_futures=True)
    if distributed.world_size() > 1:
        results = distributed.unshard(distributed.all_gather(results))
        if distributed.is_main():
            write_csv(results, output_dir / CSV_NAME)
            write_statistics(results, output_dir / STATISTICS_NAME)
    return results


def case_outputs(output_dir: Path, case: str, probabilities: bool,
                 formats: tuple[str, ...]) -> dict[str, Path]:
    """Every file a case writes: "nifti", "statistics", and "probabilities" and each DICOM format
    when asked for."""
    outputs = {"nifti": output_path(output_dir, case),
               "statistics": output_path(output_dir, case, ".statistics.json")}
    if probabilities:
        outputs["probabilities"] = output_path(output_dir / "probabilities", case)
    for name in formats:
        if name != "nifti":
            outputs[name] = output_path(output_dir, case, FORMATS[name])
    return outputs


def check_outputs(cases: list[Case], output_dir: Path, probabilities: bool,
                  formats: tuple[str, ...] = ("nifti",)) -> None:
    """Refuse the run before any work if an output would replace an input or a user's file."""
    planned = [output_dir / CSV_NAME, output_dir / STATISTICS_NAME]
    for case in cases:
        try:
            planned += case_outputs(output_dir, case.name, probabilities, formats).values()
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


def write_csv(results: list[CasePrediction], path: Path) -> None:
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
                            "foreground_ml": f"{r.foreground_ml:.2f}", **_stat_cells(r.statistics),
                            "output": csv_cell(r.output.name) if r.output else "", "error": csv_cell(r.error)}
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows.values())
        atomic_write_text(path, buffer.getvalue())
        record(folder, path)


def _stat_cells(statistics: dict | None) -> dict[str, str]:
    """The CSV's statistics columns of a case (empty where the case has no such label)."""
    cells = dict.fromkeys(STAT_COLUMNS, "")
    if not statistics:
        return cells
    mean = statistics["foreground"]["mean_hu"]
    cells["mean_hu"] = "" if mean is None else f"{mean:.1f}"
    for side in ("right", "left"):
        entry = statistics["labels"].get(f"{side} lung")
        if entry is not None:
            cells[f"{side}_lung_ml"] = f"{entry['volume_ml']:.2f}"
            cells[f"{side}_lung_mean_hu"] = "" if entry["mean_hu"] is None else f"{entry['mean_hu']:.1f}"
    return cells


def write_statistics(results: list[CasePrediction], path: Path) -> None:
    """Merge the cases' statistics into the folder's `statistics.json` by case (newest wins; a
    failed case's earlier entry is dropped), under the folder lock as the CSV."""
    folder = path.parent
    with folder_lock(folder):
        cases: dict[str, dict] = {}
        if is_ours(folder, path):
            cases = json.loads(path.read_text()).get("cases", {})
        for r in results:
            if r.ok and r.statistics is not None:
                cases[r.case] = r.statistics
            else:
                cases.pop(r.case, None)
        atomic_write_text(path, json.dumps({"cases": dict(sorted(cases.items()))}, indent=2) + "\n")
        record(folder, path)
