"""deploy/Dockerfile: hadolint clean, and the image the issue asks for (the build itself needs a Docker engine).

hadolint (from the test extra) lints it with every rule; an ignored rule must carry its reason on
the line above. The contents: stages and targets, the torch variant, a pinned base, a non-root
numeric user, an exec-form health check, the stop signal of the drain, and RUN steps that are
deploy/build.sh (which test_build.py runs outside Docker).
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.deploy.conftest import DEPLOY, ROOT, tool

DOCKERFILE = DEPLOY / "Dockerfile"


@pytest.fixture(scope="module")
def lines() -> list[str]:
    """Instructions with their continuation lines joined, comments dropped."""
    joined, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            joined.append(current)
            current = ""
    return joined


def _stages(lines: list[str]) -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    name = None
    for line in lines:
        m = re.match(r"FROM (\S+) AS (\S+)$", line)
        if m:
            name = m.group(2)
            stages[name] = [line]
        elif name:
            stages[name].append(line)
    return stages


def test_hadolint_passes() -> None:
    out = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_ignored_rule_says_why() -> None:
    text = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(text):
        if "hadolint ignore=" in line:
            assert i > 0 and text[i - 1].startswith("#") and "hadolint" not in text[i - 1], \
                f"line {i + 1}: say on the line above why the rule does not apply"


def test_stages_and_targets(lines: list[str]) -> None:
    stages = _stages(lines)
    assert {"build", "torch", "torch-cpu", "server", "cpu", "trainer"} <= set(stages)
    assert list(stages)[-1] == "server", "the default target (the last stage) is the GPU server"
    assert 'ARG TORCH_VARIANT=cu130' in lines
    # One torch stage for any TORCH_VARIANT, built by build.sh, which refuses a variant it does not build
    # (a FROM torch-${TORCH_VARIANT} would fail on an unknown one as a missing image, saying nothing useful).
    assert stages["torch"][1:] == ["ARG TORCH_VARIANT", 'RUN sh deploy/build.sh venv /opt/segsvc "${TORCH_VARIANT}"']
    assert stages["torch-cpu"][1:] == ["RUN sh deploy/build.sh venv /opt/segsvc cpu"]
    assert any("--from=venv-server " in s for s in stages["server"])
    assert any("--from=venv-server-cpu " in s for s in stages["cpu"])
    assert any("--from=venv-trainer " in s for s in stages["trainer"])
    # The runtime stages copy the virtualenv only: no sources, no wheel, no build tools.
    for name in ("server", "cpu"):
        assert [s for s in stages[name] if s.startswith(("COPY", "ADD", "RUN"))] == \
               [s for s in stages[name] if s.startswith("COPY --from=venv-")]


def test_base_image_is_pinned(lines: list[str]) -> None:
    (arg,) = [line for line in lines if line.startswith("ARG PYTHON_IMAGE=")]
    image = arg.split("=", 1)[1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", image), image
    froms = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert all(f == "${PYTHON_IMAGE}" or f.startswith(("torch", "venv-", "runtime")) for f in froms), froms


def test_runtime_user_healthcheck_and_stop_signal(lines: list[str]) -> None:
    runtime = _stages(lines)["runtime"]
    users = [line for line in runtime if line.startswith("USER ")]
    assert users == ["USER 10001:10001"], "numeric, non-root: runAsNonRoot can verify it"
    (health,) = [line for line in runtime if line.startswith("HEALTHCHECK")]
    assert health.endswith('CMD ["segsvc", "health"]'), "exec form: no shell, any port, TLS (segsvc health)"
    assert "STOPSIGNAL SIGTERM" in runtime
    assert 'ENTRYPOINT ["segsvc"]' in runtime
    (cmd,) = [line for line in runtime if line.startswith("CMD ")]
    assert '"--grace-s", "25"' in cmd


def test_every_run_step_is_the_shared_build_script(lines: list[str]) -> None:
    runs = [line for line in lines if line.startswith("RUN ")]
    scripted = [r for r in runs if "sh deploy/build.sh" in r]
    others = [r for r in runs if r not in scripted]
    # Besides the build script: installing the pinned build tools, creating the user and its folders.
    assert all("pip install --no-cache-dir -r deploy/requirements/build.txt" in r or "useradd" in r for r in others)
    assert {"wheel", "venv", "install", "check"} <= {step for r in scripted for step in re.findall(r"build\.sh (\w+)", r)}


def test_build_context_holds_what_copy_needs(lines: list[str]) -> None:
    """.dockerignore keeps the context small; every COPY source must still be in it."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), source
                assert (ROOT / source).exists(), source
    assert "segsvc/v1/" in ignore, "generated code is rebuilt in the image, never copied in"
