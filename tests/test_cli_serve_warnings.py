"""What ``segsvc serve`` warns about at start: settings that name nothing the repository holds.

The server itself is not started (``run`` is replaced); the checks run on the config ``segsvc serve`` builds.
"""

from __future__ import annotations

import logging

import pytest

import segsvc.server.app
import segsvc.server.logs
from segsvc.server.auth import AuthConfig
from segsvc.cli import main
from segsvc.config import ModelSpec
from segsvc.models import build_model
from segsvc.models.artifact import save_artifact
from tests.server.conftest import start_server  # noqa: F401  (a real server on 127.0.0.1:0)


@pytest.fixture
def repo(tmp_path):
    spec = ModelSpec("unet", 2, 1, {"base_channels": 4, "depth": 2})
    for name in ("tiny", "grey"):
        save_artifact(build_model(spec), tmp_path / "repo", name, spec=spec)
    return tmp_path / "repo"


@pytest.fixture
def serve(monkeypatch, caplog):
    """``serve(*flags)``: the ServerConfig ``segsvc serve`` would run, and the warnings it logged."""
    configs = []
    monkeypatch.setattr(segsvc.server.app, "run", configs.append)
    monkeypatch.setattr(segsvc.server.logs, "configure_logging", lambda *a, **k: None)  # keep caplog's handler

    def start(*flags: str):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main(["serve", "--device", "cpu", "--metrics-port", "-1", *flags]) == 0
        return configs[-1], [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    return start


def test_a_backend_for_a_model_the_repository_lacks_is_warned_about(repo, serve) -> None:
    config, warnings = serve("--model-repo", str(repo), "--backend", "tinny=onnxruntime", "--backend", "grey=torch")
    assert dict(config.manager.engine.model_backends) == {"tinny": "onnxruntime", "grey": "torch"}  # kept: warn only
    [warning] = [w for w in warnings if "--backend" in w]
    assert "'tinny'" in warning and "'grey'" not in warning and "grey, tiny" in warning, warning


def test_backends_for_known_models_warn_nothing(repo, serve) -> None:
    _, warnings = serve("--model-repo", str(repo), "--backend", "tiny=onnxruntime", "--backend", "torch")
    assert not [w for w in warnings if "--backend" in w], warnings


def test_a_missing_model_repository_is_named_in_the_no_model_warning(tmp_path, start_server, caplog) -> None:
    """`segsvc serve --model-repo /nonexistent` starts (a repository may appear later), saying the folder is missing."""
    with caplog.at_level(logging.WARNING):
        start_server(tmp_path / "nonexistent")
        start_server(tmp_path)  # exists, just empty
    warnings = [r.getMessage() for r in caplog.records if "no model loaded from" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert f"no model loaded from {tmp_path / 'nonexistent'} (the folder does not exist):" in warnings[0]
    assert "does not exist" not in warnings[1]


def test_a_server_without_tokens_warns_that_management_is_open(tmp_path, start_server, caplog) -> None:
    """Without tokens every RPC is open, LoadModel and training included: that is allowed (a laptop, a private
    network) but never silent."""
    with caplog.at_level(logging.WARNING):
        open_server = start_server(tmp_path)
        start_server(tmp_path, auth=AuthConfig.single("s3cret", ("infer", "manage")))
    warnings = [r.getMessage() for r in caplog.records if "no tokens configured" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "management included" in warnings[0] and warnings[0].endswith(f":{open_server.server.port}")
