"""The Open Inference Protocol endpoint, driven by the official tritonclient against the real server.

Label maps must equal those of ``Segment`` (the segsvc client) for the same image.
The read-only tests share the module's server; tests that load, unload or need
tokens start their own.
"""

from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from segsvc.config import InputSpec, ModelSpec
from segsvc.inference.batcher import BatchingConfig
from segsvc.models.artifact import Manifest
from segsvc.server import oip_convert
from segsvc.server.auth import AuthConfig
from segsvc.server.config import LimitsConfig
from segsvc.server.oip import SERVICE_NAME
from tests.server.conftest import (assert_labels_match, encode, expire_in_queue, make_image, metric, metrics_text,
                                   publish, wait_for)

TOKENS = "infer-tok infer\nadmin-tok manage\n"
INFER = {"authorization": "Bearer infer-tok"}
ADMIN = {"authorization": "Bearer admin-tok"}

# tritonclient calls have no deadline by default: only a hang trips this, never a slow, loaded machine.
pytestmark = pytest.mark.timeout(300)


def _bytes_input(*images: bytes) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def _pixels_input(batch: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("pixels", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    return tensor


def _refused(code: str, match: str, call) -> InferenceServerException:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException, match=match) as info:
        call()
    assert info.value.status() == f"StatusCode.{code}", info.value.status()
    return info.value


# -- health and metadata ----------------------------------------------------------------
def test_server_live_ready_and_metadata(triton_client):
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    meta = triton_client.get_server_metadata()
    assert meta.name == "segsvc" and meta.version and "model_repository" in meta.extensions


def test_model_ready_by_name_and_version(triton_client):
    assert triton_client.is_model_ready("tiny") and triton_client.is_model_ready("tiny", "2")
    assert not triton_client.is_model_ready("tiny", "1")  # on disk, not loaded (the newest is served)
    assert not triton_client.is_model_ready("nope")
    _refused("INVALID_ARGUMENT", "positive integer", lambda: triton_client.is_model_ready("tiny", "two"))


def test_model_metadata_lists_inputs_outputs_and_versions(triton_client):
    meta = triton_client.get_model_metadata("tiny", as_json=True)
    assert meta["name"] == "tiny" and meta["versions"] == ["2"] and meta["platform"] == "segsvc"
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": ["-1"]},
                              {"name": "pixels", "datatype": "UINT8", "shape": ["-1", "-1", "-1", "3"]}]
    assert meta["outputs"] == [{"name": "labels", "datatype": "UINT8", "shape": ["-1", "-1", "-1"]},
                               {"name": "confidence", "datatype": "UINT8", "shape": ["-1", "-1", "-1"]}]
    assert triton_client.get_model_metadata("wide").outputs[0].datatype == "UINT16"
    assert list(triton_client.get_model_metadata("grey").inputs[1].shape) == [-1, -1, -1, 1]
    _refused("NOT_FOUND", "'nope'", lambda: triton_client.get_model_metadata("nope"))


