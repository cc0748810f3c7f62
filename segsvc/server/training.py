"""``segsvc.v1.TrainingService``: a thin adapter over ``TrainingRunner``, and training jobs as Operations.

``SubmitTrainingJob`` turns the request into a ``TrainingRequest`` and returns
the job's ``google.longrunning.Operation``; the Operations service
(``server/jobs.py``) calls ``training_operation`` for jobs of kind ``train``.
``FetchTrainingArtifacts`` streams the run's curve, metrics, events, log and
evaluation reports.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from google.longrunning import operations_pb2

from segsvc.errors import FailedPrecondition, InvalidArgument
from segsvc.jobs.store import Job
from segsvc.jobs.training import TrainingRequest, TrainingRunner
from segsvc.server import convert
from segsvc.server.errors import abort
from segsvc.v1 import jobs_pb2 as jobs_pb
from segsvc.v1 import training_pb2 as tpb
from segsvc.v1 import training_pb2_grpc as tgrpc

log = logging.getLogger("segsvc.server")

POLICIES = {tpb.PROMOTE_POLICY_UNSPECIFIED: "gate", tpb.PROMOTE_POLICY_GATE: "gate",
            tpb.PROMOTE_POLICY_ALWAYS: "always", tpb.PROMOTE_POLICY_NEVER: "never"}
POLICY_ENUMS = {"gate": tpb.PROMOTE_POLICY_GATE, "always": tpb.PROMOTE_POLICY_ALWAYS,
                "never": tpb.PROMOTE_POLICY_NEVER}
PHASES = {"queued": tpb.TRAINING_PHASE_QUEUED, "training": tpb.TRAINING_PHASE_TRAINING,
          "evaluating": tpb.TRAINING_PHASE_EVALUATING, "publishing": tpb.TRAINING_PHASE_PUBLISHING,
          "done": tpb.TRAINING_PHASE_DONE}
STATES = {"QUEUED": jobs_pb.JOB_STATE_QUEUED, "RUNNING": jobs_pb.JOB_STATE_RUNNING,
          "SUCCEEDED": jobs_pb.JOB_STATE_SUCCEEDED, "FAILED": jobs_pb.JOB_STATE_FAILED,
          "CANCELLED": jobs_pb.JOB_STATE_CANCELLED}


def training_request_from_proto(msg: tpb.SubmitTrainingJobRequest) -> TrainingRequest:
    budget = msg.WhichOneof("budget")
    if msg.promote not in POLICIES:  # proto3 enums are open: a value this server does not know is not GATE
        raise InvalidArgument(f"promote: unknown promote policy {msg.promote}; use GATE, ALWAYS or NEVER")
    return TrainingRequest(
        dataset=msg.dataset, recipe=msg.recipe, recipe_yaml=msg.recipe_yaml, overrides=tuple(msg.overrides),
        base_model=msg.base_model, model_name=msg.model_name,
        max_time_min=float(msg.max_time_min) if budget == "max_time_min" else None,
        epochs=int(msg.epochs) if budget == "epochs" else None,
        device=msg.device or "auto", nproc_per_node=int(msg.nproc_per_node) or 1,
        promote=POLICIES[msg.promote], gate_margin=float(msg.gate_margin),
    )


def _num(progress: dict, key: str) -> float:
    value = progress.get(key)
    return float(value) if isinstance(value, (int, float)) else 0.0


def training_metadata(job: Job) -> tpb.TrainingJobMetadata:
    p, spec = job.progress or {}, job.spec
    base = spec.get("base") or {}
    phase = "done" if job.finished else p.get("phase", "queued")
    return tpb.TrainingJobMetadata(
        job_id=job.id, kind=job.kind, state=STATES[job.state], phase=PHASES.get(phase, tpb.TRAINING_PHASE_QUEUED),
        epoch=int(_num(p, "epoch")), epochs=int(_num(p, "epochs")), step=int(_num(p, "step")),
        steps_per_epoch=int(_num(p, "steps_per_epoch")), loss=_num(p, "loss"), learning_rate=_num(p, "lr"),
        val_miou=_num(p, "val_miou"), best_miou=_num(p, "best_miou"), images_per_second=_num(p, "images_per_s"),
        eta_seconds=_num(p, "eta_s"), elapsed_seconds=_num(p, "elapsed_s"),
        dataset=spec["dataset"]["name"], dataset_sha256=spec["dataset"]["sha256"], model=spec["model_name"],
        base_model=f"{base['model']}:{base['version']}" if base else "", recipe=spec["recipe_name"],
        attempts=int(_num(p, "attempts")), create_time=convert._timestamp(job.created_at),
        start_time=convert._timestamp(job.started_at), update_time=convert._timestamp(job.updated_at),
        end_time=convert._timestamp(job.finished_at), request_id=job.request_id or "",
        cancel_requested=job.cancel_requested, trainer_restarts=int(_num(p, "trainer_restarts")),
        eval_restarts=int(_num(p, "eval_restarts")),
    )


def training_response(result: dict) -> tpb.TrainingJobResponse:
    response = tpb.TrainingJobResponse(
        model=result["model"], version=int(result["version"]), promoted=bool(result["promoted"]),
        verdict=result["verdict"], previous_default=int(result["previous_default"]),
        promote=POLICY_ENUMS[result["promote"]], gate_margin=float(result["gate_margin"]),
        metrics={k: float(v) for k, v in result["metrics"].items()}, epochs=int(result["epochs"]),
        train_seconds=float(result["train_seconds"]), artifacts=list(result.get("artifacts") or ()),
    )
    for row in result["comparison"]:
        item = response.comparison.add(split=row["split"], metric=row["metric"], candidate=float(row["candidate"]),
                                       delta=float(row["delta"]))
        if row.get("default") is not None:
            item.default = float(row["default"])
    return response


def training_operation(job: Job) -> operations_pb2.Operation:
    """A training job as a ``google.longrunning.Operation``."""
    op = operations_pb2.Operation(name=convert.JOB_NAME_PREFIX + job.id, done=job.finished)
    op.metadata.Pack(training_metadata(job))
    if job.state == "SUCCEEDED":
        op.response.Pack(training_response(job.result or {}))
    elif job.state == "CANCELLED":
        op.error.CopyFrom(convert.job_error(grpc.StatusCode.CANCELLED, job.error or "cancelled", job))
    elif job.state == "FAILED":
        op.error.CopyFrom(convert.job_error(grpc.StatusCode.ABORTED, job.error or "failed", job))
    return op


class TrainingServicer(tgrpc.TrainingServiceServicer):
    """Submit training jobs and fetch their artifacts (follow them with the Operations service)."""

    def __init__(self, runner: TrainingRunner | None) -> None:
        self._runner_or_none = runner

    @property
    def _runner(self) -> TrainingRunner:
        if self._runner_or_none is None:
            raise FailedPrecondition("training jobs are not enabled on this server: start it with --state-dir")
        return self._runner_or_none

    async def SubmitTrainingJob(self, request: tpb.SubmitTrainingJobRequest, context):
        try:
            job = await self._runner.submit(training_request_from_proto(request), request.request_id)
            return training_operation(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await abort(context, exc, "", "SubmitTrainingJob", log)

    async def FetchTrainingArtifacts(self, request: tpb.FetchTrainingArtifactsRequest, context):
        try:
            job_id = convert.job_id_of(request.name)
            files = await asyncio.to_thread(self._runner.artifact_files, job_id)
            async for chunk in convert.file_chunks(files):
                yield chunk
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await abort(context, exc, "", "FetchTrainingArtifacts", log)
