"""YAML configs with dotted command-line overrides (`train.epochs=3`), read with bounded cost.

Every YAML ctseg reads (run configs, experiment specs, a model's bundle config) goes through
`read_yaml`: a SafeLoader that refuses, while composing and before anything is built, a text over
`MAX_BYTES`, nesting deeper than `MAX_DEPTH` and alias expansion past `MAX_NODES` nodes. A 1 KB
"billion laughs" file or 20,000 nested brackets so end in a ConfigError, not in minutes of
expansion or a RecursionError. Settings are checked against the schema (`ctseg.config.schema`)
when a file is loaded, so a typo or a bad value stops a command before it writes anything.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml

from ctseg.config.schema import resolve_config
from ctseg.errors import ConfigError
from ctseg.utils import atomic_write_text

MAX_BYTES = 1_000_000   # a config is a few KB; a bundle's inference.yaml ~10 KB
MAX_DEPTH = 32          # sections nest 3-4 deep
MAX_NODES = 100_000     # scalars, lists and mappings after expanding aliases


class _CappedLoader(yaml.SafeLoader):
    """SafeLoader counting nesting depth and alias-expanded size while it composes nodes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._size: dict[int, int] = {}  # id(node) -> nodes under it, aliases expanded
        self._total = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        alias = self.check_event(yaml.AliasEvent)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise ConfigError(f"nesting deeper than {MAX_DEPTH} levels")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if alias:
            if id(node) not in self._size:
                raise ConfigError("an alias refers to a node that contains it (recursive alias)")
            size = self._size[id(node)]
        else:
            size = 1
            if isinstance(node, yaml.SequenceNode):
                size += sum(self._size[id(child)] for child in node.value)
            elif isinstance(node, yaml.MappingNode):
                size += sum(self._size[id(k)] + self._size[id(v)] for k, v in node.value)
            self._size[id(node)] = size
        if size > MAX_NODES:
            raise ConfigError(f"expands to more than {MAX_NODES} values (aliases); refused")
        return node


def read_yaml(text: str, source: str | Path) -> Any:
    """Parse YAML `text` (from `source`, named in errors) with the caps above."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters of YAML; at most {MAX_BYTES} are read")
    loader = _CappedLoader(text)
    try:
        return loader.get_single_data()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({exc})") from exc
    except RecursionError:  # deep structures in flow style can still recurse in the parser
        raise ConfigError(f"{source}: nesting too deep") from None
    finally:
        loader.dispose()


def read_yaml_file(path: str | Path) -> Any:
    """`read_yaml` of a file, its size checked before it is read."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes; a config is at most {MAX_BYTES}")
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc.reason})") from exc
    return read_yaml(text, path)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """Read a YAML config, apply `key.sub=value` overrides (values parsed as YAML) and check the
    result against the schema; returns the config as written (defaults are filled by training)."""
    path = Path(path)
    config = read_yaml_file(path) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level")
    overrides = list(overrides)
    config = apply_overrides(config, overrides)
    resolve_config(config, f"{path}{' with overrides' if overrides else ''}")
    return config


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of `config` with each `a.b.c=value` override set (creating sections)."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        value = read_yaml(raw, f"override {item!r}") if raw != "" else ""
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return config


def get(config: dict, dotted: str) -> Any:
    """`a.b.c` of a config as written (None when any part is absent), for the rare reader that
    must see what a config says before the schema resolves it. Settings are read through
    `config_view`, whose defaults are the schema's; there is no default here on purpose."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def save_config(config: dict, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(Path(path), yaml.safe_dump(config, sort_keys=False))
