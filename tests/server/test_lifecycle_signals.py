"""``segsvc serve`` under signals: SIGHUP, a signal during a start that fails, a model load that hangs.

Each test runs the real command (``segsvc.cli.main``) in a subprocess, some with one step replaced by a hook that
prints a line and then holds. Every wait is on the process's own lines or its exit, with timeouts only a hang
reaches; a process that ends without the awaited line fails the wait at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from segsvc import errors
from segsvc.client import SegmentationClient
from segsvc.server.app import EXIT_ABANDONED
from tests.server.conftest import make_image, publish

ROOT = Path(__file__).resolve().parents[2]
HANG_S = 120

SCRIPT = """
import asyncio, sys, threading
from segsvc.cli import main
from segsvc.inference.loader import VersionLoader
from segsvc.inference.manager import ModelManager

mode = sys.argv[1]
if mode == "hung-build":
    def _build_engine(self, name, version):
        print("build entered", flush=True)
        threading.Event().wait()  # never ends
    VersionLoader._build_engine = _build_engine
elif mode == "held-clean-up":  # the models' stop (also run by a failed start's clean-up) waits for a line
    original = ModelManager.stop
    async def held(self):
        print("manager stop entered", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        return await original(self)
    ModelManager.stop = held
sys.exit(main(["serve", "--model-repo", sys.argv[2], "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
               "--no-warmup", "--torch-threads", "1", "--io-threads", "2", "--grace-s", "0",
               "--log-format", "text", *sys.argv[3:]]))
"""


class _Lines:
    """The lines of one stream of the process, read by a thread as they come."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, text: str) -> str:
        """The first line holding ``text``; fails once the stream ends without one (or a hang: ``HANG_S``)."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(text in line for line in self.lines) or self._ended, HANG_S)
            line = next((line for line in self.lines if text in line), None)
            assert found and line is not None, f"no line with {text!r}; the process wrote:\n" + self.text()
            return line

    def wait_ended(self) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self._ended, HANG_S)

    def text(self) -> str:
        return "\n".join(self.lines)


class ServeProcess:
    """``segsvc serve`` with ``mode``'s hook (``SCRIPT``) on the repository ``repo``, plus ``flags``."""

    def __init__(self, mode: str, repo: Path, *flags: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SCRIPT, mode, str(repo), *flags], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.stdout = _Lines(self.proc.stdout)
        self.stderr = _Lines(self.proc.stderr)

    def address(self) -> str:
        line = self.stdout.wait_for("segsvc: serving on ")  # the port it bound
        return line.split("serving on ")[1].split(",")[0].strip()

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def send_line(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()

    def wait(self) -> int:
        """The exit status (only a hang reaches the timeout), once all its output is read."""
        code = self.proc.wait(HANG_S)
        self.stdout.wait_ended()
        self.stderr.wait_ended()
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()


def test_sighup_without_a_token_file_is_logged_and_ignored(tmp_path):
    """Only a server with a token file handled SIGHUP: any other died of it (the default action)."""
    publish(tmp_path, "m", seed=1)
    server = ServeProcess("plain", tmp_path)
    try:
        address = server.address()
        server.signal(signal.SIGHUP)
        assert "no token file" in server.stderr.wait_for("SIGHUP received")
        with SegmentationClient(address) as client:
            assert client.health(timeout_s=60) == "SERVING"
        server.signal(signal.SIGTERM)
        assert server.wait() == 0, server.stderr.text()
    finally:
        server.close()
    assert "stopped" in server.stderr.text()


def test_sighup_with_a_token_file_reads_it_again(tmp_path):
    """SIGHUP still reloads the tokens (it is logged now): a rotated token works once the file was read again."""
    publish(tmp_path / "repo", "m", seed=1)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("tok-one\n")
    server = ServeProcess("plain", tmp_path / "repo", "--token-file", str(tokens))
    try:
        address = server.address()
        (tmp_path / "tokens.new").write_text("tok-two\n")
        os.replace(tmp_path / "tokens.new", tokens)
        server.signal(signal.SIGHUP)
        server.stderr.wait_for("SIGHUP received: reading the token file again")
        server.stderr.wait_for("read again")
        with SegmentationClient(address, token="tok-two") as client:
            assert client.segment(make_image(16, 16), model="m", timeout_s=HANG_S).mask.shape == (16, 16)
        server.signal(signal.SIGTERM)
        assert server.wait() == 0, server.stderr.text()
    finally:
        server.close()


def test_signals_during_a_failed_start_do_not_cut_its_clean_up_nor_hide_its_error(tmp_path):
    """A signal while a failed start stopped what it had started cancelled that clean-up, and the process
    exited 0 as if asked to stop, the start's error lost. A second signal then is logged, and changes nothing."""
    server = ServeProcess("held-clean-up", tmp_path, "--models", "missing")
    try:
        server.stdout.wait_for("manager stop entered")  # the failed start's clean-up, held
        server.signal(signal.SIGTERM)
        server.stderr.wait_for("SIGTERM received")
        server.signal(signal.SIGINT)
        assert "already" in server.stderr.wait_for("SIGINT received")
        server.send_line()  # the clean-up goes on
        code = server.wait()
    finally:
        server.close()
    log = server.stderr.text()
    assert code == 2, log  # segsvc's status for an error it names
    assert "segsvc: error: " in log and "'missing'" in log.split("segsvc: error: ")[1]
    assert "stopped" in log  # the clean-up ran to its end


def test_sigterm_ends_a_start_whose_model_load_hangs(tmp_path):
    """The build of a model runs on a thread; cancelling the start does not end it, and the interpreter waited
    for that thread at exit: after SIGTERM the process lived for as long as the load hung (for ever)."""
    publish(tmp_path, "m", seed=1)
    server = ServeProcess("hung-build", tmp_path, "--drain-timeout-s", "0.5")
    try:
        server.stdout.wait_for("build entered")
        server.signal(signal.SIGTERM)
        code = server.wait()
    finally:
        server.close()
    log = server.stderr.text()
    assert code == EXIT_ABANDONED, log
    line = server.stderr.wait_for("exiting without waiting for")
    assert "_build_engine" in line


def test_sigterm_ends_a_serving_server_whose_model_load_hangs(tmp_path):
    """The same with the server serving: a LoadModel whose build hangs kept the process alive after its stop."""
    server = ServeProcess("hung-build", tmp_path, "--drain-timeout-s", "0.5", "--poll-interval-s", "0")
    seen: list[BaseException] = []

    def load(address: str) -> None:
        with SegmentationClient(address) as client:
            try:
                client.load_model("m")
            except errors.SegsvcError as exc:  # the stop ends the call
                seen.append(exc)

    caller: threading.Thread | None = None
    try:
        address = server.address()  # an empty repository: it serves (NOT_SERVING)
        publish(tmp_path, "m", seed=1)
        caller = threading.Thread(target=load, args=(address,), daemon=True)
        caller.start()
        server.stdout.wait_for("build entered")
        server.signal(signal.SIGTERM)
        code = server.wait()
    finally:
        server.close()
    assert code == EXIT_ABANDONED, server.stderr.text()
    assert "_build_engine" in server.stderr.wait_for("exiting without waiting for")
    assert caller is not None
    caller.join(HANG_S)
    assert len(seen) == 1


def test_a_failed_start_logs_what_failed_and_no_drain(tmp_path):
    """A start that failed logged 'draining: health NOT_SERVING, ... grace for requests in flight' first (a
    server that never served had nothing to drain), and the reason only after, in the command's last line."""
    server = ServeProcess("plain", tmp_path, "--models", "missing")
    try:
        code = server.wait()
    finally:
        server.close()
    lines = server.stderr.lines
    assert code == 2, server.stderr.text()
    assert not any("draining" in line for line in lines), server.stderr.text()
    failed = next(i for i, line in enumerate(lines) if "start failed" in line)
    assert "'missing'" in lines[failed]
    assert failed < next(i for i, line in enumerate(lines) if line.endswith("stopped"))
