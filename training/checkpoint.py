"""Trainer checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the model, optimiser, LR scheduler and AMP scaler states,
the loop's ``RunState`` (epochs done, best validation score, the metrics
history, training time) and the Python, NumPy and torch (CPU and CUDA) RNG
states. Checkpoints are private to the trainer (``torch.save``); they are
loaded with ``weights_only=True``, so every value in them is a tensor or a
plain container (``RunState`` is stored as its fields, never pickled as an
object), and a file without a checkpoint's keys (``best.pt``, another program's) is refused
(``check_checkpoint``). A checkpoint is written to a temporary file and renamed over the old
one, so a run killed at any moment (even ``kill -9``) resumes from the last
complete checkpoint. The *served* model is a separate safetensors artifact
written by ``segsvc.models.artifact.save_artifact``.
"""

from __future__ import annotations

import dataclasses
import os
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segsvc.errors import SegsvcError
from training.ema import WeightAverage


class CheckpointError(SegsvcError):
    """A checkpoint is missing, unreadable or does not match the run."""


@dataclass
class RunState:
    """Where the training loop stands; what a checkpoint restores besides the tensors.

    Args:
        epoch: epochs finished (the next epoch to run, 0-based).
        best_score: best validation mIoU so far (-1 before the first validation).
        epochs_since_best: validations since the best one (early stopping).
        history: one metrics row per finished epoch (``metrics.jsonl``).
        elapsed_s: wall time of the run so far (setup, epochs and their checkpoints), summed over resumptions.
        run_id: identifies the run across resumptions (a new one per fresh run); the published
            manifest records it, so a resume can tell whether it already published (``training.rundir``).

    Example:
        >>> RunState.from_dict(RunState(epoch=2, best_score=0.5).to_dict()).epoch
        2
    """

    epoch: int = 0
    best_score: float = -1.0
    epochs_since_best: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def best_miou(self) -> float | None:
        return self.best_score if self.best_score >= 0 else None

    def record_validation(self, miou: float) -> bool:
        """Count a validation; True when it is the best so far."""
        improved = miou > self.best_score
        self.best_score, self.epochs_since_best = (miou, 0) if improved else (self.best_score, self.epochs_since_best + 1)
        return improved

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "RunState":
        """The fields of a checkpoint (other keys, such as the tensors, are ignored)."""
        try:
            history = [dict(row) for row in state["history"]]
            return cls(
                epoch=int(state["epoch"]),
                best_score=float(state["best_score"]),
                epochs_since_best=int(state["epochs_since_best"]),
                history=history,
                elapsed_s=float(state["elapsed_s"]),
                run_id=str(state.get("run_id") or uuid.uuid4().hex),  # older checkpoints: one from now on
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint lacks a valid run state: {exc!r}") from None


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    run: RunState,
    config: dict[str, Any],
    ema: WeightAverage | None = None,
) -> None:
    """Atomically write the state after ``run.epoch`` finished epochs: a temporary file, synced, renamed."""
    state = {
        **run.to_dict(),
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "config": config,
        "rng": capture_rng_state(),
    }
    if ema is not None:
        state["ema"] = ema.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when the write was interrupted


# what ``save_checkpoint`` always writes (``run_id`` and ``ema`` may be absent)
CHECKPOINT_KEYS = ("best_score", "config", "elapsed_s", "epoch", "epochs_since_best", "history", "model",
                   "optimizer", "rng", "scaler", "scheduler")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU without running pickled code; refuse a file the trainer did not write."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for corrupt files
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {one_line(exc)}") from None
    check_checkpoint(state, path)
    return state


def check_checkpoint(state: Any, path: Path) -> None:
    """Refuse what ``save_checkpoint`` did not write: another program's file, a bare tensor, or ``best.pt``."""
    where = f"{str(path)!r} is not a checkpoint of the trainer"
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} (it holds a {type(state).__name__}, not a mapping)")
    if {"model", "epoch", "metrics"} <= set(state) and "optimizer" not in state:
        run_dir = path.parent.parent
        raise CheckpointError(f"{where}: {path.name} holds only the best weights: resume from {run_dir} "
                              "(its checkpoints/last.pt)")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{where} (it lacks {', '.join(map(repr, missing))})")
    malformed = [key for key in ("config", "model", "optimizer", "rng", "scaler", "scheduler")
                 if not isinstance(state[key], dict)]
    if malformed:
        raise CheckpointError(f"{where} ({', '.join(map(repr, malformed))} not a mapping)")


def restore_training_state(
    state: dict[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    ema: WeightAverage | None = None,
) -> RunState:
    """Load a checkpoint's states into freshly built objects, restore the RNGs, return the loop's state."""
    run = RunState.from_dict(state)
    if (ema is not None) != ("ema" in state):
        raise CheckpointError("the checkpoint and the recipe disagree on train.ema_decay (a weight average "
                              f"{'is' if 'ema' in state else 'is not'} in the checkpoint)")
    try:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint does not match this model or optimiser: {one_line(exc)}") from None
    try:
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint has a malformed scheduler, scaler or RNG state: {one_line(exc)}") from None
    return run


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception's text on one line, cut to ``limit`` characters (torch lists every missing weight's name)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
