"""MLflow tracking of a training run, best-effort: a failing store never stops training.

Default store: `sqlite:///<runs root>/mlflow.db` with artifacts in `<runs root>/mlartifacts`
(what `make mlflow-ui` opens); `tracking.uri` in the config takes precedence (the CLI puts
`MLFLOW_TRACKING_URI` there). The client API is used rather than MLflow's global "active run", so nothing leaks
between runs in one process and no automatic tags (user name, source file) are added: params are
the flattened config, package versions and the git commit; nothing from DICOM headers.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from ctseg.config import config_view, flatten
from ctseg.utils import atomic_write_text

logger = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"  # in the run folder: which MLflow run to continue on --resume
PACKAGES = ("ctseg", "torch", "monai", "numpy", "mlflow", "pydicom", "nibabel", "SimpleITK")
#: Bounds on each call to a tracking server (unless set in the environment): with MLflow's own
#: defaults (7 retries, exponential backoff) an unreachable server held training for about four
#: minutes before the first failure could be reported; with these it is seconds.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def tracking_uri(config: dict, runs_root: Path) -> str:
    return (config_view(config).tracking.uri
            or f"sqlite:///{Path(runs_root).resolve() / 'mlflow.db'}")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str:
    """The commit of the ctseg source tree (with `-dirty` when it has local changes)."""
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


class Tracker:
    """One MLflow run; after the first failure it logs a warning once and does nothing more."""

    def __init__(self, config: dict, run_dir: Path, enabled: bool = True) -> None:
        tracking = config_view(config).tracking
        self.enabled = enabled and tracking.enabled
        self.run_dir = Path(run_dir)
        self.uri = tracking_uri(config, self.run_dir.parent)
        self.experiment = tracking.experiment
        self.client = None
        self.run_id: str | None = None

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        if not self.enabled:
            return None
        try:
            return fn()
        except Exception as exc:  # any store/network/filesystem failure: tracking is not essential
            self.enabled = False
            logger.warning("MLflow tracking stopped (%s failed: %s: %s); training goes on, "
                           "the run folder still has every result", what, type(exc).__name__, exc)
            return None

    def start(self, config: dict, resume: bool = False) -> None:
        """Open the MLflow run (continuing the run folder's previous one on resume)."""
        self._call("start", lambda: self._start(config, resume))

    def _start(self, config: dict, resume: bool) -> None:
        for name in ("alembic", "mlflow.store.db.utils"):  # schema migrations log at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        if self.uri.startswith(("http://", "https://")):
            for name, value in HTTP_LIMITS.items():
                os.environ.setdefault(name, value)
        self.client = MlflowClient(tracking_uri=self.uri)
        previous = self.run_dir / TRACKING_FILE
        if resume and previous.is_file():
            info = json.loads(previous.read_text())
            if info.get("tracking_uri") == self.uri:
                self.run_id = info["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                logger.info("MLflow: continuing run %s in %s", self.run_id, self.uri)
                return
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            experiment_id = self.client.create_experiment(self.experiment,
                                                          artifact_location=self._artifact_location())
        else:
            experiment_id = experiment.experiment_id
        commit = git_commit()
        run = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                     tags={"mlflow.source.git.commit": commit})
        self.run_id = run.info.run_id
        limit = 6000  # MLflow's maximum param value length
        params = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                  for k, v in flatten(config).items()}
        params.update({f"version.{k}": v for k, v in package_versions().items()})
        params["git_commit"] = commit
        items = [Param(k, v[:limit]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag("run_dir", str(self.run_dir.resolve()))])
        atomic_write_text(previous, json.dumps({"tracking_uri": self.uri, "run_id": self.run_id}) + "\n")
        logger.info("MLflow: run %s in %s", self.run_id, self.uri)

    def _artifact_location(self) -> str | None:
        """Artifacts beside a SQLite store (else MLflow's default would be ./mlruns of the cwd)."""
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri[len("sqlite:///"):])
            return (db.parent / "mlartifacts").resolve().as_uri()
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None:
            return

        def log() -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step)
                                                        for k, v in metrics.items()])

        self._call("log_metrics", log)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.run_id is not None and Path(path).exists():
            self._call("log_artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self._call("end", lambda: self.client.set_terminated(self.run_id, status=status))
