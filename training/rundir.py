"""A run's files: ``runs/<recipe>/<run>/`` and the published model artifact.

The run directory holds ``config.yaml``, ``metrics.jsonl`` (one line per
epoch), ``training_curve.png``, ``checkpoints/last.pt`` (everything needed to
resume, rewritten every epoch) and ``checkpoints/best.pt`` (the weights with the
best validation mIoU). At the end those best weights are published as a
safetensors artifact carrying their validation metrics and class names, and
``artifact.txt`` names it. The artifact's ``training.run_id`` (kept in the
checkpoint) identifies the run, so a resume after a kill between publishing and
recording it finds that version instead of publishing the same model again
(``find_published``). The trainer running in a run directory holds a lock on
its ``run.lock`` (``hold_run_dir``), so a second trainer there is refused.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch import nn

from segsvc.config import InferenceSpec, ModelSpec
from segsvc.data.spec import DatasetSpec
from segsvc.errors import InvalidArgument, ModelConfigError, SegsvcError
from segsvc.files import write_atomic
from segsvc.inference.repository import ModelRepository
from segsvc.models.artifact import model_inference_spec, save_artifact
from training.checkpoint import CheckpointError, RunState, load_checkpoint
from training.config import ConfigError, TrainConfig
from training.distributed import DistEnv, broadcast_from_main, log
from training.events import json_safe
from training.metrics import SegmentationMetrics, nothing_counted

CHECKPOINT = "checkpoints/last.pt"
BEST_WEIGHTS = "checkpoints/best.pt"
CONFIG_FILE = "config.yaml"  # every run directory has one, written when it is created
ARTIFACT_RECORD = "artifact.txt"
LOCK_FILE = "run.lock"  # flocked by the trainer running in the run directory (hold_run_dir)


def prepare_run(cfg: TrainConfig, resume: str | None, env: DistEnv) -> tuple[Path, dict[str, Any] | None]:
    """The run directory (new, or the resumed one) and the checkpoint state to resume from."""
    state = None
    if resume is not None:
        run_dir, ckpt = resume_paths(Path(resume))
        if env.is_main:
            hold_run_dir(run_dir)
        try:
            state = load_checkpoint(ckpt)
        except BaseException:
            release_run_dir(run_dir)
            raise
        warn_config_changes(state.get("config", {}), cfg.to_dict(), env)
    else:
        parent = Path(cfg.output.runs_dir) / cfg.name
        # rank 0 claims the name (creating the directory); every rank must agree on its timestamp
        name = cfg.output.run_name or (fresh_run_name(parent) if env.is_main else None)
        name = broadcast_from_main(env, name)
        run_dir = parent / name
        if env.is_main:
            hold_run_dir(run_dir)
            try:
                start_run_dir(cfg, run_dir)
            except BaseException:
                release_run_dir(run_dir)
                raise
    return run_dir, state


def start_run_dir(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse a run directory holding another run, else write the run's ``config.yaml`` into it."""
    if (run_dir / CHECKPOINT).exists():
        raise InvalidArgument(
            f"run directory {run_dir} already holds a checkpoint: pass --resume {run_dir} "
            "to continue it, or choose another output.run_name"
        )
    refuse_finished_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Paths verbatim, each on one line (no escapes, no folding): a job's served copy is scrubbed of them
    write_atomic(run_dir / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True,
                                                       width=float("inf")).encode("utf-8"))


_HELD: dict[Path, int] = {}  # run directory -> descriptor holding its lock (a resume in-process re-enters)