def test_model_config_matches_metadata_and_describes_batching(triton_client, shared_server):
    limits, batching = shared_server.server.config.limits, shared_server.server.config.manager.batching
    config = triton_client.get_model_config("tiny", as_json=True)["config"]
    assert (config["name"], config["platform"], config["backend"]) == ("tiny", "segsvc", "torch")
    assert int(config["max_batch_size"]) == limits.max_stream_in_flight
    assert config["version_policy"] == {"specific": {"versions": ["2"]}}
    assert [(t["name"], t["data_type"], t.get("optional")) for t in config["input"]] == [
        ("image", "TYPE_STRING", True), ("pixels", "TYPE_UINT8", True)]
    assert [(t["name"], t["data_type"]) for t in config["output"]] == [("labels", "TYPE_UINT8"),
                                                                       ("confidence", "TYPE_UINT8")]
    dynamic = config["dynamic_batching"]
    assert dynamic["preferred_batch_size"] == [batching.max_batch_size]
    assert int(dynamic["max_queue_delay_microseconds"]) == round(batching.max_delay_s * 1e6)
    assert dynamic["default_queue_policy"]["max_queue_size"] == batching.max_queue_size
    assert config["instance_group"] == [{"name": "tiny_0", "kind": "KIND_CPU", "count": 1}]
    assert json.loads(config["parameters"]["classes"]["string_value"]) == ["c0", "c1", "c2"]
    # perf_analyzer takes shapes from the metadata, dropping the batch dimension when max_batch_size > 0:
    # the metadata's shape must be the batch dimension, then the configuration's dims.
    for name in ("tiny", "grey", "wide"):
        config = triton_client.get_model_config(name).config
        meta = triton_client.get_model_metadata(name)
        for tensors, described in ((config.input, meta.inputs), (config.output, meta.outputs)):
            assert [(t.name, [-1, *t.dims]) for t in tensors] == [(t.name, list(t.shape)) for t in described]
    assert triton_client.get_model_config("wide").config.output[0].data_type == model_config_pb2.TYPE_UINT16
    _refused("NOT_FOUND", "'nope'", lambda: triton_client.get_model_config("nope"))
    _refused("NOT_FOUND", "version 1", lambda: triton_client.get_model_config("tiny", "1"))


def test_model_config_names_the_gpu_and_leaves_out_a_batcher_that_is_off():
    manifest = Manifest("m", 3, ModelSpec("unet", 2, 1), InputSpec(1, (0.5,), (0.2,)), ("cell", "membrane"),
                        ((0, 0, 0), (255, 255, 255)))
    config = oip_convert.model_config("m", [3], manifest, backend="onnxruntime", device="cuda:1",
                                      batching=BatchingConfig(max_batch_size=1), max_images=4)
    assert [(g.kind, list(g.gpus)) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_GPU,
                                                                         [1])]
    assert not config.HasField("dynamic_batching") and config.max_batch_size == 4 and config.backend == "onnxruntime"
    assert list(config.input[1].dims) == [-1, -1, 1] and json.loads(config.parameters["classes"].string_value) == [
        "cell", "membrane"]


def _statistics(client: triton.InferenceServerClient, name: str = "", version: str = "") -> dict:
    reply = client.get_inference_statistics(name, version, as_json=True)
    return {(s["name"], s["version"]): s for s in reply.get("model_stats", [])}


def _stage(stats: dict, stage: str) -> tuple[int, int]:
    duration = stats.get("inference_stats", {}).get(stage, {})
    return int(duration.get("count", 0)), int(duration.get("ns", 0))


def test_model_statistics_count_every_image_and_stage(triton_client, client):
    before = _statistics(triton_client, "tiny")[("tiny", "2")]
    images = np.stack([make_image(24, 24, seed=s) for s in (40, 41)])
    triton_client.infer("tiny", [_pixels_input(images)])
    client.segment(make_image(24, 24, seed=42), model="tiny")  # segsvc.v1 calls count too: the core keeps them
    _refused("DEADLINE_EXCEEDED", "deadline", lambda: triton_client.infer(
        "tiny", [_pixels_input(images[:1])], timeout=1))  # 1 us: reaches the model, then fails
    after = _statistics(triton_client, "tiny", "2")[("tiny", "2")]

    def delta(stage: str) -> tuple[int, int]:
        return tuple(a - b for a, b in zip(_stage(after, stage), _stage(before, stage)))  # type: ignore[return-value]

    stages = ("queue", "compute_input", "compute_infer", "compute_output")
    assert delta("success")[0] == 3 and delta("fail")[0] == 1
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 3
    # perf_analyzer refuses statistics whose three compute counts differ
    assert [delta(stage)[0] for stage in stages] == [3, 3, 3, 3]
    assert all(delta(stage)[1] > 0 for stage in ("success", "fail", "compute_input", "compute_infer"))
    # each image's time in the core covers its stages, so perf_analyzer's "overhead" is not negative
    assert delta("success")[1] >= sum(delta(stage)[1] for stage in stages)
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert 2 <= executions <= 4  # the two images may share a batch; the failed one may have run before its deadline
    batches = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in after["batch_stats"]}
    assert sum(batches.values()) == int(after["execution_count"])
    assert int(after["last_inference"]) / 1000 == pytest.approx(time.time(), abs=120)


