"""How many channels a folder's images have, read from their headers: grey (1) or colour (3).

A folder described without a ``dataset.yaml`` (``spec.spec_from_folder``) says nothing about its
images, and the spec's default, 3, made a folder of grey microscopy slices an RGB dataset: a
grey model could not be fine-tuned on it, and a new model was built for three channels with
ImageNet statistics. The images know: their headers say grey or colour, read here without
decoding a pixel (Pillow opens lazily), so a folder of large or hostile images costs a few
hundred bytes a file.

Grey is what ``io.read_image`` reads as grey or as equal channels: luminance, with or without
alpha, 8 or 16 bits (Pillow's modes ``1``, ``L``, ``LA``, ``I;16``...). Everything else is colour:
RGB, RGBA, palette (OpenCV decodes it to BGR), CMYK.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable

from segsvc.data.io import IMAGE_SUFFIXES
from segsvc.datasets.content import is_excluded
from segsvc.errors import DatasetError

GREY, COLOUR = 1, 3


def image_channels(path: Path) -> int | None:
    """``GREY`` or ``COLOUR`` from the image's header; None when it cannot be read (``check`` reports that)."""
    from PIL import Image, ImageMode  # Pillow ships with torchvision; imported where it is used, as in io.py

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel limit is checked elsewhere
            with Image.open(path) as image:
                mode = image.mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return GREY if ImageMode.getmode(mode).basemode == "L" else COLOUR


def folder_channels(root: Path, image_folders: Iterable[str]) -> int:
    """The channels of the images directly in ``image_folders`` (relative to ``root``), as the layout reads them.

    Every image is looked at, so a folder that mixes grey and colour images is refused rather
    than described by whichever comes first. Without a readable image the answer is ``COLOUR``
    (the spec's default).

    Raises:
        DatasetError: grey and colour images side by side, naming one of each (relative to ``root``).
    """
    first: dict[int, str] = {}
    real_root = root.resolve()
    for rel in sorted(set(image_folders)):
        folder = root / rel
        if not folder.is_dir():
            continue  # the check reports a missing split folder
        try:
            paths = sorted(folder.iterdir())
        except OSError:
            continue  # an unreadable folder: the check reports it
        for path in paths:
            name = f"{rel}/{path.name}"
            if (path.suffix.lower() not in IMAGE_SUFFIXES or is_excluded(name) or not path.is_file()
                    or (path.is_symlink() and not path.resolve().is_relative_to(real_root))):
                continue  # a symlink out of the dataset is not followed: the registry confines or refuses it
            channels = image_channels(path)
            if channels is not None:
                first.setdefault(channels, name)
            if len(first) == 2:
                raise DatasetError(
                    f"{root}: the images mix grey and colour ({first[GREY]} is grey, {first[COLOUR]} is colour): "
                    f"convert them to one kind, or write a dataset.yaml with 'channels: 1' (grey) or "
                    f"'channels: 3' (RGB), to which every image is converted on reading")
    return GREY if GREY in first else COLOUR
