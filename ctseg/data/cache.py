"""Preprocess each case once: DICOM/NIfTI -> HU volume + mask as memory-mapped `.npy` files.

Parsing a DICOM series costs seconds per case; a training run reads every slice dozens of times.
Each case is therefore read once (through `ctseg.io`, so geometry and HU are exactly what
`ctseg convert` gives) into an entry keyed by the source files' identity (path, size,
modification time): `preprocessed/<source key>/{hu,label}.npy` at original resolution (what
validation and QC measure on). Inside it, one folder per preprocessing setting (HU window,
training size, in-plane spacing, classes) holds the windowed, resized training arrays (image and
soft labels; with `data.spacing`, first cropped or padded to the body-centred field of view of
`ctseg.geometry`, as `predict_volume` does), so
new settings are derived from the cached HU without touching DICOM again. A changed source file
gives a new key.
Only geometry goes into `meta.json`: no patient identifier enters the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np

from ctseg.config import config_view
from ctseg.errors import MaskError
from ctseg.geometry import AIR_HU, crop_or_pad, fov_box
from ctseg.io import load_image, load_mask
from ctseg.transforms import (hu_window, label_channels, num_classes, output_channels, preprocess_transforms,
                              training_size)

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
DEFAULT_CACHE_DIR = Path(".cache")


class CaseLike(Protocol):
    name: str
    image: Path
    label: Path | None


def default_cache_dir() -> Path:
    """`.cache/` in the working directory (the repo root under make); the CLI passes
    `$CTSEG_CACHE_DIR` down as `data.cache_dir` instead."""
    return Path(DEFAULT_CACHE_DIR)


@dataclass
class CachedCase:
    """One preprocessed case; arrays are memory-mapped read-only on first access."""

    name: str
    path: Path         # the source entry (original resolution)
    train_path: Path   # the preprocessing-settings folder inside it (training size)
    spacing: tuple[float, float, float]
    affine: np.ndarray
    shape: tuple[int, int, int]
    has_label: bool
    foreground: np.ndarray = field(repr=False)  # (z,) bool: slice has any label > 0
    label_values: tuple[int, ...] = ()
    hit: bool = False  # True when the source was not read again

    @cached_property
    def hu(self) -> np.ndarray:
        """(z, y, x) HU at original resolution (int16 when lossless, else float32)."""
        return np.load(self.path / "hu.npy", mmap_mode="r")

    @cached_property
    def label(self) -> np.ndarray:
        """(z, y, x) uint8 labels at original resolution."""
        self._need_label()
        return np.load(self.path / "label.npy", mmap_mode="r")

    @cached_property
    def train_image(self) -> np.ndarray:
        """(z, H, W) float32 windowed to [0, 1], at the training size."""
        return np.load(self.train_path / "image.npy", mmap_mode="r")

    @cached_property
    def train_label(self) -> np.ndarray:
        """(z, C, H, W) float16 soft labels at the training size (C = 1 foreground channel for
        binary, else one per class): the fraction of each training pixel a class covers."""
        self._need_label()
        return np.load(self.train_path / "label.npy", mmap_mode="r")

    def _need_label(self) -> None:
        if not self.has_label:
            raise MaskError(f"case {self.name}: has no mask")


def _file_identity(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def source_identity(case: CaseLike) -> dict:
    """What the source key hashes: every input file's path, size and modification time."""
    image = Path(case.image)
    files = sorted(p for p in image.rglob("*") if p.is_file()) if image.is_dir() else [image]
    return {
        "format": CACHE_FORMAT,
        "image": [_file_identity(p) for p in files],
        "label": _file_identity(Path(case.label)) if case.label else None,
    }


def preprocessing_settings(config: dict) -> dict:
    return {"window": list(hu_window(config)), "size": list(training_size(config)),
            "label_channels": output_channels(config), "classes": num_classes(config),
            "resize": "bilinear, image anti-aliased, soft labels", "spacing": config_view(config).spacing}


