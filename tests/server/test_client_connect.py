"""A client waits for a server that is still starting, and says clearly when none answers."""

from __future__ import annotations

import threading

import pytest

from segsvc.cli import main
from segsvc.client import SegmentationClient
from segsvc.errors import Unavailable
from tests.server.conftest import free_port


def test_wait_for_server_returns_once_a_server_listens(start_server, shared_repo) -> None:
    port = free_port()
    outcome: list[BaseException | None] = []
    waiting = threading.Event()

    def wait() -> None:
        with SegmentationClient(f"127.0.0.1:{port}") as client:
            waiting.set()
            try:
                client.wait_for_server(120)
                client.list_models()
                outcome.append(None)
            except BaseException as exc:  # reported to the test thread
                outcome.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    assert waiting.wait(30)
    start_server(shared_repo, port=port)  # starts after the client began waiting
    thread.join(150)
    assert outcome == [None]


def test_wait_for_server_waits_while_the_server_loads_its_models(held_start, shared_repo, monkeypatch) -> None:
    """A server listens before its models load and refuses calls meanwhile (UNAVAILABLE): the client's wait
    covers that window too, so `segsvc serve & segsvc segment ...` works (this raced before)."""
    import segsvc.client

    refused = threading.Event()
    real_sleep = segsvc.client.time.sleep
    monkeypatch.setattr(segsvc.client.time, "sleep", lambda s: (refused.set(), real_sleep(s)))
    port, release = held_start(shared_repo)
    outcome: list[BaseException | None] = []

    def wait() -> None:
        with SegmentationClient(f"127.0.0.1:{port}") as client:
            try:
                client.wait_for_server(120)
                outcome.append(None if client.list_models() else AssertionError("no models"))
            except BaseException as exc:  # reported to the test thread
                outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    try:
        assert refused.wait(60)  # the client was told "starting" at least once and is polling
        assert outcome == []
    finally:
        release()
        waiter.join(150)
    assert outcome == [None]


def test_no_server_is_unavailable_with_the_address() -> None:
    port = free_port()
    with SegmentationClient(f"127.0.0.1:{port}") as client:
        with pytest.raises(Unavailable, match=f"127.0.0.1:{port}.*segsvc serve"):
            client.wait_for_server(0.5)


def test_cli_without_server_fails_with_a_message(monkeypatch, capsys) -> None:
    import segsvc.cli_client

    monkeypatch.setattr(segsvc.cli_client, "CONNECT_TIMEOUT_S", 0.5)
    port = free_port()
    assert main(["datasets", "list", "--server", f"127.0.0.1:{port}"]) != 0
    err = capsys.readouterr().err
    assert f"no server answered at 127.0.0.1:{port}" in err and "Traceback" not in err
