"""The token check answers before the request is read: a caller without a valid token is refused at once,
whatever it sends (or does not send), and every served method needs the scope the table below gives it."""

from __future__ import annotations

import threading

import grpc
import pytest

from segsvc.server.auth import OPEN_METHODS, AuthConfig, required_scope
from tests.server.conftest import publish

TOKENS = "infer-tok infer\njobs-tok jobs\n"
# A deadline far longer than a refusal takes: a call that waited for it got DEADLINE_EXCEEDED, not a refusal.
TIMEOUT_S = 60
RAW = dict(request_serializer=None, response_deserializer=None)


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    from tests.server.conftest import RunningServer, server_config

    repo = tmp_path_factory.mktemp("repo")
    publish(repo, "m", seed=3)
    server = RunningServer(server_config(repo, auth=AuthConfig.parse(TOKENS)))
    try:
        with grpc.insecure_channel(server.address) as ch:
            yield ch
    finally:
        server.close()


def _held_open(released: threading.Event):
    """A request stream that sends nothing and stays open until ``released`` (past the call's deadline: a server
    that waited for a message meets the deadline, not the stream's end)."""
    released.wait(4 * TIMEOUT_S)
    yield from ()


# (method, how the client calls it). The unary-request shapes are a client that sends no message (or has not
# yet): the refusal must not wait for one. UNAUTHENTICATED used to come only for a message that arrived.
SHAPES = [
    ("/segsvc.v1.SegmentationService/ListModels", "stream_unary"),  # served, unary request
    ("/segsvc.v1.SegmentationService/Segment", "stream_stream"),
    ("/segsvc.v1.JobService/FetchJobOutputs", "stream_stream"),  # served, unary request, streamed response
    ("/segsvc.v1.Nope/Nothing", "stream_unary"),  # not served: refused like any other without a token
    ("/segsvc.v1.Nope/Nothing", "stream_stream"),
    ("/segsvc.v1.JobService/UploadImages", "stream_unary"),  # request streaming: was already refused at once
]


@pytest.mark.parametrize("method, shape", SHAPES)
@pytest.mark.parametrize("token, code", [(None, grpc.StatusCode.UNAUTHENTICATED),
                                         ("wrong-tok", grpc.StatusCode.UNAUTHENTICATED)])
def test_a_caller_without_a_valid_token_is_refused_before_it_sends_a_message(channel, method, shape, token, code):
    released = threading.Event()
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    call = getattr(channel, shape)(method, **RAW)
    try:
        with pytest.raises(grpc.RpcError) as info:
            answer = call(_held_open(released), timeout=TIMEOUT_S, metadata=metadata)
            if shape == "stream_stream":
                list(answer)
    finally:
        released.set()
    assert info.value.code() == code, (method, shape, info.value.details())


def test_a_token_without_the_scope_is_refused_before_a_message_too(channel):
    released = threading.Event()
    call = channel.stream_unary("/segsvc.v1.SegmentationService/LoadModel", **RAW)
    try:
        with pytest.raises(grpc.RpcError) as info:
            call(_held_open(released), timeout=TIMEOUT_S, metadata=(("authorization", "Bearer infer-tok"),))
    finally:
        released.set()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value.details()


def test_a_large_request_without_a_token_still_gets_its_refusal(channel):
    """Refused before it is read, a 3 MB request still reads UNAUTHENTICATED at the client (not a reset stream)."""
    call = channel.unary_unary("/segsvc.v1.SegmentationService/Segment", **RAW)
    with pytest.raises(grpc.RpcError) as info:
        call(b"\x12" + b"\x80\x80\xc0\x01" + b"\0" * (3 << 20), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()


def _served_methods() -> dict[str, bool]:
    """Every method the server registers -> whether it is open (needs no token)."""
    from google.longrunning import operations_pb2
    from grpc_health.v1 import health_pb2

    from segsvc.server.oip_pb import grpc_service_pb2
    from segsvc.v1 import datasets_pb2, jobs_pb2, segmentation_pb2, training_pb2

    methods = {"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": False}
    for module in (segmentation_pb2, jobs_pb2, datasets_pb2, training_pb2, operations_pb2, grpc_service_pb2,
                   health_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                path = f"/{service.full_name}/{m.name}"
                methods[path] = path in OPEN_METHODS
    return methods


# The least scope each method needs ('manage' grants every scope). A new RPC fails this test until it is placed.
MANAGE = {f"/segsvc.v1.SegmentationService/{m}" for m in ("LoadModel", "UnloadModel", "SetDefaultVersion")} | {
    f"/inference.GRPCInferenceService/{m}" for m in ("RepositoryModelLoad", "RepositoryModelUnload")}


def _expected_scope(path: str) -> str:
    service = path.split("/")[1]
    if path in MANAGE or service in ("segsvc.v1.DatasetService", "segsvc.v1.TrainingService"):
        return "manage"
    if service in ("segsvc.v1.JobService", "google.longrunning.Operations"):
        return "jobs"  # training jobs' operations also need 'manage', checked per job (server/jobs.py)
    return "infer"


def test_every_served_method_has_the_scope_of_the_table():
    methods = _served_methods()
    assert len(methods) == 46, sorted(methods)  # a new RPC: place it in the table above
    assert {m for m, is_open in methods.items() if is_open} == set(OPEN_METHODS)
    wrong = {m: (required_scope(m), _expected_scope(m)) for m, is_open in methods.items()
             if not is_open and required_scope(m) != _expected_scope(m)}
    assert not wrong, wrong
