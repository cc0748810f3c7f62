"""``segsvc jobs`` and ``segsvc train --server`` as a user meets them: what a stopped wait says, and uploads."""

from __future__ import annotations

import argparse
import glob
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import segsvc.cli_client
from segsvc import cli_jobs
from segsvc.cli import main
from segsvc.client import SegmentationClient
from segsvc.errors import Cancelled, DeadlineExceeded, Unavailable
from segsvc.inference.codec import encode_png
from segsvc.jobclient import JobHandle
from segsvc.jobs.batch import JobsConfig
from tests.holds import Hold
from tests.server.conftest import gated, make_image, publish, start_server, wait_for  # noqa: F401  (fixtures)


def scans_server(start_server, tmp_path):  # type: ignore[no-untyped-def]  # noqa: F811
    """A real in-process server publishing ``tiny``, with jobs over ``data/`` holding ``scans/`` (three images)."""
    publish(tmp_path / "repo", "tiny", seed=11)
    (tmp_path / "data" / "scans").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "data" / "scans" / f"{i}.png").write_bytes(encode_png(make_image(16, 16, seed=i)))
    return start_server(tmp_path / "repo", jobs=JobsConfig(state_dir=tmp_path / "state",
                                                           output_root=tmp_path / "out", data_root=tmp_path / "data"))


@pytest.fixture
def held_job(start_server, tmp_path, gated):  # noqa: F811
    """A real server with a batch job that stays RUNNING (its first image held in the model) until the end."""
    server = scans_server(start_server, tmp_path)
    with server.client(timeout_s=60) as client:
        job = client.submit_job(["scans"], model="tiny")
        wait_for(lambda: len(gated.ran) >= 1, 300)
    yield server, job.id
    gated.gate.set()


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


ROOT = Path(__file__).resolve().parents[1]


def test_ctrl_c_of_a_wait_says_the_job_goes_on_and_how_to_follow_it(held_job, monkeypatch, capsys):
    """It printed only "segsvc: interrupted": nothing said that the job still runs on the server."""
    server, job_id = held_job

    def ctrl_c(self, step_s):  # the user presses Ctrl-C while the command waits
        # What Python's SIGINT handler raises, raised here: the signal itself reached the handler only when nothing
        # earlier in the test process had changed SIGINT's disposition (a full suite run once made this wait hang).
        raise KeyboardInterrupt

    monkeypatch.setattr(JobHandle, "_wait_step", ctrl_c)
    assert main(["jobs", "wait", job_id, "--server", server.address, "--no-progress"]) == 130
    err = _one_line(capsys)
    assert f"job {job_id} goes on on the server" in err, err
    assert f"segsvc jobs wait {job_id} --server {server.address}" in err, err
    with server.client(timeout_s=60) as client:
        status = client.job(job_id).status()
    assert status.state == "RUNNING" and not status.cancel_requested


def test_a_server_lost_during_a_wait_names_the_job_to_follow_instead_of_grpc_words(held_job, monkeypatch, capsys):
    """It printed gRPC's "failed to connect to all addresses; last error: UNKNOWN: ipv4:...: Connection refused",
    and users ran `segsvc train --wait` again: a second job, while the first resumed with the server."""
    server, job_id = held_job
    step = JobHandle._wait_step

    def server_gone(self, step_s):  # from now on nothing listens where the server was
        self._client = SegmentationClient("127.0.0.1:1", timeout_s=60)
        return step(self, step_s)

    monkeypatch.setattr(JobHandle, "_wait_step", server_gone)
    assert main(["jobs", "wait", job_id, "--server", server.address, "--no-progress"]) == 2
    err = _one_line(capsys)
    assert err.startswith(f"segsvc: error: lost the server at {server.address} while waiting for job {job_id}"), err
    assert f"segsvc jobs wait {job_id} --server {server.address}" in err and "failed to connect" not in err, err


