"""An unexpected error on any service names a request id that finds its traceback in the server's log.

``segsvc.v1.SegmentationService`` and ``ModelInfer`` always did; the services that fail through
``server.errors.guarded`` or call ``abort`` with no id (the Open Inference Protocol's metadata and repository
calls, jobs, operations, datasets, training) answered "internal server error; see the server log" with
nothing to search the log for, and ignored the caller's ``x-request-id``.
"""

from __future__ import annotations

import logging
import re

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from grpc_status import rpc_status

from segsvc.inference.manager import ModelManager
from segsvc.jobs.batch import JobsConfig
from segsvc.jobs.store import JobStore
from segsvc.server.oip_pb import grpc_service_pb2 as opb
from segsvc.server.oip_pb import grpc_service_pb2_grpc as opb_grpc
from segsvc.v1 import jobs_pb2, jobs_pb2_grpc
from tests.server.conftest import publish

TIMEOUT_S = 60.0
SECRET = "secret detail in /srv/segsvc/private.py"


def _broken(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise RuntimeError(SECRET)


@pytest.fixture
def server(start_server, tmp_path, monkeypatch):
    publish(tmp_path / "repo", "m", seed=3)
    monkeypatch.setattr(ModelManager, "resolve", _broken)  # OIP ModelMetadata
    monkeypatch.setattr(JobStore, "get", _broken)  # GetOperation, FetchJobOutputs (a streamed response)
    return start_server(tmp_path / "repo", jobs=JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out"))


def _calls(channel: grpc.Channel) -> dict:
    oip = opb_grpc.GRPCInferenceServiceStub(channel)
    ops = operations_pb2_grpc.OperationsStub(channel)
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    name = "jobs/0123456789abcdef"
    return {
        "ModelMetadata": lambda **kw: oip.ModelMetadata(opb.ModelMetadataRequest(name="m"), **kw),
        "GetOperation": lambda **kw: ops.GetOperation(operations_pb2.GetOperationRequest(name=name), **kw),
        "FetchJobOutputs": lambda **kw: list(jobs.FetchJobOutputs(jobs_pb2.FetchJobOutputsRequest(name=name), **kw)),
    }


@pytest.mark.parametrize("method", ["ModelMetadata", "GetOperation", "FetchJobOutputs"])
def test_an_unexpected_error_names_the_callers_request_id(server, method, caplog):
    with grpc.insecure_channel(server.address) as channel, caplog.at_level(logging.ERROR, logger="segsvc"):
        with pytest.raises(grpc.RpcError) as info:
            _calls(channel)[method](timeout=TIMEOUT_S, metadata=(("x-request-id", "rid-31"),))
    error = info.value
    assert error.code() == grpc.StatusCode.INTERNAL, error.details()
    assert error.details() == "internal server error (request id rid-31); see the server log"
    assert dict(error.trailing_metadata() or ()).get("x-request-id") == "rid-31"
    status = rpc_status.from_call(error)
    assert "secret" not in str(status) and "/srv" not in str(status)
    [logged] = [r for r in caplog.records if r.levelno == logging.ERROR and getattr(r, "request_id", None) == "rid-31"]
    assert logged.exc_info and SECRET in str(logged.exc_info[1])


@pytest.mark.parametrize("method", ["ModelMetadata", "FetchJobOutputs"])
def test_without_an_id_the_error_names_a_generated_one_that_is_in_the_log(server, method, caplog):
    with grpc.insecure_channel(server.address) as channel, caplog.at_level(logging.ERROR, logger="segsvc"):
        with pytest.raises(grpc.RpcError) as info:
            _calls(channel)[method](timeout=TIMEOUT_S)
    error = info.value
    found = re.fullmatch(r"internal server error \(request id ([0-9a-f]{16})\); see the server log", error.details())
    assert found, error.details()
    assert dict(error.trailing_metadata() or ()).get("x-request-id") == found[1]
    assert [r for r in caplog.records if getattr(r, "request_id", None) == found[1] and r.exc_info]
