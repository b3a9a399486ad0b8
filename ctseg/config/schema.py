"""Every setting ctseg reads, stated once: name, type, default and allowed range.

A config arrives from a YAML file, from `key=value` overrides, inside a checkpoint or inside a
bundle; `resolve_config` checks any of them the same way (unknown keys, with the closest valid
key suggested; types; ranges, so an untrusted model cannot ask for a 6000x6000 input or 200 TTA
passes) and fills what is missing from the defaults below. The resolved dict is what a run saves
(config.yaml, checkpoints, MLflow); stages read it through `config_view`, a frozen typed view
(`cfg.train.epochs`), in the way nnU-Net's ConfigurationManager wraps its plans.
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

from ctseg.errors import ConfigError


@dataclass(frozen=True)
class Check:
    """A test of one value, and the phrase that names what it accepts in an error."""

    describe: str
    test: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int, hi: int) -> Check:
    return Check(f"an integer in [{lo}, {hi}]", lambda v: _is_int(v) and lo <= v <= hi)


def number(lo: float, hi: float, *, above: bool = False) -> Check:
    """A finite number in [lo, hi] (in (lo, hi] with `above`)."""
    return Check(f"a number in {'(' if above else '['}{lo}, {hi}]",
                 lambda v: _is_number(v) and (lo < v if above else lo <= v) and v <= hi)


BOOLEAN = Check("true or false", lambda v: isinstance(v, bool))
TEXT = Check("a string", lambda v: isinstance(v, str))


def choice(*options: Any) -> Check:
    return Check(f"one of {list(options)}", lambda v: isinstance(v, str) and v in options)


def optional(check: Check) -> Check:
    return Check(f"{check.describe} or null", lambda v: v is None or check.test(v))


def either(a: Check, b: Check) -> Check:
    return Check(f"{a.describe} or {b.describe}", lambda v: a.test(v) or b.test(v))


def items(item: Check, min_len: int, max_len: int) -> Check:
    """A list of `min_len`..`max_len` values, each passing `item`."""
    length = f"{min_len}" if min_len == max_len else f"{min_len} to {max_len}"
    return Check(f"a list of {length} items, each {item.describe}",
                 lambda v: isinstance(v, list) and min_len <= len(v) <= max_len
                 and all(item.test(x) for x in v))


def _literal(v: Any, depth: int = 0) -> bool:
    if depth > 8:
        return False
    if isinstance(v, dict):
        return len(v) <= 64 and all(isinstance(k, str) and _literal(x, depth + 1) for k, x in v.items())
    if isinstance(v, list):
        return len(v) <= 64 and all(_literal(x, depth + 1) for x in v)
    return v is None or isinstance(v, (bool, str)) or _is_number(v)


LITERALS = Check("a mapping of plain values (at most 64 entries, 8 levels)",
                 lambda v: isinstance(v, dict) and _literal(v))
KEEP_LARGEST = Check("an integer in [0, 64], null, or a mapping {label: integer}",
                     lambda v: v is None or integer(0, 64).test(v) or (
                         isinstance(v, dict) and len(v) <= 255
                         and all(_is_int(k) and integer(0, 64).test(n) for k, n in v.items())))
MAX_SIZE = 2048  # in-plane pixels: 2048x2048 slices are 16 MB each as float32
MM = number(0, 100, above=True)  # an in-plane spacing, mm per pixel


def setting(default: Any, check: Check) -> Any:
    """A dataclass field holding a setting's default and its check."""
    if check.test(default) is False:
        raise AssertionError(f"default {default!r} fails its own check ({check.describe})")
    return field(default_factory=lambda: copy.deepcopy(default), metadata={"check": check})


def section(cls: type, *, present: bool = True) -> Any:
    """A nested section; with `present=False` it exists only when the config gives it."""
    return field(default_factory=cls if present else lambda: None,
                 metadata={"section": cls, "present": present})