def _key(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def cache_case(case: CaseLike, config: dict, cache_dir: str | Path | None = None) -> CachedCase:
    """The cached entry for `case`, reading and preprocessing the source only if needed."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = root / "preprocessed" / _key(source_identity(case))
    hit = (entry / "meta.json").is_file()
    if not hit:
        logger.info("reading case %s (once; cached for later epochs and runs)", case.name)
        _write_source(case, entry)
    settings = preprocessing_settings(config)
    derived = entry / _key(settings)
    if not (derived / "settings.json").is_file():
        _write_derived(entry, derived, settings, config)
    meta = json.loads((entry / "meta.json").read_text())
    return CachedCase(name=case.name, path=entry, train_path=derived, spacing=tuple(meta["spacing"]),
                      affine=np.asarray(meta["affine"], dtype=np.float64), shape=tuple(meta["shape"]),
                      has_label=meta["has_label"], foreground=np.asarray(meta["foreground"], dtype=bool),
                      label_values=tuple(meta["label_values"]), hit=hit)


def cache_cases(cases: Iterable[CaseLike], config: dict,
                cache_dir: str | Path | None = None) -> list[CachedCase]:
    return [cache_case(case, config, cache_dir) for case in cases]


def load_case_volume(case: CaseLike):
    """A case's image as a CTVolume, read by `ctseg.io.load_image` as `ctseg predict` reads it
    (DICOM folder, multi-frame DICOM, NIfTI, NRRD, MetaImage), so training and inference agree."""
    return load_image(Path(case.image))


def _write_source(case: CaseLike, entry: Path) -> None:
    volume = load_case_volume(case)
    hu = np.asarray(volume.array, dtype=np.float32)
    label = load_mask(case.label, volume).astype(np.uint8) if case.label else None
    rounded = np.rint(hu)
    lossless = hu.size and np.array_equal(rounded, hu) and hu.min() >= -32768 and hu.max() <= 32767
    meta = {
        "spacing": [float(s) for s in volume.spacing],
        "affine": np.asarray(volume.affine, dtype=float).tolist(),
        "shape": list(hu.shape),
        "has_label": label is not None,
        "foreground": (label.reshape(label.shape[0], -1).max(axis=1) > 0).tolist()
        if label is not None else [False] * hu.shape[0],
        "label_values": np.unique(label).tolist() if label is not None else [],
    }
    with _atomic_dir(entry, "meta.json") as tmp:
        np.save(tmp / "hu.npy", rounded.astype(np.int16) if lossless else hu)
        if label is not None:
            np.save(tmp / "label.npy", label)
        (tmp / "meta.json").write_text(json.dumps(meta))  # written last: marks a complete entry


def _write_derived(entry: Path, derived: Path, settings: dict, config: dict) -> None:
    has_label = (entry / "label.npy").is_file()
    hu = np.load(entry / "hu.npy").astype(np.float32)
    label = np.load(entry / "label.npy") if has_label else None
    target = config_view(config).spacing
    if target is not None:  # the field of view data.size * data.spacing mm around the body
        spacing_yx = json.loads((entry / "meta.json").read_text())["spacing"][1:]
        box = fov_box(hu, spacing_yx, target, training_size(config))
        hu = crop_or_pad(hu, box, AIR_HU)
        label = crop_or_pad(label, box, 0) if label is not None else None
    sample = {"image": hu}
    keys: tuple[str, ...] = ("image",)
    if label is not None:
        sample["label"] = label_channels(label, config)
        keys = ("image", "label")
    out = preprocess_transforms(config, keys)(sample)
    with _atomic_dir(derived, "settings.json") as tmp:
        np.save(tmp / "image.npy", np.asarray(out["image"], dtype=np.float32))
        if has_label:
            soft = np.asarray(out["label"], dtype=np.float32).clip(0.0, 1.0)
            np.save(tmp / "label.npy", soft.reshape(hu.shape[0], -1, *soft.shape[1:]).astype(np.float16))
        (tmp / "settings.json").write_text(json.dumps(settings))


@contextmanager
def _atomic_dir(final: Path, marker: str) -> Iterator[Path]:
    """Fill a private folder, then rename it into place: no reader ever sees half an entry.

    `marker` is the file written last; a folder without it is incomplete and gets replaced.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if (final / marker).is_file():
            return  # another run completed the same entry meanwhile; keep theirs
        shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
