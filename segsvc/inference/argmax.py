"""The per-pixel class of a logits tensor, fast on CPU.

``Tensor.argmax(dim=1)`` on ``[N, K, H, W]`` logits reduces over a
non-innermost dimension, which PyTorch's CPU kernel does ~25x slower than
``Tensor.max(dim=1)`` (measured with torch 2.14: 13.8 ms against 0.49 ms for
5 x 256 x 256 logits, 2 threads). Both return the index of the first maximum,
so the labels are identical; ``bench/bench_argmax.py`` measures the two side by side.
"""

from __future__ import annotations

import torch


def class_argmax(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Indices of the largest logit along ``dim`` (the first one on ties), as int64.

    Example:
        >>> class_argmax(torch.tensor([[[[0.1]], [[0.9]], [[0.9]]]])).tolist()
        [[[1]]]
    """
    return logits.max(dim).indices
