"""``segsvc batch``: the local and Ray engines, failures, refusals and resuming after a crash."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from segsvc.cli import main
from segsvc.errors import AlreadyExists, InvalidArgument
from segsvc.inference.codec import decode_image
from segsvc.jobs.offline import STATE_FILE, BatchOptions, run_batch
from segsvc.jobs.store import JobStore
from tests.server.conftest import assert_labels_match, encode, make_image, publish, reference

REPO_ROOT = Path(__file__).resolve().parents[2]
GOOD = ["a/b/deep.png", "a/one.png", "grey.png", "x.jpg", "x.png", "z/wide.bmp"]
BAD = "a/broken.png"


def write_inputs(folder: Path) -> None:
    """Nested folders, different sizes, grey and colour, x.png next to x.jpg, and one corrupt file."""
    sizes = {"a/b/deep.png": (40, 56), "a/one.png": (33, 47), "grey.png": (32, 32), "x.jpg": (48, 40),
             "x.png": (48, 40), "z/wide.bmp": (24, 72)}
    for i, (rel, (h, w)) in enumerate(sizes.items()):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = make_image(h, w, seed=i, channels=1 if rel == "grey.png" else 3)
        path.write_bytes(encode(image, Path(rel).suffix))
    (folder / BAD).write_bytes(encode(make_image(20, 20, seed=9))[:60])  # truncated PNG
    (folder / "notes.txt").write_text("not an image: ignored by the folder walk")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("batch")
    publish(root / "repo", "tiny", seed=1)
    publish(root / "repo", "tiny", seed=2)  # version 2, the default
    write_inputs(root / "in")
    return {"root": root, "repo": root / "repo", "inputs": root / "in"}


@pytest.fixture(scope="module")
def local_run(setup) -> Path:
    """One CLI run of the local engine with every extra output; shared by the read-only tests."""
    out = setup["root"] / "local"
    code = main(["batch", str(setup["inputs"]), "--model-repo", str(setup["repo"]), "--model", "tiny", "--out",
                 str(out), "--color", "--confidence", "--batch-size", "3", "--device", "cpu", "--no-progress"])
    assert code == 1  # one input failed
    return out


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def label_files(out: Path) -> list[str]:
    return files_under(out / "labels")


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def without_ms(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "ms"} for r in rows]


def assert_complete(out: Path) -> None:
    """Exactly one label PNG per decodable input, a record for each, and no temporary file anywhere."""
    assert label_files(out) == sorted(f"{rel}.png" for rel in GOOD)
    assert [r["input"] for r in records(out)] == GOOD
    assert not [n for n in files_under(out) if ".tmp-" in n]


def test_local_labels_equal_the_predictor(setup, local_run) -> None:
    predictor = reference(setup["repo"] / "tiny" / "2")
    assert_complete(local_run)
    for rel in GOOD:
        image = decode_image((setup["inputs"] / rel).read_bytes())
        labels = cv2.imread(str(local_run / "labels" / f"{rel}.png"), cv2.IMREAD_UNCHANGED)
        assert labels.dtype == np.uint8 and labels.shape == image.shape[:2]
        assert_labels_match(labels, predictor, image)
        assert len(np.unique(labels)) > 1  # a model that paints one class would prove nothing
        assert (local_run / "color" / f"{rel}.png").is_file() and (local_run / "confidence" / f"{rel}.png").is_file()
    assert not (local_run / "overlay").exists()


def test_local_results_and_summary(local_run) -> None:
    rows = records(local_run)
    for row in rows:
        assert row["output"] == f"labels/{row['input']}.png"
        assert sum(row["class_counts"].values()) == row["height"] * row["width"]
        assert 0.0 < row["mean_confidence"] <= 1.0 and row["ms"] > 0
        assert (row["model"], row["version"]) == ("tiny", 2)
    assert {r["input"]: (r["height"], r["width"]) for r in rows}["z/wide.bmp"] == (24, 72)
    summary = json.loads((local_run / "summary.json").read_text())
    assert summary["counts"] == {"total": 7, "done": 6, "failed": 1, "skipped": 0}
    assert [f["input"] for f in summary["failures"]] == [BAD]
    assert "PNG" in summary["failures"][0]["reason"]
    assert (summary["model"], summary["version"]) == ("tiny", 2)
    total = sum(r["height"] * r["width"] for r in rows)
    assert sum(summary["class_pixels"].values()) == total
    assert abs(sum(summary["class_shares"].values()) - 1.0) < 1e-4
    assert summary["images_per_s"] > 0
    assert (local_run / "class_shares.png").read_bytes().startswith(b"\x89PNG")
    store = JobStore(local_run / STATE_FILE)
    try:
        [job] = store.list(kind="batch")
        assert job.state == "SUCCEEDED" and (job.done, job.failed) == (6, 1)
        assert summary["job_id"] == job.id
    finally:
        store.close()


def test_non_empty_out_is_refused_without_resume(setup, local_run) -> None:
    with pytest.raises(AlreadyExists, match="--resume"):
        run_batch([str(setup["inputs"])], model_repo=setup["repo"], model="tiny", out=local_run)
    code = main(["batch", str(setup["inputs"]), "--model-repo", str(setup["repo"]), "--model", "tiny",
                 "--out", str(local_run), "--no-progress"])
    assert code == 2


@pytest.mark.parametrize("change, match", [
    ({"model": "tiny:1"}, "version 1"),
    ({"options": BatchOptions(color=True)}, "confidence"),
    ({"inputs": ["elsewhere"]}, "inputs"),
])
def test_resume_with_different_settings_is_refused(setup, local_run, change, match) -> None:
    kwargs = {"model": "tiny", "options": BatchOptions(color=True, confidence=True), "inputs": [str(setup["inputs"])]}
    kwargs.update(change)
    before = files_under(local_run)
    with pytest.raises(InvalidArgument, match=match):
        run_batch(kwargs.pop("inputs"), model_repo=setup["repo"], out=local_run, resume=True, **kwargs)
    assert files_under(local_run) == before


def test_resume_without_state_is_refused(setup, tmp_path) -> None:
    with pytest.raises(InvalidArgument, match="no batch state"):
        run_batch([str(setup["inputs"])], model_repo=setup["repo"], model="tiny", out=tmp_path, resume=True)


def test_resume_after_a_crash_redoes_pending_items(setup, tmp_path) -> None:
    out = tmp_path / "out"
    first = run_batch([str(setup["inputs"])], model_repo=setup["repo"], model="tiny", out=out, device="cpu")
    labels_before = {rel: (out / "labels" / rel).read_bytes() for rel in label_files(out)}
    rows_before = without_ms(records(out))
    # The crash: two items never marked DONE, one of whose PNGs was renamed into place and one not,
    # a stray temporary from the write in flight, and the job still RUNNING with no summary yet.
    db = sqlite3.connect(out / STATE_FILE)
    with db:
        db.execute("UPDATE items SET state = 'PENDING', result = NULL WHERE input IN ('a/one.png', 'x.jpg')")
        db.execute("UPDATE jobs SET state = 'RUNNING', done = done - 2, result = NULL, finished_at = NULL")
    db.close()
    (out / "labels/x.jpg.png").unlink()
    (out / "labels/.x.jpg.png.tmp-0123456789ab").write_bytes(b"half a png")
    (out / "summary.json").unlink()
    resumed = run_batch(None, model_repo=setup["repo"], model=None, out=out, resume=True, device="cpu")
    assert_complete(out)
    assert {rel: (out / "labels" / rel).read_bytes() for rel in label_files(out)} == labels_before
    assert without_ms(records(out)) == rows_before
    assert resumed["counts"] == first["counts"] == {"total": 7, "done": 6, "failed": 1, "skipped": 0}
    assert json.loads((out / "summary.json").read_text())["counts"] == resumed["counts"]


# The writes after the sixth wait until the test kills the run: a sleep per write made the run slow, but a
# test process stalled for a second or two (a loaded host) found it finished and could not kill it mid-run.
KILLED_RUN = textwrap.dedent("""
    import itertools, sys, threading
    from segsvc.jobs import offline
    write = offline.ItemWorker.write
    writes = itertools.count(1)
    def held_write(self, *args):
        if next(writes) > 6:
            threading.Event().wait()  # until the kill
        return write(self, *args)
    offline.ItemWorker.write = held_write
    offline.run_batch([sys.argv[1]], model_repo=sys.argv[2], model="tiny", out=sys.argv[3], device="cpu",
                      batch_size=2, io_threads=2)
