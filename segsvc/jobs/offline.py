"""``segsvc batch``: segment a folder of images with no server, resumable after a crash.

The job's state is a ``JobStore`` at ``<out>/.segsvc-batch.sqlite`` holding one
job (kind ``batch``) with one item per input; the files follow the layout of
``segsvc.jobs.outputs``. The inputs are registered ``REGISTER_CHUNK`` per
transaction; a run killed meanwhile is completed by the same command again (or
``--resume``), each input once. An item is marked DONE, with its ``results.jsonl``
record, only after its files are renamed into place, so after ``kill -9`` a
``--resume`` redoes at most the items that were in flight (rewriting the same
names) and the finished folder holds exactly one output per input.

Two engines compute the same files:

* ``local``: one process, a pipeline of decode threads -> batched forward
  passes on the calling thread (images grouped by the engine's batching key)
  -> encode/write threads, with every stage bounded so memory stays flat
  however many images there are.
* ``ray``: Ray Data, ``map_batches`` over a pool of actors that each load the
  model once and decode, predict and write their batch; the driver records the
  outcomes in the store. Ray is an optional extra (``pip install 'segsvc[ray]'``)
  imported only here, when asked for.

Example:
    >>> summary = run_batch(["photos/"], model_repo="runs/model_repository", model="camvid-unet",
    ...                     out="runs/batch/photos")  # doctest: +SKIP
    >>> summary["counts"]  # doctest: +SKIP
    {'total': 120, 'done': 119, 'failed': 1, 'skipped': 0}
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import itertools
import json
import logging
import os
import posixpath
import re
import resource
import sqlite3
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

import numpy as np
import torch

from segsvc.errors import AlreadyExists, FailedPrecondition, ImageTooLarge, InvalidArgument, SegsvcError
from segsvc.inference.admission import MIB, AdmissionConfig, Cost
from segsvc.inference.backends import Backend, TorchBackend, open_backend
from segsvc.inference.codec import DEFAULT_MAX_PIXELS, check_pixels, decode_image, image_header
from segsvc.inference.engine import Engine, EngineConfig, InferenceOptions, Output, resolve_device
from segsvc.inference.predictor import Predictor
from segsvc.inference.repository import ModelRepository, parse_model_ref
from segsvc.jobs.inputs import GLOB_CHARS, InputFile, add_unique, resolve_inputs
from segsvc.jobs.outputs import (
    JobOutputs, checked_inputs, clean_temporaries, input_name_problem, item_write_problem,
)
from segsvc.jobs.store import Item, Job, JobStore
from segsvc.progress import progress_bar

log = logging.getLogger(__name__)

STATE_FILE = ".segsvc-batch.sqlite"
# Held (flock) by the run writing the folder: a second run, --resume included, would delete the first one's
# temporaries and write the same files. Never deleted: a run unlinking it could let a third one lock a new
# file while a second still holds the old one.
LOCK_FILE = ".segsvc-batch.lock"
JOB_KIND = "batch"
# Inputs registered per store transaction: millions in one would grow the WAL and the page cache with the input
# count, and a crash would lose them all. A run killed between chunks leaves the job with a prefix of its items;
# the same command again, or --resume, finds it by REGISTRATION_KEY and registers the rest.
REGISTER_CHUNK = 10_000
# The most inputs one batch takes. Listing holds every name before registration (``batch_inputs``): about
# 0.6 KB each, 0.8 KB at the listing's peak (measured with tracemalloc over 20,000 names), so up to ~8 GB here.
MAX_INPUTS = 10_000_000
REGISTRATION_KEY = "segsvc-batch"  # the job's request_id: the one job of its state file
ENGINES = ("local", "ray")
# Items per Ray dataset: the driver builds the rows of one page at a time, not of every input. Each page starts
# its actors again: a model load per actor per RAY_PAGE images.
RAY_PAGE = 100_000
PROGRESS_EVERY_S = 2.0
# Forward passes on CPU stop gaining from bigger batches once a batch outgrows the caches. With one
# single-threaded pass per core (forward_streams), bench/bench_batch.py's 256x256 images on 2 cores ran at
# 88-90 images/s one per pass, 85-87 two per pass and 65-69 four per pass. So on CPU a batch also ends at
# this many input pixels; GPUs batch by count.
CPU_BATCH_PIXELS = 1 << 16
# --max-inflight-mb auto: this share of the memory available where the passes run when the run starts
# (``available_memory``); the rest is left to the decoded images waiting for a pass, the writes and the process.
# The estimates it is held against are high already: a 2000x2000 image estimated at 2157 MiB for the synthetic
# model took 1632 MiB, and at half, an image that had run was refused on a machine that could run it.
AUTO_MEMORY_SHARE = 0.75
# --max-inflight-mb auto where the memory available cannot be read: the server's default budget.
FALLBACK_INFLIGHT_MB = AdmissionConfig.max_inflight_mb
# Tile sides suggested to an image over the budget untiled (the largest that fits is named).
SUGGESTED_TILES = (2048, 1024, 512, 256, 128)
# A cgroup v1 memory limit this large is no limit (the kernel's "unlimited" is 2^63 rounded down to a page).
_NO_CGROUP_LIMIT = 1 << 62
# An error of a forward pass that says memory ran out: torch's CPU allocator ("DefaultCPUAllocator: can't
# allocate memory"), CUDA's ("CUDA out of memory"), ONNX Runtime's ("Failed to allocate memory").
_OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|cannot allocate memory|failed to allocate memory",
                            re.IGNORECASE)

# (item index, results.jsonl record or None, failure reason or None)
Outcome = tuple[int, "dict[str, Any] | None", "str | None"]


@dataclass(frozen=True)
class BatchOptions:
    """Everything the output files depend on; stored in the job so ``--resume`` cannot mix settings.

    Args:
        tile_size: sliding-window tile side in pixels; 0 runs whole images; None: the model's default.
        flip_tta: average with the horizontally mirrored image's logits; None: the model's default.
        color: also write ``color/<rel>.png``.
        overlay: also write ``overlay/<rel>.png`` (colours blended over the image).
        confidence: also write ``confidence/<rel>.png`` and each record's mean confidence.
        alpha: overlay opacity.
    """

    tile_size: int | None = None
    flip_tta: bool | None = None
    color: bool = False
    overlay: bool = False
    confidence: bool = False
    alpha: float = 0.5

    def __post_init__(self) -> None:
        InferenceOptions(tile_size=self.tile_size, flip_tta=self.flip_tta)  # same checks as the server
        if not 0.0 <= self.alpha <= 1.0:
            raise InvalidArgument(f"overlay alpha must be in [0, 1], got {self.alpha}")


def _is_pattern(part: str) -> bool:
    return bool(GLOB_CHARS.intersection(part))


def split_input(spec: str) -> tuple[str, tuple[str, ...]]:
    """An absolute input as (its literal path, the pattern parts below it; () when it has none).

    A part with ``*?[`` is literal when the path up to it exists, so a folder named ``d[12]`` is that
    folder; the first part that does not exist starts the pattern. ``_open_job`` makes every input absolute
    first, so the current folder a relative input was typed in is literal in the same way: it exists (a
    ``d[12]`` current folder must not match ``d1``); only what the user typed can be a pattern.
    """
    parts = Path(spec).parts
    base, typed = parts[0], parts[1:]
    n = 0
    while n < len(typed) and (not _is_pattern(typed[n]) or os.path.lexists(os.path.join(base, *typed[:n + 1]))):
        n += 1
    return os.path.normpath(os.path.join(base, *typed[:n])), typed[n:]


def input_root(specs: Sequence[str]) -> Path:
    """The folder input names are relative to: the folder itself when one folder is given,
    else the common parent of the inputs (a glob counts from its literal leading folders)."""
    if not specs:
        raise InvalidArgument("no inputs given: name image files, folders or glob patterns")
    root = Path(os.path.commonpath([split_input(spec)[0] for spec in specs]))
    return root if root.is_dir() else root.parent


def batch_inputs(specs: Sequence[str], max_files: int = MAX_INPUTS) -> tuple[Path, list[InputFile]]:
    """The root the outputs are named from, and the files ``specs`` name below it, sorted by name.

    Each input goes to ``resolve_inputs`` relative to the root, so only its typed pattern parts can
    match as patterns. An input whose literal folders below the root hold ``*?[`` cannot be written
    that way (they would be read as a pattern): it is resolved from its own literal folder instead.

    Every name is held in memory before registration: registration is idempotent in the sorted
    order, and an input named twice is found by its resolved path (``inputs.add_unique`` picks the
    name it keeps: its own, not a symlink's, when both are named), which both need them all (a
    walk yields depth-first, not sorted). The bound is ``max_files`` over all ``specs`` together:
    each listing stops as it passes ``max_files`` files (or ``inputs.ENTRIES_PER_FILE`` folder
    entries per file), and their union is refused as it passes ``max_files`` too, so at most about
    twice ``max_files`` names are held (``MAX_INPUTS``: the memory each costs).
    """
    root = input_root(specs)
    real_root = Path(os.path.realpath(root))
    plain: list[str] = []
    unique: dict[Path, InputFile] = {}
    for spec in specs:
        base, pattern = split_input(spec)
        literal = Path(os.path.relpath(base, root)).as_posix()
        if not _is_pattern(literal):
            plain.append(posixpath.join(literal, *pattern))
        else:
            _add_inputs(unique, _resolve_alone(root, spec, base, pattern, max_files), real_root, max_files)
    if plain:
        _add_inputs(unique, resolve_inputs(root, plain, max_files=max_files), real_root, max_files)
    return root, sorted(unique.values(), key=lambda f: f.rel)


def _add_inputs(unique: dict[Path, InputFile], files: Iterable[InputFile], real_root: Path, max_files: int) -> None:
    """Add ``files`` to ``unique`` by resolved path (one file named twice is segmented once, under the name
    ``inputs.add_unique`` keeps); refuse once ``unique`` holds more than ``max_files``."""
    for file in files:
        add_unique(unique, file, real_root)
    if len(unique) > max_files:
        raise InvalidArgument(f"inputs name more than {max_files} files (counted {len(unique)} before stopping): "
                              "split the batch or narrow the inputs")


def _resolve_alone(root: Path, spec: str, base: str, pattern: tuple[str, ...], max_files: int) -> list[InputFile]:
    """``spec``'s files, resolved from its literal folder ``base`` (its parent for a file), named from ``root``."""
    if pattern or os.path.isdir(base):
        start, rel_spec = base, posixpath.join(".", *pattern)
    else:  # a file: matched by its escaped name, the one way resolve_inputs takes a name holding *?[ literally
        start, rel_spec = os.path.dirname(base), glob.escape(os.path.basename(base))
    if not os.path.isdir(start):
        raise InvalidArgument(f"input {spec!r} matches no image: {start} is not a folder")
    prefix = Path(os.path.relpath(start, root)).as_posix()
    return [InputFile(f.path, posixpath.normpath(posixpath.join(prefix, f.rel)))
            for f in resolve_inputs(start, [rel_spec], max_files=max_files)]


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def load_failure(exc: BaseException) -> bool:
    """Whether reading, decoding or preparing one input failed for that input (unreadable, undecodable, too
    large, or memory ran out): it fails alone and the run goes on."""
    return isinstance(exc, (SegsvcError, OSError)) or out_of_memory(exc)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says that memory ran out (Python's ``MemoryError``, torch's ``OutOfMemoryError`` or an
    allocator's ``RuntimeError``): one image's failure, not a broken model."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", MemoryError)
    if isinstance(exc, (MemoryError, oom)):
        return True
    return isinstance(exc, Exception) and not isinstance(exc, SegsvcError) and bool(_OUT_OF_MEMORY.search(str(exc)))


def _read_int(path: str | Path, prefix: str = "") -> int | None:
    """The integer in file ``path`` (with ``prefix``: the first number on its line starting so), else None."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    if prefix:
        text = next((line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)), "")
    match = re.match(r"\s*(\d+)", text)
    return int(match[1]) if match else None


def _cgroup_room(proc: Path, cgroup_fs: Path) -> int | None:
    """Bytes the process's memory cgroup (a container's limit) lets it allocate still: the least room
    (limit less usage) of its cgroup and the ones above it, v2 or v1; None without a limit."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    folders: list[tuple[Path, str, str]] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: the unified hierarchy
            mount, files = cgroup_fs, ("memory.max", "memory.current", "inactive_file ")
        elif "memory" in controllers.split(","):
            mount, files = cgroup_fs / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                  "total_inactive_file ")
        else:
            continue
        parts = Path(path.strip() or "/").parts[1:]
        # Inside a container the cgroup named here is mounted as the root: both places are read.
        folders += [(mount.joinpath(*parts[:n]), *files) for n in range(len(parts), -1, -1)]
    rooms = []
    for folder, limit_file, usage_file, cache_line in folders:
        limit, usage = _read_int(folder / limit_file), _read_int(folder / usage_file)
        if limit is not None and usage is not None and limit < _NO_CGROUP_LIMIT:
            # The usage counts the page cache the kernel reclaims when the limit nears (the images this run
            # and earlier ones read): as MemAvailable does, it is left out (a container that had read 7 GiB of
            # images had 200 MiB of room by usage alone, and every image of the next batch failed).
            reclaimable = _read_int(folder / "memory.stat", cache_line) or 0
            rooms.append(max(limit - max(usage - reclaimable, 0), 0))
    return min(rooms) if rooms else None


