"""A place of ``--max-concurrent-rpcs`` is not held for nothing, and management keeps places of its own.

A client with an inference token opened ``--max-concurrent-rpcs`` SegmentStream calls and never sent a message:
each open stream held its place for as long as the client wished, so every other call was refused
RESOURCE_EXHAUSTED meanwhile, the management calls too (an operator could not even unload a model), while health
stayed SERVING. Now a stream with nothing unanswered that receives no message for ``--stream-idle-s`` (and a call
that does not send its request message) is ended with RESOURCE_EXHAUSTED and gives its place back, and the calls
that need the ``manage`` scope have ``MANAGE_RESERVE`` places beyond the limit that inference never takes.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import grpc
import pytest
import tritonclient.grpc as triton

from segsvc import errors
from segsvc.server.app import MANAGE_RESERVE
from segsvc.server.auth import AuthConfig
from segsvc.server.config import LimitsConfig
from segsvc.v1 import segmentation_pb2 as pb
from tests.server.conftest import encode, make_image, metric, metrics_text, publish, wait_for
from tests.server.test_stream_places import FREE, HELD, REFUSED, held  # noqa: F401  (held: a fixture)

DEADLINE_S = 60.0  # the client's deadline of each call: only a server that never ends an idle call waits this long
IDLE_S = 1.0  # the test servers' --stream-idle-s
IDLE_ENDED = "(--stream-idle-s): it was ended to free its place"
TOKENS = "infer-tok infer\nadmin-tok manage\n"
INFER = (("authorization", "Bearer infer-tok"),)


class Stream:
    """A ``SegmentStream`` (or, with ``method``, a call to another method taken as a stream) whose requests the
    test sends one at a time."""

    _END = object()

    def __init__(self, channel: grpc.Channel, method: str = "SegmentStream") -> None:
        self._requests: queue.Queue = queue.Queue()
        call = channel.stream_stream(f"/segsvc.v1.SegmentationService/{method}",
                                     request_serializer=pb.SegmentRequest.SerializeToString,
                                     response_deserializer=pb.SegmentResponse.FromString)
        self.call = call(self._sent(), timeout=DEADLINE_S, metadata=INFER)

    def _sent(self) -> Iterator[pb.SegmentRequest]:
        while (request := self._requests.get()) is not self._END:
            yield request

    def send(self, size: tuple[int, int], seed: int = 0) -> None:
        self._requests.put(pb.SegmentRequest(request_id=f"{size[0]}-{seed}", model="m",
                                             image=encode(make_image(*size, seed=seed))))

    def answer(self) -> pb.SegmentResponse:
        response = next(self.call)
        assert not response.HasField("error"), response.error
        return response

    def ended(self) -> tuple[grpc.StatusCode, str]:
        """Wait for the call to end with no further answer: its status and details."""
        with pytest.raises(grpc.RpcError) as ended:
            next(self.call)
        return ended.value.code(), ended.value.details()

    def finish(self) -> tuple[grpc.StatusCode, list[pb.SegmentResponse]]:
        """End the requests (the client's end of stream); the call's status and the answers still to come."""
        self._requests.put(self._END)
        rest = []
        try:
            rest = list(self.call)
        except grpc.RpcError:
            pass
        return self.call.code(), rest


def test_streams_that_send_nothing_are_ended_and_give_their_places_back(start_server, tmp_path):
    """The reported attack at a limit of two: two streams that never send a message hold both places; each is
    ended RESOURCE_EXHAUSTED naming --stream-idle-s, counted in the metrics, and inference is served again."""
    publish(tmp_path, "m", seed=2)
    server = start_server(tmp_path, limits=LimitsConfig(max_concurrent_rpcs=2, stream_idle_s=IDLE_S))
    with grpc.insecure_channel(server.address) as channel:
        idle = [Stream(channel) for _ in range(2)]
        wait_for(lambda: server.server.calls.in_flight == 2 or any(s.call.done() for s in idle))
        for stream in idle:
            code, details = stream.ended()  # without the idle limit: the client's deadline, DEADLINE_EXCEEDED
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and IDLE_ENDED in details, (code, details)
            assert stream.finish()[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        wait_for(lambda: server.server.calls.in_flight == 0)
        with server.client(timeout_s=DEADLINE_S) as c:
            assert c.segment(make_image(*FREE), model="m").mask.shape == FREE
    text = metrics_text(server)
    assert metric(text, "segsvc_requests_total", method="SegmentStream", model="-", code="RESOURCE_EXHAUSTED") == 2


def test_a_unary_call_that_sends_no_request_is_ended_too(start_server, tmp_path):
    """A Segment call opened without its request message held its place while it waited for it: the same
    attack with unary calls. It is ended after --stream-idle-s as well (counted as a refusal)."""
    publish(tmp_path, "m", seed=2)
    server = start_server(tmp_path, limits=LimitsConfig(max_concurrent_rpcs=2, stream_idle_s=IDLE_S))
    with grpc.insecure_channel(server.address) as channel:
        silent = Stream(channel, method="Segment")
        wait_for(lambda: server.server.calls.in_flight == 1 or silent.call.done())
        code, details = silent.ended()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and IDLE_ENDED in details and "Segment call" in details
        silent.finish()
    wait_for(lambda: server.server.calls.in_flight == 0)
    assert metric(metrics_text(server), "segsvc_requests_total", method="Segment", model="-",
                  code="RESOURCE_EXHAUSTED") == 1


def test_a_stream_waiting_for_answers_is_not_ended_and_one_idle_after_them_is(start_server, tmp_path, held):
    """A stream whose two images the model holds reads on (its third message) with nothing to read: the idle
    limit passes several times over and it keeps its places. Once both are answered, the read has nothing
    unanswered: the limit counts from that answer and ends the stream, its answers delivered first."""
    publish(tmp_path, "m", seed=2)
    server = start_server(tmp_path, limits=LimitsConfig(max_concurrent_rpcs=8, stream_idle_s=IDLE_S))
    with grpc.insecure_channel(server.address) as channel:
        busy = Stream(channel)
        for seed in range(2):
            busy.send(HELD, seed=seed)
        # the call's place, the second image's and the third read's: the read waits with two images unanswered
        wait_for(lambda: server.server.calls.in_flight == 3 and len(held.ran) >= 1)
        server.call(asyncio.sleep(5 * IDLE_S))  # five idle limits on the server's own clock
        assert server.server.calls.in_flight == 3 and not busy.call.done()
        held.gate.set()
        assert sorted(busy.answer().request_id for _ in range(2)) == ["24-0", "24-1"]
        code, details = busy.ended()  # nothing unanswered now: ended IDLE_S after the last answer
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and IDLE_ENDED in details, (code, details)
        busy.finish()
    wait_for(lambda: server.server.calls.in_flight == 0)


def test_management_has_places_of_its_own_when_inference_fills_the_limit(start_server, tmp_path, monkeypatch):
    """Two open streams (never ended: --stream-idle-s 0) fill a limit of two. Inference is refused, even with a
    manage token; LoadModel, UnloadModel, SetDefaultVersion and the Open Inference Protocol's repository load and
    unload are served from the reserve, which holds MANAGE_RESERVE calls: one more management call is refused."""
    from segsvc.inference.loader import VersionLoader

    publish(tmp_path, "m", seed=2)
    server = start_server(tmp_path, auth=AuthConfig.parse(TOKENS),
                          limits=LimitsConfig(max_concurrent_rpcs=2, stream_idle_s=0))
    admin = {"authorization": "Bearer admin-tok"}
    with grpc.insecure_channel(server.address) as channel:
        streams = [Stream(channel) for _ in range(2)]
        wait_for(lambda: server.server.calls.in_flight == 2)
        for token in ("infer-tok", "admin-tok"):
            with server.client(token=token, timeout_s=DEADLINE_S) as c, pytest.raises(errors.Overloaded) as refused:
                c.segment(make_image(*FREE), model="m")
            assert REFUSED in str(refused.value) and "management" not in str(refused.value)
        with server.client(token="admin-tok", timeout_s=DEADLINE_S) as c:
            assert c.unload_model("m") == [1]
            assert c.load_model("m").version == 1
            assert c.set_default_version("m", 1).version == 1
        oip = triton.InferenceServerClient(server.address)
        try:
            oip.unload_model("m", headers=admin)
            oip.load_model("m", headers=admin)
            assert oip.is_model_ready("m")
        finally:
            oip.close()

        # Fill the reserve with loads held in the model build; the next management call is refused.
        building, go = threading.Event(), threading.Event()
        build = VersionLoader._build_engine

        def held_build(self, name, version):  # type: ignore[no-untyped-def]
            building.set()
            assert go.wait(120), "the test never let the build go on"
            return build(self, name, version)

        monkeypatch.setattr(VersionLoader, "_build_engine", held_build)
        with server.client(token="admin-tok", timeout_s=DEADLINE_S) as c:
            assert c.unload_model("m") == [1]
            with ThreadPoolExecutor(MANAGE_RESERVE) as pool:
                try:
                    loads = [pool.submit(c.load_model, "m") for _ in range(MANAGE_RESERVE)]
                    wait_for(lambda: server.server.calls.in_flight == 2 + MANAGE_RESERVE and building.is_set()
                             or any(f.done() for f in loads))
                    assert not any(f.done() for f in loads)  # each holds a place of the reserve
                    with pytest.raises(errors.Overloaded) as full:
                        c.set_default_version("m", 1)
                    assert f"the {MANAGE_RESERVE} more kept for management calls" in str(full.value)
                finally:
                    go.set()
                assert [f.result(DEADLINE_S).version for f in loads] == [1] * MANAGE_RESERVE
        for stream in streams:  # never ended by the idle limit (0): they end with their client
            assert stream.finish() == (grpc.StatusCode.OK, [])
    wait_for(lambda: server.server.calls.in_flight == 0)


def test_the_idle_limit_is_checked_and_set_by_its_flag(serve_config) -> None:
    assert LimitsConfig().stream_idle_s == 60.0 and LimitsConfig(stream_idle_s=0).stream_idle_s == 0
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(errors.InvalidArgument, match="stream_idle_s must be a finite number of seconds >= 0"):
            LimitsConfig(stream_idle_s=bad)
    status, config = serve_config("--stream-idle-s", "2.5")
    assert status == 0 and config.limits.stream_idle_s == 2.5
    status, config = serve_config()
    assert status == 0 and config.limits.stream_idle_s == 60.0
    for bad in ("-1", "nan", "inf"):
        assert serve_config("--stream-idle-s", bad) == (2, None)


def test_the_help_names_the_reserve() -> None:
    from segsvc.cli import build_parser

    parser = build_parser()
    serve = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" serve"))
    help_text = " ".join(serve.format_help().split())
    assert f"may take {MANAGE_RESERVE} places more, which inference never takes" in help_text
    assert "--stream-idle-s" in help_text


def test_segment_many_sends_its_images_in_time(start_server, tmp_path):
    """The client's segment_many sends its images as it makes them: a stream of many images, answered one by
    one, never waits --stream-idle-s (here 10 s, a sixth of the default) with nothing unanswered."""
    publish(tmp_path, "m", seed=2)
    server = start_server(tmp_path, limits=LimitsConfig(stream_idle_s=10.0, max_stream_in_flight=2))
    with server.client(timeout_s=DEADLINE_S) as c:
        results = c.segment_many([make_image(*FREE, seed=i) for i in range(12)], model="m", progress=False)
    assert [r.mask.shape for r in results] == [FREE] * 12


def test_an_upload_that_stops_sending_is_ended_too(start_server, tmp_path):
    """UploadImages (a jobs token suffices) took a place and could keep it by sending one chunk and then nothing,
    the same attack with uploads (a reviewer's find after the streams were bounded). Each message must come within
    --stream-idle-s of the one before: the upload is ended RESOURCE_EXHAUSTED, aborted, and its place comes back."""
    from segsvc.jobs.batch import JobsConfig
    from segsvc.v1 import jobs_pb2

    publish(tmp_path / "repo", "m", seed=2)
    jobs = JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out")
    server = start_server(tmp_path / "repo", jobs=jobs, limits=LimitsConfig(max_concurrent_rpcs=2,
                                                                            stream_idle_s=IDLE_S))
    chunks: queue.Queue = queue.Queue()

    def sent() -> Iterator[jobs_pb2.UploadImagesRequest]:
        while (chunk := chunks.get()) is not None:
            yield chunk

    with grpc.insecure_channel(server.address) as channel:
        upload = channel.stream_unary("/segsvc.v1.JobService/UploadImages",
                                      request_serializer=jobs_pb2.UploadImagesRequest.SerializeToString,
                                      response_deserializer=jobs_pb2.UploadImagesResponse.FromString)
        call = upload.future(sent(), timeout=DEADLINE_S)
        chunks.put(jobs_pb2.UploadImagesRequest(name="a.png", data=encode(make_image(16, 16))[:20]))
        with pytest.raises(grpc.RpcError) as ended:
            call.result()
        chunks.put(None)
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ended.value.details()
    assert IDLE_ENDED in ended.value.details() and "UploadImages call" in ended.value.details()
    wait_for(lambda: server.server.calls.in_flight == 0)
    wait_for(lambda: server.server.jobs.staging.bytes_held() == (0, 0))  # aborted: nothing kept