""")


def test_kill_9_then_resume_gives_one_output_per_input(setup, tmp_path) -> None:
    inputs, out = tmp_path / "many", tmp_path / "out"
    inputs.mkdir()
    names = sorted(f"img{i:02d}.png" for i in range(24))
    for i, name in enumerate(names):
        (inputs / name).write_bytes(encode(make_image(24, 24 + i, seed=i)))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(inputs), str(setup["repo"]), str(out)], env=env)
    try:
        deadline = time.monotonic() + 60
        done = 0
        while done < 4:
            assert proc.poll() is None, "the batch ended before it was killed"
            assert time.monotonic() < deadline, "the batch made no progress"
            time.sleep(0.05)
            if (out / STATE_FILE).is_file():
                try:
                    with sqlite3.connect(out / STATE_FILE, timeout=1) as db:
                        done = db.execute("SELECT count(*) FROM items WHERE state = 'DONE'").fetchone()[0]
                except sqlite3.OperationalError:  # the schema is still being created
                    pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    summary = run_batch(None, model_repo=setup["repo"], model=None, out=out, resume=True, device="cpu")
    assert summary["counts"] == {"total": 24, "done": 24, "failed": 0, "skipped": 0}
    assert label_files(out) == [f"{n}.png" for n in names]
    assert [r["input"] for r in records(out)] == names
    assert not [n for n in files_under(out) if ".tmp-" in n]


def test_ray_engine_matches_local(setup, local_run, tmp_path) -> None:
    ray = pytest.importorskip("ray", reason="the ray engine needs Ray Data: pip install 'segsvc[ray]'")
    pytest.importorskip("ray.data", reason="the ray engine needs Ray Data: pip install 'segsvc[ray]'")
    out = tmp_path / "ray"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        summary = run_batch([str(setup["inputs"])], model_repo=setup["repo"], model="tiny", out=out, engine="ray",
                            options=BatchOptions(color=True, confidence=True), batch_size=3, device="cpu")
    finally:
        ray.shutdown()
    assert_complete(out)
    for rel in label_files(local_run):
        assert (out / "labels" / rel).read_bytes() == (local_run / "labels" / rel).read_bytes(), rel
        assert (out / "color" / rel).read_bytes() == (local_run / "color" / rel).read_bytes(), rel
    assert without_ms(records(out)) == without_ms(records(local_run))
    assert summary["counts"] == {"total": 7, "done": 6, "failed": 1, "skipped": 0}
    assert [f["input"] for f in summary["failures"]] == [BAD]


def test_cli_resume_without_option_flags_keeps_the_stored_options(setup, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    args = ["--model-repo", str(setup["repo"]), "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(["batch", str(setup["inputs"]), "--model", "tiny", "--overlay", *args]) == 1  # one bad input
    with _closing(out) as store:
        job = store.list(kind="batch")[0]
        for item in store.items(job.id, "DONE")[:2]:
            store.reset_item(job.id, item.index)
    capsys.readouterr()
    assert main(["batch", "--resume", *args]) == 1
    assert "different settings" not in capsys.readouterr().err
    assert_complete(out)
    assert len(files_under(out / "overlay")) == len(label_files(out))
    assert main(["batch", "--resume", "--color", *args]) == 2  # a flag that differs is still refused
    assert "color" in capsys.readouterr().err


def test_cli_tunes_the_allocator_before_the_forward_threads_start(setup, tmp_path, monkeypatch) -> None:
    """``segsvc batch`` shares one malloc arena across its threads, as ``segsvc serve`` does."""
    import segsvc.inference.allocator as allocator
    import segsvc.jobs.offline as offline

    calls: list[str] = []
    monkeypatch.setattr(allocator, "configure_allocator", lambda: calls.append("allocator") or True)
    real_run_batch = offline.run_batch
    monkeypatch.setattr(offline, "run_batch", lambda *a, **k: calls.append("run_batch") or real_run_batch(*a, **k))
    main(["batch", str(setup["inputs"]), "--model", "tiny", "--model-repo", str(setup["repo"]),
          "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    assert calls == ["allocator", "run_batch"]


def test_cli_torch_threads_sets_the_forward_streams(setup, tmp_path, monkeypatch) -> None:
    """``segsvc batch --torch-threads 1`` runs one forward stream (one per torch thread on CPU), leaving the
    machine's other CPUs alone; 0 is the default (one per CPU, as for segsvc serve), below 0 is refused."""
    import torch

    import segsvc.jobs.offline as offline

    streams: list[int] = []
    real = offline.forward_streams
    monkeypatch.setattr(offline, "forward_streams", lambda backend: streams.append(real(backend)) or streams[-1])
    before = torch.get_num_threads()
    try:
        args = ["batch", str(setup["inputs"]), "--model", "tiny", "--model-repo", str(setup["repo"]),
                "--device", "cpu", "--no-progress"]
        main([*args, "--out", str(tmp_path / "out"), "--torch-threads", "1"])
        assert streams == [1]
        assert main([*args, "--out", str(tmp_path / "out-1"), "--torch-threads", "-1"]) == 2
    finally:
        torch.set_num_threads(before)


