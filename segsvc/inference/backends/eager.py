"""The ``torch`` backend: the eager PyTorch module (optionally ``torch.compile``d on CUDA).

On CUDA the forward pass uses autocast (bf16 or fp16), channels-last memory and
pinned host memory with non-blocking copies; on CPU it runs in float32 with the
thread count the server set once, channels-last for convolution-only networks:
oneDNN's convolutions run 1.1-1.75x faster in that layout on this project's models
(FCN, U-Net, SegNet, smp CNN encoders), while a network with attention or linear
layers (smp Segformer) pays more in layout conversions than it gains
(``bench/bench_backends.py``). A loaded artifact's BatchNorm layers are folded into the
convolutions before them (``fold_into_convolutions``): in inference a BatchNorm is a per-channel
affine map, and as a layer of its own it cost a fifth of the bench U-Net's CPU time.
"""

from __future__ import annotations

import logging
import sys
import weakref
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from segsvc.errors import InvalidArgument
from segsvc.inference.backends.base import Backend, EngineConfig, amp_dtype
from segsvc.inference.contract import Geometry, model_geometry
from segsvc.models.artifact import Manifest

log = logging.getLogger(__name__)

# On top of the layer outputs counted below: kernel buffers. With outputs counted per tensor (an
# in-place layer's output counts again), the estimate came within 0.97-1.09x of the measured peak
# RSS on FCN-8s, U-Net, SegNet (both) and smp Unet/ResNet-34 (bench/bench_hardening.py); 1.1 for margin.
# Folding BatchNorm removes its outputs from the pass but not from the count (the in-place ReLU after
# the convolution still counts twice), so for served networks the estimate errs safe: 1.06-1.58x.
# Counting each storage once instead came to 0.76x on U-Net and smp Unet: the concatenations of
# their skip connections are not layers, and the double count had been covering them.
CPU_WORKSPACE_FACTOR = 1.1


def convolutional(model: nn.Module) -> bool:
    """Whether ``model`` has no linear (token) layers: the networks that run faster channels-last on CPU."""
    return not any(isinstance(m, (nn.Linear, nn.MultiheadAttention)) for m in model.modules())


