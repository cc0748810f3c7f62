"""Under GATE a candidate replaces a served default only by beating it: a default with other classes cannot be
compared, so it is not replaced (ALWAYS does that).

``_evaluate`` and ``_publish`` run for real against a real repository and ``ModelManager``; the candidate's own
evaluation is already in its folder (as a restarted job finds it), so no child process runs.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from segsvc.inference.repository import ModelRepository
from segsvc.jobs import gate
from segsvc.jobs.training import TrainingRunner, _Run
from segsvc.jobs.trainspec import TrainingConfig, TrainingRequest
from tests.inference.managers import quiet_manager
from tests.server.conftest import publish

NAME = "m"
DATASET = {"name": "shapes", "sha256": "f" * 64, "spec_path": "/nonexistent/shapes.yaml"}


class _Store:
    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        pass


def _evaluate_and_publish(tmp_path: Path, promote: str) -> tuple[dict[str, Any], int]:
    root = tmp_path / "repo"
    publish(root, NAME, seed=1, num_classes=3)  # v1, served by default: 3 classes
    request = TrainingRequest(dataset="shapes", recipe="r", epochs=1, promote=promote)
    spec = {"request": request.to_dict(), "dataset": DATASET, "eval_sets": {"val": DATASET}, "base": None,
            "recipe_name": "r", "model_name": NAME, "run_dir": "r/run"}
    job = SimpleNamespace(id="job1", kind="train", spec=spec)

    async def main() -> tuple[dict[str, Any], int]:
        manager = quiet_manager(root)
        await manager.start()
        try:
            config = TrainingConfig(state_dir=tmp_path / "state")
            runner = TrainingRunner(_Store(), manager, None, config)  # type: ignore[arg-type]
            candidate = publish(runner.job_dir(job.id) / "candidate", NAME, seed=2, num_classes=5)  # other classes
            out = runner.job_dir(job.id) / "eval" / "candidate-val"
            out.mkdir(parents=True)
            (out / "metrics.json").write_text(json.dumps({"metrics": {"miou": 0.01}}))  # a poor model
            run = _Run(job)
            results = await runner._evaluate(run, candidate)
            result = await runner._publish(run, candidate, results)
            return result, manager.default_version(NAME)
        finally:
            await manager.stop()

    return asyncio.run(main())


def test_gate_does_not_replace_a_default_with_other_classes_it_could_not_compare_with(tmp_path):
    """Used to promote it unevaluated ("no comparable default"): any candidate replaced the served model."""
    result, served = _evaluate_and_publish(tmp_path, "gate")
    assert (result["version"], result["promoted"], result["previous_default"]) == (2, False, 1), result["verdict"]
    assert "not promoted" in result["verdict"] and "classes" in result["verdict"]
    assert served == 1 and ModelRepository(tmp_path / "repo").default_version(NAME) == 1


def test_always_still_replaces_it(tmp_path):
    result, served = _evaluate_and_publish(tmp_path, "always")
    assert (result["version"], result["promoted"]) == (2, True)
    assert served == 2


@pytest.mark.parametrize("has_default", [False, True])
def test_decide_without_a_comparable_default(has_default):
    rows = gate.compare({"val": {"miou": 0.1}}, None)
    promoted, verdict = gate.decide("gate", rows, 0.0, has_default=has_default)
    assert promoted is not has_default, verdict
