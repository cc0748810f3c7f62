"""events.jsonl: the reader, the writer's guarantees, and the lines a real run writes (the job runner's contract)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from training.config import load_config
from training.events import EVENTS_FILE, EventLog, Terminated, read_events
from training.rundir import CHECKPOINT
from training.train import EXIT_TERMINATED, cli, main

SCHEMA = {  # the fields the job runner relies on; more may be added, none renamed
    "start": {"run_dir", "epochs", "steps_per_epoch", "train_samples", "val_samples", "start_epoch"},
    "step": {"epoch", "step", "steps_per_epoch", "loss", "lr", "images_per_s"},
    "epoch": {"epoch", "epochs", "train_loss", "lr", "images_per_s", "val_miou", "best_miou", "elapsed_s", "eta_s"},
    "checkpoint": {"epoch", "path"},
    "published": {"path", "name", "version", "metrics"},
    "end": {"status", "reason"},
}


def events_of(run_dir: Path) -> list[dict]:
    events, _ = read_events(run_dir / EVENTS_FILE)
    return events


def test_read_events_leaves_a_partly_written_line_for_the_next_call(tmp_path):
    path = tmp_path / EVENTS_FILE
    path.write_bytes(b'{"event": "start", "time": 1}\n{"event": "step", "ti')
    events, offset = read_events(path)
    assert [e["event"] for e in events] == ["start"] and offset == len(b'{"event": "start", "time": 1}\n')
    assert read_events(path, offset) == ([], offset)
    with open(path, "ab") as f:
        f.write(b'me": 2}\nnot json\n{"event": "end", "time": 3}\n')
    events, end = read_events(path, offset)
    assert [(e["event"], e["time"]) for e in events] == [("step", 2), ("end", 3)]
    assert end == path.stat().st_size
    assert read_events(tmp_path / "missing.jsonl", 7) == ([], 7)


def test_the_log_always_ends_with_an_end_line(tmp_path):
    with EventLog(tmp_path / "ok.jsonl") as events:
        events.emit("start", loss=float("nan"))
    with pytest.raises(ValueError):
        with EventLog(tmp_path / "bad.jsonl") as events:
            raise ValueError("disk on fire")
    with pytest.raises(Terminated):
        with EventLog(tmp_path / "term.jsonl"):
            raise Terminated("SIGTERM")
    ok = [json.loads(x) for x in (tmp_path / "ok.jsonl").read_text().splitlines()]
    assert ok[0]["loss"] is None and isinstance(ok[0]["time"], float)  # NaN is not JSON
    assert ok[-1] == {"event": "end", "time": ok[-1]["time"], "status": "completed", "reason": ""}
    bad = json.loads((tmp_path / "bad.jsonl").read_text().splitlines()[-1])
    assert (bad["status"], bad["reason"]) == ("failed", "ValueError: disk on fire")
    term = json.loads((tmp_path / "term.jsonl").read_text().splitlines()[-1])
    assert (term["status"], term["reason"]) == ("failed", "terminated")


def test_step_lines_are_throttled_and_a_disabled_log_writes_nothing(tmp_path):
    with EventLog(tmp_path / "e.jsonl", step_interval_s=3600) as events:
        assert events.step_due()
        events.step(step=1)
        assert not events.step_due()
    with EventLog(None) as silent:
        assert not silent.step_due()
        silent.emit("start")
    assert [e["event"] for e in read_events(tmp_path / "e.jsonl")[0]] == ["step", "end"]


def test_a_run_writes_the_contracted_events(tiny_recipe):
    artifact = main(load_config(tiny_recipe, ["train.epochs=2", "data.train_limit=8", "output.run_name=ev"]))
    run_dir = tiny_recipe.parent / "runs" / "tiny" / "ev"
    events = events_of(run_dir)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-2:] == ["published", "end"]
    assert kinds.count("epoch") == kinds.count("checkpoint") == 2
    for e in events:
        assert SCHEMA[e["event"]] <= set(e), e
    start = events[0]
    assert (start["epochs"], start["start_epoch"], start["train_samples"], start["val_samples"]) == (2, 0, 8, 6)
    assert start["steps_per_epoch"] == 2 and start["run_dir"] == str(run_dir) and start["init_from"] is None
    steps = [e for e in events if e["event"] == "step"]
    assert [s["step"] for s in steps if s["epoch"] == 2][-1] == 4  # the last step of every epoch is reported
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and epochs[-1]["eta_s"] == 0
    assert epochs[-1]["best_miou"] == max(e["val_miou"] for e in epochs)
    published = events[-2]
    assert published["path"] == str(artifact) and published["version"] == 1 and "miou" in published["metrics"]
    assert events[-1]["status"] == "completed" and "2 of 2 epochs" in events[-1]["reason"]


def test_sigterm_stops_cleanly_and_the_run_resumes(tiny_recipe, monkeypatch):
    import training.train as train_module

    real = train_module.train_one_epoch

    def sigterm_in_epoch_two(*args, **kwargs):
        if args[7] == 1:  # the 0-based epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", sigterm_in_epoch_two)
    before = signal.getsignal(signal.SIGTERM)  # not always SIG_DFL: e.g. ray.init installs one in this process
    argv = ["--config", str(tiny_recipe), "--set", "train.epochs=3", "--set", "data.train_limit=8",
            "--set", "output.run_name=term"]
    assert cli(argv) == EXIT_TERMINATED
    run_dir = tiny_recipe.parent / "runs" / "tiny" / "term"
    assert events_of(run_dir)[-1] | {"time": 0} == {"event": "end", "time": 0, "status": "failed",
                                                   "reason": "terminated"}
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["epoch"] == 1
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is only installed during a run

    monkeypatch.setattr(train_module, "train_one_epoch", real)
    assert cli([*argv, "--resume", str(run_dir)]) == 0
    events = events_of(run_dir)
    starts = [e for e in events if e["event"] == "start"]
    assert [s["start_epoch"] for s in starts] == [0, 1] and events[-1]["status"] == "completed"
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2, 3]


def test_a_domain_error_ends_the_run_with_its_message_and_no_class_name(tmp_path):
    """A refusal raised during a run (an index range that does not fit the split) ended the events with
    "InvalidArgument: index range ...", and the job's error showed the class name to the client."""
    from segsvc.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        with EventLog(tmp_path / EVENTS_FILE):
            raise InvalidArgument("index range [0, 100000) does not fit a split of 8 samples")
    with pytest.raises(ZeroDivisionError):
        with EventLog(tmp_path / "other" / EVENTS_FILE):
            raise ZeroDivisionError("division by zero")
    assert events_of(tmp_path)[-1]["reason"] == "index range [0, 100000) does not fit a split of 8 samples"
    assert events_of(tmp_path / "other")[-1]["reason"] == "ZeroDivisionError: division by zero"  # a bug keeps it
