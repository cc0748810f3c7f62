"""--max-connection-age-s: the server retires client connections, so clients reconnect and spread over replicas.

Behaviour first: a client connected to a server with a short maximum age sees its connection
closed (GOAWAY: the channel leaves READY) and its next call succeeds on a new connection; without
the option the connection stays up. Then the flag's path from the command line to gRPC's options.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from segsvc.errors import InvalidArgument
from segsvc.server.app import grpc_options
from segsvc.server.config import ServerConfig
from tests.server.conftest import publish


class _States:
    """The connectivity states a channel goes through."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.seen: list[grpc.ChannelConnectivity] = []
        self._changed = threading.Condition()
        channel.subscribe(self._on_change, try_to_connect=False)

    def _on_change(self, state: grpc.ChannelConnectivity) -> None:
        with self._changed:
            self.seen.append(state)
            self._changed.notify_all()

    def wait_for(self, done, timeout_s: float) -> bool:
        """True once ``done(states seen so far)`` holds (callbacks arrive on gRPC's own thread)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not done(self.seen):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True


READY = grpc.ChannelConnectivity.READY


def _left_ready(seen: list[grpc.ChannelConnectivity]) -> bool:
    """READY, then any other state: the connection was closed."""
    return READY in seen and any(s != READY for s in seen[seen.index(READY) + 1:])


def _check(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60).status


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("age-repo")
    publish(root, "tiny", seed=1)
    return root


def test_connection_is_closed_after_its_age_and_the_client_reconnects(start_server, repo: Path) -> None:
    # The drain grace is also the time a retired connection's calls get to finish (grpc_options): with the
    # tests' 0 s, a call still running when its connection turned 0.3 s old (a slow host) would be cut off.
    server = start_server(repo, max_connection_age_s=0.3, grace_s=60.0)
    with grpc.insecure_channel(server.address) as channel:
        states = _States(channel)
        assert _check(channel) == health_pb2.HealthCheckResponse.SERVING
        assert states.wait_for(_left_ready, timeout_s=60), f"connection still open after 60 s: {states.seen}"
        assert _check(channel) == health_pb2.HealthCheckResponse.SERVING  # on a new connection
        assert states.wait_for(lambda seen: seen.count(READY) >= 2, timeout_s=60), states.seen


def test_without_the_option_the_connection_stays(start_server, repo: Path) -> None:
    server = start_server(repo)
    with grpc.insecure_channel(server.address) as channel:
        states = _States(channel)
        assert _check(channel) == health_pb2.HealthCheckResponse.SERVING
        assert states.wait_for(lambda seen: READY in seen, timeout_s=60), states.seen
        assert not states.wait_for(_left_ready, timeout_s=1.5), states.seen  # 1.5 s: 5 times the age above


def test_options_carry_the_age_and_the_drain_grace() -> None:
    options = dict(grpc_options(ServerConfig(model_repo=Path("r"), max_connection_age_s=300, grace_s=25)))
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert options["grpc.max_connection_age_grace_ms"] == 25_000
    plain = dict(grpc_options(ServerConfig(model_repo=Path("r"))))
    assert "grpc.max_connection_age_ms" not in plain and "grpc.max_receive_message_length" in plain
    with pytest.raises(InvalidArgument, match="max_connection_age_s"):
        ServerConfig(model_repo=Path("r"), max_connection_age_s=0)


def test_serve_flag_reaches_the_server_config(monkeypatch, tmp_path: Path) -> None:
    import segsvc.server.app
    import segsvc.server.logs
    from segsvc.cli import main

    captured: list[ServerConfig] = []
    monkeypatch.setattr(segsvc.server.app, "run", captured.append)
    monkeypatch.setattr(segsvc.server.logs, "configure_logging", lambda *a, **k: None)
    base = ["serve", "--model-repo", str(tmp_path), "--device", "cpu"]
    assert main([*base, "--max-connection-age-s", "120"]) == 0
    assert main(base) == 0
    assert [c.max_connection_age_s for c in captured] == [120.0, None]
