"""Fixtures of the deploy checks: the repository's deploy files, the validators, a real server."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.server.conftest import start_server  # noqa: F401  (a real server on 127.0.0.1:0)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent  # the test extra installs its checkers next to this interpreter


def tool(name: str, skip_why: str | None = None) -> str:
    """The path of a checker beside this Python (the test extra) or on PATH.

    Absent, a checker of the test extra fails the test (``make install`` installs it); an optional one
    (``skip_why`` given, e.g. promtool from Debian's prometheus package) skips it with that reason.
    """
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        if skip_why is None:
            pytest.fail(f"{name} is missing: it comes with the test extra (make install, or pip install -e '.[test]')")
        pytest.skip(f"{name} is not installed: {skip_why}")
    return found


@pytest.fixture(scope="session")
def deploy_dir() -> Path:
    return DEPLOY
