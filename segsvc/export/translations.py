"""ONNX translations of max-pooling with indices and max-unpooling that ONNX Runtime runs fast.

``torch.onnx``'s own translations (onnxscript's torchlib) are correct but slow on
ONNX Runtime's CPU provider for the SegNet pair ``MaxPool2d(return_indices=True)``
-> ``MaxUnpool2d``:

- ONNX ``MaxPool`` numbers its indices over the whole ``N x C x H x W`` tensor;
  PyTorch's count within each ``H x W`` plane. torchlib converts them by running
  a second ``MaxPool`` with indices, kernel 1, over the whole full-size input,
  only to read each plane's first index off it.
- torchlib has no ``max_unpool2d``; ``torch.export`` decomposes it into index
  arithmetic and a ``ScatterND`` over every element.

Here the plane index is the ONNX index modulo ``H x W`` (one ``Mod`` on the
quarter-size indices), and unpooling adds each plane's offset back and runs
ONNX ``MaxUnpool`` with the output shape given. The logits are identical, and
ONNX Runtime runs SegNet 1.12-1.22x faster on 2 CPU cores
(``bench/bench_unpool_export.py``).

``MaxUnpool``'s ``kernel_shape`` and ``strides`` only size the output when no
``output_shape`` is given; ``aten.max_unpool2d`` always gives one (it carries no
kernel), so the attributes below do not change the result for other factors.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from onnxscript import opset18 as op


def _pair(values: Sequence[int]) -> list[int]:
    return list(values) * 2 if len(values) == 1 else list(values)


def _int_list(values: Sequence[object]) -> object:
    """A 1-D INT64 tensor of ``values``: Python ints and the exporter's symbolic scalars."""
    one = op.Constant(value_ints=[1])
    return op.Concat(*[op.Constant(value_ints=[v]) if isinstance(v, int) else op.Reshape(v, one) for v in values],
                     axis=0)


def max_pool2d_with_indices(self, kernel_size: Sequence[int], stride: Sequence[int] = (),  # type: ignore[no-untyped-def]
                            padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1),
                            ceil_mode: bool = False):
    """``aten.max_pool2d_with_indices`` of an ``[N, C, H, W]`` tensor, indices within each plane."""
    kernel = _pair(kernel_size)
    pads = _pair(padding)
    values, indices = op.MaxPool(self, ceil_mode=int(ceil_mode), dilations=_pair(dilation), kernel_shape=kernel,
                                 pads=pads + pads, strides=_pair(stride) if stride else kernel)
    plane = op.ReduceProd(op.Shape(self, start=2), keepdims=1)  # H * W of the input
    return values, op.Mod(indices, plane)


def max_unpool2d(self, indices, output_size: Sequence[object]):  # type: ignore[no-untyped-def]
    """``aten.max_unpool2d``: ``self[n, c, i]`` goes to position ``indices[n, c, i]`` of an
    ``output_size`` plane, zeros elsewhere."""
    size = _int_list(output_size)
    planes = op.Shape(self, start=0, end=2)  # N, C
    offsets = op.Mul(op.Range(op.Constant(value_int=0), op.ReduceProd(planes, keepdims=0), op.Constant(value_int=1)),
                     op.ReduceProd(size, keepdims=0))
    offsets = op.Reshape(offsets, op.Concat(planes, op.Constant(value_ints=[1, 1]), axis=0))
    return op.MaxUnpool(self, op.Add(indices, offsets), op.Concat(planes, size, axis=0),
                        kernel_shape=[2, 2], strides=[2, 2])


TRANSLATIONS: dict[object, Callable[..., object]] = {
    torch.ops.aten.max_pool2d_with_indices.default: max_pool2d_with_indices,
    torch.ops.aten.max_unpool2d.default: max_unpool2d,
}