# ------------------------------------------------------------------------------- the schema
@dataclass(frozen=True)
class DataConfig:
    case_dir: Optional[str] = setting(None, optional(TEXT))     # None: the phantom (section `phantom`)
    window: tuple = setting([-1000, 400], items(number(-100_000, 100_000), 2, 2))  # HU -> [0, 1]
    size: Any = setting([256, 256], either(integer(8, MAX_SIZE), items(integer(8, MAX_SIZE), 2, 2)))
    context: int = setting(1, integer(1, 31))                   # 2.5D: odd number of slices as channels
    # In-plane mm per network pixel, a number or [sy, sx]: the input covers size*spacing mm around
    # the body (ctseg/geometry.py). None: every slice resized from its pixel count to `size`.
    spacing: Any = setting(None, optional(either(MM, items(MM, 2, 2))))
    num_classes: int = setting(2, integer(2, 255))              # incl. background; 2 = sigmoid
    foreground_ratio: Optional[float] = setting(None, optional(number(0, 1)))  # None: natural
    cache_dir: Optional[str] = setting(None, optional(TEXT))    # None: ./.cache (the CLI: $CTSEG_CACHE_DIR)


@dataclass(frozen=True)
class PhantomConfig:
    cases: int = setting(6, integer(1, 1000))
    seed: int = setting(0, integer(0, 2**32 - 1))
    rows: int = setting(256, integer(8, MAX_SIZE))
    cols: int = setting(256, integer(8, MAX_SIZE))
    slices: int = setting(48, integer(1, MAX_SIZE))
    pixel_spacing: Optional[float] = setting(None, optional(number(0.1, 10)))  # mm; None: FOV fits the body
    # part of the chest covered (0: below the lung bases, 1: above the apex); lung bases: [0.1, 0.45]
    z_range: Optional[list] = setting(None, optional(items(number(0, 1), 2, 2)))  # None: [0, 1]
    # the scanner's reconstruction circle, radius as a fraction of the field's width (None: none),
    # and the value outside it
    reconstruction_radius: Optional[float] = setting(None, optional(number(0, 0.75, above=True)))
    padding_hu: float = setting(-1000.0, number(-30000, -1000))


@dataclass(frozen=True)
class SplitConfig:
    seed: int = setting(0, integer(0, 2**32 - 1))
    val_fraction: float = setting(0.2, number(0, 1))
    test_fraction: float = setting(0.0, number(0, 1))
    folds: Optional[int] = setting(None, optional(integer(2, 1000)))  # k-fold ...
    fold: int = setting(0, integer(0, 999))                           # ... this fold validates
    train: Optional[list] = setting(None, optional(items(TEXT, 0, 100_000)))  # explicit case lists
    val: Optional[list] = setting(None, optional(items(TEXT, 0, 100_000)))
    test: Optional[list] = setting(None, optional(items(TEXT, 0, 100_000)))


@dataclass(frozen=True)
class ModelConfig:
    name: str = setting("unet", TEXT)                           # ctseg.networks registry name
    features: Optional[tuple] = setting(None, optional(items(integer(1, 4096), 1, 8)))
    kwargs: Mapping = setting({}, LITERALS)                     # extra registry arguments
    variant: str = setting("default", choice("default", "thesis"))  # thesis: the study's exact blocks


@dataclass(frozen=True)
class LossConfig:
    lambda_dice: float = setting(1.0, number(0, 100))
    lambda_ce: float = setting(1.0, number(0, 100))
    batch: bool = setting(True, BOOLEAN)
    include_background: bool = setting(True, BOOLEAN)


@dataclass(frozen=True)
class OptimConfig:
    name: str = setting("adam", choice("adam", "rmsprop"))
    lr: float = setting(1.0e-3, number(0, 10, above=True))
    weight_decay: float = setting(0.0, number(0, 1))
    momentum: float = setting(0.0, number(0, 1))                # rmsprop only
    plateau_factor: float = setting(0.5, number(0, 1, above=True))
    plateau_patience: int = setting(5, integer(0, 100_000))
    min_lr: float = setting(1.0e-6, number(0, 10))
    # plateau: validation Dice halves the LR (train.selection: best); cosine: warm-up then cosine
    # decay to min_lr ending with the budget (epochs or time limit), no validation decision
    schedule: str = setting("plateau", choice("plateau", "cosine"))
    warmup_fraction: float = setting(0.05, number(0, 0.9))     # cosine: share of the budget


