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
