"""DatasetService against a real server: uploads in three formats, rich errors, confinement, auth, the CLI."""

from __future__ import annotations

import os
import tarfile
import threading

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from segsvc import errors
from segsvc.cli import main as cli_main
from segsvc.datasets.archive import ExtractLimits
from segsvc.datasets.content import hash_folder
from segsvc.datasets.registry import DatasetsConfig
from segsvc.server.auth import AuthConfig
from segsvc.server.errors import MAX_DETAILS_BYTES, status_details
from segsvc.v1 import datasets_pb2 as pb
from segsvc.v1 import datasets_pb2_grpc as pb_grpc
from tests.datasets.helpers import broken, flat, member, synth, tar_with, zip_of


def _config(tmp_path, **limits) -> DatasetsConfig:
    return DatasetsConfig(tmp_path / "state", data_root=tmp_path / "data", limits=ExtractLimits(**limits))


def _leftovers(tmp_path) -> set[str]:
    return {p.name for p in (tmp_path / "state" / "datasets").iterdir()}


@pytest.fixture
def dataset_server(start_server, tmp_path):
    (tmp_path / "data").mkdir()
    return start_server(tmp_path / "repo", datasets=_config(tmp_path))


def test_tar_zip_and_pairs_uploads_are_one_dataset(dataset_server, tmp_path):
    shapes = synth(tmp_path / "local" / "shapes")
    (tmp_path / "shapes.zip").write_bytes(zip_of(shapes, prefix="shapes/"))
    expected, files, size = hash_folder(shapes)
    with dataset_server.client(timeout_s=60) as c:
        first = c.upload_dataset(shapes, "shapes", sha256=expected)  # a tar stream packed on the fly
        assert (first.sha256, first.files, first.total_bytes) == (expected, files, size)
        assert first.source == pb.DATASET_SOURCE_UPLOADED and first.source_path == "tar"
        assert {s.split: s.samples for s in first.splits} == {"train": 6, "val": 2}
        assert [s.class_name for s in first.class_shares] == list(first.class_names)
        assert abs(sum(s.share for s in first.class_shares) - 1) < 1e-6
        assert c.upload_dataset(tmp_path / "shapes.zip", "shapes") == first
        assert c.upload_dataset(shapes, "shapes", format="pairs") == first
        with pytest.raises(errors.AlreadyExists, match="registered as 'shapes'"):
            c.upload_dataset(shapes, "again", format="pairs")
        assert [d.name for d in c.list_datasets()] == ["shapes"]
        assert c.get_dataset(expected[:12]) == first
        assert c.delete_dataset("shapes") == first
        assert c.list_datasets() == []
        with pytest.raises(errors.NotFound):
            c.get_dataset("shapes")
    assert _leftovers(tmp_path) == set()


def test_a_broken_dataset_is_failed_precondition_with_every_problem_in_the_details(dataset_server, tmp_path):
    folder = broken(tmp_path / "local" / "broken")
    expected = [("image without mask", "images/lonely.png"), ("labels outside the classes", "masks/b.png"),
                ("mask without image", "masks/orphan.png")]
    with dataset_server.client(timeout_s=60) as c:
        for fmt in ("tar", "pairs"):
            with pytest.raises(errors.DatasetInvalid, match="3 problem") as info:
                c.upload_dataset(folder, "broken", format=fmt)
            assert sorted((kind, path) for kind, path, _ in info.value.problems) == expected
    # The same over raw gRPC: the status details are a standard google.rpc.PreconditionFailure.
    with grpc.insecure_channel(dataset_server.address) as channel:
        stub = pb_grpc.DatasetServiceStub(channel)
        data = tar_with([(member(rel), (folder / rel).read_bytes())
                         for rel in ("dataset.yaml", "images/a.png", "images/b.png", "images/lonely.png",
                                     "masks/a.png", "masks/b.png", "masks/orphan.png")])
        messages = [pb.UploadDatasetRequest(metadata=pb.UploadDatasetMetadata(name="broken",
                                                                              format=pb.UPLOAD_FORMAT_TAR)),
                    pb.UploadDatasetRequest(chunk=pb.DatasetChunk(data=data))]
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadDataset(iter(messages), timeout=60)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        status = rpc_status.from_call(info.value)
        failure = error_details_pb2.PreconditionFailure()
        assert len(status.details) == 2 and status.details[0].Unpack(failure)  # then the ErrorInfo
        assert sorted((v.type, v.subject) for v in failure.violations) == expected
        assert all(v.description for v in failure.violations)
    assert _leftovers(tmp_path) == set()


