"""Tiny synthetic data sets and recipes so that training tests take seconds on a CPU."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest

TINY_SPEC = """\
name: tiny
format: synthetic
channels: 3
classes: [background, circle, rectangle]
ignore_index: 255
splits:
  train: {count: 24, seed: 0}
  val: {count: 6, seed: 1}
options: {size: [48, 48], max_shapes: 2}
"""

TINY_RECIPE = """\
name: tiny
model:
  arch: unet
  params: {{depth: 2, base_channels: 4, dropout: 0.2}}
data:
  spec: {spec}
  preset: synthetic
  crop: [32, 32]
loss:
  terms: [{{name: ce}}, {{name: dice, weight: 0.5}}]
optim: {{name: adamw, lr: 0.01}}
schedule: {{name: poly, warmup_epochs: 0.5}}
train:
  epochs: 1
  batch_size: 4
  val_batch_size: 3
  threads: 1
  deterministic: true
  progress: false
output:
  runs_dir: {root}/runs
  repo: {root}/repo
"""


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.yaml"
    path.write_text(TINY_SPEC)
    return path


def write_recipe(root: Path, spec: Path, name: str = "tiny.yaml") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_text(TINY_RECIPE.format(spec=spec, root=root))
    return path


@pytest.fixture(scope="session")
def make_recipe(tiny_spec):
    """``make_recipe(folder)`` writes the tiny recipe into ``folder`` (runs and repository go there too)."""
    return lambda root: write_recipe(root, tiny_spec)


@pytest.fixture
def tiny_recipe(tmp_path, tiny_spec) -> Path:
    return write_recipe(tmp_path, tiny_spec)


@contextmanager
def _torch_determinism_kept():
    import torch

    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture(autouse=True)
def _restore_torch_determinism():
    """An in-process run with ``train.deterministic`` switches deterministic algorithms on for the whole
    process; later tests (SegNet's max-unpooling has no deterministic forward on CPU) must not inherit it."""
    with _torch_determinism_kept():
        yield


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_determinism_after_module_fixtures():
    """The same for runs in module-scoped fixtures (``test_evaluate.artifact``), which outlive every test's."""
    with _torch_determinism_kept():
        yield


class AllocatorTuned(Exception):
    """Raised by the patched ``configure_allocator`` of ``tune_first``: nothing ran before it."""


@pytest.fixture
def tune_first(monkeypatch: pytest.MonkeyPatch):
    """Patch a module's ``configure_allocator`` to raise ``AllocatorTuned``, so a command that tunes the
    allocator before anything else raises it even with arguments it would refuse."""

    def patch(module) -> type[AllocatorTuned]:  # type: ignore[no-untyped-def]
        def stop() -> bool:
            raise AllocatorTuned

        monkeypatch.setattr(module, "configure_allocator", stop)
        return AllocatorTuned

    return patch


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib figures the code under test closes, kept open for the test to measure (``plt.close`` is
    intercepted); all are closed at the end."""
    import matplotlib.pyplot as plt

    figures: list = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    yield figures
    real_close("all")
