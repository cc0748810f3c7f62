"""Batched, device-aware inference for one loaded model version (what the server's batcher runs).

``Predictor`` is the reference: one image in, its label map out. ``Engine``
computes the same thing for batches of requests, applying the manifest's
inference contract (``contract.py``) in two halves: ``prepare`` (on an I/O
thread) resizes the image by the contract's scale and normalises it
(``network_input``) and computes a batching key; ``run`` (on the batch thread)
runs ``contract_logits`` over same-key tensors (pad, one forward pass, crop,
logits resized back to each original size) and returns each request's label
map, optional confidence and class counts. A request's tiling and flip TTA
default to the manifest's (``InferenceOptions`` fields left ``None``). Plain
requests are grouped by their *padded* size, so a label map from a batch
equals the label map ``Predictor.predict`` gives for that image alone. Tiled
and flip-TTA requests are grouped by their exact size and options.

The forward pass itself (padding, device, autocast, the network, cropping) is
the predictor's backend's (``segsvc.inference.backends``): eager PyTorch or
ONNX Runtime, the same for the server, batch jobs and evaluation.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Hashable

import numpy as np
import torch

from segsvc.config import InferenceSpec, check_request_tiling
from segsvc.errors import InvalidArgument
from segsvc.inference.admission import Cost, estimate
from segsvc.inference.argmax import class_argmax
from segsvc.inference.backends import PRECISIONS, EngineConfig
from segsvc.inference.contract import Geometry, contract_logits, with_overrides
from segsvc.inference.predictor import Predictor, labels_dtype, padded_size

log = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "EngineConfig", "Engine", "InferenceOptions", "Output", "Prepared", "pass_pixels",
           "resolve_device"]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InvalidArgument(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device 'cuda' requested but no CUDA device is available; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"device {device!r} is not supported; use auto, cpu or cuda")
    return dev


@dataclass(frozen=True)
class InferenceOptions:
    """Per-request inference options; ``None`` (unset) means the model manifest's default.

    Args:
        tile_size: side of sliding-window tiles in pixels of the network's input
            (after the manifest's scale), 16 to 16384; 0 disables tiling.
        tile_overlap: fraction of a tile shared with its neighbour, in [0, 0.75]
            (the tile stride is at least a quarter tile, bounding passes per pixel).
        flip_tta: average with the horizontally mirrored image's logits.
        confidence: also return the max softmax probability as uint8 (round(255 p)).
        class_counts: also return the number of pixels per class.
    """

    tile_size: int | None = None
    tile_overlap: float | None = None
    flip_tta: bool | None = None
    confidence: bool = False
    class_counts: bool = False

    def __post_init__(self) -> None:
        check_request_tiling(self.tile_size, self.tile_overlap, self.flip_tta)

    def resolve(self, defaults: InferenceSpec) -> InferenceSpec:
        """The contract this request runs: the manifest's, with this request's explicit choices."""
        return with_overrides(defaults, tile_size=self.tile_size, tile_overlap=self.tile_overlap,
                              flip_tta=self.flip_tta)


@dataclass(frozen=True, eq=False)
class Prepared:
    """One prepared image: the network's input tensor, its options and resolved contract, key and cost.

    ``tensor`` is ``C x H' x W'`` at the contract's scale; ``image_size`` is the
    original ``(H, W)`` the label map comes back at. ``abandon`` is set by the
    caller that gave up (deadline, cancel); a tiled or flipped batch whose
    callers all gave up stops between its passes. ``pass_pixels`` is what
    ``Engine.prepare`` computed for ``pixels``.
    """

    tensor: torch.Tensor
    options: InferenceOptions
    key: Hashable
    cost: Cost
    spec: InferenceSpec = InferenceSpec()
    image_size: tuple[int, int] | None = None
    abandon: threading.Event = field(default_factory=threading.Event)
    pass_pixels: int | None = None

    @property
    def size(self) -> tuple[int, int]:
        """The network input's ``(H', W')`` (before padding)."""
        return int(self.tensor.shape[-2]), int(self.tensor.shape[-1])

    @property
    def output_size(self) -> tuple[int, int]:
        """The label map's ``(H, W)``: the original image's."""
        return self.image_size if self.image_size is not None else self.size

    @property
    def pixels(self) -> int:
        """What the batcher budgets this item by: the pixels it adds to its batch's largest forward pass.

        ``pass_pixels`` (TTA scales, padding and tiles counted); without it, the padded size the batch shares.
        """
        if self.pass_pixels is not None:
            return self.pass_pixels
        if self.key[0] == "padded":
            return int(self.key[1]) * int(self.key[2])
        h, w = self.size
        return h * w


@dataclass(frozen=True, eq=False)
class Output:
    """One request's result: labels ``H x W`` (uint8, or uint16 above 256 classes).

    ``infer_s`` and ``output_s`` are the seconds its batch spent in the forward passes
    and in turning their logits into outputs (``segsvc.inference.statistics``).
    """

    labels: np.ndarray
    confidence: np.ndarray | None = None
    class_counts: np.ndarray | None = None
    infer_s: float = 0.0
    output_s: float = 0.0


def pass_pixels(height: int, width: int, spec: InferenceSpec, geometry: Geometry) -> int:
    """Pixels a ``height x width`` network input adds to the largest forward pass of its batch.

    Its largest TTA scale, padded to the stride and minimum size (``estimate``'s
    ``pixels``); tiled, up to ``tile_batch`` such tiles share a pass. Flip TTA
    runs the mirrored batch as a pass of its own, the same size.
    """
    cost = estimate(height, width, tile_size=spec.tile_size, tile_overlap=spec.tile_overlap, flip_tta=False,
                    stride=geometry.stride, min_size=geometry.min_size, num_classes=1, bytes_per_pixel=0.0,
                    tile_padding=spec.tile_padding, tta_scales=spec.tta_scales)
    return cost.pixels * (min(geometry.tile_batch, cost.tiles) if spec.tile_size else 1)


class Engine:
    """Runs batches of ``Prepared`` images for one model version on one device.

    Args:
        predictor: the loaded model, its manifest and device (the reference path).
        config: precision, memory format and warm-up settings.

    Example:
        >>> engine = Engine(Predictor(model, manifest), EngineConfig(device="cpu"))  # doctest: +SKIP
        >>> [out] = engine.run([engine.prepare(image, InferenceOptions())])  # doctest: +SKIP
        >>> (out.labels == Predictor(model, manifest).predict(image)).all()  # doctest: +SKIP
        True
    """

    def __init__(self, predictor: Predictor, config: EngineConfig) -> None:
        self.predictor = predictor
        self.config = config
        self.backend = predictor.backend
        self.device = predictor.device
        self.num_classes = predictor.num_classes
        self.labels_dtype = labels_dtype(self.num_classes)
        self.bytes_per_pixel = 0.0  # set by measure_memory() at load

    def resolve(self, options: InferenceOptions) -> InferenceSpec:
        """The contract a request runs: the manifest's, with the request's explicit tiling/TTA."""
        return options.resolve(self.predictor.inference)

    def cost(self, height: int, width: int, options: InferenceOptions) -> Cost:
        """What segmenting a ``height x width`` image with ``options`` costs on this model (at its scale),
        the confidence map and the label dtype included."""
        p, spec = self.predictor, self.resolve(options)
        return estimate(height, width, tile_size=spec.tile_size, tile_overlap=spec.tile_overlap,
                        flip_tta=spec.flip_tta, stride=p.stride, min_size=p.min_size,
                        num_classes=self.num_classes, bytes_per_pixel=self.bytes_per_pixel,
                        channels=p.manifest.input.channels, scale=spec.scale, tile_padding=spec.tile_padding,
                        tta_scales=spec.tta_scales, confidence=options.confidence,
                        label_bytes=self.labels_dtype.itemsize)

    def measure_memory(self, size: int = 128) -> float:
        """Bytes the forward pass needs per input pixel at its peak (measured once at load, by the backend)."""
        self.bytes_per_pixel = self.backend.measure_memory(size)
        return self.bytes_per_pixel

    @property
    def precision(self) -> str:
        return self.backend.precision

    # -- I/O thread --------------------------------------------------------------
    def prepare(self, image: np.ndarray, options: InferenceOptions) -> Prepared:
        """Resize and normalise one uint8 image as the contract says, and compute its batching key."""
        spec = self.resolve(options)
        tensor = self.predictor.input_tensor(image)
        h, w = int(tensor.shape[-2]), int(tensor.shape[-1])
        if spec.composed:
            key: Hashable = ("exact", h, w, spec.tile_size, spec.tile_overlap, spec.flip_tta, spec.tta_scales)
        else:
            key = ("padded", *padded_size(h, w, self.predictor.stride, self.predictor.min_size))
        if spec.tile_padding != "zero":  # jobs of one batch run with one padding
            key = (*key, spec.tile_padding)
        height, width = int(image.shape[0]), int(image.shape[1])
        return Prepared(tensor, options, key, self.cost(height, width, options), spec, (height, width),
                        pass_pixels=pass_pixels(h, w, spec, self.predictor.geometry))

    # -- batch thread ------------------------------------------------------------
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[N, K, H, W]`` of a normalised CPU batch of any H, W (the backend's one path)."""
        return self.backend.forward(batch)

    @torch.inference_mode()
    def run(self, jobs: list[Prepared]) -> list[Output]:
        """Label maps (and extras) for jobs that share one key (the batcher guarantees it)."""
        if not jobs:
            return []
        keys = {job.key for job in jobs}
        if len(keys) != 1:
            raise InvalidArgument(f"a batch must share one key, got {len(keys)} different keys")
        started = time.perf_counter()
        logits = contract_logits(
            self.forward, [j.tensor for j in jobs], [j.output_size for j in jobs], jobs[0].spec,
            self.predictor.geometry, should_stop=lambda: all(j.abandon.is_set() for j in jobs),
        )
        inferred = time.perf_counter()
        outputs = [self._output(c, j.options) for c, j in zip(logits, jobs)]
        timing = {"infer_s": inferred - started, "output_s": time.perf_counter() - inferred}
        return [replace(out, **timing) for out in outputs]

    def _output(self, logits: torch.Tensor, options: InferenceOptions) -> Output:
        """Arg-max (and softmax/counts when asked) on the device; only small arrays come back."""
        labels_t = class_argmax(logits)[0]
        if self.labels_dtype == np.uint8:
            labels = labels_t.to(torch.uint8).cpu().numpy()
        else:
            labels = labels_t.to(torch.int32).cpu().numpy().astype(self.labels_dtype)
        confidence = counts = None
        if options.confidence:
            p = torch.softmax(logits, dim=1).amax(1)[0]
            confidence = torch.round(p * 255.0).clamp_(0, 255).to(torch.uint8).cpu().numpy()
        if options.class_counts:
            counts = torch.bincount(labels_t.flatten(), minlength=self.num_classes).cpu().numpy().astype(np.int64)
        return Output(labels, confidence, counts)

    def warmup(self) -> None:
        """Run forward passes on a dummy image so kernels, allocators and autotuners are ready."""
        if self.config.warmup:
            self.backend.warmup(self.config.warmup_size)
