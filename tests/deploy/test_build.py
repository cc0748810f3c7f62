"""The image's build steps, run outside Docker: deploy/build.sh, the same script the Dockerfile's RUN lines call.

No Docker engine here, so the image itself is not built; its steps are: protoc and the wheel from a
scratch copy of the sources, a fresh virtualenv, the wheel installed without its dependencies (the
project's installed packages stand in for the downloads: offline, seconds), and the script's own
smoke check that the server imports from the wheel without albumentations or matplotlib. Then the
serving requirement list is held to what the server really imports.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.deploy.conftest import DEPLOY, ROOT

BUILD = DEPLOY / "build.sh"


def _run(*args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(["sh", str(BUILD), *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHON": sys.executable, **(env or {})})
    assert out.returncode == 0, f"build.sh {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    _run("wheel", str(dist))
    (built,) = dist.glob("segsvc-*.whl")
    return built


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory, wheel: Path) -> Path:
    """A fresh virtualenv with the wheel, seeing the project's packages in place of the serving downloads."""
    venv = tmp_path_factory.mktemp("image") / "venv"
    site = {"SEGSVC_BUILD_SITE": sysconfig.get_paths()["purelib"]}
    _run("venv", str(venv), "none", env=site)
    _run("install", str(venv), "serve", str(wheel.parent), env=site)
    return venv


def test_wheel_holds_the_generated_code_and_no_source_tree_is_written(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("segmentation_pb2", "segmentation_pb2_grpc", "jobs_pb2", "jobs_pb2_grpc"):
        assert f"segsvc/v1/{module}.py" in names, module
    assert "training/recipes/synthetic-quick.yaml" in names
    assert not any(n.startswith(("tests/", "bench/", "deploy/")) for n in names)


def test_server_imports_from_the_wheel_without_training_packages(serve_venv: Path) -> None:
    out = _run("check", str(serve_venv), "serve")
    assert "build.sh check (serve): segsvc 0.1.0 from " + str(serve_venv.resolve()) in out


def test_the_check_fails_when_the_server_loads_albumentations(tmp_path: Path, serve_venv: Path) -> None:
    """The smoke check has teeth: a server module that imports albumentations fails it."""
    site = subprocess.run([str(serve_venv / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    hook = Path(site) / "_test_hook.pth"
    hook.write_text("import sys; sys.modules.setdefault('albumentations', type(sys)('albumentations'))\n")
    try:
        out = subprocess.run(["sh", str(BUILD), "check", str(serve_venv), "serve"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    finally:
        hook.unlink()
    assert out.returncode != 0 and "albumentations" in out.stderr


def _distributions_loaded(python: Path, modules: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys, importlib.metadata as md\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "tops = {m.split('.')[0] for m in list(sys.modules)}\n"
        "pd = md.packages_distributions()\n"
        "print(json.dumps(sorted({t + '=' + ','.join(pd[t]) for t in tops if t in pd})))\n"
    )
    out = subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True, timeout=120, cwd="/",
                         env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout))


def _closure(requirements: list[str]) -> set[str]:
    """The requirements and everything they depend on (as installed here), as normalised names."""
    from importlib import metadata

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    seen: set[str] = set()
    todo = [Requirement(r).name for r in requirements]
    while todo:
        name = norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _requirements(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


# Loaded here only because the test environment has them; each importer copes with their absence.
OPTIONAL_IMPORTS = {
    "grpc_tools": "grpc/__init__.py tries it for grpc.protos(); the image has no grpcio-tools",
    "_distutils_hack": "setuptools' import hook, installed by a .pth of the project's .venv",
}


def test_serving_requirements_cover_what_the_server_imports(serve_venv: Path) -> None:
    serve = _requirements(DEPLOY / "requirements" / "serve.txt")
    torch = _requirements(DEPLOY / "requirements" / "torch.txt")
    covered = _closure(serve + torch) | {"segsvc"}
    loaded = _distributions_loaded(serve_venv / "bin" / "python", ["segsvc.server.app", "segsvc.cli"])
    missing = []
    for entry in loaded:
        top, dists = entry.split("=")
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.split(",")}
        if not names & covered and top not in OPTIONAL_IMPORTS:
            missing.append(f"{top} (from {', '.join(sorted(names))})")
    assert not missing, f"the server imports modules that deploy/requirements/serve.txt does not bring: {missing}"
    for training_only in ("albumentations", "matplotlib"):
        assert training_only not in covered, f"{training_only} must stay out of the serving image"


def test_requirements_are_pinned_and_torch_matches_pyproject() -> None:
    for name in ("serve.txt", "torch.txt", "build.txt"):
        for line in _requirements(DEPLOY / "requirements" / name):
            assert "==" in line, f"{name}: {line} is not pinned"
    pins = {Requirement(r).name: str(Requirement(r).specifier)
            for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for line in _requirements(DEPLOY / "requirements" / "torch.txt"):
        req = Requirement(line)
        assert pins[req.name] == str(req.specifier), f"{req.name}: pyproject pins {pins[req.name]}, torch.txt {req}"


def test_build_script_refuses_an_unknown_variant(tmp_path: Path) -> None:
    out = subprocess.run(["sh", str(BUILD), "venv", str(tmp_path / "v"), "cu999x"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "unknown TORCH_VARIANT" in out.stderr


def _venv_step(tmp_path: Path, variant: str) -> subprocess.CompletedProcess:
    """build.sh venv with a PYTHON that fails at once: a variant it accepts gets as far as creating the venv."""
    return subprocess.run(["sh", str(BUILD), "venv", str(tmp_path / "v"), variant], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHON": "/bin/false"})


@pytest.mark.parametrize("variant", ["cu130", "cpu", "none"])
def test_build_script_accepts_the_variants_the_image_builds(tmp_path: Path, variant: str) -> None:
    out = _venv_step(tmp_path, variant)
    assert out.returncode != 0 and "unknown TORCH_VARIANT" not in out.stderr, out.stderr


@pytest.mark.parametrize("variant", ["cu128", "cu126", "cu130 cpu", ""])
def test_build_script_refuses_other_cuda_variants_saying_which_exist(tmp_path: Path, variant: str) -> None:
    """The Dockerfile and the README name cu130 and cpu only: another cuXYZ must stop with that list, not
    get as far as a pip failure (or, in the Dockerfile, a missing torch-cuXYZ stage)."""
    out = _venv_step(tmp_path, variant)
    assert out.returncode == 2, out.stderr
    assert f"unknown TORCH_VARIANT '{variant}'" in out.stderr and "cu130, cpu" in out.stderr, out.stderr
    for doc in (DEPLOY / "Dockerfile", DEPLOY / "README.md"):
        text = " ".join(doc.read_text().split())
        assert "cuXYZ" not in text, doc
        assert re.search(r"variants (are|:) cu130 \(default\)|variants: cu130, the default, and cpu", text), doc