class _closing:
    def __init__(self, out: Path) -> None:
        self.store = JobStore(out / STATE_FILE)

    def __enter__(self) -> JobStore:
        return self.store

    def __exit__(self, *exc) -> None:
        self.store.close()


@pytest.mark.parametrize(("pixels", "sizes"), [(-1, [3, 3]), (48 * 40 * 2, [2, 2, 2]), (None, [6])])
def test_local_batches_end_at_the_pixel_budget(setup, tmp_path, monkeypatch, pixels, sizes) -> None:
    """Six same-size images: batch_size 8 alone puts them in one pass; a budget of two images' pixels
    makes passes of two; -1 on CPU means CPU_BATCH_PIXELS (set to three images' pixels here)."""
    from segsvc.jobs import offline

    monkeypatch.setattr(offline, "CPU_BATCH_PIXELS", 48 * 40 * 3)
    folder = tmp_path / "same"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes(encode(make_image(48, 40, seed=i)))
    passes: list[int] = []
    predict = offline.ItemWorker.predict
    monkeypatch.setattr(offline.ItemWorker, "predict", lambda self, prepared: (passes.append(len(prepared)),
                                                                               predict(self, prepared))[1])
    summary = run_batch([str(folder)], model_repo=setup["repo"], model="tiny", out=tmp_path / "out", device="cpu",
                        batch_size=8, max_batch_pixels=pixels)
    assert summary["counts"]["done"] == 6
    assert passes == sizes


