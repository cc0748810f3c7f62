"""TIFF sample depth and format are checked from the header, before OpenCV decodes.

OpenCV decodes 32- and 64-bit and signed or float TIFF samples into arrays of
that type (up to 32 bytes a pixel) that ``decode_image`` only then refuses: a
13 kB deflate TIFF of 6000 x 6000 float64 pixels took 6 s and +2.2 GiB. The
container check refuses them first, naming what to send instead (that TIFF is
among ``test_codec``'s hostile inputs, refused in milliseconds and without a
large allocation).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from segsvc.errors import InvalidImage
from segsvc.inference.codec import decode_image, image_header
from tests.inference.test_codec import GREY, RGB, _tiff

SEND = "send 8- or 16-bit images"


def _depth(image: np.ndarray, bits: int, formats: list[int] | None = None) -> bytes:
    """``image`` (grey or RGB uint8) stored with ``bits`` per sample (its bytes reinterpreted) and SampleFormat."""
    samples = 1 if image.ndim == 2 else 3
    raw = np.resize(image.reshape(-1), image.size * bits // 8).astype(np.uint8)
    fake = raw.reshape(image.shape[0], -1)
    replace = {256: (4, [image.shape[1]]), 258: (3, [bits] * samples), 277: (3, [samples]),
               262: (3, [1 if samples == 1 else 2])}
    if formats is not None:
        replace[339] = (3, formats)
    return _tiff(fake, replace=replace)


CASES = {
    "32-bit-uint": (_depth(GREY, 32), f"TIFF has 32 bits per sample; expected one of (1, 2, 4, 8, 16): {SEND}"),
    "32-bit-float": (_depth(RGB, 32, [3, 3, 3]),
                     f"TIFF has 32 bits per sample; expected one of (1, 2, 4, 8, 16): {SEND}"),
    "64-bit-float": (_depth(GREY, 64, [3]), f"TIFF has 64 bits per sample; expected one of (1, 2, 4, 8, 16): {SEND}"),
    "16-bit-float": (_depth(GREY, 16, [3]),
                     f"TIFF samples are floating point (SampleFormat 3); {SEND} of unsigned integers"),
    "8-bit-signed": (_depth(RGB, 8, [2, 2, 2]),
                     f"TIFF samples are signed integer (SampleFormat 2); {SEND} of unsigned integers"),
    "16-bit-signed": (_depth(GREY, 16, [2]),
                      f"TIFF samples are signed integer (SampleFormat 2); {SEND} of unsigned integers"),
    "8-bit-void": (_depth(GREY, 8, [4]), f"TIFF samples are undefined (SampleFormat 4); {SEND} of unsigned integers"),
    "one-float-channel": (_depth(RGB, 8, [1, 3, 1]),
                          f"TIFF samples are floating point (SampleFormat 3); {SEND} of unsigned integers"),
    "unknown-format": (_depth(GREY, 8, [9]), f"TIFF samples are unknown (SampleFormat 9); {SEND} of unsigned integers"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_deep_signed_and_float_samples_are_refused_from_the_header(case):
    data, message = CASES[case]
    with pytest.raises(InvalidImage, match=f"^{re.escape(message)}$") as info:
        image_header(data)  # the container check alone: nothing is decoded
    assert type(info.value) is InvalidImage
    with pytest.raises(InvalidImage, match=f"^{re.escape(message)}$"):
        decode_image(data)


@pytest.mark.parametrize("image", [GREY, RGB], ids=["grey", "rgb"])
def test_unsigned_8_and_16_bit_samples_still_decode(image):
    samples = 1 if image.ndim == 2 else 3
    assert np.array_equal(decode_image(_depth(image, 8, [1] * samples)), image)
    deep = decode_image(_depth(image, 16, [1] * samples))
    assert deep.dtype == np.uint8 and deep.shape == image.shape
