"""A pytest plugin that runs tests as a busy host would: ``python -m pytest -p tests.loaded tests/server/...``.

A daemon thread of the test process spins in pure Python, and the interpreter's switch interval rises to
``SEGSVC_LOADED_SWITCH_S`` seconds (default 0.02), so the event loop, the batch workers and gRPC's threads wait
for the GIL the way they do on a loaded 2-core machine. A test that assumes another thread has run within a fixed
time (a sleep before a check, a deadline of a few tenths of a second) fails here; a test that waits on events
passes, only slower: the server tests take several times as long. Not part of ``make test``.
"""

from __future__ import annotations

import os
import sys
import threading

import pytest

DEFAULT_SWITCH_S = 0.02


def _spin() -> None:
    while True:  # pure Python: holds the GIL until the interpreter forces a switch
        pass


def pytest_configure(config: pytest.Config) -> None:
    switch_s = float(os.environ.get("SEGSVC_LOADED_SWITCH_S", DEFAULT_SWITCH_S))
    sys.setswitchinterval(switch_s)
    threading.Thread(target=_spin, name="gil-hog", daemon=True).start()


def pytest_report_header(config: pytest.Config) -> str:
    return f"tests.loaded: a GIL-holding thread, switch interval {sys.getswitchinterval():.3f} s"
