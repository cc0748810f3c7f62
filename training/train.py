"""Train a segmentation model from a recipe and publish it as a model artifact.

    segsvc train --config training/recipes/camvid-unet.yaml [--set train.epochs=5 ...] [--resume RUN_DIR]
    torchrun --nproc_per_node=2 -m training --config training/recipes/synthetic-quick.yaml

Reads top-down like torchvision's ``references/segmentation/train.py``: the
argument parser, ``main(cfg)``, ``train_one_epoch`` and ``evaluate``. A run
writes ``runs/<recipe>/<run>/`` (config, ``metrics.jsonl``, the training curve,
checkpoints) and finally a safetensors artifact into the model repository.
Under ``torchrun`` it trains with DistributedDataParallel (NCCL on GPU, gloo
on CPU); only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import albumentations as A
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from tqdm import tqdm

from segsvc.config import ModelSpec
from segsvc.data.datasets import build_dataset
from segsvc.data.spec import DatasetSpec, load_dataset_spec
from segsvc.data.transforms import train_transform
from segsvc.errors import InvalidArgument
from segsvc.inference.predictor import pad_to_multiple
from segsvc.models.registry import build_model
from training.checkpoint import restore_training_state, save_checkpoint, unwrap
from training.config import LoopConfig, TrainConfig, load_config
from training.data import EvalSamples, TrainSamples, rescale_transform, sample_seed, select_indices, stack_batch
from training.distributed import DistEnv, log, setup_distributed
from training.losses import build_loss, class_pixel_counts, median_frequency_weights
from training.metrics import ConfusionMatrix, SegmentationMetrics
from training.report import plot_training_curve
from training.rundir import CHECKPOINT, append_metrics, prepare_run, publish, save_best, write_metrics_file
from training.args import add_train_arguments
from training.schedule import Horizon, build_optimizer, build_scheduler, planned_epochs


def get_args_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    return add_train_arguments(parser)


def main(cfg: TrainConfig, resume: str | None = None) -> Path | None:
    """Train as the recipe says; returns the artifact directory on rank 0 (None on other ranks)."""
    env = setup_distributed(cfg.train.device)
    try:
        return _main(cfg, resume, env)
    finally:
        if env.distributed:
            dist.destroy_process_group()


def _main(cfg: TrainConfig, resume: str | None, env: DistEnv) -> Path | None:
    loop = cfg.train
    setup_determinism(loop, env)
    data = load_dataset_spec(cfg.data.spec)
    if not data.class_names:
        raise InvalidArgument(f"dataset {data.name!r} names no classes: add a dataset.yaml with 'classes'")
    spec = ModelSpec(cfg.model.arch, data.num_classes, data.channels, dict(cfg.model.params))
    model = build_model(spec)
    stride = int(getattr(model, "output_stride", 1))
    train_set, val_set = build_datasets(cfg, data, stride)
    train_loader, val_loader = build_loaders(cfg, train_set, val_set, env)

    use_cuda = env.device.type == "cuda"
    memory_format = torch.channels_last if (loop.channels_last and use_cuda) else torch.contiguous_format
    model = model.to(env.device, memory_format=memory_format)
    if env.distributed:
        model = DistributedDataParallel(model, device_ids=[env.device.index] if use_cuda else None)

    class_weights = resolve_class_weights(cfg, data, train_set, env)
    criterion = build_loss(cfg.loss, data.num_classes, data.ignore_index, class_weights).to(env.device)
    optimizer = build_optimizer(cfg.optim, unwrap(model))
    steps_per_epoch = math.ceil(len(train_loader) / loop.accumulate_steps)
    horizon = Horizon(total_steps=steps_per_epoch * loop.epochs)
    scheduler = build_scheduler(cfg.schedule, optimizer, steps_per_epoch, horizon)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(loop.amp) if use_cuda else None
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp_dtype is torch.float16)

    run_dir, state = prepare_run(cfg, resume, env)
    start_epoch, best_score, since_best, history, elapsed_s = 0, -1.0, 0, [], 0.0
    if state is not None:
        restore_training_state(state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        start_epoch, best_score, since_best = state["epoch"], state["best_score"], state["epochs_since_best"]
        history, elapsed_s = list(state["history"]), float(state["elapsed_s"])
        log(env, f"resumed from {run_dir / CHECKPOINT} after epoch {start_epoch}")
    if env.is_main:
        write_metrics_file(run_dir, history)
    log(env, describe_run(cfg, model, data, train_set, val_set, env, run_dir, amp_dtype, memory_format))

    for epoch in range(start_epoch, loop.epochs):
        planned = planned_epochs(cfg, history, elapsed_s, env)
        if epoch >= planned:
            log(env, f"stopping before epoch {epoch + 1}: the time budget fits {planned} epochs")
            break
        horizon.set(planned * steps_per_epoch, scheduler)
        t0 = time.perf_counter()
        torch.manual_seed(sample_seed(loop.seed, epoch, env.rank, 1))  # dropout etc.: exact on resume
        train_set.set_epoch(epoch)
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        else:
            train_loader.generator.manual_seed(sample_seed(loop.seed, epoch, 2))
        stats = train_one_epoch(
            model, criterion, optimizer, scheduler, scaler, train_loader, env, epoch, loop, amp_dtype, memory_format
        )
        row: dict[str, Any] = {"epoch": epoch + 1, **stats}
        validate_now = (epoch + 1) % loop.val_every_epochs == 0 or epoch + 1 == planned
        if not validate_now and cfg.schedule.horizon == "time":  # will the budget end the run after this epoch?
            so_far = elapsed_s + time.perf_counter() - t0
            validate_now = epoch + 1 >= planned_epochs(cfg, [*history, row], so_far, env)
        if validate_now:
            metrics = evaluate(unwrap(model), val_loader, env, data.num_classes, data.ignore_index, stride,
                               amp_dtype, loop.progress)
            row.update(val_miou=metrics.miou, val_pixel_accuracy=metrics.pixel_accuracy,
                       val_mean_class_accuracy=metrics.mean_class_accuracy, val_mean_dice=metrics.mean_dice,
                       val_iou=metrics.iou)
            improved = metrics.miou > best_score
            best_score, since_best = (metrics.miou, 0) if improved else (best_score, since_best + 1)
            if improved and env.is_main:
                save_best(run_dir, unwrap(model), epoch + 1, metrics, data.class_names)
        elapsed_s += time.perf_counter() - t0
        row["elapsed_s"] = round(elapsed_s, 2)
        history.append(row)
        if env.is_main:
            save_checkpoint(run_dir / CHECKPOINT, model=model, optimizer=optimizer, scheduler=scheduler,
                            scaler=scaler, epoch=epoch + 1, best_score=best_score, epochs_since_best=since_best,
                            history=history, config=cfg.to_dict(), elapsed_s=elapsed_s)
            append_metrics(run_dir, row)
            plot_training_curve(history, run_dir / "training_curve.png", title=cfg.name)
        log(env, epoch_line(row, planned))
        if stop_reason := should_stop(loop, since_best, elapsed_s, env):
            log(env, f"stopping after epoch {epoch + 1}: {stop_reason}")
            break
        if epoch + 1 >= planned:  # the LR has decayed to its end: a later, longer estimate must not restart it
            break

    if not env.is_main:
        return None
    return publish(cfg, spec, data, run_dir, unwrap(model), history, elapsed_s)


# -- one epoch ----------------------------------------------------------------------
def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    loader: DataLoader,
    env: DistEnv,
    epoch: int,
    loop: LoopConfig,
    amp_dtype: torch.dtype | None,
    memory_format: torch.memory_format,
) -> dict[str, Any]:
    """One pass over the training data with gradient accumulation; returns rank-averaged statistics."""
    model.train()
    n_batches, accumulate = len(loader), loop.accumulate_steps
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    term_sums: dict[str, torch.Tensor] = {}
    images_seen = 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{loop.epochs}", unit="batch", leave=False,
               disable=not (env.is_main and loop.progress), mininterval=0.5 if sys.stderr.isatty() else 30.0)
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for i, (images, masks) in enumerate(bar):
        images = images.to(env.device, non_blocking=True, memory_format=memory_format)
        masks = masks.to(env.device, non_blocking=True)
        group_start = (i // accumulate) * accumulate
        group_size = min(accumulate, n_batches - group_start)
        step_now = i + 1 == group_start + group_size
        sync = nullcontext() if (step_now or not env.distributed) else model.no_sync()
        with sync:
            with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images)
            loss = criterion(logits, masks)
            scaler.scale(loss / group_size).backward()
        if step_now:
            if loop.grad_clip_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        loss_sum += loss.detach()
        for name, value in getattr(criterion, "last_terms", {}).items():
            term_sums[name] = term_sums.get(name, 0.0) + value
        images_seen += images.shape[0]
        if not bar.disable and (i % 10 == 0 or i + 1 == n_batches):
            mean_loss = (loss_sum / (i + 1)).item()
            check_finite(mean_loss, epoch, i)
            rate = images_seen * env.world_size / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", img_s=f"{rate:.1f}")
    bar.close()
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    seconds = time.perf_counter() - t0
    totals = torch.stack([loss_sum, torch.tensor(float(n_batches), dtype=torch.float64, device=env.device),
                          *[t.to(torch.float64) for t in term_sums.values()]])
    if env.distributed:
        dist.all_reduce(totals)
    mean_loss = float(totals[0] / totals[1])
    check_finite(mean_loss, epoch, n_batches - 1)
    stats = {
        "train_loss": mean_loss,
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_s": images_seen * env.world_size / max(seconds, 1e-9),
        "epoch_time_s": round(seconds, 2),
    }
    stats.update({f"train_{name}": float(v / totals[1]) for name, v in zip(term_sums, totals[2:])})
    return stats


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    env: DistEnv,
    num_classes: int,
    ignore_index: int | None,
    stride: int,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> SegmentationMetrics:
    """Confusion-matrix metrics on the validation shard of this rank, summed over all ranks.

    Images are padded to the model's stride and the logits cropped back; when
    the loader resized the images, the logits are resized to the label size, so
    metrics always count the original labels.
    """
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index)
    for images, masks in tqdm(loader, desc="validate", unit="batch", leave=False,
                              disable=not (env.is_main and progress) or len(loader) < 4):
        images = images.to(env.device, non_blocking=True)
        padded, (h, w) = pad_to_multiple(images, stride)
        with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(padded)[:, :, :h, :w].float()
        if logits.shape[-2:] != masks.shape[-2:]:
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        cm.update(masks, logits.argmax(1).cpu())
    cm.all_reduce()
    return cm.compute()


# -- building blocks ----------------------------------------------------------------


def setup_determinism(loop: LoopConfig, env: DistEnv) -> None:
    if loop.threads is not None:
        torch.set_num_threads(loop.threads)
    np.random.seed(sample_seed(loop.seed, env.rank, 3))
    torch.manual_seed(sample_seed(loop.seed, env.rank, 4))
    if loop.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def build_datasets(cfg: TrainConfig, data: DatasetSpec, stride: int) -> tuple[TrainSamples, EvalSamples]:
    """The augmented training samples and the validation samples the recipe selects."""
    crop = cfg.data.crop
    if crop is not None and (crop[0] % stride or crop[1] % stride):
        fix = tuple(max(stride, c // stride * stride) for c in crop)
        raise InvalidArgument(
            f"data.crop {list(crop)} is not divisible by the model's output stride {stride}; "
            f"use --set data.crop=[{fix[0]},{fix[1]}]"
        )
    steps = [t for t in (rescale_transform(cfg.data.scale),) if t is not None]
    preset = train_transform(cfg.data.preset, crop=crop, ignore_index=data.ignore_index)
    transform = A.Compose([*steps, preset]) if steps else preset
    base_train = build_dataset(data, cfg.data.train_split)
    base_val = build_dataset(data, cfg.data.val_split)
    if cfg.data.repeat < 1:
        raise InvalidArgument(f"data.repeat must be at least 1, got {cfg.data.repeat}")
    train_idx = select_indices(len(base_train), cfg.data.train_indices, cfg.data.train_limit) * cfg.data.repeat
    val_idx = select_indices(len(base_val), cfg.data.val_indices, cfg.data.val_limit)
    return (
        TrainSamples(base_train, train_idx, transform, data.input_spec(), cfg.train.seed),
        EvalSamples(base_val, val_idx, data.input_spec(), cfg.data.val_scale),
    )


def build_loaders(
    cfg: TrainConfig, train_set: TrainSamples, val_set: EvalSamples, env: DistEnv
) -> tuple[DataLoader, DataLoader]:
    """Shuffled training batches (sharded by DistributedSampler under DDP) and this rank's validation shard."""
    loop = cfg.train
    drop_last = len(train_set) >= loop.batch_size * env.world_size
    if env.distributed:
        sampler = DistributedSampler(train_set, env.world_size, env.rank, shuffle=True, seed=loop.seed,
                                     drop_last=drop_last)
        generator = None
    else:
        generator = torch.Generator()
        sampler = RandomSampler(train_set, generator=generator)
    common = {"num_workers": cfg.data.workers, "collate_fn": stack_batch,
              "pin_memory": env.device.type == "cuda", "persistent_workers": False}
    train_loader = DataLoader(train_set, batch_size=loop.batch_size, sampler=sampler, drop_last=drop_last,
                              generator=generator, **common)
    # every rank evaluates a disjoint slice of the validation set; the confusion matrices are summed
    shard = torch.utils.data.Subset(val_set, list(range(env.rank, len(val_set), env.world_size)))
    val_loader = DataLoader(shard, batch_size=loop.val_batch_size, sampler=SequentialSampler(shard), **common)
    if len(train_loader) == 0:
        raise InvalidArgument(f"the training split has no batches ({len(train_set)} samples)")
    return train_loader, val_loader


