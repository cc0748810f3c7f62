"""Bad arguments, missing or unwritable files: one line on stderr, no traceback, exit status 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import segsvc.cli_client
from segsvc.cli import main
from segsvc.config import ModelSpec
from segsvc.inference.codec import encode_png
from segsvc.models import build_model
from segsvc.models.artifact import save_artifact


@pytest.fixture
def not_a_folder(tmp_path) -> Path:
    """A path no one can create: its parent is a file (NotADirectoryError, even for root)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return blocker / "out"


@pytest.fixture
def no_server(monkeypatch) -> str:
    """A server address where nothing answers; the client gives up after half a second."""
    monkeypatch.setattr(segsvc.cli_client, "CONNECT_TIMEOUT_S", 0.5)
    return "127.0.0.1:1"


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("segsvc: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_an_output_that_cannot_be_created_is_a_one_line_error(not_a_folder, images, capsys) -> None:
    assert main(["data", "synth", str(not_a_folder), "--count", "2", "--no-progress"]) == 2
    one_line_error(capsys, str(not_a_folder.parent), "Not a directory")
    assert main(["segment", str(images), "--server", "127.0.0.1:1", "--out", str(not_a_folder)]) == 2
    one_line_error(capsys, f"{not_a_folder}: Not a directory")  # before connecting


def test_missing_input_files_are_named_before_connecting(tmp_path, no_server, capsys) -> None:
    missing = str(tmp_path / "missing.yaml")
    assert main(["train", "--server", no_server, "--dataset", "d", "--config", missing]) == 2
    one_line_error(capsys, f"cannot read --config {missing}", "No such file or directory")
    assert main(["jobs", "list", "--server", no_server, "--tls", "--tls-ca", missing]) == 2
    one_line_error(capsys, f"cannot read --tls-ca {missing}")
    assert main(["datasets", "upload", str(tmp_path), "--name", "d", "--server", no_server,
                 "--dataset-yaml", missing]) == 2
    one_line_error(capsys, f"cannot read --dataset-yaml {missing}")  # not "no server answers"


@pytest.fixture
def repo(tmp_path) -> Path:
    spec = ModelSpec("unet", 3, 3, {"base_channels": 4, "depth": 2})
    save_artifact(build_model(spec), tmp_path / "repo", "tiny", spec=spec,
                  class_names=["background", "circle", "rectangle"])
    return tmp_path / "repo"


def test_export_refuses_an_impossible_triton_folder_before_exporting(repo, not_a_folder, capsys) -> None:
    assert main(["export", "tiny", "--repo", str(repo), "--format", "triton", "--out", str(not_a_folder),
                 "--no-progress"]) == 2
    one_line_error(capsys, "Not a directory")
    assert not (repo / "tiny" / "1" / "model.onnx").exists()  # nothing exported for nothing


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        (folder / f"{i}.png").write_bytes(encode_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
    return folder


def test_batch_into_an_impossible_folder_is_a_one_line_error(repo, images, not_a_folder, capsys) -> None:
    assert main(["batch", str(images), "--model-repo", str(repo), "--model", "tiny", "--out", str(not_a_folder),
                 "--device", "cpu", "--no-progress"]) == 2
    one_line_error(capsys, "Not a directory")


def test_batch_resume_keeps_the_stored_options_of_flags_left_out(repo, images, tmp_path, capsys) -> None:
    out = str(tmp_path / "batch")
    common = ["--model-repo", str(repo), "--out", out, "--device", "cpu", "--no-progress"]
    assert main(["batch", str(images), "--model", "tiny", "--overlay", "--color", "--confidence", *common]) == 0
    capsys.readouterr()
    # the README's promise: flags left out keep their stored values, flags given must match them
    assert main(["batch", "--resume", "--overlay", *common]) == 0
    assert main(["batch", "--resume", "--color", "--alpha", "0.5", *common]) == 0
    assert main(["batch", "--resume", *common]) == 0
    assert "error" not in capsys.readouterr().err
    assert main(["batch", "--resume", "--overlay", "--alpha", "0.3", *common]) == 2
    one_line_error(capsys, "--resume with different settings", "'alpha': 0.3")
    assert main(["batch", "--resume", "--tile-size", "32", *common]) == 2
    one_line_error(capsys, "'tile_size': 32")


@pytest.mark.parametrize("tile_size", ["-5", "5000000000", "8"])
def test_an_out_of_range_tile_size_is_named_before_connecting(images, tmp_path, no_server, tile_size, capsys) -> None:
    """Not protobuf's "ValueError: Value out of range" traceback; the server's words, before any connection."""
    assert main(["segment", str(images), "--server", no_server, "--out", str(tmp_path / "out"),
                 "--tile-size", tile_size]) == 2
    one_line_error(capsys, f"tile_size must be 0 (no tiling) or from 16 to 16384, got {tile_size}")


@pytest.mark.parametrize("mb", ["0", "-1", "nan", "4096"])
def test_an_impossible_message_limit_is_named_before_connecting(images, tmp_path, no_server, mb, capsys) -> None:
    """``segment --max-message-mb`` matches a server started with a larger ``--max-message-mb``; a size gRPC cannot
    take is refused before any connection."""
    assert main(["segment", str(images), "--server", no_server, "--out", str(tmp_path / "out"),
                 "--max-message-mb", mb]) == 2
    one_line_error(capsys, "--max-message-mb must be a positive size under 2048 MiB")


def test_the_connection_wait_stays_within_the_runs_deadline(images, tmp_path, monkeypatch, capsys) -> None:
    """--timeout-s is the deadline of the whole run: a dead address must not hold it for CONNECT_TIMEOUT_S.

    The wait the client was given is recorded, not timed."""
    from segsvc.client import SegmentationClient

    waits: list[float] = []
    wait_for_server = SegmentationClient.wait_for_server

    def recording(self, timeout_s: float) -> None:
        waits.append(timeout_s)
        wait_for_server(self, timeout_s)

    monkeypatch.setattr(segsvc.cli_client, "CONNECT_TIMEOUT_S", 30.0)
    monkeypatch.setattr(SegmentationClient, "wait_for_server", recording)
    assert main(["segment", str(images), "--server", "127.0.0.1:1", "--out", str(tmp_path / "out"),
                 "--timeout-s", "1", "--no-progress"]) == 2
    one_line_error(capsys, "no server answered at 127.0.0.1:1 within 1 s")
    assert waits == [1.0], f"the connection wait was {waits} for a run whose deadline is 1 s"


def test_export_from_a_missing_repository_says_so(tmp_path, capsys) -> None:
    missing = tmp_path / "nonexistent"
    assert main(["export", "m", "--repo", str(missing), "--no-progress"]) == 2
    one_line_error(capsys, f"model repository {missing} does not exist")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert main(["export", "m", "--repo", str(a_file), "--no-progress"]) == 2
    one_line_error(capsys, f"model repository {a_file} is not a directory")


def test_an_unauthenticated_call_says_how_to_pass_a_token(monkeypatch, tmp_path, capsys) -> None:
    """The server's message speaks gRPC metadata; the command line adds its own two ways to send a token."""
    from segsvc.errors import Unauthenticated

    def refused(*args, **kwargs):  # what a server with tokens answers a client without one
        raise Unauthenticated("missing bearer token: send metadata 'authorization: Bearer <token>'")

    monkeypatch.setattr(segsvc.cli_client, "open_client", refused)
    monkeypatch.delenv("SEGSVC_AUTH_TOKEN", raising=False)
    assert main(["jobs", "list", "--server", "127.0.0.1:1"]) == 2
    one_line_error(capsys, "missing bearer token: send metadata 'authorization: Bearer <token>' "
                           "(pass --token-file FILE or set $SEGSVC_AUTH_TOKEN)")


def test_a_missing_dataset_folder_is_named_before_connecting(tmp_path, no_server, capsys) -> None:
    """`segsvc datasets upload TYPO --name d` waited for the server first (30 s when none runs), then said
    "no server answered" instead of naming the folder."""
    missing = tmp_path / "shapes-typo"
    assert main(["datasets", "upload", str(missing), "--name", "d", "--server", no_server]) == 2
    one_line_error(capsys, f"{missing} does not exist")


@pytest.mark.parametrize("command", [["segment", "--out", "OUT"], ["jobs", "submit", "--upload"]])
def test_inputs_without_images_are_named_as_typed_before_connecting(tmp_path, no_server, capsys, command) -> None:
    """`segsvc segment a b` of folders without images said "no images found in ['a', 'b']" (a Python list), and
    `jobs submit --upload` of an empty folder said it only after connecting."""
    empty, notes = tmp_path / "empty", tmp_path / "notes"
    empty.mkdir()
    notes.mkdir()
    (notes / "README").write_text("no image here")
    command = [str(tmp_path / "out") if arg == "OUT" else arg for arg in command]
    assert main([*command, str(empty), str(notes), "--server", no_server]) == 2
    err = one_line_error(capsys, f"no images (.png, .jpg, .jpeg, .tif, .tiff, .bmp, .webp) found in {empty}, {notes}")
    assert "[" not in err and "no server" not in err, err
