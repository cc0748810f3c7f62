"""The one evaluation/inference preprocessing: uint8 image in, normalised tensor out.

``preprocess`` is called by the evaluation loop, the predictor and the gRPC
server, so a model sees exactly the same input at serving time as when it was
measured. It lives apart from the augmentation presets (``transforms.py``) so
that serving needs neither albumentations nor anything else training-only;
``segsvc.data.transforms`` re-exports it for the training side.
"""

from __future__ import annotations

import numpy as np
import torch

from segsvc.config import InputSpec
from segsvc.errors import InvalidImage


def as_hwc(image: np.ndarray, channels: int) -> np.ndarray:
    """Return a uint8 ``H x W x channels`` view of ``image``, converting grey<->RGB if needed.

    RGBA drops alpha; grayscale is repeated to three channels for RGB models and
    RGB is converted to luminance for single-channel models.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise InvalidImage(f"images must be uint8 numpy arrays, got {getattr(image, 'dtype', type(image))}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise InvalidImage(f"images must be HxW or HxWxC, got shape {image.shape}")
    h, w, c = image.shape
    if h == 0 or w == 0:
        raise InvalidImage(f"image is empty (shape {image.shape})")
    if c == 4:
        image, c = image[:, :, :3], 3
    if c == channels:
        return image
    if c == 1 and channels == 3:
        return np.repeat(image, 3, axis=2)
    if c == 3 and channels == 1:
        grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)[:, :, None]
    raise InvalidImage(f"image has {c} channels but the model expects {channels}")


def preprocess(image: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """Turn a uint8 ``H x W [x C]`` RGB/grey image into a normalised float ``C x H x W`` tensor."""
    hwc = as_hwc(image, spec.channels)
    x = torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(mean).div_(std)
