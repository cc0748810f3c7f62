"""ONNX Runtime against eager PyTorch: the check an export must pass before it is published.

Both run the same random normalised inputs, at padded sizes that differ from
the size the graph was traced at (``sample_size``), with batch > 1 and
non-square among them: an exporter that fixed a size to the traced one shows up
here, as a failed run or as different logits. The verdict is the label
agreement (argmax over classes) and the max |logit difference|.

Example:
    >>> check_sizes(stride=32, min_size=1, checks=4)
    [(1, 64, 96), (2, 128, 128), (3, 160, 96), (1, 128, 224)]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from segsvc.errors import ArtifactError, ExportError, InvalidArgument
from segsvc.export import DEFAULT_CHECKS, DEFAULT_TOLERANCE, MIN_AGREEMENT
from segsvc.inference.backends import EngineConfig, OnnxRuntimeBackend, TorchBackend
from segsvc.inference.contract import Geometry

_SAMPLE_STEPS = (4, 2)  # the traced sample is (4, 2) strides above the smallest size; no check is
MIN_CHECK_SIZE = 64  # smaller inputs than this say little about a network meant for images

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Validation:
    """ONNX Runtime against eager PyTorch on ``checks`` random normalised inputs.

    Args:
        sizes: ``(N, H, W)`` of each check input.
        pixels: labelled pixels compared (sum of N * H * W).
        max_abs_diff: the largest |logit difference| over every check.
        max_abs_logit: the largest |logit| of the eager model (the scale of ``tolerance``).
        agreement: share of pixels whose argmax label is the same.
        tolerance: allowed ``max_abs_diff / max(1, max_abs_logit)``.
        min_agreement: the agreement an export needs.
        error: why ONNX Runtime could not run a check (then nothing else is meaningful).
    """

    sizes: tuple[tuple[int, int, int], ...]
    pixels: int
    max_abs_diff: float
    max_abs_logit: float
    agreement: float
    tolerance: float = DEFAULT_TOLERANCE
    min_agreement: float = MIN_AGREEMENT
    error: str = ""

    @property
    def passed(self) -> bool:
        # an infinite logit makes the bound infinite, and an infinite difference "within" it: never a pass
        return (not self.error and self.agreement >= self.min_agreement
                and math.isfinite(self.max_abs_diff) and math.isfinite(self.max_abs_logit)
                and self.max_abs_diff <= self.tolerance * max(1.0, self.max_abs_logit))

    def describe(self) -> str:
        if self.error:
            return f"ONNX Runtime failed: {self.error}"
        need = f"{self.min_agreement * 100:g}%"  # 0.9999: 99.99%, not a rounded 100.0%
        return (f"labels agree on {self.agreement:.4%} of {self.pixels} pixels (need {need}), "
                f"max |logit difference| {self.max_abs_diff:.3g} (allowed {self.tolerance:.3g} x "
                f"max(1, max |logit| {self.max_abs_logit:.3g}))")

    def to_dict(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"checks": len(self.sizes), "sizes": [list(s) for s in self.sizes], "pixels": self.pixels,
                "max_abs_diff": self.max_abs_diff, "max_abs_logit": self.max_abs_logit,
                "agreement": self.agreement, "tolerance": self.tolerance, "min_agreement": self.min_agreement,
                "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider"}


def check_options(checks: int, tolerance: float, min_agreement: float) -> None:
    """Refuse validation options that would make the check vacuous or the record not JSON (``inf``, ``nan``).

    Raises:
        InvalidArgument: ``checks`` below 1, ``tolerance`` not a positive finite number, ``min_agreement``
            not in (0, 1].
    """
    if not checks >= 1:
        raise InvalidArgument(f"checks must be at least 1, got {checks!r}")
    if not 0 < tolerance < math.inf:  # NaN too
        raise InvalidArgument(f"tolerance must be a positive finite number, got {tolerance!r}")
    if not 0 < min_agreement <= 1:
        raise InvalidArgument(f"min_agreement must be in (0, 1], got {min_agreement!r}")


def _base(stride: int, min_size: int) -> int:
    """The smallest padded side the checks use."""
    return -(-max(stride, min_size, MIN_CHECK_SIZE) // stride) * stride


def check_sizes(stride: int, min_size: int, checks: int) -> list[tuple[int, int, int]]:
    """``(N, H, W)`` of each check: padded sizes, batch 1 to 3, square and non-square.

    None equals the export's sample size (``sample_size``), so a size the exporter
    fixed to the sample shows up as a failed check. The first check is non-square,
    wider than high (the sample is higher than wide), and of batch 1 (the sample's
    is 2), so even ``checks=1`` catches an export that took one spatial size for
    the other or fixed the batch; the second is square.
    """
    base = _base(stride, min_size)
    pattern = ((1, 0, 1), (2, 2, 2), (3, 3, 1), (1, 2, 5))
    sizes = []
    for i in range(checks):
        n, a, b = pattern[i] if i < len(pattern) else (1 + i % 3, i % 6, (2 * i + 1) % 7)
        if (a, b) == _SAMPLE_STEPS:
            b += 1
        sizes.append((n, base + a * stride, base + b * stride))
    return sizes


def sample_size(stride: int, min_size: int) -> tuple[int, int, int]:
    """``(N, H, W)`` of the input the graph is traced with: batch 2, non-square, unlike every check."""
    base = _base(stride, min_size)
    return 2, base + _SAMPLE_STEPS[0] * stride, base + _SAMPLE_STEPS[1] * stride


def one_line(exc: BaseException) -> str:
    """The one line of an exporter error that says what failed (its messages run to pages)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"## Exception summary\s+(.+?)(\(Refer to|$)", text, re.DOTALL)
    if match:  # torch.onnx's report: the summary paragraph says what failed
        text = match.group(1)
    elif text.strip():
        text = text.strip().splitlines()[0]
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= 500 else text[:497] + "..."


