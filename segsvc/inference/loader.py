"""Turning a version on disk into a running ``LoadedModel``, and remembering the ones that fail.

The manager decides *which* versions to load and swaps them in; this module
does the loading itself (off the event loop), so every failure, whatever its
cause, is recorded in one place with its reason and the version's file
fingerprint (see ``status.LoadRecord``).

``ManagerConfig`` (what is loaded and how) lives here too, next to the code it
configures; ``segsvc.inference.manager`` re-exports it.

Each ``LoadedModel`` remembers the identity of the files it was built from
(``Files``: device, inode, size, mtime and ctime of each entry of its version
directory, taken before they are read). A load of a version already loaded
asks ``VersionLoader.unchanged``: the manifest is read and checked again, and
the files compared by identity, not hashed again: a file overwritten in place
changes its mtime and ctime, one renamed over it its inode, and a ``touch``
that puts the old mtime back still changes the ctime. Only a version that
changed is built again (its SHA-256s checked as at its first load).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from segsvc.errors import ArtifactError, InvalidArgument, PathOutsideRoot, SegsvcError
from segsvc.inference.backends import open_backend
from segsvc.inference.batcher import BatchingConfig, DynamicBatcher
from segsvc.inference.engine import Engine, EngineConfig
from segsvc.inference.predictor import Predictor
from segsvc.inference.repository import ModelRepository, VersionEntry, check_manifest
from segsvc.inference.statistics import VersionStatistics
from segsvc.inference.status import LoadRecord
from segsvc.models.artifact import Manifest, check_name

log = logging.getLogger("segsvc.inference.manager")  # load/unload lines keep the logger they always had

# (entry name, st_dev, st_ino, size in bytes, mtime in ns, ctime in ns) of every entry of a version directory
Files = tuple[tuple[str, int, int, int, int, int], ...]


@dataclass(frozen=True)
class ManagerConfig:
    """What the model manager loads and how.

    Args:
        engine: device, precision and warm-up of every loaded model.
        batching: batch size, delay and queue bound of every model's batcher.
        poll_interval_s: seconds between repository scans for new versions; 0 disables polling.
        models: names to serve; empty serves every model in the repository.
        drain_timeout_s: longest wait for a retired version's requests to finish.
    """

    engine: EngineConfig = field(default_factory=EngineConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    poll_interval_s: float = 0.0
    models: tuple[str, ...] = ()
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        # NaN passes ``< 0`` and infinity every lower bound; both break the waits built from them (a drain for ever).
        for name, positive in (("poll_interval_s", False), ("drain_timeout_s", True)):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise InvalidArgument(f"{name} must be a finite number of seconds {'> 0' if positive else '>= 0'}, "
                                      f"got {value!r}")
        for name in self.models:
            check_name(name)


class LoadedModel:
    """One model version in memory: manifest, engine, batcher, what it has served, and the leases held on it."""

    def __init__(self, name: str, version: int, engine: Engine, batcher: DynamicBatcher, auto: bool,
                 stats: VersionStatistics | None = None, files: Files = ()) -> None:
        self.name = name
        self.version = version
        self.engine = engine
        self.manifest: Manifest = engine.predictor.manifest
        self.batcher = batcher
        self.auto = auto
        self.stats = stats or VersionStatistics()
        self.files = files  # what it was built from, taken before reading them (``VersionLoader.unchanged``)
        self.loaded_at = time.time()
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __repr__(self) -> str:
        return f"LoadedModel({self.name}:{self.version}, auto={self.auto}, active={self.active})"

    def acquire(self) -> None:
        self.active += 1
        self._idle.clear()

    def release(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def retire(self, drain_timeout_s: float) -> None:
        """Wait for the version's leases to end, drain its queue, stop its batcher."""
        try:
            await asyncio.wait_for(self.wait_idle(), drain_timeout_s)
            await self.batcher.stop(drain=True)
        except TimeoutError:
            log.warning("model %s:%d still busy after %.0f s; failing its queued requests",
                        self.name, self.version, drain_timeout_s)
            await self.batcher.stop(drain=False)
        log.info("model %s version %d unloaded", self.name, self.version)


