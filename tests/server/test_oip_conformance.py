"""Open Inference Protocol conformance: what Triton and the published ``grpc_service.proto`` define, driven by
the official tritonclient (or the protocol's own stub where tritonclient cannot send the message).

Covers the empty model name of the open ``ModelReady`` probe, the default outputs, the parameters tritonclient
and HTTP-bridged clients send, the extensions named in ``ServerMetadata`` and version ``-1``.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from segsvc.server import oip_convert
from segsvc.server.auth import AuthConfig
from tests.server.conftest import make_image, publish

ADMIN = {"authorization": "Bearer admin-tok"}

pytestmark = pytest.mark.timeout(300)


def _pixels_input(batch: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("pixels", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    return tensor


def _answers(call) -> str:  # type: ignore[no-untyped-def]
    """What a caller learns from a call: its answer, or its error's status and message."""
    try:
        return repr(call())
    except InferenceServerException as exc:
        return f"{exc.status()}: {exc.message()}"


# -- ModelReady ------------------------------------------------------------------------------
def test_an_empty_model_name_is_not_ready_and_anonymous_answers_name_no_model(start_server, tmp_path):
    """ModelReady needs no token: with an empty name it answers not ready (as Triton does), whichever models
    are loaded, and no anonymous answer names a model."""
    publish(tmp_path, "secret-alpha", seed=1)
    publish(tmp_path, "secret-beta", seed=2)
    server = start_server(tmp_path, auth=AuthConfig.parse("admin-tok manage\n"))
    client = triton.InferenceServerClient(server.address)
    try:
        anonymous = (lambda: client.is_model_ready(""), lambda: client.is_model_ready("", "1"),
                     lambda: client.is_model_ready("nope"), lambda: client.is_model_ready("secret-alpha", "x"),
                     lambda: client.get_model_metadata(""), lambda: client.get_model_repository_index(),
                     lambda: client.infer("", [_pixels_input(np.zeros((1, 8, 8, 3), np.uint8))]))
        for loaded in (2, 1):  # with one model loaded, the empty name used to resolve to it
            if loaded == 1:
                client.unload_model("secret-beta", headers=ADMIN)
            assert not client.is_model_ready("") and not client.is_model_ready("", "1")
            for call in anonymous:
                answer = _answers(call)
                assert "secret" not in answer, (loaded, answer)
        assert client.is_model_ready("secret-alpha")  # the probe itself still works
    finally:
        client.close()


def test_an_empty_model_name_is_refused_even_with_one_model_loaded(start_server, tmp_path):
    """The protocol names the model in every request. With one model loaded, ModelReady("") answered not ready
    while ModelMetadata, ModelConfig and ModelInfer with that empty name answered for the loaded model (and
    failed with INVALID_ARGUMENT once a second model loaded). ModelStatistics("") still means every model."""
    publish(tmp_path, "only", seed=1)
    server = start_server(tmp_path)
    client = triton.InferenceServerClient(server.address)
    try:
        assert not client.is_model_ready("") and client.is_model_ready("only")
        pixels = _pixels_input(np.zeros((1, 8, 8, 3), np.uint8))
        for call in (lambda: client.get_model_metadata(""), lambda: client.get_model_config(""),
                     lambda: client.infer("", [pixels])):
            with pytest.raises(InferenceServerException, match="model name is empty") as info:
                call()
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert client.infer("only", [pixels]).get_response().model_name == "only"
        assert [s.name for s in client.get_inference_statistics("").model_stats] == ["only"]
    finally:
        client.close()


# -- outputs and parameters --------------------------------------------------------------------
def test_a_request_naming_no_output_gets_every_declared_output(triton_client, shared_server):
    image = make_image(24, 32, seed=50)
    declared = [o.name for o in triton_client.get_model_metadata("tiny").outputs]
    result = triton_client.infer("tiny", [_pixels_input(image[None])])
    assert [o.name for o in result.get_response().outputs] == declared == ["labels", "confidence"]
    both = triton_client.infer("tiny", [_pixels_input(image[None])], outputs=[
        triton.InferRequestedOutput("labels"), triton.InferRequestedOutput("confidence")])
    for name in declared:
        assert np.array_equal(result.as_numpy(name), both.as_numpy(name)), name
    only = triton_client.infer("tiny", [_pixels_input(image[None])], outputs=[triton.InferRequestedOutput("labels")])
    assert [o.name for o in only.get_response().outputs] == ["labels"]  # a request naming outputs gets those


def test_tritonclient_timeout_zero_and_priority_are_accepted(triton_client):
    """tritonclient sends ``timeout`` (0: none) and ``priority`` (uint64); segsvc has no priority levels for
    requests, so the priority is accepted and has no effect."""
    image = make_image(16, 16, seed=51)
    plain = triton_client.infer("tiny", [_pixels_input(image[None])]).as_numpy("labels")
    for kwargs in ({"timeout": 0}, {"priority": 1}, {"timeout": 0, "priority": 3}):
        labels = triton_client.infer("tiny", [_pixels_input(image[None])], **kwargs).as_numpy("labels")
        assert np.array_equal(labels, plain), kwargs
    with pytest.raises(InferenceServerException, match="'timeout'") as info:
        triton_client.infer("tiny", [_pixels_input(image[None])], timeout=-1)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_the_binary_data_output_parameter_is_accepted(shared_server):
    """HTTP-bridged (KServe) clients mark outputs ``binary_data``; over gRPC outputs are always raw bytes.
    What segsvc cannot honour is still refused: an output's ``class_count``, a priority that is no integer."""
    image = make_image(16, 16, seed=52)
    request = service_pb2.ModelInferRequest(model_name="tiny", raw_input_contents=[image[None].tobytes()])
    request.inputs.add(name="pixels", datatype="UINT8", shape=[1, 16, 16, 3])
    request.outputs.add(name="labels").parameters["binary_data"].bool_param = True
    with grpc.insecure_channel(shared_server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, timeout=60)
        assert [o.name for o in response.outputs] == ["labels"] and len(response.raw_output_contents[0]) == 256
        priority = service_pb2.ModelInferRequest()
        priority.CopyFrom(request)
        priority.parameters["priority"].string_param = "high"
        request.outputs[0].parameters["class_count"].int64_param = 2
        for refused, word in ((request, "class_count"), (priority, "'priority'")):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(refused, timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and word in info.value.details()


# -- metadata and versions -------------------------------------------------------------------------
def test_server_metadata_names_every_extension_served(triton_client):
    extensions = set(triton_client.get_server_metadata().extensions)
    assert {"model_repository", "model_repository(unload_dependents)", "model_configuration", "statistics",
            "parameters"} <= extensions


def test_version_minus_one_is_the_default_version(triton_client):
    assert oip_convert.version_of("-1") is None and oip_convert.version_of("") is None
    assert triton_client.is_model_ready("tiny", "-1")
    assert triton_client.get_model_metadata("tiny", "-1").versions == ["2"]
    assert triton_client.get_model_config("tiny", "-1").config.name == "tiny"
    assert {(s.name, s.version) for s in triton_client.get_inference_statistics("tiny", "-1").model_stats} == {
        ("tiny", "2")}
    result = triton_client.infer("tiny", [_pixels_input(make_image(16, 16, seed=53)[None])], model_version="-1")
    assert result.get_response().model_version == "2"
    for text in ("-2", "0", "02"):
        with pytest.raises(InferenceServerException, match="positive integer") as info:
            triton_client.is_model_ready("tiny", text)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
