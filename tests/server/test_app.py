"""Process-wide start-up of ``segsvc serve``: the heap alive after start-up is frozen out of garbage collection."""

from __future__ import annotations

import gc
import sys
import threading
import time
import weakref
from collections.abc import Iterator

import pytest

from segsvc.server.app import freeze_startup_heap
from tests.server.conftest import publish, wait_for


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def unfrozen():
    """Every test here leaves the collector as it found it."""
    yield
    gc.unfreeze()


@pytest.fixture
def releasing() -> Iterator[None]:
    """Another thread keeps dropping objects that were alive at the freeze, as a server's threads do
    (a suite's leftover ones did in CI): each one leaves the frozen generation as it is freed, so the
    frozen count can fall between any two lines. Frequent thread switches make that certain here."""
    doomed = [Node() for _ in range(200_000)]
    stop = threading.Event()

    def drop() -> None:
        while doomed and not stop.is_set():
            doomed.pop()
            time.sleep(0)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=drop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)


def test_freeze_collects_the_garbage_first_then_freezes_what_is_alive(unfrozen, releasing):
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the collector frees it
    garbage = weakref.ref(a)
    del a, b
    alive = Node()

    frozen = freeze_startup_heap()

    assert garbage() is None  # collected, not frozen forever
    assert 0 < gc.get_freeze_count() <= frozen  # what it froze, less what has died since
    assert not any(o is alive for o in gc.get_objects())  # out of the collector's passes
    made_after = Node()
    assert any(o is made_after for o in gc.get_objects())  # what comes later is collected as usual


def test_a_model_loaded_before_the_freeze_is_freed_when_a_new_version_retires_it(start_server, tmp_path,
                                                                                unfrozen):
    repo = tmp_path / "repo"
    publish(repo, "m", seed=1)
    server = start_server(repo)
    first = weakref.ref(server.manager.resolve("m", None).engine.backend.model)
    freeze_startup_heap()  # as `segsvc serve` does once started: the collector can no longer free it

    for seed in (2, 3):  # version 1 is the previous default once 2 serves (kept loaded), retired once 3 does
        publish(repo, "m", seed=seed)
        server.call(server.manager.poll_once())

    assert server.manager.resolve("m", None).version == 3
    wait_for(lambda: first() is None)  # freed by reference counting alone
