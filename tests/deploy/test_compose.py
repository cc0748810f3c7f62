"""docker-compose.yml: valid against the compose specification, and a GPU service that stays up.

check-jsonschema validates it against the compose-spec schema it vendors (offline). The contents:
a GPU reservation (and a cpu profile without one), health checks, restarts, ordered start-up, named
volumes, the Prometheus files it mounts, and a stop grace period longer than the server's drain.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, ROOT, tool

COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_compose_matches_the_compose_spec() -> None:
    checker = tool("check-jsonschema")
    out = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_spec_check_catches_a_misspelt_key(tmp_path) -> None:
    checker = tool("check-jsonschema")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periods:"))
    out = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", str(broken)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "stop_grace_periods" in out.stdout


def test_gpu_server_reserves_a_gpu(compose: dict) -> None:
    server = compose["services"]["segsvc"]
    assert server["profiles"] == ["gpu"] and server["build"]["target"] == "server"
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1


def test_cpu_profile_runs_the_cpu_image_without_a_gpu(compose: dict) -> None:
    cpu = compose["services"]["segsvc-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["build"]["target"] == "cpu"
    assert "deploy" not in cpu
    assert "segsvc" in cpu["networks"]["default"]["aliases"], "Prometheus scrapes segsvc:9090 in both profiles"


@pytest.mark.parametrize("name", ["segsvc", "segsvc-cpu"])
def test_server_is_healthchecked_restarted_and_drained(compose: dict, name: str) -> None:
    server = compose["services"][name]
    assert server["healthcheck"]["test"] == ["CMD", "segsvc", "health"]
    assert server["restart"] == "unless-stopped"
    assert server["stop_signal"] == "SIGTERM"
    grace_s = float(_flag(server["command"], "--grace-s"))
    drain_s = float(_flag(server["command"], "--drain-timeout-s"))  # the batchers' drain, after the grace
    assert float(server["stop_grace_period"].rstrip("s")) > grace_s + drain_s
    assert float(_flag(server["command"], "--max-connection-age-s")) > 0
    assert server["read_only"] is True and server["cap_drop"] == ["ALL"]
    assert all(p.startswith("127.0.0.1:") for p in server["ports"]), "no token: publish on localhost only"


@pytest.mark.parametrize("name", ["segsvc", "segsvc-cpu"])
def test_server_runs_under_an_init_that_reaps_orphans(compose: dict, name: str) -> None:
    """Without one the server is PID 1, and the orphaned workers of the job processes it stops are its zombies."""
    assert compose["services"][name].get("init") is True


@pytest.mark.parametrize("name", ["segsvc", "segsvc-cpu"])
def test_server_image_does_not_take_training_jobs(compose: dict, name: str) -> None:
    """--state-dir turns jobs on, training ones included (--max-training-jobs defaults to 1); the server
    images install serve.txt only, which lacks the trainer's albumentations, so training must be off."""
    server = compose["services"][name]
    assert server["build"]["target"] in ("server", "cpu")
    lines = (DEPLOY / "requirements" / "serve.txt").read_text().splitlines()
    assert "albumentations" not in {line.split("==")[0].strip() for line in lines if not line.startswith("#")}
    assert "--state-dir" in server["command"] and _flag(server["command"], "--max-training-jobs") == "0"


@pytest.mark.parametrize("name", ["segsvc", "segsvc-cpu"])
def test_model_repository_and_job_state_on_named_volumes(compose: dict, name: str) -> None:
    server = compose["services"][name]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in server["volumes"]}
    command = server["command"]
    assert mounts[_flag(command, "--model-repo")] == "models" and server["volumes"][0].endswith(":ro")
    assert mounts[_flag(command, "--state-dir")] == "jobs"
    assert {"models", "jobs"} <= set(compose["volumes"])


def test_prometheus_starts_with_the_server_and_loads_the_rules(compose: dict) -> None:
    prometheus = compose["services"]["prometheus"]
    assert set(prometheus["profiles"]) == {"gpu", "cpu"}
    for server in ("segsvc", "segsvc-cpu"):  # not service_healthy: test_review3_compose.py says why
        assert prometheus["depends_on"][server]["condition"] == "service_started"
    mounted = {v.split(":")[0] for v in prometheus["volumes"]}
    assert {"./deploy/prometheus.yml", "./deploy/prometheus-alerts.yml"} <= mounted
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert config["rule_files"] == ["prometheus-alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["segsvc:9090"]


def test_every_bind_mounted_file_exists(compose: dict) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", ()):
            source = volume.split(":")[0]
            if source.startswith("./deploy/"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_compose_is_how_the_readme_runs_containers() -> None:
    text = (DEPLOY / "README.md").read_text()
    assert "docker compose --profile gpu up" in text and "docker compose --profile cpu up" in text