def _address_space_room(proc: Path) -> int | None:
    """Bytes of address space the process may map still under its limit (``ulimit -v``); None without one."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    size_kb = _read_int(proc / "self" / "status", "VmSize:")
    return None if size_kb is None else max(soft - size_kb * 1024, 0)


def available_memory(device: torch.device, proc: Path = Path("/proc"),
                     cgroup_fs: Path = Path("/sys/fs/cgroup")) -> tuple[int, str] | None:
    """Bytes that the forward passes on ``device`` may take now, and what bounds them (for messages);
    None when that cannot be read.

    On CUDA, the device's free memory. On CPU, the host's ``MemAvailable``, or less when the process's
    cgroup (a container's memory limit, its reclaimable page cache counted as room) leaves less. The
    address-space limit (``ulimit -v``) is ``_address_space_room``'s: it bounds this process alone.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    kb = _read_int(proc / "meminfo", "MemAvailable:")
    bounds = [(kb * 1024 if kb is not None else None, "available"),
              (_cgroup_room(proc, cgroup_fs), "left under the memory cgroup's limit")]
    known = [(room, what) for room, what in bounds if room is not None]
    return min(known) if known else None


def inflight_budget(max_inflight_mb: int | None, device: torch.device, share: int = 1) -> tuple[int, str]:
    """The memory budget, in bytes, of the forward passes in flight, and how it was set (for messages).

    ``max_inflight_mb`` None is ``auto``: ``AUTO_MEMORY_SHARE`` of ``available_memory``, divided by ``share``
    (Ray actors sharing one machine's memory); ``FALLBACK_INFLIGHT_MB`` where that cannot be read; on the CPU at
    most the room under this process's address-space limit (``ulimit -v``), whole: it is this process's own, and
    most of what the process has mapped at the start is reserved, not used (3.5 GiB of VmSize, so half of the
    rest refused a 2000x2000 image that ran under ``ulimit -v 6000000``).
    """
    if max_inflight_mb is not None:
        return max_inflight_mb * MIB, f"--max-inflight-mb {max_inflight_mb}"
    found = available_memory(device)
    space = _address_space_room(Path("/proc")) if device.type == "cpu" else None
    per = f", divided among {share} actors" if share > 1 else ""
    if found is not None and (space is None or int(found[0] * AUTO_MEMORY_SHARE) <= space):
        room, what = found
        return (max(int(room * AUTO_MEMORY_SHARE) // share, MIB),
                f"--max-inflight-mb auto: {AUTO_MEMORY_SHARE:.0%} of the {room / MIB:.0f} MiB {what}{per}")
    if space is not None:
        return (max(space // share, MIB),
                f"--max-inflight-mb auto: the {space / MIB:.0f} MiB left under the address-space limit "
                f"(ulimit -v){per}")
    return FALLBACK_INFLIGHT_MB * MIB, f"--max-inflight-mb auto: {FALLBACK_INFLIGHT_MB} MiB, the memory " \
                                      "available being unknown"


class ItemWorker:
    """One loaded model version and what each input goes through; shared by both engines.

    ``load`` runs on I/O threads, ``predict`` on the one thread that owns the
    model, ``write`` on I/O threads again; ``process`` chains them for a Ray actor.

    Memory is bounded as the server's admission bounds it: each image's peak is estimated from the model's
    measured bytes per pixel (``Engine.cost``, the server's ``admission.estimate``) against
    ``max_inflight_bytes`` (``inflight_budget``: ``max_inflight_mb``, or with None a share of the memory
    available, divided by ``memory_share``). ``load`` refuses an image over it alone (``check_memory``) before
    decoding it; a pass ends before a further image would take it over (``batch_full``), and the local engine
    starts no pass that would take the passes in flight over it.
    """

    def __init__(self, model_repo: str, model: str, version: int, out: str, options: BatchOptions,
                 device: str = "cpu", precision: str = "auto", batch_size: int = 8,
                 max_batch_pixels: int | None = -1, backend: str | None = None,
                 max_inflight_mb: int | None = None, memory_share: int = 1) -> None:
        config = EngineConfig(device=device, precision=precision, warmup=False, backend=backend)
        torch_device = resolve_device(device)
        net, manifest = open_backend(ModelRepository(model_repo), model, version, torch_device, config)
        self.engine = Engine(Predictor(net, manifest), config)
        self.engine.measure_memory()  # bytes per pixel, for the images' memory estimates (as the server loads)
        self.max_inflight_bytes, self.budget_source = inflight_budget(max_inflight_mb, torch_device, memory_share)
        log.info("memory budget of the forward passes: %d MiB (%s); %.0f bytes per pixel",
                 self.max_inflight_bytes // MIB, self.budget_source, self.engine.bytes_per_pixel)
        if max_batch_pixels == -1:  # by device
            max_batch_pixels = CPU_BATCH_PIXELS if torch_device.type == "cpu" else None
        self.max_batch_pixels = max_batch_pixels
        self.manifest = manifest
        self.outputs = JobOutputs(out)
        self.options = options
        self.batch_size = batch_size
        self.inference = InferenceOptions(tile_size=options.tile_size, flip_tta=options.flip_tta,
                                          confidence=options.confidence, class_counts=True)

    def load(self, path: str | Path) -> tuple[np.ndarray, Any, float]:
        """Read, decode and preprocess one file: (image, prepared item, milliseconds).

        Raises:
            ImageTooLarge: over the pixel limit, or its memory estimate alone is over the budget (checked
                from its header before decoding, then from the decoded image).
        """
        t0 = time.perf_counter()
        data = Path(path).read_bytes()
        header = image_header(data)
        check_pixels(header.height, header.width, DEFAULT_MAX_PIXELS)
        self.check_memory(self.engine.cost(header.height, header.width, self.inference), header.height, header.width)
        image = decode_image(data, DEFAULT_MAX_PIXELS)
        del data
        prepared = self.engine.prepare(image, self.inference)
        self.check_memory(prepared.cost, *image.shape[:2])  # as decoded (turned upright: EXIF orientation)
        return image, prepared, (time.perf_counter() - t0) * 1e3

    def check_memory(self, cost: Cost, height: int, width: int) -> None:
        """Refuse an image whose estimated peak memory alone is over the budget, saying what to change:
        the tile size (one that fits is named) or the budget; the server's ``AdmissionConfig.check`` in
        this command's words."""
        budget = self.max_inflight_bytes
        if cost.peak_bytes <= budget:
            return
        over = (f"the {width}x{height} image needs about {cost.peak_bytes / MIB:.0f} MiB"
                f"{' untiled' if not cost.tiled else ''}, over this batch's memory budget of {budget / MIB:.0f} "
                f"MiB ({self.budget_source})")
        again = "in a new batch (--resume does not retry failed inputs)"
        if cost.full_size_bytes >= budget:
            raise ImageTooLarge(
                f"{over}, even tiled: its full-size accumulators (image, outputs, per-class logit sums and "
                f"weights) alone need about {cost.full_size_bytes / MIB:.0f} MiB, whatever the tile size; "
                f"downscale it, or raise --max-inflight-mb on a machine with that memory, {again}")
        fits = self.fitting_tile(height, width, cost)
        tile = f"--tile-size {fits[0]} (about {fits[1] / MIB:.0f} MiB)" if fits else "a smaller --tile-size"
        how = f"use smaller tiles: {tile}" if cost.tiled else f"tile it with {tile}"
        raise ImageTooLarge(f"{over}; {how}, raise --max-inflight-mb or downscale it, {again}")

    def fitting_tile(self, height: int, width: int, cost: Cost) -> tuple[int, int] | None:
        """The largest ``SUGGESTED_TILES`` side (smaller than the tiles ``cost`` has) whose estimate fits the
        budget, with that estimate; None when none does."""
        current = self.engine.resolve(self.inference).tile_size if cost.tiled else None
        for side in SUGGESTED_TILES:
            if current and side >= current:
                continue
            peak = self.engine.cost(height, width, replace(self.inference, tile_size=side)).peak_bytes
            if peak <= self.max_inflight_bytes:
                return side, peak
        return None

    def predict(self, prepared: list[Any]) -> tuple[list[Output], float]:
        """Outputs of same-key items, and the forward pass's milliseconds per item."""
        t0 = time.perf_counter()
        outputs = self.engine.run(prepared)
        return outputs, (time.perf_counter() - t0) * 1e3 / max(1, len(prepared))

    def write(self, index: int, rel: str, image: np.ndarray | None, output: Output, ms: float) -> Outcome:
        """Write one item's files (renamed into place) and build its results record."""
        t0 = time.perf_counter()
        opts = self.options
        self.outputs.write_item(rel, output.labels, palette=self.manifest.palette, image=image,
                                confidence=output.confidence, color=opts.color, overlay=opts.overlay,
                                alpha=opts.alpha)
        record = JobOutputs.item_record(
            rel, output.labels, class_names=self.manifest.class_names, model=self.manifest.name,
            version=self.manifest.version, confidence=output.confidence, counts=output.class_counts,
            ms=ms + (time.perf_counter() - t0) * 1e3,
        )
        return index, record, None

    def write_or_fail(self, index: int, rel: str, image: np.ndarray | None, output: Output, ms: float) -> Outcome:
        """``write``, with an error about this item's output path made its failure (``outputs.ITEM_WRITE_ERRNOS``)."""
        try:
            return self.write(index, rel, image, output, ms)
        except (SegsvcError, OSError) as exc:
            problem = item_write_problem(exc, self.outputs.root)
            if problem is None:
                raise
            log.debug("input %s failed: %s", rel, problem)
            return index, None, problem

    def batch_full(self, prepared: Sequence[Any]) -> bool:
        """Whether same-key items fill a batch: ``batch_size`` of them, the pixel budget, or one more like them
        would take the pass's estimated memory over the budget."""
        if len(prepared) >= self.batch_size:
            return True
        budget = self.max_batch_pixels
        if budget is not None and sum(p.pixels for p in prepared) >= budget:
            return True
        peaks = [p.cost.peak_bytes for p in prepared]
        return bool(peaks) and sum(peaks) + max(peaks) > self.max_inflight_bytes

    def pass_failure(self, exc: Exception, prepared: Sequence[Any]) -> str | None:
        """The reason a forward pass of ``prepared`` failed, when it is theirs (None: the run's error, such as a
        model broken for every image, which stops the run). A pass refusing an input (``InvalidArgument``), and
        one that ran out of memory, are theirs: retried one image per pass, they fail only the images that
        fail alone."""
        if isinstance(exc, InvalidArgument):
            return _reason(exc)
        if out_of_memory(exc):
            peak = sum(p.cost.peak_bytes for p in prepared)
            first = _first_line(_reason(exc))
            return (f"its forward pass ran out of memory ({type(exc).__name__}: {first}) although its estimate, "
                    f"about {peak / MIB:.0f} MiB, was within this batch's memory budget of "
                    f"{self.max_inflight_bytes / MIB:.0f} MiB ({self.budget_source}): other programs may have "
                    "taken the memory; segment it in a new batch (--resume does not retry failed inputs) with a "
                    "smaller --max-inflight-mb or a --tile-size")
        return None

    def process(self, rows: Sequence[tuple[int, str, str]]) -> list[Outcome]:
        """(index, path, rel) rows -> outcomes, sequentially: one Ray actor's batch."""
        outcomes: list[Outcome] = []
        groups: dict[Hashable, list[tuple[int, str, np.ndarray, Any, float]]] = {}
        for index, path, rel in rows:
            try:
                image, prepared, ms = self.load(path)
            except Exception as exc:
                if not load_failure(exc):
                    raise
                outcomes.append((index, None, _reason(exc)))
                continue
            groups.setdefault(prepared.key, []).append((index, rel, image, prepared, ms))
        for group in groups.values():
            chunk: list[tuple[int, str, np.ndarray, Any, float]] = []
            for entry in group:
                chunk.append(entry)
                if self.batch_full([g[3] for g in chunk]) or entry is group[-1]:
                    outcomes.extend(self._predict_and_write(chunk))
                    chunk = []
        return outcomes

    def _predict_and_write(self, chunk: list[tuple[int, str, np.ndarray, Any, float]]) -> list[Outcome]:
        """One forward pass and its writes; a pass failing for its inputs (``pass_failure``: refused, out of
        memory) is retried per image so that only the images that fail alone fail. Any other error (a broken
        model) would fail every image alike: it stops the run, and --resume redoes it."""
        try:
            outputs, fwd_ms = self.predict([g[3] for g in chunk])
        except Exception as exc:
            reason = self.pass_failure(exc, [g[3] for g in chunk])
            if reason is None:
                raise
            if len(chunk) > 1:
                return [o for entry in chunk for o in self._predict_and_write([entry])]
            log.debug("input %s failed in its forward pass: %s", chunk[0][1], reason)
            return [(chunk[0][0], None, reason)]
        return [self.write_or_fail(index, rel, image, output, ms + fwd_ms)
                for (index, rel, image, _, ms), output in zip(chunk, outputs)]


def forward_streams(backend: Backend) -> int:
    """Concurrent forward passes for the local engine: one per torch CPU thread for eager PyTorch on CPU,
    else one (a GPU, or ONNX Runtime, whose session has its own thread pool).

    On CPU, N passes with one thread each beat one pass with N threads: a small
    model's convolutions do not split evenly over threads, and each split pass
    waits for its slowest thread (bench/bench_batch.py, 2 cores: ~1.4x).
    """
    if isinstance(backend, TorchBackend) and backend.device.type == "cpu":
        return max(1, torch.get_num_threads())
    return 1


@contextlib.contextmanager
def single_threaded_torch(enabled: bool) -> Iterator[None]:
    """torch's intra-op pool at one thread for the duration (restored after), when ``enabled``."""
    before = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if enabled:
            torch.set_num_threads(before)


def run_local(worker: ItemWorker, items: Iterable[Item], root: Path, on_outcome: Callable[[Outcome], None],
              *, io_threads: int = 0) -> None:
    """The ``local`` engine: decode threads -> batched forward passes -> write threads.

    On CPU, ``forward_streams`` passes run at once, each on one torch thread
    (torch's thread count is set to 1 for the run and restored after), as many
    as the memory budget holds (``ItemWorker``: their estimates together stay
    within ``max_inflight_bytes``). Every
    stage is bounded (decodes in flight, images held for batching, passes and
    writes in flight), so memory does not grow with the number of inputs;
    ``items`` is read as the decoders need more (``JobStore.iter_items``: a page
    of the store at a time).
    Outcomes are delivered on this thread, so the caller's store needs no
    locking discipline.
    """
    streams = forward_streams(worker.engine.backend)
    threads = io_threads or min(4, os.cpu_count() or 1)
    batch_size = worker.batch_size
    max_decoding, max_held, max_writing = 2 * batch_size + threads, 2 * batch_size, 2 * batch_size + threads
    keep_image = worker.options.overlay
    todo = iter(items)
    decoding: deque[tuple[Item, Future]] = deque()
    groups: dict[Hashable, list[tuple[Item, np.ndarray | None, Any, float]]] = {}
    forwarding: dict[Future, list[tuple[Item, np.ndarray | None, Any, float]]] = {}
    waiting: deque[list[tuple[Item, np.ndarray | None, Any, float]]] = deque()  # passes to start (start_passes)
    writing: set[Future] = set()

    with (
        single_threaded_torch(streams > 1),
        ThreadPoolExecutor(threads, "segsvc-decode") as decoders,
        ThreadPoolExecutor(streams, "segsvc-forward") as forwarders,
        ThreadPoolExecutor(threads, "segsvc-write") as writers,
    ):

        def refill() -> None:
            while len(decoding) < max_decoding and (item := next(todo, None)) is not None:
                decoding.append((item, decoders.submit(worker.load, root / item.input)))

        def reap_writes(limit: int) -> None:
            while len(writing) > limit:
                wait(writing, return_when=FIRST_COMPLETED)
                for fut in [f for f in writing if f.done()]:
                    writing.discard(fut)
                    on_outcome(fut.result())  # a failed write (disk full) stops the run: --resume redoes it

        def pass_bytes(group: list[tuple[Item, np.ndarray | None, Any, float]]) -> int:
            return sum(g[2].cost.peak_bytes for g in group)

        def start_passes() -> None:
            """Start the waiting passes, in order, while at most ``streams`` are in flight (one queued behind
            the running ones keeps every stream busy) and the memory budget has room: a pass starts when it
            and the passes in flight stay within ``worker.max_inflight_bytes``, or alone."""
            while waiting and len(forwarding) <= streams:
                if forwarding and sum(map(pass_bytes, forwarding.values())) + pass_bytes(waiting[0]) > \
                        worker.max_inflight_bytes:
                    return
                group = waiting.popleft()
                forwarding[forwarders.submit(worker.predict, [g[2] for g in group])] = group

        def reap_forwards(limit: int) -> None:
            """Hand finished passes to the writers and start waiting ones; block while any waits or more
            than ``limit`` are in flight."""
            while True:
                for fut in [f for f in forwarding if f.done()]:
                    group = forwarding.pop(fut)
                    try:
                        outputs, fwd_ms = fut.result()
                    except Exception as exc:
                        reason = worker.pass_failure(exc, [g[2] for g in group])
                        if reason is None:  # a model broken for every image stops the run: --resume redoes it
                            raise
                        if len(group) > 1:  # refused or out of memory: find which, one image per pass
                            waiting.extend([entry] for entry in group)
                        else:
                            log.debug("input %s failed in its forward pass: %s", group[0][0].input, reason)
                            on_outcome((group[0][0].index, None, reason))
                        continue
                    for (item, image, _, ms), output in zip(group, outputs):
                        writing.add(writers.submit(worker.write_or_fail, item.index, item.input, image, output,
                                                   ms + fwd_ms))
                start_passes()
                if not waiting and len(forwarding) <= limit:
                    break
                wait(forwarding, return_when=FIRST_COMPLETED)
            reap_writes(max_writing)

        def forward(key: Hashable) -> None:
            waiting.append(groups.pop(key))
            reap_forwards(streams)

        refill()
        while decoding:
            item, fut = decoding.popleft()
            refill()
            try:
                image, prepared, ms = fut.result()
            except Exception as exc:
                if not load_failure(exc):
                    raise
                on_outcome((item.index, None, _reason(exc)))
                continue
            group = groups.setdefault(prepared.key, [])
            group.append((item, image if keep_image else None, prepared, ms))
            if worker.batch_full([g[2] for g in group]):
                forward(prepared.key)
            elif sum(len(g) for g in groups.values()) > max_held:  # many sizes: run the biggest group now
                forward(max(groups, key=lambda k: len(groups[k])))
            reap_forwards(streams)
        for key in list(groups):
            forward(key)
        reap_forwards(0)
        reap_writes(0)


class RayItemWorker:
    """A Ray Data actor: loads the model once, then ``ItemWorker.process`` for each batch of rows."""

    def __init__(self, **worker_kwargs: Any) -> None:
        self.worker = ItemWorker(**worker_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [(int(i), str(p), str(r)) for i, p, r in zip(batch["index"], batch["path"], batch["rel"])]
        outcomes = self.worker.process(rows)
        return {
            "index": np.array([o[0] for o in outcomes], dtype=np.int64),
            "record": np.array([json.dumps(o[1]) if o[1] is not None else "" for o in outcomes], dtype=object),
            "reason": np.array([o[2] or "" for o in outcomes], dtype=object),
        }


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise InvalidArgument(f"--engine ray needs Ray Data ({exc}); "
                              "install it with: pip install 'segsvc[ray]'") from None
    return ray


def ray_device(device: str, cluster_gpus: float, actors: int) -> str:
    """The device the Ray actors use for ``--device``, on a Ray cluster with ``cluster_gpus`` GPUs.

    With CUDA, each of the ``actors`` asks Ray for one GPU, and Ray waits, forever, for
    GPUs the cluster does not have: so that is refused here, as the local engine refuses
    ``cuda`` on a machine without one. ``auto`` is ``cuda`` when the cluster has a GPU.
    """
    if device == "auto":
        device = "cuda" if cluster_gpus > 0 else "cpu"
    if not device.startswith("cuda"):
        resolve_device(device)  # cpu, or an unknown device: the same checks and messages as the local engine
        return device
    if cluster_gpus <= 0:
        raise InvalidArgument(f"device {device!r} requested but no CUDA device is available (the Ray cluster "
                              "has no GPU for --engine ray); use --device cpu or auto")
    if cluster_gpus < actors:
        raise InvalidArgument(f"--actors {actors} with device {device!r} needs one GPU per actor but the Ray "
                              f"cluster has {cluster_gpus:g}: pass --actors {int(cluster_gpus)} or fewer")
    return device


# An exception line in a traceback's text: ``OSError: [Errno 28] No space left on device``, not indented, not
# one of Ray's own (``ray.exceptions.…``, ``ray::MapWorker…``).
_EXCEPTION_LINE = re.compile(r"^(?!ray\b)([A-Za-z_][\w.]*): (\S.*)$", re.MULTILINE)


def ray_worker_error(exc: BaseException) -> SegsvcError:
    """The error a Ray worker raised, as one line. Ray wraps it (``RayTaskError``, ``UserCodeException``) in
    errors whose message is the worker's whole traceback, and the original may not survive the trip back
    (its ``__cause__`` is not pickled): then it is read from that traceback's text."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 20:
        chain.append(current)
        current = getattr(current, "cause", None) or current.__cause__  # RayTaskError keeps its cause in .cause
    for error in chain:
        if isinstance(error, (SegsvcError, OSError)) and not type(error).__module__.startswith("ray"):
            return SegsvcError(f"a Ray worker failed: {_first_line(_reason(error))}")
    for error in chain:
        match = _EXCEPTION_LINE.search(str(getattr(error, "traceback_str", "") or error))
        if match:
            return SegsvcError(f"a Ray worker failed: {match[1].rsplit('.', 1)[-1]}: {match[2].strip()}")
    return SegsvcError(f"a Ray worker failed: {type(exc).__name__}: {_first_line(_reason(exc))}")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _ray_rows(ds: Any) -> Iterator[dict[str, Any]]:
    """``ds.iter_rows()`` with a worker's error turned into one line (``ray_worker_error``)."""
    rows = iter(ds.iter_rows())
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # whatever Ray raised for a worker (its types vary between versions)
            log.debug("Ray worker error", exc_info=True)  # the full traceback, for --log-level debug
            raise ray_worker_error(exc) from None
        yield row


def _pages(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """``items`` in lists of ``size`` (the last may be shorter), read as each is asked for."""
    it = iter(items)
    while page := list(itertools.islice(it, size)):
        yield page


def run_ray(worker_kwargs: dict[str, Any], items: Iterable[Item], root: Path, on_outcome: Callable[[Outcome], None],
            *, actors: int = 1) -> None:
    """The ``ray`` engine: ``map_batches`` over ``actors`` model-holding actors; outcomes come back here.

    Uses the running Ray instance (``ray.init`` before calling to choose one), else starts a local one.
    """
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        device = ray_device(worker_kwargs["device"], ray.cluster_resources().get("GPU", 0), actors)
        # --max-inflight-mb auto on CPU: the actors may share one machine's memory (on CUDA each has its GPU)
        kwargs = {**worker_kwargs, "device": device, "memory_share": 1 if device.startswith("cuda") else actors}
        ray.data.DataContext.get_current().enable_progress_bars = False
        for page in _pages(items, RAY_PAGE):
            rows = [{"index": it.index, "path": str(root / it.input), "rel": it.input} for it in page]
            ds = ray.data.from_items(rows).map_batches(
                RayItemWorker, fn_constructor_kwargs=kwargs, batch_size=worker_kwargs["batch_size"],
                compute=ray.data.ActorPoolStrategy(size=actors),  # `concurrency=` is deprecated since Ray 2.51
                num_gpus=1 if device.startswith("cuda") else 0, batch_format="numpy",
            )
            for row in _ray_rows(ds):
                record = json.loads(row["record"]) if row["record"] else None
                on_outcome((int(row["index"]), record, None if record is not None else str(row["reason"])))
    finally:
        if started:
            ray.shutdown()


def _runnable(store: JobStore, job_id: str, on_outcome: Callable[[Outcome], None]) -> Iterator[Item]:
    """The job's PENDING items in index order, read a page at a time (``JobStore.iter_items``), so a run of a
    million inputs holds a page of them, not all; resumed after a crash, it reads the ones still PENDING.

    Inputs no output can be named after are failed on the way: a job an older segsvc created holds them PENDING.
    """
    for item in store.iter_items(job_id, "PENDING"):
        problem = input_name_problem(item.input)
        if problem is None:
            yield item
        else:
            on_outcome((item.index, None, problem))


def only_model(model_repo: str | os.PathLike[str]) -> str:
    """The model a new batch that names none runs: the repository's only model (with at least one complete
    version); refused, naming them, when it holds several, and when it holds none."""
    models = sorted(ModelRepository(model_repo).list_models())
    if len(models) == 1:
        return models[0]
    if not models:
        if not Path(model_repo).is_dir():
            raise InvalidArgument(f"model repository {model_repo} is not a folder: pass --model-repo of one")
        raise InvalidArgument(f"the model repository {model_repo} holds no model with a complete version: "
                              "publish one there, or pass --model-repo of another repository")
    shown = ", ".join(models[:10]) + (f" and {len(models) - 10} more" if len(models) > 10 else "")
    raise InvalidArgument(f"the model repository {model_repo} holds {len(models)} models ({shown}): "
                          "name one with --model NAME or NAME:VERSION")


def _open_job(out: Path, resume: bool, inputs: Sequence[str] | None, model_repo: str, model: str | None,
              options: BatchOptions | None) -> tuple[JobStore, Job, Path]:
    """Create the job (fresh, empty ``out``) or reopen it (``resume``), refusing mismatched settings."""
    state = out / STATE_FILE
    specs = [os.path.abspath(s) for s in inputs or ()]
    name, version = parse_model_ref(model) if model else (None, None)
    if not resume:
        if out.exists() and (not out.is_dir() or not _holds_no_batch(out)):
            raise AlreadyExists(f"output folder {out} is not empty: pass --resume to continue the batch "
                                "written there, or choose a new folder")
        if name is None:
            name = only_model(model_repo)
        root, files = batch_inputs(specs)
        version = ModelRepository(model_repo).resolve_version(name, version)
        spec = {"root": str(root), "inputs": specs, "model": name, "version": version,
                "options": asdict(options or BatchOptions())}
        # Inputs no output can be named after (a backslash, not UTF-8, too long) are FAILED with their reason.
        names, unusable = checked_inputs([f.rel for f in files])
        store = JobStore(state)
        try:
            job = _register(store, spec, names, unusable, out)
        except BaseException:  # the folder then holds a batch state without a complete job: a new run reuses it
            store.close()
            raise
        return store, job, root
    if not state.is_file():
        raise InvalidArgument(f"--resume: {out} holds no batch state ({STATE_FILE}); run without --resume")
    store = JobStore(state)
    try:
        jobs = store.list(kind=JOB_KIND)
        if len(jobs) != 1:
            if not jobs:
                raise InvalidArgument(f"--resume: {state} holds no batch job (a run stopped while creating it): "
                                      "run again without --resume")
            raise InvalidArgument(f"--resume: {state} holds {len(jobs)} batch jobs, expected one: "
                                  f"delete {out} and start again")
        job, spec = jobs[0], jobs[0].spec
        problems = []
        if name is not None and name != spec["model"]:
            problems.append(f"model {name!r} (stored: {spec['model']!r})")
        if version is not None and version != spec["version"]:
            problems.append(f"version {version} (stored: {spec['version']})")
        if options is not None and asdict(options) != spec["options"]:
            changed = {k: v for k, v in asdict(options).items() if spec["options"].get(k) != v}
            problems.append(f"options {changed} (stored: {spec['options']})")
        if specs and specs != spec["inputs"]:
            problems.append(f"inputs {specs} (stored: {spec['inputs']})")
        if problems:
            raise InvalidArgument(f"--resume with different settings than the batch in {out}: "
                                  f"{'; '.join(problems)}; resume with the same settings or use a new --out folder")
        if store.missing_items(job.id):
            job = _complete_registration(store, job, out)
    except BaseException:
        store.close()
        raise
    clean_temporaries(out)
    return store, job, Path(spec["root"])


def _register(store: JobStore, spec: dict[str, Any], names: Sequence[str], unusable: dict[int, str],
              out: Path) -> Job:
    """Create the batch's job, ``REGISTER_CHUNK`` inputs per transaction, or complete the one a killed run
    left half-registered with the same settings and inputs."""
    try:
        job, _ = store.submit(JOB_KIND, spec, names, failed=unusable, request_id=REGISTRATION_KEY,
                              chunk_size=REGISTER_CHUNK)
    except AlreadyExists:
        raise AlreadyExists(f"output folder {out} holds a batch whose start was interrupted, with other inputs "
                            "or settings (or the model's default version moved since): run it again with "
                            "--resume, which keeps the settings it started with, or choose a new folder") from None
    return job


def _complete_registration(store: JobStore, job: Job, out: Path) -> Job:
    """Register the inputs a run killed while registering them did not (``--resume``).

    The inputs are listed again from the stored specs; they must be the ones the killed run
    listed (the store compares their hash), else the stored indices would name other files.
    """
    if job.request_id is None:  # only chunked registrations can be incomplete, and they carry the key
        raise InvalidArgument(f"--resume: the batch in {out} lacks some of its inputs: delete {out} and start again")
    _, files = batch_inputs(job.spec["inputs"])
    names, unusable = checked_inputs([f.rel for f in files])
    try:
        job, _ = store.submit(JOB_KIND, job.spec, names, failed=unusable, request_id=job.request_id,
                              chunk_size=REGISTER_CHUNK)
    except AlreadyExists:
        raise InvalidArgument(f"--resume: the batch in {out} was interrupted while registering its inputs, and "
                              "the inputs changed since: delete the folder and start again") from None
    return job


def stored_options(out: Path) -> dict[str, Any]:
    """The options of the batch written in folder ``out`` ({} when it holds none: ``run_batch`` says why)."""
    if not (out / STATE_FILE).is_file():
        return {}
    store = JobStore(out / STATE_FILE)
    try:
        jobs = store.list(kind=JOB_KIND)
    finally:
        store.close()
    return dict(jobs[0].spec.get("options") or {}) if len(jobs) == 1 else {}


def _holds_no_batch(out: Path) -> bool:
    """Whether folder ``out`` is empty, or holds only the batch state of a run stopped while creating its job
    (a crash or ``kill -9`` before the job, or all its inputs, were committed): a new batch may then be written
    there (``_register`` completes a half-registered job when the inputs and settings are the same)."""
    names = {p.name for p in out.iterdir()} - {LOCK_FILE}
    if not names:
        return True
    if STATE_FILE not in names or not names <= {STATE_FILE + suffix for suffix in ("", "-wal", "-shm", "-journal")}:
        return False
    try:
        store = JobStore(out / STATE_FILE)
    except (SegsvcError, sqlite3.Error):
        return False
    try:
        jobs = store.list(kind=JOB_KIND, limit=2)
        return not jobs or (len(jobs) == 1 and store.missing_items(jobs[0].id) > 0)
    finally:
        store.close()


def run_batch(
    inputs: Sequence[str] | None,
    *,
    model_repo: str | os.PathLike[str],
    model: str | None,
    out: str | os.PathLike[str],
    engine: str = "local",
    resume: bool = False,
    options: BatchOptions | None = None,
    batch_size: int = 8,
    max_batch_pixels: int | None = -1,
    device: str = "auto",
    precision: str = "auto",
    backend: str | None = None,
    io_threads: int = 0,
    actors: int = 1,
    progress: bool = False,
    max_inflight_mb: int | None = None,
) -> dict[str, Any]:
    """Segment ``inputs`` into ``out`` and return the summary (also written to ``out/summary.json``).

    A forward pass takes up to ``batch_size`` images of one size and, when ``max_batch_pixels``
    is set, ends once it holds that many input pixels (-1: ``CPU_BATCH_PIXELS`` on CPU, no
    pixel limit on GPU; None: no pixel limit). ``backend`` picks what runs the network
    (``torch``, ``onnxruntime``; default: the manifest's).
    ``max_inflight_mb`` is the memory budget of the forward passes in flight (``ItemWorker``; None: ``auto``,
    ``AUTO_MEMORY_SHARE`` of the memory available, see ``inflight_budget``): an image whose estimate alone
    is over it fails with the reason, the others run as many at once as it holds.
    ``model`` None on a new batch is the repository's only model (refused when it holds several).
    ``inputs``, ``model`` and ``options`` may be omitted with ``resume``: the stored ones are used
    (``options=None`` on a new batch means the defaults).
    A failed input (undecodable, unreadable, or a file name no output can be named
    after: see ``outputs.input_name_problem``) does not stop the run; it is listed
    in ``failures.jsonl`` (the summary's ``failures`` holds the first ``outputs.FAILURES_SHOWN``
    by input, ``failures_truncated`` says whether there are more, ``counts.failed`` counts
    them all). Interrupt it at any point and call again with
    ``resume=True`` to finish.
    """
    if engine not in ENGINES:
        raise InvalidArgument(f"unknown engine {engine!r}; expected one of {ENGINES}")
    if batch_size < 1 or actors < 1 or io_threads < 0:
        raise InvalidArgument("batch_size and actors must be positive and io_threads >= 0")
    if max_batch_pixels is not None and max_batch_pixels != -1 and max_batch_pixels < 1:
        raise InvalidArgument(f"max_batch_pixels must be positive, -1 (by device) or None, got {max_batch_pixels}")
    if max_inflight_mb is not None and max_inflight_mb < 1:
        raise InvalidArgument(f"max_inflight_mb must be positive or None (auto), got {max_inflight_mb}")
    # Fail before creating anything: Ray missing, or a local device that is not there. Ray's GPUs are the
    # cluster's, which may not be this machine's: run_ray checks them once connected (Ray would wait forever).
    if engine == "ray":
        _import_ray()
    else:
        resolve_device(device)
    out_dir = Path(out)
    # Locked before _open_job: a --resume's clean_temporaries would delete a live run's files, and two new runs
    # could both find the folder empty and both submit a job.
    with out_lock(out_dir, new=not resume):
        store, job, root = _open_job(out_dir, resume, inputs, os.fspath(model_repo), model, options)
        try:
            return _execute(store, job, root, out_dir, engine=engine, model_repo=os.fspath(model_repo),
                            options=BatchOptions(**job.spec["options"]), batch_size=batch_size,
                            max_batch_pixels=max_batch_pixels, device=device, precision=precision,
                            backend=backend, io_threads=io_threads, actors=actors, progress=progress,
                            max_inflight_mb=max_inflight_mb)
        finally:
            store.close()


@contextlib.contextmanager
def out_lock(out: Path, *, new: bool) -> Iterator[None]:
    """Hold ``<out>/LOCK_FILE`` for the run, or refuse the run when another one holds it.

    A ``new`` run locks a missing folder (made here) or one a new batch may use (``_holds_no_batch``); a
    resumed one, a folder holding the batch state. Any other folder (the user's own files named by mistake)
    gets no lock file, and ``_open_job`` says what is wrong with it. A run that leaves no batch state behind
    (refused) removes the lock file it made, and the folder if it made that too.
    """
    made_out = new and not out.exists()
    if made_out:
        out.mkdir(parents=True)
    if not out.is_dir() or not (_holds_no_batch(out) if new else (out / STATE_FILE).is_file()):
        yield
        return
    made_lock = not (out / LOCK_FILE).exists()
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            made_lock = made_out = False  # the holder's files
            raise FailedPrecondition(f"a batch is already running in {out}: wait for it to end, or stop it "
                                     "and then --resume") from None
        yield
    finally:
        if not (out / STATE_FILE).exists():  # refused before it wrote anything: leave the folder as it was
            if made_lock:
                (out / LOCK_FILE).unlink(missing_ok=True)
            if made_out:
                with contextlib.suppress(OSError):
                    out.rmdir()
        os.close(fd)  # releases the lock


def _execute(store: JobStore, job: Job, root: Path, out: Path, *, engine: str, model_repo: str,
             options: BatchOptions, batch_size: int, max_batch_pixels: int | None, device: str, precision: str,
             backend: str | None, io_threads: int, actors: int, progress: bool,
             max_inflight_mb: int | None = None) -> dict[str, Any]:
    spec = job.spec
    if not job.finished:
        job = store.start(job.id)
    prior_s = float(job.progress.get("elapsed_s", 0.0))
    t0 = last = time.monotonic()
    bar = progress_bar(progress, total=job.total, initial=job.done + job.failed + job.skipped, unit="img",
                       desc="segmenting", smoothing=0.1)  # in a log file: counted (images_per_s), not drawn

    outputs = JobOutputs(out)

    def on_outcome(outcome: Outcome) -> None:
        nonlocal last
        index, record, reason = outcome
        if record is None:  # a killed run may have renamed this input's files into place before recording it
            outputs.remove_item(store.item(job.id, index).input)  # looked up: failures are few, inputs many
        store.finish_item(job.id, index, "DONE" if record is not None else "FAILED", result=record, reason=reason)
        bar.update(1)
        if time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            store.set_progress(job.id, {"elapsed_s": prior_s + last - t0, "images_per_s": bar.format_dict["rate"]})

    items = _runnable(store, job.id, on_outcome)
    first = next(items, None)  # none left: no model to load
    worker_kwargs = dict(model_repo=model_repo, model=spec["model"], version=spec["version"], out=str(out),
                         options=options, device=device, precision=precision, batch_size=batch_size,
                         max_batch_pixels=max_batch_pixels, backend=backend, max_inflight_mb=max_inflight_mb)
    try:
        if first is not None and engine == "local":
            run_local(ItemWorker(**worker_kwargs), itertools.chain([first], items), root, on_outcome,
                      io_threads=io_threads)
        elif first is not None:
            run_ray(worker_kwargs, itertools.chain([first], items), root, on_outcome, actors=actors)
    finally:
        bar.close()
    elapsed_s = prior_s + time.monotonic() - t0
    store.set_progress(job.id, {"elapsed_s": elapsed_s})
    job = store.get(job.id)
    manifest = ModelRepository(model_repo).read_manifest(spec["model"], spec["version"])
    # Read a page at a time as results.jsonl is written: a million records are never held at once.
    records = (it.result for it in store.iter_items(job.id, "DONE") if it.result is not None)
    failures = ({"input": it.input, "reason": it.reason} for it in store.iter_items(job.id, "FAILED"))
    summary = JobOutputs(out).finalize(
        records, failures, class_names=manifest.class_names, palette=manifest.palette,
        summary_fields={"job_id": job.id, "model": spec["model"], "version": spec["version"], "total": job.total,
                        "skipped": job.skipped, "elapsed_s": elapsed_s, "engine": engine, "options": spec["options"]},
    )
    if not job.finished:
        all_failed = job.total > 0 and job.failed == job.total
        store.finish(job.id, "FAILED" if all_failed else "SUCCEEDED", result={"counts": summary["counts"]},
                     error=f"all {job.total} inputs failed" if all_failed else None)
    return summary
