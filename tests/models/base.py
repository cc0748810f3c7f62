"""The shared model tester every registered architecture inherits (as smp's tests/models/base.py)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from segsvc.config import ModelSpec
from segsvc.inference.predictor import pad_to_multiple
from segsvc.models import build_model
from segsvc.models.base import InputShapeError


class ModelTester:
    arch: ClassVar[str]
    params: ClassVar[dict[str, Any]] = {}
    num_classes: ClassVar[int] = 5
    in_channels: ClassVar[int] = 3
    # odd sizes: the padding helper must make any of them work
    sizes: ClassVar[list[tuple[int, int]]] = [(33, 47), (50, 21), (64, 64)]
    batch_size: ClassVar[int] = 2

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls) -> torch.nn.Module:
        return build_model(ModelSpec(cls.arch, cls.num_classes, cls.in_channels, cls.params))

    def test_forward_backward_any_size(self, model: torch.nn.Module) -> None:
        model.train()
        for h, w in self.sizes:
            x = torch.randn(self.batch_size, self.in_channels, h, w, requires_grad=True)
            padded, (oh, ow) = pad_to_multiple(x, model.output_stride, getattr(model, "min_input_size", 1))
            logits = model(padded)[:, :, :oh, :ow]
            assert logits.shape == (self.batch_size, self.num_classes, h, w)
            model.zero_grad()
            logits.logsumexp(1).mean().backward()
            assert x.grad is not None and x.grad.abs().sum() > 0
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            assert any(g is not None and g.abs().sum() > 0 for g in grads)

    def test_wrong_size_error_says_how_to_pad(self, model: torch.nn.Module) -> None:
        stride = model.output_stride
        if stride == 1:
            pytest.skip("model accepts any size")
        size = max(stride, getattr(model, "min_input_size", 1)) + 1
        with pytest.raises(InputShapeError, match="divisible by"):
            model.eval()(torch.zeros(1, self.in_channels, size, size))
