"""Configuration: YAML files and `key=value` overrides (`files`), and the schema (`schema`) that
states every setting once, with its type, default and allowed range, and gives stages a typed
read-only view of a resolved config."""

from ctseg.config.files import apply_overrides, get, load_config, read_yaml, read_yaml_file, save_config
from ctseg.config.schema import (Config, check_resume, config_view, flatten, known_keys, resolve_config,
                                 schema_defaults)

__all__ = ["Config", "apply_overrides", "check_resume", "config_view", "flatten", "get", "known_keys",
           "load_config", "read_yaml", "read_yaml_file", "resolve_config", "save_config", "schema_defaults"]
