"""Review 3: progress bars only on a terminal. With stderr sent to a log file (``segsvc train ... 2> log``),
tqdm wrote its carriage-return redraws there: the validation bar every 0.1 s, the training bar at its start
and end, ``segsvc eval``'s bar per image. The log keeps the per-epoch lines; the bars go to terminals only.
pytest's captured stderr is not a terminal, as a log file is not.
"""

from __future__ import annotations

import io

from segsvc.cli import main as segsvc_main
from training.config import load_config
from training.train import main as train_main


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_training_writes_no_bar_into_a_log(tiny_recipe, capsys):
    train_main(load_config(tiny_recipe, ["train.progress=true", "train.val_batch_size=1", "data.train_limit=8",
                                         "loss.class_weights=median_frequency"]))
    err = capsys.readouterr().err
    assert "\r" not in err and "validate" not in err and "class frequencies" not in err, err
    assert "epoch 1/1: loss " in err  # the epoch's log line stays


def test_eval_writes_no_bar_into_a_log(tiny_recipe, tiny_spec, tmp_path, capsys):
    artifact = train_main(load_config(tiny_recipe, ["data.train_limit=4"]))
    capsys.readouterr()
    assert segsvc_main(["eval", "--model", str(artifact), "--data", str(tiny_spec), "--out", str(tmp_path / "o"),
                        "--device", "cpu", "--samples", "0"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "eval tiny/val" not in err, err


def test_a_terminal_still_gets_the_bar(monkeypatch):
    from segsvc.progress import show_progress

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert show_progress(True) is True and show_progress(False) is False
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert show_progress(True) is False


def test_no_stderr_at_all_is_not_a_terminal(monkeypatch):
    from segsvc.progress import show_progress

    monkeypatch.setattr("sys.stderr", None)  # pythonw, or a daemon started without one
    assert show_progress(True) is False
