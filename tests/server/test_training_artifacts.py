"""A training job's artifacts as a client fetches them: no server path in any text, the content intact.

The trainer and the evaluator write absolute paths into their outputs (the run
folder, ``model.init_from``, ``data.spec``, ``output.runs_dir``, what they
wrote where). The files are made here, as they write them, and fetched the
way ``FetchJobOutputs`` / ``FetchTrainingArtifacts`` stream them
(``convert.file_chunks``) into the client's ``jobclient.download``, which
checks that every file's chunks are contiguous from offset 0.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import yaml

from segsvc.datasets.registry import DatasetRegistry, DatasetsConfig
from segsvc.inference.repository import ModelRepository
from segsvc.jobclient import download
from segsvc.jobs import training
from segsvc.jobs.store import JobStore
from segsvc.jobs.training import TrainingRunner
from segsvc.jobs.trainspec import PROJECT_ROOT, TrainingConfig, TrainingRequest
from segsvc.server.convert import FILE_CHUNK_BYTES, file_chunks
from tests.datasets.helpers import synth
from tests.server.conftest import TINY, publish

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64


def _fetch(runner: TrainingRunner, job_id: str, dest: Path) -> list[Path]:
    async def chunks() -> list:
        files = await asyncio.to_thread(runner.artifact_files, job_id)
        return [chunk async for chunk in file_chunks(files)]

    return download(iter(asyncio.run(chunks())), dest)


def _write_artifacts(root: Path, run_dir: Path, base_dir: Path, spec_path: str, data: Path) -> None:
    """What the trainer and the evaluator leave in the job's folder, server paths and all."""
    run_dir.mkdir(parents=True)
    events = [{"event": "start", "run_dir": str(run_dir), "epochs": 1,
               "init_from": {"path": str(base_dir), "name": "base3", "version": 1}},
              {"event": "epoch", "epoch": 1, "val_miou": 0.5},
              {"event": "end", "status": "completed", "artifact": str(root / "candidate" / "m" / "1")}]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "miou": 0.5, "checkpoint": str(run_dir)}) + "\n")
    config = {"model": {"arch": "unet", "init_from": str(base_dir)}, "data": {"spec": spec_path, "crop": [32, 32]},
              "output": {"runs_dir": str(root), "repo": str(root / "candidate"), "run_name": "run"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run_dir / "training_curve.png").write_bytes(PNG)
    filler = "".join(f"epoch 1 step {i}: loss 0.{i:06d} reading {data}/images/train/{i}.png\n" for i in range(30000))
    first = f"a runaway line {run_dir} "  # then 1 MiB ends 20 bytes into a path: no part of it may be left
    cut = first + "x" * (training.MAX_LINE_BYTES - len(first) - 20) + f" {data}/images/" + "y" * 5000
    (root / "train.log").write_text(
        f"initialised from base3 v1 ({base_dir}): the body only\n"
        f"run {run_dir}: unet on shapes\n"
        f'  File "{PROJECT_ROOT}/training/train.py", line 1, in main\n'
        + filler + cut + "\n"
        f"wrote {root}/eval/candidate-val/metrics.json and {root}/eval/candidate-val/report.png\n")
    evaluation = root / "eval" / "candidate-val"
    evaluation.mkdir(parents=True)
    (evaluation / "metrics.json").write_text(json.dumps({"model": str(root / "candidate" / "m" / "1"),
                                                         "data": spec_path, "miou": 0.5}))
    (evaluation / "report.png").write_bytes(PNG)
    (root / "gate.json").write_text(json.dumps({"version": 1, "table": f"{root}/candidate"}))


def test_fetched_training_artifacts_hold_no_server_path_and_keep_their_content(tmp_path):
    data = tmp_path / "data"
    synth(data / "shapes")
    registry = DatasetRegistry(DatasetsConfig(tmp_path / "state", data_root=data))
    registry.register("shapes")
    base_dir = publish(tmp_path / "repo", "base3", seed=2, num_classes=3)
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    manager = SimpleNamespace(repository=ModelRepository(tmp_path / "repo"))
    runner = TrainingRunner(store, manager, registry,  # type: ignore[arg-type]
                            TrainingConfig(state_dir=tmp_path / "state"))
    try:
        # the base's architecture parameters (the tiny U-Net's), which a fine-tune must keep: the submission's
        # check refuses others, as the trainer does at its start
        same_body = tuple(f"model.params.{key}={value}" for key, value in TINY.items())
        job = asyncio.run(runner.submit(TrainingRequest(dataset="shapes", recipe="synthetic-quick", epochs=1,
                                                        base_model="base3:1", overrides=same_body)))
        root = runner.job_dir(job.id)
        _write_artifacts(root, root / job.spec["run_dir"], base_dir, job.spec["dataset"]["spec_path"],
                         data / "shapes")
        log_size = (root / "train.log").stat().st_size
        assert log_size > 2 * FILE_CHUNK_BYTES  # several chunks: their offsets are checked by download
        fetched = _fetch(runner, job.id, tmp_path / "fetched")
        again = _fetch(runner, job.id, tmp_path / "fetched-again")  # a second fetch is served the same
    finally:
        store.close()
        registry.close()

    dest = tmp_path / "fetched"
    names = {p.relative_to(dest).as_posix() for p in fetched}
    assert names == {"training_curve.png", "metrics.jsonl", "events.jsonl", "config.yaml", "train.log", "gate.json",
                     "eval/candidate-val/metrics.json", "eval/candidate-val/report.png"}
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in fetched]
    for path in fetched:
        raw = path.read_bytes()
        if path.suffix == ".png":
            assert raw == PNG, path  # binary: untouched
            continue
        text = raw.decode()
        for server_path in (str(tmp_path), str(PROJECT_ROOT)):
            assert server_path not in text, (path.name, server_path)
        assert "/tmp" not in text and str(tmp_path.resolve()) not in text, path.name

    events = [json.loads(line) for line in (dest / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "epoch", "end"]
    assert events[0]["run_dir"] == "<job>/synthetic-quick/run"
    assert events[0]["init_from"] == {"path": "<model base3:1>", "name": "base3", "version": 1}
    config = yaml.safe_load((dest / "config.yaml").read_text())
    assert config["model"]["init_from"] == "<model base3:1>" and config["output"]["runs_dir"] == "<job>"
    assert config["data"]["crop"] == [32, 32] and config["data"]["spec"].startswith("dataset 'shapes' (")
    assert json.loads((dest / "metrics.jsonl").read_text())["miou"] == 0.5
    assert json.loads((dest / "gate.json").read_text())["version"] == 1
    log = (dest / "train.log").read_text().splitlines()
    assert log[0] == "initialised from base3 v1 (<model base3:1>): the body only"
    assert log[1] == "run <job>/synthetic-quick/run: unet on shapes"
    assert log[2] == '  File "<project>/training/train.py", line 1, in main'
    assert log[3].startswith("epoch 1 step 0: loss") and log[3].endswith("/images/train/0.png")
    assert len(log) == 3 + 30000 + 2  # every line kept, the runaway one cut
    runaway = log[-2]
    assert runaway.startswith("a runaway line <job>/synthetic-quick/run xxx") and runaway.endswith("xxx [line cut]")
    assert len(runaway) <= training.MAX_LINE_BYTES + len("[line cut]")
    assert log[-1] == "wrote <job>/eval/candidate-val/metrics.json and <job>/eval/candidate-val/report.png"
