"""``segsvc.export`` depends on models, config, errors and the inference backends (its check runs the
serving forward path) only (STYLE.md: dependencies point one way)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = ("segsvc.models", "segsvc.config", "segsvc.errors", "segsvc.export", "segsvc.palette",
           "segsvc.inference.backends", "segsvc.inference.contract", "segsvc.files")


def test_export_imports_only_lower_layers() -> None:
    offenders = {}
    for path in sorted((ROOT / "segsvc" / "export").glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        bad = sorted(n for n in names if (n == "segsvc" or n.startswith("segsvc.")) and not n.startswith(ALLOWED))
        if bad:
            offenders[path.name] = bad
    assert not offenders, offenders


def test_the_command_line_loads_no_torch_until_export_runs() -> None:
    code = "import sys, segsvc.cli as c; c.build_parser(); import segsvc.cli_export; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