def validate(model: nn.Module, onnx_bytes: bytes, in_channels: int, stride: int, min_size: int,
             checks: int = DEFAULT_CHECKS, tolerance: float = DEFAULT_TOLERANCE,
             min_agreement: float = MIN_AGREEMENT, seed: int = 0, progress: Progress | None = None) -> Validation:
    """Run ONNX Runtime (CPU) and eager PyTorch on ``checks`` random normalised inputs and compare.

    Both run through their serving backend's ``forward`` (``segsvc.inference.backends``), so what is
    checked is what the server runs.

    Args:
        model: the eager model (eval mode, CPU).
        onnx_bytes: the serialized ONNX model.
        in_channels: C of the inputs.
        stride: check sizes are multiples of this.
        min_size: and at least this.
        checks: how many inputs (sizes from ``check_sizes``).
        tolerance: see ``Validation.tolerance``.
        min_agreement: see ``Validation.min_agreement``.
        seed: seed of the random inputs.
        progress: called once per check.
    """
    if checks < 1:
        raise ExportError(f"validation needs at least one check, got {checks}")
    sizes = tuple(check_sizes(stride, min_size, checks))
    empty = Validation(sizes, 0, float("inf"), 0.0, 0.0, tolerance, min_agreement)
    cpu, geometry = torch.device("cpu"), Geometry(stride, min_size)
    # the serving forward path, both sides: eager as a CPU server runs it (channels-last for a CNN)
    eager = TorchBackend(model, geometry, cpu, in_channels, channels_last=EngineConfig().channels_last)
    try:
        runtime = OnnxRuntimeBackend(onnx_bytes, geometry, cpu, in_channels)
    except ArtifactError as exc:
        return replace(empty, error=f"cannot load the graph: {exc}")
    generator = torch.Generator().manual_seed(seed)
    max_diff = max_logit = 0.0
    agree = pixels = 0
    for n, h, w in sizes:
        x = torch.randn(n, in_channels, h, w, generator=generator)
        expected = eager.forward(x).numpy()
        try:
            got = runtime.forward(x).numpy()
        except Exception as exc:  # onnxruntime raises its own exception types
            return replace(empty, error=f"at input size {n}x{in_channels}x{h}x{w}: {one_line(exc)}")
        if got.shape != expected.shape:
            return replace(empty, error=f"at input size {n}x{in_channels}x{h}x{w} it returns {list(got.shape)}, "
                                        f"the model {list(expected.shape)}")
        diff = np.abs(got.astype(np.float64) - expected)
        max_diff = max(max_diff, float(np.nanmax(diff)) if np.isfinite(diff).all() else float("inf"))
        max_logit = max(max_logit, float(np.abs(expected).max()))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
        pixels += n * h * w
        if progress is not None:
            progress(f"check {n}x{h}x{w}")
    return Validation(sizes, pixels, max_diff, max_logit, agree / pixels, tolerance, min_agreement)
