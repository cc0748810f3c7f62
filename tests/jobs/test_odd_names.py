"""Inputs whose file name cannot become an output name, and refusals that must come before anything is written.

A backslash, bytes that are not UTF-8 or a name too long for its output's temporary file fail that one input
(recorded with the reason, like an undecodable image) in ``segsvc batch`` and in server jobs; the other inputs
are segmented. ``--engine ray --device cuda`` without a GPU is refused up front instead of waiting for a GPU.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from segsvc.cli import main
from segsvc.errors import InvalidArgument
from segsvc.inference.engine import Output
from segsvc.inference.service import ImageFile, Segmentation
from segsvc.jobs import offline, outputs
from segsvc.jobs.batch import JobRequest, JobRunner, JobsConfig
from segsvc.jobs.offline import STATE_FILE, BatchOptions, run_batch
from segsvc.jobs.store import JobStore
from tests.jobs.conftest import MANIFEST, FakeManager, run_to_end
from tests.server.conftest import encode, make_image, publish

GOOD = ["000000.png", "000001.png", "000002.png"]
BACKSLASH = "scan\\01.png"
NON_UTF8 = b"caf\xe9.png"
NON_UTF8_SHOWN = "caf\\xe9.png"  # how results, the summary and the store name it
LONG = "n" * 240 + ".png"  # a valid file name, but labels/.<name>.png.tmp-<hex> is over 255 bytes


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    publish(root, "tiny", seed=1)
    return root


def _folder(root: Path, odd: list[str | bytes]) -> Path:
    """GOOD images plus decodable images under the ``odd`` names (str, or raw bytes for non-UTF-8 names)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate([*GOOD, *odd]):
        path = os.path.join(os.fsencode(root), name if isinstance(name, bytes) else os.fsencode(name))
        try:
            with open(path, "wb") as f:
                f.write(encode(make_image(16, 16, seed=i)))
        except OSError as exc:  # e.g. a filesystem that accepts only UTF-8 names
            pytest.skip(f"this filesystem refuses the name {name!r}: {exc}")
    return root


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


# -- the name check itself --------------------------------------------------------------------------------
def test_input_name_problem_names_the_reason() -> None:
    problem = outputs.input_name_problem
    assert problem("a/b/x.png") is None
    assert "backslash" in problem(BACKSLASH)
    assert "UTF-8" in problem(os.fsdecode(NON_UTF8))
    assert "too long" in problem(LONG)
    assert problem("d/" + "n" * 233) is None  # "." + 233 + ".png" + ".tmp-<12 hex>" = 255 bytes
    assert "too long" in problem("d/" + "n" * 234)
    assert outputs.storable_name(os.fsdecode(NON_UTF8)) == NON_UTF8_SHOWN
    assert outputs.storable_name("é/x.png") == "é/x.png"


