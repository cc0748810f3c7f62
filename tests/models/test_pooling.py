"""MaxPool2x2: nn.MaxPool2d(2, 2)'s results, by strided maxima in CPU inference and by ATen everywhere else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segsvc.models.pooling as pooling
from segsvc.config import ModelSpec
from segsvc.models import build_model
from segsvc.models.pooling import MaxPool2x2


@pytest.fixture
def fast_calls(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes the strided path pooled."""
    calls: list[tuple[int, ...]] = []
    real = pooling.max_pool2x2
    monkeypatch.setattr(pooling, "max_pool2x2", lambda x: calls.append(tuple(x.shape)) or real(x))
    return calls


@pytest.mark.parametrize("shape, channels_last", [((1, 1, 4, 4), False), ((2, 3, 33, 47), False), ((3, 16, 64, 2), False),
                                                   ((5, 3, 9), False), ((2, 3, 33, 47), True), ((3, 16, 64, 2), True)])
def test_the_same_values_as_aten_odd_sizes_nans_and_infinities_included(shape, channels_last, fast_calls) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x.view(-1)[:: 7] = float("nan")
    x.view(-1)[3:: 11] = float("-inf")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        got = MaxPool2x2()(x)
    assert fast_calls == [shape]
    assert torch.equal(got.nan_to_num(5.0), F.max_pool2d(x, 2).nan_to_num(5.0))
    assert torch.equal(got.isnan(), F.max_pool2d(x, 2).isnan())


def test_a_map_too_small_to_pool_is_refused_as_aten_refuses_it(fast_calls) -> None:
    with torch.no_grad(), pytest.raises(RuntimeError, match="Output size is too small"):
        MaxPool2x2()(torch.zeros(1, 5, 1, 9))
    assert fast_calls == []


def test_the_lectures_example_pools_as_max_pooling_does(fast_calls) -> None:
    x = torch.tensor([[1, 2, 6, 3], [3, 5, 2, 1], [1, 2, 2, 1], [7, 3, 4, 8]], dtype=torch.float32)[None, None]
    assert MaxPool2x2()(x)[0, 0].tolist() == [[5, 6], [7, 8]]
    assert fast_calls == [(1, 1, 4, 4)]


def test_training_keeps_atens_gradient_which_goes_to_one_element_of_a_tie(fast_calls) -> None:
    """ReLU's zeros tie in a window: ATen gives the whole gradient to one of them; torch.maximum would split it."""
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)
    MaxPool2x2()(x).sum().backward()
    reference = torch.zeros(1, 1, 4, 4, requires_grad=True)
    nn.MaxPool2d(2, 2)(reference).sum().backward()
    assert torch.equal(x.grad, reference.grad)
    assert x.grad.sum() == 4 and x.grad.max() == 1
    assert fast_calls == []


def test_indices_are_atens(fast_calls) -> None:
    x = torch.randn(1, 2, 6, 6)
    with torch.no_grad():
        values, indices = MaxPool2x2(return_indices=True)(x)
        expected = nn.MaxPool2d(2, 2, return_indices=True)(x)
    assert torch.equal(values, expected[0]) and torch.equal(indices, expected[1])
    assert fast_calls == []


@pytest.mark.parametrize("arch, params", [("unet", {"base_channels": 4, "depth": 3}),
                                          ("fcn8s", {"base_channels": 4, "fc_channels": 16})])
def test_models_in_evaluation_pool_by_strided_maxima_with_unchanged_logits(arch, params, fast_calls) -> None:
    model = build_model(ModelSpec(arch, 3, params=params)).eval()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(x)
    assert fast_calls, f"{arch} did not use the strided path"
    slow = [m for m in model.modules() if isinstance(m, MaxPool2x2)]
    for module in slow:
        module.forward = nn.MaxPool2d.forward.__get__(module)  # ATen's kernel, as before
    with torch.no_grad():
        assert torch.equal(model(x), got)


def test_an_onnx_export_keeps_the_maxpool_node(fast_calls) -> None:
    """ONNX Runtime runs one MaxPool node well; the exported graph must not be the strided maxima."""
    pytest.importorskip("onnxscript")
    from segsvc.export.onnx import to_onnx

    model = build_model(ModelSpec("unet", 3, params={"base_channels": 4, "depth": 2}))
    proto = to_onnx(model, 3, 4, 4)
    ops = {node.op_type for node in proto.graph.node}
    assert "MaxPool" in ops and "Max" not in ops, sorted(ops)
    assert fast_calls == []