def hold_run_dir(run_dir: Path) -> None:
    """Lock ``run_dir`` (an exclusive ``flock`` on its ``run.lock``) until ``release_run_dir`` or the process's
    end, ``kill -9`` included: another trainer in the same directory would replace this one's checkpoints
    and rewrite its metrics. A filesystem without locks (some network mounts) trains unlocked.

    The lock belongs to the open file, which ``fork`` shares with the child: a forked DataLoader worker
    would hold it after the trainer's ``kill -9`` until it noticed (seconds later), refusing a restart.
    Forked children close their copy at once (``_close_held_in_child``); ``O_CLOEXEC`` covers ``exec``.
    A folder that cannot be made or whose ``run.lock`` cannot be opened (read-only, not ours) is an
    ``InvalidArgument`` naming it: the trainer could write nothing there.
    """
    key = run_dir.absolute()
    if key in _HELD:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _not_writable("run directory", run_dir, "cannot make it", exc) from None
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _not_writable("run directory", run_dir, f"cannot open its {LOCK_FILE}", exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
        os.close(fd)
        raise InvalidArgument(f"run directory {run_dir} is in use by another trainer"
                              f"{f' (pid {holder})' if holder.isdigit() else ''}: wait for it to end, or choose "
                              "another output.run_name") from None
    except OSError:
        os.close(fd)
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    _HELD[key] = fd


def _not_writable(kind: str, folder: Path, what: str, exc: OSError) -> InvalidArgument:
    """One line for a folder the trainer cannot write in: the folder, what failed and the OS's reason."""
    return InvalidArgument(f"{kind} {folder} is not writable: {what} ({exc.strerror or exc})")


def release_run_dir(run_dir: Path) -> None:
    """Give up ``hold_run_dir``'s lock (the file stays; a lock, not the file, says the directory is in use)."""
    fd = _HELD.pop(run_dir.absolute(), None)
    if fd is not None:
        os.close(fd)


def _close_held_in_child() -> None:
    """In a forked child: close the inherited lock descriptors (never ``LOCK_UN``, which would free the
    parent's lock too), so the lock ends with the trainer, not with its last DataLoader worker."""
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def refuse_finished_run(run_dir: Path) -> None:
    """Refuse a run directory holding a run's results without its checkpoint (deleted to save space): a new run
    there would rewrite its metrics and config. One killed before its first checkpoint has none to lose."""
    try:
        epochs = sum(1 for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines() if line)
    except OSError:  # none yet
        epochs = 0
    if epochs or (run_dir / ARTIFACT_RECORD).exists():
        held = f"metrics.jsonl has {epochs} epoch{'s' if epochs != 1 else ''}" if epochs else ARTIFACT_RECORD
        raise InvalidArgument(f"run directory {run_dir} already holds a run ({held}): choose another "
                              "output.run_name")


def resume_paths(path: Path) -> tuple[Path, Path]:
    """The run directory and checkpoint that ``--resume path`` names: a run directory (its ``checkpoints/last.pt``)
    or ``<run>/checkpoints/<name>.pt``. Anything else is refused: the run writes into its run directory, and a
    checkpoint copied elsewhere would make that an unrelated folder."""
    expected = "a run directory (holding config.yaml) or <run>/checkpoints/<name>.pt inside one"
    if not path.exists():
        raise CheckpointError(f"--resume {path} does not exist: give {expected}")
    if path.is_dir():
        run_dir, ckpt = path, path / CHECKPOINT
    else:
        folder = path.parent if path.parent.name else path.absolute().parent  # "last.pt" given inside checkpoints/
        if folder.name != "checkpoints" or path.suffix != ".pt":
            raise CheckpointError(f"--resume {path} is not a run's checkpoint: give {expected}")
        run_dir, ckpt = folder.parent, path
    if not (run_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"--resume {path}: {run_dir} has no {CONFIG_FILE}, so it is not a run directory; "
                              f"give {expected}")
    return run_dir, ckpt


def fresh_run_name(parent: Path) -> str:
    """Claim a new run directory under ``parent`` and return its name: the UTC timestamp, with a suffix when a
    run of that second already has it. The claim is the directory's creation (``mkdir`` fails when it exists),
    so two runs started in the same second, even in separate processes, never share one."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _not_writable("runs folder", parent, "cannot make it", exc) from None
    for n in range(1, 10_000):
        name = stamp if n == 1 else f"{stamp}-{n}"
        try:
            (parent / name).mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise _not_writable("runs folder", parent, f"cannot make the run directory {name} in it", exc) from None
        return name
    raise InvalidArgument(f"{parent} already holds 9999 runs named {stamp}-N: choose an output.run_name")


def warn_config_changes(old: dict[str, Any], new: dict[str, Any], env: DistEnv, prefix: str = "") -> None:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            warn_config_changes(a, b, env, f"{prefix}{key}.")
        elif a != b:
            log(env, f"warning: resuming with {prefix}{key}={b!r} (the checkpoint was trained with {a!r})")


def write_metrics_file(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """(Re)write ``metrics.jsonl`` from the history, so a resumed run has no duplicated epochs.

    The file is replaced whole (``write_atomic``): a trainer killed meanwhile, or a reader streaming it, never
    sees it truncated.
    """
    write_atomic(run_dir / "metrics.jsonl", "".join(metrics_line(row) for row in history).encode())


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(metrics_line(row))


def metrics_line(row: dict[str, Any]) -> str:
    """One row of ``metrics.jsonl``: strict JSON, a NaN (an absent class's IoU) written as null."""
    return json.dumps(json_safe(row), allow_nan=False) + "\n"


def save_best(run_dir: Path, model: nn.Module, epoch: int, metrics: SegmentationMetrics, names: Sequence[str]) -> None:
    path = run_dir / BEST_WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "epoch": epoch, "metrics": metrics.to_dict(list(names))}, tmp)
    os.replace(tmp, path)


def val_contract(cfg: TrainConfig, model: nn.Module, shift: tuple[float, float] = (0.0, 0.0)) -> InferenceSpec:
    """How validation runs the model, and so the artifact's inference contract.

    The recipe's ``data.val_scale`` and ``data.val_tile_*`` with the model's
    stride and minimum input size; flip TTA with ``data.val_flip``, multi-scale
    TTA with ``data.val_tta_scales``; ``shift``, the label offset ``data.register``
    measured on the training images.
    """
    d = cfg.data
    try:
        return model_inference_spec(model, scale=d.val_scale, tile_size=d.val_tile_size,
                                    tile_overlap=d.val_tile_overlap, tile_padding=d.val_tile_padding,
                                    flip_tta=d.val_flip, tta_scales=tuple(d.val_tta_scales), shift=shift)
    except ModelConfigError as exc:
        raise ConfigError(f"data.val_scale/val_tile_*/val_tta_scales: {exc}") from None


