"""The trainer's configuration: frozen dataclasses filled once from a YAML recipe plus ``--set`` overrides.

A recipe is a YAML mapping whose sections mirror the dataclasses below. Every
key is checked: an unknown key is an error naming its dotted path, and a value
of the wrong type is an error naming the key and the expected type. Overrides
use dotted keys and YAML values (``--set train.epochs=3 --set
model.params.base_channels=16``). Named ``profiles`` in a recipe (``gpu``) are
sets of such overrides, applied before the command line's.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml

from segsvc.config import _frozen_mapping
from segsvc.errors import InvalidArgument


class ConfigError(InvalidArgument):
    """A recipe or override is malformed; the message names the offending key."""


@dataclass(frozen=True)
class ModelConfig:
    """Which architecture to train; classes and channels come from the dataset spec."""

    arch: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how training batches are augmented.

    ``spec`` is a built-in dataset name (``camvid``, ``membrane``, ``synthetic``)
    or a dataset YAML path. ``preset`` names an augmentation preset of
    ``segsvc.data.transforms.train_transform``; ``crop`` is its output size and
    ``scale`` the random rescaling range applied before cropping. ``val_scale``
    resizes validation images (e.g. 0.5 for a half-resolution CPU budget);
    metrics are still computed on the full-resolution labels.
    ``train_indices``/``val_indices`` select samples by position
    (``[start, stop]`` ranges); ``train_limit``/``val_limit`` keep the first N;
    ``repeat`` lists the training samples that many times per epoch (small data sets).
    """

    spec: str
    train_split: str = "train"
    val_split: str = "val"
    preset: str = "street"
    crop: tuple[int, int] | None = None
    scale: tuple[float, float] = (1.0, 1.0)
    val_scale: float = 1.0
    train_indices: tuple[int, int] | None = None
    val_indices: tuple[int, int] | None = None
    train_limit: int | None = None
    val_limit: int | None = None
    repeat: int = 1
    workers: int = 0


@dataclass(frozen=True)
class LossTerm:
    """One weighted term of the loss: ``ce``, ``dice``, ``focal`` or ``lovasz``."""

    name: Literal["ce", "dice", "focal", "lovasz"]
    weight: float = 1.0


@dataclass(frozen=True)
class LossConfig:
    """A weighted sum of loss terms; class weights apply to cross-entropy (and focal).

    ``class_weights`` is ``null``, ``median_frequency`` (Eigen & Fergus 2015,
    as used by SegNet) or an explicit list with one weight per class.
    """

    terms: tuple[LossTerm, ...] = (LossTerm("ce"),)
    class_weights: Union[Literal["median_frequency"], tuple[float, ...], None] = None
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule per optimiser step: linear warm-up, then poly or cosine decay.

    ``horizon: epochs`` decays over ``train.epochs``. ``horizon: time`` is for
    runs with a wall-clock budget (``train.max_time_min``): before every epoch
    the trainer re-estimates how many epochs fit the budget from the epochs
    timed so far (at most ``train.epochs``) and decays over that many, so the
    run ends with a fully decayed LR however fast or busy the machine is. Its
    epoch count depends on the machine, so it is not bit-reproducible.
    """

    name: Literal["poly", "cosine", "constant"] = "poly"
    horizon: Literal["epochs", "time"] = "epochs"
    warmup_epochs: float = 0.0
    warmup_factor: float = 0.001
    power: float = 0.9
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class LoopConfig:
    """The training loop. ``max_time_min`` is a wall-clock budget: training stops
    after the epoch that exceeds it (the schedule is not shortened).
    ``early_stopping_patience`` counts validations without a new best mIoU."""

    epochs: int = 10
    batch_size: int = 8
    val_batch_size: int = 4
    accumulate_steps: int = 1
    seed: int = 0
    max_time_min: float | None = None
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    early_stopping_patience: int | None = None
    val_every_epochs: int = 1
    deterministic: bool = False
    threads: int | None = None
    device: str = "auto"
    grad_clip_norm: float | None = None
    progress: bool = True


@dataclass(frozen=True)
class OutputConfig:
    """Where a run writes: ``<runs_dir>/<recipe>/<run_name or timestamp>/`` and the artifact repository."""

    runs_dir: str = "runs"
    run_name: str | None = None
    repo: str = "runs/model_repository"
    model_name: str | None = None
    samples_in_report: int = 3


@dataclass(frozen=True)
class TrainConfig:
    """A whole recipe. ``name`` names the recipe and, unless overridden, the served model."""

    name: str
    model: ModelConfig
    data: DataConfig
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: LoopConfig = LoopConfig()
    output: OutputConfig = OutputConfig()
    profiles: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON data; ``build_dataclass(TrainConfig, cfg.to_dict())`` gives ``cfg`` back."""
        return _plain(self)

    @property
    def model_name(self) -> str:
        return self.output.model_name or self.name


# -- building dataclasses from plain data, checking every key ---------------------
def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in that type (tuples, mappings)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _convert(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a valid {' | '.join(_type_name(a) for a in args)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {list(value)!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (Mapping, dict, collections.abc.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _frozen_mapping(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this module


def build_dataclass(cls: type, data: Any, prefix: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from a mapping, rejecting unknown and missing keys."""
    where = prefix or "recipe"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"unknown config key {name!r}; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {key!r}")
    return cls(**kwargs)


# -- overrides ---------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", yaml-parsed value)``."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like key.subkey=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key, value


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted ``key`` inside nested dicts, creating intermediate mappings."""
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[: i + 1])!r} is not a mapping")
        node = child
    node[parts[-1]] = value


def load_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    profile: str | None = None,
) -> TrainConfig:
    """Read a recipe, apply a profile's and then the command line's overrides, and check it all."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"recipe {str(path)!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a YAML mapping")
    raw.setdefault("name", path.stem)
    pairs: list[tuple[str, Any]] = []
    if profile is not None:
        profiles = raw.get("profiles") or {}
        if profile not in profiles:
            raise ConfigError(f"recipe {path.stem!r} has no profile {profile!r}; it has: {sorted(profiles)}")
        pairs += list(profiles[profile].items())
    pairs += [parse_override(text) for text in overrides]
    for key, value in pairs:
        apply_override(raw, key, value)
    return build_dataclass(TrainConfig, raw)
