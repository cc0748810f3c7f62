"""segsvc serve with one malloc arena (``configure_allocator``) against glibc's per-thread arenas.

Run: .venv/bin/python bench/bench_allocator.py [--models unet16 bench fcn8s] [--blocks 10] [--block 3]

Two ``segsvc serve`` processes serve the same model (``bench_server.MODELS``):
one as shipped, where every thread allocates from the main heap that keeps its
freed blocks, and one started with ``MALLOC_ARENA_MAX`` set to glibc's own
default (8 per CPU), which ``configure_allocator`` leaves alone: each thread
then gets an arena of its own, made of 64 MiB heaps that glibc shrinks and
unmaps as they empty. One client sends ``Segment`` calls at concurrency 1 in
alternating blocks. Printed per model: the median latency of each, their
per-block ratio (median), and the server's minor page faults per request (from
``/proc/PID/stat``): pages it had to map and zero again. Linux and glibc only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_server import (MODELS, load, make_image, request_for, save_model,  # noqa: E402
                                start_server, stop_server)
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc  # noqa: E402

KINDS = ("one arena", "per-thread arenas")


def minor_faults(pid: int) -> int:
    """The process's minor page faults so far (field 10 of /proc/PID/stat)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def bench_model(name: str, args: argparse.Namespace) -> None:
    model = MODELS[name]
    arenas = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    envs = {KINDS[0]: arenas, KINDS[1]: {**arenas, "MALLOC_ARENA_MAX": str(8 * (os.cpu_count() or 1))}}
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, Path(tmp))
        request = request_for(make_image(*model.size), name)
        servers = {k: start_server(Path(tmp), args.threads, True, env=env) for k, env in envs.items()}
        channels = {k: grpc.insecure_channel(address) for k, (_, address) in servers.items()}
        try:
            stubs = {k: pb_grpc.SegmentationServiceStub(channel) for k, channel in channels.items()}
            for stub in stubs.values():  # warm-up: allocator, kernels, connection
                for _ in range(3):
                    stub.Segment(request, timeout=300)
            latency: dict[str, list[float]] = {k: [] for k in KINDS}
            faults: dict[str, list[float]] = {k: [] for k in KINDS}
            for b in range(args.blocks):
                for k in (KINDS if b % 2 == 0 else KINDS[::-1]):
                    pid = servers[k][0].pid
                    before, times = minor_faults(pid), []
                    for _ in range(args.block):
                        t0 = time.perf_counter()
                        stubs[k].Segment(request, timeout=300)
                        times.append(time.perf_counter() - t0)
                    latency[k].append(statistics.median(times))
                    faults[k].append((minor_faults(pid) - before) / args.block)
        finally:
            for channel in channels.values():
                channel.close()
            for proc, _ in servers.values():
                stop_server(proc)
    ratio = statistics.median(p / o for p, o in zip(latency[KINDS[1]], latency[KINDS[0]]))
    print(f"{name:8s} {model.size[0]}x{model.size[1]}", end="")
    for k in KINDS:
        print(f"   {k}: {statistics.median(latency[k]) * 1e3:6.1f} ms, {statistics.median(faults[k]):8.0f} faults",
              end="")
    print(f"   per-thread / one: {ratio:.3f}   ({load()})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["unet16", "bench", "fcn8s"])
    parser.add_argument("--blocks", type=int, default=10, help="blocks of requests per server (alternating)")
    parser.add_argument("--block", type=int, default=3, help="requests per block")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    print(f"segsvc serve at concurrency 1, median latency and the server's minor page faults per request "
          f"({args.threads} torch threads, {load()})")
    for name in args.models:
        bench_model(name, args)


if __name__ == "__main__":
    main()