FOLDABLE_CONVOLUTIONS = (nn.Conv2d, nn.ConvTranspose2d)
# Blocks whose forward passes each named convolution's output to the named BatchNorm and nowhere else
# (torchvision's ResNet blocks, the encoders of smp's resnet* models), by the module that defines them:
# a model can only hold them once that module is imported.
NAMED_PAIRS = {
    "torchvision.models.resnet": {
        "BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
        "Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    },
}


def imported_named_pairs() -> dict[type, tuple[tuple[str, str], ...]]:
    """``NAMED_PAIRS`` by class, for the classes whose modules are imported (no import here)."""
    found: dict[type, tuple[tuple[str, str], ...]] = {}
    for module_name, classes in NAMED_PAIRS.items():
        for class_name, pairs in classes.items():
            cls = getattr(sys.modules.get(module_name), class_name, None)
            if isinstance(cls, type):
                found[cls] = pairs
    return found


def conv_bn_pairs(model: nn.Module) -> Iterator[tuple[nn.Module, str, str]]:
    """``(parent, convolution's name, BatchNorm's name)`` for the layers in ``model`` that may run
    as one: neighbours in an ``nn.Sequential`` that runs its layers in order (not a subclass with a
    ``forward`` of its own, which may reuse an output), and the pairs of the blocks in ``NAMED_PAIRS``."""
    named = imported_named_pairs()
    for parent in model.modules():
        if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
            names = list(parent._modules)  # every position: named_children() skips a module seen before
            yield from ((parent, a, b) for a, b in zip(names, names[1:]))
        yield from ((parent, a, b) for a, b in named.get(type(parent), ()))


def fold_into_convolutions(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a convolution (``conv_bn_pairs``) into it.

    In eval mode such a BatchNorm is ``y = a * x + b`` per channel, so the convolution's
    weights and bias can absorb it; the BatchNorm becomes ``nn.Identity`` (names and
    positions stay as they were). Only exact ``Conv2d``/``ConvTranspose2d`` and
    ``BatchNorm2d`` types with running statistics are folded, and only where the
    convolution's output feeds nothing else. ``model`` must be in eval mode; it is
    changed in place.

    Returns:
        How many BatchNorm layers were folded.

    Example:
        >>> seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> fold_into_convolutions(seq), type(seq[1]).__name__
        (1, 'Identity')
    """
    if model.training:
        raise ValueError("fold_into_convolutions needs a model in eval mode (training BatchNorm uses batch statistics)")
    folded = 0
    for parent, conv_name, norm_name in list(conv_bn_pairs(model)):
        conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
        if (type(conv) in FOLDABLE_CONVOLUTIONS and type(norm) is nn.BatchNorm2d
                and norm.running_mean is not None and norm.running_var is not None
                and not (isinstance(conv, nn.ConvTranspose2d) and conv.groups != 1)):  # torch cannot fuse those
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm, transpose=isinstance(conv, nn.ConvTranspose2d)))
            setattr(parent, norm_name, nn.Identity())
            folded += 1
    return folded


def peak_live_activations(model: nn.Module, run: Callable[[], object]) -> int:
    """The most bytes of layer outputs alive at the same time during ``run()`` (one forward pass).

    Each output is counted when a layer returns it and released when the tensor is freed.
    """
    state = {"now": 0, "peak": 0}

    def release(nbytes: int) -> None:
        state["now"] -= nbytes

    def count(_m: nn.Module, _i: object, out: object) -> None:
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                nbytes = t.untyped_storage().nbytes()
                state["now"] += nbytes
                state["peak"] = max(state["peak"], state["now"])
                weakref.finalize(t, release, nbytes)

    # nn.Identity (a folded BatchNorm's place) returns its input: no new output to count.
    leaves = [m for m in model.modules() if not any(True for _ in m.children()) and not isinstance(m, nn.Identity)]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return state["peak"]


class TorchBackend(Backend):
    """Eager PyTorch.

    Args:
        model: a network following the segsvc contract (``[N,C,H,W] -> [N,K,H,W]``).
        geometry: padding (stride, minimum size), from the manifest.
        device: where to run.
        channels: input channels.
        autocast: the autocast dtype (``None``: float32).
        channels_last: channels-last memory format: on CUDA, and on CPU for a ``convolutional`` model.
        compile: ``torch.compile`` the module with dynamic shapes (CUDA only).
        fold_batchnorm: fold BatchNorm layers into their convolutions (``fold_into_convolutions``); this
            changes ``model``, so only for a model the backend owns (one loaded from an artifact).

    Example:
        >>> backend = TorchBackend.for_manifest(model, manifest, torch.device("cpu"))  # doctest: +SKIP
        >>> backend.forward(torch.zeros(1, 3, 37, 45)).shape  # doctest: +SKIP
        torch.Size([1, 11, 37, 45])
    """

    name = "torch"

    def __init__(self, model: nn.Module, geometry: Geometry, device: torch.device, channels: int,
                 autocast: torch.dtype | None = None, channels_last: bool = False, compile: bool = False,
                 fold_batchnorm: bool = False) -> None:
        super().__init__(geometry, device, channels)
        self.model = model.to(device).eval()
        self.folded = fold_into_convolutions(self.model) if fold_batchnorm else 0
        self.autocast = autocast
        self.channels_last = channels_last and (device.type == "cuda" or convolutional(self.model))
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile and device.type != "cuda":
            raise InvalidArgument("torch.compile is used on CUDA only; drop --compile on a CPU server")
        self.network: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(self.model, dynamic=True) if compile else self.model
        )

    @classmethod
    def for_manifest(cls, model: nn.Module, manifest: Manifest, device: torch.device,
                     config: EngineConfig | None = None) -> "TorchBackend":
        """The backend of a loaded artifact; padding from the manifest (or, for an old one, the model's).

        Without ``config`` (a caller's own module, ``Predictor(module, manifest)``), float32 and
        no BatchNorm folding, so the caller's module keeps its layers.
        """
        stride, min_size = model_geometry(model, manifest.inference)
        config = config or EngineConfig(device=str(device), precision="fp32", fold_batchnorm=False)
        return cls(model, Geometry(stride, min_size), device, manifest.input.channels,
                   autocast=amp_dtype(config.precision, device), channels_last=config.channels_last,
                   compile=config.compile, fold_batchnorm=config.fold_batchnorm)

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast]

    @torch.inference_mode()
    def run(self, padded: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            padded = padded.pin_memory().to(self.device, non_blocking=True)
        else:
            padded = padded.to(self.device)
        if self.channels_last:
            padded = padded.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            return self.network(padded)

    @torch.inference_mode()
    def measure_memory(self, size: int = 128) -> float:
        """On CUDA: the allocator's peak over one pass. On CPU, where allocations are not
        counted: the high-water mark of the layer outputs alive at once, times
        ``CPU_WORKSPACE_FACTOR`` for the kernels' own buffers (checked against the
        peak RSS of real passes by ``bench/bench_hardening.py``)."""
        x = self.probe_input(size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            self.forward(x)
            torch.cuda.synchronize(self.device)
            used = float(torch.cuda.max_memory_allocated(self.device) - before)
        else:
            used = peak_live_activations(self.model, lambda: self.forward(x)) * CPU_WORKSPACE_FACTOR
        return max(used / (x.shape[-2] * x.shape[-1]), 1.0)

    def warmup(self, size: int, passes: int = 1) -> None:
        super().warmup(size, passes + (1 if self.device.type == "cuda" else 0))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
