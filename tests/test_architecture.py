"""Dependencies point one way (STYLE.md): a test that parses every import."""

import ast
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
        if rel.parts[0] in ("server", "v1") or rel.name in ("client.py", "cli.py", "demo.py"):
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
