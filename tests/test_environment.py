"""Environment variables are read at the edge: the CLI turns them into settings, the library
takes values (issue 11). CTSEG_CACHE_DIR names the cache when the config does not;
MLFLOW_TRACKING_URI replaces `tracking.uri`, as MLflow's own convention has it."""

from __future__ import annotations

from pathlib import Path

from ctseg.cli import _environment_cache, _with_environment
from ctseg.config import config_view
from ctseg.data.cache import DEFAULT_CACHE_DIR, default_cache_dir
from ctseg.train.tracking import tracking_uri


def test_cli_passes_the_environment_down_as_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("CTSEG_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    cfg = config_view(_with_environment({"tracking": {"uri": "sqlite:///config.db"}}))
    assert cfg.data.cache_dir == str(tmp_path / "env-cache") and cfg.tracking.uri == "sqlite:///env.db"
    # a config that names its cache keeps it; a resumed run (cache=False) keeps its recorded one
    assert config_view(_with_environment({"data": {"cache_dir": "mine"}})).data.cache_dir == "mine"
    assert config_view(_with_environment({}, cache=False)).data.cache_dir is None
    assert _environment_cache() == tmp_path / "env-cache"


def test_without_the_environment_the_config_is_unchanged(monkeypatch):
    monkeypatch.delenv("CTSEG_CACHE_DIR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = {"data": {"size": [32, 32]}, "tracking": {"uri": "sqlite:///config.db"}}
    assert _with_environment({**config}) == config and _environment_cache() is None


def test_the_library_does_not_read_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CTSEG_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert default_cache_dir() == Path(DEFAULT_CACHE_DIR)
    assert tracking_uri({}, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking_uri({"tracking": {"uri": "sqlite:///config.db"}}, tmp_path) == "sqlite:///config.db"
