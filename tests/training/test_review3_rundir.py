"""Review 3: an output folder that already holds another run.

``prepare_run`` refused a run directory only when it held ``checkpoints/last.pt``. A finished run whose
checkpoint was deleted to save space (it holds the optimiser state too) kept its ``metrics.jsonl``,
``artifact.txt`` and ``best.pt``; a new run given the same ``output.run_name`` rewrote that run's metrics as
empty, overwrote its config and would later have replaced its artifact record. A run killed before its
first checkpoint (nothing to lose; the job runner starts such a run again under the same name) is still
taken over.
"""

from __future__ import annotations

import pytest

from segsvc.errors import InvalidArgument
from training.config import load_config
from training.rundir import CHECKPOINT
from training.train import main


def test_a_finished_run_without_its_checkpoint_is_not_overwritten(tiny_recipe):
    overrides = ["output.run_name=kept", "data.train_limit=4"]
    artifact = main(load_config(tiny_recipe, overrides))
    run_dir = tiny_recipe.parent / "runs" / "tiny" / "kept"
    (run_dir / CHECKPOINT).unlink()
    before = {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "config.yaml", "artifact.txt")}
    with pytest.raises(InvalidArgument, match=f"run directory {run_dir} already holds a run "
                                              r"\(metrics.jsonl has 1 epoch\): choose another output.run_name"):
        main(load_config(tiny_recipe, [*overrides, "train.epochs=2"]))
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert str(artifact) in before["artifact.txt"].decode()


def test_a_run_killed_before_its_first_checkpoint_is_started_again_under_its_name(tiny_recipe, monkeypatch):
    import training.train as train_module

    def killed(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train_one_epoch", killed)
    overrides = ["output.run_name=again", "data.train_limit=4"]
    with pytest.raises(KeyboardInterrupt):
        main(load_config(tiny_recipe, overrides))
    monkeypatch.undo()
    run_dir = tiny_recipe.parent / "runs" / "tiny" / "again"
    assert (run_dir / "metrics.jsonl").read_text() == "" and not (run_dir / CHECKPOINT).exists()
    assert main(load_config(tiny_recipe, overrides)) is not None
    assert (run_dir / CHECKPOINT).is_file()