def test_hostile_uploads_are_refused_and_leave_nothing(start_server, tmp_path):
    (tmp_path / "data").mkdir()
    server = start_server(tmp_path / "repo", datasets=_config(tmp_path, max_bytes=200_000, max_files=30))
    shapes = synth(tmp_path / "local" / "shapes")
    traversal = tmp_path / "evil.tar"
    traversal.write_bytes(tar_with([(member("../../evil.png"), b"x")]))
    symlink = tmp_path / "link.tar"
    symlink.write_bytes(tar_with([(member("images/x.png", tarfile.SYMTYPE, "/etc/passwd"), b"")]))
    big = tmp_path / "big"
    flat(big, [f"s{i}" for i in range(6)])
    (big / "images" / "padding.bin").write_bytes(os.urandom(250_000))
    many = flat(tmp_path / "many", [f"s{i}" for i in range(20)])
    with server.client(timeout_s=60) as c:
        for path, fmt, error, match in (
            (traversal, None, errors.UploadError, "climbs out"),
            (symlink, None, errors.UploadError, "symlink"),
            (big, "tar", errors.UploadError, "larger than 200000 bytes"),
            (big, "pairs", errors.UploadError, "larger than 200000 bytes"),
            (many, "pairs", errors.UploadError, "more than 30 files"),
        ):
            with pytest.raises(error, match=match):
                c.upload_dataset(path, "evil", format=fmt)
            assert _leftovers(tmp_path) == set(), (path, fmt)
        assert c.list_datasets() == []
        # The server is fine afterwards.
        assert c.upload_dataset(shapes, "shapes").files == 17


def test_register_is_confined_to_the_data_root(dataset_server, tmp_path):
    data = tmp_path / "data"
    synth(data / "shapes")
    outside = flat(tmp_path / "outside", ["a", "b"])
    os.symlink(outside, data / "escape")
    with dataset_server.client(timeout_s=60) as c:
        for path in ("escape", "../outside", str(outside)):
            with pytest.raises(errors.PathOutsideRoot):
                c.register_dataset(path, name="x")
        d = c.register_dataset("shapes")
        assert d.name == "shapes" and d.source == pb.DATASET_SOURCE_REGISTERED and d.source_path == "shapes"
        assert d.sha256 == hash_folder(data / "shapes")[0]
    assert _leftovers(tmp_path) == {d.sha256}


def test_an_infer_token_cannot_touch_datasets(start_server, tmp_path):
    (tmp_path / "data").mkdir()
    auth = AuthConfig.parse("infer-tok infer\njobs-tok jobs\nadmin-tok manage\n")
    server = start_server(tmp_path / "repo", datasets=_config(tmp_path), auth=auth)
    shapes = synth(tmp_path / "local" / "shapes")
    for token in ("infer-tok", "jobs-tok"):
        with server.client(token=token) as c:
            for call in (c.list_datasets, lambda: c.get_dataset("x"), lambda: c.delete_dataset("x"),
                         lambda: c.register_dataset("x"), lambda: c.upload_dataset(shapes, "shapes")):
                with pytest.raises(errors.PermissionDenied, match="lacks the 'manage' scope"):
                    call()
    assert _leftovers(tmp_path) == set()
    with server.client(token="admin-tok") as c:
        assert c.upload_dataset(shapes, "shapes").name == "shapes"


def test_datasets_are_off_without_a_state_dir(start_server, tmp_path):
    server = start_server(tmp_path / "repo")
    with server.client() as c:
        with pytest.raises(errors.FailedPrecondition, match="not enabled"):
            c.list_datasets()


def test_a_long_problem_list_is_cut_to_fit_the_trailers():
    problems = tuple(("labels outside the classes", f"masks/{i:05d}.png", "values 7 outside the classes")
                     for i in range(1000))
    exc = errors.DatasetInvalid("1000 problems", problems)
    data = status_details(exc, grpc.StatusCode.FAILED_PRECONDITION, "1000 problems")
    assert len(data) < MAX_DETAILS_BYTES + 200
    from google.rpc import status_pb2

    status = status_pb2.Status.FromString(data)
    failure = error_details_pb2.PreconditionFailure()
    assert status.details[0].Unpack(failure)
    shown = failure.violations
    assert 20 < len(shown) < 1000 and shown[-1].type == "truncated"
    assert shown[-1].description.startswith(f"{1000 - (len(shown) - 1)} more problem(s)")


