import pytest
import torch

from segsvc.inference.argmax import class_argmax


@pytest.mark.parametrize("shape", [(1, 5, 64, 64), (3, 21, 37, 53), (2, 1, 8, 8)])
def test_equals_argmax(shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    assert torch.equal(class_argmax(x), x.argmax(1))


def test_first_index_on_ties():
    x = torch.randint(0, 3, (4, 6, 32, 32)).float()  # many ties
    assert torch.equal(class_argmax(x), x.argmax(1))
    tie = torch.zeros(1, 4, 2, 2)
    assert class_argmax(tie).unique().tolist() == [0]


def test_non_contiguous_crop():
    x = torch.randn(2, 5, 40, 40)[:, :, :33, 5:]
    assert torch.equal(class_argmax(x), x.argmax(1))
