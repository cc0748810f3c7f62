"""A synthetic segmentation task: shapes on textured backgrounds with exact labels.

It exists so the demo and the fast tests need no files, yet still exercise a
real learning problem: each shape kind is a class, shapes take random vivid
colours and light textures, backgrounds are muted noise, gradients or stripes,
and shapes may occlude each other. Telling shape from background is quick to
learn; telling a circle from a ring or a triangle takes the network a few
hundred steps. Measured with a U-Net (depth 3, 8 base channels, 1 CPU thread,
batches of 16, AdamW 4e-3, CE + 0.5 Dice): at 96x96, mIoU 0.34 after 60 s and
0.50 after 180 s; at 64x64, 0.41 after 60 s.

Every pixel's label is the class of the last shape painted on it, computed
from the same raster that paints the image (no anti-aliasing), so labels are
exact. A sample depends only on ``(seed, index)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import cv2
import numpy as np
import yaml

from segsvc.data.io import write_png
from segsvc.data.spec import DatasetSpec, SplitSpec, load_dataset_spec
from segsvc.errors import AlreadyExists, DatasetError

BACKGROUND = "background"
SHAPES = ("circle", "rectangle", "triangle", "ring")
MIN_CONTRAST = 80.0  # Euclidean RGB distance between a shape's colour and what it covers
MAX_SIDE = 4096  # pixels on a side: a sample's float textures take 12 bytes per pixel each
MAX_SHAPES = 64  # shapes per image: each costs a full-size texture


@dataclass(frozen=True)
class SyntheticConfig:
    """What to draw.

    Args:
        size_hw: image height and width in pixels.
        shapes: the shape kinds, in class order: shape ``shapes[i]`` is class ``i + 1``
            (class 0 is the background). A subset of ``SHAPES``.
        min_shapes, max_shapes: how many shapes per image (uniform).
        pixel_noise: the largest standard deviation of the per-pixel noise added
            last (each image draws its own in ``[0, pixel_noise]``).
        shape_texture: how strongly shapes are textured relative to backgrounds
            (1 = as much; lower makes the task easier to learn quickly).

    Example:
        >>> image, mask = generate_sample(0, 0, SyntheticConfig(size_hw=(64, 64)))
        >>> image.shape, mask.shape, int(mask.max()) <= 4
        ((64, 64, 3), (64, 64), True)
    """

    size_hw: tuple[int, int] = (96, 96)
    shapes: tuple[str, ...] = SHAPES
    min_shapes: int = 1
    max_shapes: int = 4
    pixel_noise: float = 8.0
    shape_texture: float = 0.4

    def __post_init__(self) -> None:
        h, w = self.size_hw
        if min(h, w) < 32 or max(h, w) > MAX_SIDE:
            raise DatasetError(f"synthetic images need at least 32x32 pixels and at most {MAX_SIDE} on a side, "
                               f"got {h}x{w}")
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown or not self.shapes or len(set(self.shapes)) != len(self.shapes):
            raise DatasetError(f"synthetic shapes must be distinct names from {SHAPES}, got {self.shapes}")
        if not 1 <= self.min_shapes <= self.max_shapes <= MAX_SHAPES:
            raise DatasetError(f"need 1 <= min_shapes <= max_shapes <= {MAX_SHAPES}, got {self.min_shapes}, "
                               f"{self.max_shapes}")
        if not 0 <= self.pixel_noise < float("inf"):
            raise DatasetError(f"pixel_noise must be a non-negative number, got {self.pixel_noise}")
        if not 0 <= self.shape_texture < float("inf"):
            raise DatasetError(f"shape_texture must be a non-negative number, got {self.shape_texture}")

    @property
    def class_names(self) -> tuple[str, ...]:
        return (BACKGROUND, *self.shapes)

    @classmethod
    def from_spec(cls, spec: DatasetSpec) -> "SyntheticConfig":
        """Classes come from the spec's class names; size and counts from its options."""
        if not spec.class_names or spec.class_names[0] != BACKGROUND:
            raise DatasetError(f"{spec.source or spec.name}: synthetic class 0 must be {BACKGROUND!r}")
        where = spec.source or spec.name
        options: Mapping[str, Any] = spec.options
        size = options.get("size", cls.size_hw)
        if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_int(v) for v in size):
            raise DatasetError(f"{where}: options.size must be [height, width] integers, got {size!r}")
        try:
            return cls(
                size_hw=(int(size[0]), int(size[1])),
                shapes=tuple(spec.class_names[1:]),
                min_shapes=_option(options, "min_shapes", cls.min_shapes),
                max_shapes=_option(options, "max_shapes", cls.max_shapes),
                pixel_noise=_option(options, "pixel_noise", cls.pixel_noise),
                shape_texture=_option(options, "shape_texture", cls.shape_texture),
            )
        except DatasetError as exc:
            raise DatasetError(f"{where}: {exc}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _option(options: Mapping[str, Any], key: str, default: Any) -> Any:
    """``options[key]``, of ``default``'s type (an int where an int is meant, any real number for a float)."""
    value = options.get(key, default)
    if isinstance(default, int) and not _is_int(value):
        raise DatasetError(f"options.{key} must be an integer, got {value!r}")
    if isinstance(default, float) and not (_is_int(value) or isinstance(value, float)):
        raise DatasetError(f"options.{key} must be a number, got {value!r}")
    return value


# -- textures: each returns a float32 H x W x 3 image around ``base``; ``strength`` scales the variation --
def _hsv_colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> np.ndarray:
    """An RGB colour of any hue with saturation and value drawn from the given ranges (0..1)."""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(*saturation) * 255, rng.uniform(*value) * 255]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _background_colour(rng: np.random.Generator) -> np.ndarray:
    """Muted: greyish, mid-dark. Shapes are vivid, so a shape stands out from what it covers."""
    return _hsv_colour(rng, saturation=(0.0, 0.45), value=(0.15, 0.75))


