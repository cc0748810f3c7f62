"""A bounded mutation fuzz of serialized requests against a real `segsvc serve` process.

Valid requests (encoded images of every format, raw tensors, tiling, flip TTA,
streams, model management) are serialized and mutated byte by byte: flips,
insertions, deletions, truncations, and targeted corruption of the embedded
image (PNG chunk lengths, JPEG markers). Every answer must be OK or a
documented client error, never UNKNOWN or INTERNAL; the server must stay up;
and its peak resident memory (VmHWM) must stay under ``PEAK_RSS_MB``.
Deterministic (fixed seed), bounded in count and time.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from segsvc.v1 import segmentation_pb2 as pb
from tests.server.conftest import encode, make_image, publish

ROOT = Path(__file__).resolve().parents[2]
CASES = 1500
PEAK_RSS_MB = 1536  # stated bound: torch + the model + a 512 MiB serving budget, with room to spare
ALLOWED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION,
}
METHODS = {
    "/segsvc.v1.SegmentationService/Segment": pb.SegmentRequest,
    "/segsvc.v1.SegmentationService/GetModel": pb.GetModelRequest,
    "/segsvc.v1.SegmentationService/ListModels": pb.ListModelsRequest,
}


def _png_idat_bomb() -> bytes:
    """A valid 24x24 PNG whose IDAT chunk length is patched to 0xFFFFFFFF (the probe's 261-byte bomb)."""
    png = encode(make_image(24, 24))
    at = png.index(b"IDAT") - 4
    return png[:at] + struct.pack(">I", 0xFFFFFFFF) + png[at + 4:]


def _zlib_bomb_png(side: int) -> bytes:
    """A PNG declaring side x side whose IDAT inflates to far more than that."""
    raw = zlib.compress(b"\0" * (50 << 20), 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _seeds() -> list[tuple[str, bytes]]:
    image = make_image(40, 56, seed=1)
    segment = "/segsvc.v1.SegmentationService/Segment"
    requests = [
        pb.SegmentRequest(model="m", image=encode(image, ext)) for ext in (".png", ".jpg", ".bmp", ".tif", ".webp")
    ] + [
        pb.SegmentRequest(model="m", raw=pb.RawImage(data=image.tobytes(), shape=list(image.shape))),
        pb.SegmentRequest(model="m", image=encode(image), options=pb.SegmentOptions(
            encoding=pb.OUTPUT_ENCODING_OVERLAY_PNG, return_confidence=True, return_class_counts=True,
            flip_tta=True, tiling=pb.TilingOptions(tile_size=16, overlap=0.5))),
        pb.SegmentRequest(model="m", request_id="r\u00e9q", image=_png_idat_bomb()),
        pb.SegmentRequest(model="m", image=_zlib_bomb_png(1024)),
        pb.SegmentRequest(model="m", raw=pb.RawImage(data=b"\0" * 262144 * 3, shape=[1, 262144, 3])),
    ]
    seeds = [(segment, r.SerializeToString()) for r in requests]
    seeds += [("/segsvc.v1.SegmentationService/GetModel", pb.GetModelRequest(model="m").SerializeToString()),
              ("/segsvc.v1.SegmentationService/ListModels", b"")]
    return seeds


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 16))):
        op = rng.random()
        at = rng.randrange(len(buf) + 1)
        if op < 0.4 and buf:
            buf[min(at, len(buf) - 1)] = rng.randrange(256)
        elif op < 0.55:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 4, 64))))
        elif op < 0.7 and buf:
            del buf[at:at + rng.choice((1, 8, 256))]
        elif op < 0.8:
            buf = buf[:at]
        elif op < 0.9 and len(buf) >= 4:  # a length-like field set to something huge
            at = min(at, len(buf) - 4)
            buf[at:at + 4] = struct.pack(">I", rng.choice((0xFFFFFFFF, 0x7FFFFFFF, 1 << 24)))
        else:
            buf[at:at] = b"\x0a\xff\xff\xff\xff\x0f"  # a varint length far past the end
    return bytes(buf)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to read the peak RSS")
def test_mutated_requests_get_documented_statuses_and_memory_stays_bounded(tmp_path):
    publish(tmp_path / "repo", "m", seed=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "segsvc", "serve", "--model-repo", str(tmp_path / "repo"), "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "-1", "--no-warmup", "--torch-threads", "1", "--io-threads", "2",
         "--max-pixels", "4000000", "--max-inflight-mb", "512", "--grace-s", "0", "--log-level", "ERROR"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=open(tmp_path / "server.log", "w"), text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "serving on" in line, (tmp_path / "server.log").read_text()
        address = line.split("serving on ")[1].split(",")[0].strip()
        rng = random.Random(0)
        seeds = _seeds()
        cases = [(m, d) for m, d in seeds] + [
            (m, _mutate(rng, d)) for m, d in (rng.choice(seeds) for _ in range(CASES - len(seeds)))]
        codes: dict[grpc.StatusCode, int] = {}
        bad: list[tuple[str, str, str]] = []
        with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            calls = {m: channel.unary_unary(m, request_serializer=None, response_deserializer=None) for m in METHODS}

            def one(case: tuple[str, bytes]) -> None:
                method, payload = case
                try:
                    calls[method](payload, timeout=30)
                    code, details = grpc.StatusCode.OK, ""
                except grpc.RpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                codes[code] = codes.get(code, 0) + 1
                if code not in ALLOWED or "Traceback" in details or "/" + str(tmp_path).strip("/") in details:
                    bad.append((method, code.name, details[:200]))

            t0 = time.monotonic()
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(one, cases))
            elapsed = time.monotonic() - t0
        assert proc.poll() is None, "the server died under the fuzz"
        peak = _peak_rss_mb(proc.pid)
        print(f"\nfuzz: {len(cases)} requests in {elapsed:.1f} s, codes {({k.name: v for k, v in codes.items()})}, "
              f"server peak RSS {peak:.0f} MiB")
        assert not bad, bad[:10]
        assert codes.get(grpc.StatusCode.OK, 0) >= 5 and codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) >= 100
        assert peak < PEAK_RSS_MB, f"peak RSS {peak:.0f} MiB over the stated bound of {PEAK_RSS_MB} MiB"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
