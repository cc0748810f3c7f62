"""The trainer writes the server's paths verbatim, one per line, so the job runner's scrub finds every one.

Training jobs serve ``config.yaml`` and ``events.jsonl`` scrubbed of the server's paths line by line
(``TrainingRunner._scrubber``). YAML escaped a non-ASCII path (``donn\\xE9es``) and folded a long one with spaces
over several lines; JSON escaped non-ASCII (``\\u00e9``): such a path reached the client unscrubbed.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from segsvc.inference.repository import ModelRepository
from segsvc.jobs.training import TrainingRunner
from segsvc.jobs.trainspec import TrainingConfig
from tests.training.conftest import write_recipe
from training.config import load_config
from training.distributed import DistEnv
from training.events import EventLog
from training.rundir import prepare_run

STATE = "données/" + "/".join(["dir with space"] * 8)  # non-ASCII, and long with spaces


def _scrubbed(runner: TrainingRunner, path: Path) -> str:
    job = SimpleNamespace(id="job1", spec={"dataset": {}, "eval_sets": {}, "base": None})
    scrub = runner._scrubber(job)  # type: ignore[arg-type]
    return "".join(scrub(line) for line in path.read_text(encoding="utf-8").splitlines(keepends=True))


def _runner(tmp_path: Path) -> TrainingRunner:
    manager = SimpleNamespace(repository=ModelRepository(tmp_path / "repo"))
    return TrainingRunner(SimpleNamespace(), manager, None,  # type: ignore[arg-type]
                          TrainingConfig(state_dir=tmp_path / STATE))


def test_config_yaml_holds_each_server_path_verbatim_on_one_line(tmp_path, tiny_spec):
    root = tmp_path / STATE / "training" / "job1"
    cfg = load_config(write_recipe(root, tiny_spec))
    run_dir, _ = prepare_run(cfg, None, DistEnv(rank=0, world_size=1, device=torch.device("cpu")))
    text = (run_dir / "config.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(text)["output"]["runs_dir"] == str(root / "runs")
    assert any(str(root / "runs") in line for line in text.splitlines()), text
    scrubbed = _scrubbed(_runner(tmp_path), run_dir / "config.yaml")
    assert "données" not in scrubbed and "dir with" not in scrubbed and "<job>/runs" in scrubbed, scrubbed


def test_events_hold_each_server_path_verbatim(tmp_path):
    root = tmp_path / STATE / "training" / "job1"
    path = root / "run" / "events.jsonl"
    with EventLog(path) as events:
        events.emit("start", run_dir=str(root / "run"), epochs=1)
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0])["run_dir"] == str(root / "run")
    scrubbed = _scrubbed(_runner(tmp_path), path)
    assert "données" not in scrubbed and "dir with" not in scrubbed and "donn\\u00e9es" not in scrubbed, scrubbed
    assert '"run_dir": "<job>/run"' in scrubbed
