"""A client waits for a server that is still starting, and says clearly when none answers."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import pytest

from segsvc.cli import main
from segsvc.client import SegmentationClient
from segsvc.errors import Unavailable
from tests.server.conftest import reserved_port


def test_wait_for_server_returns_once_a_server_listens(start_server, shared_repo) -> None:
    outcome: list[BaseException | None] = []
    waiting = threading.Event()
    # Held until the server binds it: connecting is refused, and no other process can take the port meanwhile.
    with reserved_port() as (port, release_port):

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
        assert waiting.wait(120)
        release_port()
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
    with reserved_port() as (port, _), SegmentationClient(f"127.0.0.1:{port}") as client:
        with pytest.raises(Unavailable, match=f"127.0.0.1:{port}.*segsvc serve"):
            client.wait_for_server(0.5)


def test_cli_without_server_fails_with_a_message(monkeypatch, capsys) -> None:
    import segsvc.cli_client

    monkeypatch.setattr(segsvc.cli_client, "CONNECT_TIMEOUT_S", 0.5)
    with reserved_port() as (port, _):  # nothing can listen there meanwhile
        assert main(["datasets", "list", "--server", f"127.0.0.1:{port}"]) != 0
    err = capsys.readouterr().err
    assert f"no server answered at 127.0.0.1:{port}" in err and "Traceback" not in err


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl absent: cannot make a test certificate")
def test_tls_at_one_end_only_is_named_not_reported_as_no_server(start_server, shared_repo, tmp_path) -> None:
    """A client without TLS to a TLS server, or with TLS to a plaintext one, never gets a connection: it was told
    "no server answered ...: is 'segsvc serve' running there?" (after 30 s, from segsvc commands), though the
    server ran. The channel never becomes ready in either case, however long the wait."""
    from segsvc.server.config import TLSConfig

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    with_tls = start_server(shared_repo, tls=TLSConfig(cert, key))
    plaintext = start_server(shared_repo)
    with SegmentationClient(with_tls.address) as client:
        no_tls = _refusal_once_a_handshake_failed(client)
    assert f"something listens at {with_tls.address}" in str(no_tls)
    assert "needs a TLS client" in str(no_tls) and "--tls" in str(no_tls)
    with SegmentationClient(plaintext.address, root_certificates=cert.read_bytes()) as client:
        tls_only_here = _refusal_once_a_handshake_failed(client)
    assert "needs a plaintext client" in str(tls_only_here)
    with SegmentationClient(with_tls.address, root_certificates=cert.read_bytes()) as client:
        client.wait_for_server(120)  # the matching client connects
        assert [m.name for m in client.list_models()]


def test_a_token_read_from_a_file_with_its_newline_works(start_server, shared_repo) -> None:
    """``token=Path("token").read_text()`` keeps the file's newline, which gRPC refuses in a header: every call
    failed with "INTERNAL: Invalid metadata". Tokens hold no whitespace (the server's tokens file format), so
    the ends are stripped, and a token that cannot go into a header is refused by name."""
    from segsvc.errors import InvalidArgument
    from segsvc.server.auth import AuthConfig
    from tests.server.conftest import make_image

    server = start_server(shared_repo, auth=AuthConfig.single("s3cret"), models=("tiny",))
    with SegmentationClient(server.address, token="s3cret\n", timeout_s=120) as client:
        assert client.segment(make_image(16, 16), model="tiny").mask.shape == (16, 16)
        assert [r.mask.shape for r in client.segment_many([make_image(8, 8)], model="tiny", progress=False)] == [
            (8, 8)]
    for bad in ("s3 cret", "s3cr\u00e9t", "s3\x00cret"):
        with pytest.raises(InvalidArgument, match="a token is printable ASCII without whitespace"):
            SegmentationClient(server.address, token=bad)


def _refusal_once_a_handshake_failed(client: SegmentationClient, hang_s: float = 120) -> Unavailable:
    """What ``wait_for_server`` raises once the channel has seen a connection attempt fail. A short wait (2 s: the
    channel never becomes ready, so every wait runs to its end) may end before a loaded host finished the first
    handshake, and that wait rightly says only "no server answered"; the next one, on the same channel, sees the
    failure. Waiting for it is the guard ``hang_s`` against a client that never tells the two apart."""
    end = time.monotonic() + hang_s
    while True:
        with pytest.raises(Unavailable) as refused:
            client.wait_for_server(2)
        if "no server answered" not in str(refused.value) or time.monotonic() > end:
            return refused.value


def test_health_of_a_service_the_server_does_not_know_names_it_not_grpc_s_repr(client) -> None:
    """It raised NotFound("<_InactiveRpcError of RPC that terminated with: status = StatusCode.NOT_FOUND details =
    "" debug_error_string = ...>"): the health service answers an unknown service with no message."""
    from segsvc.errors import NotFound

    assert client.health("", timeout_s=60) == "SERVING"
    with pytest.raises(NotFound) as caught:
        client.health("bogus", timeout_s=60)
    message = str(caught.value)
    assert message.startswith("no health status for service 'bogus': "), message
    assert "_InactiveRpcError" not in message and "debug_error_string" not in message
