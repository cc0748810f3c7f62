"""Configuration objects: frozen dataclasses, built once, each component gets its own slice.

``ModelSpec`` is embedded in every model artifact so the server can rebuild a
model from the artifact alone. ``InputSpec`` says how raw pixels become the
network's input and ``InferenceSpec`` how the network is run (scale, padding,
default tiling and TTA); training writes both into the artifact and serving and
evaluation read them from it.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from segsvc.errors import InvalidArgument, ModelConfigError


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity: a container's cpuset, ``taskset``), else the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


MAX_NUM_CLASSES = 65_536  # label maps are uint16 (segsvc.inference.predictor.labels_dtype): classes 0..65535


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a registered architecture name plus its parameters.

    Args:
        arch: a name from ``segsvc.models.registry.MODELS`` (``fcn8s``, ``unet``,
            ``segnet``, ``smp/Unet``, ...).
        num_classes: number of output channels ``K`` of the logits, at most ``MAX_NUM_CLASSES``.
        in_channels: number of input channels ``C`` (3 for RGB, 1 for grayscale).
        params: keyword arguments of the architecture (widths, depth, encoder...).

    Example:
        >>> ModelSpec("unet", num_classes=2, in_channels=1, params={"base_channels": 16})
        ModelSpec(arch='unet', num_classes=2, in_channels=1, params={'base_channels': 16})
    """

    arch: str
    num_classes: int
    in_channels: int = 3
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not self.arch:
            raise ModelConfigError(f"model arch must be a non-empty string, got {self.arch!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ModelConfigError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if self.num_classes > MAX_NUM_CLASSES:
            raise ModelConfigError(
                f"num_classes must be at most {MAX_NUM_CLASSES} (labels are uint16), got {self.num_classes}"
            )
        if not isinstance(self.in_channels, int) or self.in_channels < 1:
            raise ModelConfigError(f"in_channels must be a positive integer, got {self.in_channels!r}")
        if not isinstance(self.params, Mapping):
            raise ModelConfigError(f"model params must be a mapping, got {type(self.params).__name__}")
        object.__setattr__(self, "params", _frozen_mapping(self.params))

    def __repr__(self) -> str:
        return (
            f"ModelSpec(arch={self.arch!r}, num_classes={self.num_classes}, "
            f"in_channels={self.in_channels}, params={dict(self.params)!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "params": dict(self.params),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        if not isinstance(data, Mapping):
            raise ModelConfigError(f"model spec must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"arch", "num_classes", "in_channels", "params"}
        if unknown:
            raise ModelConfigError(f"model spec has unknown keys {sorted(unknown)}")
        if "arch" not in data or "num_classes" not in data:
            raise ModelConfigError("model spec needs 'arch' and 'num_classes'")
        return cls(
            arch=data["arch"],
            num_classes=data["num_classes"],
            in_channels=data.get("in_channels", 3),
            params=data.get("params") or {},
        )


IMAGE_CHANNELS = (1, 3)  # what decoding gives: grey or RGB


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the network's input: ``(pixel/255 - mean) / std`` per channel.

    Images are RGB (or single-channel grayscale) uint8, height x width x channels.
    """

    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        mean, std = _finite_numbers(self.mean, "mean"), _finite_numbers(self.std, "std")
        if self.channels not in IMAGE_CHANNELS:
            raise ModelConfigError(
                f"input channels must be 1 (grey) or 3 (RGB), got {self.channels!r}: segsvc decodes every image "
                "to one of those (a fourth, alpha channel is dropped)"
            )
        if len(mean) != self.channels or len(std) != self.channels:
            raise ModelConfigError(
                f"input mean/std need {self.channels} values each, got {len(mean)} and {len(std)}"
            )
        if any(s <= 0 for s in std):
            raise ModelConfigError(f"input std values must be positive, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def default_for(cls, channels: int) -> "InputSpec":
        """ImageNet statistics for RGB; mid-grey statistics otherwise."""
        if channels == 3:
            return cls(3, IMAGENET_MEAN, IMAGENET_STD)
        return cls(channels, (0.5,) * channels, (0.25,) * channels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "InputSpec":
        try:
            return cls(int(data["channels"]), tuple(data["mean"]), tuple(data["std"]))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(inf), JSON's 1e999
            raise ModelConfigError(f"input spec must have channels, mean and std: {exc}") from None


def _finite_numbers(value: Any, name: str) -> tuple[float, ...]:
    """``value`` (the input ``mean`` or ``std``) as floats: a list or tuple of finite real numbers. A NaN mean
    made every input NaN and an infinite std every input 0; a string "123" read as three values."""
    if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, numbers.Real)
                                                    for v in value):
        raise ModelConfigError(f"input {name} must be a list of numbers, got {value!r}")
    out = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in out):
        raise ModelConfigError(f"input {name} values must be finite, got {list(out)}")
    return out


# Limits shared by the manifest's inference defaults and per-request options.
MIN_TILE_SIZE = 16
# The manifest's geometry is checked before a model loads: warm-up and the memory probe run a pass padded to
# min_input_size and stride, so an unbounded value would allocate without limit. The largest real values are far
# below these (output stride 32, PAN's minimum of 256); a pass padded to MAX_MIN_INPUT_SIZE (16.8M px) stays under the
# default largest image and forward pass (segsvc.inference.codec.DEFAULT_MAX_PIXELS, 64M px).
MAX_INPUT_STRIDE = 1024
MAX_MIN_INPUT_SIZE = 4096
MAX_TILE_SIZE = 16384  # a tile is clipped to the image, so this only rejects values no model means
MAX_TILE_OVERLAP = 0.75  # tile stride >= a quarter tile: at most 16 passes per pixel
MAX_INFERENCE_SCALE = 8.0
MAX_INPUT_SHIFT = 2.0  # px: a larger label offset is a misregistered data set, not annotation style
MAX_TTA_SCALES = 4  # multi-scale TTA: at most this many passes (each doubled by flip TTA)
INTERPOLATIONS = ("auto", "area", "linear")


def check_request_tiling(tile_size: Any, tile_overlap: Any, flip_tta: Any) -> None:
    """A request's tiling and flip choices (``None``: the manifest's), or ``InvalidArgument`` naming the one
    out of range or of the wrong type. The one check for the server (``InferenceOptions``) and the client,
    which runs it before a value reaches a protobuf field (a bare ``ValueError`` there)."""
    if tile_size is not None and (
        isinstance(tile_size, bool) or not isinstance(tile_size, numbers.Integral)
        or (tile_size != 0 and not MIN_TILE_SIZE <= tile_size <= MAX_TILE_SIZE)
    ):
        raise InvalidArgument(f"tile_size must be 0 (no tiling) or from {MIN_TILE_SIZE} to {MAX_TILE_SIZE}, "
                              f"got {tile_size!r}")
    if tile_overlap is not None and (
        isinstance(tile_overlap, bool) or not isinstance(tile_overlap, numbers.Real)
        or not (math.isfinite(tile_overlap) and 0.0 <= tile_overlap <= MAX_TILE_OVERLAP)
    ):
        raise InvalidArgument(f"tile_overlap must be a fraction in [0, {MAX_TILE_OVERLAP}], got {tile_overlap!r}")
    if flip_tta is not None and not isinstance(flip_tta, bool):
        raise InvalidArgument(f"flip_tta must be True or False (None: the model's default), got {flip_tta!r}")



BACKENDS = ("torch", "onnxruntime")  # what runs a network (segsvc.inference.backends)
# segsvc serve --log-level, in any case: the names Python's logging takes (WARN and FATAL are its aliases)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL", "NOTSET")
TILE_PADDINGS = ("zero", "reflect")  # what a network sees beyond the image border (segsvc.inference.tiling)


@dataclass(frozen=True)
class InferenceSpec:
    """How a model must be run to reproduce what its evaluation measured (the manifest's ``inference``).

    The image is resized by ``scale`` before normalisation, padded to ``stride``
    (and ``min_input_size``) at the bottom/right, run, cropped, and its logits are
    resized back to the original size with bilinear interpolation. Tiles are cut
    from the rescaled image, so ``tile_size`` is in network-input pixels.

    Args:
        scale: resize factor of the image before the network (0.5: CamVid recipes).
        interpolation: how the image is resized: ``auto`` (area when shrinking,
            linear when enlarging), ``area`` or ``linear``.
        stride: pad H and W to a multiple of this (at most ``MAX_INPUT_STRIDE``); ``None`` (old
            manifests): the model's own.
        min_input_size: pad H and W to at least this (at most ``MAX_MIN_INPUT_SIZE``); ``None``: the model's own.
        tile_size: default sliding-window tile side (at most ``MAX_TILE_SIZE``); 0: whole images.
        tile_overlap: default fraction of a tile shared with its neighbour.
        flip_tta: default horizontal-flip test-time augmentation.
        backend: what runs the network by default: ``torch`` (eager) or
            ``onnxruntime`` (the version's exported ``model.onnx``); a server's
            ``--backend`` overrides it.
        tile_padding: what the network sees beyond the image border: ``zero``
            (zeros in normalised space, the mean colour) or ``reflect`` (the
            U-Net paper's overlap-tile strategy: the mirrored image; each tile
            also sees ``tile_size * tile_overlap / 2`` pixels of context on every
            side, whose logits are dropped). A property of the model, not a
            request option; written to the manifest only when not ``zero``.
        tta_scales: multi-scale test-time augmentation: factors of ``scale`` the
            network also runs at (e.g. ``[0.75, 1.0, 1.25]``); the logits of every
            pass, resized back, are averaged. Empty (the default): ``scale`` only.
            Written to the manifest only when set.
        shift: ``(dy, dx)`` px by which the image is translated (bilinear,
            mirrored border) before everything else: the sub-pixel offset of the
            training labels from the structures they mark, which training
            removed (``data.register``, ``segsvc.data.registration``), so the
            label maps land where the annotators would draw them. Written to the
            manifest only when not zero.

    Example:
        >>> InferenceSpec(scale=0.5, stride=8).to_dict()["scale"]
        0.5
    """

    scale: float = 1.0
    interpolation: str = "auto"
    stride: int | None = None
    min_input_size: int | None = None
    tile_size: int = 0
    tile_overlap: float = 0.25
    flip_tta: bool = False
    backend: str = "torch"
    tile_padding: str = "zero"
    tta_scales: tuple[float, ...] = ()
    shift: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        try:
            scale, overlap = float(self.scale), float(self.tile_overlap)
        except (TypeError, ValueError):
            raise ModelConfigError(
                f"inference scale and tile_overlap must be numbers, got {self.scale!r} and {self.tile_overlap!r}"
            ) from None
        if not 0.0 < scale <= MAX_INFERENCE_SCALE:  # also false for NaN
            raise ModelConfigError(f"inference scale must be in (0, {MAX_INFERENCE_SCALE}], got {self.scale!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ModelConfigError(
                f"inference interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )
        for name, limit in (("stride", MAX_INPUT_STRIDE), ("min_input_size", MAX_MIN_INPUT_SIZE)):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ModelConfigError(f"inference {name} must be a positive integer or null, got {value!r}")
            if value is not None and value > limit:
                raise ModelConfigError(f"inference {name} must be at most {limit}, got {value!r}")
        if not _is_int(self.tile_size) or (self.tile_size != 0 and self.tile_size < MIN_TILE_SIZE):
            raise ModelConfigError(
                f"inference tile_size must be 0 (no tiling) or an integer of at least {MIN_TILE_SIZE}, "
                f"got {self.tile_size!r}"
            )
        if self.tile_size > MAX_TILE_SIZE:
            raise ModelConfigError(f"inference tile_size must be at most {MAX_TILE_SIZE}, got {self.tile_size!r}")
        if not 0.0 <= overlap <= MAX_TILE_OVERLAP:
            raise ModelConfigError(
                f"inference tile_overlap must be in [0, {MAX_TILE_OVERLAP}], got {self.tile_overlap!r}"
            )
        if not isinstance(self.flip_tta, bool):
            raise ModelConfigError(f"inference flip_tta must be true or false, got {self.flip_tta!r}")
        if self.backend not in BACKENDS:
            raise ModelConfigError(f"inference backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.tile_padding not in TILE_PADDINGS:
            raise ModelConfigError(
                f"inference tile_padding must be one of {TILE_PADDINGS}, got {self.tile_padding!r}"
            )
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "tile_overlap", overlap)
        object.__setattr__(self, "tta_scales", _tta_scales(self.tta_scales, scale))
        object.__setattr__(self, "shift", _shift(self.shift))

    @property
    def composed(self) -> bool:
        """Whether the image runs through tiles or TTA (so the images of a batch must share a size)."""
        return bool(self.tile_size or self.flip_tta or self.tta_scales)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; ``tile_padding``, ``tta_scales`` and ``shift`` only when set (older segsvc reads
        such manifests)."""
        data = asdict(self)
        if data["shift"] == (0.0, 0.0):
            del data["shift"]
        else:
            data["shift"] = list(data["shift"])
        if data["tile_padding"] == "zero":
            del data["tile_padding"]
        if data["tta_scales"]:
            data["tta_scales"] = list(data["tta_scales"])
        else:
            del data["tta_scales"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "InferenceSpec":
        if not isinstance(data, Mapping):
            raise ModelConfigError(f"inference spec must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ModelConfigError(f"inference spec has unknown keys {sorted(unknown)}")
        return cls(**data)


def _tta_scales(value: Any, scale: float) -> tuple[float, ...]:
    """``tta_scales`` as a tuple of floats, each with ``scale`` in (0, MAX_INFERENCE_SCALE]; at most MAX_TTA_SCALES."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ModelConfigError(f"inference tta_scales must be a list of numbers, got {value!r}")
    if len(value) > MAX_TTA_SCALES:
        raise ModelConfigError(f"inference tta_scales has {len(value)} scales, over the limit of {MAX_TTA_SCALES}")
    factors = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ModelConfigError(f"inference tta_scales must be numbers, got {item!r}")
        if not 0.0 < float(item) * scale <= MAX_INFERENCE_SCALE:  # also false for NaN
            raise ModelConfigError(f"inference tta_scales factor {item!r} times scale {scale} must be in "
                                   f"(0, {MAX_INFERENCE_SCALE}]")
        factors.append(float(item))
    if len(set(factors)) != len(factors):
        raise ModelConfigError(f"inference tta_scales repeats a factor: {list(value)}")
    return () if factors == [1.0] else tuple(factors)  # [1.0] is no TTA


def _shift(value: Any) -> tuple[float, float]:
    """``shift`` as ``(dy, dx)`` floats, each within ``MAX_INPUT_SHIFT`` px."""
    try:
        dy, dx = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ModelConfigError(f"inference shift must be two numbers [dy, dx] in pixels, got {value!r}") from None
    if not (abs(dy) <= MAX_INPUT_SHIFT and abs(dx) <= MAX_INPUT_SHIFT):  # also false for NaN
        raise ModelConfigError(f"inference shift must lie within {MAX_INPUT_SHIFT} px on each axis, got {value!r}")
    return dy + 0.0, dx + 0.0  # -0.0 -> 0.0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