def publish(
    cfg: TrainConfig,
    spec: ModelSpec,
    data: DatasetSpec,
    run_dir: Path,
    model: nn.Module,
    history: list[dict[str, Any]],
    elapsed_s: float,
    contract: InferenceSpec,
    run_id: str = "",
) -> Path:
    """Write the best validated weights as a model artifact carrying their metrics and class names.

    The artifact's inference ``contract`` is how those metrics were measured
    (``val_contract``: the recipe's ``data.val_scale``, ``data.val_tile_*`` and TTA,
    the model's stride and minimum input size, the registered label shift), so
    the server reproduces the validation numbers. ``run_id`` (``RunState.run_id``) is
    recorded in the manifest's training section, for ``find_published``.
    """
    best_path = run_dir / BEST_WEIGHTS
    if best_path.exists():
        best = torch.load(best_path, map_location="cpu", weights_only=True)
        model.load_state_dict(best["model"])
        metrics, best_epoch = dict(best["metrics"]), int(best["epoch"])
    else:  # validation never ran: publish the last weights without metrics (it ran and measured nothing: refused)
        refuse_unmeasured_run(cfg, data, history)
        metrics, best_epoch = {}, len(history)
    model = model.to("cpu", memory_format=torch.contiguous_format)
    metrics.update(split=cfg.data.val_split, epoch=best_epoch, val_scale=cfg.data.val_scale)
    training = {
        "recipe": cfg.name,
        "dataset": data.name,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "train_time_s": round(elapsed_s, 1),
        "run_dir": str(run_dir),
        **({"run_id": run_id} if run_id else {}),
        "host": f"{platform.node()} ({platform.processor() or platform.machine()}), torch {torch.__version__}",
        "config": cfg.to_dict(),
    }
    artifact = save_artifact(
        model, cfg.output.repo, cfg.model_name, spec=spec, input_spec=data.input_spec(),
        class_names=list(data.class_names), palette=[tuple(c) for c in data.palette],
        ignore_index=data.ignore_index, training=training, metrics=metrics,
        inference=contract,
    )
    record_artifact(run_dir, artifact)
    print(f"{best_line(best_epoch, metrics)}\nartifact: {artifact}")
    return artifact


def best_line(best_epoch: int, metrics: dict[str, Any]) -> str:
    """The closing line: the published epoch's validation in percent, as the epoch lines and ``segsvc eval``
    say it."""
    miou, accuracy = metrics.get("miou"), metrics.get("pixel_accuracy")
    if miou is None or accuracy is None:
        return f"best epoch {best_epoch}: not validated"
    return f"best epoch {best_epoch}: val mIoU {100 * miou:.2f}, pixel accuracy {100 * accuracy:.2f}"


def refuse_unmeasured_run(cfg: TrainConfig, data: DatasetSpec, history: Sequence[dict[str, Any]]) -> None:
    """Refuse to publish a run whose every validation counted no pixel (its masks all void: mIoU NaN).

    No epoch was the best of such a run, so ``best.pt`` was never written; its last weights would be
    published as the "best epoch" without metrics, as if validation had never run.
    """
    scores = [row["val_miou"] for row in history if "val_miou" in row]
    if scores and not any(isinstance(s, (int, float)) and math.isfinite(s) for s in scores):
        raise nothing_counted(f"data.val_split {cfg.data.val_split!r} of {data.name}", data.ignore_index,
                              data.num_classes)


def record_artifact(run_dir: Path, artifact: Path) -> None:
    """``artifact.txt``: the version this run published."""
    write_atomic(run_dir / ARTIFACT_RECORD, f"{artifact}\n".encode())


def find_published(cfg: TrainConfig, run: RunState) -> Path | None:
    """The version an earlier attempt of this run already published from the same epochs, if any.

    A run killed after ``save_artifact`` but before recording it (``artifact.txt``, the ``published``
    event) is resumed from its last checkpoint and would publish the same weights again as a new
    version. That version's manifest records the run's ``run_id`` and ``epochs_run``; a resume that
    trained further publishes anew.
    """
    repository = ModelRepository(cfg.output.repo)
    try:
        versions = repository.versions(cfg.model_name)
    except SegsvcError:  # no such model yet
        return None
    for version in reversed(versions):
        try:
            training = repository.read_manifest(cfg.model_name, version).training
        except SegsvcError:  # unreadable: not ours to judge
            continue
        if training.get("run_id") == run.run_id and training.get("epochs_run") == len(run.history):
            return repository.version_dir(cfg.model_name, version)
    return None