def test_store_refuses_a_non_utf8_input_with_a_domain_error(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    try:
        with pytest.raises(InvalidArgument, match="UTF-8"):
            store.submit("batch", {}, ["ok.png", os.fsdecode(NON_UTF8)])
        assert store.list() == []
    finally:
        store.close()


# -- segsvc batch: the odd input fails alone, the run goes on -----------------------------------------------
@pytest.mark.parametrize("odd, shown, reason", [
    (BACKSLASH, BACKSLASH, "backslash"),
    (NON_UTF8, NON_UTF8_SHOWN, "UTF-8"),
    (LONG, LONG, "too long"),
])
def test_batch_fails_only_the_input_with_an_odd_name(repo, tmp_path, odd, shown, reason) -> None:
    inputs, out = _folder(tmp_path / "in", [odd]), tmp_path / "out"
    summary = run_batch([str(inputs)], model_repo=repo, model="tiny", out=out, device="cpu")
    assert summary["counts"] == {"total": 4, "done": 3, "failed": 1, "skipped": 0}
    assert [f["input"] for f in summary["failures"]] == [shown]
    assert reason in summary["failures"][0]["reason"]
    assert [r["input"] for r in _records(out)] == GOOD
    assert sorted(p.name for p in (out / "labels").iterdir()) == [f"{g}.png" for g in GOOD]
    assert json.loads((out / "summary.json").read_text())["counts"] == summary["counts"]


def test_cli_batch_with_a_backslash_name_finishes_with_rc_1(repo, tmp_path, capsys) -> None:
    inputs, out = _folder(tmp_path / "in", [BACKSLASH]), tmp_path / "out"
    code = main(["batch", str(inputs), "--model-repo", str(repo), "--model", "tiny", "--out", str(out),
                 "--device", "cpu", "--no-progress"])
    assert code == 1, capsys.readouterr().err  # some input failed, not a usage error (2)
    err = capsys.readouterr().err
    assert f"{BACKSLASH}: error:" in err and "backslash" in err
    assert (out / "summary.json").is_file()


def test_resume_finishes_a_batch_an_older_segsvc_stopped_at_a_backslash_name(repo, tmp_path) -> None:
    """The state an earlier release left: the backslash item PENDING, so every --resume stopped at it."""
    inputs, out = _folder(tmp_path / "in", [BACKSLASH]), tmp_path / "out"
    out.mkdir()
    store = JobStore(out / STATE_FILE)
    spec = {"root": str(inputs), "inputs": [str(inputs)], "model": "tiny", "version": 1,
            "options": asdict(BatchOptions())}
    store.submit("batch", spec, sorted([*GOOD, BACKSLASH]))
    store.close()
    summary = run_batch(None, model_repo=repo, model=None, out=out, resume=True, device="cpu")
    assert summary["counts"] == {"total": 4, "done": 3, "failed": 1, "skipped": 0}
    assert [f["input"] for f in summary["failures"]] == [BACKSLASH]


def test_a_crash_while_creating_the_job_leaves_the_folder_reusable(repo, tmp_path, monkeypatch) -> None:
    inputs, out = _folder(tmp_path / "in", []), tmp_path / "out"

    def crash(self, *args, **kwargs):
        raise RuntimeError("killed while creating the job")

    with monkeypatch.context() as patch:
        patch.setattr(JobStore, "submit", crash)
        with pytest.raises(RuntimeError, match="killed"):
            run_batch([str(inputs)], model_repo=repo, model="tiny", out=out, device="cpu")
    assert (out / STATE_FILE).is_file()  # what a kill -9 at that point leaves too
    summary = run_batch([str(inputs)], model_repo=repo, model="tiny", out=out, device="cpu")
    assert summary["counts"] == {"total": 3, "done": 3, "failed": 0, "skipped": 0}


def test_an_empty_state_left_by_a_crash_says_to_run_again_without_resume(repo, tmp_path) -> None:
    out = tmp_path / "out"
    JobStore(out / STATE_FILE).close()
    with pytest.raises(InvalidArgument, match="without --resume"):
        run_batch(None, model_repo=repo, model=None, out=out, resume=True, device="cpu")


# -- server jobs: same rule ------------------------------------------------------------------------------


class _Service:
    """What ``JobRunner`` uses of ``InferenceService``: decodes the input, answers all background."""

    manager = FakeManager()

    def resolve(self, model, version):  # type: ignore[no-untyped-def]
        return "m", 1, MANIFEST

    async def run_io(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(fn, *args)

    async def segment(self, source: ImageFile, **_: object) -> Segmentation:
        image = await asyncio.to_thread(source.load, 1 << 24)
        labels = np.zeros(image.shape[:2], np.uint8)
        counts = np.bincount(labels.ravel(), minlength=2).astype(np.int64)
        return Segmentation(image, Output(labels, class_counts=counts), MANIFEST, "m", 1, 0.0, 0.0, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("odd, shown, reason", [
    (BACKSLASH, BACKSLASH, "backslash"),
    (NON_UTF8, NON_UTF8_SHOWN, "UTF-8"),
])
def test_server_job_fails_only_the_input_with_an_odd_name(tmp_path, odd, shown, reason) -> None:
    _folder(tmp_path / "data", [odd])
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    config = JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", data_root=tmp_path / "data")

    async def run() -> tuple:
        runner = JobRunner(store, _Service(), config)  # type: ignore[arg-type]
        job = await runner.submit(JobRequest(model="m", paths=(".",)))
        job = await run_to_end(runner, job.id)
        return job, runner.output_dir(job.id)

    try:
        job, out = asyncio.run(run())
        assert job.state == "SUCCEEDED", job.error
        assert (job.total, job.done, job.failed) == (4, 3, 1)
        [failure] = job.result["failures"]
        assert failure["input"] == shown and reason in failure["reason"]
        assert [r["input"] for r in _records(out)] == GOOD
    finally:
        store.close()


class _FailingService(_Service):
    """An unexpected error (not a bad input) while segmenting one image."""

    async def segment(self, source: ImageFile, **kwargs: object) -> Segmentation:
        if source.name == GOOD[1]:
            raise RuntimeError("boom")
        return await super().segment(source, **kwargs)


def test_server_job_with_an_item_that_raised_is_not_reported_succeeded(tmp_path) -> None:
    """The item that raised stays PENDING: the job must not be SUCCEEDED with it neither done nor failed."""
    _folder(tmp_path / "data", [])
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    config = JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", data_root=tmp_path / "data")

    async def run():  # type: ignore[no-untyped-def]
        runner = JobRunner(store, _FailingService(), config)  # type: ignore[arg-type]
        job = await runner.submit(JobRequest(model="m", paths=(".",)))
        return await run_to_end(runner, job.id)

    try:
        job = asyncio.run(run())
        assert job.state == "FAILED" and "internal error" in job.error, (job.state, job.done, job.failed)
        pending = [i.input for i in store.pending_items(job.id)]  # items in flight were cancelled: PENDING too
        assert GOOD[1] in pending and job.done + job.failed + len(pending) == job.total
    finally:
        store.close()


# -- --engine ray --device cuda without a GPU ------------------------------------------------------------
def test_ray_device_check() -> None:
    assert offline.ray_device("cpu", cluster_gpus=0, actors=2) == "cpu"
    assert offline.ray_device("auto", cluster_gpus=0, actors=1) == "cpu"
    assert offline.ray_device("auto", cluster_gpus=1, actors=1) == "cuda"
    assert offline.ray_device("cuda", cluster_gpus=2, actors=2) == "cuda"
    with pytest.raises(InvalidArgument, match="no CUDA device is available"):
        offline.ray_device("cuda", cluster_gpus=0, actors=1)
    with pytest.raises(InvalidArgument, match="--actors"):
        offline.ray_device("cuda:0", cluster_gpus=1, actors=2)


@pytest.mark.timeout(120)
def test_ray_cluster_without_gpus_refuses_cuda_instead_of_waiting(repo, tmp_path) -> None:
    ray = pytest.importorskip("ray", reason="the ray engine needs Ray Data: pip install 'segsvc[ray]'")
    pytest.importorskip("ray.data", reason="the ray engine needs Ray Data: pip install 'segsvc[ray]'")
    inputs, out = _folder(tmp_path / "in", []), tmp_path / "out"
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with pytest.raises(InvalidArgument, match="GPU"):
            run_batch([str(inputs)], model_repo=repo, model="tiny", out=out, engine="ray", device="cuda")
    finally:
        ray.shutdown()