@dataclass(frozen=True)
class TrainConfig:
    seed: int = setting(0, integer(0, 2**32 - 1))
    epochs: int = setting(50, integer(1, 100_000))
    batch_size: int = setting(16, integer(1, 4096))
    slices_per_epoch: Optional[int] = setting(None, optional(integer(1, 100_000_000)))  # None: all
    early_stopping: Optional[int] = setting(10, optional(integer(1, 100_000)))  # epochs; None = off
    # best: validation Dice picks the checkpoint, drives the plateau LR and early stopping;
    # last: fixed length, the last epoch is kept, validation (optional) only monitors (`ctseg cv`)
    selection: str = setting("best", choice("best", "last"))
    time_limit_minutes: Optional[float] = setting(None, optional(number(0, 1_000_000, above=True)))
    clip_grad_norm: Optional[float] = setting(1.0, optional(number(0, 1_000_000, above=True)))
    amp: bool = setting(True, BOOLEAN)                          # CUDA only
    channels_last: bool = setting(True, BOOLEAN)                # CUDA only
    num_workers: int = setting(0, integer(0, 64))
    sync_bn: bool = setting(False, BOOLEAN)                     # torchrun on GPUs
    # EMA decay of the weights used for validation and saved as the model; None: raw weights
    ema: Optional[float] = setting(None, optional(Check("a number in (0, 1)",
                                                        lambda v: _is_number(v) and 0 < v < 1)))


PROB = number(0, 1)


@dataclass(frozen=True)
class RotateConfig:
    prob: float = setting(0.0, PROB)
    degrees: float = setting(10.0, number(0, 180))


@dataclass(frozen=True)
class ScaleConfig:
    prob: float = setting(0.0, PROB)
    range: float = setting(0.1, number(0, 0.9))
    translate: float = setting(0.0, number(0, 0.5))            # shift, fraction of the input per axis


@dataclass(frozen=True)
class ElasticConfig:
    prob: float = setting(0.0, PROB)
    spacing: float = setting(32, number(1, MAX_SIZE))
    magnitude: tuple = setting([1.0, 2.0], items(number(0, 100), 2, 2))


@dataclass(frozen=True)
class FlipConfig:
    prob: float = setting(0.0, PROB)
    axes: tuple = setting([1], items(integer(0, 1), 1, 2))      # 0 = rows, 1 = columns


@dataclass(frozen=True)
class ContrastConfig:
    prob: float = setting(0.0, PROB)
    gamma: tuple = setting([0.7, 1.5], items(number(0, 10, above=True), 2, 2))


@dataclass(frozen=True)
class NoiseConfig:
    prob: float = setting(0.0, PROB)
    std_hu: Optional[float] = setting(None, optional(number(0, 10_000)))  # HU; wins over `std`
    std: float = setting(0.02, number(0, 10))                   # windowed [0, 1] units


FOV_SHAPES = ("circle", "square")
def value_range(lo: float, hi: float) -> Check:
    """A list [low, high] of numbers in (lo, hi], low <= high."""
    return Check(f"a list [low, high] with {lo} < low <= high <= {hi}",
                 lambda v: items(number(lo, hi, above=True), 2, 2).test(v) and v[0] <= v[1])


@dataclass(frozen=True)
class FieldOfViewConfig:
    """Another scanner's reconstruction field on the training sample (ctseg.transforms)."""

    prob: float = setting(0.0, PROB)
    # circle: the reconstruction circle; square: a smaller display field of view
    shapes: tuple = setting(list(FOV_SHAPES), items(choice(*FOV_SHAPES), 1, 2))
    radius: tuple = setting([0.5, 1.0], value_range(0, 2))     # fraction of the input's half-width
    radius_mm: Optional[tuple] = setting(None, optional(value_range(0, 2000)))  # wins; needs data.spacing
    offset: float = setting(0.1, number(0, 1))                  # centre shift, fraction of half-width
    fill_hu: tuple = setting([-1000, -1024, -2000, -3024], items(number(-100_000, 100_000), 1, 16))


