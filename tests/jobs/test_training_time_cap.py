"""Every trainer a job starts runs under the server's time limit (``TrainingConfig.max_time_min``).

An ``epochs`` budget lifts the recipe's time budget, and a recipe or request may have none: such a trainer used
to run ``train.max_time_min=null``, up to ``MAX_EPOCHS`` epochs with no limit on time.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from segsvc.errors import InvalidArgument
from segsvc.inference.repository import ModelRepository
from segsvc.jobs.trainspec import TrainingConfig, TrainingRequest, resolve_submission, trainer_argv

LIMIT = 60.0


def _effective_time(tmp_path: Path, request: TrainingRequest, recipe_text: str) -> float | None:
    """``train.max_time_min`` as the trainer reads it: the recipe, then every ``--set`` in order."""
    spec = {"request": request.to_dict(), "dataset": {"name": "d", "sha256": "ab", "spec_path": "/d.yaml"},
            "base": None, "model_name": "m", "run_dir": "r/run", "recipe_name": "r", "recipe_text": recipe_text}
    argv = trainer_argv(spec, tmp_path, TrainingConfig(state_dir=tmp_path, python="py", max_time_min=LIMIT), False)
    value = (yaml.safe_load(recipe_text).get("train") or {}).get("max_time_min")
    for i, arg in enumerate(argv):
        if arg == "--set" and argv[i + 1].startswith("train.max_time_min="):
            value = yaml.safe_load(argv[i + 1].partition("=")[2])
    return None if value is None else float(value)


@pytest.mark.parametrize("request_kwargs, recipe_text, expected", [
    ({"epochs": 100_000}, "name: r\ntrain: {max_time_min: 15}\n", LIMIT),  # epochs lift the recipe's budget
    ({}, "name: r\n", LIMIT),  # no budget anywhere
    ({"overrides": ("train.max_time_min=null",)}, "name: r\ntrain: {max_time_min: 15}\n", LIMIT),
    ({}, "name: r\ntrain: {max_time_min: 15}\n", 15.0),  # a lower budget stands
    ({"max_time_min": 30.0}, "name: r\n", 30.0),
])
def test_every_trainer_runs_under_the_server_s_time_limit(tmp_path, request_kwargs, recipe_text, expected):
    request = TrainingRequest(dataset="d", recipe="r", **request_kwargs)
    assert _effective_time(tmp_path, request, recipe_text) == expected


def test_a_time_budget_over_the_server_s_limit_is_refused_at_submission(tmp_path):
    datasets = SimpleNamespace(get=lambda name: SimpleNamespace(name=name, sha256="a" * 64, spec_path="/d.yaml"))
    config = TrainingConfig(state_dir=tmp_path, max_time_min=LIMIT)
    with pytest.raises(InvalidArgument, match="at most 60"):
        resolve_submission(TrainingRequest(dataset="d", recipe="synthetic-quick", max_time_min=LIMIT + 1), datasets,
                           ModelRepository(tmp_path / "repo"), config)
    resolve_submission(TrainingRequest(dataset="d", recipe="synthetic-quick", max_time_min=LIMIT), datasets,
                       ModelRepository(tmp_path / "repo"), config)
