"""Progress bars draw on a terminal only. tqdm redraws its bar with carriage returns on stderr: on a terminal
one line updates in place, in a log file (``segsvc ... 2> log``, CI) every redraw stays. Each CLI's bar is run
twice: with stderr a file (no ``\\r`` may reach it) and a pseudo-terminal (the bar draws there).
"""

from __future__ import annotations

import argparse
import fcntl
import io
import os
import pty
import struct
import sys
import termios
import threading
from pathlib import Path
from typing import Callable, Iterator, TextIO

import pytest
from google.longrunning import operations_pb2

from segsvc import cli_jobs, jobclient
from segsvc.cli import main
from segsvc.client import SegmentationClient
from segsvc.errors import SegsvcError
from segsvc.progress import show_progress
from segsvc.v1 import jobs_pb2 as jobs_pb
from segsvc.v1 import training_pb2 as tpb

class Stderr:
    """``with stderr:`` sends ``sys.stderr`` to ``stream`` (set in the test itself: pytest sets its own capture
    again between a fixture and the test); ``text()`` is what was written there."""

    def __init__(self, stream: TextIO, text: Callable[[], str]) -> None:
        self.stream, self._text = stream, text

    def __enter__(self) -> None:
        self._real, sys.stderr = sys.stderr, self.stream

    def __exit__(self, *exc: object) -> None:
        sys.stderr = self._real
        self.stream.close()

    def text(self) -> str:
        return self._text()


@pytest.fixture
def log_stderr(tmp_path: Path) -> Stderr:
    path = tmp_path / "stderr.log"
    # read as bytes: a text read would turn each "\r" into "\n"
    return Stderr(open(path, "w"), lambda: path.read_bytes().decode())  # noqa: SIM115 (closed on leaving the with)


@pytest.fixture
def tty_stderr() -> Iterator[Stderr]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a bar fits no 0-column terminal
    attributes = termios.tcgetattr(slave)
    attributes[1] &= ~termios.OPOST  # "\n" stays "\n": every "\r" is the bar's
    termios.tcsetattr(slave, termios.TCSANOW, attributes)
    received: list[bytes] = []

    def drain() -> None:  # a pty holds little: read while the bar writes
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the terminal side is closed
                return
            if not data:
                return
            received.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()

    def text() -> str:
        reader.join()
        return b"".join(received).decode(errors="replace")
    terminal = Stderr(os.fdopen(slave, "w"), text)
    yield terminal
    if not terminal.stream.closed:
        terminal.stream.close()
    reader.join()
    os.close(master)


def _shapes(root: Path) -> Path:
    assert main(["data", "synth", str(root), "--count", "4", "--size", "32", "--no-progress"]) == 0
    return root


def _data_synth(tmp_path: Path) -> str:
    assert main(["data", "synth", str(tmp_path / "synth"), "--count", "3", "--size", "32"]) == 0
    return "writing"


def _data_check(tmp_path: Path) -> str:
    assert main(["data", "check", str(_shapes(tmp_path / "shapes") / "dataset.yaml")]) == 0
    return "checking"


def _data_offset(tmp_path: Path) -> str:
    assert main(["data", "synth", str(tmp_path / "shapes"), "--count", "6", "--size", "64", "--no-progress"]) == 0
    assert main(["data", "offset", str(tmp_path / "shapes" / "dataset.yaml"), "--class", "ring", "--split",
                 "val"]) == 0
    return "measuring"


def _segment_many(tmp_path: Path) -> str:
    with SegmentationClient("127.0.0.1:1", timeout_s=10) as c:  # nothing listens: the bar opens and closes
        with pytest.raises(SegsvcError):
            c.segment_many([_shapes(tmp_path / "shapes") / "images" / "train" / "000000.png"], model="m")
    return "segment"


def _upload_dataset(tmp_path: Path) -> str:
    shapes = _shapes(tmp_path / "shapes")
    with SegmentationClient("127.0.0.1:1", timeout_s=10) as c, pytest.raises(SegsvcError):
        c.upload_dataset(shapes, "shapes", progress=True)
    return "upload shapes"


