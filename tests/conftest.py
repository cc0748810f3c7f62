import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("SEGSVC_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))
TIED_LOGITS = 1e-4  # a top-2 logit gap below which float rounding may pick either class


def assert_labels_agree(labels: np.ndarray | torch.Tensor, logits: torch.Tensor, dim: int = 1) -> None:
    """``labels`` are the arg-max of the reference ``logits`` over class dimension ``dim``, except at pixels
    whose top-2 logits are tied to float rounding (gap below ``TIED_LOGITS``), and those are under 0.1%.

    Two computations of one network (batched or single, folded or not, another CPU's kernels) agree
    to float rounding, so only such ties may take the other class.
    """
    logits = logits.detach().float().cpu()
    expected = logits.argmax(dim).numpy()
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else labels
    assert labels.shape == expected.shape
    diff = labels.astype(np.int64) != expected
    if diff.any():
        top2 = logits.topk(2, dim=dim).values
        gap = (top2.select(dim, 0) - top2.select(dim, 1)).numpy()
        assert (gap[diff] < TIED_LOGITS).all(), f"{int(diff.sum())} pixels differ from the reference labels"
        assert diff.mean() < 1e-3


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


@pytest.fixture
def serve_config(monkeypatch, tmp_path):
    """``serve_config(*flags)``: the exit status of ``segsvc serve`` (argparse's too) and the ServerConfig it would
    run (or None)."""
    import segsvc.server.app
    import segsvc.server.logs
    from segsvc.cli import main

    configs: list = []
    monkeypatch.setattr(segsvc.server.app, "run", configs.append)
    monkeypatch.setattr(segsvc.server.logs, "configure_logging", lambda *a, **k: None)

    def build(*flags: str):
        configs.clear()
        try:
            status = main(["serve", "--model-repo", str(tmp_path / "repo"), "--device", "cpu", "--metrics-port", "-1",
                           *flags])
        except SystemExit as exc:  # argparse's refusal of a flag
            status = exc.code
        return status, (configs[0] if configs else None)

    return build
