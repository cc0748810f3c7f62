"""``segsvc batch --resume``: an input that fails on resume keeps no file the killed run renamed into place."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from segsvc.jobs.offline import STATE_FILE, BatchOptions, run_batch
from tests.server.conftest import encode, make_image, publish


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_an_input_failing_on_resume_keeps_no_output_of_the_killed_run(tmp_path: Path) -> None:
    publish(tmp_path / "repo", "tiny", seed=1)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        (inputs / name).write_bytes(encode(make_image(16, 16, seed=i)))
    run_batch([str(inputs)], model_repo=tmp_path / "repo", model="tiny", out=out, device="cpu",
              options=BatchOptions(color=True))
    # The kill -9: b.png's files were renamed into place but the run died before recording it DONE.
    with sqlite3.connect(out / STATE_FILE) as db:
        db.execute("UPDATE items SET state = 'PENDING', result = NULL WHERE input = 'b.png'")
        db.execute("UPDATE jobs SET state = 'RUNNING', done = done - 1, result = NULL, finished_at = NULL")
    db.close()
    (out / "summary.json").unlink()
    (inputs / "b.png").write_bytes(b"replaced before the resume: not an image any more")

    summary = run_batch(None, model_repo=tmp_path / "repo", model=None, out=out, resume=True, device="cpu")

    assert summary["counts"] == {"total": 3, "done": 2, "failed": 1, "skipped": 0}
    assert [f["input"] for f in summary["failures"]] == ["b.png"]
    outputs = [f for f in _files(out) if f.split("/")[0] in ("labels", "color")]
    assert outputs == ["color/a.png.png", "color/c.png.png", "labels/a.png.png", "labels/c.png.png"]
    assert [json.loads(line)["input"] for line in (out / "results.jsonl").read_text().splitlines()] == [
        "a.png", "c.png"]
