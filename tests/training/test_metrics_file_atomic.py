"""``metrics.jsonl`` rewritten on resume (``training.rundir.write_metrics_file``) replaces the file whole.

A trainer killed while rewriting it, or an artifact fetch reading it meanwhile, used to see a truncated file:
it was truncated in place and written again row by row.
"""

from __future__ import annotations

import json

import pytest

from training.rundir import write_metrics_file

OLD = [{"epoch": 1, "train_loss": 0.9}, {"epoch": 2, "train_loss": 0.8}, {"epoch": 3, "train_loss": 0.7}]


def _rows(path) -> list[dict]:  # type: ignore[no-untyped-def]
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_rewrite_that_dies_half_way_leaves_the_previous_file_whole(tmp_path):
    write_metrics_file(tmp_path, OLD)
    dies_half_way = [OLD[0], {"epoch": 2, "train_loss": object()}]  # the row that cannot be written stops it
    with pytest.raises(TypeError):
        write_metrics_file(tmp_path, dies_half_way)
    assert _rows(tmp_path / "metrics.jsonl") == OLD
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left behind


def test_a_reader_that_opened_the_file_before_the_rewrite_reads_it_whole(tmp_path):
    write_metrics_file(tmp_path, OLD)
    with open(tmp_path / "metrics.jsonl") as reader:  # an artifact fetch streaming it
        write_metrics_file(tmp_path, OLD[:1])
        assert [json.loads(line) for line in reader] == OLD
    assert _rows(tmp_path / "metrics.jsonl") == OLD[:1]