def _shape_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv_colour(rng, saturation=(0.55, 1.0), value=(0.55, 1.0))


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return ys, xs


def _noise_texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray, strength: float) -> np.ndarray:
    """Flat colour plus coarse (blurred) and fine noise."""
    coarse = cv2.resize(rng.normal(0, 1, (max(h // 8, 2), max(w // 8, 2), 3)).astype(np.float32), (w, h))
    fine = rng.normal(0, 1, (h, w, 3)).astype(np.float32)
    return base + strength * (coarse * rng.uniform(5, 30) + fine * rng.uniform(2, 15))


def _gradient_texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray, strength: float) -> np.ndarray:
    """A linear ramp from ``base`` to another colour at a random angle."""
    ys, xs = _grid(h, w)
    angle = rng.uniform(0, 2 * np.pi)
    t = xs * np.cos(angle) + ys * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    other = base + strength * rng.uniform(-70, 70, size=3).astype(np.float32)
    return base + t[:, :, None] * (other - base)


def _stripe_texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray, strength: float) -> np.ndarray:
    """Soft stripes of ``base`` and a second colour, random period and angle."""
    ys, xs = _grid(h, w)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(4, 16)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period)
    other = base + strength * rng.uniform(-60, 60, size=3).astype(np.float32)
    return base + wave[:, :, None] * (other - base)


TEXTURES: dict[str, Callable[[np.random.Generator, int, int, np.ndarray, float], np.ndarray]] = {
    "noise": _noise_texture,
    "gradient": _gradient_texture,
    "stripes": _stripe_texture,
}


def _texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray, strength: float = 1.0) -> np.ndarray:
    kind = list(TEXTURES)[int(rng.integers(len(TEXTURES)))]
    return TEXTURES[kind](rng, h, w, base, strength)


# -- shapes: each returns a boolean H x W raster --------------------------------------------
def _disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    canvas = np.zeros((h, w), np.uint8)
    cv2.circle(canvas, (round(cx), round(cy)), max(round(r), 1), 1, thickness=-1, lineType=cv2.LINE_8)
    return canvas.astype(bool)


def _polygon(h: int, w: int, points: np.ndarray) -> np.ndarray:
    canvas = np.zeros((h, w), np.uint8)
    cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1, lineType=cv2.LINE_8)
    return canvas.astype(bool)


def _draw_shape(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    side = min(h, w)
    cx, cy = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)
    if kind == "circle":
        return _disc(h, w, cx, cy, rng.uniform(0.1, 0.22) * side)
    if kind == "ring":
        outer = rng.uniform(0.15, 0.28) * side
        inner = outer * rng.uniform(0.45, 0.7)
        return _disc(h, w, cx, cy, outer) & ~_disc(h, w, cx, cy, inner)
    if kind == "rectangle":
        box = ((cx, cy), (rng.uniform(0.2, 0.45) * side, rng.uniform(0.2, 0.45) * side), rng.uniform(0, 90))
        return _polygon(h, w, cv2.boxPoints(box))
    if kind == "triangle":
        radius = rng.uniform(0.15, 0.3) * side
        angles = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.35, 0.35, 3)
        return _polygon(h, w, np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1))
    raise DatasetError(f"unknown synthetic shape {kind!r}; valid: {', '.join(SHAPES)}")