def resolve_class_weights(
    cfg: TrainConfig, data: DatasetSpec, train_set: TrainSamples, env: DistEnv
) -> torch.Tensor | None:
    """Explicit weights, or median-frequency weights counted from the training masks."""
    option = cfg.loss.class_weights
    if option is None:
        return None
    if option == "median_frequency":
        masks = (train_set.base.read(i)[1] for i in train_set.indices)
        counts = class_pixel_counts(masks, data.num_classes, progress=env.is_main and cfg.train.progress)
        weights = median_frequency_weights(*counts)
        log(env, "median-frequency class weights: "
            + ", ".join(f"{n}={w:.3f}" for n, w in zip(data.class_names, weights.tolist())))
        return weights
    if len(option) != data.num_classes:
        raise InvalidArgument(f"loss.class_weights lists {len(option)} weights for {data.num_classes} classes")
    return torch.tensor(option, dtype=torch.float32)


# -- logging and stopping -------------------------------------------------------------


def describe_run(
    cfg: TrainConfig, model: nn.Module, data: DatasetSpec, train_set: TrainSamples, val_set: EvalSamples,
    env: DistEnv, run_dir: Path, amp_dtype: torch.dtype | None, memory_format: torch.memory_format,
) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    return (
        f"run {run_dir}: {cfg.model.arch} ({n_params / 1e6:.2f} M parameters) on {data.name} "
        f"({len(train_set)} train / {len(val_set)} val samples, {data.num_classes} classes); "
        f"device {env.device} x{env.world_size}, amp {amp_dtype or 'off'}, "
        f"channels_last {memory_format is torch.channels_last}, threads {torch.get_num_threads()}"
    )


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    text = (f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f}, lr {row['lr']:.2e}, "
            f"{row['images_per_s']:.1f} img/s, {row['epoch_time_s']:.0f} s")
    if "val_miou" in row:
        text += f"; val mIoU {100 * row['val_miou']:.2f}, pixel acc {100 * row['val_pixel_accuracy']:.2f}"
    return text


