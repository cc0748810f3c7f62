"""``segsvc batch`` on awkward inputs: glob characters in folder names, per-input write failures, a second run."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

import pytest

from segsvc.cli import main
from segsvc.errors import ArtifactError
from segsvc.jobs import offline
from segsvc.jobs.offline import run_batch
from tests.server.conftest import encode, make_image, publish


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("robust")
    publish(root / "repo", "tiny", seed=1)
    return root / "repo"


def _png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(make_image(16, 16, seed=seed)))


def _records(out: Path) -> list[str]:
    return [json.loads(line)["input"] for line in (out / "results.jsonl").read_text().splitlines()]


def _batch(repo: Path, out: Path, *inputs: str, resume: bool = False) -> int:
    args = ["batch", *inputs, "--model-repo", str(repo), "--out", str(out), "--device", "cpu", "--no-progress"]
    return main([*args, *(["--resume"] if resume else ["--model", "tiny"])])


# -- 1: only what the user typed is a pattern --------------------------------------
@pytest.mark.parametrize("spec", ["photos/*.png", "photos", "photos/mine.png"])
def test_glob_characters_in_the_current_folder_are_literal(repo, tmp_path, monkeypatch, spec) -> None:
    here = tmp_path / "d[12]"
    _png(here / "photos" / "mine.png")
    _png(tmp_path / "d1" / "photos" / "OTHER.png", seed=1)  # what `d[12]` matches as a pattern
    monkeypatch.chdir(here)
    summary = run_batch([spec], model_repo=repo, model="tiny", out=tmp_path / "out", device="cpu")
    assert summary["counts"] == {"total": 1, "done": 1, "failed": 0, "skipped": 0}
    assert _records(tmp_path / "out") == ["mine.png"]


def test_an_absolute_input_under_a_bracketed_folder_is_literal(repo, tmp_path) -> None:
    here = tmp_path / "d[12]"
    _png(here / "photos" / "mine.png")
    _png(tmp_path / "d1" / "photos" / "OTHER.png", seed=1)
    summary = run_batch([f"{here}/photos/*.png"], model_repo=repo, model="tiny", out=tmp_path / "out", device="cpu")
    assert summary["counts"]["total"] == 1
    assert _records(tmp_path / "out") == ["mine.png"]


@pytest.mark.parametrize("spec", ["photos/*.png", "photos", "photos/mine.png"])
def test_bracketed_folders_below_a_common_root_stay_literal(repo, tmp_path, monkeypatch, spec) -> None:
    here = tmp_path / "d[12]"
    _png(here / "photos" / "mine.png")
    _png(tmp_path / "d1" / "photos" / "OTHER.png", seed=1)
    _png(tmp_path / "e" / "x.png", seed=2)
    monkeypatch.chdir(here)
    run_batch([spec, "../e/x.png"], model_repo=repo, model="tiny", out=tmp_path / "out", device="cpu")
    assert _records(tmp_path / "out") == ["d[12]/photos/mine.png", "e/x.png"]


# -- 2: an input whose outputs cannot be written fails alone ------------------------
def test_an_unwritable_output_fails_its_input_and_the_run_goes_on(repo, tmp_path, capsys) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    for i, rel in enumerate(["a.png", "a.png.png/b.png", "c.png"]):  # labels/a.png.png: a file and a folder
        _png(inputs / rel, seed=i)
    assert _batch(repo, out, str(inputs)) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"total": 3, "done": 2, "failed": 1, "skipped": 0}
    assert (out / "results.jsonl").is_file()
    (failure,) = summary["failures"]
    assert "a.png.png" in failure["reason"] and "Traceback" not in capsys.readouterr().err
    assert _batch(repo, out, resume=True) == 1  # nothing left to do: the same counts, no crash
    assert json.loads((out / "summary.json").read_text())["counts"] == summary["counts"]


def test_a_full_disk_still_stops_the_run(repo, tmp_path, monkeypatch, capsys) -> None:
    _png(tmp_path / "in" / "a.png")

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(offline.JobOutputs, "write_item", full)
    assert _batch(repo, tmp_path / "out", str(tmp_path / "in")) == 2
    assert "No space left" in capsys.readouterr().err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_forward_pass_error_of_one_image_fails_that_image(repo, tmp_path, monkeypatch) -> None:
    _png(tmp_path / "in" / "a.png")  # 16x16: the pass refuses it
    (tmp_path / "in" / "c.png").write_bytes(encode(make_image(24, 24, seed=1)))
    real = offline.ItemWorker.predict

    def picky(self, prepared):
        if any(p.pixels == 16 * 16 for p in prepared):
            raise offline.InvalidArgument("too small for this model")
        return real(self, prepared)

    monkeypatch.setattr(offline.ItemWorker, "predict", picky)
    summary = run_batch([str(tmp_path / "in")], model_repo=repo, model="tiny", out=tmp_path / "out", device="cpu")
    assert summary["counts"] == {"total": 2, "done": 1, "failed": 1, "skipped": 0}
    assert summary["failures"] == [{"input": "a.png", "reason": "too small for this model"}]


# -- 4: one run at a time per output folder -----------------------------------------
def test_a_second_run_on_a_busy_out_folder_is_refused(repo, tmp_path, capsys) -> None:
    _png(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    assert _batch(repo, out, str(tmp_path / "in")) == 0
    (out / "labels" / "a.png.tmp-123").write_bytes(b"a live run's write in flight")
    with open(out / offline.LOCK_FILE, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert _batch(repo, out, resume=True) == 2
        err = capsys.readouterr().err
    assert "a batch is already running in" in err and len(err.strip().splitlines()) == 1
    assert (out / "labels" / "a.png.tmp-123").exists()  # the live run's temporaries are left alone
    assert _batch(repo, out, resume=True) == 0  # the lock released: resume works, the lock file is no output
    assert offline.LOCK_FILE not in _records(out)
    assert os.path.exists(out / offline.LOCK_FILE)


# -- 3: an error inside a Ray worker reaches the user as one line --------------------
def test_a_ray_worker_error_is_one_line(repo, tmp_path, monkeypatch, capsys) -> None:
    ray = pytest.importorskip("ray", reason="the ray engine needs Ray Data: pip install 'segsvc[ray]'")
    pytest.importorskip("ray.data", reason="the ray engine needs Ray Data: pip install 'segsvc[ray]'")
    _png(tmp_path / "in" / "a.png")

    class FullDisk:  # defined here so that Ray ships it by value to its worker processes
        def __init__(self, **kwargs) -> None:
            pass

        def __call__(self, batch):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(offline, "RayItemWorker", FullDisk)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        code = main(["batch", str(tmp_path / "in"), "--model-repo", str(repo), "--model", "tiny", "--out",
                     str(tmp_path / "out"), "--engine", "ray", "--device", "cpu", "--no-progress"])
    finally:
        ray.shutdown()
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [n for n in err.splitlines() if n.startswith("segsvc: error:")]  # Ray logs lines of its own
    assert "OSError: [Errno 28] No space left on device" in line and "Traceback" not in err, err


def test_a_new_batch_refused_by_a_folder_of_other_files_leaves_no_lock_file_there(repo, tmp_path) -> None:
    _png(tmp_path / "in" / "a.png")
    documents = tmp_path / "documents"
    (documents / "notes.txt").parent.mkdir()
    (documents / "notes.txt").write_text("mine")
    assert _batch(repo, documents, str(tmp_path / "in")) == 2  # not empty: refused
    assert sorted(p.name for p in documents.iterdir()) == ["notes.txt"]


# -- review: errors that are not one input's stop the run -----------------------------
def test_a_model_broken_for_every_image_stops_the_run_after_one_pass(repo, tmp_path, monkeypatch, capsys) -> None:
    for i in range(3):
        _png(tmp_path / "in" / f"{i}.png", seed=i)
    calls = []

    def broken(self, prepared):
        calls.append(len(prepared))
        raise ArtifactError("the model broke the [N, C, H, W] contract")

    monkeypatch.setattr(offline.ItemWorker, "predict", broken)
    assert _batch(repo, tmp_path / "out", str(tmp_path / "in")) == 2
    assert "broke the [N, C, H, W] contract" in capsys.readouterr().err
    assert calls == [3]  # one pass, not one more per image
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_broken_model_stops_a_ray_style_batch_too(repo, tmp_path, monkeypatch) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", seed=1)
    worker = offline.ItemWorker(str(repo), "tiny", 1, str(tmp_path / "out"), offline.BatchOptions(), device="cpu")

    def broken(prepared):
        raise ArtifactError("the model broke the [N, C, H, W] contract")

    monkeypatch.setattr(worker, "predict", broken)
    with pytest.raises(ArtifactError):
        worker.process([(0, str(tmp_path / "a.png"), "a.png"), (1, str(tmp_path / "b.png"), "b.png")])


def test_a_shared_output_folder_problem_stops_the_run_and_resume_redoes_it(repo, tmp_path, monkeypatch,
                                                                           capsys) -> None:
    for i in range(2):
        _png(tmp_path / "in" / f"{i}.png", seed=i)
    out = tmp_path / "out"
    real = offline.ItemWorker.write

    def killed(self, *args):
        raise KeyboardInterrupt  # the run stops before any write, as a kill would

    monkeypatch.setattr(offline.ItemWorker, "write", killed)
    with pytest.raises(KeyboardInterrupt):
        run_batch([str(tmp_path / "in")], model_repo=repo, model="tiny", out=out, device="cpu")
    monkeypatch.setattr(offline.ItemWorker, "write", real)
    if (out / "labels").is_dir():
        for p in (out / "labels").iterdir():
            p.unlink()
        (out / "labels").rmdir()
    (out / "labels").write_text("a stray file where the labels folder goes")
    capsys.readouterr()
    assert _batch(repo, out, resume=True) == 2
    assert "labels" in capsys.readouterr().err
    (out / "labels").unlink()
    assert _batch(repo, out, resume=True) == 0
    assert json.loads((out / "summary.json").read_text())["counts"] == {"total": 2, "done": 2, "failed": 0,
                                                                       "skipped": 0}


# -- review: a refused run leaves nothing behind ------------------------------------
def test_a_refused_new_batch_creates_no_out_folder(repo, tmp_path) -> None:
    assert _batch(repo, tmp_path / "newout", str(tmp_path / "nothere")) == 2
    assert not (tmp_path / "newout").exists()


def test_a_refused_resume_leaves_no_lock_file_in_an_unrelated_folder(repo, tmp_path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("mine")
    assert _batch(repo, docs, resume=True) == 2
    assert sorted(p.name for p in docs.iterdir()) == ["notes.txt"]


def test_a_new_batch_holds_the_lock_while_it_runs(repo, tmp_path, monkeypatch) -> None:
    _png(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    real = offline._execute
    tried = []

    def check(store, job, root, out_dir, **kwargs):
        with open(out_dir / offline.LOCK_FILE, "a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        tried.append(True)
        return real(store, job, root, out_dir, **kwargs)

    monkeypatch.setattr(offline, "_execute", check)
    assert _batch(repo, out, str(tmp_path / "in")) == 0
    assert tried == [True]


def test_a_new_batch_holds_the_lock_before_it_creates_its_job(repo, tmp_path, monkeypatch) -> None:
    """Two new runs into one empty folder could both find it empty and both submit a job (--resume then found
    two): the folder is locked before the inputs are resolved and the job is created."""
    _png(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    real = offline.batch_inputs
    tried = []

    def check(specs):
        with open(out / offline.LOCK_FILE, "a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        tried.append(True)
        return real(specs)

    monkeypatch.setattr(offline, "batch_inputs", check)
    assert _batch(repo, out, str(tmp_path / "in")) == 0
    assert tried == [True]


def test_a_write_error_below_a_kind_folder_that_is_not_a_folder_is_the_runs(tmp_path) -> None:
    """sub/x.png's labels/sub fails with ENOTDIR when labels/ is a file: every input's problem, not sub/x.png's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "labels").write_text("not a folder")
    error = NotADirectoryError(errno.ENOTDIR, "Not a directory", str(out / "labels" / "sub"))
    assert offline.item_write_problem(error, out) is None
    (out / "labels").unlink()
    (out / "labels").mkdir()
    (out / "labels" / "sub").write_text("another input's output")  # a clash inside a kind folder: that input's
    assert "cannot write its output labels/sub" in offline.item_write_problem(error, out)
