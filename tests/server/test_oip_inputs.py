"""Open Inference Protocol input tensors the core cannot take, refused from the request itself.

A malformed request is refused whole by ``oip_convert`` before any of its images reaches the core:
otherwise each image would fail there on its own, after admission, and count as a failed inference
in the model's statistics.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from segsvc.inference.batcher import BatchingConfig
from tests.server.conftest import make_image

pytestmark = pytest.mark.timeout(300)


def _pixels_input(batch: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("pixels", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    return tensor


def _failed_images(client: triton.InferenceServerClient) -> int:
    (stats,) = client.get_inference_statistics("tiny", "2").model_stats
    return stats.inference_stats.fail.count


def test_pixels_with_a_channel_count_no_image_has_are_refused_from_the_shape(triton_client):
    """C must be 1, 3 or 4 (grey, RGB, RGBA): ModelMetadata declares [-1, -1, -1, C]. A [2, 8, 8, 2] request used
    to reach the core image by image ("raw image must have 1, 3 or 4 channels, got 2", naming no input) and
    counted 2 failed inferences."""
    before = _failed_images(triton_client)
    for channels in (2, 5):
        batch = np.zeros((2, 8, 8, channels), np.uint8)
        with pytest.raises(InferenceServerException, match=r"input 'pixels' must have 1, 3 or 4 channels") as info:
            triton_client.infer("tiny", [_pixels_input(batch)])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert f"[2, 8, 8, {channels}]" in info.value.message()
    assert _failed_images(triton_client) == before
    for channels in (1, 3, 4):  # what the core takes still passes
        labels = triton_client.infer("tiny", [_pixels_input(np.zeros((1, 8, 8, channels), np.uint8))])
        assert labels.as_numpy("labels").shape == (1, 8, 8)


def test_a_request_holds_no_more_images_than_the_queue_takes(start_server, shared_repo):
    """A ModelInfer queues its images at once. Under ``--max-queue`` 2 (below ``--max-stream-in-flight``, 32),
    ModelConfig advertised max_batch_size 32 and a request of 16 images on an idle server failed
    RESOURCE_EXHAUSTED "queue is full ... retry with backoff", which no retry cures. The bound is the lower of
    the two: advertised, and refused from the shape as any oversized batch."""
    server = start_server(shared_repo, models=("tiny",),
                          batching=BatchingConfig(max_batch_size=2, max_delay_s=0.005, max_queue_size=2))
    client = triton.InferenceServerClient(server.address)
    try:
        assert client.get_model_config("tiny").config.max_batch_size == 2
        images = np.stack([make_image(16, 16, seed=s) for s in range(3)])
        with pytest.raises(InferenceServerException, match="at most 2 per request") as info:
            client.infer("tiny", [_pixels_input(images)])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert client.infer("tiny", [_pixels_input(images[:2])]).as_numpy("labels").shape == (2, 16, 16)
    finally:
        client.close()
