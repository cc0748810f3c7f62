"""Training jobs through the real server: upload, train, gate, publish, serve; cancel; fine-tune; swap under load."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from segsvc.data.synthetic import SyntheticConfig, write_synthetic_dataset
from segsvc.datasets.registry import DatasetsConfig
from segsvc.errors import Cancelled, InvalidArgument
from segsvc.inference.repository import DEFAULT_FILE, ModelRepository
from segsvc.jobs.batch import JobsConfig
from segsvc.jobs.gate import lineage_of
from segsvc.jobs.trainspec import TrainingConfig
from segsvc.models.artifact import read_manifest
from tests.server.conftest import encode, make_image, publish

pytestmark = pytest.mark.slow

TINY = ("model.params.base_channels=4", "model.params.depth=2", "data.crop=[32,32]", "data.train_limit=null",
        "data.val_limit=null", "train.batch_size=8", "train.val_batch_size=16", "train.threads=1")
JOB_TIMEOUT_S = 600  # a loaded 2-core machine: a tiny job takes ~20 s, give it plenty


def _config(tmp_path: Path) -> dict:
    state = tmp_path / "state"
    return dict(jobs=JobsConfig(state_dir=state, output_root=state / "outputs"),
                datasets=DatasetsConfig(state_dir=state),
                training=TrainingConfig(state_dir=state, kill_grace_s=10.0, progress_interval_s=0.2, eval_threads=1))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "shapes"
    write_synthetic_dataset(root, 48, SyntheticConfig(size_hw=(32, 32)), seed=0, val_fraction=0.25)
    return root


def _wait_until(predicate, timeout_s: float = 300.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def _trainer_processes(job_dir: Path) -> list[int]:
    """Live processes whose command line names the job's folder (the trainer, its evaluators)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if str(job_dir) in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


def test_end_to_end_upload_train_gate_publish_segment_then_a_worse_candidate_is_refused(
        tmp_path, shapes, start_server):
    server = start_server(tmp_path / "repo", **_config(tmp_path))
    repo = ModelRepository(tmp_path / "repo")
    image = make_image(32, 32, seed=3)
    with server.client(timeout_s=60) as client:
        dataset = client.upload_dataset(shapes, "shapes")
        job = client.submit_training_job("shapes", recipe="synthetic-quick", overrides=TINY + ("optim.lr=0.01",),
                                         epochs=10, device="cpu", request_id="first")
        assert client.submit_training_job("shapes", recipe="synthetic-quick", overrides=TINY + ("optim.lr=0.01",),
                                          epochs=10, device="cpu", request_id="first").id == job.id
        live = _wait_until(lambda: (s := job.status()).epoch >= 1 and s.phase != "queued" and s, JOB_TIMEOUT_S,
                           "live metadata from the trainer's events")
        assert live.state in ("RUNNING", "SUCCEEDED") and live.epochs == 10 and live.dataset == "shapes"
        assert any(s.name == job.name for s in client.list_jobs())
        final = job.wait(timeout_s=JOB_TIMEOUT_S)
        assert final.state == "SUCCEEDED", final
        assert (final.phase, final.epoch, final.epochs) == ("done", 10, 10) and final.best_miou > 0
        result = job.result()
        assert (result.model, result.version, result.promoted) == ("synthetic-quick", 1, True)
        assert "no comparable default" in result.verdict and result.metrics["miou"] > 0
        assert [r.metric for r in result.comparison if r.split == "val"][0] == "miou"
        assert (tmp_path / "repo" / "synthetic-quick" / DEFAULT_FILE).read_text() == "1\n"
        lineage = lineage_of(repo.version_dir("synthetic-quick", 1))
        assert lineage["dataset"] == {"name": "shapes", "sha256": dataset.sha256}
        assert lineage["recipe"] == "synthetic-quick" and "optim.lr=0.01" in lineage["overrides"]
        assert lineage["parent"] is None and lineage["job_id"] == job.id and "val" in lineage["metrics"]
        candidate = tmp_path / "state" / "training" / job.id / "candidate" / "synthetic-quick" / "1"
        assert read_manifest(candidate).inference == repo.read_manifest("synthetic-quick", 1).inference

        # Served by the same server at once, as the default.
        assert client.segment(encode(image), model="synthetic-quick").version == 1

        files = job.fetch(tmp_path / "fetched")
        names = {p.relative_to(tmp_path / "fetched").as_posix() for p in files}
        assert {"training_curve.png", "metrics.jsonl", "events.jsonl", "train.log", "gate.json",
                "eval/candidate-val/metrics.json", "eval/candidate-val/report.png"} <= names
        assert not any("checkpoint" in n or n.endswith(".pt") for n in names)
        assert json.loads((tmp_path / "fetched" / "gate.json").read_text())["version"] == 1

        # A deliberately bad candidate (learning rate 0: its weights never move) loses on the same evaluation.
        bad = client.submit_training_job("shapes", recipe="synthetic-quick", overrides=TINY + ("optim.lr=0",),
                                         epochs=1, device="cpu")
        bad.wait(timeout_s=JOB_TIMEOUT_S)
        verdict = bad.result()
        assert (verdict.version, verdict.promoted, verdict.previous_default) == (2, False, 1)
        miou = next(r for r in verdict.comparison if r.split == "val" and r.metric == "miou")
        assert miou.default is not None and miou.default > miou.candidate and miou.delta < 0
        assert "not promoted" in verdict.verdict and "-" in verdict.table()
        assert (tmp_path / "repo" / "synthetic-quick" / DEFAULT_FILE).read_text() == "1\n"
        assert repo.versions("synthetic-quick") == [1, 2]
        assert client.segment(encode(image), model="synthetic-quick").version == 1
    assert server.manager.default_version("synthetic-quick") == 1


