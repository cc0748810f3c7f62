"""2x2 max pooling whose inference pass on the CPU is the maximum of four strided views.

ATen's CPU kernel for ``max_pool2d`` computes the argmax of every window even when
the caller drops it (``max_pool2d`` is ``max_pool2d_with_indices`` on the CPU): on a
U-Net's or VGG's feature maps it took 2-10x as long as two element-wise maxima
over the even and odd rows, then columns, which give the same values, NaNs
included (``bench/bench_pool.py``). ``MaxPool2x2`` is ``nn.MaxPool2d(2, 2)`` (no
weights: the same ``state_dict``) that takes that path when nothing needs ATen's:

* the input is on the CPU and needs no gradient (evaluation, serving): in
  training the gradient goes, as ATen's does, to one element of each window
  (``torch.maximum`` would split it between ties, as ReLU's zeros are);
* no indices are asked for (``return_indices``: max-unpooling decoders);
* the model is not being exported or compiled (``torch.onnx``, ``torch.export``,
  ``torch.jit.trace``, ``torch.compile``): they keep the one ``MaxPool`` node
  that ONNX Runtime and Inductor run well.
"""

from __future__ import annotations

import torch
from torch import nn


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2, 2, return_indices=...)``: the same results, faster in CPU inference."""

    def __init__(self, return_indices: bool = False) -> None:
        super().__init__(2, 2, return_indices=return_indices)

    def forward(self, x: torch.Tensor):  # type: ignore[override]
        if (self.return_indices or x.requires_grad or x.device.type != "cpu" or x.ndim not in (3, 4)
                or min(x.shape[-2:]) < 2 or _tracing()):
            return super().forward(x)  # ATen's, its errors included (a map too small to pool)
        return max_pool2x2(x)


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` as element-wise maxima of strided views (an odd last row or column is dropped)."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _tracing() -> bool:
    """Whether the forward pass is being recorded as a graph (export, tracing, compilation), not run."""
    return (torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch.compiler.is_exporting())
