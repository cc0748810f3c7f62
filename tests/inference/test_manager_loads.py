"""Loads of one model version that overlap: a caller cancelled during the build, a retry, callers side by side.

A LoadModel whose client deadline passed while its model was building left the build running on its thread,
and the retry started a second build beside it (twice the memory) and the first one's result was thrown away.
Every wait here is on an event (the build's gate, or a step of the event loop), never on a sleep.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import pytest

from segsvc.errors import ArtifactError
from segsvc.inference.loader import VersionLoader
from segsvc.inference.manager import ModelManager
from segsvc.models.artifact import WEIGHTS_FILE
from tests.inference.managers import with_manager
from tests.server.conftest import publish

GATE_S = 120  # waits on the test's own gate: only a hang reaches it


class BuildGate:
    """``VersionLoader._build_engine`` counted per version; builds of ``held`` wait until ``open()``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, held: int) -> None:
        self.builds: Counter[int] = Counter()
        self.held = held
        self._entered = threading.Event()
        self._go = threading.Event()
        build = VersionLoader._build_engine

        def gated(loader, name, version):  # type: ignore[no-untyped-def]
            self.builds[version] += 1
            if version == self.held:
                self._entered.set()
                assert self._go.wait(GATE_S), "the test never opened the build gate"
            return build(loader, name, version)

        monkeypatch.setattr(VersionLoader, "_build_engine", gated)

    async def entered(self) -> None:
        """Wait until a build of the held version runs on its thread."""
        assert await asyncio.to_thread(self._entered.wait, GATE_S), "the held version was never built"

    def open(self) -> None:
        self._go.set()


@pytest.fixture
def closing_gate():
    """Gates opened at teardown too, so a failing test leaves no build thread waiting."""
    gates: list[BuildGate] = []
    yield gates.append
    for gate in gates:
        gate.open()


def test_a_load_retried_while_the_cancelled_one_still_builds_joins_that_build(tmp_path, monkeypatch, closing_gate):
    publish(tmp_path, "m", seed=1)
    gate = BuildGate(monkeypatch, held=2)
    closing_gate(gate)

    async def check(manager: ModelManager) -> None:
        publish(tmp_path, "m", seed=2)
        first = asyncio.ensure_future(manager.load("m", 2))
        await gate.entered()
        first.cancel()  # the client's deadline passed during the build
        with pytest.raises(asyncio.CancelledError):
            await first
        retry = asyncio.ensure_future(manager.load("m", 2))  # while the first build still runs
        gate.open()
        lm = await retry
        assert gate.builds[2] == 1  # one build, its result shared
        assert manager._models["m"][2] is lm and lm.auto is False  # loaded by number, as asked
        assert sorted(manager._models["m"]) == [1, 2]

    with_manager(tmp_path, check)


def test_the_result_of_a_cancelled_load_is_kept_for_the_retry(tmp_path, monkeypatch, closing_gate):
    publish(tmp_path, "m", seed=1)
    gate = BuildGate(monkeypatch, held=2)
    closing_gate(gate)

    async def check(manager: ModelManager) -> None:
        publish(tmp_path, "m", seed=2)
        first = asyncio.ensure_future(manager.load("m"))  # LoadModel(m): the newest version, automatic
        await gate.entered()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.open()  # the build finishes with no caller waiting for it
        lm = await manager.load("m")  # the retry
        assert gate.builds[2] == 1 and lm.version == 2 and manager._models["m"][2] is lm
        assert manager.default_version("m") == 2  # the cancelled load went through: version 2 is the default
        assert sorted(manager._models["m"]) == [1, 2]  # and 1, the outgoing default, stays as the previous one

    with_manager(tmp_path, check)


def test_a_failing_build_reports_its_error_to_every_caller_and_registers_nothing(tmp_path, monkeypatch,
                                                                                closing_gate):
    publish(tmp_path, "m", seed=1)
    gate = BuildGate(monkeypatch, held=2)
    closing_gate(gate)

    async def check(manager: ModelManager) -> None:
        version_dir = publish(tmp_path, "m", seed=2)
        (version_dir / WEIGHTS_FILE).write_bytes(b"not safetensors")  # corrupt: the build fails
        first = asyncio.ensure_future(manager.load("m", 2))
        await gate.entered()
        second = asyncio.ensure_future(manager.load("m", 2))  # a second LoadModel meanwhile
        cancelled = asyncio.ensure_future(manager.load("m", 2))  # and one whose client gives up
        cancelled.cancel()
        gate.open()
        results = await asyncio.gather(first, second, cancelled, return_exceptions=True)
        assert [type(r) for r in results] == [ArtifactError, ArtifactError, asyncio.CancelledError]
        assert str(results[0]) == str(results[1]) and "m/2/" in str(results[0])
        assert gate.builds[2] == 1  # built once, failed once
        assert sorted(manager._models["m"]) == [1] and manager.default_version("m") == 1  # nothing half-registered
        assert [(n, v) for n, v, _ in manager.failed_versions()] == [("m", 2)]
        assert manager.resolve("m", None).version == 1
        with pytest.raises(ArtifactError):  # a later LoadModel tries again (the files may have been fixed)
            await manager.load("m", 2)
        assert gate.builds[2] == 2

    with_manager(tmp_path, check)


def test_stop_does_not_wait_for_a_build_and_installs_nothing_after_it(tmp_path, monkeypatch, closing_gate):
    """A LoadModel still building when the server stops: stop returns, and the build, once it ends, installs no
    version into the stopped manager (its batcher would run forever)."""
    publish(tmp_path, "m", seed=1)
    gate = BuildGate(monkeypatch, held=2)
    closing_gate(gate)
    seen: list[object] = []

    async def check(manager: ModelManager) -> None:
        publish(tmp_path, "m", seed=2)
        load = asyncio.ensure_future(manager.load("m", 2))
        await gate.entered()
        await manager.stop()
        gate.open()
        seen.append(await asyncio.gather(load, return_exceptions=True))
        seen.append(dict(manager._models))

    with_manager(tmp_path, check)
    assert isinstance(seen[0][0], asyncio.CancelledError) and seen[1] == {}
