"""The client against a real server where the trouble is on the client's side: a local file it cannot read while
uploading, and a server whose message limit is above the client's default."""

from __future__ import annotations

import argparse
import builtins
import os
from pathlib import Path

import pytest

from segsvc import errors
from segsvc.cli_client import add_max_message_flag, open_client
from segsvc.client import DEFAULT_MAX_MESSAGE_BYTES
from segsvc.datasets.archive import ExtractLimits
from segsvc.datasets.registry import DatasetsConfig
from segsvc.jobs.batch import JobsConfig
from segsvc.server.config import LimitsConfig
from tests.datasets.helpers import synth
from tests.server.conftest import RunningServer, server_config

pytestmark = pytest.mark.timeout(300)
MIB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """No models (none is needed), datasets and jobs on, and a message limit above the client's default."""
    root = tmp_path_factory.mktemp("server")
    (root / "data").mkdir()
    datasets = DatasetsConfig(root / "state", data_root=root / "data", limits=ExtractLimits())
    jobs = JobsConfig(state_dir=root / "jobs", output_root=root / "out")
    server = RunningServer(server_config(root / "repo", datasets=datasets, jobs=jobs,
                                         limits=LimitsConfig(max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES + 8 * MIB)))
    yield server
    server.close()


def _unreadable(monkeypatch, path: Path) -> None:
    """``open(path)`` fails with EACCES, as for a file of mode 000 (tests may run as root, which chmod cannot stop)."""
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(file, (str, os.PathLike)) and Path(file) == path:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.parametrize("fmt", ["tar", "pairs"])
def test_an_unreadable_file_is_named_not_exception_iterating_requests(server, tmp_path, monkeypatch, caplog, fmt):
    """A file the client cannot read was opened in gRPC's request thread: the call failed with UNKNOWN
    "Exception iterating requests!", naming nothing. It is an InvalidArgument naming the file, before any call."""
    shapes = synth(tmp_path / "shapes")
    bad = shapes / "images" / "train" / sorted(os.listdir(shapes / "images" / "train"))[0]
    _unreadable(monkeypatch, bad)
    with server.client(timeout_s=60) as c:
        with pytest.raises(errors.InvalidArgument) as info:
            c.upload_dataset(shapes, "shapes", format=fmt)
        assert str(info.value) == f"cannot read {bad}: Permission denied"
        assert not [r for r in caplog.records if r.name.startswith("grpc")]  # nor its traceback on stderr
        monkeypatch.undo()
        assert c.list_datasets() == []
        assert c.upload_dataset(shapes, "shapes", format=fmt).name == "shapes"  # the server is fine afterwards
        c.delete_dataset("shapes")


@pytest.mark.parametrize("fmt", ["tar", "pairs"])
def test_a_file_removed_during_the_upload_is_named_and_nothing_is_registered(server, tmp_path, monkeypatch, caplog,
                                                                             fmt):
    """A file removed after the walk (while earlier files are being sent) failed the same way, in gRPC's request
    thread. The upload is cancelled (the server keeps no partial dataset) and the error names the file."""
    import segsvc.client

    shapes = synth(tmp_path / "shapes")
    files = segsvc.client.local_files(shapes)
    gone = files[-1][1]
    real = segsvc.client.file_chunks if fmt == "pairs" else segsvc.client.tar_stream
    name = "file_chunks" if fmt == "pairs" else "tar_stream"

    def removing(*args, **kwargs):  # type: ignore[no-untyped-def]
        gone.unlink(missing_ok=True)  # once the first file is on its way
        yield from real(*args, **kwargs)

    monkeypatch.setattr(segsvc.client, name, removing)
    with server.client(timeout_s=60) as c:
        with pytest.raises(errors.InvalidArgument) as info:
            c.upload_dataset(shapes, "shapes", format=fmt)
        assert str(info.value) == f"cannot read {gone}: No such file or directory"
        assert not [r for r in caplog.records if r.name.startswith("grpc")]  # nor its traceback on stderr
        assert c.list_datasets() == []


def test_an_image_upload_names_a_file_it_cannot_read(server, tmp_path, monkeypatch, caplog):
    """``upload_images`` (``segsvc jobs submit --upload``) opened its files in gRPC's request thread too: an
    unreadable one, or one removed while earlier ones were sent, was UNKNOWN "Exception iterating requests!"."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (scans / name).write_bytes(b"\x89PNG" + bytes(100))
    _unreadable(monkeypatch, scans / "b.png")
    with server.client(timeout_s=60) as c:
        with pytest.raises(errors.InvalidArgument) as info:
            c.upload_images([scans])
        assert str(info.value) == f"cannot read {scans / 'b.png'}: Permission denied"
        monkeypatch.undo()

        real_open = builtins.open
        opened: list[str] = []

        def removing_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
            if isinstance(file, (str, os.PathLike)) and Path(file).parent == scans:
                opened.append(Path(file).name)
                if opened == ["a.png", "b.png", "c.png", "a.png"]:  # checked, then sent: c.png goes after a.png
                    (scans / "c.png").unlink()
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", removing_open)
        with pytest.raises(errors.InvalidArgument) as info:
            c.upload_images([scans])
        assert str(info.value) == f"cannot read {scans / 'c.png'}: No such file or directory"
    assert not [r for r in caplog.records if r.name.startswith("grpc")]


def _args(*argv: str, **overrides) -> argparse.Namespace:
    """The common client flags, and ``--max-message-mb`` as ``add_max_message_flag`` adds it, parsed from ``argv``."""
    parser = argparse.ArgumentParser()
    add_max_message_flag(parser)
    args = parser.parse_args(argv)
    common = dict(server="", token_file=None, tls=False, tls_ca=None, timeout_s=60.0)
    for name, value in {**common, **overrides}.items():
        setattr(args, name, value)
    return args


def test_the_command_line_client_takes_a_message_limit_for_a_server_configured_above_the_default(server):
    """`segsvc segment` always opened its client with the 64 MiB default: an image over it was refused by the client
    ("raise max_message_bytes", which no flag could) even when the server takes it. ``--max-message-mb`` (read by
    ``open_client``) raises the client's limit each way, and the image reaches the server."""
    big = b"\x89PNG-not-really" + bytes(DEFAULT_MAX_MESSAGE_BYTES)  # over the default; the server says it is no image
    with open_client(_args(server=server.address)) as client:
        assert client.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
        with pytest.raises(errors.ImageTooLarge, match="over this client's limit"):
            client.segment(big)
    with open_client(_args("--max-message-mb", "72", server=server.address)) as client:
        assert client.max_message_bytes == 72 * MIB
        with pytest.raises(errors.SegsvcError) as info:
            client.segment(big)
        assert not isinstance(info.value, errors.ImageTooLarge), info.value


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "2048"])
def test_a_message_limit_that_is_no_positive_size_is_named_before_connecting(monkeypatch, value):
    import segsvc.cli_client

    monkeypatch.setattr(segsvc.cli_client, "CONNECT_TIMEOUT_S", 0.5)  # were it to wait for 127.0.0.1:1
    with pytest.raises(errors.InvalidArgument, match=f"--max-message-mb must be a positive size under 2048 MiB "
                                                     rf"\(as the server's --max-message-mb\), got {float(value):g}"):
        open_client(_args("--max-message-mb", value, server="127.0.0.1:1"))
