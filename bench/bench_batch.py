"""Offline batch throughput: ``run_batch(engine="local")`` against the naive loop, in one run.

The naive loop is what a user would write first: for each file, read, decode,
``Predictor.predict``, encode the label PNG, write it. The local engine does the
same work (and more: the job store, results.jsonl, summary.json and chart)
with decode and write threads around batched forward passes (at most ``--batch-size`` images, and on
CPU at most ``CPU_BATCH_PIXELS`` input pixels, per pass; on CPU one single-threaded pass per torch thread
at once, ``forward_streams``). Both use the same
synthetic images (shapes on textured backgrounds) and the same small U-Net
(random weights, BatchNorm calibrated on noise so its label maps vary).
Goal: ratio local / naive >= 1.0. The load average is printed because the
figures only compare within one run on a shared machine. Not part of the test suite.

    python bench/bench_batch.py [--count 200] [--size 256] [--batch-size 8] [--threads 0] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# On a shared, oversubscribed machine OpenMP's default spin-waiting makes every forward pass
# wait on descheduled spinning threads (measured: a single-image loop 7-10x slower), so the
# figures would measure the scheduler, not the code. Passive waiting keeps both paths honest;
# set OMP_WAIT_POLICY=ACTIVE to measure the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from segsvc.config import ModelSpec  # noqa: E402
from segsvc.data.io import write_png  # noqa: E402
from segsvc.data.synthetic import SyntheticConfig, generate_sample  # noqa: E402
from segsvc.inference.codec import decode_image, encode_png  # noqa: E402
from segsvc.inference.predictor import Predictor  # noqa: E402
from segsvc.jobs.offline import CPU_BATCH_PIXELS, run_batch  # noqa: E402
from segsvc.models.artifact import load_artifact, save_artifact  # noqa: E402
from segsvc.models.registry import build_model  # noqa: E402

SPEC = ModelSpec("unet", 5, params={"base_channels": 8, "depth": 3})


def publish_model(repo: Path) -> Path:
    """A U-Net with BatchNorm statistics from noise: untrained, but its outputs vary per pixel."""
    torch.manual_seed(0)
    model = build_model(SPEC)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 64))
    return save_artifact(model.eval(), repo, "bench", spec=SPEC, class_names=[f"c{i}" for i in range(5)])


def write_images(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir(parents=True)
    config = SyntheticConfig(size_hw=(size, size))
    paths = []
    for i in range(count):
        image, _ = generate_sample(0, i, config)
        paths.append(folder / f"{i:05d}.png")
        write_png(paths[-1], image)
    return paths


def naive(paths: list[Path], version_dir: Path, out: Path) -> float:
    """Seconds for the one-file-at-a-time loop."""
    model, manifest = load_artifact(version_dir)
    predictor = Predictor(model, manifest)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    for path in paths:
        labels = predictor.predict(decode_image(path.read_bytes()))
        (out / f"{path.name}.png").write_bytes(encode_png(labels))
    return time.perf_counter() - t0


def local(folder: Path, repo: Path, out: Path, batch_size: int, threads: int) -> float:
    t0 = time.perf_counter()
    summary = run_batch([str(folder)], model_repo=repo, model="bench", out=out, device="cpu",
                        batch_size=batch_size, io_threads=threads)
    elapsed = time.perf_counter() - t0
    assert summary["counts"]["done"] == summary["counts"]["total"], summary["counts"]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="local engine I/O threads (0: default)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds, each running both (in alternating order); the best of each is kept")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']}, "
          f"CPUs {os.cpu_count()}, load average before "
          f"{os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        version_dir = publish_model(work / "repo")
        paths = write_images(work / "images", args.count, args.size)
        best_naive = best_local = float("inf")
        ratios = []
        for r in range(args.rounds):  # alternate which runs first, so a burst of load hits both alike
            order = ("naive", "local") if r % 2 == 0 else ("local", "naive")
            t = {}
            for which in order:
                t[which] = (naive(paths, version_dir, work / f"naive{r}") if which == "naive" else
                            local(work / "images", work / "repo", work / f"local{r}", args.batch_size, args.threads))
            best_naive, best_local = min(best_naive, t["naive"]), min(best_local, t["local"])
            ratios.append(t["naive"] / t["local"])
            print(f"round {r}: naive {args.count / t['naive']:6.1f} images/s, local {args.count / t['local']:6.1f} "
                  f"images/s, ratio {ratios[-1]:.2f}")
    naive_ips, local_ips = args.count / best_naive, args.count / best_local
    print(f"{args.count} images {args.size}x{args.size}, unet base_channels 8 depth 3, batch size {args.batch_size}, "
          f"batch pixels {CPU_BATCH_PIXELS} (CPU default)")
    print(f"naive loop:   {naive_ips:7.1f} images/s")
    print(f"local engine: {local_ips:7.1f} images/s (includes store, results.jsonl, summary, chart)")
    print(f"ratio local / naive, best of each: {local_ips / naive_ips:.2f} (goal >= 1.0)")
    print(f"ratio local / naive, median of the rounds' ratios: {statistics.median(ratios):.2f}")
    la = os.getloadavg()
    print(f"load average after: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")


if __name__ == "__main__":
    main()