def test_max_batch_pixels_must_be_positive(setup, tmp_path) -> None:
    with pytest.raises(InvalidArgument, match="max_batch_pixels"):
        run_batch([str(setup["inputs"])], model_repo=setup["repo"], model="tiny", out=tmp_path / "o",
                  max_batch_pixels=0)


def test_cpu_passes_run_concurrently_one_torch_thread_each(setup, tmp_path, monkeypatch) -> None:
    """With torch at 2 threads, two single-threaded passes run at once (a barrier only two concurrent
    passes can cross), and torch's thread count is restored after the run."""
    import threading

    import torch

    from segsvc.jobs import offline

    folder = tmp_path / "same"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes(encode(make_image(48, 40, seed=i)))
    barrier = threading.Barrier(2, timeout=120)
    seen: list[int] = []
    predict = offline.ItemWorker.predict

    def predict_together(self, prepared):
        seen.append(torch.get_num_threads())
        if len(seen) <= 2:
            barrier.wait()  # BrokenBarrierError unless a second pass runs meanwhile
        return predict(self, prepared)

    monkeypatch.setattr(offline.ItemWorker, "predict", predict_together)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        summary = run_batch([str(folder)], model_repo=setup["repo"], model="tiny", out=tmp_path / "out",
                            device="cpu", batch_size=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert summary["counts"]["done"] == 6 and len(seen) == 6 and set(seen) == {1}