def _contrasting_colour(rng: np.random.Generator, against: np.ndarray) -> np.ndarray:
    """A colour far enough from ``against`` that the shape is visible (a few tries)."""
    colour = _shape_colour(rng)
    for _ in range(20):
        if float(np.linalg.norm(colour - against)) >= MIN_CONTRAST:
            break
        colour = _shape_colour(rng)
    return colour


def generate_sample(
    seed: int, index: int, config: SyntheticConfig = SyntheticConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """The sample ``index`` of the stream ``seed``: (uint8 RGB H x W x 3, uint8 labels H x W).

    The same ``(seed, index, config)`` gives the same arrays on every machine
    (numpy's PCG64 seeded from both numbers, OpenCV rasterisation without
    anti-aliasing).
    """
    if seed < 0 or index < 0:
        raise DatasetError(f"synthetic seed and index must be non-negative, got seed={seed}, index={index}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    h, w = config.size_hw
    background_colour = _background_colour(rng)
    image = _texture(rng, h, w, background_colour)
    labels = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(config.min_shapes, config.max_shapes + 1))):
        cls = int(rng.integers(len(config.shapes)))
        region = _draw_shape(rng, config.shapes[cls], h, w)
        # contrast with what the shape covers (background or earlier shapes)
        covered = image[region].mean(axis=0) if region.any() else background_colour
        fill = _texture(rng, h, w, _contrasting_colour(rng, covered), config.shape_texture)
        image[region] = fill[region]
        labels[region] = cls + 1
    image += rng.normal(0, rng.uniform(0, config.pixel_noise), image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels


def synthetic_spec(config: SyntheticConfig = SyntheticConfig()) -> DatasetSpec:
    """The built-in ``synthetic`` description, adapted to ``config``'s size and shapes."""
    base = load_dataset_spec("synthetic")
    palette = dict(zip(base.class_names, base.palette))
    return DatasetSpec(
        name=base.name,
        format="synthetic",
        root=base.root,
        class_names=config.class_names,
        palette=tuple(palette[c] for c in config.class_names),
        ignore_index=base.ignore_index,
        splits=base.splits,
        channels=base.channels,
        options={**base.options, "size": list(config.size_hw), "min_shapes": config.min_shapes,
                 "max_shapes": config.max_shapes, "pixel_noise": config.pixel_noise,
                 "shape_texture": config.shape_texture},
    )  # fmt: skip


def write_synthetic_dataset(
    out_dir: str | Path,
    count: int,
    config: SyntheticConfig = SyntheticConfig(),
    seed: int = 0,
    val_fraction: float = 0.2,
    progress: Callable[[range], Any] = iter,
) -> Path:
    """Write ``count`` samples as a generic folder dataset plus its ``dataset.yaml``; return the YAML path.

    Layout: ``images/{train,val}/NNNNNN.png`` (RGB), ``masks/{train,val}/NNNNNN.png``
    (class ids). Sample ``i`` is ``generate_sample(seed, i)``; the last
    ``val_fraction`` of them form ``val``. An existing non-empty folder is never
    written into (``AlreadyExists``).
    """
    out = Path(out_dir)
    if count < 2 or not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"need count >= 2 and 0 < val_fraction < 1, got {count} and {val_fraction}")
    if out.exists() and any(out.iterdir()):
        raise AlreadyExists(f"{out}: folder exists and is not empty; choose a new folder")
    n_val = min(max(1, round(count * val_fraction)), count - 1)
    for i in progress(range(count)):
        split = "train" if i < count - n_val else "val"
        image, labels = generate_sample(seed, i, config)
        write_png(out / "images" / split / f"{i:06d}.png", image)
        write_png(out / "masks" / split / f"{i:06d}.png", labels)
    spec = synthetic_spec(config)
    folder_spec = DatasetSpec(
        name=f"synthetic-{seed}",
        format="folder",
        root=Path("."),
        class_names=spec.class_names,
        palette=spec.palette,
        ignore_index=spec.ignore_index,
        splits={s: SplitSpec(images=f"images/{s}", masks=f"masks/{s}") for s in ("train", "val")},
        options={"generator": {"seed": seed, "count": count, "size": list(config.size_hw)}},
    )
    yaml_path = out / "dataset.yaml"
    yaml_path.write_text(
        "# Written by `segsvc data synth`: shapes on textured backgrounds (segsvc/data/synthetic.py).\n"
        + yaml.safe_dump(folder_spec.to_dict(), sort_keys=False, default_flow_style=None)
    )
    return yaml_path
