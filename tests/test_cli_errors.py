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
    """Not protobuf's "ValueError: Value out of range" traceback; named by the flag, before any connection."""
    with pytest.raises(SystemExit) as exc:
        main(["segment", str(images), "--server", no_server, "--out", str(tmp_path / "out"), "--tile-size", tile_size])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"segsvc segment: error: argument --tile-size: must be 0 (no tiling) or a whole number of pixels "
                   f"from 16 to 16384, got {tile_size}\n")


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


# -- flags refused by their names, as typed (not the configuration's fields, in its units) -----------------------
@pytest.fixture
def serve(serve_config, tmp_path):
    """``serve(*flags)``: ``segsvc serve``'s exit status (argparse's too) and the ServerConfig it would run."""
    return lambda *flags: serve_config("--port", "0", "--state-dir", str(tmp_path / "state"), *flags)


def flag_error(capsys, flag: str, value: str) -> str:
    """The one line naming ``flag`` and ``value`` as typed (argparse's ``argument --flag: ...`` or the command's)."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "usage:" not in err, err
    assert f"{flag}" in err and f"got {value}" in err, err
    return err


SERVE_FLAGS = [
    ("--max-delay-ms", "-1"), ("--max-delay-ms", "nan"), ("--concurrent-batches", "0"), ("--max-queue", "0"),
    ("--max-batch-size", "0"), ("--poll-interval-s", "-1"), ("--max-pixels", "0"), ("--max-inflight-mb", "0"),
    ("--max-tiles", "0"), ("--max-stream-in-flight", "0"), ("--max-concurrent-rpcs", "0"), ("--io-threads", "-1"),
    ("--torch-threads", "-1"), ("--port", "-1"), ("--port", "70000"), ("--metrics-port", "-2"),
    ("--metrics-port", "70000"), ("--max-running-jobs", "0"), ("--max-training-jobs", "-1"),
    ("--max-train-min", "0"), ("--max-train-min", "nan"), ("--max-job-images", "0"), ("--max-job-paths", "-1"),
    ("--max-upload-mb", "0"), ("--max-upload-mb", "inf"), ("--max-upload-mb", "1e308"), ("--max-upload-file-mb", "-3"),
    ("--upload-ttl-hours", "-1"), ("--max-dataset-mb", "0"), ("--max-dataset-files", "0"),
    ("--max-dataset-ratio", "0"), ("--max-dataset-ratio", "nan"), ("--max-dataset-pixels", "0"),
    ("--max-dataset-uploads", "0"), ("--dataset-upload-idle-s", "0"), ("--max-datasets-disk-mb", "-1"),
    ("--max-datasets-disk-mb", "nan"),
]


@pytest.mark.parametrize("flag, value", SERVE_FLAGS)
def test_serve_names_a_bad_flag_and_its_value_as_typed(serve, capsys, flag, value) -> None:
    """``--max-delay-ms -1`` said "max_delay_s must be >= 0, got -0.001", ``--metrics-port -2`` turned the metrics
    off, ``--max-upload-mb inf`` failed with an OverflowError's traceback, ``--max-dataset-ratio nan`` was taken."""
    status, config = serve(flag, value)
    assert status == 2 and config is None
    flag_error(capsys, flag, value)


