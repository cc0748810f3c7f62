"""Least privilege: scoped tokens, auth on unknown methods, a local metrics endpoint."""

from __future__ import annotations

import argparse
import urllib.request

import grpc
import pytest

from segsvc import errors
from segsvc.cli_client import read_token as _read_token
from segsvc.server.auth import AuthConfig, required_scope
from segsvc.server.config import ServerConfig
from tests.server.conftest import encode, make_image, publish

TOKENS = """
# token      scopes
infer-tok    infer
jobs-tok     jobs
admin-tok    manage
"""


def test_token_file_parsing_and_errors(tmp_path):
    auth = AuthConfig.parse(TOKENS + "bare-tok\n")
    assert auth.scopes_of("infer-tok") == {"infer"} and auth.scopes_of("bare-tok") == {"infer"}
    assert auth.scopes_of("admin-tok") == {"manage"} and auth.scopes_of("nope") is None
    with pytest.raises(errors.InvalidArgument, match="line 2: unknown token scope"):
        AuthConfig.parse("a infer\nb root\n")
    with pytest.raises(errors.InvalidArgument, match="at least one token"):
        AuthConfig.parse("# nothing\n")
    # a '#' inside a token is part of it (it cut the token to a 3-character prefix, which was then accepted)
    auth = AuthConfig.parse("Xk9#pQ2vL7zR infer  # the CI robot\n  # indented comment\n")
    assert auth.scopes_of("Xk9#pQ2vL7zR") == {"infer"} and auth.scopes_of("Xk9") is None
    assert required_scope("/segsvc.v1.SegmentationService/Segment") == "infer"
    assert required_scope("/segsvc.v1.SegmentationService/UnloadModel") == "manage"
    assert required_scope("/google.longrunning.Operations/CancelOperation") == "jobs"


def test_an_inference_token_cannot_manage_models_or_jobs(start_server, tmp_path):
    publish(tmp_path / "repo", "m", seed=3)
    server = start_server(tmp_path / "repo", auth=AuthConfig.parse(TOKENS))
    image = make_image(16, 16)
    with server.client(token="infer-tok") as c:
        assert c.segment(image, model="m").mask.shape == (16, 16)
        assert [m.name for m in c.list_models()] == ["m"]
        for call in (lambda: c.unload_model("m"), lambda: c.load_model("m"), lambda: c.set_default_version("m", 1),
                     lambda: list(c.list_jobs())):
            with pytest.raises(errors.PermissionDenied, match="lacks the '(manage|jobs)' scope"):
                call()
    with server.client(token="jobs-tok") as c:
        with pytest.raises(errors.FailedPrecondition, match="not enabled"):  # authorised; jobs are off here
            list(c.list_jobs())
        with pytest.raises(errors.PermissionDenied):
            c.segment(image, model="m")
    with server.client(token="admin-tok") as c:
        assert c.segment(image, model="m").mask.shape == (16, 16)
        assert c.unload_model("m") == [1]


def test_unknown_methods_need_a_token_too(start_server, tmp_path):
    publish(tmp_path / "repo", "m", seed=3)
    server = start_server(tmp_path / "repo", auth=AuthConfig.parse(TOKENS))
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary("/segsvc.v1.Nope/Nothing", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as anonymous:
            call(b"", timeout=60)  # refused at once; a deadline that ran out would be the wrong code
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as known:
            call(b"", timeout=60, metadata=(("authorization", "Bearer infer-tok"),))
        assert known.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_metrics_bind_to_localhost_by_default(start_server, tmp_path):
    assert ServerConfig(model_repo=tmp_path).metrics_host == "127.0.0.1"
    publish(tmp_path / "repo", "m", seed=3)
    server = start_server(tmp_path / "repo", host="0.0.0.0")  # gRPC on every interface, metrics stay local
    http = server.server.metrics._http
    assert http.server_address[0] == "127.0.0.1"
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=60).read()
    assert b"segsvc_" in text
    with pytest.raises(errors.InvalidArgument, match="metrics over TLS"):
        ServerConfig(model_repo=tmp_path, metrics_tls=True)


