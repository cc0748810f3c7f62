"""The README's client examples run as written against a real server (a tiny model stands in for make demo's)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from segsvc.cli import main
from segsvc.inference.codec import encode_png
from segsvc.server.auth import AuthConfig
from tests.server.conftest import make_image, publish, start_server  # noqa: F401  (a real server on 127.0.0.1:0)

ROOT = Path(__file__).resolve().parents[1]


def _python_block_after(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_client_snippet_runs_as_written(tmp_path, start_server, monkeypatch) -> None:
    publish(tmp_path / "repo", "synthetic-quick", seed=1)
    server = start_server(tmp_path / "repo")
    (tmp_path / "out" / "demo" / "inputs").mkdir(parents=True)
    (tmp_path / "out" / "demo" / "inputs" / "synthetic_00.png").write_bytes(encode_png(make_image(40, 48, seed=2)))
    monkeypatch.chdir(tmp_path)
    code = _python_block_after("### segsvc client").replace("localhost:50051", server.address)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # NameError if it uses a name it never defines
    result = scope["result"]
    assert result.mask.shape == (40, 48)
    overlay = result.overlay(scope["image"])
    assert overlay.shape == (40, 48, 3) and overlay.dtype == np.uint8


def test_a_missing_token_tells_the_command_line_user_how_to_send_one(tmp_path, start_server, monkeypatch,
                                                                      capsys) -> None:
    publish(tmp_path / "repo", "tiny", seed=1)
    server = start_server(tmp_path / "repo", auth=AuthConfig((("s3cret", frozenset({"infer"})),)))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode_png(make_image(16, 16, seed=3)))
    monkeypatch.delenv("SEGSVC_AUTH_TOKEN", raising=False)
    assert main(["segment", str(tmp_path / "in"), "--server", server.address, "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err == ("segsvc: error: missing bearer token: send metadata 'authorization: Bearer <token>' "
                   "(pass --token-file FILE or set $SEGSVC_AUTH_TOKEN)\n")
