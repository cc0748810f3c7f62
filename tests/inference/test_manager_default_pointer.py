"""A DEFAULT pointer the poll cannot follow keeps the default in effect, and says so once.

An operator's QA: an empty or garbled ``<model>/DEFAULT`` (what a non-atomic ``echo 1 > DEFAULT`` looks like
mid-write) was read as "no pointer", so the poll switched requests to the newest version and unloaded the pinned
one, silently undoing a rollback; the garbled file was logged at every poll; and a DEFAULT naming a version that
had failed to load was ignored with no line at all. Every test calls ``poll_once`` itself (the poller is off) and
waits only on the loop's own tasks.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from segsvc.inference.manager import ModelManager
from segsvc.inference.repository import DEFAULT_FILE, ModelRepository
from tests.inference.managers import with_manager
from tests.server.conftest import publish


def _said(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    """The records at WARNING or above, from any segsvc logger, whose message contains ``text``."""
    return [r for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def _pinned_to_one(root: Path) -> Path:
    """Versions 1 and 2 of ``m``, DEFAULT naming 1 (a rollback); the pointer's path."""
    publish(root, "m", seed=1)
    publish(root, "m", seed=2)
    ModelRepository(root).set_default("m", 1)
    return root / "m" / DEFAULT_FILE


@pytest.mark.parametrize("content", [b"", b"\n", b"  \n", b"garbage\n", b"1x", b"+1\n", b"\xff\xfe1\n"],
                         ids=["empty", "newline", "blanks", "garbage", "1x", "plus-one", "not-ascii"])
def test_a_default_that_names_no_version_keeps_the_pinned_default_loaded(tmp_path, content):
    """The QA report: DEFAULT truncated or garbled while version 1 was pinned; the poll served 2 and unloaded 1."""
    pointer = _pinned_to_one(tmp_path)

    async def check(manager: ModelManager) -> None:
        assert manager.default_version("m") == 1 and sorted(manager._models["m"]) == [1, 2]
        pointer.write_bytes(content)
        for _ in range(2):
            assert await manager.poll_once() == []
        await asyncio.gather(*manager._retiring)
        assert manager.default_version("m") == 1 and sorted(manager._models["m"]) == [1, 2]
        with manager.lease("m", None) as lm:
            assert lm.version == 1
        pointer.write_text("2\n")  # the write completes (or the operator moves it): followed
        assert await manager.poll_once() == []
        assert manager.default_version("m") == 2

    with_manager(tmp_path, check)


def test_a_default_that_is_a_directory_keeps_the_pinned_default(tmp_path):
    """Something that is not a file where DEFAULT belongs is not "no pointer" either."""
    pointer = _pinned_to_one(tmp_path)

    async def check(manager: ModelManager) -> None:
        pointer.unlink()
        pointer.mkdir()
        assert await manager.poll_once() == []
        assert manager.default_version("m") == 1 and sorted(manager._models["m"]) == [1, 2]

    with_manager(tmp_path, check)


def test_no_default_file_still_follows_the_newest(tmp_path):
    """Removing DEFAULT is how an operator asks for the newest again: unlike a file that does not parse."""
    pointer = _pinned_to_one(tmp_path)

    async def check(manager: ModelManager) -> None:
        pointer.write_text("")  # kept: a file that names no version
        await manager.poll_once()
        assert manager.default_version("m") == 1
        pointer.unlink()  # no file: the newest
        await manager.poll_once()
        await asyncio.gather(*manager._retiring)
        assert manager.default_version("m") == 2 and sorted(manager._models["m"]) == [1, 2]  # 1: the previous default

    with_manager(tmp_path, check)


def test_at_start_a_default_that_names_no_version_serves_the_newest_as_a_missing_one_does(tmp_path, caplog):
    """Start-up with no default in effect: the newest version that loads serves, as for a DEFAULT naming a missing
    version, said once; the pointer is followed once it parses."""
    pointer = _pinned_to_one(tmp_path)
    pointer.write_text("garbage\n")

    async def check(manager: ModelManager) -> None:
        assert manager.default_version("m") == 2 and sorted(manager._models["m"]) == [2]
        for _ in range(3):
            assert await manager.poll_once() == []
        pointer.write_text("1\n")
        assert await manager.poll_once() == []  # version 1 is loaded to be the default
        assert manager.default_version("m") == 1 and sorted(manager._models["m"]) == [1, 2]

    with caplog.at_level(logging.INFO, logger="segsvc"):
        with_manager(tmp_path, check)
    said = _said(caplog, "holds 'garbage', not a version number")
    assert len(said) == 1 and "keeping the newest version" in said[0].getMessage()


def test_a_garbled_default_is_logged_once_per_distinct_content(tmp_path, caplog):
    """The QA report: "tiny/DEFAULT holds 'garbage', not a version number; ignored" four times in 8 s (a 2 s poll)."""
    pointer = _pinned_to_one(tmp_path)

    async def check(manager: ModelManager) -> None:
        pointer.write_text("garbage\n")
        for _ in range(4):
            await manager.poll_once()
        assert len(_said(caplog, "holds 'garbage'")) == 1
        pointer.write_text("trash\n")  # other content: said again, once
        for _ in range(3):
            await manager.poll_once()
        assert len(_said(caplog, "holds 'trash'")) == 1
        pointer.write_text("1\n")  # the default in effect again, then garbled again: a new episode, said again
        await manager.poll_once()
        pointer.write_text("garbage\n")
        for _ in range(3):
            await manager.poll_once()
        assert len(_said(caplog, "holds 'garbage'")) == 2
        assert manager.default_version("m") == 1

    with caplog.at_level(logging.INFO, logger="segsvc"):
        with_manager(tmp_path, check)
    said = _said(caplog, "holds 'trash'")[0]
    assert said.name == "segsvc.inference.manager" and said.getMessage().startswith("model m: m/DEFAULT holds")
    assert said.getMessage().endswith("; keeping 1")


def test_a_default_naming_a_version_that_failed_to_load_is_said_once_while_serving(tmp_path, caplog):
    """The QA report: DEFAULT moved to a version the poll had already failed to load was ignored with no line (the
    poll skipped it before any message); at start the same pointer is logged. Said once, not at every poll."""
    publish(tmp_path, "m", seed=1)
    publish(tmp_path, "m", seed=2)
    ModelRepository(tmp_path).set_default("m", 2)

    async def check(manager: ModelManager) -> None:
        five = publish(tmp_path, "m", seed=5, version=5)
        (five / "weights.safetensors").write_bytes(b"garbage")  # a broken upload: the poll fails it
        await manager.poll_once()
        assert manager.record.reason("m", 5) and 5 not in manager._models["m"]
        caplog.clear()
        ModelRepository(tmp_path).set_default("m", 5)
        for _ in range(3):
            assert await manager.poll_once() == []
        assert manager.default_version("m") == 2
        said = _said(caplog, "the default version 5 does not load (")
        assert len(said) == 1 and said[0].levelno == logging.ERROR
        assert said[0].getMessage().endswith("); keeping 2")

    with caplog.at_level(logging.INFO, logger="segsvc"):
        with_manager(tmp_path, check)