def test_a_named_file_that_is_not_an_image_is_refused_before_the_upload(tmp_path, monkeypatch, capsys):
    """`jobs submit notes.txt --upload` sent it, and the server answered "input '.' matches no image under the data
    root" (an upload has no data root); beside images it was left out without a word."""
    monkeypatch.setattr(segsvc.cli_client, "CONNECT_TIMEOUT_S", 0.5)  # nothing listens: the files come first
    (tmp_path / "a.png").write_bytes(encode_png(make_image(16, 16)))
    (tmp_path / "notes.txt").write_text("not an image")
    for inputs in ([tmp_path / "notes.txt"], [tmp_path / "a.png", tmp_path / "notes.txt"]):
        assert main(["jobs", "submit", *map(str, inputs), "--upload", "--server", "127.0.0.1:1"]) == 2
        err = _one_line(capsys)
        assert err.startswith(f"segsvc: error: {tmp_path / 'notes.txt'} is not an image file"), err


def test_a_server_stopped_during_a_wait_is_not_reported_as_a_cancelled_job(tmp_path, monkeypatch, capsys):
    """SIGTERM of `segsvc serve` while `segsvc train --wait` (or `jobs wait`) waited printed "segsvc: error:
    CANCELLED": the stopping server cancels the calls in flight, and the job, which it keeps to resume, read as
    cancelled. A real server, its job held at its second label write (tests.holds) so that it cannot end."""
    publish(tmp_path / "repo", "m", seed=5)
    (tmp_path / "data").mkdir()
    for i in range(4):
        (tmp_path / "data" / f"{i}.png").write_bytes(encode_png(make_image(32, 32, seed=i)))
    hold = Hold.rename(tmp_path, glob.escape(str(tmp_path / "out")) + "/*/labels/*", after=1)
    env = hold.env({**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"})
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "segsvc", "serve", "--model-repo", str(tmp_path / "repo"), "--host", "127.0.0.1",
             "--port", "0", "--metrics-port", "-1", "--torch-threads", "1", "--no-warmup", "--max-batch-size", "1",
             "--state-dir", str(tmp_path / "state"), "--data-root", str(tmp_path / "data"),
             "--output-root", str(tmp_path / "out")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving on" in line, (tmp_path / "serve.log").read_text()
        address = line.split("serving on ")[1].split(",")[0].strip()
        with SegmentationClient(address, timeout_s=60) as client:
            job_id = client.submit_job(["."], model="m").id
        hold.wait(proc)
        step = JobHandle._wait_step
        stopping: list[threading.Timer] = []

        def sigterm_while_waiting(self, step_s):  # the server cancels the call in flight (CANCELLED), lets it end
            # and refuses the next (UNAVAILABLE), or refuses it: the same for the user, the job is kept
            if not stopping:
                stopping.append(threading.Timer(0.3, proc.send_signal, (signal.SIGTERM,)))
                stopping[0].start()
            return step(self, step_s)

        monkeypatch.setattr(JobHandle, "_wait_step", sigterm_while_waiting)
        assert main(["jobs", "wait", job_id, "--server", address, "--no-progress"]) == 2
        err = _one_line(capsys)
        assert err.startswith(f"segsvc: error: lost the server at {address} while waiting for job {job_id}"), err
    finally:
        proc.kill()
        proc.wait(60)


@pytest.mark.parametrize("error", [DeadlineExceeded("Deadline Exceeded"), Cancelled("CANCELLED"),
                                   Unavailable("failed to connect to all addresses")],
                         ids=["server-hangs", "server-stops", "server-gone"])
def test_a_wait_cut_by_the_server_says_the_job_is_kept(error):
    """The ways a server ends a wait (a stopping one cancels the call in flight, or nothing answers the next; a
    hung one, or a network that dropped without a reset, lets the call's deadline pass) read the same: the job is
    kept, and how to follow it again. A cancelled call printed "CANCELLED", a hung server "Deadline Exceeded"."""

    class Job:
        id = "j1"

        def wait(self, progress: bool) -> None:
            raise error

    args = argparse.Namespace(server="host:1", progress=False)
    with pytest.raises(Unavailable, match=r"^lost the server at host:1 while waiting for job j1; .*"
                                          r"`segsvc jobs wait j1 --server host:1` follows it then"):
        cli_jobs.follow(Job(), args)


@pytest.fixture
def half_done_job(start_server, tmp_path, monkeypatch):  # noqa: F811
    """A real server with a batch job that wrote the outputs of its first image and holds its second (one image
    a batch) until the end of the test."""
    from segsvc.inference.batcher import BatchingConfig
    from segsvc.inference.engine import Engine

    gate, runs = threading.Event(), []
    original = Engine.run

    def run(self, jobs):  # type: ignore[no-untyped-def]
        runs.append(len(jobs))
        if len(runs) > 1:
            gate.wait(300)
        return original(self, jobs)

    monkeypatch.setattr(Engine, "run", run)
    publish(tmp_path / "repo", "tiny", seed=11)
    (tmp_path / "data" / "scans").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "data" / "scans" / f"{i}.png").write_bytes(encode_png(make_image(16, 16, seed=i)))
    server = start_server(tmp_path / "repo", batching=BatchingConfig(max_batch_size=1, max_delay_s=0.005,
                                                                     max_queue_size=64),
                          jobs=JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out",
                                          data_root=tmp_path / "data"))
    with server.client(timeout_s=60) as client:
        job = client.submit_job(["scans"], model="tiny")
        out = tmp_path / "out" / job.id
        wait_for(lambda: len(runs) >= 2 and any(p.is_file() and not p.name.startswith(".") for p in out.rglob("*")),
                 300)
    try:
        yield server, job.id
    finally:
        gate.set()


