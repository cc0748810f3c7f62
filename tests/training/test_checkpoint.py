"""Checkpoints: RNG states round-trip, files load with weights_only, broken files give clear errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from training.checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state


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
