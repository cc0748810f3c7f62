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

On CUDA the forward pass uses autocast (bf16 or fp16), channels-last memory,
pinned host memory with non-blocking copies, and a warm-up pass at load. On CPU
it runs in float32 and the thread count is set once by the server.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np
import torch

from segsvc.config import MIN_TILE_SIZE, InferenceSpec
from segsvc.errors import InvalidArgument
from segsvc.inference.admission import MAX_TILE_OVERLAP, Cost, estimate
from segsvc.inference.argmax import class_argmax
from segsvc.inference.contract import contract_logits, with_overrides
from segsvc.inference.predictor import Predictor, labels_dtype, pad_to_multiple, padded_size

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# On top of the layer outputs counted below: kernel buffers. With outputs counted per tensor (an
# in-place layer's output counts again), the estimate came within 0.97-1.09x of the measured peak
# RSS on FCN-8s, U-Net, SegNet (both) and smp Unet/ResNet-34 (bench/bench_hardening.py); 1.1 for margin.
CPU_WORKSPACE_FACTOR = 1.1


def _peak_live_activations(model: torch.nn.Module, run: Callable[[], object]) -> int:
    """The most bytes of layer outputs alive at the same time during ``run()`` (one forward pass).

    Each output is counted when a layer returns it and released when the tensor is freed.
    """
    state = {"now": 0, "peak": 0}

    def release(nbytes: int) -> None:
        state["now"] -= nbytes

    def count(_m: torch.nn.Module, _i: object, out: object) -> None:
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                nbytes = t.untyped_storage().nbytes()
                state["now"] += nbytes
                state["peak"] = max(state["peak"], state["now"])
                weakref.finalize(t, release, nbytes)

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return state["peak"]


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
class EngineConfig:
    """How a model runs.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` (bf16 on GPUs that support it, else fp16; fp32 on
            CPU), ``fp32``, ``bf16`` or ``fp16`` (autocast dtype of the forward pass).
        channels_last: use channels-last memory format on CUDA.
        warmup: run forward passes at load so the first request is not slow.
        warmup_size: side of the square warm-up image in pixels.
    """

    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    warmup: bool = True
    warmup_size: int = 64

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InvalidArgument(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.warmup_size < 1:
            raise InvalidArgument(f"warmup_size must be positive, got {self.warmup_size}")


@dataclass(frozen=True)
class InferenceOptions:
    """Per-request inference options; ``None`` (unset) means the model manifest's default.

    Args:
        tile_size: side of sliding-window tiles in pixels of the network's input
            (after the manifest's scale); 0 disables tiling.
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
        if self.tile_size is not None and self.tile_size != 0 and self.tile_size < MIN_TILE_SIZE:
            raise InvalidArgument(f"tile_size must be 0 (no tiling) or at least {MIN_TILE_SIZE}, got {self.tile_size}")
        if self.tile_overlap is not None and not 0.0 <= self.tile_overlap <= MAX_TILE_OVERLAP:
            raise InvalidArgument(f"tile_overlap must be a fraction in [0, {MAX_TILE_OVERLAP}], got {self.tile_overlap}")

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
    callers all gave up stops between its passes.
    """

    tensor: torch.Tensor
    options: InferenceOptions
    key: Hashable
    cost: Cost
    spec: InferenceSpec = InferenceSpec()
    image_size: tuple[int, int] | None = None
    abandon: threading.Event = field(default_factory=threading.Event)

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
        """Pixels the forward pass sees: the padded size when batched by padded size."""
        if self.key[0] == "padded":
            return int(self.key[1]) * int(self.key[2])
        h, w = self.size
        return h * w


@dataclass(frozen=True, eq=False)
class Output:
    """One request's result: labels ``H x W`` (uint8, or uint16 above 256 classes)."""

    labels: np.ndarray
    confidence: np.ndarray | None = None
    class_counts: np.ndarray | None = None


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
        self.device = predictor.device
        self.num_classes = predictor.num_classes
        self.labels_dtype = labels_dtype(self.num_classes)
        self.amp_dtype = self._amp_dtype(config.precision)
        self.channels_last = config.channels_last and self.device.type == "cuda"
        if self.channels_last:
            predictor.model.to(memory_format=torch.channels_last)
        self.bytes_per_pixel = 0.0  # set by measure_memory() at load

    def resolve(self, options: InferenceOptions) -> InferenceSpec:
        """The contract a request runs: the manifest's, with the request's explicit tiling/TTA."""
        return options.resolve(self.predictor.inference)

    def cost(self, height: int, width: int, options: InferenceOptions) -> Cost:
        """What segmenting a ``height x width`` image with ``options`` costs on this model (at its scale)."""
        p, spec = self.predictor, self.resolve(options)
        return estimate(height, width, tile_size=spec.tile_size, tile_overlap=spec.tile_overlap,
                        flip_tta=spec.flip_tta, stride=p.stride, min_size=p.min_size,
                        num_classes=self.num_classes, bytes_per_pixel=self.bytes_per_pixel,
                        channels=p.manifest.input.channels, scale=spec.scale)

    @torch.inference_mode()
    def measure_memory(self, size: int = 128) -> float:
        """Bytes the forward pass needs per input pixel at its peak (measured once at load).

        On CUDA: the allocator's peak over one pass. On CPU, where allocations are
        not counted: the high-water mark of the layer outputs alive at once, times
        ``CPU_WORKSPACE_FACTOR`` for the kernels' own buffers. Checked against the
        peak RSS of real passes by ``bench/bench_hardening.py``.
        """
        side = padded_size(max(size, self.predictor.min_size), max(size, self.predictor.min_size),
                           self.predictor.stride)[0]
        x = torch.zeros((1, self.predictor.manifest.input.channels, side, side))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            self.forward(x)
            torch.cuda.synchronize(self.device)
            used = float(torch.cuda.max_memory_allocated(self.device) - before)
        else:
            used = _peak_live_activations(self.predictor.model, lambda: self.forward(x)) * CPU_WORKSPACE_FACTOR
        self.bytes_per_pixel = max(used / (side * side), 1.0)
        return self.bytes_per_pixel

    def _amp_dtype(self, precision: str) -> torch.dtype | None:
        if precision == "fp32" or (precision == "auto" and self.device.type != "cuda"):
            return None
        if precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if precision == "bf16" else torch.float16

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    # -- I/O thread --------------------------------------------------------------
    def prepare(self, image: np.ndarray, options: InferenceOptions) -> Prepared:
        """Resize and normalise one uint8 image as the contract says, and compute its batching key."""
        spec = self.resolve(options)
        tensor = self.predictor.input_tensor(image)
        h, w = int(tensor.shape[-2]), int(tensor.shape[-1])
        if spec.tile_size or spec.flip_tta:
            key: Hashable = ("exact", h, w, spec.tile_size, spec.tile_overlap, spec.flip_tta)
        else:
            key = ("padded", *padded_size(h, w, self.predictor.stride, self.predictor.min_size))
        height, width = int(image.shape[0]), int(image.shape[1])
        return Prepared(tensor, options, key, self.cost(height, width, options), spec, (height, width))

    # -- batch thread ------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[N, K, H, W]`` of a normalised CPU batch of any H, W (padded and cropped back)."""
        padded, (h, w) = pad_to_multiple(batch, self.predictor.stride, self.predictor.min_size)
        if self.device.type == "cuda":
            padded = padded.pin_memory().to(self.device, non_blocking=True)
            if self.channels_last:
                padded = padded.contiguous(memory_format=torch.channels_last)
        else:
            padded = padded.to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            logits = self.predictor.model(padded)
        return logits[:, :, :h, :w].float()

    @torch.inference_mode()
    def run(self, jobs: list[Prepared]) -> list[Output]:
        """Label maps (and extras) for jobs that share one key (the batcher guarantees it)."""
        if not jobs:
            return []
        keys = {job.key for job in jobs}
        if len(keys) != 1:
            raise InvalidArgument(f"a batch must share one key, got {len(keys)} different keys")
        logits = contract_logits(
            self.forward, [j.tensor for j in jobs], [j.output_size for j in jobs], jobs[0].spec,
            self.predictor.geometry, should_stop=lambda: all(j.abandon.is_set() for j in jobs),
        )
        return [self._output(c, j.options) for c, j in zip(logits, jobs)]

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
        if not self.config.warmup:
            return
        c = self.predictor.manifest.input.channels
        size = max(self.config.warmup_size, self.predictor.min_size)
        x = torch.zeros((1, c, size, size), dtype=torch.float32)
        for _ in range(2 if self.device.type == "cuda" else 1):
            self.forward(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