@dataclass(frozen=True)
class AugmentConfig:
    """Each transform exists only when the config names it (absent = off)."""

    rotate: Optional[RotateConfig] = section(RotateConfig, present=False)
    scale: Optional[ScaleConfig] = section(ScaleConfig, present=False)
    elastic: Optional[ElasticConfig] = section(ElasticConfig, present=False)
    flip: Optional[FlipConfig] = section(FlipConfig, present=False)
    contrast: Optional[ContrastConfig] = section(ContrastConfig, present=False)
    noise: Optional[NoiseConfig] = section(NoiseConfig, present=False)
    field_of_view: Optional[FieldOfViewConfig] = section(FieldOfViewConfig, present=False)


@dataclass(frozen=True)
class PostprocessConfig:
    """`infer.postprocess`; `false` in a config means `{enabled: false}`."""

    enabled: bool = setting(True, BOOLEAN)
    keep_largest: Any = setting(2, KEEP_LARGEST)                # components kept per label
    fill_holes: bool = setting(True, BOOLEAN)
    connectivity: Optional[int] = setting(None, optional(integer(1, 3)))  # None: full 3D


@dataclass(frozen=True)
class InferConfig:
    batch_size: Any = setting("auto", optional(either(choice("auto"), integer(1, 4096))))
    threshold: float = setting(0.5, number(0, 1))
    tta: tuple = setting([], items(integer(0, 1), 0, 2))        # flip axes averaged in
    amp: bool = setting(True, BOOLEAN)                          # float16 autocast, CUDA only
    split_lungs: bool = setting(False, BOOLEAN)                 # labels 1 right, 2 left lung
    body_mask: bool = setting(True, BOOLEAN)                    # drop labels outside the body first
    postprocess: PostprocessConfig = section(PostprocessConfig)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = setting(True, BOOLEAN)
    uri: Optional[str] = setting(None, optional(TEXT))          # None: <runs root>/mlflow.db (the CLI: $MLFLOW_TRACKING_URI)
    experiment: str = setting("ctseg", TEXT)


@dataclass(frozen=True)
class Config:
    """The typed, read-only view of a resolved config (`config_view`)."""

    data: DataConfig = section(DataConfig)
    phantom: PhantomConfig = section(PhantomConfig)
    split: SplitConfig = section(SplitConfig)
    model: ModelConfig = section(ModelConfig)
    loss: LossConfig = section(LossConfig)
    optim: OptimConfig = section(OptimConfig)
    train: TrainConfig = section(TrainConfig)
    augment: AugmentConfig = section(AugmentConfig)
    infer: InferConfig = section(InferConfig)
    tracking: TrackingConfig = section(TrackingConfig)

    @property
    def size(self) -> tuple[int, int]:
        """`data.size` as (H, W)."""
        s = self.data.size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def spacing(self) -> tuple[float, float] | None:
        """`data.spacing` as (sy, sx) mm, or None (resize by pixel count)."""
        s = self.data.spacing
        if s is None:
            return None
        return (float(s), float(s)) if not isinstance(s, (list, tuple)) else (float(s[0]), float(s[1]))


#: Settings a `--resume` may change: how long to train, where things are, how it is tracked and
#: how the result is applied. Anything else would mix two data pipelines or models in one run.
RESUMABLE = ("train.epochs", "train.time_limit_minutes", "train.early_stopping", "train.num_workers",
             "data.case_dir", "data.cache_dir", "tracking.", "infer.")


