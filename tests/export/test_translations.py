"""segsvc's ONNX translations of max-pooling with indices and max-unpooling: ONNX Runtime gives eager's values."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segsvc.config import ModelSpec
from segsvc.export.onnx import to_onnx
from segsvc.models.registry import build_model
from tests.export.conftest import TINY, calibrated


class PoolConvUnpool(nn.Module):
    """A SegNet step at any kernel: pool with indices, a convolution, unpool to the pre-pool size."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled, indices = F.max_pool2d(x, self.kernel, self.kernel, return_indices=True)
        return F.max_unpool2d(self.conv(pooled), indices, self.kernel, self.kernel, output_size=x.shape[-2:])


def _ort(proto) -> ort.InferenceSession:  # type: ignore[no-untyped-def]
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _ops(proto) -> set[str]:  # type: ignore[no-untyped-def]
    return {node.op_type for node in proto.graph.node}


@pytest.mark.parametrize("kernel", [2, 4])
def test_pool_and_unpool_match_eager_at_sizes_the_pool_does_not_divide(kernel: int) -> None:
    torch.manual_seed(0)
    model = PoolConvUnpool(kernel).eval()
    proto = to_onnx(model, 3, stride=1, min_size=kernel * 2)
    session = _ort(proto)
    for shape in [(1, 3, 8, 12), (3, 3, 13, 10), (2, 3, 4 * kernel + 3, 5 * kernel + 1)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == expected.shape
        np.testing.assert_array_equal(got == 0, expected == 0)  # every value lands where eager puts it
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_ties_keep_the_first_maximum_as_eager_does() -> None:
    """Blocks of equal values (ReLU's zeros, saturated pixels): one position each, the same one as eager's."""
    model = PoolConvUnpool(2).eval()
    with torch.no_grad():
        model.conv.weight.zero_()
        model.conv.bias.fill_(1.0)  # every unpooled value is 1: the output is the map of chosen positions
    x = torch.zeros(2, 3, 6, 8)
    x[:, :, :2, :2] = 5.0
    x[1, 1, 2:4, 2:4] = torch.tensor([[1.0, 7.0], [7.0, 1.0]])
    session = _ort(to_onnx(model, 3, stride=1, min_size=4))
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_array_equal(got, expected)
    assert expected.sum() == 2 * 3 * 3 * 4  # one position per 2x2 block


@pytest.mark.parametrize("spec", [TINY["segnet"], ModelSpec("unet", 3, 3, {"base_channels": 4, "depth": 2,
                                                                            "upsample": "max_unpool"})],
                         ids=["segnet", "unet-max-unpool"])
def test_unpooling_models_export_max_unpool_without_a_scatter_or_a_second_pool(spec: ModelSpec) -> None:
    model = calibrated(spec) if spec is TINY["segnet"] else build_model(spec).eval()
    proto = to_onnx(model, 3, model.output_stride, getattr(model, "min_input_size", 1))
    pools = [node for node in proto.graph.node if node.op_type == "MaxPool"]
    unpools = [node for node in proto.graph.node if node.op_type == "MaxUnpool"]
    assert len(unpools) >= 1 and len(pools) == len(unpools)  # one MaxPool per pooling: no full-size index pass
    assert "ScatterND" not in _ops(proto)
    session = _ort(proto)
    x = torch.randn(2, 3, model.output_stride * 3, model.output_stride * 5)
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