def test_a_jobs_token_cannot_read_cancel_or_delete_training_jobs(start_server, tmp_path, monkeypatch):
    """Training needs `manage`: JobService and Operations dispatch on a job's kind, so they check it per job."""
    import threading
    import uuid

    from google.longrunning import operations_pb2, operations_pb2_grpc
    from google.protobuf.duration_pb2 import Duration
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from segsvc.datasets.registry import DatasetsConfig
    from segsvc.jobs import training
    from segsvc.jobs.batch import JobsConfig
    from segsvc.jobs.trainspec import TrainingConfig
    from segsvc.v1 import jobs_pb2, jobs_pb2_grpc

    started = threading.Event()

    async def fake_train(self, run):  # stands in for `python -m training`: runs until cancelled
        root = self.job_dir(run.job.id)
        root.mkdir(parents=True, exist_ok=True)
        (root / "train.log").write_text("the admin's training log\n")
        await self._set_phase(run, "training")
        started.set()
        await run.cancel.wait()
        raise training._Stop("CANCELLED", "cancelled while training")

    monkeypatch.setattr(training.TrainingRunner, "_train", fake_train)
    publish(tmp_path / "repo", "m", seed=3)
    (tmp_path / "data" / "scans").mkdir(parents=True)
    (tmp_path / "data" / "scans" / "a.png").write_bytes(encode(make_image(16, 16)))
    state = tmp_path / "state"
    server = start_server(tmp_path / "repo", auth=AuthConfig.parse(TOKENS),
                          jobs=JobsConfig(state_dir=state, output_root=tmp_path / "out", data_root=tmp_path / "data"),
                          datasets=DatasetsConfig(state_dir=state), training=TrainingConfig(state_dir=state))
    job_id = uuid.uuid4().hex  # a training job an admin submitted (stored directly: no dataset needed)
    server.server.jobs.store.submit("train", {"run_dir": "r/run", "model_name": "m", "request": {}, "recipe_name": "r",
                                              "dataset": {"name": "d", "sha256": "ab"}}, [], job_id=job_id)
    server.loop.call_soon_threadsafe(server.server.training._wake.set)
    assert started.wait(60), "the training job never started"
    name = f"jobs/{job_id}"
    with server.client(token="jobs-tok") as c:
        batch = c.submit_job(["scans"], model="m")  # the jobs scope still runs batch jobs
        batch.wait(timeout_s=60)
    jobs, admin = (("authorization", "Bearer jobs-tok"),), (("authorization", "Bearer admin-tok"),)
    with grpc.insecure_channel(server.address) as channel:
        ops, js = operations_pb2_grpc.OperationsStub(channel), jobs_pb2_grpc.JobServiceStub(channel)
        calls = {
            "GetOperation": lambda: ops.GetOperation(operations_pb2.GetOperationRequest(name=name), metadata=jobs),
            "WaitOperation": lambda: ops.WaitOperation(
                operations_pb2.WaitOperationRequest(name=name, timeout=Duration(seconds=0)), metadata=jobs),
            "CancelOperation": lambda: ops.CancelOperation(operations_pb2.CancelOperationRequest(name=name),
                                                           metadata=jobs),
            "DeleteOperation": lambda: ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name),
                                                           metadata=jobs),
            "FetchJobOutputs": lambda: list(js.FetchJobOutputs(jobs_pb2.FetchJobOutputsRequest(name=name),
                                                               metadata=jobs)),
            "DeleteJob": lambda: js.DeleteJob(jobs_pb2.DeleteJobRequest(name=name, delete_outputs=True),
                                              metadata=jobs),
            "ListOperations": lambda: ops.ListOperations(operations_pb2.ListOperationsRequest(filter="kind=train"),
                                                         metadata=jobs),
        }
        for method, call in calls.items():
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, (method, info.value.details())
            assert "training job" in info.value.details() and "'manage' scope" in info.value.details(), method
            assert str(tmp_path) not in info.value.details()
            assert dict(info.value.trailing_metadata())["segsvc-error"] == "PermissionDenied"
            status = rpc_status.from_call(info.value)
            error_info = error_details_pb2.ErrorInfo()
            assert status is not None and status.details[-1].Unpack(error_info)
            assert error_info.reason == "PERMISSION_DENIED"
        # a jobs token's listing shows its batch jobs and leaves training jobs out
        listed = ops.ListOperations(operations_pb2.ListOperationsRequest(page_size=1), metadata=jobs)
        assert [o.name for o in listed.operations] == [batch.name] and listed.next_page_token == ""
        # nothing happened to the training job: still running, its log in place; a manage token sees all of it
        assert (state / "training" / job_id / "train.log").is_file()
        op = ops.GetOperation(operations_pb2.GetOperationRequest(name=name), metadata=admin)
        assert not op.done
        everything = ops.ListOperations(operations_pb2.ListOperationsRequest(), metadata=admin)
        assert {o.name for o in everything.operations} == {name, batch.name}
        ops.CancelOperation(operations_pb2.CancelOperationRequest(name=name), metadata=admin)
        op = ops.WaitOperation(operations_pb2.WaitOperationRequest(name=name, timeout=Duration(seconds=60)),
                               metadata=admin, timeout=90)
        assert op.done and "cancelled" in op.error.message
        assert [c.path for c in js.FetchJobOutputs(jobs_pb2.FetchJobOutputsRequest(name=name), metadata=admin)]
        js.DeleteJob(jobs_pb2.DeleteJobRequest(name=name, delete_outputs=True), metadata=admin)