class VersionLoader:
    """Builds, warms and starts one version at a time; records why a version failed.

    Args:
        repository: where versions come from.
        engine: device, precision and warm-up of every loaded model.
        batching: the batcher settings of every loaded model.
        device: the resolved device.
        on_batch: called after every batch as ``(model, version, batch_size, run_s)``.
    """

    def __init__(
        self,
        repository: ModelRepository,
        engine: EngineConfig,
        batching: BatchingConfig,
        device: torch.device,
        on_batch: Callable[[str, int, int, float], None] | None = None,
    ) -> None:
        self.repository = repository
        self.engine_config = engine
        self.batching = batching
        self.device = device
        self.record = LoadRecord()
        self._on_batch = on_batch

    async def scan(self, name: str) -> list[VersionEntry]:
        """The model's versions on disk (failures of versions that are gone are forgotten)."""
        entries = await asyncio.to_thread(self.repository.scan, name)
        self.record.seen(name, entries)
        return entries

    async def build(self, name: str, entry: VersionEntry, auto: bool,
                    stats: VersionStatistics | None = None) -> LoadedModel:
        """Load ``entry`` with its batcher started; on failure record the reason (relative paths) and re-raise.

        ``stats``: what the version has served so far (a reload of changed files goes on counting), else none.
        """
        v = entry.version
        started = time.perf_counter()
        try:
            if entry.problem:
                raise PathOutsideRoot(entry.problem)
            with self.record.loading(name, v):
                # identified before the files are read: one changed during the build differs at the next load
                files = await asyncio.to_thread(self._files, name, v)
                engine = await asyncio.to_thread(self._build_engine, name, v)
        except Exception as exc:
            text = str(exc) if isinstance(exc, SegsvcError) else f"{type(exc).__name__}: {exc}"
            reason = self.repository.redact(text)
            if self.record.failed(name, entry, reason):
                log.error("model %s version %d could not be loaded (retried when its files change): %s",
                          name, v, reason)
            raise
        batching = self.batching.for_model(engine.bytes_per_pixel)
        stats = stats if stats is not None else VersionStatistics()
        batcher = DynamicBatcher(
            _counted(engine, stats),
            batching,
            key=lambda job: job.key,
            pixels=lambda job: job.pixels,
            name=f"{name}:{v}",
            on_batch=self._batch_hook(name, v),
        )
        lm = LoadedModel(name, v, engine, batcher, auto=auto, stats=stats, files=files)
        batcher.start()
        self.record.loaded(name, v)
        log.info(
            "loaded model %s version %d on %s (%s, %s) in %.2f s; about %.0f MiB per megapixel; "
            "batches of up to %d images, %s",
            name, v, engine.device, engine.backend.name, engine.precision, time.perf_counter() - started,
            engine.bytes_per_pixel * 1e6 / (1 << 20), batching.max_batch_size,
            "no pixel budget" if batching.max_batch_pixels is None else f"{batching.max_batch_pixels} pixels",
        )
        return lm

    async def read_manifest(self, name: str, version: int) -> Manifest | None:
        """The manifest of a version not in memory; None when it cannot be read (its status says why)."""
        try:
            return await asyncio.to_thread(self.repository.read_manifest, name, version)
        except (SegsvcError, OSError):
            return None

    async def unchanged(self, lm: LoadedModel) -> bool:
        """Whether ``lm``'s version on disk is still what it was built from: its manifest, read and checked as a
        load reads it, is the same, and so is every file's identity (``Files``). False too when the version no
        longer reads: building it again then fails as a first load would, and records why."""
        def same() -> bool:
            files = self._files(lm.name, lm.version)
            manifest = self.repository.read_manifest(lm.name, lm.version)
            check_manifest(lm.name, lm.version, manifest)
            return files == lm.files and manifest == lm.manifest

        try:
            return await asyncio.to_thread(same)
        except (SegsvcError, OSError):
            return False

    def _files(self, name: str, version: int) -> Files:
        """The identity of every entry of the version's directory (a symlink inside the root: its target's)."""
        path = self.repository.version_dir(name, version)
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            raise ArtifactError(f"{self.repository.relative(path)} cannot be read "
                                f"({exc.strerror or type(exc).__name__})") from None
        out = []
        for entry in names:
            try:
                st = os.stat(path / entry)
            except OSError:  # deleted since listdir, or a dangling symlink: the build says what is wrong
                out.append((entry, -1, -1, -1, -1, -1))
                continue
            out.append((entry, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(out)

    def _build_engine(self, name: str, version: int) -> Engine:
        backend, manifest = open_backend(self.repository, name, version, self.device, self.engine_config)
        engine = Engine(Predictor(backend, manifest), self.engine_config)
        engine.warmup()
        engine.measure_memory()  # admission's memory estimate of this version's requests
        return engine

    def _batch_hook(self, name: str, version: int) -> Callable[[int, float], None] | None:
        if self._on_batch is None:
            return None
        hook = self._on_batch
        return lambda size, run_s: hook(name, version, size, run_s)


def _counted(engine: Engine, stats: VersionStatistics) -> Callable[[list], list]:
    """``engine.run`` that records each batch it finishes as one execution."""

    def run(jobs: list) -> list:
        outputs = engine.run(jobs)
        if outputs:
            stats.executed(batch_size=len(outputs), infer_s=outputs[0].infer_s, output_s=outputs[0].output_s)
        return outputs

    return run
