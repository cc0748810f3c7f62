"""Loaded models: which versions are in memory, which one is the default, and atomic swaps.

The ``ModelManager`` owns every loaded model version (an ``Engine`` plus its
``DynamicBatcher``). Requests take a *lease* on a version: resolving the name
and version and taking the lease happen in one synchronous step on the event
loop, so a swap can never hand a request a half-retired version. A swap builds
and warms the new version off the loop, installs it with one assignment, and
retires the old version only after every lease on it is released and its queue
is drained: requests in flight finish on the version they started on, and none
fails because of the swap.

Versions loaded "as the latest" (at start, by the directory poller, or by
``load(name)`` without a version) are *automatic*: a newer automatic version
replaces them. Versions loaded by number stay until ``unload``. Requests
without a version use the pinned default (``set_default``) or else the newest
loaded version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from segsvc.errors import InvalidArgument, SegsvcError, UnknownModel, UnknownVersion
from segsvc.inference.batcher import BatchingConfig, DynamicBatcher
from segsvc.inference.engine import Engine, EngineConfig, resolve_device
from segsvc.inference.predictor import Predictor
from segsvc.inference.repository import ModelRepository
from segsvc.models.artifact import Manifest, check_name

log = logging.getLogger(__name__)


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
        if self.poll_interval_s < 0:
            raise InvalidArgument(f"poll_interval_s must be >= 0, got {self.poll_interval_s}")
        if self.drain_timeout_s <= 0:
            raise InvalidArgument(f"drain_timeout_s must be positive, got {self.drain_timeout_s}")
        for name in self.models:
            check_name(name)


class LoadedModel:
    """One model version in memory: manifest, engine, batcher, and the leases held on it."""

    def __init__(self, name: str, version: int, engine: Engine, batcher: DynamicBatcher, auto: bool) -> None:
        self.name = name
        self.version = version
        self.engine = engine
        self.manifest: Manifest = engine.predictor.manifest
        self.batcher = batcher
        self.auto = auto
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


@dataclass(frozen=True)
class ModelStatus:
    """A model version as the service reports it (``GetModel``/``ListModels``)."""

    name: str
    version: int
    versions: tuple[int, ...]
    loaded_versions: tuple[int, ...]
    default_version: int
    default_pinned: bool
    ready: bool
    manifest: Manifest
    output_stride: int = 0
    device: str = ""


class ModelManager:
    """Loads, serves, swaps and unloads model versions from a ``ModelRepository``.

    Args:
        repository: where versions come from.
        config: what to load and how (``ManagerConfig``).
        on_batch: called after every batch as ``(model, version, batch_size, run_s)``.
        on_change: called after the set of loaded versions or a default changed.

    Call ``await start()`` inside the serving event loop and ``await stop()`` at the end.

    Example:
        >>> manager = ModelManager(ModelRepository("model_repository"), ManagerConfig())  # doctest: +SKIP
        >>> await manager.start()  # doctest: +SKIP
        >>> with manager.lease("membrane", None) as lm:  # doctest: +SKIP
        ...     result = await lm.batcher.submit(lm.engine.prepare(image, InferenceOptions()))
    """

    def __init__(
        self,
        repository: ModelRepository,
        config: ManagerConfig,
        *,
        on_batch: Callable[[str, int, int, float], None] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.repository = repository
        self.config = config
        self.device = resolve_device(config.engine.device)
        self._on_batch = on_batch
        self._on_change = on_change
        # name -> {version -> LoadedModel}; replaced, never mutated, so readers on other
        # threads (metrics) and the event loop always see a consistent table.
        self._models: dict[str, dict[int, LoadedModel]] = {}
        self._pinned: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._failed: dict[tuple[str, int], str] = {}
        self._holds: dict[tuple[str, int], int] = {}
        self._retiring: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        """Load the latest version of every configured model and start the poller."""
        names = self.config.models or tuple(await asyncio.to_thread(lambda: list(self.repository.list_models())))
        for name in names:
            try:
                await self.load(name)
            except SegsvcError as exc:
                if self.config.models:  # asked for by name: fail loudly
                    raise
                log.error("model %s could not be loaded: %s", name, exc)
        if self.config.poll_interval_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll_loop(), name="model-poller")

    async def stop(self) -> None:
        """Stop polling, then retire every version (its queued requests finish first)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        models, self._models, self._pinned = self._models, {}, {}
        await asyncio.gather(*(self._retire(lm) for table in models.values() for lm in table.values()))
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        self._changed()

    @property
    def ready(self) -> bool:
        """True when at least one model version is loaded."""
        return any(self._models.values())

    # -- serving -------------------------------------------------------------------
    def default_version(self, name: str) -> int:
        table = self._models.get(name) or {}
        pinned = self._pinned.get(name)
        if pinned in table:
            return pinned  # type: ignore[return-value]
        return max(table) if table else 0

    def resolve(self, name: str | None, version: int | None) -> LoadedModel:
        """The loaded version serving ``name`` (any single loaded model when ``name`` is empty)."""
        models = self._models
        if not name:
            loaded = sorted(n for n, t in models.items() if t)
            if len(loaded) != 1:
                raise InvalidArgument(
                    f"the request names no model and {len(loaded)} models are loaded; name one of {loaded}"
                )
            name = loaded[0]
        table = models.get(name)
        if not table:
            loaded = sorted(n for n, t in models.items() if t)
            raise UnknownModel(f"model {name!r} is not loaded; loaded models: {loaded or 'none'}")
        v = version or self.default_version(name)
        lm = table.get(v)
        if lm is None:
            raise UnknownVersion(
                f"model {name!r} version {v} is not loaded (loaded versions: {sorted(table)}); "
                "load it with LoadModel or omit the version"
            )
        return lm

    @contextlib.contextmanager
    def lease(self, name: str | None, version: int | None) -> Iterator[LoadedModel]:
        """Resolve and hold a version for one request; it is not retired while held."""
        lm = self.resolve(name, version)
        lm.acquire()
        try:
            yield lm
        finally:
            lm.release()

    # -- management ----------------------------------------------------------------
    async def load(self, name: str, version: int | None = None) -> LoadedModel:
        """Load ``name`` at ``version`` (None: the highest in the repository, as an automatic version)."""
        check_name(name)
        auto = version is None
        async with self._locks.setdefault(name, asyncio.Lock()):
            v = await asyncio.to_thread(self.repository.resolve_version, name, version)
            lm = (self._models.get(name) or {}).get(v)
            if lm is None:
                started = time.perf_counter()
                engine = await asyncio.to_thread(self._build_engine, name, v)
                batcher = DynamicBatcher(
                    engine.run,
                    self.config.batching,
                    key=lambda job: job.key,
                    pixels=lambda job: job.pixels,
                    name=f"{name}:{v}",
                    on_batch=self._batch_hook(name, v),
                )
                lm = LoadedModel(name, v, engine, batcher, auto=auto)
                batcher.start()
                self._models = {**self._models, name: {**(self._models.get(name) or {}), v: lm}}
                self._failed.pop((name, v), None)
                log.info(
                    "loaded model %s version %d on %s (%s) in %.2f s",
                    name, v, engine.device, engine.precision, time.perf_counter() - started,
                )
            elif not auto:
                lm.auto = False  # asked for by number: keep it until unloaded
            if auto:
                self._retire_older_auto(name, v)
            self._changed()
            return lm

    def _build_engine(self, name: str, version: int) -> Engine:
        model, manifest = self.repository.load(name, version, device=self.device)
        engine = Engine(Predictor(model, manifest, self.device), self.config.engine)
        engine.warmup()
        return engine

    def _batch_hook(self, name: str, version: int) -> Callable[[int, float], None] | None:
        if self._on_batch is None:
            return None
        hook = self._on_batch
        return lambda size, run_s: hook(name, version, size, run_s)

    def _retire_older_auto(self, name: str, newest: int) -> None:
        table = self._models.get(name) or {}
        old = [
            lm for v, lm in table.items()
            if lm.auto and v < newest and v != self._pinned.get(name) and not self._holds.get((name, v))
        ]
        if not old:
            return
        self._models = {**self._models, name: {v: lm for v, lm in table.items() if lm not in old}}
        for lm in old:
            log.info("model %s: version %d replaced by %d; draining it", name, lm.version, newest)
            task = asyncio.get_running_loop().create_task(self._retire(lm))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, lm: LoadedModel) -> None:
        """Wait for the version's leases to end, drain its queue, stop its batcher."""
        try:
            await asyncio.wait_for(lm.wait_idle(), self.config.drain_timeout_s)
            await lm.batcher.stop(drain=True)
        except TimeoutError:
            log.warning("model %s:%d still busy after %.0f s; failing its queued requests",
                        lm.name, lm.version, self.config.drain_timeout_s)
            await lm.batcher.stop(drain=False)
        log.info("model %s version %d unloaded", lm.name, lm.version)

    async def unload(self, name: str, version: int | None = None) -> list[int]:
        """Unload one version (or all of ``name``'s versions); returns the versions unloaded."""
        check_name(name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            table = self._models.get(name) or {}
            if not table:
                raise UnknownModel(f"model {name!r} is not loaded")
            if version and version not in table:
                raise UnknownVersion(f"model {name!r} version {version} is not loaded (loaded: {sorted(table)})")
            gone = [table[version]] if version else list(table.values())
            rest = {v: lm for v, lm in table.items() if lm not in gone}
            models = dict(self._models)
            if rest:
                models[name] = rest
            else:
                models.pop(name, None)
            self._models = models
            if self._pinned.get(name) not in rest:
                self._pinned.pop(name, None)
            self._changed()
            await asyncio.gather(*(self._retire(lm) for lm in gone))
            return sorted(lm.version for lm in gone)

    async def retain(self, name: str, version: int) -> None:
        """Keep ``name:version`` loaded until the matching ``release`` (a batch job's pinned version).

        A held version is never replaced by a newer automatic one; one that was
        not loaded is loaded as automatic, so it goes once released and outdated.
        """
        key = (name, version)
        self._holds[key] = self._holds.get(key, 0) + 1
        if version in (self._models.get(name) or {}):
            return
        try:
            lm = await self.load(name, version)
        except BaseException:
            self.release(name, version)
            raise
        lm.auto = True

    def release(self, name: str, version: int) -> None:
        """End one ``retain``; an outdated automatic version with no holds left is retired."""
        key = (name, version)
        left = self._holds.get(key, 0) - 1
        if left > 0:
            self._holds[key] = left
            return
        self._holds.pop(key, None)
        table = self._models.get(name) or {}
        if table:
            self._retire_older_auto(name, max(table))

    def set_default(self, name: str, version: int | None) -> None:
        """Pin the default version of ``name`` (a loaded version), or unpin it with ``None``/0."""
        table = self._models.get(name) or {}
        if not table:
            raise UnknownModel(f"model {name!r} is not loaded")
        if not version:
            self._pinned.pop(name, None)
        elif version not in table:
            raise UnknownVersion(
                f"model {name!r} version {version} is not loaded (loaded: {sorted(table)}); load it first"
            )
        else:
            self._pinned[name] = version
        self._changed()

    # -- polling ---------------------------------------------------------------------
    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # the poller must survive a bad scan
                log.exception("model repository scan failed")

    async def poll_once(self) -> list[tuple[str, int]]:
        """Load versions newer than what is loaded (and new models); returns what was loaded."""
        on_disk = await asyncio.to_thread(self.repository.list_models)
        loaded: list[tuple[str, int]] = []
        for name, versions in on_disk.items():
            if self.config.models and name not in self.config.models:
                continue
            latest = versions[-1]
            table = self._models.get(name) or {}
            if latest in table or (table and latest < max(table)) or (name, latest) in self._failed:
                continue
            try:
                lm = await self.load(name)
            except SegsvcError as exc:
                self._failed[(name, latest)] = str(exc)
                log.error("model %s version %d could not be loaded (will not retry): %s", name, latest, exc)
            else:
                loaded.append((name, lm.version))
        return loaded

    # -- reporting ---------------------------------------------------------------------
    def snapshot(self) -> list[tuple[str, int, int, bool]]:
        """``(model, version, queue_depth, is_default)`` per loaded version; safe from any thread."""
        rows = []
        for name, table in list(self._models.items()):
            default = self.default_version(name)
            for v, lm in list(table.items()):
                rows.append((name, v, lm.batcher.queue_depth, v == default))
        return rows

    async def describe(self, name: str, version: int | None = None) -> ModelStatus:
        """Status of one version (default: the default version, else the newest on disk)."""
        check_name(name)
        table = self._models.get(name) or {}
        try:
            on_disk = tuple(await asyncio.to_thread(self.repository.versions, name))
        except UnknownModel:
            if not table:
                raise
            on_disk = ()
        v = version or self.default_version(name) or (on_disk[-1] if on_disk else 0)
        lm = table.get(v)
        if lm is not None:
            manifest = lm.manifest
        elif v in on_disk:
            manifest = await asyncio.to_thread(self.repository.read_manifest, name, v)
        elif not on_disk and not table:
            raise UnknownModel(f"model {name!r} has no versions in {self.repository.root}")
        else:
            raise UnknownVersion(f"model {name!r} has no version {v}; versions: {sorted(set(on_disk) | set(table))}")
        return ModelStatus(
            name=name,
            version=v,
            versions=on_disk,
            loaded_versions=tuple(sorted(table)),
            default_version=self.default_version(name),
            default_pinned=name in self._pinned,
            ready=lm is not None and lm.batcher.running,
            manifest=manifest,
            output_stride=lm.engine.predictor.stride if lm else 0,
            device=str(lm.engine.device) if lm else "",
        )

    async def describe_all(self) -> list[ModelStatus]:
        """Status of every model on disk or loaded, sorted by name."""
        names = set(await asyncio.to_thread(lambda: list(self.repository.list_models()))) | set(self._models)
        out = []
        for name in sorted(names):
            try:
                out.append(await self.describe(name))
            except SegsvcError as exc:  # e.g. a broken manifest: skip it, say why
                log.warning("model %s cannot be described: %s", name, exc)
        return out

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("model change hook failed")
