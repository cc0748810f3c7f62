"""The inference contract: how a model version turns an image into logits, as its manifest says.

A model is measured (``segsvc eval``, the trainer's validation) at some input
scale, padded to some stride, maybe with sliding windows or flip TTA; serving
must run it the same way or served quality is not what was measured. The
manifest's ``InferenceSpec`` records that, and this module applies it:

1. ``network_input``: translate the image by ``shift`` (a sub-pixel label
   offset the training removed; usually none), resize it by ``scale`` (area
   when shrinking, linear when enlarging) and normalise it (``InputSpec``);
2. ``contract_logits``: pad to the stride and minimum size, forward, crop (or
   the sliding-window / flip / multi-scale TTA composition of that), then resize the logits
   back to the original image size with bilinear interpolation. With
   ``tile_padding: reflect`` the padding is the mirrored image and tiles are
   overlap tiles with mirrored context (``tiling.overlap_tile_logits``).

``apply_contract`` is the two in a row for one image: what ``Predictor`` and
``segsvc eval`` call. ``Engine`` runs the same two functions on two threads
(``prepare`` on an I/O thread, ``run`` on the batch thread), so the server, the
batch jobs and ``segsvc batch`` produce the same label maps as the evaluation.

Example:
    >>> spec = InferenceSpec(scale=0.5, stride=8, min_input_size=8)
    >>> x = network_input(np.zeros((37, 45, 3), np.uint8), InputSpec(), spec)
    >>> tuple(x.shape)
    (3, 18, 22)
    >>> [out] = contract_logits(lambda b: b[:, :2], [x], [(37, 45)], spec)
    >>> tuple(out.shape)
    (1, 2, 37, 45)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from segsvc.config import InferenceSpec, InputSpec
from segsvc.data.preprocess import as_hwc, preprocess
from segsvc.data.registration import shift_image
from segsvc.errors import ArtifactError, InvalidArgument
from segsvc.inference.tiling import LogitsFn, StopFn, make_logits_fn, reflect_to_multiple

TILE_BATCH = 4  # tiles per forward pass of a sliding-window request


def padded_size(h: int, w: int, multiple: int, min_size: int = 1) -> tuple[int, int]:
    """The smallest (H, W) >= max(size, min_size) divisible by ``multiple``."""
    ph = -(-max(h, min_size) // multiple) * multiple
    pw = -(-max(w, min_size) // multiple) * multiple
    return ph, pw


def pad_to_multiple(
    x: torch.Tensor, multiple: int, min_size: int = 1, value: float = 0.0, mode: str = "zero"
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad ``[N, C, H, W]`` at the bottom/right to a multiple; returns the padded tensor and (H, W).

    ``zero`` padding is ``value`` (zero in normalised space, i.e. the dataset's
    mean colour); ``reflect`` is the mirrored image (``tiling.mirror_pad``).
    """
    h, w = x.shape[-2:]
    if mode == "reflect":
        return reflect_to_multiple(x, multiple, min_size), (h, w)
    ph, pw = padded_size(h, w, multiple, min_size)
    if (ph, pw) != (h, w):
        x = F.pad(x, (0, pw - w, 0, ph - h), value=value)
    return x, (h, w)


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """The ``(H, W)`` the network sees for an ``h x w`` image at ``scale`` (at least 1 x 1)."""
    if scale == 1.0:
        return h, w
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize_image(image: np.ndarray, scale: float, interpolation: str = "auto") -> np.ndarray:
    """``image`` resized by ``scale``; ``auto`` is area averaging when shrinking, linear when enlarging."""
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    sh, sw = scaled_size(h, w, scale)
    if (sh, sw) == (h, w):
        return image
    if interpolation == "auto":
        interpolation = "area" if scale < 1.0 else "linear"
    flag = cv2.INTER_AREA if interpolation == "area" else cv2.INTER_LINEAR
    out = cv2.resize(image, (sw, sh), interpolation=flag)
    return out.reshape(sh, sw, *image.shape[2:])  # cv2 drops a single channel axis


def network_input(image: np.ndarray, input_spec: InputSpec, spec: InferenceSpec) -> torch.Tensor:
    """Step 1: the normalised ``C x H' x W'`` tensor of a uint8 image, shifted and resized as the contract says."""
    image = as_hwc(image, input_spec.channels)  # a clear InvalidImage before OpenCV sees it
    return preprocess(resize_image(shift_image(image, spec.shift), spec.scale, spec.interpolation), input_spec)