def test_promotion_swaps_the_default_with_zero_failed_requests_under_load(tmp_path, shapes, start_server):
    publish(tmp_path / "repo", "shapes-model", seed=1, num_classes=5)
    server = start_server(tmp_path / "repo", **_config(tmp_path))
    image = encode(make_image(32, 32, seed=4))
    seen: list[int] = []  # versions, in the order the answers came
    sent: list[int] = []  # for each answer in ``seen``: how many requests had been sent before its own was
    sent_when_seen: list[int] = []  # ... and how many had been sent when it came
    errors: list[BaseException] = []
    stop = threading.Event()
    lock = threading.Lock()
    sends = 0

    def load() -> None:
        nonlocal sends
        with server.client(timeout_s=60) as c:
            while not stop.is_set():
                with lock:
                    before, sends = sends, sends + 1
                try:
                    version = c.segment(image, model="shapes-model").version
                except BaseException as exc:  # noqa: BLE001 - every failure counts
                    errors.append(exc)
                    continue
                with lock:
                    seen.append(version)
                    sent.append(before)
                    sent_when_seen.append(sends)

    with server.client(timeout_s=60) as client:
        client.upload_dataset(shapes, "shapes")
        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            _wait_until(lambda: len(seen) >= 5, 120, "the load to run")
            job = client.submit_training_job("shapes", recipe="synthetic-quick", overrides=TINY, epochs=1,
                                             model_name="shapes-model", promote="always", device="cpu")
            job.wait(timeout_s=JOB_TIMEOUT_S)
            result = job.result()
            assert (result.version, result.promoted, result.previous_default) == (2, True, 1)
            count = len(seen)
            _wait_until(lambda: len(seen) > count + 5, 120, "requests after the promotion")
        finally:
            stop.set()
            for t in threads:
                t.join(60)
    assert errors == []
    assert seen[0] == 1 and seen[-1] == 2 and set(seen) == {1, 2}
    # Only the requests in flight when the first answer from version 2 came may finish on the old one: every
    # request sent after it gets version 2. (Their answers can come in any order: two threads send them.)
    first_new = seen.index(2)
    assert all(v == 2 for v, before in zip(seen, sent) if before >= sent_when_seen[first_new])


