"""Holding a subprocess at a chosen point until the test kills it: crash tests without timing.

A crash test (``kill -9`` of a server or a trainer "mid-run") must know that its subprocess is at the point it
means to test, and that it stays there until the signal arrives: a test that polls for progress and then kills
may find, on a stalled host, that the subprocess has finished in between (and then tests nothing, or fails).
So the subprocess holds itself: at the chosen point it appends a line to a marker file and blocks forever; the
test waits for the marker (``Hold.wait``), kills, and checks the recovery. A held thread still gets signals: a
trainer held in its main thread ends on SIGTERM as it would mid-epoch (``Terminated`` is raised in the wait).

A hold reaches every Python process started with ``Hold.env(...)`` as its environment, and every process those
start with the same variables (the server hands its environment to its trainers): the environment puts a
``sitecustomize`` on ``PYTHONPATH`` that installs the hold named by ``SEGSVC_TEST_HOLD`` (JSON, below) at start-up.
Python imports only the first ``sitecustomize`` on its path; this one, and the one of ``tests.loaded``, run the
next (``run_next_sitecustomize``), so the two work together.

The holds (``HOLDS``):

* ``event``: a trainer's ``EventLog.emit`` of the first event named ``event`` whose fields include ``fields``
  holds once the line is written (``training.events`` is patched when imported: the service never imports it).
* ``rename``: an ``os.replace`` of a temporary file (``.name.tmp-…``, ``segsvc.jobs.outputs.atomic_write``) onto
  a path matching the glob ``dst`` holds after ``after`` such renames went through: the file is written, not yet
  renamed. Every such rename after them holds too (other threads stop there as well).

This module runs in every such process at start-up: it imports only the standard library.
"""

from __future__ import annotations

import fnmatch
import importlib.abc
import importlib.machinery
import importlib.util
import itertools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

ENV_VAR = "SEGSVC_TEST_HOLD"
REPO_ROOT = Path(__file__).resolve().parents[1]
SITECUSTOMIZE = "from tests.holds import install_from_env, run_next_sitecustomize\n" \
                "install_from_env()\nrun_next_sitecustomize(__spec__)\n"


# The process side -----------------------------------------------------------------------------------------------

def reached(marker: Path, what: str) -> None:
    """Say so in ``marker``, then block this thread until the process is killed."""
    with open(marker, "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()} {what}\n")
    threading.Event().wait()


def _hold_event(spec: dict[str, Any]) -> None:
    wanted, fields, marker = spec["event"], spec.get("fields", {}), Path(spec["marker"])

    def patch(events: Any) -> None:
        emit = events.EventLog.emit

        def held_emit(self: Any, event: str, **values: Any) -> None:
            emit(self, event, **values)
            if event == wanted and all(values.get(k) == v for k, v in fields.items()):
                reached(marker, f"{event} {json.dumps(values, sort_keys=True, default=str)}")

        events.EventLog.emit = held_emit

    when_imported("training.events", patch)


def _hold_rename(spec: dict[str, Any]) -> None:
    pattern, marker, after = spec["dst"], Path(spec["marker"]), int(spec["after"])
    real_replace = os.replace
    renames = itertools.count(1)
    lock = threading.Lock()

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if ".tmp-" in os.path.basename(os.fsdecode(src)) and fnmatch.fnmatch(os.fsdecode(dst), pattern):
            with lock:
                number = next(renames)
            if number > after:
                reached(marker, f"rename {number} onto {os.fsdecode(dst)}")
        real_replace(src, dst, *args, **kwargs)

    os.replace = replace


HOLDS: dict[str, Callable[[dict[str, Any]], None]] = {"event": _hold_event, "rename": _hold_rename}


def install_from_env() -> None:
    """Install the hold ``SEGSVC_TEST_HOLD`` names, if any (``sitecustomize`` calls this)."""
    text = os.environ.get(ENV_VAR)
    if text:
        spec = json.loads(text)
        HOLDS[spec["hold"]](spec)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` right after ``name`` is first imported (and executed)."""

    def __init__(self, name: str, patch: Callable[[Any], None]) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the other finders: another patch of the same module too
        if spec is None or spec.loader is None:
            return spec
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_then_patch(module: Any) -> None:
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_then_patch  # type: ignore[method-assign]
        return spec


def when_imported(name: str, patch: Callable[[Any], None]) -> None:
    if name in sys.modules:
        patch(sys.modules[name])
    else:
        sys.meta_path.insert(0, _AfterImport(name, patch))


def run_next_sitecustomize(this: importlib.machinery.ModuleSpec | None) -> None:
    """Run the ``sitecustomize`` that Python would have imported if the one of ``this`` spec were not on its path
    (it imports only the first it finds)."""
    if this is None or this.origin is None:
        return
    here = os.path.realpath(os.path.dirname(this.origin))
    entries = [os.path.realpath(p or os.curdir) for p in sys.path]
    if here not in entries:
        return
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", sys.path[entries.index(here) + 1:])
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


# The test side --------------------------------------------------------------------------------------------------

class Hold:
    """One hold: ``env(...)`` for the subprocess, ``wait(...)`` until it is there.

    Example:
        >>> hold = Hold.event(tmp_path, "checkpoint", epoch=1)  # doctest: +SKIP
        >>> proc = subprocess.Popen(argv, env=hold.env(os.environ))  # doctest: +SKIP
        >>> hold.wait(proc)  # the trainer wrote its first checkpoint event and stays there  # doctest: +SKIP
        >>> proc.kill()  # doctest: +SKIP
    """

    def __init__(self, folder: Path, hold: str, **spec: Any) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.marker = folder / f"hold-{hold}.marker"
        self.site = folder / "hold-site"
        self.spec = {"hold": hold, "marker": str(self.marker), **spec}

    @classmethod
    def event(cls, folder: Path, event: str, **fields: Any) -> "Hold":
        """A trainer holds right after writing its first ``event`` line with these ``fields``."""
        return cls(folder, "event", event=event, fields=fields)

    @classmethod
    def rename(cls, folder: Path, dst: str, after: int) -> "Hold":
        """Renames of temporary files onto paths matching ``dst`` hold after the first ``after``."""
        return cls(folder, "rename", dst=dst, after=after)

    def env(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` with this hold: its ``sitecustomize`` and the repository first on ``PYTHONPATH``."""
        self.site.mkdir(exist_ok=True)
        (self.site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
        path = os.pathsep.join(filter(None, [str(self.site), str(REPO_ROOT), env.get("PYTHONPATH")]))
        return {**env, "PYTHONPATH": path, ENV_VAR: json.dumps(self.spec)}

    def held(self) -> list[str]:
        """The lines of the processes (threads) holding now."""
        try:
            return self.marker.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []

    def wait(self, proc: Any, timeout_s: float = 120, check: Callable[[], None] | None = None) -> list[str]:
        """Wait until a process holds (``timeout_s`` is for a hang only). ``proc`` (a ``Popen``) must not end
        before; ``check()``, when given, is called on every poll to fail earlier (a job that ended)."""
        deadline = time.monotonic() + timeout_s
        while not (lines := self.held()):
            if proc.poll() is not None:
                err = proc.stderr.read()[-3000:] if proc.stderr is not None else ""
                raise AssertionError(f"the process ended with status {proc.returncode} before it reached the hold "
                                     f"{self.spec}: {err}")
            if check is not None:
                check()
            if time.monotonic() > deadline:
                raise AssertionError(f"no process reached the hold {self.spec} in {timeout_s} s")
            time.sleep(0.05)
        return lines
