"""A stream's places under ``--max-concurrent-rpcs``: one for the call, plus one per image beyond the first it holds.

A ``SegmentStream`` held no place for the call itself and took one before every read, waiting for it. So idle
open streams (each waiting to read its next message) filled the limit and a new stream waited in that queue
until its deadline (DEADLINE_EXCEEDED, where a unary call was refused at once), and a stream whose answers had
all arrived could lose the race for the place it needed to read its client's end of stream, ending
DEADLINE_EXCEEDED too. Now a stream takes its place as a unary call does (refused at once at the limit), that
place covers the message it reads when it has nothing unanswered, and only reads past unanswered messages wait.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from types import SimpleNamespace
from typing import Iterator

import grpc
import pytest

from segsvc import errors
from segsvc.inference.engine import Engine
from segsvc.server.app import CallLimit, _StreamPlaces
from segsvc.server.config import LimitsConfig
from segsvc.v1 import segmentation_pb2 as pb
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc
from tests.server.conftest import encode, make_image, publish, wait_for

DEADLINE_S = 60.0  # only a failing test waits this long
REFUSED = "a SegmentStream counts as one call, plus one for each image beyond the first it holds"
HELD = (24, 24)  # the size of the images ``held`` keeps in the engine until the test lets them go
FREE = (20, 20)  # the size of the images it lets through


class OpenStream:
    """A ``SegmentStream`` whose requests the test sends one at a time and whose answers it reads one at a time."""

    _END = object()

    def __init__(self, channel: grpc.Channel, model: str) -> None:
        self._model = model
        self._requests: queue.Queue = queue.Queue()
        self._call = pb_grpc.SegmentationServiceStub(channel).SegmentStream(self._sent(), timeout=DEADLINE_S)

    def _sent(self) -> Iterator[pb.SegmentRequest]:
        while (request := self._requests.get()) is not self._END:
            yield request

    def send(self, size: tuple[int, int], seed: int = 0) -> None:
        image = encode(make_image(*size, seed=seed))
        self._requests.put(pb.SegmentRequest(request_id=f"{size[0]}-{seed}", model=self._model, image=image))

    def answer(self) -> pb.SegmentResponse:
        """The next answer (raises the call's ``RpcError`` if the call ended without one)."""
        response = next(self._call)
        assert not response.HasField("error"), response.error
        return response

    def finish(self) -> tuple[grpc.StatusCode, list[pb.SegmentResponse]]:
        """End the requests (the client's end of stream); the call's status and the answers still to come."""
        self._requests.put(self._END)
        rest = []
        try:
            rest = list(self._call)
        except grpc.RpcError:
            pass
        return self._call.code(), rest

    def refusal(self) -> tuple[grpc.StatusCode, str]:
        """The call's status and details when it ends before its first answer (``OK`` when an answer comes)."""
        try:
            next(self._call)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
        return grpc.StatusCode.OK, ""


@pytest.fixture
def held(monkeypatch):
    """Engine.run keeps batches of ``HELD``-sized images until ``gate`` opens; others run at once."""
    state = SimpleNamespace(gate=threading.Event(), ran=[])
    original = Engine.run

    def run(self, jobs):  # type: ignore[no-untyped-def]
        sizes = [tuple(j.size) for j in jobs]
        state.ran.append(sizes)
        if HELD in sizes:
            state.gate.wait(300)  # the test opens it (teardown too)
        return original(self, jobs)

    monkeypatch.setattr(Engine, "run", run)
    yield state
    state.gate.set()


def test_idle_streams_at_the_limit_leave_a_new_stream_refused_at_once(start_server, tmp_path):
    """Two idle streams (each answered, waiting for its next image) at a limit of two: a third is refused
    RESOURCE_EXHAUSTED before its request is read, like a unary call, instead of waiting until its deadline."""
    publish(tmp_path, "m", seed=2)
    server = start_server(tmp_path, limits=LimitsConfig(max_concurrent_rpcs=2))
    with grpc.insecure_channel(server.address) as channel:
        idle = [OpenStream(channel, "m") for _ in range(2)]
        for stream in idle:
            stream.send(FREE)
            assert stream.answer().labels.height == FREE[0]
        wait_for(lambda: server.server.calls.in_flight == 2)
        late = OpenStream(channel, "m")
        late.send(FREE)
        code, details = late.refusal()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and REFUSED in details
        late.finish()
        with server.client(timeout_s=DEADLINE_S) as c, pytest.raises(errors.Overloaded, match="counts as one call"):
            c.segment(make_image(*FREE), model="m")
        for stream in idle:  # the idle streams end normally: their end of stream is read on their own place
            assert stream.finish() == (grpc.StatusCode.OK, [])
    wait_for(lambda: server.server.calls.in_flight == 0)


def test_an_idle_stream_at_the_limit_still_reads_its_end_of_stream(start_server, tmp_path, held):
    """Stream A is open; stream B then waits for a place for its third image (back-pressure) while the server
    is at its limit. A's image is answered: the place its read had went to B's earlier wait, so A could not read
    its client's end of stream and ended DEADLINE_EXCEEDED with every answer delivered. Now A's own place
    covers that read."""
    publish(tmp_path, "a", seed=2)
    publish(tmp_path, "b", seed=3)
    server = start_server(tmp_path, limits=LimitsConfig(max_concurrent_rpcs=3))
    with grpc.insecure_channel(server.address) as channel:
        a = OpenStream(channel, "a")
        wait_for(lambda: server.server.calls.in_flight == 1)
        b = OpenStream(channel, "b")
        for seed in range(3):
            b.send(HELD, seed=seed)
        wait_for(lambda: server.server.calls.in_flight == 3 and len(held.ran) >= 1)  # b's third read waits
        a.send(FREE)
        assert a.answer().labels.height == FREE[0]
        assert a.finish() == (grpc.StatusCode.OK, [])
        held.gate.set()
        code, answers = b.finish()
        assert code == grpc.StatusCode.OK and sorted(r.request_id for r in answers) == ["24-0", "24-1", "24-2"]
    wait_for(lambda: server.server.calls.in_flight == 0)


def test_a_stream_waits_for_a_place_for_its_second_image_where_a_new_call_is_refused(start_server, tmp_path,
                                                                                     held):
    """At a limit of two, a stream holding one image and reading its second fills the server: its third read
    waits for a place (back-pressure, never a refusal) and goes on as its images are answered, while a new
    stream and a unary call are refused at once."""
    publish(tmp_path, "m", seed=2)
    server = start_server(tmp_path, limits=LimitsConfig(max_concurrent_rpcs=2))
    with grpc.insecure_channel(server.address) as channel:
        busy = OpenStream(channel, "m")
        for seed in range(3):
            busy.send(HELD, seed=seed)
        wait_for(lambda: server.server.calls.in_flight == 2 and len(held.ran) >= 1)
        late = OpenStream(channel, "m")
        late.send(FREE)
        assert late.refusal()[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        late.finish()
        with server.client(timeout_s=DEADLINE_S) as c, pytest.raises(errors.Overloaded) as refused:
            c.segment(make_image(*FREE), model="m")
        assert REFUSED in str(refused.value)
        held.gate.set()
        code, answers = busy.finish()
        assert code == grpc.StatusCode.OK and sorted(r.request_id for r in answers) == ["24-0", "24-1", "24-2"]
    wait_for(lambda: server.server.calls.in_flight == 0)


def test_a_stream_holds_no_more_places_than_its_window(start_server, tmp_path, held):
    """With --max-stream-in-flight 2 a stream holds at most 2 places: it read its next image before waiting for
    a window slot, so it held window + 1, and two default streams (2 x 17) could fill the default limit of 32."""
    publish(tmp_path, "m", seed=2)
    server = start_server(tmp_path, limits=LimitsConfig(max_concurrent_rpcs=8, max_stream_in_flight=2))
    with grpc.insecure_channel(server.address) as channel:
        busy = OpenStream(channel, "m")
        for seed in range(4):
            busy.send(HELD, seed=seed)
        wait_for(lambda: len(held.ran) >= 1 and server.server.calls.in_flight >= 2)
        # Its window is full (the model holds its images): a third read would take a third place. That it never
        # comes can only be watched for a while; a slow host can only make the old behaviour pass, never the new fail.
        with pytest.raises(AssertionError, match="not reached"):
            wait_for(lambda: server.server.calls.in_flight > 2, timeout_s=3.0)
        held.gate.set()
        code, answers = busy.finish()
        assert code == grpc.StatusCode.OK and len(answers) == 4
    wait_for(lambda: server.server.calls.in_flight == 0)


def test_a_streams_places_are_one_plus_its_images_beyond_the_first() -> None:
    """Held places = max(1, unanswered + 1 while a read is pending), step by step; answers never give back the
    call's own place, and an answer that covers a waiting read lets it go on without another place."""
    calls = CallLimit(3)

    async def script() -> list[int]:
        seen: list[int] = []
        requests: asyncio.Queue = asyncio.Queue()

        async def source():  # type: ignore[no-untyped-def]
            while (item := await requests.get()) is not None:
                yield item

        taking = asyncio.Event()  # set as a read asks the limit for a place
        take = calls.take

        async def watched_take(wanted):  # type: ignore[no-untyped-def]
            taking.set()
            return await take(wanted)

        calls.take = watched_take  # type: ignore[method-assign]
        async with calls._place(None, "SegmentStream"):  # type: ignore[arg-type]  # the call's own place
            places = _StreamPlaces(calls)
            reader = places.read(source())
            seen.append(calls.in_flight)  # open, idle: 1
            for item in range(3):
                await requests.put(item)
                assert await reader.__anext__() == item
                seen.append(calls.in_flight)  # 1 held (on the call's place), then 2, then 3
            taking.clear()
            fourth = asyncio.ensure_future(reader.__anext__())  # a read past 3 unanswered: the limit, it waits
            await requests.put(3)
            await taking.wait()  # the read has started and asked for a place
            for _ in range(10):  # let it run on, were it not to wait
                await asyncio.sleep(0)
            assert not fourth.done() and requests.qsize() == 1  # waiting for a place, its message not read
            places.answered()  # 2 unanswered + the read: covered by the 3 places held
            assert await fourth == 3
            seen.append(calls.in_flight)
            for _ in range(3):
                places.answered()
                seen.append(calls.in_flight)  # 2 unanswered: 2, then 1, then 0: still the call's own
            places.answered()  # nothing unanswered: nothing to give back
            seen.append(calls.in_flight)
            end = asyncio.ensure_future(reader.__anext__())
            await requests.put(None)  # the end of the stream, read on the call's own place
            with pytest.raises(StopAsyncIteration):
                await end
            seen.append(calls.in_flight)
            places.close()
        seen.append(calls.in_flight)
        return seen

    assert asyncio.run(asyncio.wait_for(script(), DEADLINE_S)) == [1, 1, 2, 3, 3, 2, 1, 1, 1, 1, 0]  # a wait: a hang


def test_the_default_stream_window_is_below_the_limit(serve_config) -> None:
    """One stream's window (--max-stream-in-flight) equal to the limit let a single segment_many take every
    place, and interactive calls were refused meanwhile: the default is half the default limit."""
    limits = LimitsConfig()
    assert limits.max_stream_in_flight == limits.max_concurrent_rpcs // 2 == 16
    status, config = serve_config()
    assert status == 0 and config.limits.max_stream_in_flight == 16 and config.limits.max_concurrent_rpcs == 32