def test_the_cli(dataset_server, tmp_path, capsys):
    shapes = synth(tmp_path / "data" / "shapes")
    server = ["--server", dataset_server.address]
    assert cli_main(["datasets", "upload", str(shapes), "--name", "up", "--pairs", "--no-progress", *server]) == 0
    assert cli_main(["datasets", "list", *server]) == 0
    out = capsys.readouterr().out
    assert "up  " in out and "train 6, val 2" in out
    assert cli_main(["datasets", "show", "up", "--json", *server]) == 0
    shown = capsys.readouterr().out
    assert '"sha256": "' + hash_folder(shapes)[0] in shown and '"source": "upload"' in shown
    assert cli_main(["datasets", "delete", "up", *server]) == 0
    assert cli_main(["datasets", "register", "shapes", "--name", "reg", *server]) == 0
    assert "register:shapes" in capsys.readouterr().out
    broken(tmp_path / "broken")
    assert cli_main(["datasets", "upload", str(tmp_path / "broken"), "--name", "b", "--no-progress", *server]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err and "[mask without image] masks/orphan.png" in err


def test_a_dataset_a_training_job_uses_is_not_deleted_until_the_job_ends(start_server, tmp_path, monkeypatch,
                                                                          capsys):
    """One job RUNNING on 'other' (a stand-in trainer that waits for its cancel), one QUEUED behind it on 'shapes'."""
    from segsvc.jobs import training
    from segsvc.jobs.batch import JobsConfig
    from segsvc.jobs.trainspec import TrainingConfig

    started = threading.Event()

    async def train(self, run):  # type: ignore[no-untyped-def]
        started.set()
        await run.cancel.wait()
        raise training._Stop("CANCELLED", "cancelled while training")

    monkeypatch.setattr(training.TrainingRunner, "_train", train)
    (tmp_path / "data").mkdir()
    state = tmp_path / "state"
    server = start_server(tmp_path / "repo", datasets=_config(tmp_path),
                          jobs=JobsConfig(state_dir=state, output_root=state / "outputs"),
                          training=TrainingConfig(state_dir=state, max_training_jobs=1))
    cli = ["--server", server.address]
    with server.client(timeout_s=60) as c:
        shapes = c.upload_dataset(synth(tmp_path / "local" / "shapes"), "shapes")
        c.upload_dataset(flat(tmp_path / "local" / "other", ["a", "b", "c", "d"]), "other")
        running = c.submit_training_job("other", recipe="synthetic-quick", epochs=1, device="cpu")
        assert started.wait(60), "the stand-in trainer never started"
        queued = c.submit_training_job("shapes", recipe="synthetic-quick", epochs=1, device="cpu")
        for name, job in (("other", running), ("shapes", queued)):
            with pytest.raises(errors.FailedPrecondition) as info:
                c.delete_dataset(name)
            message = str(info.value)
            assert job.id in message and "cancel them or wait" in message and str(tmp_path) not in message
        assert cli_main(["datasets", "delete", "shapes", *cli]) != 0
        err = capsys.readouterr().err
        assert queued.id in err and "deleted" not in err
        assert c.get_dataset("shapes") == shapes
        running.cancel()
        queued.cancel()
        assert running.wait(timeout_s=60).state == "CANCELLED" and queued.wait(timeout_s=60).state == "CANCELLED"
        assert cli_main(["datasets", "delete", "shapes", *cli]) == 0
        assert c.delete_dataset("other").name == "other"
        assert c.list_datasets() == []
    assert _leftovers(tmp_path) == set()


def test_a_file_name_the_server_refuses_is_named_before_anything_is_sent(tmp_path, monkeypatch, capsys):
    """A folder with 'images/a (1).png' was packed and sent whole; the server refused the name only when it
    extracted the upload (after every byte of a large dataset). The CLI checks the names first, without a server."""
    import segsvc.cli_client

    monkeypatch.setattr(segsvc.cli_client, "CONNECT_TIMEOUT_S", 0.5)
    folder = flat(tmp_path / "local" / "copied", ["a", "b"])
    (folder / "images" / "a (1).png").write_bytes((folder / "images" / "a.png").read_bytes())
    assert cli_main(["datasets", "upload", str(folder), "--name", "d", "--server", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "'images/a (1).png'" in err and "may use only letters" in err and err.count("\n") == 1, err


def test_a_description_given_twice_is_named_by_its_flags_before_connecting(tmp_path, monkeypatch, capsys):
    import segsvc.cli_client

    monkeypatch.setattr(segsvc.cli_client, "CONNECT_TIMEOUT_S", 0.5)
    folder = flat(tmp_path / "local" / "bare", ["a", "b"], yaml_file=False)
    (tmp_path / "d.yaml").write_text("format: folder\nroot: .\nclasses: [bg, fg]\n")
    assert cli_main(["datasets", "upload", str(folder), "--name", "d", "--server", "127.0.0.1:1",
                     "--dataset-yaml", str(tmp_path / "d.yaml"), "--classes", "bg", "fg"]) == 2
    err = capsys.readouterr().err
    assert "--dataset-yaml or --classes, not both" in err and err.count("\n") == 1, err
