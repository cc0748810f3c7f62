"""CPU batch budgets: server throughput and latency under each, side by side in one run.

On a CPU, ``segsvc serve --max-batch-mb auto`` ends a batch at 256 MiB of estimated
forward-pass memory, from the bytes per pixel each model measures at load: the bench
model's 512x512 images (about 31 MiB each) run eight to a batch, U-Net 16's 360x480
ones (about 92 MiB) two, and the FCN-8s's (180x240 at its contract's scale, 10 MiB)
eight. Before, a budget of 0.5 megapixels ran the first two two to a batch alike. This bench
serves each model from four ``segsvc serve`` processes at once: the memory budget, the
old pixel budget, no budget at all (memory is still bounded by ``--max-inflight-mb``,
which every request holds while it is queued and run), and no batching. It times them in
rotating rounds at each concurrency, with the steady-window clients of
``bench_server.py``, and prints images/s, p50 and p99 latency and the mean batch size,
with each server's ratio over the one that does not batch. The load average is printed
with the figures.

    python bench/bench_batch_budget.py [--models bench unet16 fcn8s] [--concurrency 4 16] [--window 3] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_server import (MODELS, load, make_image, on_off, request_for, save_model,  # noqa: E402
                                start_server, stop_server)

SERVERS = {  # label -> segsvc serve flags
    "256 MiB (auto)": (),
    "0.5 MP": ("--max-batch-mb", "0", "--max-batch-pixels", str(1 << 19)),
    "no budget": ("--max-batch-mb", "0", "--max-batch-pixels", "0"),
    "no batching": ("--no-batching",),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--window", type=float, default=3.0, help="seconds counted per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per server, in rotating order")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    print(f"{args.threads} torch threads per server, {args.rounds} rounds of {args.window} s each; {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = MODELS[name]
            repo = Path(tmp) / name
            save_model(model, repo)
            request = request_for(make_image(*model.size), name)
            servers = {label: start_server(repo, args.threads, True, flags=flags) for label, flags in SERVERS.items()}
            try:
                print(f"\n== {name}: {model.spec.arch} {dict(model.spec.params)}, {model.size[0]}x{model.size[1]} "
                      f"at scale {model.scale} ({load()})")
                print(f"{'concurrency':>11} {'server':>16} {'img/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'batch':>6} "
                      f"{'/ no batching':>14}")
                for concurrency in args.concurrency:
                    rows = on_off({label: address for label, (_, address) in servers.items()}, request,
                                  concurrency, args.window, args.rounds)
                    base = rows["no batching"][0]
                    for label, (ips, p50, p99, batch) in rows.items():
                        print(f"{concurrency:>11} {label:>16} {ips:>7.1f} {p50 * 1e3:>7.0f} {p99 * 1e3:>7.0f} "
                              f"{batch:>6.2f} {ips / base:>13.2f}x", flush=True)
                print(f"({load()})")
            finally:
                for proc, _ in servers.values():
                    stop_server(proc)


if __name__ == "__main__":
    main()
