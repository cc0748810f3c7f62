import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("SEGSVC_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def datasets_root() -> Path:
    if not DATASETS.is_dir():
        pytest.skip(f"real datasets absent: {DATASETS} does not exist (see README, 'Datasets')")
    return DATASETS


@pytest.fixture
def renames(monkeypatch) -> list[tuple[Path, Path]]:
    """Every ``os.replace(src, dst)`` made while the test runs, in order (the renames still happen)."""
    made: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def replace(src, dst):  # type: ignore[no-untyped-def]
        made.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return made
