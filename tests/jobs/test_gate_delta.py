"""gate.json says ``"delta": null`` when there was no default to compare with (a model's first version).

It said ``"delta": 0.0``, which automation reads as "no change"; the printed table already shows '-'. The job's
result keeps 0 for ``MetricComparison.delta``, a plain double whose ``default`` is absent then.

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

from segsvc.jobs.training import TrainingRunner, _Run
from segsvc.jobs.trainspec import TrainingConfig, TrainingRequest
from segsvc.server.training import training_response
from tests.inference.managers import quiet_manager
from tests.jobs.test_training_gate_classes import DATASET, NAME, _Store
from tests.server.conftest import publish


def _publish(tmp_path: Path, default_miou: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate and publish a candidate with mIoU 0.15, over a default of ``default_miou`` (None: no model yet);
    the job's result and its gate.json."""
    root = tmp_path / "repo"
    root.mkdir()
    if default_miou is not None:
        publish(root, NAME, seed=1, num_classes=3)  # v1, served by default
    request = TrainingRequest(dataset="shapes", recipe="r", epochs=1)
    spec = {"request": request.to_dict(), "dataset": DATASET, "eval_sets": {"val": DATASET}, "base": None,
            "recipe_name": "r", "model_name": NAME, "run_dir": "r/run"}
    job = SimpleNamespace(id="job1", kind="train", spec=spec)

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        manager = quiet_manager(root)
        await manager.start()
        try:
            config = TrainingConfig(state_dir=tmp_path / "state")
            runner = TrainingRunner(_Store(), manager, None, config)  # type: ignore[arg-type]
            candidate = publish(runner.job_dir(job.id) / "candidate", NAME, seed=2, num_classes=3)
            evals = {"candidate-val": 0.15, "default-val": default_miou}
            for folder, miou in evals.items():
                if miou is not None:
                    out = runner.job_dir(job.id) / "eval" / folder
                    out.mkdir(parents=True)
                    (out / "metrics.json").write_text(json.dumps({"metrics": {"miou": miou}}))
            run = _Run(job)
            if default_miou is not None:
                run.progress["default_version"] = 1
            results = await runner._evaluate(run, candidate)
            result = await runner._publish(run, candidate, results)
            return result, json.loads((runner.job_dir(job.id) / "gate.json").read_text())
        finally:
            await manager.stop()

    return asyncio.run(main())


def test_a_first_version_has_no_delta_in_gate_json(tmp_path):
    result, gate_json = _publish(tmp_path, None)
    assert result["version"] == 1 and result["previous_default"] == 0
    assert gate_json["comparison"] == [{"split": "val", "metric": "miou", "candidate": 0.15, "default": None,
                                        "delta": None}]
    assert "-" in gate_json["table"]
    # The proto keeps its plain double: 0 with no default, which says there is none.
    (row,) = training_response(result).comparison
    assert not row.HasField("default") and row.delta == 0.0


@pytest.mark.parametrize("default_miou", [0.15, 0.1])
def test_a_delta_over_a_default_is_in_gate_json_even_when_it_is_zero(tmp_path, default_miou):
    result, gate_json = _publish(tmp_path, default_miou)
    assert result["previous_default"] == 1
    (row,) = gate_json["comparison"]
    assert row["default"] == default_miou and row["delta"] == pytest.approx(0.15 - default_miou)
    assert row["delta"] is not None
    (proto_row,) = training_response(result).comparison
    assert proto_row.default == default_miou and proto_row.delta == pytest.approx(0.15 - default_miou)
