"""What the trainer and ``segsvc eval`` print says what was done, in the units of their other lines: the trainer's
closing line in percent like its epoch lines; eval's header names no overlap tiles' borders when it ran none."""

from __future__ import annotations

import re

import pytest

from segsvc.config import InferenceSpec
from training.config import load_config
from training.evaluate import EvalOptions, describe_contract
from training.train import main

NUMBER = r"(\d+\.\d\d)"


def test_the_closing_line_is_in_percent_like_the_epoch_lines(tiny_recipe, capsys):
    artifact = main(load_config(tiny_recipe, ["data.train_limit=8"]))
    said = capsys.readouterr()
    out = said.out
    epoch = re.search(rf"epoch 1/1: .*; val mIoU {NUMBER}, pixel acc {NUMBER}$", said.err, re.M)  # the log
    best = re.search(rf"^best epoch 1: val mIoU {NUMBER}, pixel accuracy {NUMBER}$", out, re.M)
    assert epoch and best, (said.err, out)
    assert best.groups() == epoch.groups()  # one epoch: the same validation, said the same way
    assert f"artifact: {artifact}" in out


@pytest.mark.parametrize("tile, flip", [((0, 0), False), (None, None)])
def test_eval_without_tiles_says_no_mirrored_tile_borders(tile, flip):
    """``--tile 0 0`` (or a manifest without tiles) on a ``tile_padding: reflect`` model: no tiles, so no tiles'
    mirrored borders; the padding to the stride is still mirrored, and said so."""
    contract = InferenceSpec(tile_size=0, tile_padding="reflect")
    line = describe_contract(contract, EvalOptions(tile=tile, hflip=flip))
    source = "flag" if tile else "manifest"
    assert f"no tiling ({source}), mirrored padding to the stride (manifest), flip TTA off ({source})" in line
    assert "mirrored borders" not in line


def test_eval_with_tiles_keeps_the_mirrored_borders():
    line = describe_contract(InferenceSpec(tile_size=32, tile_padding="reflect"), EvalOptions())
    assert "tiles 32 overlap 0.25 (manifest), mirrored borders (manifest), flip TTA off" in line
    line = describe_contract(InferenceSpec(tile_size=0), EvalOptions())
    assert "no tiling (manifest), flip TTA off" in line and "mirrored" not in line