def test_fine_tune_from_a_served_version_whose_classes_differ(tmp_path, shapes, start_server):
    publish(tmp_path / "repo", "base3", seed=2, num_classes=3)  # 3 classes; the dataset has 5
    server = start_server(tmp_path / "repo", **_config(tmp_path))
    with server.client(timeout_s=60) as client:
        client.upload_dataset(shapes, "shapes")
        job = client.submit_training_job("shapes", recipe="synthetic-quick", overrides=TINY, epochs=1,
                                         base_model="base3:1", model_name="shapes-ft", device="cpu")
        assert job.status().base_model == "base3:1"
        job.wait(timeout_s=JOB_TIMEOUT_S)
        result = job.result()
        assert (result.model, result.version, result.promoted) == ("shapes-ft", 1, True)
        job.fetch(tmp_path / "fetched")
        reply = client.segment(encode(make_image(32, 32, seed=5)), model="shapes-ft")
        assert reply.version == 1 and len(reply.class_names) == 5
    starts = [json.loads(line) for line in (tmp_path / "fetched" / "events.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "start"]
    base_dir = ModelRepository(tmp_path / "repo").version_dir("base3", 1)
    init = starts[0].get("init_from")  # the base version by name, not by its folder on the server
    assert (init.get("path") if isinstance(init, dict) else init) == "<model base3:1>"
    for path in (tmp_path / "fetched").rglob("*"):
        if path.is_file() and path.suffix != ".png":
            assert str(tmp_path) not in path.read_text(), path.name
    lineage = lineage_of(ModelRepository(tmp_path / "repo").version_dir("shapes-ft", 1))
    assert lineage["parent"] == {"model": "base3", "version": 1, "dir": str(base_dir)}


def test_cancel_stops_the_trainer_process_group_and_ends_cancelled(tmp_path, shapes, start_server):
    server = start_server(tmp_path / "repo", **_config(tmp_path))
    with server.client(timeout_s=60) as client:
        client.upload_dataset(shapes, "shapes")
        job = client.submit_training_job("shapes", recipe="synthetic-quick", overrides=TINY, epochs=10_000,
                                         device="cpu")
        _wait_until(lambda: job.status().epoch >= 1, JOB_TIMEOUT_S, "the trainer to run an epoch")
        job_dir = tmp_path / "state" / "training" / job.id
        assert _trainer_processes(job_dir)
        job.cancel()
        final = job.wait(timeout_s=120)
        assert final.state == "CANCELLED" and final.cancel_requested
        with pytest.raises(Cancelled, match="cancelled while training"):
            job.result()
        assert _trainer_processes(job_dir) == []
        assert ModelRepository(tmp_path / "repo").list_models() == {}  # nothing published
        job.delete()
        with pytest.raises(Exception, match="no job"):
            client.job(job.id)


def test_a_failing_trainer_ends_failed_with_its_reason_and_no_traceback(tmp_path, shapes, start_server):
    server = start_server(tmp_path / "repo", **_config(tmp_path))
    with server.client(timeout_s=60) as client:
        client.upload_dataset(shapes, "shapes")
        # a class to register the labels by that the recipe check does not judge (it reads no image): the trainer
        # refuses it as it starts
        job = client.submit_training_job("shapes", recipe="synthetic-quick",
                                         overrides=TINY + ("data.register=nosuch",), epochs=1, device="cpu")
        final = job.wait(timeout_s=JOB_TIMEOUT_S)
        assert final.state == "FAILED"
        with pytest.raises(Exception) as info:
            job.result()
        message = str(info.value)
        assert "training failed:" in message and "data.register names class 'nosuch'" in message, message
        assert "Traceback" not in message and str(tmp_path) not in message and "InvalidArgument" not in message


def test_a_mistyped_override_is_refused_at_submit_with_the_trainer_s_own_error(tmp_path, shapes, start_server):
    """`--set data.crp=[64,64]` was accepted and failed the job once the trainer started; the submit now runs
    the trainer's recipe check, so the call is refused with the trainer's line and no job is stored."""
    server = start_server(tmp_path / "repo", **_config(tmp_path))
    with server.client(timeout_s=60) as client:
        client.upload_dataset(shapes, "shapes")
        with pytest.raises(InvalidArgument) as info:
            client.submit_training_job("shapes", recipe="synthetic-quick", overrides=TINY + ("data.crp=[64,64]",),
                                       epochs=1, device="cpu")
        message = str(info.value)
        assert "data.crp: unknown key (did you mean 'crop'?)" in message, message
        assert "exited with code" not in message and str(tmp_path) not in message
        assert list(client.list_jobs()) == []


def test_cli_trains_on_a_server_and_jobs_commands_cover_training_jobs(tmp_path, shapes, start_server, capsys):
    from segsvc.cli import main

    server = start_server(tmp_path / "repo", **_config(tmp_path))
    with server.client(timeout_s=60) as client:
        client.upload_dataset(shapes, "shapes")
    common = ["--server", server.address]
    sets = [arg for text in TINY for arg in ("--set", text)]
    assert main(["train", *common, "--dataset", "shapes", "--recipe", "synthetic-quick", *sets, "--epochs", "1",
                 "--device", "cpu", "--promote", "always", "--wait"]) == 0  # never: refused on a new model
    out = capsys.readouterr()
    job_id = out.out.splitlines()[0].strip()
    assert "published synthetic-quick:1" in out.out and "promoted: promote policy is always" in out.out
    assert "candidate" in out.out and "miou" in out.out  # the comparison table
    assert "val_mIoU" in out.err  # the tqdm bar's postfix
    assert main(["jobs", "list", *common]) == 0
    assert f"jobs/{job_id}" in capsys.readouterr().out
    assert main(["jobs", "status", job_id, *common]) == 0
    assert "SUCCEEDED  train done" in capsys.readouterr().out
    assert main(["jobs", "fetch", job_id, *common, "--out", str(tmp_path / "artifacts")]) == 0
    assert (tmp_path / "artifacts" / "training_curve.png").is_file()
    assert main(["jobs", "delete", job_id, *common, "--outputs"]) == 0
    assert not (tmp_path / "state" / "training" / job_id).exists()
    assert main(["train", *common, "--recipe", "synthetic-quick"]) == 2  # no --dataset
    assert "--dataset" in capsys.readouterr().err
