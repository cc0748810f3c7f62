"""Trainer throughput against a bare PyTorch loop: same model, batch, data and loss.

    python bench/train_throughput.py [--epochs 2] [--batch-size 16] [--threads 1] [--device cpu]

Both loops read the same DataLoader (synthetic shapes, augmentation included),
train the same freshly initialised U-Net with AdamW and cross-entropy; the
trainer adds what it always does (loss terms bookkeeping, LR schedule, AMP
scaler, gradient accumulation logic, progress bar). Prints images/s of each
and their ratio (goal: trainer/bare >= 0.95). Not a test: timings depend on
the machine and its load.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler

from segsvc.config import ModelSpec
from segsvc.data.datasets import build_dataset
from segsvc.data.spec import load_dataset_spec
from segsvc.data.transforms import train_transform
from segsvc.models.registry import build_model
from training.config import LoopConfig, LossConfig, OptimConfig, ScheduleConfig
from training.data import TrainSamples, stack_batch
from training.losses import build_loss
from training.distributed import DistEnv
from training.schedule import Horizon, build_optimizer, build_scheduler
from training.train import train_one_epoch


def make_loader(batch_size: int, samples: int) -> DataLoader:
    spec = load_dataset_spec("synthetic")
    base = build_dataset(spec, "train")
    data = TrainSamples(base, range(samples), train_transform("synthetic", crop=(96, 96)), spec.input_spec(), seed=0)
    return DataLoader(data, batch_size=batch_size, sampler=RandomSampler(data, generator=torch.Generator()),
                      drop_last=True, collate_fn=stack_batch, generator=torch.Generator())


def fresh_model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec("unet", 5, 3, {"depth": 3, "base_channels": 16})).to(device)


def bare_loop(loader: DataLoader, device: torch.device, epochs: int) -> float:
    model = fresh_model(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    images, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y, ignore_index=255)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - t0)


def trainer_loop(loader: DataLoader, device: torch.device, epochs: int) -> float:
    model = fresh_model(device)
    loop = LoopConfig(epochs=epochs, batch_size=loader.batch_size)
    criterion = build_loss(LossConfig(), 5, 255).to(device)
    optimizer = build_optimizer(OptimConfig(lr=1e-3, weight_decay=0.0), model)
    scheduler = build_scheduler(ScheduleConfig(name="constant"), optimizer, len(loader), Horizon(len(loader) * epochs))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    env = DistEnv(rank=0, world_size=1, device=device)
    images, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        train_one_epoch(model, criterion, optimizer, scheduler, scaler, loader, env, epoch, loop, None,
                        torch.contiguous_format)
        images += len(loader) * loader.batch_size
    return images / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples", type=int, default=160)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=2, help="alternate the two loops this many times; best of each")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    loader = make_loader(args.batch_size, args.samples)
    bare_loop(loader, device, 1)  # warm-up (allocator, oneDNN kernels)
    bare, trainer = [], []
    for i in range(args.repeats):  # alternate which loop goes first, so neither always runs on a warmer machine
        if i % 2 == 0:
            bare.append(bare_loop(loader, device, args.epochs))
        trainer.append(trainer_loop(loader, device, args.epochs))
        if i % 2 == 1:
            bare.append(bare_loop(loader, device, args.epochs))
    b, t = max(bare), max(trainer)
    print(f"device {device}, threads {args.threads}, batch {args.batch_size}, {args.samples} images x {args.epochs} epochs")
    print(f"bare loop: {b:.1f} img/s   trainer: {t:.1f} img/s   ratio trainer/bare: {t / b:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
