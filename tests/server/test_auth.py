"""Least privilege: scoped tokens, auth on unknown methods, a local metrics endpoint."""

from __future__ import annotations

import urllib.request

import grpc
import pytest

from segsvc import errors
from segsvc.server.auth import AuthConfig, required_scope
from segsvc.server.config import ServerConfig
from tests.server.conftest import make_image, publish

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
            call(b"", timeout=10)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as known:
            call(b"", timeout=10, metadata=(("authorization", "Bearer infer-tok"),))
        assert known.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_metrics_bind_to_localhost_by_default(start_server, tmp_path):
    assert ServerConfig(model_repo=tmp_path).metrics_host == "127.0.0.1"
    publish(tmp_path / "repo", "m", seed=3)
    server = start_server(tmp_path / "repo", host="0.0.0.0")  # gRPC on every interface, metrics stay local
    http = server.server.metrics._http
    assert http.server_address[0] == "127.0.0.1"
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read()
    assert b"segsvc_" in text
    with pytest.raises(errors.InvalidArgument, match="metrics over TLS"):
        ServerConfig(model_repo=tmp_path, metrics_tls=True)