def _fetch(tmp_path: Path) -> str:
    stream = [jobs_pb.FileChunk(path=f"{i}.png", offset=0, data=b"x", last=True) for i in range(3)]
    assert len(jobclient.download(stream, tmp_path / "fetched", progress=True)) == 3
    return "fetch"


def _done(metadata) -> operations_pb2.Operation:  # type: ignore[no-untyped-def]
    op = operations_pb2.Operation(name="jobs/j1", done=True)
    op.metadata.Pack(metadata)
    return op


def _job_wait(tmp_path: Path) -> str:
    op = _done(jobs_pb.JobMetadata(total=20, done=20, model="m", model_version=1, state=jobs_pb.JOB_STATE_SUCCEEDED))
    jobclient.JobHandle(None, op).wait(progress=True)
    return "20/20"


def _training_wait(tmp_path: Path) -> str:
    op = _done(tpb.TrainingJobMetadata(epochs=2, epoch=2, loss=0.5, val_miou=0.25, phase=tpb.TRAINING_PHASE_DONE))
    jobclient.TrainingJobHandle(None, op).wait(progress=True)
    return "val_mIoU=0.2500"


def _export(tmp_path: Path) -> str:
    from tests.export.conftest import TINY, publish

    publish(tmp_path / "repo", "m", TINY["unet"])
    assert main(["export", "m", "--repo", str(tmp_path / "repo"), "--checks", "1"]) == 0
    return "exporting m:1"


def _segsvc_batch(tmp_path: Path) -> str:
    from tests.jobs.test_offline import write_inputs
    from tests.server.conftest import publish

    publish(tmp_path / "repo", "tiny", seed=1)
    write_inputs(tmp_path / "in")
    main(["batch", str(tmp_path / "in"), "--model-repo", str(tmp_path / "repo"), "--model", "tiny", "--out",
          str(tmp_path / "out"), "--device", "cpu"])  # 1: its one broken input
    return "segmenting"


BARS = [_data_synth, _data_check, _data_offset, _segment_many, _upload_dataset, _fetch, _job_wait, _training_wait,
        _export, _segsvc_batch]


@pytest.mark.parametrize("command", BARS, ids=lambda f: f.__name__.strip("_"))
def test_a_log_file_gets_no_redraws(command: Callable[[Path], str], tmp_path: Path, log_stderr: Stderr) -> None:
    with log_stderr:
        command(tmp_path)
    err = log_stderr.text()
    assert "\r" not in err, err


@pytest.mark.parametrize("command", BARS, ids=lambda f: f.__name__.strip("_"))
def test_a_terminal_gets_the_bar(command: Callable[[Path], str], tmp_path: Path, tty_stderr: Stderr) -> None:
    with tty_stderr:
        shown = command(tmp_path)
    err = tty_stderr.text()
    assert "\r" in err and shown in err, err


def test_no_progress_draws_nothing_on_a_terminal(tmp_path: Path, tty_stderr: Stderr) -> None:
    stream = [jobs_pb.FileChunk(path="a.png", offset=0, data=b"x", last=True)]
    op = _done(jobs_pb.JobMetadata(total=20, done=20, model="m", model_version=1, state=jobs_pb.JOB_STATE_SUCCEEDED))
    with tty_stderr:
        assert main(["data", "synth", str(tmp_path / "synth"), "--count", "3", "--size", "32", "--no-progress"]) == 0
        assert len(jobclient.download(stream, tmp_path / "fetched", progress=False)) == 1
        assert jobclient.JobHandle(None, op).wait(progress=False).done == 20
    assert tty_stderr.text() == ""


class _Ops:
    """A server's operations: each WaitOperation answers the next of ``ops``."""

    def __init__(self, ops: list[operations_pb2.Operation]) -> None:
        self.ops = ops

    def _ops_call(self, method: str, request, timeout_s: float | None = None):  # type: ignore[no-untyped-def]
        return self.ops.pop(0)


