"""Dependencies point one way (STYLE.md): a test that parses every import."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_service_never_imports_training() -> None:
    offenders = [
        str(p.relative_to(ROOT)) for p in _modules("segsvc")
        if p.name != "cli.py" and any(n == "training" or n.startswith("training.") for n in _imports(p))
    ]
    assert not offenders, f"only segsvc/cli.py may reach into training/: {offenders}"


def test_only_server_and_client_touch_grpc() -> None:
    offenders = []
    for p in _modules("segsvc"):
        rel = p.relative_to(ROOT / "segsvc")
        if rel.parts[0] in ("server", "v1") or rel.name in ("client.py", "jobclient.py", "downloads.py", "wire.py",
                                                            "cli.py", "demo.py", "health.py"):
            continue
        if any(n.startswith("grpc") or "_pb2" in n or n.startswith("segsvc.v1") for n in _imports(p)):
            offenders.append(str(rel))
    assert not offenders, f"grpc/pb2 imports outside server/ and client.py: {offenders}"


def test_lower_layers_do_not_import_upper_layers() -> None:
    upper = {"models": ("segsvc.inference", "segsvc.server", "segsvc.jobs", "segsvc.client"),
             "data": ("segsvc.models", "segsvc.inference", "segsvc.server", "segsvc.jobs", "segsvc.client"),
             "inference": ("segsvc.server", "segsvc.jobs", "segsvc.client")}
    offenders = []
    for package, banned in upper.items():
        for p in _modules(f"segsvc/{package}"):
            bad = [n for n in _imports(p) if n.startswith(banned)]
            if bad:
                offenders.append(f"{p.relative_to(ROOT)} imports {bad}")
    assert not offenders, offenders


def test_the_client_loads_no_torch_opencv_or_albumentations() -> None:
    """``import segsvc.client`` is what a remote caller pays: grpc, NumPy and the messages only."""
    heavy = ("torch", "cv2", "albumentations", "matplotlib", "segsvc.inference", "segsvc.server")
    code = f"import sys, segsvc.client; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"import segsvc.client loaded {out.stdout.strip()}"


_SUBMIT = """
import sys
import segsvc.cli, segsvc.cli_jobs

class Client:
    def submit_job(self, inputs, **kw):
        print(kw["model"], kw["version"])
        return type("Job", (), {"id": "j1"})()

args = segsvc.cli.build_parser().parse_args(["jobs", "submit", "a.png", "--model", "membrane:3"])
segsvc.cli_jobs._submit(Client(), args)
print([m for m in ("torch", "segsvc.inference", "segsvc.models") if m in sys.modules])
"""


def test_jobs_submit_parses_its_model_reference_without_torch() -> None:
    """``segsvc jobs submit --model NAME:V`` is a client command: checking NAME:V must not import torch (seconds,
    and a client install may have none); it imported ``segsvc.inference.repository`` for ``parse_model_ref``."""
    out = subprocess.run([sys.executable, "-c", _SUBMIT], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.splitlines() == ["membrane 3", "j1", "[]"], out.stdout


def test_segment_refuses_a_bad_model_reference_without_torch(tmp_path: Path) -> None:
    """``segsvc segment --model m:07`` is refused in one line before any server is asked, and without torch."""
    code = ("import sys, segsvc.cli\n"
            f"code = segsvc.cli.main(['segment', {str(tmp_path / 'a.png')!r}, '--out', {str(tmp_path / 'o')!r},"
            " '--model', 'm:07'])\n"
            "print(code, [m for m in ('torch', 'segsvc.models') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "2 []", out.stdout
    assert out.stderr.strip().splitlines() == [
        "segsvc: error: model reference 'm:07': the version after ':' must be a positive integer"], out.stderr


def test_protocol_free_core_has_no_protocol_code() -> None:
    """The inference service and the job runner are shared by every front end: no grpc, no messages."""
    core = [ROOT / "segsvc" / "inference" / "service.py", *sorted((ROOT / "segsvc" / "jobs").glob("*.py"))]
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.startswith(("grpc", "segsvc.v1",
                                                                                          "segsvc.server", "google")))
                 for p in core}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_serving_loads_neither_albumentations_nor_matplotlib() -> None:
    """The server image ships without training packages (deploy/Dockerfile): serving must not import them."""
    training_only = ("albumentations", "matplotlib", "training")
    code = (f"import sys, segsvc.server.app, segsvc.cli, segsvc.health, segsvc.jobs.offline\n"
            f"print([m for m in {training_only!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"serving loaded {out.stdout.strip()}"
