"""What requests hold before the memory budget admits them is bounded: at most ``max_concurrent_rpcs`` calls.

A call holds its request message (up to --max-message-mb) from the moment gRPC reads it, also while it waits
for the memory budget, and nothing bounded how many calls did: a burst of large images took the process past
its container's memory limit. Calls past the limit are refused at once with RESOURCE_EXHAUSTED, before their
request is read; health, reflection and the readiness probes still answer. (gRPC's own
``maximum_concurrent_rpcs`` is no use: it refuses health checks and probes past the limit like any call.)
"""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from segsvc import errors
from segsvc.server.config import MIB, LimitsConfig
from segsvc.server.oip_pb import grpc_service_pb2 as oip_pb
from segsvc.server.oip_pb import grpc_service_pb2_grpc as oip_grpc
from segsvc.v1 import segmentation_pb2 as pb
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc
from tests.server.conftest import encode, make_image, metric, metrics_text, publish, wait_for

HANG_S = 120  # only a hang reaches it


def test_calls_past_the_limit_are_refused_at_once_and_the_probes_still_answer(start_server, tmp_path, gated):
    publish(tmp_path, "m", seed=2)
    server = start_server(tmp_path, limits=LimitsConfig(max_concurrent_rpcs=2))
    results: list = []

    def held() -> None:
        with server.client(timeout_s=HANG_S) as c:
            results.append(c.segment(make_image(24, 24), model="m"))

    threads = [threading.Thread(target=held) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: server.server.calls.in_flight == 2 and len(gated.ran) >= 1)
        with server.client(timeout_s=HANG_S) as c, pytest.raises(errors.Overloaded) as refused:
            c.segment(make_image(24, 24), model="m")
        assert "at its limit of 2 calls in progress (--max-concurrent-rpcs" in str(refused.value)
        with grpc.insecure_channel(server.address) as channel:
            # Refused before its request is read: a call that never sends its message is answered all the same.
            release = threading.Event()

            def never_sent():
                release.wait(HANG_S)
                yield pb.SegmentRequest()

            segment = channel.stream_unary("/segsvc.v1.SegmentationService/Segment",
                                           request_serializer=pb.SegmentRequest.SerializeToString,
                                           response_deserializer=pb.SegmentResponse.FromString)
            with pytest.raises(grpc.RpcError) as held_back:
                segment(never_sent(), timeout=HANG_S)
            release.set()
            assert held_back.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-concurrent-rpcs" in held_back.value.details()
            # Health, the Open Inference Protocol's probes and reflection are neither counted nor refused.
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=HANG_S)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            oip = oip_grpc.GRPCInferenceServiceStub(channel)
            assert oip.ServerReady(oip_pb.ServerReadyRequest(), timeout=HANG_S).ready
            assert oip.ModelReady(oip_pb.ModelReadyRequest(name="m"), timeout=HANG_S).ready
            assert "segsvc.v1.SegmentationService" in ProtoReflectionDescriptorDatabase(channel).get_services()
        assert server.server.calls.in_flight == 2
        text = metrics_text(server)
        assert metric(text, "segsvc_requests_total", method="Segment", model="-", code="RESOURCE_EXHAUSTED") == 2
    finally:
        gated.gate.set()
        for t in threads:
            t.join(HANG_S)
    assert [r.mask.shape for r in results] == [(24, 24)] * 2  # the calls let in were served
    wait_for(lambda: server.server.calls.in_flight == 0)
    with server.client(timeout_s=HANG_S) as c:  # and the server serves again once they are done
        assert c.segment(encode(make_image(20, 20)), model="m").mask.shape == (20, 20)
        assert [m.name for m in c.list_models()] == ["m"]


def test_the_default_limit_holds_requests_within_the_image_budget() -> None:
    """The documented share: requests held before admission (one message each, at most) take no more memory
    than the images being served (--max-inflight-mb), so a container sized for both holds the worst case."""
    limits = LimitsConfig()
    assert limits.max_concurrent_rpcs * limits.max_message_bytes <= limits.max_inflight_mb * MIB


