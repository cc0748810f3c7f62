"""What a training request may cost is bounded when it is submitted, before any work starts.

The request's own part of the recipe (its inline recipe with its overrides applied) is checked against
``trainspec.REQUEST_LIMITS``: threads, data-loader workers, batch sizes, repeats, image and tile sizes,
scales and the epoch and time budget. The server's own recipes are the operator's and are not limited.
"""

from __future__ import annotations

import pytest

from segsvc.errors import InvalidArgument
from segsvc.jobs import trainspec
from segsvc.jobs.trainspec import TrainingRequest

HUGE = [
    ("data.workers=100000", "data.workers"),
    ("train.threads=100000", "train.threads"),
    ("train.batch_size=10000000", "train.batch_size"),
    ("train.val_batch_size=10000000", "train.val_batch_size"),
    ("train.accumulate_steps=1000000", "train.accumulate_steps"),
    ("data.repeat=1000000000", "data.repeat"),
    ("data.crop=[100000, 100000]", "data.crop"),
    ("data.scale=[1.0, 1000.0]", "data.scale"),
    ("data.val_scale=1000", "data.val_scale"),
    ("data.val_tile_size=1", "data.val_tile_size"),
    ("data.val_tta_scales=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]", "data.val_tta_scales"),
    ("data.val_tta_scales=[100.0]", "data.val_tta_scales"),
    ("train.epochs=1000000000", "train.epochs"),
    ("train.max_time_min=1e12", "train.max_time_min"),
    ("data={workers: 100000}", "data.workers"),  # a whole section is looked into too
]


@pytest.mark.parametrize("override, key", HUGE)
def test_an_override_asking_more_than_the_server_allows_is_refused_naming_the_key(override, key):
    with pytest.raises(InvalidArgument, match=key.replace(".", r"\.")) as caught:
        TrainingRequest(dataset="d", recipe="r", overrides=(override,))
    assert "at most" in str(caught.value) or "at least" in str(caught.value) or "items" in str(caught.value)


@pytest.mark.parametrize("section, key", [("data: {spec: synthetic, workers: 5000}", r"data\.workers"),
                                          ("output: {samples_in_report: 100000}", r"output\.samples_in_report")])
def test_an_inline_recipe_is_bounded_like_an_override(section, key):
    recipe = f"name: x\nmodel: {{arch: unet}}\n{section}\n"
    with pytest.raises(InvalidArgument, match=key):
        TrainingRequest(dataset="d", recipe_yaml=recipe)


def test_the_time_budget_field_is_bounded():
    with pytest.raises(InvalidArgument, match="max_time_min"):
        TrainingRequest(dataset="d", recipe="r", max_time_min=1e12)
    TrainingRequest(dataset="d", recipe="r", max_time_min=trainspec.MAX_TIME_MIN)


def test_ordinary_requests_and_the_values_the_server_recipes_use_pass():
    TrainingRequest(dataset="d", recipe="r", epochs=3, overrides=(
        "data.workers=2", "train.threads=2", "train.batch_size=8", "train.val_batch_size=16", "data.repeat=2",
        "data.crop=[192, 256]", "data.scale=[0.5, 2.0]", "data.val_scale=0.5", "data.val_tile_size=256",
        "data.val_tta_scales=[0.75, 1.0, 1.25]", "train.threads=null", "data.crop=null", "data.val_tile_size=0",
        "train.max_time_min=15", "optim.lr=0.01"))


def test_a_value_of_the_wrong_type_is_left_to_the_trainer_s_own_message():
    TrainingRequest(dataset="d", recipe="r", overrides=("data.workers=many", "data.crop=7", "train.threads=true"))


def test_a_device_the_trainer_refuses_is_refused_at_submission():
    """``cuda:3`` used to be accepted, then fail the job when the trainer read ``train.device`` (auto, cpu, cuda)."""
    with pytest.raises(InvalidArgument, match="device"):
        TrainingRequest(dataset="d", recipe="r", device="cuda:3")
    for device in ("auto", "cpu", "cuda"):
        assert TrainingRequest(dataset="d", recipe="r", device=device).device == device
