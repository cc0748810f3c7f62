"""Training throughput of each shipped recipe on the CPU, and whether channels_last, bf16 or torch.compile helps.

    python bench/bench_recipe_training.py [--threads 2] [--steps 8] [--recipes camvid-fcn8s,membrane-unet]
                                          [--compile camvid-fcn8s,camvid-smp-fpn-r18 | --compile none]
                                          [--allocator tuned|glibc]

For every recipe, with its own model, loss, optimiser, crop and batch size:

- ``data``: images/s of its augmentation pipeline (the loader, ``data.workers`` = 0, as the CPU recipes run);
- ``step``: images/s of one optimiser step (forward, loss, backward, AdamW/SGD) on
  batches the loader made beforehand, for the variants measured side by side
  in this process: eager (contiguous), ``channels_last``, ``bf16`` (channels_last under bf16
  autocast, ``train.amp=bf16``; only on a CPU with native bf16, where ``segsvc train`` applies it),
  and ``torch.compile``
  (inductor, for the recipes ``--compile`` names: compiling takes minutes on 2 cores;
  its time is reported, not counted);
- ``trainer``: images/s of ``training.train.train_one_epoch`` on the loader, eager:
  what the training log's ``img/s`` shows, data loading included.

The ratios are of the step throughputs against eager in the same run. Not a
test: timings depend on the machine and its load (printed).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from segsvc.config import ModelSpec
from segsvc.inference.allocator import configure_allocator
from segsvc.models.registry import build_model
from training.config import LoopConfig, ScheduleConfig, TrainConfig, load_config
from training.data import stack_batch
from training.distributed import DistEnv
from training.losses import build_loss
from training.rundir import val_contract
from training.schedule import Horizon, build_optimizer, build_scheduler
from training.train import build_datasets, cpu_computes_natively, load_training_data, train_one_epoch

RECIPES = Path(__file__).resolve().parents[1] / "training" / "recipes"
DEFAULT = ("camvid-fcn8s", "camvid-unet", "camvid-segnet", "camvid-smp-linknet-r18", "camvid-smp-fpn-r18",
           "membrane-unet")


def load_batches(cfg: TrainConfig, count: int) -> tuple[list[tuple[torch.Tensor, ...]], float, DataLoader, nn.Module]:
    """``count`` augmented batches of the recipe, the loader's images/s, the loader, and a fresh model."""
    data = load_training_data(cfg)
    model = build_model(ModelSpec(cfg.model.arch, data.num_classes, data.channels, dict(cfg.model.params)))
    train_set, _ = build_datasets(cfg, data, val_contract(cfg, model))
    subset = Subset(train_set, range(min(len(train_set), count * cfg.train.batch_size)))
    loader = DataLoader(subset, batch_size=cfg.train.batch_size, shuffle=False, drop_last=True, collate_fn=stack_batch)
    t0 = time.perf_counter()
    batches = list(loader)
    seconds = time.perf_counter() - t0
    return batches, len(batches) * cfg.train.batch_size / seconds, loader, model


def step_rate(cfg: TrainConfig, model: nn.Module, batches: list, variant: str, warmup: int) -> tuple[float, float]:
    """Images/s of optimiser steps over ``batches`` and the seconds the warm-up steps took (compile time)."""
    data = load_training_data(cfg)
    model = copy.deepcopy(model).train()
    memory_format = torch.channels_last if variant in ("channels_last", "bf16") else torch.contiguous_format
    autocast = variant == "bf16"
    model = model.to(memory_format=memory_format)
    criterion = build_loss(cfg.loss, data.num_classes, data.ignore_index)
    optimizer = build_optimizer(cfg.optim, model)
    forward = torch.compile(model) if variant == "compile" else model

    def step(batch: tuple[torch.Tensor, ...]) -> None:
        images, masks, *border = batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = forward(images.contiguous(memory_format=memory_format))
        loss = criterion(logits, masks, *border)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    t0 = time.perf_counter()
    for batch in batches[:warmup]:
        step(batch)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    return len(batches[warmup:]) * cfg.train.batch_size / (time.perf_counter() - t0), warm_s


