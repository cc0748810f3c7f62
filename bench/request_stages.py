"""Where one gRPC ``Segment`` call spends its time: per-stage timings, and a server profile.

A ``segsvc serve`` process runs with timing wrappers installed from here (the
server itself carries no timing code): each hop of a request stamps
``time.perf_counter_ns()`` (CLOCK_MONOTONIC on Linux, so the client's and the
server's stamps share one clock). One client sends ``--iters`` requests one
after another (concurrency 1) and the table shows the median of each stage,
next to the same work done in-process (decode, prepare, forward + arg-max on a
thread of its own, PNG encode: ``bench_server.InProcess``). ``--profile`` also
writes the server's cProfile summary (its event-loop thread: cumulative and
self time) to ``--profile-out`` (the stage timings are then inflated by the
profiler); ``--py-spy`` then samples every thread of the server with ``py-spy
record --native --idle`` at each ``--py-spy-concurrency`` and appends, per
thread, where its samples fall (idle waits included: a thread that is rarely
busy contends for nothing). Not part of the test suite.

    python bench/request_stages.py [--model bench|unet16] [--iters 40] [--profile] [--py-spy]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# first: bench_server sets the environment (OpenMP wait policy) before torch is imported
from bench.bench_server import (MODELS, configure_like_server, make_image, request_for,  # noqa: E402
                                save_model, start_server, stop_server, InProcess)

# (label, from stamp, to stamp): the stages in the order a request meets them
STAGES = [
    ("client send -> handler runs (transport, HTTP/2, unpack)", "send", "handler"),
    ("handler -> I/O thread starts (parse, lease, admission)", "handler", "prep0"),
    ("  decode PNG", "dec0", "dec1"),
    ("  prepare (resize, normalise, key, cost)", "dec1", "prep1"),
    ("I/O thread done -> loop resumes", "prep1", "prep_back"),
    ("loop resumes -> batcher.submit", "prep_back", "submit"),
    ("batcher queue (submit -> batch taken)", "submit", "take"),
    ("batch taken -> batch thread starts", "take", "run0"),
    ("  forward + arg-max (engine.run)", "run0", "run1"),
    ("batch thread done -> loop has set the results", "run1", "batch_done"),
    ("results set -> segment() returns", "batch_done", "seg_done"),
    ("segment() returns -> encode starts", "seg_done", "enc0"),
    ("  build response (PNG encode)", "enc0", "enc1"),
    ("encode done -> loop resumes", "enc1", "enc_back"),
    ("loop resumes -> handler returns", "enc_back", "handler_done"),
    ("handler returns -> client has response", "handler_done", "recv"),
]


# -- the traced server (runs in its own process) ------------------------------------------
def serve_traced(trace_out: Path, profile_out: Path | None, serve_args: list[str]) -> int:
    """Run ``segsvc serve`` with stage stamps around each hop; write the traces at exit."""
    import cProfile
    import pstats

    from segsvc.cli import main as cli_main
    from segsvc.inference import batcher as batcher_mod
    from segsvc.inference import service as service_mod
    from segsvc.server import convert
    from segsvc.server import servicer as servicer_mod

    now = time.perf_counter_ns
    current: dict[str, int] = {}
    traces: list[dict[str, int]] = []

    def stamp(name: str) -> None:
        current.setdefault(name, now())

    def around(owner, name: str, before: str, after: str) -> None:
        orig = getattr(owner, name)

        def wrapped(*args, **kwargs):
            stamp(before)
            try:
                return orig(*args, **kwargs)
            finally:
                stamp(after)
        setattr(owner, name, wrapped)

    S = servicer_mod.SegmentationServicer
    orig_segment_rpc = S.Segment

    async def Segment(self, request, context):  # noqa: N802
        current.clear()
        stamp("handler")
        try:
            return await orig_segment_rpc(self, request, context)
        finally:
            stamp("handler_done")
            traces.append(dict(current))
    S.Segment = Segment

    I = service_mod.InferenceService
    around(I, "_prepare", "prep0", "prep1")
    around(service_mod.EncodedImage, "load", "dec0", "dec1")
    orig_run_io, orig_segment = I.run_io, I.segment

    async def run_io(self, fn, *args):
        result = await orig_run_io(self, fn, *args)
        stamp("prep_back" if "prep_back" not in current else "enc_back")
        return result

    async def segment(self, *args, **kwargs):
        result = await orig_segment(self, *args, **kwargs)
        stamp("seg_done")
        return result
    I.run_io, I.segment = run_io, segment
    around(convert, "segment_response", "enc0", "enc1")

    B = batcher_mod.DynamicBatcher
    orig_submit, orig_execute, orig_start = B.submit, B._execute, B.start

    def submit(self, *args, **kwargs):
        stamp("submit")
        return orig_submit(self, *args, **kwargs)

    async def _execute(self, batch):
        stamp("take")
        return await orig_execute(self, batch)

    def start(self):
        predict = self._predict

        def timed(items):
            stamp("run0")
            try:
                return predict(items)
            finally:
                stamp("run1")
        self._predict = timed
        hook = self._on_batch

        def on_batch(size, run_s):
            stamp("batch_done")
            if hook is not None:
                hook(size, run_s)
        self._on_batch = on_batch
        orig_start(self)
    B.submit, B._execute, B.start = submit, _execute, start

    profiler = cProfile.Profile() if profile_out else None
    if profiler:
        profiler.enable()
    try:
        rc = cli_main(["serve", *serve_args])
    finally:
        if profiler:
            profiler.disable()
            with open(profile_out, "w") as f:
                for order in ("cumulative", "tottime"):
                    f.write(f"==== sorted by {order} ====\n")
                    pstats.Stats(profiler, stream=f).sort_stats(order).print_stats(45)
        trace_out.write_text(json.dumps(traces))
    return rc


# -- py-spy ---------------------------------------------------------------------------------
IDLE_LEAVES = ("epoll_wait", "futex", "pthread_cond", "sem_wait", "sem_timedwait", "poll (", "select", "nanosleep")


def py_spy(pid: int, address: str, request: object, concurrency: int, seconds: int, raw: Path) -> str:
    """Sample the server while ``concurrency`` clients send requests; a per-thread summary of the samples."""
    from bench.bench_server import throughput

    spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--rate", "100",
                            "--duration", str(seconds), "--native", "--idle", "--threads", "--format", "raw",
                            "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sent = 0
    while spy.poll() is None:
        sent += throughput(address, request, concurrency, 2 if concurrency > 1 else 10)[0]
    if spy.returncode != 0:
        return f"py-spy failed: {spy.stderr.read()[-500:]}\n"
    threads: collections.Counter = collections.Counter()
    leaves: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    states: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        name = re.sub(r"_\d+$", "_N", frames[0].split(": ", 1)[-1] or "?")
        python = [f for f in frames if re.search(r"\.py:\d+\)$", f)]
        where = python[-1] if python else "(no Python frame)"
        leaf = frames[-1]
        if any(k in leaf for k in IDLE_LEAVES):
            state = "idle"
        elif leaf.startswith("0x") and "(libc.so" in leaf:
            state = "wait"  # an unnamed libc frame under Python: a futex (work queue, lock or the GIL)
        else:
            state = "busy"
        threads[name] += int(count)
        states[name][state] += int(count)
        leaves[name][f"{state}  {where}  <{leaf[:50]}>"] += int(count)
    total = sum(threads.values())
    out = [f"py-spy record --native --idle, 100 Hz, {seconds} s, concurrency {concurrency}: {sent} requests, "
           f"{total} samples (py-spy pauses the server to sample: throughput is lower than unprofiled); "
           "busy = running native or Python code, wait = blocked in libc (work queue, lock or GIL), idle = poll/sleep"]
    for name, n in threads.most_common():
        share = ", ".join(f"{state} {100 * states[name][state] / n:.0f}%" for state in ("busy", "wait", "idle"))
        out.append(f"  [{name}] {n} samples: {share}")
        out += [f"    {100 * k / n:5.1f}%  {where}" for where, k in leaves[name].most_common(6)]
    return "\n".join(out) + "\n"


# -- the client ---------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("bench", "unet16"), default="bench")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--block", type=int, default=5, help="requests per block (gRPC and in-process alternate)")
    parser.add_argument("--profile", action="store_true", help="run the server under cProfile")
    parser.add_argument("--profile-out", type=Path, default=Path("/tmp/overhead_profile.txt"))
    parser.add_argument("--dump", type=Path, help="write every kept request's stamps and the in-process stages (JSON)")
    parser.add_argument("--py-spy", action="store_true", help="after the timings, sample the server with py-spy")
    parser.add_argument("--py-spy-concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--py-spy-seconds", type=int, default=10)
    parser.add_argument("--serve-traced", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--trace-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_traced is not None:
        sys.exit(serve_traced(args.trace_out, args.profile_to, args.serve_traced))

    import grpc
    import torch

    from segsvc.v1 import segmentation_pb2_grpc as pb_grpc

    model = MODELS[args.model]
    threads = len(os.sched_getaffinity(0))
    configure_like_server(threads)
    image = make_image(*model.size)
    with tempfile.TemporaryDirectory() as tmp:
        repo, trace_out = Path(tmp) / "repo", Path(tmp) / "trace.json"
        save_model(model, repo)
        wrapper = [sys.executable, str(Path(__file__).resolve()), "--trace-out", str(trace_out)]
        if args.profile:
            wrapper += ["--profile-to", str(args.profile_out)]
        proc, address = start_server(repo, threads, batching=True, launcher=[*wrapper, "--serve-traced"])
        local = InProcess(repo, model.name)
        calls: list[tuple[int, int, bool]] = []  # (send, recv, kept) of every Segment call
        stage_local: dict[str, list[float]] = {k: [] for k in ("decode", "prepare", "run", "encode")}
        try:
            request = request_for(image, model.name)
            with grpc.insecure_channel(address) as channel:
                stub = pb_grpc.SegmentationServiceStub(channel)
                for _ in range(3):
                    local.once(image)
                kept = 0
                while kept < args.iters:  # alternating blocks; the first call of each block is dropped
                    for i in range(args.block + 1):
                        send = time.perf_counter_ns()
                        stub.Segment(request, timeout=120)
                        calls.append((send, time.perf_counter_ns(), i > 0))
                    kept += args.block
                    for i in range(args.block + 1):
                        stages = local.once(image, stages=True)
                        for k, v in stages.items():
                            if i:
                                stage_local[k].append(v)
            spied = [py_spy(proc.pid, address, request, c, args.py_spy_seconds, Path(tmp) / f"spy{c}.txt")
                     for c in (args.py_spy_concurrency if args.py_spy else ())]
        finally:
            stop_server(proc)
        every = json.loads(trace_out.read_text())[: len(calls)]  # the py-spy phase comes after (untimed)
    traces = []
    for t, (send, recv, keep) in zip(every, calls):
        if keep:
            t["send"], t["recv"] = send, recv
            traces.append(t)

    if args.dump:
        args.dump.write_text(json.dumps({"server": traces, "in_process": stage_local}))

    def med(a: str, b: str) -> float:
        vals = [(t[b] - t[a]) / 1e6 for t in traces if a in t and b in t]
        return statistics.median(vals) if vals else float("nan")

    load = os.getloadavg()
    print(f"model {args.model} ({model.spec.arch} {dict(model.spec.params)}), image {model.size[0]}x{model.size[1]} "
          f"PNG, {threads} torch threads, torch {torch.__version__}, OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"\nstage (median of {len(traces)} sequential requests, blocks of {args.block})      ms")
    for label, a, b in STAGES:
        print(f"  {label:<58s} {med(a, b):7.2f}")
    work = [("dec0", "dec1"), ("dec1", "prep1"), ("run0", "run1"), ("enc0", "enc1")]
    overhead = statistics.median(
        (t["recv"] - t["send"] - sum(t[b] - t[a] for a, b in work)) / 1e6 for t in traces)
    print(f"  {'client round trip':<58s} {med('send', 'recv'):7.2f}")
    print(f"  {'  of which in the handler':<58s} {med('handler', 'handler_done'):7.2f}")
    print(f"  {'  overhead: round trip - decode, prepare, run, encode':<58s} {overhead:7.2f}")
    ref = {k: statistics.median(v) * 1e3 for k, v in stage_local.items()}
    print(f"\nin-process, server's thread layout (median): decode {ref['decode']:.2f}, prepare {ref['prepare']:.2f},"
          f" run {ref['run']:.2f}, encode {ref['encode']:.2f}, total {sum(ref.values()):.2f} ms")
    if args.profile:
        print(f"server cProfile (event-loop thread) written to {args.profile_out}; stage timings above are "
              "inflated by it")
    if spied:
        with open(args.profile_out, "a" if args.profile else "w") as f:
            f.write("\n".join(spied))
        print(f"py-spy summaries {'appended' if args.profile else 'written'} to {args.profile_out}")


if __name__ == "__main__":
    main()
