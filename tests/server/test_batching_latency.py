"""The batching delay is paid only when another image is on its way (issue #8: fixed per-request cost).

Each server here batches with a 120 s ``max_delay_s`` and every call has a 60 s
deadline (half the delay, and more than a loaded machine takes to answer), so a
request that waited out the delay fails instead of being slow: the tests check
behaviour, not timings, and stay reliable on a loaded machine.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from segsvc.errors import InvalidImage
from segsvc.inference.batcher import BatchingConfig
from tests.server.conftest import assert_labels_match, encode, make_image, publish, reference

LONG_DELAY = BatchingConfig(max_batch_size=8, max_delay_s=120.0, max_queue_size=64)
TIMEOUT_S = 60.0


def corrupt_png(seed: int) -> bytes:
    """A PNG whose header is valid (it passes the size checks) but whose pixels do not decode."""
    data = bytearray(encode(make_image(48, 64, seed=seed)))
    start = data.index(b"IDAT") + 6
    data[start : start + 32] = b"\xab" * 32
    return bytes(data)


@pytest.fixture
def served(start_server, tmp_path):
    ref = reference(publish(tmp_path, "m", seed=5))
    return start_server(tmp_path, batching=LONG_DELAY), ref


def test_a_lone_request_does_not_wait_for_the_batching_delay(served):
    server, ref = served
    image = make_image(48, 64, seed=1)
    with server.client() as c:
        for _ in range(3):  # one after another: each is alone on an idle model
            result = c.segment(encode(image), model="m", timeout_s=TIMEOUT_S)
            assert_labels_match(result.mask, ref, image)
            assert result.timings.batch_size == 1 and result.timings.queue_ms < TIMEOUT_S * 1e3


def test_a_request_that_fails_to_decode_leaves_no_announced_image_behind(served):
    server, ref = served
    batcher = server.manager.resolve("m", None).batcher
    image = make_image(48, 64, seed=2)
    with server.client() as c:
        with pytest.raises(InvalidImage):
            c.segment(corrupt_png(3), model="m", timeout_s=TIMEOUT_S)
        assert batcher.incoming_count == 0
        result = c.segment(encode(image), model="m", timeout_s=TIMEOUT_S)  # would wait 120 s for a ghost
    assert_labels_match(result.mask, ref, image)


def test_requests_in_flight_together_finish_without_waiting_out_the_delay(served):
    server, ref = served
    images = [make_image(48, 64, seed=10 + i) for i in range(6)]
    payloads = [corrupt_png(20) if i == 3 else encode(im) for i, im in enumerate(images)]

    def one(i: int):
        with server.client() as c:
            try:
                return c.segment(payloads[i], model="m", timeout_s=TIMEOUT_S)
            except InvalidImage as exc:
                return exc

    with ThreadPoolExecutor(len(images)) as pool:
        results = list(pool.map(one, range(len(images))))
    assert isinstance(results[3], InvalidImage)
    for i, (image, result) in enumerate(zip(images, results)):
        if i != 3:
            assert_labels_match(result.mask, ref, image)
    assert server.manager.resolve("m", None).batcher.incoming_count == 0
