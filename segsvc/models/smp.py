"""Every segmentation-models-pytorch architecture x encoder, behind the segsvc contract.

Iakubovskii, "Segmentation Models Pytorch", GitHub 2019 (each architecture's
own paper is cited in smp's docs: Unet, Unet++, MAnet, Linknet, FPN, PSPNet,
DeepLabV3, DeepLabV3+, PAN, UPerNet, Segformer, DPT).

Encoders start from ``encoder_weights=None``: nothing is downloaded at run
time. A local safetensors file can initialise the encoder instead
(``encoder_weights_path``); asking for hub weights fails at once with a
message saying how to supply such a file.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from segsvc.errors import ModelConfigError
from segsvc.models.base import check_input_shape

# smp's class names. smp itself (with timm and torchvision: about 1 s and 200 MiB at start-up here) is imported
# only when one of them is built, so a server or job serving FCN, U-Net or SegNet models never loads it.
ARCHITECTURES: tuple[str, ...] = (
    "Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet",
    "DeepLabV3", "DeepLabV3Plus", "PAN", "UPerNet", "Segformer", "DPT",
)


# The smp architectures whose last step upsamples their decoder's output by a fixed ``upsampling`` factor, and the
# factor that gives logits of the input's size for an ``encoder_depth``: smp accepts any depth in [3, 5] but
# keeps its default factor, so FPN with encoder_depth=3 gave logits 4x the input and PSPNet with 5 a quarter.
# Each with the depths smp builds it with.
_UPSAMPLING_FOR_DEPTH: dict[str, tuple[range, Callable[[int], int]]] = {
    "FPN": (range(3, 6), lambda depth: 2 ** (depth - 3)),  # the pyramid is merged at stride 2**(depth - 3) * 4
    "PSPNet": (range(1, 6), lambda depth: 2**depth),  # the pyramid pooling runs on the deepest map
}
# Other lower bounds on encoder_depth that smp does not check itself (UnetPlusPlus at 1: a KeyError at forward).
_MIN_ENCODER_DEPTH = {"UnetPlusPlus": 2}


def check_encoder_depth(architecture: str, net_class: type[nn.Module], kwargs: dict[str, Any]) -> None:
    """Refuse an ``encoder_depth`` (with ``upsampling``) whose logits would not be the input's size.

    Raises:
        ModelConfigError: naming the parameter and the values that keep the contract.
    """
    defaults = {name: p.default for name, p in inspect.signature(net_class).parameters.items()}
    depth = kwargs.get("encoder_depth", defaults.get("encoder_depth"))
    if not isinstance(depth, int) or isinstance(depth, bool):
        return  # smp reports a malformed depth itself
    lowest = _MIN_ENCODER_DEPTH.get(architecture)
    if lowest is not None and depth < lowest:
        raise ModelConfigError(f"smp {architecture} needs encoder_depth between {lowest} and 5, got {depth}")
    if architecture not in _UPSAMPLING_FOR_DEPTH:
        return
    depths, rule = _UPSAMPLING_FOR_DEPTH[architecture]
    if depth not in depths:
        return  # smp refuses it with its own message
    upsampling = kwargs.get("upsampling", defaults.get("upsampling"))
    if upsampling != rule(depth):
        valid = ", ".join(f"encoder_depth={d} with upsampling={rule(d)}" for d in depths)
        raise ModelConfigError(
            f"smp {architecture} with encoder_depth={depth} and upsampling={upsampling} would not give logits of "
            f"the input's size; valid: {valid}"
        )


def check_encoder_name(encoder_name: object) -> None:
    """Refuse an encoder that timm would fetch or read from somewhere: ``tu-hf-hub:<repo>`` (the Hugging Face
    Hub: with no network that fails late or waits on timeouts, and it is a download even without weights) and
    ``tu-local-dir:<folder>`` (a folder the manifest names, outside any root). ``None`` keeps smp's default.

    Raises:
        ModelConfigError: not a string, a name with a source prefix or a path, or a ``tu-`` name that is not
            in timm's registry (an optional ``.tag`` after it, as in ``tu-resnet18.a1_in1k``).
    """
    if encoder_name is None:
        return
    if not isinstance(encoder_name, str) or not encoder_name:
        raise ModelConfigError(f"smp encoder_name must be a non-empty string, got {encoder_name!r}")
    if any(c in encoder_name for c in ":/\\"):
        raise ModelConfigError(
            f"smp encoder_name {encoder_name!r} names a Hugging Face Hub repository or a folder, which segsvc never "
            "downloads or reads; use an smp encoder or a name of the timm registry (e.g. 'resnet34', 'tu-resnet34')"
        )
    if encoder_name.startswith("tu-"):
        import timm

        model_name = encoder_name[3:].split(".", 1)[0]
        if not timm.is_model(model_name):
            raise ModelConfigError(f"smp encoder_name {encoder_name!r}: {model_name!r} is not a model of the timm "
                                   "registry (timm.list_models() lists them)")


def smp_class(architecture: str) -> type[nn.Module]:
    """The smp class named ``architecture``, importing smp on first use."""
    if architecture not in ARCHITECTURES:
        raise ModelConfigError(
            f"unknown smp architecture {architecture!r}; valid: {', '.join(sorted(ARCHITECTURES))}"
        )
    import segmentation_models_pytorch as smp

    return getattr(smp, architecture)


class SmpModel(nn.Module):
    """An smp model with the segsvc contract (``output_stride``, a helpful shape error).

    Args:
        architecture: an smp class name, e.g. ``"Unet"``, ``"FPN"``, ``"DeepLabV3Plus"``.
        num_classes: number of classes K.
        in_channels: image channels C.
        encoder_name: an smp encoder name (``"resnet34"``, ``"mit_b0"``, ``"tu-..."``); ``None`` (default)
            keeps the architecture's own smp default (``resnet34`` for most, a timm ViT for DPT).
        encoder_weights: must stay ``None``: segsvc never downloads weights.
        encoder_weights_path: optional local ``.safetensors`` state dict for the encoder.
        **kwargs: passed to the smp class (``encoder_depth``, ``decoder_channels``, ...).

    Example:
        >>> m = SmpModel("Unet", num_classes=3, encoder_name="resnet18")
        >>> m(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 3, 64, 64])
    """

    def __init__(
        self,
        architecture: str,
        num_classes: int,
        in_channels: int = 3,
        encoder_name: str | None = None,
        encoder_weights: str | None = None,
        encoder_weights_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        net_class = smp_class(architecture)
        if encoder_weights is not None:
            raise ModelConfigError(
                f"encoder_weights={encoder_weights!r} would download weights, which segsvc never does "
                "at run time. Save the encoder's state dict as safetensors on a machine that has it "
                "(safetensors.torch.save_file(model.encoder.state_dict(), 'enc.safetensors')) and pass "
                "params.encoder_weights_path='enc.safetensors'."
            )
        check_encoder_name(encoder_name)
        if architecture == "DPT":  # ViT encoders: accept any size that is a multiple of the patch
            kwargs.setdefault("dynamic_img_size", True)
        # passed only when set: one default for every class (resnet34) broke DPT, whose decoder needs a ViT
        if encoder_name is not None:
            kwargs["encoder_name"] = encoder_name
        check_encoder_depth(architecture, net_class, kwargs)
        try:
            self.net = net_class(
                encoder_weights=None,
                in_channels=in_channels,
                classes=num_classes,
                **kwargs,
            )
        except (KeyError, TypeError, ValueError) as exc:
            encoder = repr(encoder_name) if encoder_name is not None else "(smp's default)"
            raise ModelConfigError(f"cannot build smp {architecture} with encoder {encoder}: {exc}") from None
        if encoder_weights_path is not None:
            load_encoder_weights(self.net.encoder, Path(encoder_weights_path))
        self.architecture = architecture
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.output_stride = int(getattr(self.net.encoder, "output_stride", 32))
        if architecture == "DPT":  # its reassemble stage also builds a 2x-coarser map from the patch grid
            self.output_stride *= 2
        # PAN's feature pyramid attention pools its deepest map three more times.
        self.min_input_size = self.output_stride * (8 if architecture == "PAN" else 1)

    @property
    def head_prefixes(self) -> tuple[str, ...]:
        """The last convolution of smp's ``segmentation_head`` (DPT's head has more layers before it)."""
        convs = [name for name, m in self.net.segmentation_head.named_modules() if isinstance(m, nn.Conv2d)]
        return (f"net.segmentation_head.{convs[-1]}",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(x, self.in_channels, self.output_stride)
        return self.net(x)


def load_encoder_weights(encoder: nn.Module, path: Path) -> None:
    """Initialise ``encoder`` from a local safetensors file (never a pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise ModelConfigError(f"encoder weights must be a .safetensors file (no pickles), got {path}")
    if not path.is_file():
        raise ModelConfigError(f"encoder weights file {path} does not exist")
    try:
        state = load_file(os.fspath(path))
    except (SafetensorError, OSError) as exc:
        raise ModelConfigError(f"cannot read encoder weights {path}: {exc}") from None
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelConfigError(
            f"encoder weights {path} lack {len(missing)} tensors "
            f"(e.g. {missing[:3]}); is it the state dict of this encoder?"
        )
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise ModelConfigError(f"encoder weights {path} have wrong shapes for {wrong[:3]}")
    # smp encoders drop classifier keys (fc.*) themselves; anything else unexpected is ignored
    encoder.load_state_dict({k: state[k] for k in expected})
