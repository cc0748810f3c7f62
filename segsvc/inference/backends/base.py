"""What every backend shares: ``Backend.forward``, the one path from a normalised batch to logits.

A backend owns "batch tensor -> logits": padding to the stride and minimum size
(``Geometry``, from the manifest), device placement, autocast, the network
call and the crop back. ``Predictor``, ``Engine`` (server, batch jobs) and
evaluation all call ``forward``; what runs underneath (eager PyTorch, ONNX
Runtime) is the subclass's ``run``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Mapping

import torch

from segsvc.config import BACKENDS, InferenceSpec
from segsvc.errors import ArtifactError, InvalidArgument
from segsvc.inference.contract import Geometry, pad_to_multiple, padded_size

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class EngineConfig:
    """How a model runs.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` (bf16 on GPUs that support it, else fp16; fp32 on
            CPU), ``fp32``, ``bf16`` or ``fp16`` (autocast dtype of the forward pass).
        channels_last: channels-last memory format, on CUDA and for convolution-only networks on CPU.
        fold_batchnorm: fold each inference-mode BatchNorm into the convolution before it
            (``backends.eager.fold_into_convolutions``) when a backend loads an artifact.
        warmup: run forward passes at load so the first request is not slow.
        warmup_size: side of the square warm-up image in pixels.
        backend: what runs every model (``torch``, ``onnxruntime``); ``None``:
            each manifest's ``inference.backend``.
        model_backends: per-model choices ``((model, backend), ...)``, over ``backend``.
        compile: ``torch.compile`` the eager model (CUDA only).
        threads: intra-op threads of an ONNX Runtime session (0: torch's thread count).

    Example:
        >>> EngineConfig(backend="onnxruntime", model_backends=(("unet", "torch"),)).backend_for("unet", "torch")
        'torch'
    """

    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    fold_batchnorm: bool = True
    warmup: bool = True
    warmup_size: int = 64
    backend: str | None = None
    model_backends: tuple[tuple[str, str], ...] = ()
    compile: bool = False
    threads: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InvalidArgument(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.warmup_size < 1:
            raise InvalidArgument(f"warmup_size must be positive, got {self.warmup_size}")
        for kind in [self.backend, *(b for _, b in self.model_backends)]:
            if kind is not None and kind not in BACKENDS:
                raise InvalidArgument(f"backend must be one of {BACKENDS}, got {kind!r}")
        if self.threads < 0:
            raise InvalidArgument(f"threads must be >= 0, got {self.threads}")

    def backend_for(self, model: str, manifest_choice: str) -> str:
        """The backend of ``model``: its own setting, else the server-wide one, else the manifest's."""
        own: Mapping[str, str] = dict(self.model_backends)
        return own.get(model) or self.backend or manifest_choice


def manifest_geometry(spec: InferenceSpec) -> Geometry:
    """Padding from the manifest's contract (``stride``, ``min_input_size``).

    Raises:
        ArtifactError: the manifest does not record them (a version-1 manifest;
            only the torch backend can serve those, from the module's own).
    """
    if spec.stride is None or spec.min_input_size is None:
        raise ArtifactError("the manifest's inference contract records no stride or minimum input size; "
                            "republish the model with this segsvc (or serve it with the torch backend)")
    return Geometry(spec.stride, spec.min_input_size)


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``; ``None`` is float32 (always on CPU for ``auto``)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def check_output_shape(logits: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    """``logits`` when they are ``[N, K, H, W]`` with the padded input's N, H and W.

    Raises:
        ArtifactError: any other shape (no server path in the message: it may reach a client).
    """
    n, _, h, w = padded.shape
    shape = tuple(logits.shape)
    if len(shape) != 4 or shape[0] != n or shape[2:] != (h, w):
        raise ArtifactError(f"the model broke the [N, C, H, W] -> [N, K, H, W] contract: logits {list(shape)} for "
                            f"an input of {list(padded.shape)}; its architecture parameters are invalid, "
                            "republish it with parameters that keep the input size")
    return logits


class Backend(ABC):
    """Runs one network: a normalised ``[N, C, H, W]`` float batch of any H, W -> float32 logits.

    Args:
        geometry: the stride and minimum size inputs are padded to.
        device: where the network runs (outputs come back as CPU or device tensors).
        channels: input channels (for warm-up and memory measurement).
    """

    name: str = ""

    def __init__(self, geometry: Geometry, device: torch.device, channels: int) -> None:
        self.geometry = geometry
        self.device = device
        self.channels = channels

    @property
    def precision(self) -> str:
        """The forward pass's numeric precision (``fp32``, ``bf16``, ``fp16``)."""
        return "fp32"

    @abstractmethod
    def run(self, padded: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K, H, W]`` of a padded CPU batch (the network call itself)."""

    @abstractmethod
    def measure_memory(self, size: int = 128) -> float:
        """Bytes the forward pass needs per input pixel at its peak (measured once at load)."""

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[N, K, H, W]`` of a normalised CPU batch of any H, W (padded, run, cropped back).

        Raises:
            ArtifactError: the network's output is not ``[N, K, H, W]`` of the padded input (a model built
                with parameters that break the contract); cropping it would silently misalign the labels.
        """
        padded, (h, w) = pad_to_multiple(batch, self.geometry.stride, self.geometry.min_size)
        return check_output_shape(self.run(padded), padded)[:, :, :h, :w].float()

    def probe_input(self, size: int) -> torch.Tensor:
        """A zero ``[1, C, S, S]`` batch at least ``size`` wide, padded to the geometry (warm-up, measuring)."""
        side = padded_size(max(size, self.geometry.min_size), max(size, self.geometry.min_size),
                           self.geometry.stride)[0]
        return torch.zeros((1, self.channels, side, side))

    def warmup(self, size: int, passes: int = 1) -> None:
        """Run ``passes`` forward passes on a dummy image so kernels and allocators are ready."""
        x = self.probe_input(size)
        for _ in range(passes):
            self.forward(x)