def test_the_limit_flag_reaches_the_server(serve_config, capsys) -> None:
    status, config = serve_config("--max-concurrent-rpcs", "8")
    assert status == 0 and config.limits.max_concurrent_rpcs == 8
    status, config = serve_config()
    assert status == 0 and config.limits.max_concurrent_rpcs == LimitsConfig().max_concurrent_rpcs
    status, config = serve_config("--max-concurrent-rpcs", "0")
    assert status == 2 and config is None
    assert "--max-concurrent-rpcs: must be a whole number >= 1, got 0" in capsys.readouterr().err


def test_a_streams_images_waiting_for_the_budget_take_places_too(start_server, tmp_path, gated):
    """A ``SegmentStream`` holds every image it has read until it answers it (up to --max-stream-in-flight), so
    one call counted once let a few streams hold many times the bound. Each image read takes a place beyond the
    first; a stream waits for one (back-pressure) where a new call is refused, and gives it back once answered."""
    publish(tmp_path, "m", seed=2)
    server = start_server(tmp_path, limits=LimitsConfig(max_concurrent_rpcs=2))
    results: list = []

    def stream() -> None:
        with server.client(timeout_s=HANG_S) as c:
            results.extend(c.segment_many([make_image(24, 24, seed=i) for i in range(3)], model="m", progress=False))

    t = threading.Thread(target=stream)
    t.start()
    try:
        wait_for(lambda: len(gated.ran) >= 1 and server.server.calls.in_flight == 2)  # two images read
        with server.client(timeout_s=HANG_S) as c, pytest.raises(errors.Overloaded, match="--max-concurrent-rpcs"):
            c.segment(make_image(24, 24), model="m")
    finally:
        gated.gate.set()
        t.join(HANG_S)
    assert [r.mask.shape for r in results] == [(24, 24)] * 3  # the third image was read once a place was free
    wait_for(lambda: server.server.calls.in_flight == 0)


def test_streams_that_fill_the_limit_go_on_as_their_images_are_answered(start_server, tmp_path):
    """Two streams open at a limit of two, then each sends three images. Each stream's call held a place of its
    own and, its first image read, waited for a second place for its next image; answering the first gave
    nothing back, so both waited for ever. Now the call's own place covers its first image, and a read that
    waits for a place goes on once the stream's own answers cover it (``test_stream_places.py``). Both streams
    are open before either sends: a stream that already holds two images fills the limit, and a stream opened
    then is refused (RESOURCE_EXHAUSTED), as a unary call would be."""
    publish(tmp_path, "m", seed=2)
    server = start_server(tmp_path, limits=LimitsConfig(max_concurrent_rpcs=2))
    both_open = threading.Event()
    answers: list[list] = [[], []]
    codes: list = [None, None]

    def requests(i: int):  # type: ignore[no-untyped-def]
        both_open.wait(HANG_S)
        for j in range(3):
            yield pb.SegmentRequest(request_id=f"{i}-{j}", model="m", image=encode(make_image(24, 24, seed=j)))

    def stream(i: int, stub: pb_grpc.SegmentationServiceStub) -> None:
        call = stub.SegmentStream(requests(i), timeout=HANG_S)
        try:
            answers[i].extend(r.request_id for r in call if not r.HasField("error"))
        except grpc.RpcError:
            pass
        codes[i] = call.code()

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.SegmentationServiceStub(channel)
        threads = [threading.Thread(target=stream, args=(i, stub)) for i in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: server.server.calls.in_flight == 2)  # both streams admitted, each on its own place
        both_open.set()
        for t in threads:
            t.join(2 * HANG_S)
    assert codes == [grpc.StatusCode.OK] * 2
    assert [sorted(a) for a in answers] == [[f"{i}-{j}" for j in range(3)] for i in range(2)]
    wait_for(lambda: server.server.calls.in_flight == 0)


def test_a_draining_server_answers_unavailable_even_at_its_limit():
    """The limit came before the drain gate: a draining server at its limit said RESOURCE_EXHAUSTED ("retry
    with backoff") where the gate says UNAVAILABLE ("retry elsewhere")."""
    import asyncio

    from segsvc.server.app import CallLimit

    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    call = type("Details", (), {"method": "/segsvc.v1.SegmentationService/Segment", "invocation_metadata": ()})()

    async def continuation(_details):
        return handler

    async def main(accepting: bool):
        return await CallLimit(1, accepting=lambda: accepting).intercept_service(continuation, call)

    assert asyncio.run(main(False)) is handler  # passed on untouched: the gate refuses it
    assert asyncio.run(main(True)) is not handler  # counted
