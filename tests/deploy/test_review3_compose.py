"""docker-compose.yml as an operator relies on it: monitoring that does not wait for health, state that lasts.

Prometheus is there to say what is wrong with the server, so it must not wait for the server to be
healthy: a server with no model (or whose models fail to load) stays NOT_SERVING, and then `docker
compose up` would refuse to start Prometheus at all, leaving SegsvcNoModelLoaded nothing to fire from.
The server's metrics endpoint answers from before the models load (bind, metrics, then models).

The job database is SQLite in WAL mode under --state-dir (jobs, uploads, datasets): it must live on the
named volume, never under a tmpfs (gone at every restart, taking the jobs a restart should resume).
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import ROOT


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_prometheus_starts_whatever_the_servers_health(compose: dict[str, Any]) -> None:
    depends = compose["services"]["prometheus"]["depends_on"]
    assert set(depends) == {"segsvc", "segsvc-cpu"}
    for server, condition in depends.items():
        assert condition["condition"] == "service_started", f"{server}: Prometheus would wait for a healthy server"
        assert condition["required"] is False, "only the server of the enabled profile runs"


@pytest.mark.parametrize("name", ["segsvc", "segsvc-cpu"])
def test_job_state_is_on_the_named_volume_not_a_tmpfs(compose: dict[str, Any], name: str) -> None:
    server = compose["services"][name]
    command = server["command"]
    state = PurePosixPath(command[command.index("--state-dir") + 1])
    tmpfs = [PurePosixPath(t.split(":")[0]) for t in server.get("tmpfs", ())]
    assert not any(state == t or t in state.parents for t in tmpfs), (state, tmpfs)
    volumes = {PurePosixPath(v.split(":")[1]): v.split(":")[0] for v in server["volumes"]}
    (mount,) = [m for m in volumes if m == state or m in state.parents]
    assert volumes[mount] in compose["volumes"], f"{state} on {volumes[mount]}, not a named volume"
    assert not server["volumes"][list(volumes).index(mount)].endswith(":ro"), "the state is written"
