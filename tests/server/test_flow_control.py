"""Deadlines, cancellation, full queues and streams, with an engine held on a gate."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from segsvc import errors
from segsvc.inference.batcher import BatchingConfig
from segsvc.server.config import LimitsConfig
from segsvc.v1 import segmentation_pb2 as pb
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc
from tests.server.conftest import (assert_labels_match, encode, expire_in_queue, make_image, metric, metrics_text,
                                   publish, reference, wait_for)


def _serial_server(start_server, tmp_path, **limits):
    publish(tmp_path, "m", seed=7)
    return start_server(tmp_path, batching=BatchingConfig(max_batch_size=1, max_delay_s=0, **limits))


def test_deadline_exceeded_and_the_expired_request_never_runs(start_server, tmp_path, gated):
    server = _serial_server(start_server, tmp_path)
    batcher = server.manager.resolve("m", None).batcher
    with server.client() as c:
        # held at the gate while expire_in_queue runs (over a minute if a stalled host makes it call again)
        first = threading.Thread(target=lambda: c.segment(make_image(20, 20), model="m", timeout_s=300))
        first.start()
        wait_for(lambda: len(gated.ran) == 1)  # the worker is busy with the first image
        late, _ = expire_in_queue(batcher, lambda t: c.segment(make_image(30, 30), model="m", timeout_s=t))
        assert isinstance(late, errors.DeadlineExceeded), late
        wait_for(lambda: batcher.queue_depth == 0)
        gated.gate.set()
        first.join(60)
        c.segment(make_image(12, 12), model="m")  # one worker, first in first out: the dropped one would run first
    assert gated.ran == [[(20, 20)], [(12, 12)]]  # the 30x30 request was dropped from the queue
    assert batcher.stats.dropped >= 1


def test_cancelled_requests_leave_the_queue(start_server, tmp_path, gated):
    server = _serial_server(start_server, tmp_path)
    batcher = server.manager.resolve("m", None).batcher
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.SegmentationServiceStub(channel)
        # Deadlines only a hang reaches: these calls wait out the test's steps (each may take seconds on a
        # loaded host), and the doomed one must still have most of its deadline left when it is cancelled.
        busy = stub.Segment.future(pb.SegmentRequest(model="m", image=encode(make_image(20, 20))), timeout=120)
        wait_for(lambda: len(gated.ran) == 1)
        doomed = stub.Segment.future(pb.SegmentRequest(model="m", image=encode(make_image(40, 40))), timeout=120)
        wait_for(lambda: batcher.queue_depth == 1)
        assert doomed.cancel()
        wait_for(lambda: batcher.queue_depth == 0)
        gated.gate.set()
        assert busy.result(60).labels.height == 20
        # one worker, first in first out: a cancelled request that still ran would run before this one
        stub.Segment(pb.SegmentRequest(model="m", image=encode(make_image(12, 12))), timeout=60)
    assert gated.ran == [[(20, 20)], [(12, 12)]]
    # a client that hangs up with most of its deadline left is counted as cancelled, not as a deadline
    wait_for(lambda: metric(metrics_text(server), "segsvc_requests_total", 0.0, method="Segment",
                            code="CANCELLED") == 1)
    assert metric(metrics_text(server), "segsvc_requests_total", 0.0, method="Segment", code="DEADLINE_EXCEEDED") == 0


def test_full_queue_answers_resource_exhausted(start_server, tmp_path, gated):
    server = _serial_server(start_server, tmp_path, max_queue_size=2)
    batcher = server.manager.resolve("m", None).batcher
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.SegmentationServiceStub(channel)

        def send(size):  # a deadline only a hang reaches: the held ones wait out the test's steps
            return stub.Segment.future(pb.SegmentRequest(model="m", image=encode(make_image(size, size))), timeout=120)

        running = send(16)
        wait_for(lambda: len(gated.ran) == 1)
        queued = [send(24), send(32)]
        wait_for(lambda: batcher.queue_depth == 2)
        with pytest.raises(grpc.RpcError) as info:
            send(40).result(60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full (2 requests waiting)" in info.value.details()
        gated.gate.set()
        assert [f.result(60).labels.height for f in [running, *queued]] == [16, 24, 32]
    with server.client() as c:  # the typed client error for the same condition
        gated.gate.clear()
        blockers = [threading.Thread(target=c.segment, args=(make_image(8, 8),), kwargs={"model": "m"})
                    for _ in range(3)]
        # One at a time: started together, all three can reach the queue before the worker takes the
        # first, and the third is then refused (the race that made this test flaky on a loaded machine).
        blockers[0].start()
        wait_for(lambda: len(gated.ran) == 4)  # the first is running, held by the gate
        for b in blockers[1:]:
            b.start()
        wait_for(lambda: batcher.queue_depth == 2)
        try:
            with pytest.raises(errors.Overloaded, match="queue is full"):
                c.segment(make_image(8, 8), model="m")
        finally:
            gated.gate.set()
            for b in blockers:
                b.join(60)

def test_stream_answers_every_request_with_its_id(start_server, tmp_path):
    v1 = publish(tmp_path, "m", seed=8)
    ref = reference(v1)
    server = start_server(tmp_path, limits=LimitsConfig(max_stream_in_flight=3))
    images = [make_image(20 + 3 * i, 30 + i, seed=i) for i in range(12)]

    def requests():
        for i, image in enumerate(images):
            # every third request leaves its id empty: the server uses its position
            yield pb.SegmentRequest(model="m", request_id="" if i % 3 == 0 else f"id-{i}", image=encode(image))

    with grpc.insecure_channel(server.address) as channel:
        responses = list(pb_grpc.SegmentationServiceStub(channel).SegmentStream(requests(), timeout=60))
    assert len(responses) == len(images)
    by_id = {r.request_id: r for r in responses}
    assert set(by_id) == {str(i) if i % 3 == 0 else f"id-{i}" for i in range(len(images))}
    for i, image in enumerate(images):
        r = by_id[str(i) if i % 3 == 0 else f"id-{i}"]
        labels = np.frombuffer(r.labels.data, np.uint8).reshape(r.labels.height, r.labels.width)
        assert_labels_match(labels, ref, image)


def test_segment_many_keeps_input_order_and_batches(start_server, tmp_path, gated):
    v1 = publish(tmp_path, "m", seed=9)
    ref = reference(v1)
    server = start_server(tmp_path, batching=BatchingConfig(max_batch_size=4, max_delay_s=0.05))
    batcher = server.manager.resolve("m", None).batcher
    images = [make_image(32, 32, seed=i) for i in range(10)]
    with server.client() as c, ThreadPoolExecutor(1) as pool:
        stream = pool.submit(c.segment_many, images, model="m", progress=False)
        # The first batch is held until two more images wait behind it: on a loaded host each image could
        # otherwise be answered before the next arrives, and no two would share a batch.
        wait_for(lambda: len(gated.ran) == 1 and batcher.queue_depth >= 2 or stream.done())
        gated.gate.set()
        results = stream.result(60)
    for image, result in zip(images, results):
        assert_labels_match(result.mask, ref, image)
    assert max(r.timings.batch_size for r in results) > 1  # the stream's images shared batches
