"""The run record (`run.json` in a run folder): where a training read its data and what it ran on.

The model config (config.yaml, checkpoints, bundles) says what the model is and how to apply it;
it carries no run locations. The record says where this run found its cases and its
preprocessing cache, on which machine and with which package versions, so that resuming or
comparing the run finds its data again. Runs made before the record existed kept their locations
in the config (`data.case_dir`, `data.cache_dir`); `read_run_record` reads those from their
config.yaml.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ctseg.config import config_view, load_config
from ctseg.errors import CTSegError
from ctseg.train.tracking import package_versions
from ctseg.utils import atomic_write_text

RUN_RECORD = "run.json"


@dataclass(frozen=True)
class RunRecord:
    case_dir: str | None  # None: the built-in phantom (under cache_dir)
    cache_dir: str | None  # None: the default cache folder (runs made before the record)
    machine: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)


def new_run_record(case_dir: Path | None, cache_dir: Path) -> RunRecord:
    """The record of a run training now, on this machine."""
    machine = {"system": platform.system(), "machine": platform.machine(),
               "processor": platform.processor(), "cpus": os.cpu_count()}
    return RunRecord(str(Path(case_dir).resolve()) if case_dir is not None else None,
                     str(Path(cache_dir).resolve()), machine, package_versions())


def write_run_record(run_dir: Path, record: RunRecord) -> None:
    atomic_write_text(Path(run_dir) / RUN_RECORD, json.dumps(asdict(record), indent=2) + "\n")


def read_run_record(run_dir: Path) -> RunRecord:
    """The record of `run_dir`; for a run made before records, the locations its config.yaml kept."""
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        legacy = Path(run_dir) / "config.yaml"
        data = config_view(load_config(legacy), str(legacy)).data if legacy.is_file() else None
        return RunRecord(data.case_dir if data else None, data.cache_dir if data else None)
    try:
        raw = json.loads(path.read_text())
        return RunRecord(**raw)
    except (OSError, ValueError, TypeError) as exc:
        raise CTSegError(f"{path}: unreadable run record ({exc})") from exc
