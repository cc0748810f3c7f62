"""Open Inference Protocol requests QA found misread or refused with the wrong words, through the official
tritonclient against the real server (the shared server and helpers of ``test_oip``).

- ``pixels`` is always 4-D: a [24, 24, 3] image sent without its batch dimension was read as 24 grey images of
  24x3 and answered (24, 24, 3) labels; a [96, 96, 3] one was refused as "holds 96 images; at most 32".
- ``infer(..., sequence_id=5)``: tritonclient then sends sequence_id, sequence_start and sequence_end; the
  refusal named whichever the map listed first ("request parameter 'sequence_end' is not supported").
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton

from tests.server.conftest import make_image
from tests.server.test_oip import _pixels_input, _refused

pytestmark = pytest.mark.timeout(300)


def _image(h: int, w: int, c: int, seed: int) -> np.ndarray:
    """An ``h x w x c`` image (``make_image`` drops the axis of a grey one)."""
    return make_image(h, w, seed=seed, channels=c).reshape(h, w, c)


def _failed_images(client: triton.InferenceServerClient) -> int:
    (stats,) = client.get_inference_statistics("tiny", "2").model_stats
    return stats.inference_stats.fail.count


@pytest.mark.parametrize("shape", [(24, 24, 3), (96, 96, 3), (16, 20, 1), (16, 20, 4)])
def test_an_image_without_its_batch_dimension_is_refused_with_the_shape_to_send(triton_client, shape):
    before = _failed_images(triton_client)
    h, w, c = shape
    error = _refused("INVALID_ARGUMENT", "must have shape", lambda: triton_client.infer(
        "tiny", [_pixels_input(_image(h, w, c, 81))]))
    assert error.message().endswith(f"input 'pixels' must have shape [N, H, W, C], got {list(shape)}; "
                                    f"add the batch dimension: [1, {h}, {w}, {c}]"), error.message()
    assert _failed_images(triton_client) == before  # refused from the request, never reached the core
    labels = triton_client.infer("tiny", [_pixels_input(_image(h, w, c, 81)[None])])
    assert labels.as_numpy("labels").shape == (1, h, w)  # the shape the hint names is served


def test_a_grey_batch_without_its_channel_dimension_is_refused_with_the_shape_to_send(triton_client):
    """[N, H, W] grey was read as N grey images; it is ambiguous with H x W x C, so it is refused too."""
    error = _refused("INVALID_ARGUMENT", "must have shape", lambda: triton_client.infer(
        "grey", [_pixels_input(np.zeros((2, 16, 20), np.uint8))]))
    assert error.message().endswith("input 'pixels' must have shape [N, H, W, C], got [2, 16, 20]; "
                                    "for grey images add the channel dimension: [2, 16, 20, 1]"), error.message()
    assert triton_client.infer("grey", [_pixels_input(np.zeros((2, 16, 20, 1), np.uint8))]).as_numpy(
        "labels").shape == (2, 16, 20)


@pytest.mark.parametrize("shape", [(16,), (16, 16), (1, 1, 16, 16, 3)])
def test_other_ranks_are_refused_naming_the_shape_received_and_expected(triton_client, shape):
    error = _refused("INVALID_ARGUMENT", "must have shape", lambda: triton_client.infer(
        "tiny", [_pixels_input(np.zeros(shape, np.uint8))]))
    assert f"input 'pixels' must have shape [N, H, W, C] with positive sizes, got {list(shape)}" in error.message()


def test_metadata_declares_the_model_s_channels_and_the_other_counts_are_served(triton_client):
    """ModelMetadata declares [-1, -1, -1, C] with the model's own C (perf_analyzer makes its inputs from it);
    1, 3 and 4 channels are all served, converted as Segment converts them."""
    for model, channels in (("tiny", 3), ("grey", 1)):
        (_, pixels) = triton_client.get_model_metadata(model).inputs
        assert (pixels.name, list(pixels.shape)) == ("pixels", [-1, -1, -1, channels])
        for c in (1, 3, 4):
            result = triton_client.infer(model, [_pixels_input(_image(8, 8, c, 82)[None])])
            assert result.as_numpy("labels").shape == (1, 8, 8)


@pytest.mark.parametrize("kwargs, named", [
    (dict(sequence_id=5), "sequence_id"),
    (dict(sequence_id="session-1", sequence_start=True), "sequence_id"),
    (dict(sequence_id=7, sequence_end=True), "sequence_id"),
])
def test_sequence_batching_is_refused_naming_what_the_caller_set(triton_client, kwargs, named):
    image = _pixels_input(make_image(8, 8, seed=83)[None])
    error = _refused("INVALID_ARGUMENT", "sequence", lambda: triton_client.infer("tiny", [image], **kwargs))
    assert error.message().endswith(
        f"request parameter {named!r} is not supported: segsvc has no sequence batching (every request stands "
        "alone); leave sequence_id, sequence_start and sequence_end unset"), error.message()
    assert "sequence_end' is not supported" not in error.message()


def test_a_sequence_flag_sent_alone_is_the_one_named(shared_server):
    """A raw gRPC client may send only sequence_start or sequence_end: that parameter is named."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[1, 2, 2, 3])
    for key in ("sequence_start", "sequence_end"):
        request = service_pb2.ModelInferRequest(model_name="tiny", inputs=[tensor], raw_input_contents=[bytes(12)])
        request.parameters[key].bool_param = True
        with grpc.insecure_channel(shared_server.address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"request parameter {key!r} is not supported: segsvc has no sequence batching" in info.value.details()
