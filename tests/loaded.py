"""A pytest plugin that runs tests as a busy host would: ``python -m pytest -p tests.loaded tests/server/...``.

A daemon thread of the test process spins in pure Python, and the interpreter's switch interval rises to
``SEGSVC_LOADED_SWITCH_S`` seconds (default 0.02), so the event loop, the batch workers and gRPC's threads wait
for the GIL the way they do on a loaded 2-core machine. A test that assumes another thread has run within a fixed
time (a sleep before a check, a deadline of a few tenths of a second) fails here; a test that waits on events
passes, only slower: the server tests take several times as long. Tests that train in the test process are out
of its reach: every tensor operation waits for the GIL, and an epoch of ``test_served_matches_eval``'s
training takes two minutes instead of five seconds. Not part of ``make test``.

Python child processes the tests start (``segsvc serve`` in the crash and chaos tests, console scripts such as
``segsvc``) get the same thread: ``subprocess.Popen`` puts a ``sitecustomize`` that starts it first
on every child's ``PYTHONPATH`` (it then runs the next ``sitecustomize`` on the path, such as the one a crash
test's hold puts there: ``tests/holds.py``). Each such process then holds a core of its own, so a test with a
server in a subprocess runs on a machine with no core to spare. Ray starts half a dozen such processes, so the
Ray engine tests are out of its reach too (``-k "not test_ray_engine"``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

DEFAULT_SWITCH_S = 0.02


def _spin() -> None:
    while True:  # pure Python: holds the GIL until the interpreter forces a switch
        pass


def load(switch_s: float) -> None:
    """Raise the switch interval and start the spinning thread in this process."""
    sys.setswitchinterval(switch_s)
    threading.Thread(target=_spin, name="gil-hog", daemon=True).start()


def _load_python_children(site_dir: Path, switch_s: float) -> None:
    """Make every Python child process run ``load`` at start-up (its ``sitecustomize``), whatever ``env`` it gets."""
    (site_dir / "sitecustomize.py").write_text(
        f"from tests.loaded import load\nload({switch_s!r})\n"
        "from tests.holds import run_next_sitecustomize\nrun_next_sitecustomize(__spec__)\n",  # a test's hold
        encoding="utf-8")
    tests_root = str(Path(__file__).resolve().parents[1])
    original = subprocess.Popen.__init__

    def init(self, args, *rest, **kwargs):  # type: ignore[no-untyped-def]
        env = dict(os.environ if kwargs.get("env") is None else kwargs["env"])  # other programs ignore PYTHONPATH
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(site_dir), tests_root, env.get("PYTHONPATH"))))
        kwargs["env"] = env
        original(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = init  # type: ignore[method-assign]


def pytest_configure(config: pytest.Config) -> None:
    switch_s = float(os.environ.get("SEGSVC_LOADED_SWITCH_S", DEFAULT_SWITCH_S))
    load(switch_s)
    site_dir = Path(tempfile.mkdtemp(prefix="segsvc-loaded-"))
    config.add_cleanup(lambda: shutil.rmtree(site_dir, ignore_errors=True))
    _load_python_children(site_dir, switch_s)


def pytest_report_header(config: pytest.Config) -> str:
    return f"tests.loaded: a GIL-holding thread, switch interval {sys.getswitchinterval():.3f} s"