def check_finite(value: float, epoch: int, step: int) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(
            f"training loss became {value} in epoch {epoch + 1} at batch {step + 1}; lower optim.lr, "
            "add train.grad_clip_norm, or use train.amp=bf16 instead of fp16"
        )


def should_stop(loop: LoopConfig, since_best: int, elapsed_s: float, env: DistEnv) -> str | None:
    """Early stopping and the time budget; rank 0 decides for everyone (clocks differ between ranks)."""
    reason = ""
    if loop.early_stopping_patience is not None and since_best >= loop.early_stopping_patience:
        reason = f"no better validation mIoU for {since_best} validations (early stopping)"
    elif loop.max_time_min is not None and elapsed_s >= 60 * loop.max_time_min:
        reason = f"time budget of {loop.max_time_min} min used ({elapsed_s / 60:.1f} min)"
    if env.distributed:
        holder = [reason]
        dist.broadcast_object_list(holder, src=0)
        reason = holder[0]
    return reason or None


def run(args: argparse.Namespace) -> int:
    """Entry point shared by ``segsvc train`` and ``python -m training``."""
    cfg = load_config(args.config, args.overrides, args.profile)
    main(cfg, resume=args.resume)
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    from segsvc.errors import SegsvcError

    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except SegsvcError as exc:
        print(f"training: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
