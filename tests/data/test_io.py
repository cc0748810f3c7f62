"""Image and mask I/O: channel order, grey handling, the three mask encodings, and broken files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from segsvc.data.io import read_image, read_label_file, read_mask, write_png
from segsvc.errors import DatasetError, InvalidImage, NotFound


def _png_bytes(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


def test_read_image_returns_rgb_not_bgr(tmp_path: Path) -> None:
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's channel order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    image = read_image(tmp_path / "red.png")
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [255, 0, 0]


def test_write_png_then_read_image_round_trips_rgb(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    write_png(tmp_path / "sub" / "x.png", rgb)
    assert np.array_equal(read_image(tmp_path / "sub" / "x.png"), rgb)


def test_grey_image_stays_hw_or_expands_on_request(tmp_path: Path) -> None:
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    write_png(tmp_path / "g.png", grey)
    assert read_image(tmp_path / "g.png").shape == (4, 5)
    rgb = read_image(tmp_path / "g.png", channels=3)
    assert rgb.shape == (4, 5, 3) and np.array_equal(rgb[..., 1], grey)


def test_rgb_image_converts_to_grey_on_request(tmp_path: Path) -> None:
    write_png(tmp_path / "c.png", np.full((3, 3, 3), 200, np.uint8))
    grey = read_image(tmp_path / "c.png", channels=1)
    assert grey.shape == (3, 3) and int(grey[0, 0]) == 200


def test_alpha_channel_is_dropped(tmp_path: Path) -> None:
    bgra = np.zeros((3, 3, 4), np.uint8)
    bgra[..., 0], bgra[..., 3] = 255, 128  # blue, half transparent
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    assert read_image(tmp_path / "a.png")[0, 0].tolist() == [0, 0, 255]


def test_truncated_png_is_reported_with_its_name(tmp_path: Path) -> None:
    data = _png_bytes(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImage, match=r"cut\.png: truncated PNG"):
        read_image(path)


def test_truncated_jpeg_is_reported_although_opencv_would_decode_it(tmp_path: Path) -> None:
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(InvalidImage, match=r"cut\.jpg: truncated JPEG"):
        read_image(path)


def test_garbage_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InvalidImage, match=r"junk\.png: not a decodable image"):
        read_image(tmp_path / "junk.png")
    with pytest.raises(InvalidImage, match=r"empty\.png: file is empty"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(NotFound, match=r"nope\.png: no such file"):
        read_image(tmp_path / "nope.png")


def test_read_image_rejects_bad_channel_request(tmp_path: Path) -> None:
    write_png(tmp_path / "g.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(InvalidImage, match="channels"):
        read_image(tmp_path / "g.png", channels=2)


def test_class_id_masks_keep_their_values_8_and_16_bit(tmp_path: Path) -> None:
    ids8 = np.array([[0, 11], [3, 255]], np.uint8)
    ids16 = np.array([[0, 300], [1000, 65535]], np.uint16)
    write_png(tmp_path / "m8.png", ids8)
    write_png(tmp_path / "m16.png", ids16)
    assert np.array_equal(read_mask(tmp_path / "m8.png"), ids8)
    m16 = read_mask(tmp_path / "m16.png")
    assert m16.dtype == np.uint16 and np.array_equal(m16, ids16)


def test_palette_index_png_returns_indices_not_colours(tmp_path: Path) -> None:
    ids = np.array([[0, 15], [255, 1]], np.uint8)
    palette = [(0, 0, 0), (128, 0, 0)] + [(10, 10, 10)] * 253 + [(224, 224, 192)]
    write_png(tmp_path / "voc.png", ids, palette=palette)
    with Image.open(tmp_path / "voc.png") as im:
        assert im.mode == "P"  # really a palette PNG, which OpenCV would expand to colours
    assert np.array_equal(read_mask(tmp_path / "voc.png"), ids)


def test_rgb_mask_maps_through_palette(tmp_path: Path) -> None:
    palette = [(0, 0, 0), (255, 0, 0), (0, 0, 255)]
    ids = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    write_png(tmp_path / "rgb.png", np.array(palette, np.uint8)[ids])
    assert np.array_equal(read_mask(tmp_path / "rgb.png", palette), ids)
    assert np.array_equal(read_mask(tmp_path / "rgb.png", {(255, 0, 0): 7, (0, 0, 255): 8, (0, 0, 0): 255}),
                          np.array([[255, 7, 8], [8, 7, 255]]))  # fmt: skip


def test_rgb_mask_with_unknown_colour_names_the_colour(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (9, 8, 7)
    rgb[1, 1] = (255, 0, 0)
    write_png(tmp_path / "odd.png", rgb)
    with pytest.raises(DatasetError, match=r"odd\.png: 1 mask colour\(s\) not in the palette: \(9, 8, 7\)"):
        read_mask(tmp_path / "odd.png", [(0, 0, 0), (255, 0, 0)])
    with pytest.raises(DatasetError, match="no palette"):
        read_mask(tmp_path / "odd.png")


def test_grey_mask_saved_as_rgb_is_read_as_ids(tmp_path: Path) -> None:
    ids = np.array([[0, 1], [2, 3]], np.uint8)
    write_png(tmp_path / "g3.png", np.repeat(ids[:, :, None], 3, axis=2))
    assert np.array_equal(read_label_file(tmp_path / "g3.png"), ids)


def test_rgb_encoding_keeps_grey_colours_as_colours(tmp_path: Path) -> None:
    sky_and_void = np.array([[[128, 128, 128], [0, 0, 0]]], np.uint8)  # CamVid's Sky is grey
    write_png(tmp_path / "sky.png", sky_and_void)
    assert read_label_file(tmp_path / "sky.png").tolist() == [[128, 0]]  # auto: looks like ids
    assert np.array_equal(read_label_file(tmp_path / "sky.png", "rgb"), sky_and_void)


def test_ids_encoding_rejects_colour_masks(tmp_path: Path) -> None:
    write_png(tmp_path / "c.png", np.array([[[255, 0, 0]]], np.uint8))
    with pytest.raises(DatasetError, match=r"c\.png: mask is a colour image"):
        read_label_file(tmp_path / "c.png", "ids")
    with pytest.raises(DatasetError, match="mask encoding must be one of"):
        read_label_file(tmp_path / "c.png", "palette")


def test_truncated_mask_raises_dataset_error(tmp_path: Path) -> None:
    data = _png_bytes(np.random.default_rng(3).integers(0, 5, (64, 64), dtype=np.uint8))
    (tmp_path / "m.png").write_bytes(data[:-30])
    with pytest.raises(DatasetError, match=r"m\.png: truncated PNG"):
        read_mask(tmp_path / "m.png")


def test_write_png_rejects_unsupported_arrays(tmp_path: Path) -> None:
    with pytest.raises(InvalidImage, match="uint8/uint16"):
        write_png(tmp_path / "f.png", np.zeros((2, 2), np.float32))
    with pytest.raises(InvalidImage, match="palette PNG needs a uint8 HxW"):
        write_png(tmp_path / "p.png", np.zeros((2, 2, 3), np.uint8), palette=[(0, 0, 0)])


@pytest.mark.parametrize("ext", [".png", ".tif"])
@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_images_keep_their_high_byte_as_the_server_decodes_them(tmp_path: Path, ext: str,
                                                                         channels: int) -> None:
    """Training and ``segsvc eval`` read with ``read_image``, the server with ``codec.decode_image``: a 16-bit
    RGB TIFF came out of OpenCV's own conversion rounded (0x12ff -> 0x13), one level off the served 0x12 in
    most pixels, so the served labels were not the ones eval measured."""
    rng = np.random.default_rng(1)
    deep = rng.integers(0, 1 << 16, (9, 11, 3) if channels == 3 else (9, 11), dtype=np.uint16) | 0x80  # rounds up
    assert cv2.imwrite(str(tmp_path / f"deep{ext}"), deep)  # OpenCV's order: BGR
    expected = (deep >> 8).astype(np.uint8)
    expected = expected[..., ::-1] if channels == 3 else expected
    assert np.array_equal(read_image(tmp_path / f"deep{ext}"), expected)