def _running(done: int, state: int = jobs_pb.JOB_STATE_RUNNING) -> operations_pb2.Operation:
    op = operations_pb2.Operation(name="jobs/j1", done=state != jobs_pb.JOB_STATE_RUNNING)
    op.metadata.Pack(jobs_pb.JobMetadata(total=100, done=done, model="m", model_version=1, state=state))
    return op


def test_a_wait_in_a_log_writes_a_line_per_tenth_of_the_job_not_per_step(log_stderr: Stderr) -> None:
    """Followed in a log (``segsvc jobs wait ID 2> log``), the job's bar wrote a redraw every WaitOperation step."""
    steps = [_running(n) for n in (1, 2, 3, 12, 13, 55)] + [_running(100, jobs_pb.JOB_STATE_SUCCEEDED)]
    with log_stderr:
        jobclient.JobHandle(_Ops(steps[1:]), steps[0]).wait(progress=True)
    lines = log_stderr.text().splitlines()
    assert [line.split("|")[2].split()[0] for line in lines] == ["1/100", "12/100", "55/100", "100/100"], lines
    assert "state=succeeded" in lines[-1]


def test_jobs_status_in_a_log_prints_the_status_line_without_a_bar_frame(log_stderr: Stderr, capsys) -> None:
    """`segsvc jobs status ID 2> log` wrote its one frame of the bar (with its \\r) into the log."""

    class Client:
        def job(self, name: str) -> jobclient.JobHandle:
            return jobclient.JobHandle(self, _running(100, jobs_pb.JOB_STATE_SUCCEEDED))

    with log_stderr:
        assert cli_jobs._status(Client(), argparse.Namespace(job="j1")) == 0
    assert log_stderr.text() == ""
    assert "SUCCEEDED  100/100" in capsys.readouterr().out


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_show_progress_is_the_request_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert show_progress(True) is True and show_progress(False) is False
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert show_progress(True) is False
    monkeypatch.setattr(sys, "stderr", None)  # pythonw, or a daemon started without one
    assert show_progress(True) is False


def test_jobs_fetch_takes_no_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`segsvc jobs fetch` drew its bar whatever was asked: it had no --no-progress, as every other bar has."""
    asked: list[bool] = []

    class Handle:
        def fetch(self, dest: str, progress: bool = False) -> list[Path]:
            asked.append(progress)
            return [tmp_path / "a.png"]

    class Client:
        def __enter__(self) -> "Client":
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def job(self, name: str) -> Handle:
            return Handle()

    monkeypatch.setattr(cli_jobs, "_client", lambda args: Client())
    assert main(["jobs", "fetch", "j1", "--out", str(tmp_path), "--no-progress"]) == 0
    assert main(["jobs", "fetch", "j1", "--out", str(tmp_path)]) == 0
    assert asked == [False, True]


def _training(epoch: int, step: int, phase: int = tpb.TRAINING_PHASE_TRAINING,
              state: int = jobs_pb.JOB_STATE_RUNNING) -> operations_pb2.Operation:
    op = operations_pb2.Operation(name="jobs/t1", done=state != jobs_pb.JOB_STATE_RUNNING)
    op.metadata.Pack(tpb.TrainingJobMetadata(epochs=2, epoch=epoch, step=step, steps_per_epoch=10, loss=0.5,
                                             val_miou=0.1 * epoch, phase=phase, state=state))
    return op


def test_a_training_wait_in_a_log_writes_a_line_per_epoch(log_stderr: Stderr) -> None:
    """`segsvc train --server ... --wait 2> log`: the bar's text (loss, val mIoU) once per epoch, not per step."""
    steps = [_training(1, 2), _training(1, 5), _training(2, 1), _training(2, 9),
             _training(2, 10, tpb.TRAINING_PHASE_DONE, jobs_pb.JOB_STATE_SUCCEEDED)]
    with log_stderr:
        jobclient.TrainingJobHandle(_Ops(steps[1:]), steps[0]).wait(progress=True)
    lines = log_stderr.text().splitlines()
    assert [line.split("epoch=")[1].split(",")[0] for line in lines] == ["1/2", "2/2", "2/2"], lines
    assert "phase=done" in lines[-1] and "val_mIoU=0.2000" in lines[-1]
