"""In-process prediction: any image size in, a label map of the same size out.

The predictor applies the manifest's inference contract (``contract.py``):
the image is resized by the contract's scale, normalised, run by the backend
(which pads to the stride and minimum size and crops back), and its logits are
resized back, so callers pass images of any size and get their evaluated
quality.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from segsvc.config import InferenceSpec
from segsvc.inference.argmax import class_argmax
from segsvc.inference.backends import Backend, TorchBackend
from segsvc.inference.contract import (  # noqa: F401  (pad_to_multiple, padded_size: re-exported)
    Geometry,
    apply_contract,
    contract_logits,
    network_input,
    pad_to_multiple,
    padded_size,
)
from segsvc.models.artifact import Manifest


def labels_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned dtype that holds labels ``0 .. num_classes - 1`` (``ModelSpec`` caps the count
    at ``MAX_NUM_CLASSES``, what uint16 holds)."""
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.uint16)


class Predictor:
    """A backend and its manifest: prediction on arbitrary image sizes.

    Args:
        backend: what runs the network (``segsvc.inference.backends``); a plain
            ``nn.Module`` is run eagerly in float32 (``TorchBackend``).
        manifest: the artifact's manifest (input normalisation, inference contract, classes).
        device: where a plain module runs (a backend knows its own).

    Raises:
        ArtifactError: the manifest's stride or minimum size does not fit the model.

    Example:
        >>> model, manifest = load_artifact("repo/membrane/1")  # doctest: +SKIP
        >>> labels = Predictor(model, manifest).predict(image)  # HxW uint8  # doctest: +SKIP
    """

    def __init__(self, backend: Backend | nn.Module, manifest: Manifest, device: str | torch.device = "cpu") -> None:
        if isinstance(backend, nn.Module):
            backend = TorchBackend.for_manifest(backend, manifest, torch.device(device))
        self.backend = backend
        self.device = backend.device
        self.manifest = manifest
        self.geometry = backend.geometry
        self.stride, self.min_size = self.geometry.stride, self.geometry.min_size

    @property
    def num_classes(self) -> int:
        return self.manifest.spec.num_classes

    @property
    def inference(self) -> InferenceSpec:
        """The manifest's inference contract (scale, padding, default tiling and TTA)."""
        return self.manifest.inference

    def input_tensor(self, image: np.ndarray) -> torch.Tensor:
        """The normalised ``C x H' x W'`` network input of a uint8 image (resized by the contract's scale)."""
        return network_input(image, self.manifest.input, self.inference)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K, H, W]`` for a normalised batch of any H, W (the network's own scale)."""
        return self.backend.forward(batch)

    @torch.inference_mode()
    def image_logits(self, image: np.ndarray, spec: InferenceSpec | None = None) -> torch.Tensor:
        """Logits ``[1, K, H, W]`` of one uint8 image at its own size, run as ``spec`` (default: the manifest's)."""
        return apply_contract(self.backend.forward, image, self.manifest.input, spec or self.inference, self.geometry)

    def predict_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Label maps for images of possibly different sizes (same-size images share a forward pass)."""
        out: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        tensors = [self.input_tensor(im) for im in images]
        spec = self.inference
        for i, t in enumerate(tensors):
            groups.setdefault(tuple(t.shape[-2:]), []).append(i)
        dtype = labels_dtype(self.num_classes)
        with torch.inference_mode():
            for indices in groups.values():
                logits = contract_logits(self.backend.forward, [tensors[i] for i in indices],
                                         [images[i].shape[:2] for i in indices], spec, self.geometry)
                for i, lab in zip(indices, logits):
                    out[i] = class_argmax(lab)[0].cpu().numpy().astype(dtype)
        return out  # type: ignore[return-value]

    def predict(self, image: np.ndarray) -> np.ndarray:
        """The ``H x W`` label map of one uint8 image."""
        return self.predict_batch([image])[0]
