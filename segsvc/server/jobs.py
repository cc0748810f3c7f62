"""``segsvc.v1.JobService`` and the standard ``google.longrunning.Operations``: thin adapters over ``JobRunner``.

Each method turns its request into arguments (``convert``), calls the runner,
and turns the job into an ``Operation`` or a response; every failure goes
through ``server.errors``. ``ListOperations`` pages by submission order (the
page token is opaque to clients) and filters with ``key=value`` terms joined by
``AND`` over ``state``, ``kind`` and ``done``, e.g. ``state=RUNNING AND kind=segmentation``.
Training jobs (kind ``train``, ``TrainingRunner``) live in the same store and
are the same kind of operation: Get, List, Wait, Cancel and Delete dispatch
on the job's kind, and ``server/training.py`` packs their metadata and response.
Training needs the ``manage`` scope (``server/auth.py``): a token with only
``jobs`` gets PERMISSION_DENIED for any call naming a training job (its
metadata names datasets and models, its outputs are the trainer's logs), and
``ListOperations`` leaves training jobs out of its pages.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import empty_pb2

from segsvc.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from segsvc.jobs.batch import KIND as BATCH_KIND
from segsvc.jobs.batch import JobRunner
from segsvc.jobs.store import JOB_STATES, Job
from segsvc.jobs.training import KIND as TRAIN_KIND
from segsvc.jobs.training import TrainingRunner
from segsvc.server import convert
from segsvc.server.auth import caller_may
from segsvc.server.errors import abort, guarded
from segsvc.server.training import training_operation
from segsvc.v1 import jobs_pb2 as jobs_pb
from segsvc.v1 import jobs_pb2_grpc as jobs_grpc

log = logging.getLogger("segsvc.server")

T = TypeVar("T")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
DEFAULT_WAIT_S = 60.0
MAX_WAIT_S = 600.0
MAX_DURATION_S = 315_576_000_000  # google.protobuf.Duration's range: +-10,000 years
TRAINING_SCOPE = "manage"


class _Adapter:
    """Shared by both servicers: the runner (None when jobs are off) and the one failure path."""

    def __init__(self, runner: JobRunner | None, training: TrainingRunner | None = None) -> None:
        self._runner_or_none = runner
        self._training_or_none = training

    @property
    def _runner(self) -> JobRunner:
        if self._runner_or_none is None:
            raise FailedPrecondition("batch jobs are not enabled on this server: start it with --state-dir")
        return self._runner_or_none

    async def _runner_of(self, job_id: str, method: str) -> JobRunner | TrainingRunner:
        """The runner that owns the job: training jobs go to the training runner (for a ``manage`` token)."""
        job = await asyncio.to_thread(self._runner.store.get, job_id)
        check_access(job, method)
        if job.kind == TRAIN_KIND:
            if self._training_or_none is None:
                raise FailedPrecondition("training jobs are not enabled on this server")
            return self._training_or_none
        return self._runner

    @staticmethod
    def _operation(job: Job) -> operations_pb2.Operation:
        return training_operation(job) if job.kind == TRAIN_KIND else convert.operation(job)

    async def _call(self, method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]) -> T:
        return await guarded(method, context, work, log)


class JobServicer(_Adapter, jobs_grpc.JobServiceServicer):
    """Submit jobs, upload their images, fetch and delete their outputs."""

    async def SubmitSegmentationJob(self, request: jobs_pb.SubmitSegmentationJobRequest, context):
        async def work() -> operations_pb2.Operation:
            job = await self._runner.submit(convert.job_request_from_proto(request), request.request_id)
            return convert.operation(job)

        return await self._call("SubmitSegmentationJob", context, work)

    async def UploadImages(self, request_iterator: AsyncIterator[jobs_pb.UploadImagesRequest], context):
        async def work() -> jobs_pb.UploadImagesResponse:
            upload = self._runner.staging.open()
            try:
                async for chunk in request_iterator:
                    await asyncio.to_thread(upload.write, chunk.name, int(chunk.offset), chunk.data,
                                            last=chunk.last, sha256=chunk.sha256)
                summary = await asyncio.to_thread(upload.commit)
            except BaseException:
                await asyncio.to_thread(upload.abort)
                raise
            log.info("upload %s: %d files, %d bytes", summary.upload_id, len(summary.files), summary.total_bytes)
            return convert.upload_response(summary)

        return await self._call("UploadImages", context, work)

    async def FetchJobOutputs(self, request: jobs_pb.FetchJobOutputsRequest, context):
        try:
            job_id = convert.job_id_of(request.name)
            runner = await self._runner_of(job_id, "FetchJobOutputs")
            if isinstance(runner, TrainingRunner):  # a training run's curve and log are meant to be read as it runs
                lister = runner.artifact_files
            else:
                check_finished(await asyncio.to_thread(runner.store.get, job_id))
                lister = runner.output_files
            files = await asyncio.to_thread(lister, job_id)
            async for chunk in convert.file_chunks(files):
                yield chunk
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await abort(context, exc, "", "FetchJobOutputs", log)

    async def DeleteJob(self, request: jobs_pb.DeleteJobRequest, context):
        async def work() -> jobs_pb.DeleteJobResponse:
            job_id = convert.job_id_of(request.name)
            removed = await (await self._runner_of(job_id, "DeleteJob")).delete(job_id, request.delete_outputs)
            return jobs_pb.DeleteJobResponse(deleted_files=removed)

        return await self._call("DeleteJob", context, work)


class OperationsServicer(_Adapter, operations_pb2_grpc.OperationsServicer):
    """The standard long-running operations service over the job store."""

    async def GetOperation(self, request: operations_pb2.GetOperationRequest, context):
        async def work() -> operations_pb2.Operation:
            job = await asyncio.to_thread(self._runner.get, convert.job_id_of(request.name))
            check_access(job, "GetOperation")
            return self._operation(job)

        return await self._call("GetOperation", context, work)

    async def ListOperations(self, request: operations_pb2.ListOperationsRequest, context):
        async def work() -> operations_pb2.ListOperationsResponse:
            kind, states = parse_filter(request.filter)
            size = request.page_size or DEFAULT_PAGE_SIZE
            if not 0 < size <= MAX_PAGE_SIZE:
                raise InvalidArgument(f"page_size must be in 1..{MAX_PAGE_SIZE}, got {request.page_size}")
            after = _page_token(request.page_token)
            with_training = caller_may(TRAINING_SCOPE)
            if kind == TRAIN_KIND and not with_training:
                raise PermissionDenied(f"listing training jobs needs a token with the '{TRAINING_SCOPE}' scope; "
                                       f"this token lists batch jobs only")
            if kind is None and not with_training:  # the batch jobs, not the training ones
                kind = BATCH_KIND
            jobs = await asyncio.to_thread(self._runner.store.list, kind=kind, states=states,
                                           after_seq=after, limit=size + 1)
            response = operations_pb2.ListOperationsResponse(operations=[self._operation(j) for j in jobs[:size]])
            if len(jobs) > size:
                response.next_page_token = str(jobs[size - 1].seq)
            return response

        return await self._call("ListOperations", context, work)

    async def CancelOperation(self, request: operations_pb2.CancelOperationRequest, context):
        async def work() -> empty_pb2.Empty:
            job_id = convert.job_id_of(request.name)
            await (await self._runner_of(job_id, "CancelOperation")).cancel(job_id)
            return empty_pb2.Empty()

        return await self._call("CancelOperation", context, work)

    async def DeleteOperation(self, request: operations_pb2.DeleteOperationRequest, context):
        async def work() -> empty_pb2.Empty:
            job_id = convert.job_id_of(request.name)
            await (await self._runner_of(job_id, "DeleteOperation")).delete(job_id, delete_outputs=False)
            return empty_pb2.Empty()

        return await self._call("DeleteOperation", context, work)

    async def WaitOperation(self, request: operations_pb2.WaitOperationRequest, context):
        async def work() -> operations_pb2.Operation:
            timeout = _wait_seconds(request.timeout) if request.HasField("timeout") else DEFAULT_WAIT_S
            remaining = context.time_remaining()
            if remaining is not None:  # answer before the caller's own deadline
                timeout = min(timeout, max(remaining - 0.5, 0.0))
            timeout = min(max(timeout, 0.0), MAX_WAIT_S)
            job_id = convert.job_id_of(request.name)
            return self._operation(await (await self._runner_of(job_id, "WaitOperation")).wait(job_id, timeout))

        return await self._call("WaitOperation", context, work)


def check_access(job: Job, method: str) -> None:
    """PERMISSION_DENIED for a training job unless the caller's token has the ``manage`` scope."""
    if job.kind == TRAIN_KIND and not caller_may(TRAINING_SCOPE):
        raise PermissionDenied(f"job {job.id} is a training job: {method} on training jobs needs a token with "
                               f"the '{TRAINING_SCOPE}' scope")


