"""In-process prediction: any image size in, a label map of the same size out.

Models need H and W divisible by their output stride; ``pad_to_multiple`` pads
the bottom and right edges and the predictor crops the logits back, so callers
pass images of any size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segsvc.data.preprocess import preprocess
from segsvc.models.artifact import Manifest


def padded_size(h: int, w: int, multiple: int, min_size: int = 1) -> tuple[int, int]:
    """The smallest (H, W) >= max(size, min_size) divisible by ``multiple``."""
    ph = -(-max(h, min_size) // multiple) * multiple
    pw = -(-max(w, min_size) // multiple) * multiple
    return ph, pw


def pad_to_multiple(
    x: torch.Tensor, multiple: int, min_size: int = 1, value: float = 0.0
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad ``[N, C, H, W]`` at the bottom/right to a multiple; returns the padded tensor and (H, W).

    Padding is zero in normalised space, i.e. the dataset's mean colour.
    """
    h, w = x.shape[-2:]
    ph, pw = padded_size(h, w, multiple, min_size)
    if (ph, pw) != (h, w):
        x = F.pad(x, (0, pw - w, 0, ph - h), value=value)
    return x, (h, w)


def labels_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.uint16)


class Predictor:
    """Wraps a loaded model and its manifest for prediction on arbitrary image sizes.

    Args:
        model: a network following the segsvc contract (has ``output_stride``).
        manifest: the artifact's manifest (input normalisation, classes).
        device: where to run.

    Example:
        >>> model, manifest = load_artifact("repo/membrane/1")  # doctest: +SKIP
        >>> labels = Predictor(model, manifest).predict(image)  # HxW uint8  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, manifest: Manifest, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.manifest = manifest
        self.stride = int(getattr(model, "output_stride", 1))
        self.min_size = int(getattr(model, "min_input_size", 1))

    @property
    def num_classes(self) -> int:
        return self.manifest.spec.num_classes

    def input_tensor(self, image: np.ndarray) -> torch.Tensor:
        """The normalised ``C x H x W`` tensor of a uint8 image (the shared preprocessing)."""
        return preprocess(image, self.manifest.input)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K, H, W]`` for a normalised batch of any H, W."""
        padded, (h, w) = pad_to_multiple(batch.to(self.device), self.stride, self.min_size)
        return self.model(padded)[:, :, :h, :w].float()

    def predict_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Label maps for images of possibly different sizes (same-size images share a forward pass)."""
        out: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        tensors = [self.input_tensor(im) for im in images]
        for i, t in enumerate(tensors):
            groups.setdefault(tuple(t.shape[-2:]), []).append(i)
        dtype = labels_dtype(self.num_classes)
        for indices in groups.values():
            labels = self.logits(torch.stack([tensors[i] for i in indices])).argmax(1).cpu().numpy()
            for i, lab in zip(indices, labels):
                out[i] = lab.astype(dtype)
        return out  # type: ignore[return-value]

    def predict(self, image: np.ndarray) -> np.ndarray:
        """The ``H x W`` label map of one uint8 image."""
        return self.predict_batch([image])[0]
