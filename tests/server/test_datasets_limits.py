"""DatasetService limits and odd input over gRPC: stalled and concurrent uploads, case clashes, absolute paths."""

from __future__ import annotations

import dataclasses
import threading

import grpc
import pytest
import yaml

from segsvc.datasets.registry import DatasetRegistry, DatasetsConfig
from segsvc.v1 import datasets_pb2 as pb
from segsvc.v1 import datasets_pb2_grpc as pb_grpc
from tests.datasets.helpers import flat, tar_of


def _leftovers(tmp_path) -> set[str]:
    return {p.name for p in (tmp_path / "state" / "datasets").iterdir()}


def _metadata(name: str) -> pb.UploadDatasetRequest:
    return pb.UploadDatasetRequest(metadata=pb.UploadDatasetMetadata(name=name, format=pb.UPLOAD_FORMAT_TAR))


def _chunk(data: bytes) -> pb.UploadDatasetRequest:
    return pb.UploadDatasetRequest(chunk=pb.DatasetChunk(data=data))


def _stalled(first_chunk: bytes, release: threading.Event, sent: threading.Event):
    """An upload that sends its metadata and one chunk, then nothing until ``release`` is set."""
    yield _metadata("stalled")
    yield _chunk(first_chunk)
    sent.set()
    release.wait()


def _upload(stub, name: str, data: bytes):
    return stub.UploadDataset(iter([_metadata(name), _chunk(data)]), timeout=60)


@pytest.fixture
def folder(tmp_path):
    return flat(tmp_path / "local" / "shapes", ["a", "b"])


def test_a_stalled_upload_is_ended_and_leaves_nothing(start_server, tmp_path, folder):
    (tmp_path / "data").mkdir()
    config = DatasetsConfig(tmp_path / "state", data_root=tmp_path / "data", max_concurrent_uploads=1,
                            upload_idle_s=0.5)
    server = start_server(tmp_path / "repo", datasets=config)
    data = tar_of(folder)
    release = threading.Event()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.DatasetServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.UploadDataset(_stalled(data[:512], release, threading.Event()), timeout=60)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--dataset-upload-idle-s" in info.value.details()
            assert _leftovers(tmp_path) == set()  # its temp folder went with it
            # and so did its slot; the next upload gets a generous idle limit, which a stalled host cannot trip
            server.server.datasets.config = dataclasses.replace(config, upload_idle_s=120.0)
            assert _upload(stub, "shapes", data).files == 5
    finally:
        release.set()


def test_an_upload_over_the_concurrent_limit_is_resource_exhausted(start_server, tmp_path, folder, monkeypatch):
    (tmp_path / "data").mkdir()
    config = DatasetsConfig(tmp_path / "state", data_root=tmp_path / "data", max_concurrent_uploads=1)
    server = start_server(tmp_path / "repo", datasets=config)
    opened = threading.Event()
    open_upload = DatasetRegistry.open_upload

    def open_and_tell(self, *args, **kwargs):
        upload = open_upload(self, *args, **kwargs)
        opened.set()
        return upload

    monkeypatch.setattr(DatasetRegistry, "open_upload", open_and_tell)
    data = tar_of(folder)
    release = threading.Event()
    errors: list[grpc.RpcError] = []

    def hold() -> None:
        try:
            stub.UploadDataset(_stalled(data[:512], release, threading.Event()), timeout=60)
        except grpc.RpcError as exc:
            errors.append(exc)

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.DatasetServiceStub(channel)
        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert opened.wait(120)  # the first upload holds the only slot
            with pytest.raises(grpc.RpcError) as info:
                _upload(stub, "second", data)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-dataset-uploads" in info.value.details()
        finally:
            release.set()
            holder.join()
        assert errors and errors[0].code() == grpc.StatusCode.INVALID_ARGUMENT  # its tar was cut short
        assert _upload(stub, "second", data).files == 5
    assert _leftovers(tmp_path) == {_upload_folder(tmp_path)}


def _upload_folder(tmp_path) -> str:
    [name] = [p.name for p in (tmp_path / "state" / "datasets").iterdir() if not p.name.startswith(".")]
    return name


def test_a_name_differing_only_in_case_is_already_exists(start_server, tmp_path, folder):
    (tmp_path / "data").mkdir()
    server = start_server(tmp_path / "repo", datasets=DatasetsConfig(tmp_path / "state"))
    other = flat(tmp_path / "local" / "other", ["a", "b", "c"])
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.DatasetServiceStub(channel)
        _upload(stub, "Shapes", tar_of(folder))
        with pytest.raises(grpc.RpcError) as info:
            _upload(stub, "shapes", tar_of(other))
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "differs only in case from dataset 'Shapes'" in info.value.details()


def test_an_absolute_split_folder_is_invalid_argument_not_internal(start_server, tmp_path):
    data_root = tmp_path / "data"
    folder = flat(data_root / "shapes", ["a", "b", "c"])
    alias = tmp_path / "alias"
    alias.symlink_to(data_root)
    description = {"format": "folder", "root": ".", "classes": ["bg", "fg"],
                   "splits": {"all": {"images": str(alias / "shapes" / "images"), "masks": "masks"}}}
    (folder / "dataset.yaml").write_text(yaml.safe_dump(description))
    server = start_server(tmp_path / "repo", datasets=DatasetsConfig(tmp_path / "state", data_root=data_root))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.DatasetServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.RegisterDataset(pb.RegisterDatasetRequest(path="shapes"), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "split 'all' images is an absolute path" in info.value.details()
        assert str(tmp_path) not in info.value.details()
    assert _leftovers(tmp_path) == set()


def test_the_serve_flags_reach_the_registry_config(tmp_path):
    import argparse

    from segsvc.cli_datasets import add_server_arguments, server_config

    parser = argparse.ArgumentParser()
    add_server_arguments(parser.add_argument_group("datasets"))
    parser.add_argument("--state-dir")
    parser.add_argument("--data-root")
    args = parser.parse_args(["--state-dir", str(tmp_path), "--max-dataset-uploads", "2",
                              "--dataset-upload-idle-s", "30", "--max-datasets-disk-mb", "512"])
    config = server_config(args)
    assert (config.max_concurrent_uploads, config.upload_idle_s, config.max_disk_bytes) == (2, 30.0, 512 << 20)
    defaults = server_config(parser.parse_args(["--state-dir", str(tmp_path)]))
    assert (defaults.max_concurrent_uploads, defaults.upload_idle_s, defaults.max_disk_bytes) == (4, 300.0, 64 << 30)
