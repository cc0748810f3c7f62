"""Every benchmark in ``bench/`` imports against the package as it is.

Benchmarks are run by hand, not by the suite, so a name they import that moved in the package broke them
silently: ``bench/bench_server.py`` and ``bench_rayserve.py`` imported ``CPU_BATCH_MB`` from ``segsvc.cli`` after
it moved to ``segsvc.cli_serve`` (703bf04), and no figure of #8 could be measured until someone ran one. Each is
imported in a process of its own (some configure torch or the allocator at import); one whose optional
dependency is not installed (Ray Serve: ``pip install -e '.[bench]'``) is skipped, naming it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", BENCHMARKS)
def test_the_benchmark_imports(name: str) -> None:
    # as ``python bench/NAME.py`` finds its imports: bench/ first on the path (sibling benchmarks), then the root
    script = f"import sys; sys.path.insert(0, 'bench'); sys.argv = ['bench/{name}.py']; import {name}"
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    missing = [line for line in run.stderr.splitlines() if line.startswith("ModuleNotFoundError: No module named")]
    if run.returncode and missing and "segsvc" not in missing[-1] and "bench" not in missing[-1]:
        pytest.skip(f"bench/{name}.py needs an optional package: {missing[-1]}")
    assert run.returncode == 0, run.stderr[-2000:]
