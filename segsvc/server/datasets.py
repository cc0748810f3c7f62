"""``segsvc.v1.DatasetService``: a thin adapter over ``segsvc.datasets.registry.DatasetRegistry``.

Each method turns its request into arguments, runs the registry in a thread
(hashing, extraction and ``check_dataset`` read every file) and turns the
``Dataset`` into its message; every failure goes through ``server.errors``,
which adds the problem list of a ``DatasetInvalid`` to the status details.
An upload waits at most ``DatasetsConfig.upload_idle_s`` for each message: a
stalled client loses its upload (``Overloaded``), so it cannot hold one of the
registry's upload slots, or its temporary files, for ever.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import grpc
from google.protobuf import timestamp_pb2

from segsvc.datasets.registry import Dataset, DatasetRegistry
from segsvc.datasets.upload import DatasetUpload
from segsvc.errors import FailedPrecondition, InvalidArgument, Overloaded, UploadError
from segsvc.server.errors import guarded
from segsvc.v1 import datasets_pb2 as pb
from segsvc.v1 import datasets_pb2_grpc as pb_grpc

log = logging.getLogger("segsvc.server")

T = TypeVar("T")
FORMATS = {pb.UPLOAD_FORMAT_TAR: "tar", pb.UPLOAD_FORMAT_ZIP: "zip", pb.UPLOAD_FORMAT_PAIRS: "pairs"}
SOURCES = {"register": pb.DATASET_SOURCE_REGISTERED, "upload": pb.DATASET_SOURCE_UPLOADED}


def dataset_message(dataset: Dataset) -> pb.Dataset:
    """A ``Dataset`` as its message."""
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(dataset.created_at * 1e9))
    return pb.Dataset(
        name=dataset.name, sha256=dataset.sha256, source=SOURCES[dataset.source], source_path=dataset.source_path,
        format=dataset.format, class_names=dataset.class_names,
        splits=[pb.SplitSize(split=s, samples=n) for s, n in dataset.split_sizes.items()],
        class_shares=[pb.ClassShare(class_name=c, share=v) for c, v in dataset.class_shares.items()],
        files=dataset.files, total_bytes=dataset.total_bytes, create_time=created,
        split_assigned=dataset.split_assigned,
    )


class DatasetServicer(pb_grpc.DatasetServiceServicer):
    """Register, upload, list, get and delete datasets.

    Args:
        registry: the registry; ``None`` when the server has no state folder (every call then
            answers FAILED_PRECONDITION).
    """

    def __init__(self, registry: DatasetRegistry | None) -> None:
        self._registry_or_none = registry

    @property
    def _registry(self) -> DatasetRegistry:
        if self._registry_or_none is None:
            raise FailedPrecondition("datasets are not enabled on this server: start it with --state-dir")
        return self._registry_or_none

    async def _call(self, method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]) -> T:
        return await guarded(method, context, work, log)

    async def RegisterDataset(self, request: pb.RegisterDatasetRequest, context):
        async def work() -> pb.Dataset:
            dataset = await asyncio.to_thread(self._registry.register, request.path, request.name)
            log.info("dataset %s (%s) registered from %s", dataset.name, dataset.sha256[:12], dataset.source_path)
            return dataset_message(dataset)

        return await self._call("RegisterDataset", context, work)

    async def _messages(self, request_iterator: AsyncIterator[T]) -> AsyncIterator[T]:
        """The messages of an upload, each within the registry's ``upload_idle_s`` of the one before."""
        idle_s = self._registry.config.upload_idle_s
        messages = request_iterator.__aiter__()
        while True:
            try:
                message = await asyncio.wait_for(messages.__anext__(), idle_s)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise Overloaded(f"the upload sent nothing for {idle_s:g} s, the server's limit "
                                 f"(--dataset-upload-idle-s): it was dropped; send it again") from None
            yield message

    async def UploadDataset(self, request_iterator: AsyncIterator[pb.UploadDatasetRequest], context):
        async def work() -> pb.Dataset:
            upload: DatasetUpload | None = None
            try:
                async for message in self._messages(request_iterator):
                    if upload is None:
                        upload = await asyncio.to_thread(self._open, message)
                    elif message.HasField("chunk"):
                        chunk = message.chunk
                        await asyncio.to_thread(upload.write, chunk.data, chunk.name, chunk.last)
                    else:
                        raise InvalidArgument("an upload has one metadata message, the first")
                if upload is None:
                    raise InvalidArgument("the upload is empty: send the metadata, then the chunks")
                dataset = await asyncio.to_thread(upload.commit)
            except BaseException:
                if upload is not None:
                    await asyncio.to_thread(upload.abort)
                raise
            log.info("dataset %s (%s) uploaded as %s: %d files, %d bytes", dataset.name, dataset.sha256[:12],
                     dataset.source_path, dataset.files, dataset.total_bytes)
            return dataset_message(dataset)

        return await self._call("UploadDataset", context, work)

    def _open(self, message: pb.UploadDatasetRequest) -> DatasetUpload:
        if not message.HasField("metadata"):
            raise InvalidArgument("the first message of an upload must be its metadata")
        meta = message.metadata
        if meta.format not in FORMATS:
            raise UploadError("metadata.format must be UPLOAD_FORMAT_TAR, _ZIP or _PAIRS")
        return self._registry.open_upload(meta.name, FORMATS[meta.format], dataset_yaml=meta.dataset_yaml,
                                          class_names=tuple(meta.class_names), sha256=meta.sha256)

    async def ListDatasets(self, request: pb.ListDatasetsRequest, context):
        async def work() -> pb.ListDatasetsResponse:
            datasets = await asyncio.to_thread(self._registry.list)
            return pb.ListDatasetsResponse(datasets=[dataset_message(d) for d in datasets])

        return await self._call("ListDatasets", context, work)

    async def GetDataset(self, request: pb.GetDatasetRequest, context):
        async def work() -> pb.Dataset:
            return dataset_message(await asyncio.to_thread(self._registry.get, request.name))

        return await self._call("GetDataset", context, work)

    async def DeleteDataset(self, request: pb.DeleteDatasetRequest, context):
        async def work() -> pb.DeleteDatasetResponse:
            dataset = await asyncio.to_thread(self._registry.delete, request.name)
            log.info("dataset %s (%s) deleted", dataset.name, dataset.sha256[:12])
            return pb.DeleteDatasetResponse(dataset=dataset_message(dataset))

        return await self._call("DeleteDataset", context, work)