def test_a_fetch_of_a_running_job_is_refused_in_one_line_saying_what_to_do(half_done_job, tmp_path, capsys):
    """`segsvc jobs fetch` of a running job printed "fetched 1 files into out" like a finished one: the folder
    looked complete, without the rest of the label maps, results.jsonl or summary.json. The server now refuses
    (FetchJobOutputs streams a finished job's files), and the command says so in one line, writing nothing."""
    server, job_id = half_done_job
    with server.client(timeout_s=60) as client:  # its first image's files are in place: recorded DONE just after
        wait_for(lambda: client.job(job_id).status().done == 1, 300)
    out = tmp_path / "fetched"
    assert main(["jobs", "fetch", job_id, "--out", str(out), "--server", server.address, "--no-progress"]) == 2
    err = _one_line(capsys)
    assert err == (f"segsvc: error: job {job_id} is RUNNING (1 of 3 images done): its outputs are fetched once it "
                   f"has finished; wait for it (`segsvc jobs wait {job_id}`, WaitOperation) and fetch again, or "
                   f"cancel it (`segsvc jobs cancel {job_id}`) and wait for it to end, to fetch the outputs written so far\n"), err
    assert not out.exists()


def test_jobs_submit_sends_the_tile_overlap(monkeypatch, capsys):
    """`jobs submit` had --tile-size but no --overlap, though the server's too-many-tiles refusal says "use larger
    tiles or less overlap"; the overlap reaches the request's tiling options."""
    sent: list[dict] = []

    class Client:
        def __enter__(self) -> "Client":
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def submit_job(self, paths, **options):  # type: ignore[no-untyped-def]
            sent.append(options)
            return argparse.Namespace(id="j1")

    monkeypatch.setattr(cli_jobs, "_client", lambda args: Client())
    assert main(["jobs", "submit", "scans", "--tile-size", "256", "--overlap", "0.5"]) == 0
    assert capsys.readouterr().out == "j1\n"
    assert sent[0]["tile_size"] == 256 and sent[0]["tile_overlap"] == 0.5
    request = SegmentationClient.request_template(tile_size=256, tile_overlap=sent[0]["tile_overlap"])
    assert request.options.tiling.overlap == 0.5
