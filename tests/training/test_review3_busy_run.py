"""Review 3: a run directory in use by another trainer.

Two trainers given the same ``output.run_name`` (or a ``--resume`` of a run still training, say from a second
terminal) both wrote into one run directory: the second saw no checkpoint yet, rewrote ``config.yaml`` and
``metrics.jsonl`` and then both replaced ``checkpoints/last.pt`` in turn. The trainer now holds a lock on its
run directory (``run.lock``, released by the kernel even after ``kill -9``); another trainer is refused.
"""

from __future__ import annotations

import fcntl

import pytest

from segsvc.errors import InvalidArgument
from training.config import load_config
from training.rundir import CHECKPOINT, LOCK_FILE
from training.train import main


def hold_lock(run_dir):  # type: ignore[no-untyped-def]
    """What another trainer running in ``run_dir`` holds (an open file description with an exclusive flock)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_FILE, "a+")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def test_a_run_directory_in_use_is_refused_fresh_or_resumed(tiny_recipe):
    overrides = ["output.run_name=busy", "data.train_limit=4"]
    run_dir = tiny_recipe.parent / "runs" / "tiny" / "busy"
    handle = hold_lock(run_dir)
    try:
        with pytest.raises(InvalidArgument, match=f"run directory {run_dir} is in use by another trainer"):
            main(load_config(tiny_recipe, overrides))
        assert not (run_dir / "config.yaml").exists()
    finally:
        handle.close()
    assert main(load_config(tiny_recipe, overrides)) is not None  # free again: it trains
    handle = hold_lock(run_dir)
    try:
        with pytest.raises(InvalidArgument, match="is in use by another trainer"):
            main(load_config(tiny_recipe, [*overrides, "train.epochs=2"]), resume=str(run_dir))
    finally:
        handle.close()
    assert main(load_config(tiny_recipe, [*overrides, "train.epochs=2"]), resume=str(run_dir)) is not None
    assert (run_dir / CHECKPOINT).is_file()
