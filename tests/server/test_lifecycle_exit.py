"""``segsvc serve`` ends after SIGTERM even when a forward pass never ends.

The server's stop gives up on such a pass after ``drain_timeout_s``, but the pass runs on a batcher's executor
thread, which the interpreter joins at exit: the process waited for it for ever. Every wait here is on the
process's own lines or its exit, with timeouts only a hang reaches.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from segsvc import errors
from segsvc.client import SegmentationClient
from segsvc.server.app import EXIT_ABANDONED
from tests.server.conftest import make_image, publish

ROOT = Path(__file__).resolve().parents[2]
HANG_S = 120

SCRIPT = """
import sys, threading
from dataclasses import replace
from pathlib import Path
from segsvc.inference.engine import Engine
from segsvc.server.app import run
from tests.server.conftest import server_config

def stuck(self, jobs):
    print("forward pass entered", flush=True)
    threading.Event().wait()  # never ends

Engine.run = stuck
config = server_config(Path(sys.argv[1]), metrics_port=None)  # port 0: the serving line says which
run(replace(config, manager=replace(config.manager, drain_timeout_s=0.5)))
"""


def test_serve_exits_after_sigterm_with_a_stuck_forward_pass(tmp_path):
    publish(tmp_path / "repo", "m", seed=1)
    stderr = open(tmp_path / "stderr.txt", "wb")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "repo")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=stderr, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen: list[BaseException] = []

    def request(address: str) -> None:
        with SegmentationClient(address) as c:
            try:
                c.segment(make_image(16, 16), model="m", timeout_s=HANG_S)
            except errors.SegsvcError as exc:  # the shutdown ends it
                seen.append(exc)

    caller: threading.Thread | None = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "segsvc: serving on 127.0.0.1:PORT": the port it bound, not one picked before
        assert line.startswith(b"segsvc: serving on "), (tmp_path / "stderr.txt").read_text()
        address = line.decode().split("serving on ")[1].split(",")[0].strip()
        caller = threading.Thread(target=request, args=(address,), daemon=True)
        caller.start()
        assert proc.stdout.readline() == b"forward pass entered\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG_S) == EXIT_ABANDONED  # only a hang reaches the timeout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
    log = (tmp_path / "stderr.txt").read_text()
    assert "still busy after drain_timeout_s=0.5 s" in log and "m:1" in log
    assert "exiting without waiting for the forward passes of m:1" in log
    assert caller is not None
    caller.join(HANG_S)
    assert len(seen) == 1
