"""``python -m training`` under torchrun, with validation checking that every rank scores the same model.

``test_ddp`` runs this instead of ``-m training``: before each validation the
patched ``evaluate`` compares this rank's buffers (batch-norm running statistics)
and parameters of the scored model with rank 0's and fails on every rank if one differs.
"""

from __future__ import annotations

import runpy
from typing import Any

import torch
import torch.distributed as dist

import training.train as train

_evaluate = train.evaluate


def _differs_from_rank0(tensor: torch.Tensor) -> bool:
    main = tensor.detach().clone()
    dist.broadcast(main, src=0)
    return not torch.equal(main, tensor)


def checked_evaluate(backend: Any, *args: Any, **kwargs: Any) -> Any:
    if dist.is_available() and dist.is_initialized():
        named = [*backend.model.named_buffers(), *backend.model.named_parameters()]
        differing = [name for name, t in named if _differs_from_rank0(t)]
        flag = torch.tensor([float(bool(differing))])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank fails together: none waits in a collective
        if flag.item():
            raise AssertionError(f"rank {dist.get_rank()} validates a model other than rank 0's: {differing[:5]}")
    return _evaluate(backend, *args, **kwargs)


train.evaluate = checked_evaluate
runpy.run_module("training", run_name="__main__", alter_sys=True)