def test_model_statistics_by_model_version_or_all(triton_client):
    loaded = set(_statistics(triton_client))
    assert {("tiny", "2"), ("grey", "1"), ("wide", "1")} <= loaded and ("tiny", "1") not in loaded
    assert set(_statistics(triton_client, "grey")) == {("grey", "1")}
    _refused("NOT_FOUND", "'nope'", lambda: triton_client.get_inference_statistics("nope"))
    _refused("NOT_FOUND", "version 1", lambda: triton_client.get_inference_statistics("tiny", "1"))
    _refused("INVALID_ARGUMENT", "needs a model name", lambda: triton_client.get_inference_statistics("", "2"))


def test_reflection_lists_the_service(shared_server):
    with grpc.insecure_channel(shared_server.address) as channel:
        assert SERVICE_NAME in ProtoReflectionDescriptorDatabase(channel).get_services()


# -- inference ------------------------------------------------------------------------------
def test_png_bytes_give_segments_label_map(triton_client, client):
    data = encode(make_image(48, 64, seed=11), ".png")
    result = triton_client.infer("tiny", [_bytes_input(data)], request_id="r-1")
    labels = result.as_numpy("labels")
    assert labels.dtype == np.uint8 and labels.shape == (1, 48, 64)
    assert np.array_equal(labels[0], client.segment(data, model="tiny").mask)
    assert len(np.unique(labels)) > 1  # a meaningful comparison, not all one class
    response = result.get_response()
    assert response.model_name == "tiny" and response.model_version == "2" and response.id == "r-1"
    assert result.as_numpy("confidence").shape == (1, 48, 64)  # no output named: every declared output


def test_uint8_batch_with_confidence_matches_segment(triton_client, client, tiny_ref):
    images = [make_image(40, 56, seed=s) for s in (12, 13)]
    outputs = [triton.InferRequestedOutput("labels"), triton.InferRequestedOutput("confidence")]
    result = triton_client.infer("tiny", [_pixels_input(np.stack(images))], model_version="2", outputs=outputs)
    labels, confidence = result.as_numpy("labels"), result.as_numpy("confidence")
    assert labels.shape == confidence.shape == (2, 40, 56) and confidence.dtype == np.uint8
    for i, image in enumerate(images):
        single = client.segment(image, model="tiny", confidence=True)
        # Two images share one forward pass here: only numerically tied pixels may differ from a single pass.
        assert_labels_match(labels[i], tiny_ref, image)
        assert np.abs(confidence[i].astype(int) - single.confidence.astype(int)).max() <= 1
    one = triton_client.infer("tiny", [_pixels_input(images[0][None])]).as_numpy("labels")
    assert np.array_equal(one[0], client.segment(images[0], model="tiny").mask)


def test_grey_pixels_and_many_classes(triton_client, client):
    grey = make_image(32, 40, seed=14, channels=1)
    labels = triton_client.infer("grey", [_pixels_input(grey[None, :, :, None])]).as_numpy("labels")
    assert np.array_equal(labels[0], client.segment(grey, model="grey").mask)
    image = make_image(32, 40, seed=15)
    wide = triton_client.infer("wide", [_pixels_input(image[None])]).as_numpy("labels")
    assert wide.dtype == np.uint16 and np.array_equal(wide[0], client.segment(image, model="wide").mask)