def model_geometry(model: torch.nn.Module, spec: InferenceSpec) -> tuple[int, int]:
    """``(stride, min_size)`` to pad to: the manifest's, else the model's own; checked against the model.

    Raises:
        ArtifactError: the manifest's stride is not a multiple of the model's, or its
            minimum size is below the model's (the network would reject such inputs).
    """
    own_stride = int(getattr(model, "output_stride", 1))
    own_min = int(getattr(model, "min_input_size", 1))
    stride = spec.stride if spec.stride is not None else own_stride
    min_size = spec.min_input_size if spec.min_input_size is not None else own_min
    if stride % own_stride:
        raise ArtifactError(f"the manifest's inference stride {stride} is not a multiple of the model's "
                            f"output stride {own_stride}")
    if min_size < own_min:
        raise ArtifactError(f"the manifest's minimum input size {min_size} is below the model's {own_min}")
    return stride, min_size


@dataclass(frozen=True)
class Geometry:
    """What ``contract_logits`` needs besides the spec: padding and tile batching."""

    stride: int = 1
    min_size: int = 1
    tile_batch: int = TILE_BATCH


def contract_logits(
    forward: LogitsFn,
    tensors: Sequence[torch.Tensor],
    sizes: Sequence[tuple[int, int]],
    spec: InferenceSpec,
    geometry: Geometry = Geometry(),
    should_stop: StopFn | None = None,
) -> list[torch.Tensor]:
    """Step 2: float32 logits ``[1, K, H, W]`` at each original ``size`` for prepared ``tensors``.

    Args:
        forward: the backend's ``[N, C, h, w] -> [N, K, h, w]`` for any h, w
            (``Backend.forward`` pads to the geometry and crops back).
        tensors: ``network_input`` results. Without tiling or TTA they may differ in
            size as long as they pad to the same size (one forward pass; with
            ``reflect`` padding each is mirrored from its own border); with
            tiling or TTA they must be the same size.
        sizes: the original image size of each tensor (logits are resized back to it).
        spec: the contract, with a request's tiling/TTA already resolved.
        should_stop: checked between tile/flip passes (every caller gave up).
    """
    if len(tensors) != len(sizes) or not tensors:
        raise InvalidArgument(f"contract_logits needs one size per tensor, got {len(tensors)} and {len(sizes)}")

    if spec.composed:
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise InvalidArgument(f"tiled or TTA images of one batch must share a size, got {sorted(shapes)}")
        fn = make_logits_fn(
            forward,
            tile=(spec.tile_size, spec.tile_size) if spec.tile_size else None,
            overlap=spec.tile_overlap, hflip=spec.flip_tta, tile_batch=geometry.tile_batch, should_stop=should_stop,
            padding=spec.tile_padding, stride=geometry.stride, min_size=geometry.min_size, scales=spec.tta_scales,
        )
        logits = fn(torch.stack(list(tensors)))
        crops = [logits[i : i + 1] for i in range(len(tensors))]
    else:
        # Images of different sizes share a pass when they pad to the same size: stack them padded.
        padded = [pad_to_multiple(t[None], geometry.stride, geometry.min_size, mode=spec.tile_padding)[0][0]
                  for t in tensors]
        if len({tuple(p.shape) for p in padded}) != 1:
            raise InvalidArgument("images of one forward pass must pad to the same size")
        logits = forward(torch.stack(padded)).float()
        crops = [logits[i : i + 1, :, : t.shape[-2], : t.shape[-1]] for i, t in enumerate(tensors)]
    return [restore_size(c, size) for c, size in zip(crops, sizes)]


def with_overrides(
    spec: InferenceSpec, *, tile_size: int | None = None, tile_overlap: float | None = None,
    flip_tta: bool | None = None,
) -> InferenceSpec:
    """The contract with a request's explicit tiling/TTA choices; ``None`` keeps the manifest's default."""
    changes = {k: v for k, v in (("tile_size", tile_size), ("tile_overlap", tile_overlap), ("flip_tta", flip_tta))
               if v is not None}
    return replace(spec, **changes) if changes else spec


def restore_size(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits ``[N, K, h, w]`` resized (bilinear) to the original ``size``; unchanged when it matches."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def apply_contract(
    forward: LogitsFn,
    image: np.ndarray,
    input_spec: InputSpec,
    spec: InferenceSpec,
    geometry: Geometry = Geometry(),
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Logits ``[1, K, H, W]`` of one uint8 image run as the contract says (``size``: default the image's)."""
    x = network_input(image, input_spec, spec)
    with torch.inference_mode():
        return contract_logits(forward, [x], [size or tuple(image.shape[:2])], spec, geometry)[0]

