"""The trainer's configuration: frozen dataclasses filled once from a YAML recipe plus ``--set`` overrides.

A recipe is a YAML mapping whose sections mirror the dataclasses below. They
are pydantic dataclasses, so every key is checked when a recipe is built: an
unknown key is an error naming its dotted path (``train.epocs: unknown key``),
and a value of the wrong type names the key and the expected type
(``data.crop: expected 2 integers, got [64]``); a value out of its range names
the key and the range (``train.accumulate_steps must be >= 1, got 0``).
Overrides use dotted keys and YAML values
(``--set train.epochs=3 --set model.params.base_channels=16``).
Named ``profiles`` in a recipe (``gpu``) are sets of such overrides, applied
before the command line's.
"""

from __future__ import annotations

import math
from dataclasses import field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, Mapping, Sequence, Union

import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, PlainSerializer, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from segsvc.errors import InvalidArgument
from segsvc.overrides import apply_override as _apply_override
from segsvc.overrides import parse_override as _parse_override
from segsvc.validation import explain, fixed_length, one_of


class ConfigError(InvalidArgument):
    """A recipe or override is malformed; the message names the offending key."""


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string: accept numeric strings, refuse booleans."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    return value


Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_number)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
FrozenMapping = Annotated[
    Mapping[str, Any],
    AfterValidator(lambda value: MappingProxyType(dict(value))),
    PlainSerializer(lambda value: dict(value)),
]
_SECTION = ConfigDict(extra="forbid")


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Refuse a value out of range: ``train.epochs must be >= 1, got 0`` (``build_dataclass`` keeps the key once)."""
    if not ok:
        shown = [float(v) for v in value] if isinstance(value, tuple) else value
        raise ValueError(f"{key} must be {rule}, got {shown}")


def _at_least(section: str, minimum: float, **values: Any) -> None:
    for name, value in values.items():
        _require(value >= minimum, f"{section}.{name}", f">= {minimum}", value)


IntPair = fixed_length(tuple[Int, Int], 2, "integers")
FloatPair = fixed_length(tuple[Float, Float], 2, "numbers")
ClassWeights = one_of(
    Union[Literal["median_frequency"], tuple[Float, ...], None], "'median_frequency', null or a list of numbers"
)


@dataclass(frozen=True, config=_SECTION)
class ModelConfig:
    """Which architecture to train; classes and channels come from the dataset spec.

    ``init_from`` fine-tunes: a model artifact version directory (``<repo>/<name>/<version>``)
    of the same ``arch`` and ``params`` whose weights start the run; its classifier
    head is kept only when the dataset has the artifact's classes (``training.finetune``).
    """

    arch: Str
    params: FrozenMapping = field(default_factory=dict)
    init_from: Str | None = None


@dataclass(frozen=True, config=_SECTION)
class DataConfig:
    """Where the images come from and how training batches are augmented.

    ``spec`` is a built-in dataset name (``camvid``, ``membrane``, ``synthetic``)
    or a dataset YAML path. ``preset`` names an augmentation preset of
    ``segsvc.data.transforms.train_transform``; ``crop`` is its output size and
    ``scale`` the random rescaling range applied before cropping. ``val_scale``
    resizes validation images (e.g. 0.5 for a half-resolution CPU budget);
    metrics are still computed on the full-resolution labels.
    ``val_tile_size`` (0: whole images), ``val_tile_overlap`` and
    ``val_tile_padding`` (``zero``, or ``reflect``: the U-Net paper's overlap
    tiles with mirrored borders) run validation with sliding windows; with
    ``val_scale`` they are the published model's inference contract
    (``training.rundir.val_contract``), so serving runs it as it was validated.
    ``val_flip`` adds horizontal-flip TTA to validation and so to that contract
    (two forward passes per image, served too); ``val_tta_scales`` likewise adds
    multi-scale TTA (factors of ``val_scale``, e.g. ``[0.75, 1.0, 1.25]``).
    ``train_indices``/``val_indices`` select samples by position
    (``[start, stop]`` ranges); ``train_limit``/``val_limit`` keep the first N;
    ``repeat`` lists the training samples that many times per epoch (small data sets).
    ``class_uniform`` is the fraction of training crops taken around a pixel of a
    class drawn uniformly from the classes of the image (class-uniform sampling,
    ``segsvc.data.transforms.ClassUniformCrop``); 0 keeps uniform random crops.
    ``register`` names a class whose labels are drawn a constant sub-pixel
    offset away from the structures they mark (the ISBI membranes: about 0.6 px
    up): the offset is measured on every training image
    (``segsvc.data.registration``), the training images are translated by the
    mean before augmentation, and the published contract translates every input
    by the same mean (``InferenceSpec.shift``). Flips and turns would otherwise
    present the offset in every direction, and no network could learn it.
    """

    spec: Str
    train_split: Str = "train"
    val_split: Str = "val"
    preset: Str = "street"
    crop: IntPair | None = None
    scale: FloatPair = (1.0, 1.0)
    val_scale: Float = 1.0
    val_tile_size: Int = 0
    val_tile_overlap: Float = 0.25
    val_tile_padding: Literal["zero", "reflect"] = "zero"
    val_flip: Bool = False
    val_tta_scales: tuple[Float, ...] = ()
    train_indices: IntPair | None = None
    val_indices: IntPair | None = None
    train_limit: Int | None = None
    val_limit: Int | None = None
    repeat: Int = 1
    workers: Int = 0
    class_uniform: Float = 0.0
    register: Str | None = None

    def __post_init__(self) -> None:
        lo, hi = self.scale
        _require(0.0 < lo <= hi and math.isfinite(hi), "data.scale", "[lo, hi] with 0 < lo <= hi", self.scale)
        _at_least("data", 0, workers=self.workers)
        _at_least("data", 1, repeat=self.repeat)
        for key, limit in (("train_limit", self.train_limit), ("val_limit", self.val_limit)):
            # a negative one would slice from the end ([:-1] drops the last sample); 0 would keep none
            _require(limit is None or limit >= 1, f"data.{key}", ">= 1 or null", limit)
        if not 0.0 <= self.class_uniform <= 1.0:
            raise ValueError(f"data.class_uniform is a fraction of the crops in [0, 1], got {self.class_uniform}")
        if self.class_uniform and self.crop is None:
            raise ValueError("data.class_uniform needs data.crop (the crop size to sample)")


@dataclass(frozen=True, config=_SECTION)
class LossTerm:
    """One weighted term of the loss: ``ce``, ``dice``, ``focal``, ``lovasz``, ``ohem`` (cross-entropy
    over the hardest ``loss.ohem_keep`` of the pixels) or ``weighted_ce`` (cross-entropy with the
    U-Net paper's border weights; needs ``loss.border_weight``)."""

    name: Literal["ce", "dice", "focal", "lovasz", "ohem", "weighted_ce"]
    weight: Float = 1.0


@dataclass(frozen=True, config=_SECTION)
class BorderWeightConfig:
    """The U-Net paper's border weights: ``w0 * exp(-(d1 + d2)**2 / (2 * sigma**2))`` on top of the class weights.

    ``d1``/``d2`` are the distances (px) to the nearest and second-nearest cell,
    a cell being a 4-connected component of ``cell_class`` in the augmented
    training mask (``1`` for ``membrane``: the non-membrane regions). The paper
    uses ``w0: 10`` and ``sigma: 5``. Masks with more than ``max_components``
    cells keep the largest ones (``training.losses.border_weights`` says what it costs).
    """

    cell_class: Int
    w0: Float = 10.0
    sigma: Float = 5.0
    max_components: Int = 1024


@dataclass(frozen=True, config=_SECTION)
class LossConfig:
    """A weighted sum of loss terms; class weights apply to cross-entropy (and focal).

    ``class_weights`` is ``null``, ``median_frequency`` (Eigen & Fergus 2015,
    as used by SegNet) or an explicit list with one weight per class; they are
    also the ``w_c`` of the ``weighted_ce`` term (``null``: 1 for every class).
    ``border_weight`` configures ``weighted_ce`` and is required by it.
    ``ohem_keep`` is the fraction of a batch's pixels (the highest losses) the ``ohem`` term counts.
    """

    terms: tuple[LossTerm, ...] = (LossTerm("ce"),)
    class_weights: ClassWeights = None
    focal_gamma: Float = 2.0
    label_smoothing: Float = 0.0
    border_weight: BorderWeightConfig | None = None
    ohem_keep: Float = 0.25

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("loss.terms must list at least one term, e.g. [{name: ce}]")
        for i, term in enumerate(self.terms):  # a negative weight would maximise its term, NaN or inf end the run
            _require(math.isfinite(term.weight) and term.weight >= 0, f"loss.terms.{i}.weight",
                     "a finite number >= 0", term.weight)
        _require(0.0 <= self.label_smoothing < 1.0, "loss.label_smoothing", "in [0, 1)", self.label_smoothing)
        _at_least("loss", 0, focal_gamma=self.focal_gamma)
        uses_border, border = any(term.name == "weighted_ce" for term in self.terms), self.border_weight
        if uses_border and border is None:
            raise ValueError("the weighted_ce term needs border_weight (e.g. {cell_class: 1, w0: 10, sigma: 5})")
        if border is not None and not uses_border:
            raise ValueError("border_weight is only used by a weighted_ce term: add one to terms")
        if border is not None and not (0 < border.sigma < math.inf and 0 <= border.w0 < math.inf
                                       and border.max_components >= 2):
            raise ValueError("border_weight needs sigma > 0, w0 >= 0 (both finite) and max_components >= 2")
        if not 0.0 < self.ohem_keep <= 1.0:
            raise ValueError(f"ohem_keep is a fraction of the pixels in (0, 1], got {self.ohem_keep}")


@dataclass(frozen=True, config=_SECTION)
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: Float = 1e-3
    weight_decay: Float = 1e-4
    momentum: Float = 0.9
    nesterov: Bool = False

    def __post_init__(self) -> None:
        # lr 0 stays allowed: a control run whose weights never move (a deliberately bad candidate)
        _require(0.0 <= self.lr < math.inf, "optim.lr", ">= 0", self.lr)
        _at_least("optim", 0, weight_decay=self.weight_decay, momentum=self.momentum)


@dataclass(frozen=True, config=_SECTION)
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
    warmup_epochs: Float = 0.0
    warmup_factor: Float = 0.001
    power: Float = 0.9
    min_lr_ratio: Float = 0.0

    def __post_init__(self) -> None:
        _at_least("schedule", 0, warmup_epochs=self.warmup_epochs)
        _require(0.0 < self.warmup_factor <= 1.0, "schedule.warmup_factor", "in (0, 1]", self.warmup_factor)
        _require(self.power > 0.0, "schedule.power", "> 0", self.power)
        _require(0.0 <= self.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", "in [0, 1]", self.min_lr_ratio)


@dataclass(frozen=True, config=_SECTION)
class LoopConfig:
    """The training loop. ``max_time_min`` is a wall-clock budget: training stops
    after the epoch that exceeds it (the schedule is not shortened).
    ``early_stopping_patience`` counts validations without a new best mIoU.
    ``ema_decay`` (e.g. 0.999) keeps an exponential moving average of the weights,
    updated after every optimiser step (``training.ema``); validation, the best
    checkpoint and the published model then use the average.
    ``amp`` is the autocast dtype of the training steps, on CUDA and on a CPU that
    computes it natively (``training.train.precision``); validation runs as served, at the
    server's default precision (``training.train.validation_autocast``)."""

    epochs: Int = 10
    batch_size: Int = 8
    val_batch_size: Int = 4
    accumulate_steps: Int = 1
    seed: Int = 0
    max_time_min: Float | None = None
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: Bool = False
    early_stopping_patience: Int | None = None
    val_every_epochs: Int = 1
    deterministic: Bool = False
    threads: Int | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    grad_clip_norm: Float | None = None
    ema_decay: Float | None = None
    progress: Bool = True

    def __post_init__(self) -> None:
        _at_least("train", 1, epochs=self.epochs, batch_size=self.batch_size, val_batch_size=self.val_batch_size,
                  accumulate_steps=self.accumulate_steps, val_every_epochs=self.val_every_epochs)
        _at_least("train", 0, seed=self.seed)
        _require(self.threads is None or self.threads >= 1, "train.threads", ">= 1 or null", self.threads)
        t = self.max_time_min
        _require(t is None or 0.0 < t < math.inf, "train.max_time_min", "> 0 or null", t)
        p = self.early_stopping_patience
        _require(p is None or p >= 0, "train.early_stopping_patience", ">= 0 or null", p)
        c = self.grad_clip_norm
        _require(c is None or 0.0 < c < math.inf, "train.grad_clip_norm", "> 0 or null", c)
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must lie in (0, 1), got {self.ema_decay}")


@dataclass(frozen=True, config=_SECTION)
class OutputConfig:
    """Where a run writes: ``<runs_dir>/<recipe>/<run_name or timestamp>/`` and the artifact repository."""

    runs_dir: Str = "runs"
    run_name: Str | None = None
    repo: Str = "runs/model_repository"
    model_name: Str | None = None
    samples_in_report: Int = 3

    def __post_init__(self) -> None:
        _at_least("output", 0, samples_in_report=self.samples_in_report)
        name = self.run_name
        if name is not None and (name in ("", ".", "..") or "/" in name or "\0" in name):
            raise ValueError(f"output.run_name must be one folder name (no '/', not '.' or '..'), got {name!r}")


@dataclass(frozen=True, config=_SECTION)
class TrainConfig:
    """A whole recipe. ``name`` names the recipe and, unless overridden, the served model."""

    name: Str
    model: ModelConfig
    data: DataConfig
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: LoopConfig = LoopConfig()
    output: OutputConfig = OutputConfig()
    profiles: FrozenMapping = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON data; ``build_dataclass(TrainConfig, cfg.to_dict())`` gives ``cfg`` back."""
        return TypeAdapter(TrainConfig).dump_python(self, mode="json")

    @property
    def model_name(self) -> str:
        return self.output.model_name or self.name


# -- building dataclasses from plain data, checking every key ---------------------
def build_dataclass(cls: type, data: Any, prefix: str = "") -> Any:
    """Build the config dataclass ``cls`` from plain data; ``ConfigError`` names every bad key."""
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as exc:
        lines = [_drop_repeated_key(line) for line in explain(exc, cls)]
        if prefix:
            lines = [f"{prefix}.{line}" for line in lines]
        raise ConfigError("; ".join(lines)) from None


def _drop_repeated_key(line: str) -> str:
    """``train: train.epochs must be >= 1`` -> ``train.epochs must be >= 1`` (a section's check names its key)."""
    key, sep, problem = line.partition(": ")
    return problem if sep and problem.startswith(f"{key}.") else line


# -- overrides ---------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", yaml-parsed value)``."""
    return _parse_override(text, ConfigError)


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted ``key`` inside nested dicts, creating intermediate mappings."""
    _apply_override(data, key, value, ConfigError)


def load_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    profile: str | None = None,
) -> TrainConfig:
    """Read a recipe, apply a profile's and then the command line's overrides, and check it all."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"recipe {str(path)!r} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe {str(path)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:  # a directory, no permission, an I/O error
        raise ConfigError(f"recipe {str(path)!r} cannot be read: {exc.strerror or type(exc).__name__}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a YAML mapping")
    raw.setdefault("name", path.stem)
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"profiles must be a mapping of profile names to overrides, got {profiles!r:.80}")
    pairs: list[tuple[str, Any]] = []
    if profile is not None:
        if profile not in profiles:
            raise ConfigError(f"recipe {path.stem!r} has no profile {profile!r}; it has: {sorted(map(str, profiles))}")
        pairs += _profile_overrides(profile, profiles[profile])
    pairs += [parse_override(text) for text in overrides]
    for key, value in pairs:
        apply_override(raw, key, value)
    return build_dataclass(TrainConfig, raw)


def _profile_overrides(name: str, overrides: Any) -> list[tuple[str, Any]]:
    """A profile's ``{dotted.key: value}`` pairs, each key checked as a command-line override's would be."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"profiles.{name} must be a mapping of dotted keys to values (e.g. {{train.epochs: 1}}), "
                          f"got {overrides!r:.80}")
    for key in overrides:
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"profiles.{name}: key {key!r:.80} is not a dotted key such as train.epochs")
    return list(overrides.items())