def test_tensors_in_contents_instead_of_raw(shared_server, client):
    """The protocol's typed ``contents`` fields (tritonclient always sends raw bytes)."""
    image = make_image(24, 32, seed=16)
    png = encode(image, ".png")
    pixels = service_pb2.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[1, 24, 32, 3])
    pixels.contents.uint_contents.extend(image.ravel().tolist())
    encoded = service_pb2.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
    encoded.contents.bytes_contents.append(png)
    expected = client.segment(png, model="tiny").mask
    with grpc.insecure_channel(shared_server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for tensor in (pixels, encoded):
            response = stub.ModelInfer(service_pb2.ModelInferRequest(
                model_name="tiny", inputs=[tensor], outputs=[{"name": "labels"}]), timeout=60)
            (out,) = response.outputs
            assert (out.name, out.datatype, list(out.shape)) == ("labels", "UINT8", [1, 24, 32])
            assert np.array_equal(np.frombuffer(response.raw_output_contents[0], np.uint8).reshape(24, 32), expected)


def test_request_parameters_choose_tiling_and_flip(triton_client, client):
    image = make_image(64, 64, seed=17)
    options = {"tile_size": 32, "tile_overlap": 0.25, "flip_tta": True}
    result = triton_client.infer("tiny", [_pixels_input(image[None])], parameters=options)
    assert np.array_equal(result.as_numpy("labels")[0], client.segment(image, model="tiny", **options).mask)


def test_invalid_requests_name_the_problem(triton_client, shared_server):
    image = make_image(16, 16, seed=18)
    pixels = _pixels_input(image[None])
    _refused("NOT_FOUND", "'nope'", lambda: triton_client.infer("nope", [pixels]))
    _refused("NOT_FOUND", "version 7", lambda: triton_client.infer("tiny", [pixels], model_version="7"))
    floats = triton.InferInput("pixels", [1, 16, 16, 3], "FP32")
    floats.set_data_from_numpy(image[None].astype(np.float32))
    # the model is resolved first, as Triton does: an unknown model is NOT_FOUND whatever its tensors
    _refused("NOT_FOUND", "'nope'", lambda: triton_client.infer("nope", [floats]))
    _refused("INVALID_ARGUMENT", "'pixels' must be UINT8, got 'FP32'", lambda: triton_client.infer("tiny", [floats]))
    short = _pixels_input(image[None])
    short.set_shape([1, 16, 17, 3])  # one column more than the bytes hold
    _refused("INVALID_ARGUMENT", "needs 816 bytes", lambda: triton_client.infer("tiny", [short]))
    _refused("INVALID_ARGUMENT", "shape", lambda: triton_client.infer("tiny", [_pixels_input(image[None, None])]))
    mixed = _bytes_input(encode(image), encode(make_image(16, 20, seed=19)))
    _refused("INVALID_ARGUMENT", "must share one size", lambda: triton_client.infer("tiny", [mixed]))
    _refused("INVALID_ARGUMENT", "input 'image' element 0: ",
             lambda: triton_client.infer("tiny", [_bytes_input(b"not an image")]))
    limit = shared_server.server.config.limits.max_stream_in_flight
    many = np.zeros((limit + 1, 4, 4, 3), np.uint8)
    _refused("INVALID_ARGUMENT", f"at most {limit} per request",
             lambda: triton_client.infer("tiny", [_pixels_input(many)]))
    other = triton.InferInput("tensor", [1], "BYTES")
    other.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    _refused("INVALID_ARGUMENT", "unknown input 'tensor'", lambda: triton_client.infer("tiny", [other]))
    _refused("INVALID_ARGUMENT", "unknown output 'logits'", lambda: triton_client.infer(
        "tiny", [pixels], outputs=[triton.InferRequestedOutput("logits")]))
    _refused("INVALID_ARGUMENT", "parameter 'speed' is not supported",
             lambda: triton_client.infer("tiny", [pixels], parameters={"speed": 2}))
    _refused("INVALID_ARGUMENT", "tile_size",
             lambda: triton_client.infer("tiny", [pixels], parameters={"tile_size": 3}))


def test_model_infer_is_counted_in_the_request_metrics(triton_client, shared_server):
    def counts() -> tuple[float, ...]:
        text = metrics_text(shared_server)
        return (metric(text, "segsvc_requests_total", 0.0, method="ModelInfer", model="tiny", code="OK"),
                metric(text, "segsvc_requests_total", 0.0, method="ModelInfer", model="tiny", code="INVALID_ARGUMENT"),
                metric(text, "segsvc_requests_total", 0.0, method="ModelInfer", model="-", code="NOT_FOUND"),
                metric(text, "segsvc_request_seconds_count", 0.0, method="ModelInfer", model="tiny"),
                metric(text, "segsvc_queue_seconds_count", 0.0, model="tiny"),
                metric(text, "segsvc_inference_seconds_count", 0.0, model="tiny"))

    before = counts()
    images = np.stack([make_image(24, 24, seed=s) for s in (30, 31)])
    triton_client.infer("tiny", [_pixels_input(images)])
    _refused("INVALID_ARGUMENT", "element 0", lambda: triton_client.infer("tiny", [_bytes_input(b"not an image")]))
    _refused("NOT_FOUND", "'nope'", lambda: triton_client.infer("nope", [_pixels_input(images)]))
    after = counts()
    # One request of two images (each waits in the queue and runs) is counted under its model, and so is the
    # request whose image does not decode (the model is resolved first; its time too); the one naming an unknown
    # model is "-".
    assert [a - b for a, b in zip(after, before)] == [1, 1, 1, 2, 2, 2]


def test_an_expired_deadline_is_counted_as_deadline_exceeded(start_server, tmp_path, gated, monkeypatch):
    # The server sees the client's deadline as the time left when the request arrived: a host that stalls the
    # request's delivery by more than DEADLINE_SLACK_S would make it a cancellation (the boundary itself is
    # tests/server/test_errors.py's); here every cancellation is a deadline, so a slack that no stall reaches.
    monkeypatch.setattr("segsvc.server.errors.DEADLINE_SLACK_S", 60.0)
    publish(tmp_path, "m", seed=7)
    server = start_server(tmp_path, batching=BatchingConfig(max_batch_size=1, max_delay_s=0))
    batcher = server.manager.resolve("m", None).batcher
    client = triton.InferenceServerClient(server.address)
    try:
        busy = threading.Thread(target=lambda: client.infer("m", [_pixels_input(make_image(20, 20)[None])]))
        busy.start()
        wait_for(lambda: len(gated.ran) == 1)
        late, calls = expire_in_queue(batcher, lambda t: client.infer(
            "m", [_pixels_input(make_image(30, 30)[None])], client_timeout=t))
        assert isinstance(late, InferenceServerException) and late.status() == "StatusCode.DEADLINE_EXCEEDED", late
        wait_for(lambda: metric(metrics_text(server), "segsvc_requests_total", 0.0, method="ModelInfer",
                                code="DEADLINE_EXCEEDED") >= 1)
        gated.gate.set()
        busy.join(60)
    finally:
        client.close()
    text = metrics_text(server)
    # one per call made (1 unless a stalled host made expire_in_queue call again), each counted at most once
    assert 1 <= metric(text, "segsvc_requests_total", 0.0, method="ModelInfer", code="DEADLINE_EXCEEDED") <= calls
    assert metric(text, "segsvc_requests_total", 0.0, method="ModelInfer", code="CANCELLED") == 0


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(start_server, shared_repo):
    server = start_server(shared_repo, limits=LimitsConfig(max_pixels=32 * 32), models=("tiny",))
    client = triton.InferenceServerClient(server.address)
    try:
        big = encode(make_image(64, 64, seed=20))
        _refused("INVALID_ARGUMENT", "over the limit of 1024 pixels", lambda: client.infer("tiny", [_bytes_input(big)]))
    finally:
        client.close()


def test_pixels_over_the_limit_are_refused_from_the_shape_before_any_value_is_read(start_server, shared_repo):
    """The declared shape is checked first: pixels whose values are bad too (above 255, too few bytes) are
    refused for their size, so no value was converted or counted before the refusal."""
    server = start_server(shared_repo, limits=LimitsConfig(max_pixels=32 * 32), models=("tiny",))
    typed = service_pb2.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[2, 64, 64, 3])
    typed.contents.uint_contents.extend([256] * (2 * 64 * 64 * 3))  # converted, these would be refused as > 255
    raw = service_pb2.ModelInferRequest(
        model_name="tiny", raw_input_contents=[b"\0" * 100],  # far too few bytes for the shape
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[1, 64, 64, 1])])
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for request in (service_pb2.ModelInferRequest(model_name="tiny", inputs=[typed]), raw):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "input 'pixels': image is 64x64 = 4096 pixels, over the limit of 1024 pixels" in info.value.details()
            assert dict(info.value.trailing_metadata())["segsvc-error"] == "ImageTooLarge"


