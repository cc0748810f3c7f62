"""Where this process stands in a run: rank, world size and device (torchrun sets the environment).

Started by ``torchrun --nproc_per_node=N``, the trainer joins a process group
(NCCL on GPU, gloo on CPU); started plainly it is rank 0 of a world of one.
Only rank 0 logs and writes files.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from segsvc.errors import InvalidArgument

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a (possibly single-process) run."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda`` for the recipe's ``train.device`` (``auto``: CUDA when there is a device), refusing one
    this machine lacks. Selects nothing: selecting a CUDA device creates a CUDA context (``setup_distributed``)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise InvalidArgument(f"train.device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("train.device=cuda but no CUDA device is available; use train.device=cpu")
    return device


def setup_distributed(device: str) -> DistEnv:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device)
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return DistEnv(rank, world_size, dev)


def log(env: DistEnv, message: str) -> None:
    if env.is_main:
        tqdm.write(message, file=sys.stderr)


def broadcast_from_main(env: DistEnv, value: T) -> T:
    """Rank 0's ``value`` on every rank (decisions that depend on a clock or a timestamp are made once)."""
    if not env.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


@torch.no_grad()
def broadcast_buffers(env: DistEnv, module: nn.Module) -> None:
    """Overwrite ``module``'s buffers (batch-norm running statistics) with rank 0's on every rank.

    DDP keeps the parameters equal, but each rank's last training forward updates its
    own running statistics (and an EMA averages each rank's own): without this, ranks
    would validate different models, none of them necessarily the one rank 0 publishes.
    """
    if not env.distributed:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)