def test_zero_training_jobs_and_metrics_port_minus_one_do_what_the_help_says(serve, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "0 turns training jobs off" in help_text and "-1 disables" in help_text
    status, config = serve("--metrics-port", "-1", "--max-training-jobs", "0")
    assert status == 0 and config.metrics_port is None and config.training is None and config.jobs is not None


def test_an_unknown_log_level_is_one_line_naming_the_flag_and_the_levels(serve, capsys) -> None:
    """``--log-level FOO`` ended in a 17-line traceback (``ValueError: Unknown level: 'FOO'``), exit 1."""
    for level in ("FOO", "10", "verbose"):
        status, config = serve("--log-level", level)
        err = capsys.readouterr().err
        assert status == 2 and config is None and err.count("\n") == 1, err
        assert "--log-level" in err and "DEBUG" in err and "CRITICAL" in err and "Traceback" not in err
    for level in ("debug", "warn", "FATAL", "notset"):  # any case and logging's aliases, as before (a reviewer)
        assert serve("--log-level", level)[0] == 0, level


def test_configure_logging_refuses_an_unknown_level_with_a_domain_error() -> None:
    from segsvc.errors import InvalidArgument
    from segsvc.server.logs import configure_logging

    with pytest.raises(InvalidArgument, match="log level must be one of DEBUG, INFO"):
        configure_logging("FOO")


@pytest.mark.parametrize("var", ["SEGSVC_AUTH_TOKEN", "SEGSVC_ADMIN_TOKEN"])
def test_a_token_variable_with_whitespace_is_named(serve, monkeypatch, capsys, var) -> None:
    monkeypatch.setenv(var, "two words")
    status, config = serve()
    err = capsys.readouterr().err
    assert status == 2 and config is None and err.count("\n") == 1, err
    assert f"${var} must be one token" in err and "two words" not in err  # the secret is not shown


CLIENT_FLAGS = [
    (["segment", "IMAGES", "--out", "OUT"], "--tile-size", "-1"),
    (["jobs", "submit", "x"], "--tile-size", "8"),
    (["batch", "IMAGES", "--model-repo", "REPO", "--out", "OUT"], "--tile-size", "-5"),
    (["batch", "IMAGES", "--model-repo", "REPO", "--out", "OUT"], "--batch-size", "0"),
    (["batch", "IMAGES", "--model-repo", "REPO", "--out", "OUT"], "--io-threads", "-1"),
    (["batch", "IMAGES", "--model-repo", "REPO", "--out", "OUT"], "--actors", "0"),
    (["batch", "IMAGES", "--model-repo", "REPO", "--out", "OUT"], "--alpha", "2"),
    (["segment", "IMAGES", "--out", "OUT"], "--alpha", "1.5"),
    (["train", "--dataset", "d", "--recipe", "r"], "--budget-min", "0"),
    (["train", "--dataset", "d", "--recipe", "r"], "--epochs", "0"),
    (["train", "--dataset", "d", "--recipe", "r"], "--nproc-per-node", "0"),
    (["train", "--dataset", "d", "--recipe", "r"], "--gate-margin", "nan"),
    (["eval", "--model", "REPO/tiny", "--data", "synthetic"], "--scale", "0"),
    (["eval", "--model", "REPO/tiny", "--data", "synthetic"], "--tile", "8"),
    (["eval", "--model", "REPO/tiny", "--data", "synthetic"], "--overlap", "1.5"),
    (["eval", "--model", "REPO/tiny", "--data", "synthetic"], "--tta-scales", "0"),
]


@pytest.mark.parametrize("command, flag, value", CLIENT_FLAGS,
                         ids=[f"{c[0]}{f}={v}" for c, f, v in CLIENT_FLAGS])
def test_other_commands_name_a_bad_flag_and_its_value_as_typed(command, flag, value, repo, images, tmp_path,
                                                               no_server, capsys) -> None:
    """``--tile-size -1`` said "tile_size must be ...", ``--batch-size 0`` "batch_size and actors must be
    positive", ``--scale 0`` "inference scale must be ..."; ``train --server --epochs 0`` and ``jobs submit
    --tile-size 8`` were sent to the server first."""
    paths = {"IMAGES": str(images), "OUT": str(tmp_path / "out"), "REPO": str(repo)}
    argv = [paths.get(a, a.replace("REPO", str(repo))) for a in command]
    server = ["--server", no_server] if command[0] in ("segment", "jobs", "train") else []
    with pytest.raises(SystemExit) as exc:
        main([*argv, *server, flag, *(value, value)[:2 if flag == "--tile" else 1]])
    assert exc.value.code == 2
    flag_error(capsys, flag, value)


# -- job folders that cannot work are refused at the start, by their flags ------------------------------------
def test_job_folders_that_cannot_work_are_refused_at_the_start(serve, tmp_path, not_a_folder, capsys) -> None:
    """A missing --data-root or an --output-root under a file was taken; every job then failed ("the data root
    does not exist", "cannot write the job's outputs: No such file or directory")."""
    for flags, needle in (
        (["--data-root", str(tmp_path / "missing")], f"--data-root {tmp_path / 'missing'} does not exist"),
        (["--data-root", str(not_a_folder.parent)], "--data-root"),
        (["--output-root", str(not_a_folder)], f"--output-root {not_a_folder} cannot be created"),
        (["--output-root", str(not_a_folder.parent)], "is not a folder"),
        (["--output-root", "/proc/segsvc-outputs"], "--output-root /proc/segsvc-outputs cannot be created"),
        (["--state-dir", str(not_a_folder.parent)], f"--state-dir {not_a_folder.parent} is not a folder"),
    ):
        status, config = serve(*flags)
        err = capsys.readouterr().err
        assert status == 2 and config is None and err.count("\n") == 1 and needle in err, (flags, err)
    # an output root not there yet is created by the first job, as before: only what cannot work is refused
    data = tmp_path / "data"
    data.mkdir()
    status, config = serve("--data-root", str(data), "--output-root", str(tmp_path / "new" / "outputs"))
    assert status == 0 and config.jobs.output_root == tmp_path / "new" / "outputs"
    assert not (tmp_path / "new").exists() and list(tmp_path.glob("**/.segsvc-probe-*")) == []