def trainer_rate(cfg: TrainConfig, model: nn.Module, loader: DataLoader) -> float:
    """Images/s of ``train_one_epoch`` (eager, data loading included) over the loader."""
    data = load_training_data(cfg)
    model = copy.deepcopy(model)
    criterion = build_loss(cfg.loss, data.num_classes, data.ignore_index)
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = build_scheduler(ScheduleConfig(name="constant"), optimizer, len(loader), Horizon(len(loader)))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    env = DistEnv(rank=0, world_size=1, device=torch.device("cpu"))
    loop = LoopConfig(epochs=1, batch_size=cfg.train.batch_size, progress=False)
    stats = train_one_epoch(model, criterion, optimizer, scheduler, scaler, loader, env, 0, loop, None,
                            torch.contiguous_format)
    return float(stats["images_per_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=",".join(DEFAULT), help="comma-separated names in training/recipes/")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed optimiser steps per variant (after 2 warm-up steps)")
    p.add_argument("--compile", default="camvid-fcn8s,camvid-smp-fpn-r18",
                   help="recipes that also run the torch.compile variant ('none': no recipe)")
    p.add_argument("--allocator", choices=("tuned", "glibc"), default="tuned",
                   help="tuned: configure_allocator, as segsvc train runs; glibc: the C allocator's defaults")
    args = p.parse_args()
    tuned = args.allocator == "tuned" and configure_allocator()
    torch.set_num_threads(args.threads)
    compiled = set(args.compile.split(",")) - {"none"}
    native_bf16 = cpu_computes_natively(torch.bfloat16)
    variants = ["eager", "channels_last"] + (["bf16"] if native_bf16 else []) + (["compile"] if compiled else [])
    print(f"threads {args.threads}, {args.steps} timed steps per variant, allocator tuned: {tuned}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16}, "
          f"load average at start {os.getloadavg()[0]:.2f}")
    header = f"{'recipe':26} {'batch':>5} {'crop':>9} {'data':>7} {'trainer':>8} " + " ".join(
        f"{v:>14}" for v in variants) + "  compile s"
    print(header + "\n" + "-" * len(header))
    failures: list[str] = []
    for name in args.recipes.split(","):
        cfg = load_config(RECIPES / f"{name}.yaml", ["train.progress=false"])
        torch.manual_seed(0)
        batches, data_rate, loader, model = load_batches(cfg, args.steps + 2)
        rates, compile_s = {}, float("nan")
        for variant in variants:
            if variant == "compile" and name not in compiled:
                continue
            try:
                rates[variant], warm_s = step_rate(cfg, model, batches, variant, warmup=2)
            except Exception as exc:  # torch.compile may fail on a model: report it, measure the rest
                if variant != "compile":
                    raise
                failures.append(f"{name}: torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                continue
            if variant == "compile":
                compile_s = warm_s
        trainer = trainer_rate(cfg, model, loader)
        crop = "x".join(map(str, cfg.data.crop)) if cfg.data.crop else "full"
        cells = " ".join(f"{rates[v]:14.1f}" if v == "eager" else f"{rates[v]:6.1f} ({rates[v] / rates['eager']:.2f}x)"
                         if v in rates else f"{'failed' if v == 'compile' and name in compiled else '-':>14}"
                         for v in variants)
        print(f"{name:26} {cfg.train.batch_size:5d} {crop:>9} {data_rate:7.1f} {trainer:8.1f} {cells}  {compile_s:8.1f}",
              flush=True)
    for line in failures:
        print(line)
    print(f"images/s; 'data' = augmentation only, 'trainer' = train_one_epoch (eager, data included), the rest one "
          f"optimiser step on ready batches (ratio against eager). Load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
