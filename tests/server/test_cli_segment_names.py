"""``segsvc segment``'s output names: stable per input, and a run never overwrites another input's outputs.

``x.jpg`` and ``x.png`` in one run gave ``x_mask.png`` and ``x__mask.png`` (which got which depended on the
order), and a later run of ``x.png`` alone wrote ``x_mask.png`` over x.jpg's.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from segsvc.cli import main
from segsvc.cli_segment import RECORD, output_stems
from segsvc.errors import InvalidArgument
from tests.server.conftest import encode, make_image, publish


def named(*names: str) -> list[tuple[Path, PurePosixPath]]:
    return [(Path("/in") / n, PurePosixPath(n)) for n in names]


def test_a_shared_stem_keeps_its_suffix_in_every_order() -> None:
    _, stems = output_stems(named("x.jpg", "x.png", "y.png", "sub/x.png"))
    assert stems == ["x.jpg", "x.png", "y", "sub/x"]
    _, stems = output_stems(named("x.png", "x.jpg"))
    assert stems == ["x.png", "x.jpg"]
    # a stem that is another input's whole name keeps its suffix too: x.png.jpg is not x.png's x.png_mask.png
    _, stems = output_stems(named("x.png", "x.jpg", "x.png.jpg"))
    assert stems == ["x.png", "x.jpg", "x.png.jpg"]


def test_the_same_file_twice_is_one_input_and_two_files_of_one_name_get_their_folders_names(tmp_path) -> None:
    """``segsvc segment dayA dayB`` with an img001.png in each was refused (a reviewer's find): one run over
    several folders is ordinary use. Their outputs now go under the folders' names; only names that are the same
    with their folders too are refused."""
    for folder in ("dayA", "dayB", "x/same", "y/same"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "img.png").write_bytes(b"")
    a, b = tmp_path / "dayA" / "img.png", tmp_path / "dayB" / "img.png"
    files, stems = output_stems([(a, PurePosixPath("img.png")), (a, PurePosixPath("img.png"))])
    assert files == [a] and stems == ["img"]
    files, stems = output_stems([(a, PurePosixPath("img.png")), (b, PurePosixPath("img.png")),
                                 (tmp_path / "dayA" / "other.png", PurePosixPath("other.png"))])
    assert stems == ["dayA/img", "dayB/img", "other"]
    with pytest.raises(InvalidArgument, match="have the same name, same/img.png"):
        output_stems([(tmp_path / "x" / "same" / "img.png", PurePosixPath("img.png")),
                      (tmp_path / "y" / "same" / "img.png", PurePosixPath("img.png"))])


def test_segment_names_are_stable_per_input_and_a_run_never_overwrites_another_inputs_outputs(
        start_server, tmp_path, capsys) -> None:
    publish(tmp_path / "repo", "m", seed=7)
    server = start_server(tmp_path / "repo")
    images = tmp_path / "in"
    images.mkdir()
    (images / "x.jpg").write_bytes(encode(make_image(24, 24, seed=1), ".jpg"))
    (images / "x.png").write_bytes(encode(make_image(24, 24, seed=2)))
    out = tmp_path / "out"

    def segment(*inputs: Path, address: str = server.address) -> int:
        return main(["segment", *map(str, inputs), "--server", address, "--out", str(out), "--no-progress"])

    assert segment(images) == 0
    written = sorted(p.name for p in out.iterdir() if p.name != RECORD)
    assert written == ["x.jpg_color.png", "x.jpg_mask.png", "x.png_color.png", "x.png_mask.png"]
    capsys.readouterr()
    assert segment(images / "x.png") == 0  # alone: its stem is unique
    mask_of_png = (out / "x_mask.png").read_bytes()
    assert segment(images / "x.png") == 0  # the same input again replaces its own outputs
    capsys.readouterr()
    # x.jpg alone would write x_mask.png over x.png's: refused before connecting (nothing answers there)
    assert segment(images / "x.jpg", address="127.0.0.1:1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing was sent" in err, err
    assert f"{images / 'x.jpg'} would overwrite {out / 'x_mask.png'}, the outputs of {images / 'x.png'}" in err
    assert (out / "x_mask.png").read_bytes() == mask_of_png
    # outputs the record does not know (written by hand, or before the record) are not overwritten either
    (out / "y_mask.png").write_bytes(b"mine")
    (images / "y.png").write_bytes(encode(make_image(24, 24, seed=3)))
    assert segment(images / "y.png", address="127.0.0.1:1") == 2
    assert "outputs this record does not know" in capsys.readouterr().err
    assert (out / "y_mask.png").read_bytes() == b"mine"
