"""Train a segmentation model from a recipe and publish it as a model artifact.

    segsvc train --config training/recipes/camvid-unet.yaml [--set train.epochs=5 ...] [--resume RUN_DIR]
    torchrun --nproc_per_node=2 -m training --config training/recipes/synthetic-quick.yaml

Reads top-down like torchvision's ``references/segmentation/train.py``: the
argument parser, ``main(cfg)`` (build the objects, then the epoch loop),
``train_one_epoch`` and ``evaluate``. A run writes ``runs/<recipe>/<run>/``
(config, ``metrics.jsonl``, ``events.jsonl``, the training curve, checkpoints)
and finally a safetensors artifact into the model repository. Under
``torchrun`` it trains with DistributedDataParallel (NCCL on GPU, gloo on CPU);
only rank 0 writes files. SIGTERM stops a run cleanly: the last checkpoint
stays valid, ``events.jsonl`` ends with ``terminated`` and the exit status is 143;
Ctrl-C likewise, with 130. Either says which ``--resume RUN_DIR`` continues it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import albumentations as A
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from tqdm import tqdm

from segsvc.cli_train import local_overrides, refuse_server_flags
from segsvc.config import InferenceSpec, ModelSpec
from segsvc.data.datasets import SegmentationDataset, build_dataset
from segsvc.data.registration import dataset_offsets, mean_offset
from segsvc.data.spec import DatasetSpec, load_dataset_spec
from segsvc.data.transforms import train_transform
from segsvc.errors import DatasetError, InvalidArgument, SegsvcError
from segsvc.inference.allocator import configure_allocator
from segsvc.inference.argmax import class_argmax
from segsvc.inference.backends import Backend, TorchBackend, manifest_geometry
from segsvc.inference.backends import amp_dtype as autocast_dtype
from segsvc.inference.contract import contract_logits
from segsvc.models.artifact import read_manifest
from segsvc.models.registry import build_model, plan_model
from segsvc.progress import show_progress
from training.args import add_train_arguments
from training.checkpoint import RunState, restore_training_state, save_checkpoint, unwrap
from training.config import LoopConfig, TrainConfig, load_config
from training.curves import cpu_time_row
from training.data import (
    EvalSamples,
    TrainSamples,
    require_labels,
    rescale_transform,
    sample_seed,
    select_indices,
    stack_batch,
    worker_batches,
)
from training.distributed import DistEnv, broadcast_buffers, broadcast_from_main, log, resolve_device, setup_distributed
from training.ema import WeightAverage
from training.events import EVENTS_FILE, EventLog, Terminated, sigterm_raises
from training.finetune import check_init_from, describe_init, init_from_artifact
from training.losses import border_weight_function, build_loss, class_pixel_counts, median_frequency_weights
from training.metrics import ConfusionMatrix, SegmentationMetrics, require_counted
from training.report import plot_training_curve
from training.rundir import (
    CHECKPOINT,
    append_metrics,
    find_published,
    prepare_run,
    publish,
    record_artifact,
    release_run_dir,
    save_best,
    val_contract,
    write_metrics_file,
)
from training.schedule import Horizon, build_optimizer, build_scheduler, mean_epoch_s, planned_epochs

EXIT_TERMINATED = 128 + 15  # the shell's status for a process ended by SIGTERM
EXIT_INTERRUPTED = 128 + 2  # and by SIGINT (Ctrl-C)


def get_args_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    parser = add_train_arguments(parser)
    parser.add_argument(
        "--check", action="store_true",
        help="check the recipe against its dataset and this machine (what a run refuses before it starts: keys, "
             "values, splits, model, device), then exit without training; the server runs it at submission",
    )
    return parser


def main(cfg: TrainConfig, resume: str | None = None) -> Path | None:
    """Train as the recipe says; returns the artifact directory on rank 0 (None on other ranks).

    Every way out of a started run ends ``events.jsonl`` with an ``end`` line.
    """
    clock = RunClock()  # the run's time (and its budget) starts here, setup included
    env = setup_distributed(cfg.train.device)
    run_dir: Path | None = None
    try:
        with sigterm_raises():
            # what the recipe asks of the data and the model is refused before a run directory is made
            data = load_training_data(cfg)
            setup_determinism(cfg.train, env)
            spec, model = build_checked_model(cfg, data)
            run_dir, checkpoint = prepare_run(cfg, resume, env)
            with EventLog(run_dir / EVENTS_FILE if env.is_main else None) as events:
                artifact, reason = _main(cfg, env, data, (spec, model), run_dir, checkpoint, events, clock)
                events.end("completed", reason)
                return artifact
    except (KeyboardInterrupt, Terminated) as exc:
        log(env, stopped_line(exc, run_dir))
        raise
    finally:
        if run_dir is not None:
            release_run_dir(run_dir)
        if env.distributed:
            dist.destroy_process_group()


def _main(
    cfg: TrainConfig, env: DistEnv, data: DatasetSpec, built: tuple[ModelSpec, nn.Module], run_dir: Path,
    checkpoint: dict[str, Any] | None, events: EventLog, clock: RunClock,
) -> tuple[Path | None, str]:
    """Build the data and optimiser around the built model, run the epochs, publish; returns the artifact and
    why it stopped."""
    loop = cfg.train
    spec, model = built
    init_report = initialise_weights(cfg, model, spec, data, resuming=checkpoint is not None, env=env)
    shift = registered_shift(cfg, data, env)
    contract = val_contract(cfg, model, shift)  # how validation runs the model: what the published manifest records
    geometry = manifest_geometry(contract)
    train_set, val_set = build_datasets(cfg, data, contract)
    train_loader, val_loader = build_loaders(cfg, train_set, val_set, env)

    amp_dtype, memory_format = precision(loop, env)
    model = place_model(model, env, memory_format)
    class_weights = resolve_class_weights(cfg, data, train_set, env)
    criterion = build_loss(cfg.loss, data.num_classes, data.ignore_index, class_weights).to(env.device)
    optimizer = build_optimizer(cfg.optim, unwrap(model))
    steps_per_epoch = math.ceil(len(train_loader) / loop.accumulate_steps)
    horizon = Horizon(total_steps=steps_per_epoch * loop.epochs)
    scheduler = build_scheduler(cfg.schedule, optimizer, steps_per_epoch, horizon)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp_dtype is torch.float16)
    ema = WeightAverage(unwrap(model), loop.ema_decay) if loop.ema_decay is not None else None
    scored = ema.module if ema is not None else unwrap(model)  # what validation measures and publish writes

    run = RunState()
    if checkpoint is not None:
        run = restore_training_state(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                     ema=ema)
        log(env, f"resumed from {run_dir / CHECKPOINT} after epoch {run.epoch}")
    if env.is_main:
        write_metrics_file(run_dir, run.history)
    log(env, describe_run(cfg, model, data, train_set, val_set, env, run_dir, amp_dtype, memory_format))
    events.emit("start", run_dir=str(run_dir), epochs=announced_epochs(cfg, run, env),
                steps_per_epoch=steps_per_epoch, train_samples=len(train_set), val_samples=len(val_set),
                start_epoch=run.epoch, recipe=cfg.name, arch=cfg.model.arch, classes=list(data.class_names),
                device=str(env.device), world_size=env.world_size, init_from=init_report)

    # A checkpoint written after the run's stop (then killed while publishing) trains no further when resumed.
    reason = (should_stop(loop, run.epochs_since_best, run.elapsed_s, env) or "") if run.epoch else ""
    if reason:
        log(env, f"resumed after the run had stopped ({reason}): publishing what it trained")
    setup_s: float | None = clock.pending_s()  # in elapsed_s, but not epoch time (planned_epochs)
    row_elapsed_s = run.elapsed_s  # the last metrics row's elapsed_s (a resumed checkpoint's)
    for epoch in range(run.epoch, run.epoch if reason else loop.epochs):
        planned = planned_epochs(cfg, run.history, run.elapsed_s, env)
        if epoch >= planned:
            reason = f"the time budget fits {planned} epochs"
            log(env, f"stopping before epoch {epoch + 1}: {reason}")
            break
        horizon.set(planned * steps_per_epoch, scheduler)
        seed_epoch(loop, epoch, env, train_set, train_loader)
        stats = train_one_epoch(model, criterion, optimizer, scheduler, scaler, train_loader, env, epoch, loop,
                                amp_dtype, memory_format, events=events, ema=ema)
        row: dict[str, Any] = {"epoch": epoch + 1, **stats}
        if setup_s is not None:  # the first epoch of this start carries its set-up time
            row["setup_s"], setup_s = round(setup_s, 3), None
        if should_validate(cfg, run, row, planned, clock.pending_s(), env):  # the time the budget will count
            broadcast_buffers(env, scored)  # every rank scores the model rank 0 saves and publishes
            backend = TorchBackend(scored, geometry, env.device, data.channels,
                                   autocast=validation_autocast(env),
                                   channels_last=memory_format == torch.channels_last)
            metrics = evaluate(backend, val_loader, data.num_classes, data.ignore_index, loop.progress, env,
                               contract)
            # Every rank holds the same summed counts: an all-void split stops them all at the first validation.
            metrics = require_counted(metrics, f"data.val_split {cfg.data.val_split!r} of {data.name}",
                                      data.ignore_index)
            row.update(validation_row(metrics))
            if run.record_validation(metrics.miou) and env.is_main:
                save_best(run_dir, scored, epoch + 1, metrics, data.class_names)
        run.epoch = epoch + 1
        clock.add_to(run)  # since the last row: this epoch, the previous one's bookkeeping (or the setup)
        epoch_s, row_elapsed_s = run.elapsed_s - row_elapsed_s, run.elapsed_s
        row["elapsed_s"] = round(run.elapsed_s, 2)
        row.update(cpu_time_row(run.history, epoch_s, torch.get_num_threads() * env.world_size))  # segsvc curves
        run.history.append(row)
        events.emit("epoch", **epoch_event(row, planned, run))
        if env.is_main:
            save_checkpoint(run_dir / CHECKPOINT, model=model, optimizer=optimizer, scheduler=scheduler,
                            scaler=scaler, run=run, config=cfg.to_dict(), ema=ema)
            events.emit("checkpoint", epoch=run.epoch, path=str(run_dir / CHECKPOINT))
            append_metrics(run_dir, row)
            plot_training_curve(run.history, run_dir / "training_curve.png", title=cfg.name)
        log(env, epoch_line(row, planned))
        clock.add_to(run)  # the budget also pays for the checkpoint, metrics line and plot just written
        if stop_reason := should_stop(loop, run.epochs_since_best, run.elapsed_s, env):
            reason = stop_reason
            log(env, f"stopping after epoch {epoch + 1}: {reason}")
            break
        if epoch + 1 >= planned:  # the LR has decayed to its end: a later, longer estimate must not restart it
            reason = f"the time budget fits {planned} epochs" if planned < loop.epochs else ""
            break
    reason = reason or f"trained {run.epoch} of {loop.epochs} epochs"
    clock.add_to(run)  # the manifest's train_time_s: everything up to publishing

    if not env.is_main:
        return None, reason
    # killed between publishing and recording it (artifact.txt, the event): the version is there already
    artifact = find_published(cfg, run) if checkpoint is not None else None
    if artifact is not None:
        log(env, f"this run was already published after epoch {run.epoch} as {artifact} (it stopped before "
                 "recording that): not publishing the same model again")
        record_artifact(run_dir, artifact)
        print(f"artifact: {artifact}")
    else:
        artifact = publish(cfg, spec, data, run_dir, scored, run.history, run.elapsed_s, contract, run.run_id)
    manifest = read_manifest(artifact)
    events.emit("published", path=str(artifact), name=manifest.name, version=manifest.version,
                metrics=dict(manifest.metrics))
    return artifact, reason


def check_recipe(cfg: TrainConfig) -> None:
    """Refuse what ``main`` would refuse before its run directory, with the same code, and train nothing: the
    recipe's keys and values (``load_config``, done by the caller), the device (``resolve_device``), the dataset's
    classes and splits (``load_training_data``), the samples selected in them (``select_samples``: the folders are
    listed, no image is read), the augmentation (``train_augmentation``), the model's architecture, parameters and crop
    (``build_checked_model``), its size (``check_model_fits``) and the artifact it fine-tunes from
    (``model.init_from``, the server's ``base_model``: ``check_init_from`` reads its manifest, not its weights). The
    server runs it (``python -m training --check``) when a job is submitted, so a request the trainer would refuse is
    refused then, not when the job's trainer starts.

    It runs beside the server's models, under a memory limit (``RLIMIT_AS``, set by the server): it touches no
    GPU, and the model is planned on the meta device (shapes only: no weights allocated, no initialiser run).
    """
    resolve_device(cfg.train.device)  # refused as the trainer would, with no CUDA context created
    data = load_training_data(cfg)
    train_augmentation(cfg, data)
    select_samples(cfg, data)
    try:
        spec, model = build_checked_model(cfg, data, build=plan_model)
        check_model_fits(spec, model)
    except MemoryError:  # past the limit all the same (a factory that allocates real tensors on the meta device)
        raise InvalidArgument(f"the model ({cfg.model.arch}) is too large to build within the check's memory "
                              f"limit{_gib_text(address_space_limit())}") from None
    if cfg.model.init_from is not None:  # the trainer's own refusal (``initialise_weights``), its manifest only
        check_init_from(spec, cfg.model.init_from)


def check_model_fits(spec: ModelSpec, model: nn.Module) -> None:
    """Refuse a model (planned on the meta device) whose weights would not fit in what this process's memory limit
    leaves: the trainer builds it on the CPU first. Nothing is refused without a limit (a check run by hand)."""
    limit = address_space_limit()
    if limit is None:
        return
    tensors = [*model.parameters(), *model.buffers()]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    if address_space_used() + weights > limit:
        count = sum(p.numel() for p in model.parameters())
        raise InvalidArgument(f"the model ({spec.arch}, {count:,} parameters, {weights / 2**30:.1f} GiB of weights) "
                              f"is too large to build within the check's memory limit{_gib_text(limit)}")


def address_space_limit() -> int | None:
    """This process's address-space limit in bytes (``RLIMIT_AS``), or None when it has none."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft


def address_space_used() -> int:
    """This process's address space in bytes (``VmSize``; 0 where ``/proc`` does not say)."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) << 10 for line in f if line.startswith("VmSize:")), 0)
    except (OSError, ValueError, IndexError):
        return 0


def _gib_text(limit: int | None) -> str:
    return f" of {limit / 2**30:g} GiB" if limit is not None else ""


def stopped_line(exc: BaseException, run_dir: Path | None) -> str:
    """What a run stopped by Ctrl-C or SIGTERM says: how to continue it from its last checkpoint, if it has one."""
    how = "terminated by SIGTERM" if isinstance(exc, Terminated) else "interrupted (Ctrl-C)"
    if run_dir is None:
        return f"training: {how} before the run started"
    if (run_dir / CHECKPOINT).is_file():
        return f"training: {how}; its last checkpoint is kept: continue with --resume {run_dir}"
    return f"training: {how}; no epoch finished, so there is no checkpoint to resume: start the run again"


class RunClock:
    """Adds the wall time since its last reading to ``RunState.elapsed_s``.

    One clock from the trainer's start, read at every point that records or checks
    the time, leaves no gap (setup, checkpoint writes, plots) out of ``elapsed_s``,
    the time budget and ``cpu_minutes``.
    """

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def pending_s(self) -> float:
        """The time since the last ``add_to``, not yet in ``elapsed_s``."""
        return time.perf_counter() - self._last

    def add_to(self, run: RunState) -> None:
        """Add the time since the last call (or since the clock was made) to ``run.elapsed_s``."""
        now = time.perf_counter()
        run.elapsed_s += now - self._last
        self._last = now


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
    events: EventLog | None = None,
    ema: WeightAverage | None = None,
) -> dict[str, Any]:
    """One pass over the training data with gradient accumulation; returns rank-averaged statistics.

    ``ema``, when given, is updated after every optimiser step.

    ``events`` gets a ``step`` line every few seconds and after the last step
    (this rank's running loss; computed only when a line is due).
    """
    model.train()
    n_batches, accumulate = len(loader), loop.accumulate_steps
    steps_per_epoch = math.ceil(n_batches / accumulate)
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    term_sums: dict[str, torch.Tensor] = {}
    images_seen = 0
    bar = tqdm(worker_batches(loader), desc=f"epoch {epoch + 1}/{loop.epochs}", unit="batch", leave=False,
               total=n_batches, disable=not (env.is_main and show_progress(loop.progress)), mininterval=0.5)
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for i, (images, masks, *border) in enumerate(bar):  # border: the weight maps of loss weighted_ce
        images = images.to(env.device, non_blocking=True, memory_format=memory_format)
        masks = masks.to(env.device, non_blocking=True)
        border = [b.to(env.device, non_blocking=True) for b in border]
        group_start = (i // accumulate) * accumulate
        group_size = min(accumulate, n_batches - group_start)
        step_now = i + 1 == group_start + group_size
        sync = nullcontext() if (step_now or not env.distributed) else model.no_sync()
        with sync:
            with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images)
            loss = criterion(logits, masks, *border)
            scaler.scale(loss / group_size).backward()
        if step_now:
            if loop.grad_clip_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update(unwrap(model))
        loss_sum += loss.detach()
        for name, value in getattr(criterion, "last_terms", {}).items():
            term_sums[name] = term_sums.get(name, 0.0) + value
        images_seen += images.shape[0]
        if events is not None and step_now and (i + 1 == n_batches or events.step_due()):
            events.step(epoch=epoch + 1, step=scheduler.last_epoch, steps_per_epoch=steps_per_epoch,
                        loss=(loss_sum / (i + 1)).item(), lr=optimizer.param_groups[0]["lr"],
                        images_per_s=images_seen * env.world_size / max(time.perf_counter() - t0, 1e-9))
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
    backend: Backend,
    loader: DataLoader,
    num_classes: int,
    ignore_index: int | None,
    progress: bool = True,
    env: DistEnv | None = None,
    contract: InferenceSpec = InferenceSpec(),
) -> SegmentationMetrics:
    """Confusion-matrix metrics on the validation shard of this rank, summed over all ranks.

    The loader already shifted and resized the images as the inference contract says
    (``EvalSamples``: ``network_input``); ``contract_logits`` and the backend's
    ``forward``, what the server and ``segsvc eval`` run, pad them to the
    manifest's stride and minimum size, run the model, crop and resize the
    logits to the label size, so metrics always count the original labels.
    ``contract``'s tiling and padding (``data.val_tile_*``) apply; its scale
    already has (the loader's).
    """
    if isinstance(backend, TorchBackend):
        backend.model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index)
    is_main = env is None or env.is_main
    bar = tqdm(worker_batches(loader), desc="validate", unit="batch", leave=False, total=len(loader),
               disable=not (is_main and show_progress(progress)) or len(loader) < 4)
    for images, masks in bar:
        sizes = [tuple(masks.shape[-2:])] * len(images)
        logits = torch.cat(contract_logits(backend.forward, list(images), sizes, contract, backend.geometry))
        cm.update(masks, class_argmax(logits).cpu())
    cm.all_reduce()
    return cm.compute()


# -- building blocks ----------------------------------------------------------------


def load_training_data(cfg: TrainConfig) -> DatasetSpec:
    """The dataset spec, with classes, labelled training and validation splits, and the loss's classes."""
    data = load_dataset_spec(cfg.data.spec)
    if not data.class_names:
        raise InvalidArgument(f"dataset {data.name!r} names no classes: add a dataset.yaml with 'classes'")
    require_labels(data, cfg.data.train_split, "data.train_split", "train and validate on labelled splits")
    require_labels(data, cfg.data.val_split, "data.val_split", "train and validate on labelled splits")
    check_loss_classes(cfg, data)
    return data


def initialise_weights(
    cfg: TrainConfig, model: nn.Module, spec: ModelSpec, data: DatasetSpec, resuming: bool, env: DistEnv
) -> dict[str, Any] | None:
    """Fine-tuning: load ``model.init_from`` (not when resuming: the checkpoint has newer weights)."""
    if cfg.model.init_from is None:
        return None
    if resuming:
        log(env, f"resuming: the checkpoint's weights take the place of model.init_from={cfg.model.init_from}")
        return None
    report = init_from_artifact(model, spec, data.class_names, cfg.model.init_from)
    log(env, describe_init(report))
    return report


def precision(loop: LoopConfig, env: DistEnv) -> tuple[torch.dtype | None, torch.memory_format]:
    """The autocast dtype (None: full precision) and memory format.

    ``train.amp`` applies on CUDA, and on a CPU whose oneDNN kernels compute in that dtype natively
    (bf16: AVX512-BF16 or AMX; fp16: AVX512-FP16 or AMX-FP16); with AVX512-BF16, a bf16 training step of
    the shipped recipes is 1.5-1.8x faster than a channels-last float32 one (``bench/bench_recipe_training.py``).
    Elsewhere the CPU would emulate it, slower than float32, so the run keeps float32 and says so in its log
    (``amp_note``).

    ``channels_last`` applies on every device: on this project's 2-core CPU it speeds up a training step
    by 1.18-1.36x (``bench/bench_recipe_training.py``).
    """
    amp_dtype = None if loop.amp == "none" else autocast_dtype(loop.amp, env.device)
    if amp_dtype is not None and env.device.type == "cpu" and not cpu_computes_natively(amp_dtype):
        amp_dtype = None
    memory_format = torch.channels_last if loop.channels_last else torch.contiguous_format
    return amp_dtype, memory_format


def cpu_computes_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN kernels run ``dtype`` in hardware (not emulated through float32)."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    return torch.backends.mkldnn.is_available() and bool(getattr(torch.ops.mkldnn, probe)())


def amp_note(loop: LoopConfig, amp_dtype: torch.dtype | None) -> str:
    """Why ``train.amp`` was not applied, for the run's log ("" when it was, or when none was asked)."""
    if loop.amp == "none" or amp_dtype is not None:
        return ""
    return (f" (train.amp={loop.amp} asked, but this CPU has no native {loop.amp} arithmetic: "
            f"float32 is faster here)")


def validation_autocast(env: DistEnv) -> torch.dtype | None:
    """The autocast of validation: the served path's default (precision ``auto``), whatever the training steps
    used, so the best epoch is chosen on what clients will get: float32 on the CPU, bf16 (fp16 where the GPU
    lacks bf16) on CUDA."""
    return autocast_dtype("auto", env.device)


def place_model(model: nn.Module, env: DistEnv, memory_format: torch.memory_format) -> nn.Module:
    """The model on this rank's device, wrapped in DistributedDataParallel under torchrun."""
    model = model.to(env.device, memory_format=memory_format)
    if env.distributed:
        model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return model


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


def registered_shift(cfg: TrainConfig, data: DatasetSpec, env: DistEnv) -> tuple[float, float]:
    """``data.register``'s label offset, measured on the training split (``(0, 0)`` without it)."""
    if cfg.data.register is None:
        return 0.0, 0.0
    if cfg.data.register not in data.class_names:
        raise InvalidArgument(f"data.register names class {cfg.data.register!r}; "
                              f"{data.name} has {', '.join(data.class_names)}")
    base = build_dataset(data, cfg.data.train_split)
    indices = select_indices(len(base), cfg.data.train_indices, cfg.data.train_limit)
    try:
        offsets = dataset_offsets(base.read, indices, data.class_names.index(cfg.data.register))
        shift = mean_offset(offsets)
    except DatasetError as exc:
        raise DatasetError(f"data.register: {exc}") from None
    log(env, f"data.register: the {cfg.data.register} labels are offset by ({shift[0]:+.2f}, {shift[1]:+.2f}) px "
             f"(dy, dx; negative: up, left) from the image's {cfg.data.register}, on average over {len(offsets)} "
             f"training images (dy {offsets[:, 0].min():+.2f}..{offsets[:, 0].max():+.2f}, "
             f"dx {offsets[:, 1].min():+.2f}..{offsets[:, 1].max():+.2f}); training images and served inputs "
             "are translated by that much")
    return shift


def build_checked_model(cfg: TrainConfig, data: DatasetSpec,
                        build: Callable[[ModelSpec], nn.Module] | None = None) -> tuple[ModelSpec, nn.Module]:
    """The recipe's model for the dataset, its validation contract and crop checked (architecture, parameters,
    ``data.val_*``, ``data.crop``): before the run directory, so a refused recipe leaves none behind. ``build``:
    ``build_model`` (looked up when called), or ``plan_model`` for the check (``check_recipe``), which needs
    only the model's shapes."""
    spec = ModelSpec(cfg.model.arch, data.num_classes, data.channels, dict(cfg.model.params))
    model = (build or build_model)(spec)
    check_crop(cfg, manifest_geometry(val_contract(cfg, model)).stride)
    return spec, model


def check_crop(cfg: TrainConfig, stride: int) -> None:
    """``data.crop`` must be a multiple of the model's output stride; the message names the nearest that is."""
    crop = cfg.data.crop
    if crop is not None and (crop[0] % stride or crop[1] % stride):
        fix = tuple(max(stride, c // stride * stride) for c in crop)
        raise InvalidArgument(
            f"data.crop {list(crop)} is not divisible by the model's output stride {stride}; "
            f"use --set data.crop=[{fix[0]},{fix[1]}]"
        )


def build_datasets(cfg: TrainConfig, data: DatasetSpec, contract: InferenceSpec) -> tuple[TrainSamples, EvalSamples]:
    """The augmented training samples and the validation samples the recipe selects, run as ``contract``."""
    check_crop(cfg, manifest_geometry(contract).stride)
    transform = train_augmentation(cfg, data)
    base_train, train_idx, base_val, val_idx = select_samples(cfg, data)
    return (
        TrainSamples(base_train, train_idx, transform, data.input_spec(), cfg.train.seed,
                     pixel_weights=border_weight_function(cfg.loss), shift=contract.shift),
        EvalSamples(base_val, val_idx, data.input_spec(), contract),
    )


def train_augmentation(cfg: TrainConfig, data: DatasetSpec) -> A.BasicTransform:
    """The recipe's augmentation of a training sample: its rescaling, then its preset (crop included)."""
    steps = [t for t in (rescale_transform(cfg.data.scale),) if t is not None]
    preset = train_transform(cfg.data.preset, crop=cfg.data.crop, ignore_index=data.ignore_index,
                             class_uniform=cfg.data.class_uniform)
    return A.Compose([*steps, preset]) if steps else preset


def select_samples(cfg: TrainConfig, data: DatasetSpec) -> tuple[SegmentationDataset, list[int],
                                                                  SegmentationDataset, list[int]]:
    """The training and validation splits and the positions the recipe selects in each (``data.*_indices``,
    ``*_limit``, ``repeat``); a selection that does not fit its split is refused, naming its key."""
    if cfg.data.repeat < 1:
        raise InvalidArgument(f"data.repeat must be at least 1, got {cfg.data.repeat}")
    selected = []
    for which, span, limit in (("train", cfg.data.train_indices, cfg.data.train_limit),
                               ("val", cfg.data.val_indices, cfg.data.val_limit)):
        base = build_dataset(data, getattr(cfg.data, f"{which}_split"))
        try:
            selected.append((base, select_indices(len(base), span, limit)))
        except InvalidArgument as exc:
            raise InvalidArgument(f"data.{which}_indices / data.{which}_limit: {exc}") from None
    (base_train, train_idx), (base_val, val_idx) = selected
    return base_train, train_idx * cfg.data.repeat, base_val, val_idx


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
        shown = env.is_main and show_progress(cfg.train.progress)
        counts = class_pixel_counts(masks, data.num_classes, progress=shown)
        weights = median_frequency_weights(*counts)
        log(env, "median-frequency class weights: "
            + ", ".join(f"{n}={w:.3f}" for n, w in zip(data.class_names, weights.tolist())))
        return weights
    if len(option) != data.num_classes:
        raise InvalidArgument(f"loss.class_weights lists {len(option)} weights for {data.num_classes} classes")
    return torch.tensor(option, dtype=torch.float32)


def check_loss_classes(cfg: TrainConfig, data: DatasetSpec) -> None:
    """The loss's per-class settings fit the dataset's classes (a recipe written for another dataset): as many
    ``loss.class_weights`` as classes, a ``loss.border_weight.cell_class`` among them."""
    weights = cfg.loss.class_weights
    if isinstance(weights, tuple) and len(weights) != data.num_classes:
        raise InvalidArgument(f"loss.class_weights lists {len(weights)} weights for {data.num_classes} classes")
    border = cfg.loss.border_weight
    if border is not None and not 0 <= border.cell_class < data.num_classes:
        raise InvalidArgument(f"loss.border_weight.cell_class {border.cell_class} is not a class of {data.name} "
                              f"({data.num_classes} classes: 0..{data.num_classes - 1})")


# -- per epoch --------------------------------------------------------------------------


def seed_epoch(loop: LoopConfig, epoch: int, env: DistEnv, train_set: TrainSamples, loader: DataLoader) -> None:
    """Seeds that depend only on (seed, epoch, rank), so a resumed run draws what an uninterrupted one would."""
    torch.manual_seed(sample_seed(loop.seed, epoch, env.rank, 1))  # dropout etc.
    train_set.set_epoch(epoch)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    else:
        loader.generator.manual_seed(sample_seed(loop.seed, epoch, 2))


def should_validate(
    cfg: TrainConfig, run: RunState, row: dict[str, Any], planned: int, epoch_s: float, env: DistEnv
) -> bool:
    """Every ``val_every_epochs``, and always after the run's last epoch (so the artifact has metrics)."""
    done = row["epoch"]
    if done % cfg.train.val_every_epochs == 0 or done == planned:
        return True
    if cfg.schedule.horizon != "time":  # will the time budget stop the run after this epoch (should_stop)?
        return bool(broadcast_from_main(env, time_budget_spent(cfg.train, run.elapsed_s + epoch_s)))
    # will the time budget end the run after this epoch?
    return done >= planned_epochs(cfg, [*run.history, row], run.elapsed_s + epoch_s, env)


def validation_row(metrics: SegmentationMetrics) -> dict[str, Any]:
    return {"val_miou": metrics.miou, "val_pixel_accuracy": metrics.pixel_accuracy,
            "val_mean_class_accuracy": metrics.mean_class_accuracy, "val_mean_dice": metrics.mean_dice,
            "val_iou": metrics.iou}


def announced_epochs(cfg: TrainConfig, run: RunState, env: DistEnv) -> int | None:
    """The epochs the ``start`` event announces: those the ``epoch`` events will say (``planned_epochs``), or None
    while a time budget has timed no epoch yet. ``train.epochs`` is then only the budget's cap (a service job's
    time budget sets it to 100000), no number of epochs the run will train; a resumed run has timed some."""
    if cfg.schedule.horizon == "time" and cfg.train.max_time_min is not None and not run.history:
        return None
    return planned_epochs(cfg, run.history, run.elapsed_s, env)


def epoch_event(row: dict[str, Any], planned: int, run: RunState) -> dict[str, Any]:
    """The ``epoch`` line of ``events.jsonl``; the ETA assumes the remaining epochs take the mean time so far."""
    per_epoch_s = mean_epoch_s(run.history, run.elapsed_s)
    return {
        "epoch": row["epoch"], "epochs": planned, "train_loss": row["train_loss"], "lr": row["lr"],
        "images_per_s": row["images_per_s"], "val_miou": row.get("val_miou"), "best_miou": run.best_miou,
        "elapsed_s": round(run.elapsed_s, 2), "eta_s": round(max(0, planned - run.epoch) * per_epoch_s, 2),
        "epoch_time_s": row["epoch_time_s"],
    }


# -- logging and stopping -------------------------------------------------------------


def describe_run(
    cfg: TrainConfig, model: nn.Module, data: DatasetSpec, train_set: TrainSamples, val_set: EvalSamples,
    env: DistEnv, run_dir: Path, amp_dtype: torch.dtype | None, memory_format: torch.memory_format,
) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    return (
        f"run {run_dir}: {cfg.model.arch} ({n_params / 1e6:.2f} M parameters) on {data.name} "
        f"({len(train_set)} train / {len(val_set)} val samples, {data.num_classes} classes); "
        f"device {env.device} x{env.world_size}, amp {amp_dtype or 'off'}{amp_note(cfg.train, amp_dtype)}, "
        f"channels_last {memory_format is torch.channels_last}, threads {torch.get_num_threads()}"
    )


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    text = (f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f}, lr {row['lr']:.2e}, "
            f"{row['images_per_s']:.1f} img/s, {row['epoch_time_s']:.0f} s")
    if "val_miou" in row:
        text += f"; val mIoU {100 * row['val_miou']:.2f}, pixel acc {100 * row['val_pixel_accuracy']:.2f}"
    return text


def check_finite(value: float, epoch: int, step: int) -> None:
    if not math.isfinite(value):  # the recipe's settings diverge: the user's to change, told in one line
        raise InvalidArgument(
            f"training loss became {value} in epoch {epoch + 1} at batch {step + 1}; lower optim.lr, "
            "add train.grad_clip_norm, or use train.amp=bf16 instead of fp16"
        )


def should_stop(loop: LoopConfig, since_best: int, elapsed_s: float, env: DistEnv) -> str | None:
    """Early stopping and the time budget; rank 0 decides for everyone (clocks differ between ranks)."""
    reason = ""
    if loop.early_stopping_patience is not None and since_best >= loop.early_stopping_patience:
        reason = f"no better validation mIoU for {since_best} validations (early stopping)"
    else:
        reason = time_budget_spent(loop, elapsed_s)
    return broadcast_from_main(env, reason) or None


def time_budget_spent(loop: LoopConfig, elapsed_s: float) -> str:
    """Why the time budget ends the run after ``elapsed_s`` of training ("" while it does not)."""
    if loop.max_time_min is not None and elapsed_s >= 60 * loop.max_time_min:
        return f"time budget of {loop.max_time_min} min used ({elapsed_s / 60:.1f} min)"
    return ""


def run(args: argparse.Namespace) -> int:
    """Entry point shared by ``segsvc train`` and ``python -m training``.

    The process's allocator first keeps freed activation and gradient buffers
    (``configure_allocator``): glibc's defaults re-faulted them on every step,
    about 8x the page faults, and the trainer ran 1.1-1.5x slower
    (``bench/bench_recipe_training.py``, membrane-unet and camvid-fcn8s).
    """
    configure_allocator()
    refuse_server_flags(args)
    cfg = load_config(args.config, [*args.overrides, *local_overrides(args)], args.profile)
    if getattr(args, "check", False):
        check_recipe(cfg)
        print("training: the recipe is valid")
        return 0
    try:
        main(cfg, resume=args.resume)
    except Terminated:  # main said how to continue
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except SegsvcError as exc:
        print(f"training: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
