"""Finding cases (image + optional mask) in the folder layouts users have.

Case names come from folder and file names only, never from DICOM headers, so no patient
identifier can reach run folders, logs or exported file names through them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ctseg.errors import DicomError
from ctseg.io.formats import IMAGE_SUFFIXES, image_stem
from ctseg.io.nifti import NIFTI_SUFFIXES
from ctseg.io.redact import show_path

log = logging.getLogger(__name__)

_IMAGE_NAMES = tuple(f"image{s}" for s in IMAGE_SUFFIXES)
_MASK_SUFFIXES = ("_seg.npz", *(f"_seg{s}" for s in NIFTI_SUFFIXES))


@dataclass(frozen=True)
class Case:
    """One image (a DICOM series folder or an image file) and its label map, if any."""

    name: str
    image: Path
    label: Path | None = None

    def as_dict(self) -> dict:
        """The MONAI-style data dict the rest of the pipeline passes around."""
        return {"image": str(self.image), "label": str(self.label) if self.label else None,
                "case": self.name}


def discover_cases(case_dir: str | Path) -> list[Case]:
    """All cases under `case_dir`, sorted by name.

    Layouts:
    - seed: `Images/<case>/` (DICOM) + `Segmentations/<case>_seg.npz` (or `_seg.nii.gz`);
    - one folder per case: `<case>/` with DICOM anywhere inside (or `<case>/image.nii.gz`,
      `image.nrrd`, `image.mha`, `image.mhd`), mask `<case>/mask.nii.gz` or `<case>_seg.nii.gz`
      beside the folder;
    - image files: `<case>.nii.gz` (or `.nrrd`, `.mha`, `.mhd`) with `<case>_seg.nii.gz` beside it;
    - `case_dir` itself a single DICOM series folder: one case named after the folder.
    """
    root = Path(case_dir)
    if not root.is_dir():
        raise DicomError(f"{show_path(root)}: case folder not found")
    if (root / "Images").is_dir():
        cases = _seed_layout(root)
    else:
        cases = _folder_layout(root)
    if not cases:
        raise DicomError(f"{show_path(root)}: no cases found; expected Images/<case>/ with "
                         "Segmentations/<case>_seg.npz, or one folder of DICOM files per case")
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DicomError(f"{show_path(root)}: case names occur twice: "
                         f"{', '.join(map(show_path, duplicates))}")
    return sorted(cases, key=lambda c: c.name)


def _seed_layout(root: Path) -> list[Case]:
    segmentations = root / "Segmentations"
    cases = []
    for folder in _subfolders(root / "Images"):
        label = _first_existing(segmentations / f"{folder.name}{s}" for s in _MASK_SUFFIXES)
        if label is None:
            log.info("case %s has no mask in %s", show_path(folder.name), segmentations.name)
        cases.append(Case(folder.name, folder, label))
    return cases


def _folder_layout(root: Path) -> list[Case]:
    if _has_dicom_files(root, recursive=False):
        return [Case(root.name, root, _folder_mask(root))]
    cases = []
    for folder in _subfolders(root):
        image = _first_existing(folder / name for name in _IMAGE_NAMES)
        if image is not None:
            cases.append(Case(folder.name, image, _folder_mask(folder)))
        elif _has_dicom_files(folder, recursive=True):
            cases.append(Case(folder.name, folder, _folder_mask(folder)))
        else:
            log.info("skipped folder %s: no DICOM files or image file (image.nii.gz, .nrrd, "
                     ".mha, .mhd) inside", show_path(folder.name))
    for path in sorted(root.iterdir()):
        name = image_stem(path)
        if name is None or name.endswith("_seg") or not path.is_file():
            continue
        label = _first_existing(root / f"{name}{s}" for s in _MASK_SUFFIXES)
        cases.append(Case(name, path, label))
    return cases


def _folder_mask(folder: Path) -> Path | None:
    inside = (folder / f"mask{s}" for s in NIFTI_SUFFIXES)
    beside = (folder.parent / f"{folder.name}{s}" for s in _MASK_SUFFIXES)
    return _first_existing([*inside, *beside])


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _first_existing(paths) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _has_dicom_files(folder: Path, recursive: bool) -> bool:
    """True as soon as one file carries the DICOM preamble magic (cheap: 132 bytes per file)."""
    files = _walk(folder) if recursive else folder.iterdir()
    for path in files:
        if path.is_file() and not path.name.startswith(".") and _is_dicom(path):
            return True
    return False


def _walk(folder: Path) -> Iterator[Path]:
    """Files under `folder`, following folder links (as `load_series` does) but not around loops."""
    seen: set[tuple[int, int]] = set()
    for parent, dirs, names in os.walk(folder, followlinks=True):
        stat = os.stat(parent)
        if (stat.st_dev, stat.st_ino) in seen:
            dirs.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        yield from (Path(parent, name) for name in names)


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False