def check_finished(job: Job) -> None:
    """FAILED_PRECONDITION for a batch job that has not finished (queued, running or paused).

    ``FetchJobOutputs`` streams "every output file of a finished job": a job still at work has written only
    some label maps and none of ``results.jsonl`` or ``summary.json``, and a stream of those, answered OK, reads
    as the whole. A finished job's files are served whatever its end (a cancelled or failed one keeps the
    outputs of the images it did); the message says how far the job is and what to do.
    """
    if job.finished:
        return
    paused = job.progress.get("paused_reason")
    skipped = f", {job.skipped} skipped" if job.skipped else ""  # a cancel skips the rest: skipped is not done
    raise FailedPrecondition(
        f"job {job.id} is {job.state} ({job.done + job.failed} of {job.total} images done{skipped})"
        + (f" and paused ({paused})" if paused else "")
        + (", cancelling" if job.cancel_requested else "")
        + f": its outputs are fetched once it has finished; wait for it (`segsvc jobs wait {job.id}`, WaitOperation) "
        + ("and fetch again" if job.cancel_requested else
           f"and fetch again, or cancel it (`segsvc jobs cancel {job.id}`) and wait for it to end, to fetch the "
           "outputs written so far"))


def parse_filter(text: str) -> tuple[str | None, list[str] | None]:
    """``state=RUNNING AND kind=segmentation`` / ``done=true`` -> (kind, states)."""
    kind: str | None = None
    states: set[str] | None = None
    for term in filter(None, (t.strip() for t in text.replace(" and ", " AND ").split(" AND "))):
        key, sep, value = (p.strip() for p in term.partition("="))
        value = value.strip('"')
        if not sep or not value:
            raise InvalidArgument(f"filter term {term[:80]!r} is not key=value (keys: state, kind, done)")
        if key == "kind":
            kind = value
        elif key == "state":
            state = value.upper().removeprefix("JOB_STATE_")
            if state not in JOB_STATES:
                raise InvalidArgument(f"filter state must be one of {', '.join(JOB_STATES)}, got {value[:40]!r}")
            states = {state} if states is None else states & {state}
        elif key == "done":
            if value.lower() not in ("true", "false"):
                raise InvalidArgument(f"filter done must be true or false, got {value[:40]!r}")
            wanted = {"SUCCEEDED", "FAILED", "CANCELLED"} if value.lower() == "true" else {"QUEUED", "RUNNING"}
            states = wanted if states is None else states & wanted
        else:
            raise InvalidArgument(f"unknown filter key {key[:40]!r}; use state, kind or done")
    return kind, (sorted(states) if states is not None else None)


def _page_token(token: str) -> int:
    if not token:
        return 0
    if not (token.isascii() and token.isdigit()) or len(token) > 18:  # isdigit() alone accepts "²"
        raise InvalidArgument("page_token is not one this server returned")
    return int(token)


def _wait_seconds(duration) -> float:  # type: ignore[no-untyped-def]
    """A ``WaitOperation`` timeout in seconds; INVALID_ARGUMENT past what a ``Duration`` may hold.

    Computed in floats, not ``ToTimedelta()`` (which overflows); nanos of a whole second or more, which our
    own client sends, are accepted as what they add up to.
    """
    if abs(duration.seconds) > MAX_DURATION_S:
        raise InvalidArgument(f"WaitOperation timeout of {duration.seconds} s is not a valid google.protobuf.Duration "
                              f"(at most {MAX_DURATION_S} s); the server waits at most {MAX_WAIT_S:g} s anyway")
    return duration.seconds + duration.nanos / 1e9