def test_the_rest_of_the_protocol_is_unimplemented_with_a_hint(triton_client, shared_server):
    _refused("UNIMPLEMENTED", "send tensors in the request", lambda: triton_client.get_system_shared_memory_status())
    with grpc.insecure_channel(shared_server.address) as channel:
        stream = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(()), timeout=60)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "use ModelInfer" in info.value.details()
    with grpc.insecure_channel(shared_server.address) as channel:  # the standard detail, as every other error
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).CudaSharedMemoryStatus(
                service_pb2.CudaSharedMemoryStatusRequest(), timeout=60)
    (detail,) = rpc_status.from_call(info.value).details
    reason = error_details_pb2.ErrorInfo()
    assert detail.Unpack(reason) and reason.reason == "UNIMPLEMENTED" and reason.domain == "segsvc.dev"


# -- the model repository and scopes ----------------------------------------------------------
def test_repository_index_load_and_unload_need_the_manage_scope(start_server, tmp_path):
    repo = tmp_path / "repo"
    publish(repo, "tiny", seed=1)
    publish(repo, "tiny", seed=2)
    publish(repo, "grey", seed=3, num_classes=2, in_channels=1)
    server = start_server(repo, auth=AuthConfig.parse(TOKENS))
    client = triton.InferenceServerClient(server.address)
    try:
        # probes are open, like gRPC health; everything else needs a token
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("grey")
        _refused("UNAUTHENTICATED", "bearer token", lambda: client.get_model_metadata("grey"))
        index = client.get_model_repository_index(headers=INFER, as_json=True)["models"]
        assert {(m["name"], m["version"], m["state"], m.get("reason", "")) for m in index} == {
            ("grey", "1", "READY", ""), ("tiny", "1", "UNAVAILABLE", "not loaded"), ("tiny", "2", "READY", "")}
        with grpc.insecure_channel(server.address) as channel:  # tritonclient never asks for ready-only
            ready = service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
                service_pb2.RepositoryIndexRequest(ready=True), metadata=tuple(INFER.items()), timeout=60).models
        assert [(m.name, m.version, m.state) for m in ready] == [("grey", "1", "READY"), ("tiny", "2", "READY")]

        _refused("PERMISSION_DENIED", "'manage' scope", lambda: client.unload_model("grey", headers=INFER))
        _refused("PERMISSION_DENIED", "'manage' scope", lambda: client.load_model("grey", headers=INFER))
        client.unload_model("grey", headers=ADMIN)
        assert not client.is_model_ready("grey")
        _refused("NOT_FOUND", "'grey'", lambda: client.infer(
            "grey", [_pixels_input(np.zeros((1, 8, 8, 1), np.uint8))], headers=INFER))
        client.load_model("grey", headers=ADMIN)
        assert client.is_model_ready("grey")
        labels = client.infer("grey", [_pixels_input(make_image(16, 16, seed=21, channels=1)[None, :, :, None])],
                              headers=INFER).as_numpy("labels")
        assert labels.shape == (1, 16, 16)
        _refused("NOT_FOUND", "'nope'", lambda: client.load_model("nope", headers=ADMIN))
        _refused("INVALID_ARGUMENT", "no config override", lambda: client.load_model(
            "grey", headers=ADMIN, config='{"max_batch_size": 8}'))
    finally:
        client.close()



def test_probes_answer_not_ready_while_the_server_starts(held_start, tmp_path):
    """Readiness probes are not refused by the start/drain gate: live, not ready (as Triton), then ready."""
    publish(tmp_path / "repo", "m", seed=2)
    port, release = held_start(tmp_path / "repo")  # listening; the model loads and the gate refuses calls
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert client.is_server_live() and not client.is_server_ready() and not client.is_model_ready("m")
    finally:
        release()
    assert client.is_server_ready() and client.is_model_ready("m")