def test_streams_pass_the_scope_carrying_interceptor_unchanged(start_server, tmp_path):
    """The interceptor now wraps every handler (to hand it the caller's scopes): streams in both directions still
    answer every message, and a bad message mid-stream still ends it with INVALID_ARGUMENT after the good ones."""
    from segsvc.v1 import segmentation_pb2 as pb

    publish(tmp_path / "repo", "m", seed=3)
    server = start_server(tmp_path / "repo", auth=AuthConfig.parse(TOKENS))
    images = [make_image(16, 16, seed=i) for i in range(3)]
    with server.client(token="infer-tok") as c:
        assert [r.mask.shape for r in c.segment_many(images, model="m", progress=False)] == [(16, 16)] * 3
    good = [pb.SegmentRequest(model="m", request_id=str(i), image=encode(image)).SerializeToString()
            for i, image in enumerate(images)]
    with grpc.insecure_channel(server.address) as channel:
        stream = channel.stream_stream("/segsvc.v1.SegmentationService/SegmentStream", request_serializer=None,
                                       response_deserializer=pb.SegmentResponse.FromString)
        answered = []
        with pytest.raises(grpc.RpcError) as info:
            for response in stream(iter(good + [b"\x0a\xff\xff\xff\xff\x0f"]), timeout=30,
                                   metadata=(("authorization", "Bearer infer-tok"),)):
                answered.append(response.request_id)
    assert sorted(answered) == ["0", "1", "2"] and info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("text, first", [
    ("# segsvc tokens\nadm1n manage\n", "adm1n"),  # the client found the file empty (it cut at the first '#')
    ("ab#cd manage  # the admin\n", "ab#cd"),  # the client sent 'ab'
    ("\n  tok-1 infer\ntok-2 manage\n", "tok-1"),
])
def test_the_cli_sends_the_first_token_the_server_reads_from_the_same_file(tmp_path, text, first):
    """deploy/README.md gives client and server one tokens.txt: both must read it the same way."""
    path = tmp_path / "tokens.txt"
    path.write_text(text)
    assert AuthConfig.from_file(path).tokens[0][0] == first
    assert _read_token(argparse.Namespace(token_file=str(path))) == first


def test_the_cli_names_a_token_file_without_tokens(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text("# no tokens yet\n")
    with pytest.raises(errors.SegsvcError, match=r"token file .*tokens.txt holds no token"):
        _read_token(argparse.Namespace(token_file=str(path)))


def test_only_the_probes_themselves_are_open_not_names_that_start_like_them(start_server, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from segsvc.server.auth import OPEN_METHODS

    assert OPEN_METHODS == {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                            *(f"/inference.GRPCInferenceService/{m}" for m in ("ServerLive", "ServerReady",
                                                                                "ModelReady"))}
    publish(tmp_path / "repo", "m", seed=3)
    server = start_server(tmp_path / "repo", auth=AuthConfig.parse(TOKENS))
    with grpc.insecure_channel(server.address) as channel:
        # No token: the probes answer, as load balancers and Kubernetes need.
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=60).status == \
            health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        oip = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert oip.ServerLive(service_pb2.ServerLiveRequest(), timeout=60).live
        assert oip.ServerReady(service_pb2.ServerReadyRequest(), timeout=60).ready
        assert oip.ModelReady(service_pb2.ModelReadyRequest(name="m"), timeout=60).ready
        # Other names under the same services, or starting with an open one, need a token like any method.
        for method in ("/inference.GRPCInferenceService/ModelReadyX", "/inference.GRPCInferenceService/ServerLiveAdmin",
                       "/inference.GRPCInferenceService/ServerReady/x", "/grpc.health.v1.Health/List",
                       "/grpc.health.v1.Health/Anything", "/grpc.health.v1.Health/CheckAll"):
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as anonymous:
                call(b"", timeout=60)
            assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
            with pytest.raises(grpc.RpcError) as known:
                call(b"", timeout=60, metadata=(("authorization", "Bearer infer-tok"),))
            assert known.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