# ------------------------------------------------------------------------------- resolving
def known_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (sections included)."""
    keys: list[str] = []
    for f in fields(cls):
        keys.append(prefix + f.name)
        if "section" in f.metadata:
            keys += known_keys(f.metadata["section"], f"{prefix}{f.name}.")
    return keys


def _unknown(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, known_keys(), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "see ctseg/config/schema.py for the settings"
    return ConfigError(f"{source}: unknown key '{key}'; {hint}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _resolve(cls: type, raw: Any, prefix: str, source: str) -> dict:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping, "
                          f"got {_short(raw)}")
    names = {f.name for f in fields(cls)}
    for key, value in raw.items():
        if key not in names:
            path = f"{prefix}{key}"
            while isinstance(value, dict) and len(value) == 1:  # `trian: {epochs: 3}` is 'trian.epochs'
                key, value = next(iter(value.items()))
                path += f".{key}"
            raise _unknown(path, source)
    out: dict = {}
    for f in fields(cls):
        key = prefix + f.name
        if "section" in f.metadata:
            value = raw.get(f.name)
            if cls is InferConfig and f.name == "postprocess" and value is False:
                value = {"enabled": False}
            if value is None and not f.metadata["present"]:
                continue
            out[f.name] = _resolve(f.metadata["section"], value, key + ".", source)
            continue
        value = raw[f.name] if f.name in raw else f.default_factory()
        check: Check = f.metadata["check"]
        if not check.test(value):
            raise ConfigError(f"{source}: {key} must be {check.describe}, got {_short(value)}")
        out[f.name] = copy.deepcopy(value)
    return out


def resolve_config(config: Any, source: str = "config") -> dict:
    """`config` checked against the schema, every missing setting filled from its default.

    Raises ConfigError naming `source` and the key for an unknown key (with the closest valid
    one), a wrong type, or a value out of range.
    """
    resolved = _resolve(Config, config, "", source)
    lo, hi = resolved["data"]["window"]
    if not hi > lo:
        raise ConfigError(f"{source}: data.window must have low < high, got {[lo, hi]}")
    if resolved["data"]["context"] % 2 == 0:
        raise ConfigError(f"{source}: data.context must be odd, got {resolved['data']['context']}")
    split = resolved["split"]
    if split["val_fraction"] + split["test_fraction"] >= 1:
        raise ConfigError(f"{source}: split.val_fraction + split.test_fraction must be < 1, got "
                          f"{split['val_fraction']} + {split['test_fraction']}")
    if split["folds"] is not None and split["fold"] >= split["folds"]:
        raise ConfigError(f"{source}: split.fold must be < split.folds ({split['folds']}), got {split['fold']}")
    return resolved


def schema_defaults() -> dict:
    """The default of every setting, as a resolved config."""
    return resolve_config({}, "defaults")


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    return value


def _view(cls: type, resolved: dict) -> Any:
    args = {}
    for f in fields(cls):
        value = resolved.get(f.name)
        if "section" in f.metadata:
            args[f.name] = None if value is None else _view(f.metadata["section"], value)
        else:
            args[f.name] = _freeze(value)
    return cls(**args)


def config_view(config: dict, source: str = "config") -> Config:
    """The typed read-only view of `config` (checked and resolved first)."""
    return _view(Config, resolve_config(config, source))


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten nested sections to dotted keys (for MLflow params and comparisons)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def check_resume(saved: dict, requested: dict, source: str) -> None:
    """Refuse a resume whose config changes a data, model or optimisation setting of the run."""
    before = flatten(resolve_config(saved, f"{source} (saved config)"))
    after = flatten(resolve_config(requested, "config"))
    changed = sorted(k for k in set(before) | set(after)
                     if before.get(k) != after.get(k) and not k.startswith(RESUMABLE)
                     and k not in RESUMABLE)
    if changed:
        detail = ", ".join(f"{k} ({_short(before.get(k))} -> {_short(after.get(k))})" for k in changed)
        raise ConfigError(f"{source}: --resume cannot change {detail}: the checkpoint was trained "
                          f"with the saved values. Start a new run for new settings; a resume may "
                          f"change only train.epochs, train.time_limit_minutes, train.early_stopping, "
                          f"train.num_workers, tracking.* and infer.*")
