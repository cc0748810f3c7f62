"""From a review of the Open Inference Protocol adapter: the outputs a ``ModelInfer`` naming none gets (labels
and confidence, as the protocol says) cost no more to convert than ``Segment``'s equivalent response (labels and
``return_confidence``), and they read back through tritonclient unchanged.

Memory is counted with tracemalloc (numpy's buffers and Python's bytes are traced); nothing is timed.
"""

from __future__ import annotations


import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2

from segsvc.config import InputSpec, ModelSpec
from segsvc.errors import ResponseTooLarge
from segsvc.inference.engine import Output
from segsvc.inference.service import Segmentation
from segsvc.models.artifact import Manifest
from segsvc.server import oip_convert
from segsvc.server.convert import OutputFormat, segment_response
from tests.inference.test_core_review_costs import traced_peak

SIDE = 1024  # a label map of 1 MiB: far above every fixed overhead of the two responses
SLACK_BYTES = 64 * 1024  # the messages' other fields (class names, palette, timings, names)
NO_LIMIT = 1 << 40


def _segmentation(seed: int, classes: int = 3) -> Segmentation:
    rng = np.random.default_rng(seed)
    dtype = np.uint8 if classes <= 256 else np.uint16
    output = Output(rng.integers(0, classes, (SIDE, SIDE)).astype(dtype),
                    rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8))
    manifest = Manifest("m", 1, ModelSpec("unet", classes, 3), InputSpec(3), tuple(f"c{i}" for i in range(classes)),
                        ((0, 0, 0),) * classes)
    return Segmentation(np.zeros((1, 1, 3), np.uint8), output, manifest, "m", 1, 0.0, 0.0, 1)


def _as_triton(response) -> InferResult:  # type: ignore[no-untyped-def]
    """The response as tritonclient reads it (through the wire format)."""
    return InferResult(service_pb2.ModelInferResponse.FromString(response.SerializeToString()))


def test_the_default_outputs_cost_no_more_than_segment_s_labels_and_confidence():
    seg = _segmentation(seed=1)
    call = oip_convert.infer_call(service_pb2.ModelInferRequest(inputs=[service_pb2.ModelInferRequest.InferInputTensor(
        name="pixels", datatype="UINT8", shape=[1, 2, 2, 3])], raw_input_contents=[bytes(12)]), 4, 1 << 30)
    assert call.outputs == (oip_convert.LABELS, oip_convert.CONFIDENCE)  # a request naming no output gets both
    response, oip_peak = traced_peak(lambda: oip_convert.infer_response("r", [seg], call.outputs, NO_LIMIT))
    # Segment's servicer checks its response's size with ByteSize (upb serialises the message for it)
    _, segment_peak = traced_peak(lambda: segment_response("r", seg, OutputFormat()).ByteSize())
    assert oip_peak <= segment_peak + SLACK_BYTES, (
        f"ModelInfer's default outputs held {oip_peak / 2**20:.1f} MiB, Segment's equivalent "
        f"{segment_peak / 2**20:.1f} MiB")
    result = _as_triton(response)
    assert np.array_equal(result.as_numpy("labels"), seg.output.labels[None])
    assert np.array_equal(result.as_numpy("confidence"), seg.output.confidence[None])


def test_several_images_and_wide_labels_read_back_as_before():
    """N images stack to ``[N, H, W]`` in order, little-endian UINT16 above 256 classes."""
    segs = [_segmentation(seed=s, classes=300) for s in (2, 3, 4)]
    outputs = (oip_convert.CONFIDENCE, oip_convert.LABELS)
    response, peak = traced_peak(lambda: oip_convert.infer_response("r", segs, outputs, NO_LIMIT))
    result = _as_triton(response)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("confidence", "UINT8", [3, SIDE, SIDE]), ("labels", "UINT16", [3, SIDE, SIDE])]
    assert np.array_equal(result.as_numpy("labels"), np.stack([s.output.labels for s in segs]))
    assert np.array_equal(result.as_numpy("confidence"), np.stack([s.output.confidence for s in segs]))
    raw = sum(len(r) for r in response.raw_output_contents)  # held by the message itself
    assert peak <= raw + SLACK_BYTES, f"{peak / 2**20:.1f} MiB held for {raw / 2**20:.1f} MiB of outputs"


def test_the_size_limit_is_the_encoded_response_s_size_to_the_byte():
    segs = [_segmentation(seed=5, classes=300)]
    outputs = (oip_convert.LABELS, oip_convert.CONFIDENCE)
    size = oip_convert.infer_response("r", segs, outputs, NO_LIMIT).ByteSize()
    assert oip_convert.infer_response("r", segs, outputs, size).ByteSize() == size
    with pytest.raises(ResponseTooLarge, match=f"is {size} bytes"):
        oip_convert.infer_response("r", segs, outputs, size - 1)
