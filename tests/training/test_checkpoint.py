"""Checkpoints: RNG states round-trip, files load with weights_only, broken files give clear errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from training.checkpoint import (
    CheckpointError,
    RunState,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    restore_training_state,
    save_checkpoint,
)


def draw() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    expected = draw()
    torch.save({"rng": state}, tmp_path / "s.pt")
    draw()  # move every generator on
    restore_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    got = draw()
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_missing_and_corrupt_checkpoints_are_named_in_the_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(bad)


def _objects() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.amp.GradScaler]:
    model = torch.nn.Linear(2, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False)


def test_the_run_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    model, optimizer, scheduler, scaler = _objects()
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    scheduler.step()
    run = RunState(epoch=3, best_score=0.25, epochs_since_best=1,
                   history=[{"epoch": 3, "val_iou": [0.5, None]}], elapsed_s=12.5)
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, run=run,
                    config={"name": "x"})
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # the temporary file was renamed
    state = load_checkpoint(path)  # weights_only: RunState travels as plain fields

    fresh = _objects()
    restored = restore_training_state(state, model=fresh[0], optimizer=fresh[1], scheduler=fresh[2], scaler=fresh[3])
    assert restored == run and restored.best_miou == 0.25 and RunState().best_miou is None
    assert torch.equal(fresh[0].weight, model.weight) and fresh[2].last_epoch == 1


def test_record_validation_tracks_the_best_score_and_the_patience_counter():
    run = RunState()
    assert run.record_validation(0.3) and (run.best_score, run.epochs_since_best) == (0.3, 0)
    assert not run.record_validation(0.3) and run.epochs_since_best == 1
    assert not run.record_validation(0.1) and run.epochs_since_best == 2
    assert run.record_validation(0.4) and (run.best_score, run.epochs_since_best) == (0.4, 0)


def test_a_checkpoint_without_a_run_state_is_refused():
    with pytest.raises(CheckpointError, match="run state"):
        RunState.from_dict({"epoch": 1})
