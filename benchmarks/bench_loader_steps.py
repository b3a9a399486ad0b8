"""Where `ctseg.io.load_series` spends its time on one series, step by step.

Header parsing of every file: pydicom's `dcmread(stop_before_pixels=True, specific_tags=...)`
plus reading the attributes the loader needs; `pydicom_header` (pydicom with unwanted
undefined-length sequences stepped over at byte level, the loader's fallback path today); the
byte scanner `read_header` (the fast path); the last two also in a thread pool of 2 and 4.
Pixel reading (`_read_hu`): one thread against the loader's pool. Then the whole `load_series`.
Medians of `--repeats` runs from a warm page cache. Without the shared LCTSC data, a 150-slice
512x512 phantom series is generated in a temporary folder.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom

import bench_loader  # this folder: the shared command line

from ctseg.io import dicom, dicom_headers, load_series



def _dcmread(path: Path) -> tuple:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=dicom_headers.HEADER_KEYWORDS)
    return tuple(ds.get(k) for k in dicom_headers.HEADER_KEYWORDS)


def _pydicom_header(path: Path) -> dicom_headers.RawHeader:
    with open(path, "rb") as fp:
        return dicom_headers.pydicom_header(fp)


def _pooled(fn, threads: int):
    def run(files: list[Path]) -> list:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(fn, files))
    return run


def _pixels(workers: int):
    def run(headers: list) -> object:
        saved, dicom._PIXEL_WORKERS = dicom._PIXEL_WORKERS, workers
        try:
            return dicom._read_hu(headers)
        finally:
            dicom._PIXEL_WORKERS = saved
    return run


def _median(fn, arg, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(folder: Path, repeats: int) -> None:
    volume = load_series(folder)  # also warms the page cache
    files = list(volume.files)
    headers = [dicom_headers.read_header(f) for f in files]
    steps = [
        ("headers: pydicom dcmread(stop_before_pixels, specific_tags)",
         lambda fs: [_dcmread(f) for f in fs], files),
        ("headers: pydicom_header (byte-level sequence skipping; the fallback)",
         lambda fs: [_pydicom_header(f) for f in fs], files),
        ("headers: pydicom_header, 2 threads", _pooled(_pydicom_header, 2), files),
        ("headers: pydicom_header, 4 threads", _pooled(_pydicom_header, 4), files),
        ("headers: read_header (byte scanner; the fast path)",
         lambda fs: [dicom_headers.read_header(f) for f in fs], files),
        ("headers: read_header, 2 threads", _pooled(dicom_headers.read_header, 2), files),
        ("headers: read_header, 4 threads", _pooled(dicom_headers.read_header, 4), files),
        ("pixels: _read_hu, 1 thread", _pixels(1), headers),
        (f"pixels: _read_hu, {dicom._PIXEL_WORKERS} threads (the loader's)",
         _pixels(dicom._PIXEL_WORKERS), headers),
        ("whole load_series", load_series, folder),
    ]
    z, y, x = volume.shape
    print(f"series: {folder.name}, {z} slices of {y}x{x}; median of {repeats} runs, warm cache; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, Python {platform.python_version()}, "
          f"pydicom {pydicom.__version__}\n")
    print("| step | median s |")
    print("| --- | --- |")
    for name, fn, arg in steps:
        print(f"| {name} | {_median(fn, arg, repeats):.3f} |", flush=True)


if __name__ == "__main__":
    bench_loader.main(run, __doc__.splitlines()[0])
