"""YAML configs with dotted command-line overrides (`train.epochs=3`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml

from ctseg.errors import ConfigError


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """Read a YAML config and apply `key.sub=value` overrides (values parsed as YAML)."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level")
    return apply_overrides(config, overrides)


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of `config` with each `a.b.c=value` override set (creating sections)."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return config


def get(config: dict, dotted: str, default: Any = None) -> Any:
    """Look up `a.b.c` in a nested dict, returning `default` when any part is absent."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten nested sections to dotted keys (for MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def save_config(config: dict, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from ctseg.utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config, sort_keys=False))
