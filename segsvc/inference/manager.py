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
without a version use the repository's persistent default (``<model>/DEFAULT``,
see ``ModelRepository``), else the newest loaded version. ``set_default`` writes
that pointer, as a training job's promotion does, so the last write wins and a
restart keeps it; only when the repository is read-only does it pin the version
in memory instead (logged), until the pointer moves or the server restarts. The
persistent default is loaded next to the newest version and never retired by a
newer one; when the pointer moves (``refresh_default``, or the poller seeing the
file change) the new default is loaded and warmed first and then switched to in
one assignment, so requests without a version move over with none failing. The
pointer is always read *after* the scan whose versions it is applied to, so a
version published after its pointer was written (a gate-rejected candidate next
to the pinned default) is never served by default.
A pointer that cannot be followed leaves the default in effect: a DEFAULT file
that names no version (empty or truncated, as a non-atomic ``echo 1 > DEFAULT``
is mid-write; garbled; unreadable) is not "no pointer", which would switch
requests to the newest version and undo a rollback; nor is one naming a version
that is missing, does not load or was unloaded. Each is logged once, not at
every poll, and followed once it can be (at start, with no default yet, the
newest version that loads serves meanwhile).

``unload`` is remembered: the poller leaves an unloaded model, or unloaded
versions, unloaded (a rollback by unloading the newest version stays rolled
back) until ``load`` of that model clears the mark. The version the DEFAULT
pointer names (or the in-memory pin) is unloaded only with the whole model
(move the pointer first), so requests without a version never fall through to
another version. A version a batch job holds (``retain(..., job=True)``) is not
unloaded at all, as the job would fail half done: ``unload`` refuses, saying how
many jobs hold it (any other hold, an Open Inference Protocol request's, does not
count: requests in flight finish, as on a leased version). A version that
``retain`` loads again after its ``unload`` (a request that had resolved it
first, a batch job started after it) serves only those that name it: it is
never the default, and it goes when released. An unload
finishes retiring its versions even when its caller is cancelled; ``stop``
waits for every retirement, for at most ``drain_timeout_s``: a version still
busy then (a forward pass that does not end) is abandoned, logged and returned.

A ``load`` (and the loading part of a ``retain``) runs in a task of its own,
tracked by model, version and kind: a caller cancelled during a slow build (a
client deadline) stops waiting, not the build, which goes on to install its
version; a retry, or a second caller meanwhile, joins the load in flight and
gets its result or its error (one build, never two side by side). A build that
fails installs nothing; ``stop`` cancels the loads in flight, so none installs
a version into a stopped manager.

A ``load`` of a version already loaded is a reload, as in Triton: the
version's manifest is read and checked again and its files compared with
those it was built from (``VersionLoader.unchanged``; no hashing when nothing
changed, and the loaded instance stays). A version whose files changed (an
export written again, new weights) is built beside the loaded one and swapped
in like a new version: one assignment, then the old instance retires as a
replaced version does, and the new one goes on with its statistics (it is the
same version). A build that fails leaves the old instance serving and is
recorded: the version stays READY, with the failure as its reason, and is not
a failed version (``failed_versions``, the metric) while it serves.
``load(name)`` reloads every version of the model that was loaded (and is on
disk), besides loading its newest; it raises only when the version it
resolves to fails, and the failure of another is logged. Either way the call
has done its work (the ``unload`` marks cleared, a numbered version kept until
unloaded) once its version is in place, before any reload. ``retain`` and the
poller never reload.

With polling on, a loaded version whose folder left the repository (or whose
model's folder did) is unloaded by the poll, as in Triton's poll mode, once a
fresh scan under the model's lock confirms it (with polling off it serves on
until ``unload``). The newest version left on disk is loaded first, as the poll
would load it next, so the model is not left without a version meanwhile. The
removed version retires as an unloaded one does (requests on it finish first);
one a batch job holds serves that job until released, never the default.
Requests without a version then go where a DEFAULT naming a missing version
sends them (the newest loaded version). Unlike ``unload`` it leaves no mark: the
folder back, the next poll loads it again.

"The latest" is the newest version that *loads*: a corrupt or half-copied
newest version is recorded as failed (with its reason, reported by
``describe``, ``failed_versions`` and ``model_health``) and the next older one
is tried, so a bad upload never takes a model down at the next restart. A
failed version is retried by the poller once its files change (size or mtime
of its entries), so a copy that was not atomic loads when it is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Iterator, TypeVar

from segsvc.errors import (
    ArtifactError, FailedPrecondition, InvalidArgument, SegsvcError, UnknownModel, UnknownVersion,
)
from segsvc.inference.batcher import BatcherStats
from segsvc.inference.engine import resolve_device
from segsvc.inference.loader import LoadedModel, ManagerConfig, VersionLoader
from segsvc.inference.repository import ModelRepository, VersionEntry
from segsvc.inference.status import ModelStatus, VersionState, VersionStatus, model_status, pick_version
from segsvc.models.artifact import check_name

__all__ = ["LoadedModel", "ManagerConfig", "ModelManager", "ModelStatus", "VersionState", "VersionStatus"]

log = logging.getLogger(__name__)

T = TypeVar("T")
# the reason of a READY version whose folder left the repository while a batch job held it
REMOVED_HELD = "its folder left the repository; it serves only the batch jobs holding it, and goes when they end"
OperationKey = tuple[str, str, "int | None"]  # ("load" or "retain", model, version or None: the newest)


class ModelManager:
    """Loads, serves, swaps and unloads model versions from a ``ModelRepository``.

    Args:
        repository: where versions come from.
        config: what to load and how (``ManagerConfig``).
        on_batch: called after every batch as ``(model, version, batch_size, run_s)``.
        on_change: called after the set of loaded versions or a default changed, or a load failed.

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
        self.loader = VersionLoader(repository, config.engine, config.batching, self.device, on_batch)
        self.record = self.loader.record  # loading and failed versions, the models tried (health, metrics)
        self._on_change = on_change
        # name -> {version -> LoadedModel}; replaced, never mutated, so readers on other
        # threads (metrics) and the event loop always see a consistent table.
        self._models: dict[str, dict[int, LoadedModel]] = {}
        self._pinned: dict[str, int] = {}
        self._stored: dict[str, int] = {}  # the repository's DEFAULT pointer, once that version is loaded
        # the default last seen (``_track_default``) and the one before it, kept loaded for pinned clients and an
        # instant rollback until the default moves again (or it is unloaded, or its folder leaves the repository)
        self._current: dict[str, int] = {}
        self._previous: dict[str, int] = {}
        # the DEFAULT problem last reported per model (``_say_once``): said once, not at every poll
        self._pointer_said: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # per model name, while used or loaded (_model_lock)
        self._lock_users: dict[str, int] = {}
        self._holds: dict[tuple[str, int], int] = {}
        self._job_holds: dict[tuple[str, int], int] = {}  # those of ``_holds`` that batch jobs took (``unload``)
        self._retiring: dict[asyncio.Task, LoadedModel] = {}  # retirements in progress, and their versions
        self._operations: dict[OperationKey, asyncio.Task] = {}  # loads in flight, joined by their retries
        # explicit unloads the poller leaves alone until ``load`` of the model: whole models, and versions
        self._unloaded_models: set[str] = set()
        self._unloaded_versions: dict[str, set[int]] = {}
        # versions whose folder left the repository, kept only while a batch job holds them (``_settle``)
        self._removed: dict[str, set[int]] = {}
        self._root_gone = False  # the repository root was not a directory at the last poll (logged once)
        self._poller: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        """Load the newest loadable version of every configured model and start the poller."""
        names = self.config.models or tuple(await asyncio.to_thread(lambda: list(self.repository.scan_all())))
        for name in names:
            try:
                await self.load(name)
            except SegsvcError as exc:
                if self.config.models:  # asked for by name: fail loudly
                    raise
                log.error("model %s could not be loaded: %s", name, exc)
        if self.config.poll_interval_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll_loop(), name="model-poller")

    async def stop(self) -> list[str]:
        """Stop polling and the loads in flight, then retire every version (its queued requests finish first).

        Waits for the retirements (with those of swaps and of unloads whose caller was cancelled) for at most
        ``drain_timeout_s``. A version still busy then, a forward pass that does not end, is abandoned: logged,
        and returned as ``"name:version"``; its retirement goes on in its task while the loop runs.
        """
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        operations = list(self._operations.values())  # a build still running is not waited for
        for task in operations:
            task.cancel()
        await asyncio.gather(*operations, return_exceptions=True)
        models, self._models, self._pinned, self._stored = self._models, {}, {}, {}
        self._current, self._previous = {}, {}
        for table in models.values():
            for lm in table.values():
                self._start_retiring(lm)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout_s
        while self._retiring and (left := deadline - loop.time()) > 0:
            await asyncio.wait(list(self._retiring), timeout=left)
        abandoned = sorted(f"{lm.name}:{lm.version}" for lm in self._retiring.values())
        if abandoned:
            log.error("model versions still busy after drain_timeout_s=%.1f s (a forward pass that does not end): "
                      "%s; abandoned, the stop goes on without them", self.config.drain_timeout_s,
                      ", ".join(abandoned))
        self._changed()
        return abandoned

    @property
    def ready(self) -> bool:
        """True when at least one model version is loaded."""
        return any(self._models.values())

    # -- serving -------------------------------------------------------------------
    def default_version(self, name: str) -> int:
        """The version requests without one get: the repository's DEFAULT (or, with a read-only repository,
        the in-memory pin), else the newest."""
        table = self._models.get(name) or {}
        for chosen in (self._pinned.get(name), self._stored.get(name)):
            if chosen in table:
                return chosen  # type: ignore[return-value]
        return self._newest(name)

    def _newest(self, name: str) -> int:
        """The newest loaded version of ``name`` that was not unloaded (one a ``retain`` loaded again after its
        ``unload``), else the newest loaded version; 0 when none is loaded. A version whose folder left the
        repository (kept for the batch jobs holding it) is never one."""
        removed = self._removed.get(name, ())
        serving = [v for v in self._models.get(name) or {} if v not in removed]
        return max((v for v in serving if not self._unloaded(name, v)), default=max(serving, default=0))

    def _unloaded(self, name: str, version: int) -> bool:
        """Whether ``unload`` took ``name:version`` away (the model, or that version) and no ``load`` undid it."""
        return name in self._unloaded_models or version in self._unloaded_versions.get(name, ())

    @contextlib.asynccontextmanager
    async def _model_lock(self, name: str) -> AsyncIterator[None]:
        """Hold ``name``'s lock; it is forgotten when its last user leaves and the model is not loaded,
        so names that never load (a typo, random names sent to LoadModel) leave nothing behind."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        self._lock_users[name] = self._lock_users.get(name, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._lock_users[name] -= 1
            if not self._lock_users[name]:
                del self._lock_users[name]
                if not self._models.get(name):
                    self._locks.pop(name, None)

    def _kept(self, name: str) -> set[int | None]:
        """Versions that a newer automatic version never retires: the pinned and the stored default, and the
        previous default (``_track_default``)."""
        return {self._pinned.get(name), self._stored.get(name), self._previous.get(name)}

    def _track_default(self, name: str) -> None:
        """Note ``name``'s default now; when it moved (a promotion, SetDefaultVersion, DEFAULT edited or removed,
        a newer version with no pointer), the outgoing one becomes the previous default, kept loaded (``_kept``)
        for the clients that name its version and for an instant rollback, until the default moves again. One
        that was unloaded or left the repository is not kept."""
        table = self._models.get(name) or {}
        now = self.default_version(name) if table else 0
        before = self._current.get(name)
        if not now:
            self._current.pop(name, None)
        else:
            self._current[name] = now
        if before and now and before != now and before in table and not self._unloaded(name, before) \
                and before not in self._removed.get(name, ()):
            self._previous[name] = before
        if self._previous.get(name) not in table or self._previous.get(name) == now:
            self._previous.pop(name, None)

    def resolve(self, name: str | None, version: int | None) -> LoadedModel:
        """The loaded version serving ``name`` (any single loaded model when ``name`` is empty)."""
        models = self._models
        if not name:
            loaded = sorted(n for n, t in models.items() if t)
            if not loaded:
                raise FailedPrecondition(self._none_loaded())
            if len(loaded) > 1:
                raise InvalidArgument(
                    f"the request names no model and {len(loaded)} models are loaded; name one of {_few(loaded)}"
                )
            name = loaded[0]
        table = models.get(name)
        if not table:
            loaded = sorted(n for n, t in models.items() if t)
            raise UnknownModel(f"model {name!r} is not loaded; loaded models: {_few(loaded) or 'none'}")
        v = version or self.default_version(name)
        if not v:  # only versions that left the repository, kept for the batch jobs holding them
            raise UnknownModel(f"model {name!r} is not loaded: its versions {sorted(table)} left the repository "
                               "and serve only the batch jobs holding them")
        lm = table.get(v)
        if lm is None:
            raise UnknownVersion(
                f"model {name!r} version {v} is not loaded (loaded versions: {sorted(table)}); "
                "load it with LoadModel or omit the version"
            )
        return lm

    def _none_loaded(self) -> str:
        """Why a request that names no model has none to use: nothing is loaded; what the repository holds."""
        try:
            held = sorted(self.repository.list_models())
        except (OSError, SegsvcError):  # an unreadable repository: say what is known
            held = None
        if held:
            return f"no model is loaded (the model repository holds {_few(held)}): load one with LoadModel"
        if held is None:
            return "no model is loaded: load one with LoadModel"
        return "no model is loaded and the model repository holds none: publish a model version, then LoadModel"

    def loaded(self, name: str = "") -> list[LoadedModel]:
        """Every loaded version (of model ``name`` when given), by name then version.

        Raises:
            UnknownModel: ``name`` has no loaded version.
        """
        models = self._models
        if name and not models.get(name):
            self.resolve(name, None)  # raises UnknownModel, naming the loaded models
        return [models[n][v] for n in sorted(models) if not name or n == name for v in sorted(models[n])]

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
        """Load ``name`` at ``version``, or (None) its newest version that loads, as an automatic version.

        Without a version, versions are tried newest first; each that fails is
        recorded with its reason and the next older one is tried.

        Raises:
            UnknownModel, UnknownVersion: not in the repository.
            ArtifactError, PathOutsideRoot: the numbered version does not load, or no version does
                (the message then names each version and its reason).
        """
        check_name(name)
        return await self._joined(("load", name, version), functools.partial(self._load, name, version))

    async def _load(self, name: str, version: int | None) -> LoadedModel:
        """``load``'s work, in its own task (``_joined``)."""
        async with self._model_lock(name):
            try:
                before = self._models.get(name) or {}
                if version is None:
                    lm = await self._follow(name, retry_unchanged=True)
                else:
                    lm = await self._load_version(name, version)
                    lm.auto = False  # asked for by number: keep it until unloaded
                # its version is in place (loaded before, or now): whatever a reload below does, the model is loaded
                self._unloaded_models.discard(name)  # loaded again: the poller follows it again
                self._unloaded_versions.pop(name, None)
                return await self._reload_loaded(name, before, lm, only=version is not None)
            finally:
                self._changed()  # loaded, or a failure recorded: health and status follow

    async def _load_version(self, name: str, version: int) -> LoadedModel:
        """``name:version``, loaded now (automatic) unless it already is. Call with the model's lock held."""
        lm = (self._models.get(name) or {}).get(version)
        if lm is not None:
            return lm
        entries = await self.loader.scan(name)
        entry = next((e for e in entries if e.version == version), None)
        if entry is None:
            versions = [e.version for e in entries if not e.problem]
            raise UnknownVersion(f"model {name!r} has no version {version}; versions: {versions}")
        return await self._install(name, entry, auto=True)

    async def _follow(self, name: str, retry_unchanged: bool) -> LoadedModel:
        """Scan, then follow the DEFAULT pointer and load the newest version that loads; call with the lock held.

        The pointer is read after the scan: a job that pins DEFAULT and then publishes a version
        (a gate-rejected candidate) is seen with its pointer whenever its version is seen.
        """
        entries = await self.loader.scan(name)
        await self._sync_default(name, entries, retry_unchanged)
        return await self._load_newest(name, entries, retry_unchanged)

    async def _reload_loaded(self, name: str, before: dict[int, LoadedModel], lm: LoadedModel,
                             only: bool) -> LoadedModel:
        """``load``'s reload: the versions of ``before`` (loaded when the call began) still in place, loaded again
        where their files changed (``_reload``), newest first; with ``only``, ``lm``'s version alone. Returns that
        version's instance (``lm``, or the one that replaced it). Call with the model's lock held.

        Raises:
            UnknownVersion: ``lm``'s version, named, was loaded and is no longer on disk (it serves on until the
                poller, when on, unloads it: ``poll_once``; or ``unload`` does).
            the error of ``lm``'s version's build (the instance loaded before serves on). Another version's failure
                is logged and recorded, not raised: the caller did not ask for it, and it serves on too.
        """
        version = lm.version
        if not before or (only and version not in before):
            return lm  # nothing was loaded before the call: nothing to load again
        entries = await self.loader.scan(name)
        if only and version in before and all(e.version != version for e in entries):
            versions = [e.version for e in entries if not e.problem]
            raise UnknownVersion(f"model {name!r} has no version {version}; versions: {versions}")
        failure: Exception | None = None
        for entry in reversed(entries):
            old = before.get(entry.version)
            if old is None or (only and entry.version != version):
                continue  # not loaded before this call (built just now, or not at all)
            if (self._models.get(name) or {}).get(entry.version) is not old:
                continue  # gone or replaced since
            try:
                await self._reload(name, entry, old)
            except Exception as exc:  # recorded by the loader and logged by _reload; the old instance serves on
                if entry.version == version:
                    failure = exc
        if failure is not None:
            raise failure
        return (self._models.get(name) or {}).get(version, lm)

    async def _load_newest(self, name: str, entries: list[VersionEntry], retry_unchanged: bool) -> LoadedModel:
        """The newest of ``entries`` that loads (already loaded, or loaded now); call with the model's lock held.

        ``retry_unchanged=False`` (the poller) skips versions that failed and whose files did not change
        since, and versions that were unloaded explicitly.
        """
        table = self._models.get(name) or {}
        unloaded = self._unloaded_versions.get(name, set())
        failures: list[str] = []
        chosen: LoadedModel | None = None
        for entry in reversed(entries):
            chosen = table.get(entry.version)
            if chosen is not None:
                break
            if not retry_unchanged and entry.version in unloaded:
                continue
            if not retry_unchanged and self.record.unchanged(name, entry):
                failures.append(f"version {entry.version}: {self.record.reason(name, entry.version)}")
                continue
            try:
                chosen = await self._install(name, entry, auto=True)
                break
            except Exception as exc:  # recorded by _install; try the next older version
                failures.append(f"version {entry.version}: {self.record.reason(name, entry.version)}")
                if entries[0] is not entry:
                    log.warning("model %s: version %d does not load; trying older versions", name, entry.version)
                if not isinstance(exc, SegsvcError):
                    log.error("model %s version %d failed unexpectedly", name, entry.version, exc_info=exc)
        if chosen is None and table:  # nothing on disk loads, but versions already in memory do
            chosen = table[max(table)]
        if chosen is None:
            if not entries:
                raise UnknownModel(f"model {name!r} has no complete versions in the repository")
            raise ArtifactError(f"no version of model {name!r} loads: " + "; ".join(failures))
        self._retire_older_auto(name, chosen.version)
        return chosen

    async def _install(self, name: str, entry: VersionEntry, auto: bool) -> LoadedModel:
        """Build one version and put it in the table (a failure is recorded by the loader and re-raised)."""
        lm = await self.loader.build(name, entry, auto)
        self._models = {**self._models, name: {**(self._models.get(name) or {}), entry.version: lm}}
        return lm

    async def _reload(self, name: str, entry: VersionEntry, old: LoadedModel) -> LoadedModel:
        """``old`` loaded again from ``entry`` when its files changed since it was built, else ``old`` itself.

        The new instance is built beside ``old`` and swapped in with one assignment; ``old`` retires as a
        replaced version does (requests holding it finish on it, its queue drains); the new one keeps ``old``'s
        statistics. A build that fails installs nothing: ``old`` serves on and the error (recorded by the loader:
        the READY version's reason) is raised. Call with the model's lock held.
        """
        if await self.loader.unchanged(old):
            return old
        log.info("model %s: version %d changed on disk; loading it again", name, entry.version)
        try:
            lm = await self.loader.build(name, entry, old.auto, stats=old.stats)  # the same version
        except Exception:
            log.warning("model %s: version %d was not loaded again; the instance loaded before serves on "
                        "(GetModel shows why)", name, entry.version)
            raise
        table = self._models.get(name) or {}
        self._models = {**self._models, name: {**table, entry.version: lm}}
        if table.get(entry.version) is old:  # else it went during the build (released after an unload)
            log.info("model %s: version %d loaded again; draining the instance it replaces", name, entry.version)
            self._start_retiring(old)
        return lm

    def _retire_older_auto(self, name: str, newest: int) -> None:
        self._track_default(name)
        table = self._models.get(name) or {}
        old = [
            lm for v, lm in table.items()
            if lm.auto and v < newest and v not in self._kept(name) and not self._holds.get((name, v))
        ]
        if not old:
            return
        self._models = {**self._models, name: {v: lm for v, lm in table.items() if lm not in old}}
        for lm in old:
            log.info("model %s: version %d replaced by %d; draining it", name, lm.version, newest)
            self._start_retiring(lm)

    def _start_retiring(self, lm: LoadedModel) -> asyncio.Task:
        """Retire ``lm`` in a task of its own, tracked until done, so that no cancelled caller leaves it running."""
        task = asyncio.get_running_loop().create_task(
            lm.retire(self.config.drain_timeout_s), name=f"retire-{lm.name}:{lm.version}")
        self._retiring[task] = lm
        task.add_done_callback(self._retired)
        return task

    def _retired(self, task: asyncio.Task) -> None:
        lm = self._retiring.pop(task, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("model %s: retiring version %d failed", lm.name if lm else "?", lm.version if lm else 0,
                      exc_info=exc)

    def _joined(self, key: OperationKey, start: Callable[[], Coroutine[Any, Any, T]]) -> Awaitable[T]:
        """The operation ``key`` in flight, or a new one made by ``start()``; every caller gets its result or error.

        It runs in a task of its own, tracked until done: a caller cancelled (a client deadline during a slow
        build) stops waiting, not the operation, so the build it began is neither lost nor run a second time
        beside itself by a retry, which joins it.
        """
        task = self._operations.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                start(), name=f"{key[0]}-{key[1]}:{key[2] if key[2] is not None else 'newest'}")
            self._operations[key] = task
            task.add_done_callback(functools.partial(self._operation_done, key))
        return asyncio.shield(task)

    def _operation_done(self, key: OperationKey, task: asyncio.Task) -> None:
        if self._operations.get(key) is task:
            del self._operations[key]
        if not task.cancelled():
            task.exception()  # retrieved even when every caller left: the loader logged why a build failed

    def _loaded_table(self, name: str, version: int | None, hint: str = "") -> dict[int, LoadedModel]:
        """``name``'s loaded versions, with ``version`` (when given) among them, else the error saying which is
        not (``hint`` appended: what to do about it)."""
        table = self._models.get(name) or {}
        if not table:
            raise UnknownModel(f"model {name!r} is not loaded")
        if version and version not in table:
            raise UnknownVersion(f"model {name!r} version {version} is not loaded (loaded: {sorted(table)}){hint}")
        return table

    async def unload(self, name: str, version: int | None = None) -> list[int]:
        """Unload one version (or all of ``name``'s versions); returns the versions unloaded.

        The poller leaves them unloaded until ``load`` of the model. Queued requests finish first; the
        versions are retired even when the caller is cancelled while they drain.

        Raises:
            UnknownModel, UnknownVersion: not loaded.
            FailedPrecondition: ``version`` is the one the DEFAULT pointer (or the in-memory pin) names and
                others stay loaded; or a batch job holds a version it would unload (``_refuse_job_holds``).
        """
        check_name(name)
        async with self._model_lock(name):
            table = self._loaded_table(name, version)
            if version and len(table) > 1 and version in (self._stored.get(name), self._pinned.get(name)):
                raise FailedPrecondition(
                    f"model {name!r} version {version} is the model's DEFAULT version: "
                    "SetDefaultVersion to another first, or unload the whole model"
                )
            self._refuse_job_holds(name, [version] if version else sorted(table))
            gone = [table[version]] if version else list(table.values())
            rest = {v: lm for v, lm in table.items() if lm not in gone}
            models = dict(self._models)
            if rest:
                models[name] = rest
                self._unloaded_versions.setdefault(name, set()).add(version)  # type: ignore[arg-type]
            else:
                models.pop(name, None)
                self._unloaded_models.add(name)
                self._unloaded_versions.pop(name, None)
            self._models = models
            self._forget_removed(name, set(table) - set(rest))
            if self._pinned.get(name) not in rest:
                self._pinned.pop(name, None)
            if self._stored.get(name) not in rest:  # loading it again reads the pointer anew
                self._stored.pop(name, None)
            self._track_default(name)  # an unloaded previous default is not kept (a retain loading it again)
            self._changed()
            retiring = [self._start_retiring(lm) for lm in gone]
            await asyncio.shield(asyncio.gather(*retiring))  # a cancelled caller leaves them retiring
            return sorted(lm.version for lm in gone)

    def _refuse_job_holds(self, name: str, versions: list[int]) -> None:
        """Refuse to unload ``versions`` of ``name`` while batch jobs hold any of them: the job would fail
        half done ("model is not loaded") for good, as a dataset is not deleted under a training job.

        Raises:
            FailedPrecondition: naming each held version and how many jobs hold it (the manager does not know
                their ids), and what to do.
        """
        held = [(v, n) for v in versions if (n := self._job_holds.get((name, v), 0))]
        if not held:
            return
        uses = " and ".join(f"version {v} {'is ' if i == 0 else ''}in use by {n} batch job{'s' if n > 1 else ''}"
                            for i, (v, n) in enumerate(held))
        raise FailedPrecondition(
            f"model {name!r} {uses}: cancel them (`segsvc jobs cancel JOB_ID`; `segsvc jobs list` shows them) "
            "or wait for them to finish, then unload")

    async def retain(self, name: str, version: int, *, job: bool = False) -> None:
        """Keep ``name:version`` loaded until the matching ``release``: one request's version, or with ``job`` a
        batch job's pinned one (``unload`` refuses while a batch job holds a version, not while a request does).

        A held version is never replaced by a newer automatic one; one that was
        not loaded is loaded as automatic, so it goes once released and outdated
        (one that ``load`` loaded by number meanwhile stays as it is). Unlike
        ``load``, it does not clear an ``unload`` mark: the poller still leaves the model alone.
        """
        check_name(name)
        key = (name, version)
        self._holds[key] = self._holds.get(key, 0) + 1
        if job:
            self._job_holds[key] = self._job_holds.get(key, 0) + 1
        if version in (self._models.get(name) or {}):
            return
        try:
            await self._joined(("retain", name, version), functools.partial(self._load_retained, name, version))
        except BaseException:
            self.release(name, version, job=job)
            raise

    async def _load_retained(self, name: str, version: int) -> None:
        """``retain``'s load, in its own task (``_joined``); when every caller left meanwhile, the version is
        settled as their ``release`` would have settled it."""
        try:
            async with self._model_lock(name):
                try:
                    await self._load_version(name, version)  # one loaded meanwhile (by number) stays as it is
                finally:
                    self._changed()
        finally:
            if not self._holds.get((name, version)):
                self._settle(name, version)

    def release(self, name: str, version: int, *, job: bool = False) -> None:
        """End one ``retain`` (``job`` as given to it); an outdated automatic version with no holds left is
        retired, and so is one that ``unload`` had unloaded (the retain loaded it again; the unload stays in
        effect)."""
        key = (name, version)
        if job:
            jobs = self._job_holds.get(key, 0) - 1
            if jobs > 0:
                self._job_holds[key] = jobs
            else:
                self._job_holds.pop(key, None)
        left = self._holds.get(key, 0) - 1
        if left > 0:
            self._holds[key] = left
            return
        self._holds.pop(key, None)
        self._settle(name, version)

    def _settle(self, name: str, version: int) -> None:
        """``name:version`` has no holds left: retire it if ``unload`` had unloaded it or its folder left the
        repository (``poll_once``), and outdated automatic ones."""
        table = self._models.get(name) or {}
        lm = table.get(version)
        removed = version in self._removed.get(name, ())  # its folder left the repository (``_drop_removed``)
        gone = removed or lm is not None and lm.auto and self._unloaded(name, version)
        if lm is not None and gone and version not in self._kept(name):
            rest = {v: m for v, m in table.items() if v != version}
            models = dict(self._models)
            if rest:
                models[name] = rest
            else:
                models.pop(name)
                if not self._lock_users.get(name):
                    self._locks.pop(name, None)
            self._models = models
            self._forget_removed(name, {version})
            log.info("model %s: version %d %s; it goes now that nothing holds it", name, version,
                     "left the repository" if removed else "was unloaded")
            self._start_retiring(lm)
            self._changed()
        if self._models.get(name):
            self._retire_older_auto(name, self._newest(name))

    async def set_default(self, name: str, version: int | None) -> None:
        """Make ``version`` the default of ``name`` by writing ``<model>/DEFAULT``; ``None``/0 removes the pointer
        (the newest loaded version is the default again).

        A version that is not loaded is loaded and warmed first (in a task of its own, as ``retain`` loads, so a
        caller cancelled during the build does not waste it), as the poller does for a DEFAULT written by hand;
        one that does not load is refused with its reason and the default is left as it was. The model must be
        loaded, and a version unloaded with ``unload`` stays unloaded until ``load`` (it is refused, as the poller
        leaves a DEFAULT naming it alone). The outgoing default stays loaded as the previous one
        (``_track_default``). Like a training job's promotion, which writes the same pointer, the last write wins,
        and a restart keeps it. A repository that cannot be written (mounted read-only) gets an in-memory pin
        instead (logged), which lasts until the pointer moves or the server restarts.

        Raises:
            UnknownModel: ``name`` has no loaded version.
            UnknownVersion: ``version`` is not in the repository, or left it.
            FailedPrecondition: ``version`` was unloaded with ``unload``.
            ArtifactError, PathOutsideRoot: ``version`` does not load (the reason is in the message).
        """
        check_name(name)
        if not version:
            async with self._model_lock(name):
                self._loaded_table(name, None)
                await self._write_default(name, None)
            return
        self._check_default(name, version)
        await self.retain(name, version)  # loaded and warmed when it is not: the same as the file does
        try:
            async with self._model_lock(name):
                if name in self._unloaded_models:  # unloaded while it loaded: the retain loaded it again
                    raise UnknownModel(f"model {name!r} is not loaded (unloaded with UnloadModel); load it first")
                self._check_default(name, version)  # the version unloaded or removed while it loaded
                await self._write_default(name, version)
        finally:
            self.release(name, version)  # the default now: kept; else an outdated automatic one goes

    def _check_default(self, name: str, version: int) -> None:
        """Refuse ``set_default(name, version)`` for a model not loaded, or a version that left the repository
        (kept for the batch jobs holding it) or was unloaded with ``unload``."""
        table = self._loaded_table(name, None)
        if version in self._removed.get(name, ()):
            raise UnknownVersion(f"model {name!r} version {version} left the repository; it serves only the "
                                 "batch jobs holding it until they release it")
        if version not in table and self._unloaded(name, version):
            raise FailedPrecondition(f"model {name!r} version {version} was unloaded with UnloadModel; load it "
                                     "with LoadModel first")

    async def _write_default(self, name: str, version: int | None) -> None:
        """``set_default``'s switch, with the model's lock held and ``version`` (when given) loaded and held."""
        self._loaded_table(name, version, hint="; load it first")
        try:
            await asyncio.to_thread(self.repository.set_default, name, version or None)
        except OSError as exc:
            log.warning("model %s: cannot write the DEFAULT pointer (%s); the default is %s in memory only, "
                        "until the pointer moves or the server restarts", name, exc.strerror or exc,
                        f"version {version}" if version else "the pointer's or the newest")
            if version:
                self._pinned[name] = version
            else:
                self._pinned.pop(name, None)
        else:
            self._pinned.pop(name, None)
            if version:
                self._stored[name] = version
            else:
                self._stored.pop(name, None)
            log.info("model %s: DEFAULT set to %s", name, version or "none (the newest loaded version)")
        self._retire_older_auto(name, self._newest(name))  # the former previous default, automatic and outdated, goes
        self._changed()

    async def refresh_default(self, name: str) -> int:
        """Follow ``<model>/DEFAULT`` now (after a promotion wrote it); returns the default version.

        The version it names is loaded and warmed before requests switch to it;
        a model with no pointer and nothing loaded gets its newest version. The
        pointer is read after the scan of the versions it applies to (here, in
        ``load`` and in ``poll_once``): a version published with a pointer to an
        older one is never served by default, not even until the pointer is read.
        A model unloaded with ``unload`` stays unloaded (the pointer is read when
        it is loaded again).
        """
        check_name(name)
        async with self._model_lock(name):
            if name in self._unloaded_models:
                log.info("model %s was unloaded: DEFAULT is followed when it is loaded again", name)
                return self.default_version(name)
            try:
                entries = await self.loader.scan(name)
                await self._sync_default(name, entries, retry_unchanged=True)
                if not self._models.get(name):
                    await self._load_newest(name, entries, retry_unchanged=True)
            finally:
                self._changed()
        return self.default_version(name)

    async def _sync_default(self, name: str, entries: list[VersionEntry], retry_unchanged: bool) -> None:
        """Load the version the repository's DEFAULT names, then make it the stored default; call with the lock held.

        ``entries`` is a scan made *before* the pointer is read here. A pointer that cannot be followed
        (a file that names no version: empty, half written, garbled; refused; a version that is missing,
        does not load or was unloaded) leaves the previous default in effect, so requests never land on a
        broken version nor on the newest one by accident (a rollback stays); it is logged once
        (``_say_once``), and the poller follows the pointer once it can. With no default yet (at start) the
        newest version that loads serves meanwhile. ``retry_unchanged=False`` (the poller) does not build
        again a version that failed and whose files did not change, nor one that was unloaded explicitly.
        """
        current = self._stored.get(name)
        keeping = current or "the newest version"
        try:
            wanted = await asyncio.to_thread(self.repository.read_default, name)
        except SegsvcError as exc:  # names no version, or refused (a symlink out of the root, an oversized file)
            self._say_once(name, _unreadable(exc), "model %s: %s; keeping %s", name, exc, keeping)
            return
        if wanted == current:
            self._pointer_said.pop(name, None)
            return
        table = self._models.get(name) or {}
        removed = wanted in self._removed.get(name, ())  # its folder left; kept for the batch jobs holding it
        if wanted is not None and (wanted not in table or removed):
            entry = None if removed else next((e for e in entries if e.version == wanted), None)
            if entry is None and not removed:  # written after the scan, with a version newer than it saw
                entry = next((e for e in await self.loader.scan(name) if e.version == wanted), None)
            if entry is None:  # followed when it arrives
                self._say_once(name, _missing(wanted), "model %s: DEFAULT names version %d, which is not in the "
                               "repository; keeping %s", name, wanted, keeping)
                return
            if not retry_unchanged and wanted in self._unloaded_versions.get(name, ()):  # until LoadModel
                self._say_once(name, _skipped(wanted), "model %s: DEFAULT names version %d, which was unloaded "
                               "with UnloadModel; keeping %s (LoadModel loads it again)", name, wanted, keeping)
                return
            if not retry_unchanged and self.record.unchanged(name, entry):  # retried when its files change
                self._say_once(name, _skipped(wanted), "model %s: the default version %d does not load (%s); "
                               "keeping %s", name, wanted, self.record.reason(name, wanted), keeping)
                return
            try:
                await self._install(name, entry, auto=True)
            except Exception as exc:  # recorded by the loader; a new attempt, so said again
                self._pointer_said[name] = _skipped(wanted)
                log.error("model %s: the default version %d does not load (%s); keeping %s",
                          name, wanted, exc, keeping)
                return
        self._pointer_said.pop(name, None)
        if wanted is None:
            self._stored.pop(name, None)
        else:
            self._stored[name] = wanted  # requests without a version switch here, atomically
        self._pinned.pop(name, None)  # the pointer moved since an in-memory pin: the last write wins
        log.info("model %s: default version is now %s", name, wanted or "the newest loaded")
        self._retire_older_auto(name, self._newest(name))

    def _say_once(self, name: str, problem: str, message: str, *args: object) -> None:
        """Log ``message`` (an ERROR) about ``name``'s DEFAULT unless ``problem`` (``_unreadable``, ``_missing``,
        ``_skipped``) is the one said last: a pointer that cannot be followed is read at every poll, and the
        same line every two seconds buries the log. The mark goes when the pointer is followed or names the
        default in effect again, so the same problem coming back later is said again."""
        if self._pointer_said.get(name) == problem:
            return
        self._pointer_said[name] = problem
        log.error(message, *args)

    async def _pointer_moved(self, name: str, entries: list[VersionEntry], table: dict[int, LoadedModel],
                             skipped: set[int]) -> bool:
        """Whether the poll must follow ``name``'s DEFAULT (``_sync_default``, which takes the model's lock and
        may scan again): it names another version than the default in effect, or cannot be followed for a
        reason not said yet. One said already (``_say_once``: no version in the file, a version missing,
        failed unchanged or unloaded) is left alone until the pointer or the version changes."""
        said = self._pointer_said.get(name)
        try:
            wanted = await asyncio.to_thread(self.repository.read_default, name)
        except SegsvcError as exc:
            return said != _unreadable(exc)
        if wanted == self._stored.get(name):
            self._pointer_said.pop(name, None)  # back to the default in effect: a later problem is said again
            return False
        if wanted is None or wanted in table:
            return True
        if all(e.version != wanted for e in entries):
            return said != _missing(wanted)
        return wanted not in skipped or said != _skipped(wanted)

    # -- polling ---------------------------------------------------------------------
    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # the poller must survive a bad scan
                log.exception("model repository scan failed")

    async def poll_once(self) -> list[tuple[str, int]]:
        """Load new versions (and new models), unload versions whose folder left; returns the versions loaded.

        A model is (re)considered when it has a version newer than its newest
        loaded one that never failed, or whose files changed since it failed.
        Models and versions unloaded with ``unload`` are left unloaded. A loaded
        version no longer in the repository is unloaded (``_drop_removed``),
        unless the repository root itself is gone (an unmounted volume).
        """
        on_disk = await asyncio.to_thread(self.repository.scan_all)
        self.record.keep_models(set(on_disk))
        loaded: list[tuple[str, int]] = []
        if await asyncio.to_thread(self.repository.root.is_dir):
            self._root_gone = False
            for name, table in list(self._models.items()):
                present = {e.version for e in on_disk.get(name, ())}
                self._forget_removed(name, present)  # back in the repository: it serves as before
                if any(v not in present and v not in self._removed.get(name, ()) for v in table):
                    loaded += await self._drop_removed(name)
        elif not self._root_gone and self._models:
            self._root_gone = True
            log.warning("the model repository %s is not a directory (unmounted?); the loaded versions serve on "
                        "until it is back", self.repository.root)
        for name, entries in on_disk.items():
            if self.config.models and name not in self.config.models or name in self._unloaded_models:
                continue
            removed = self._removed.get(name, ())
            table = {v: lm for v, lm in (self._models.get(name) or {}).items() if v not in removed}
            newest = max(table, default=0)
            unloaded = self._unloaded_versions.get(name, set())
            skipped = {e.version for e in entries if e.version in unloaded or self.record.unchanged(name, e)}
            moved = bool(table) and await self._pointer_moved(name, entries, table, skipped)
            if not moved and all(e.version <= newest or e.version in skipped for e in entries):
                continue
            async with self._model_lock(name):
                if name in self._unloaded_models:  # unloaded while this scan ran
                    continue
                try:
                    lm = await self._follow(name, retry_unchanged=False)
                except Exception as exc:  # each version's reason is recorded and logged
                    log.error("model %s: no version loads: %s", name, exc)
                else:
                    if lm.version not in table:
                        loaded.append((name, lm.version))
                finally:
                    self._changed()
        return loaded

    def _follows(self, name: str) -> bool:
        """Whether the poller loads versions of ``name`` (configured, and not unloaded with ``unload``)."""
        return not (self.config.models and name not in self.config.models) and name not in self._unloaded_models

    async def _drop_removed(self, name: str) -> list[tuple[str, int]]:
        """Unload ``name``'s loaded versions that a fresh scan, under the model's lock, no longer finds; returns
        the version loaded in their place, if any.

        The newest version on disk is loaded first (as the poll would load it next), so requests without a
        version never find the model unloaded meanwhile. A version a batch job holds stays for it, never the
        default, until released (``_settle``). The default is then what a DEFAULT naming a missing version
        gives (``_sync_default``): the pointer's version if it loads, else the newest loaded one. No
        ``unload`` mark is left: a version whose folder comes back is loaded again by the poll.
        """
        async with self._model_lock(name):
            try:
                entries = await self.loader.scan(name)
            except UnknownModel:  # the model's folder left the repository
                entries = []
            except (SegsvcError, OSError) as exc:  # unreadable for now: not a removal
                log.warning("model %s: cannot scan it (%s); its loaded versions serve on", name, exc)
                return []
            present = {e.version for e in entries} | self._removed.get(name, set())  # those: dropped already
            before = self._models.get(name) or {}
            if all(v in present for v in before):
                return []  # a transient (a folder renamed into place), or unloaded meanwhile
            try:
                if entries and self._follows(name):
                    await self._load_newest(name, entries, retry_unchanged=False)
            except Exception as exc:  # each version's reason is recorded and logged
                log.error("model %s: no version loads: %s", name, exc)
            table = self._models.get(name) or {}
            gone = sorted(v for v in table if v not in present)
            held = {v for v in gone if self._holds.get((name, v))}
            for v in gone:
                log.warning("model %s: version %d left the repository; unloading it%s", name, v,
                            " once the batch jobs holding it release it" if v in held else "")
            if held:
                self._removed[name] = self._removed.get(name, set()) | held
            rest = {v: lm for v, lm in table.items() if v not in gone or v in held}
            models = dict(self._models)
            if rest:
                models[name] = rest
            else:
                models.pop(name, None)
            self._models = models
            for v in set(gone) - held:
                self._start_retiring(table[v])
            if self._pinned.get(name) in gone:
                self._pinned.pop(name, None)
            stored = self._stored.get(name) in gone
            if stored:
                self._stored.pop(name, None)
            if self._previous.get(name) in gone:
                self._previous.pop(name, None)
            self._changed()
            if stored and self._follows(name):
                try:  # a DEFAULT still naming the removed version is reported once; the newest serves
                    await self._sync_default(name, entries, retry_unchanged=False)
                except SegsvcError as exc:  # the model's folder went meanwhile: the newest loaded serves
                    log.warning("model %s: cannot follow DEFAULT (%s); the newest loaded version serves", name, exc)
                finally:
                    self._changed()
            now = self._models.get(name) or {}
            return [(name, v) for v in sorted(now) if v not in before]

    def _forget_removed(self, name: str, versions: set[int]) -> None:
        """``versions`` of ``name`` are no longer marked as left the repository (back, unloaded, or gone)."""
        removed = self._removed.get(name)
        if removed and removed & versions:
            if removed - versions:
                self._removed[name] = removed - versions
            else:
                del self._removed[name]
            self._retire_older_auto(name, self._newest(name))

    # -- reporting ---------------------------------------------------------------------
    def snapshot(self) -> list[tuple[str, int, int, bool]]:
        """``(model, version, queue_depth, is_default)`` per loaded version; safe from any thread."""
        rows = []
        for name, table in list(self._models.items()):
            default = self.default_version(name)
            for v, lm in list(table.items()):
                rows.append((name, v, lm.batcher.queue_depth, v == default))
        return rows

    def batcher_stats(self) -> list[tuple[str, BatcherStats]]:
        """``(model, its batcher's live stats)`` per loaded version; safe from any thread (the tables are copied,
        as in ``snapshot``; the stats are the batchers' own, which the drop counter follows by identity)."""
        return [(name, lm.batcher.stats) for name, table in list(self._models.items()) for lm in list(table.values())]

    def failed_versions(self) -> list[tuple[str, int, str]]:
        """``(model, version, reason)`` of every version whose last load failed and that does not serve; safe from
        any thread. A version whose reload failed serves on from the instance loaded before: it is READY, with the
        failure as its reason (``describe``), and is listed here once it no longer serves (unloaded, replaced)."""
        models = self._models
        return [(name, v, reason) for name, v, reason in self.record.rows() if v not in models.get(name, {})]

    def model_health(self) -> dict[str, bool]:
        """Every model a load was attempted for -> whether some version of it is loaded now.

        A model whose every version failed (or that was unloaded) maps to False.
        """
        models = self._models
        return {name: bool(models.get(name)) for name in sorted(self.record.known | set(models))}

    async def describe(self, name: str, version: int | None = None) -> ModelStatus:
        """Status of one version (default: the default version, else the newest on disk), with every version's state."""
        check_name(name)
        try:
            entries = await asyncio.to_thread(self.repository.scan, name)
        except UnknownModel:
            if not self._models.get(name):
                raise
            entries = []
        return await self._status(name, version, entries)

    async def _status(self, name: str, version: int | None, entries: list[VersionEntry]) -> ModelStatus:
        table = self._models.get(name) or {}
        default = self.default_version(name)  # 0: only versions that left the repository are loaded
        v = pick_version(name, version or default or (0 if entries else max(table, default=0)), entries, table)
        manifest = table[v].manifest if v in table else await self.loader.read_manifest(name, v)
        pinned = name in self._pinned or name in self._stored  # by the DEFAULT pointer, not the newest
        status = model_status(name, v, entries, table, default, pinned, self.record, manifest)
        removed = self._removed.get(name, ())
        if not removed:
            return status
        return dataclasses.replace(status, version_status=tuple(
            dataclasses.replace(s, reason=REMOVED_HELD) if s.version in removed and s.version in table else s
            for s in status.version_status))

    async def describe_all(self) -> list[ModelStatus]:
        """Status of every model on disk (even one whose versions all failed) or loaded, sorted by name."""
        on_disk = await asyncio.to_thread(self.repository.scan_all)
        names = set(on_disk) | set(self._models)
        out = []
        for name in sorted(names):
            try:
                out.append(await self._status(name, None, on_disk.get(name, [])))
            except SegsvcError as exc:  # e.g. a model directory removed since the scan: skip it, say why
                log.warning("model %s cannot be described: %s", name, exc)
        return out

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("model change hook failed")


def _unreadable(exc: Exception) -> str:
    """``_say_once``'s mark for a DEFAULT file that names no version, or is refused (its content is in ``exc``)."""
    return f"unreadable: {exc}"


def _missing(version: int) -> str:
    """``_say_once``'s mark for a DEFAULT naming ``version``, which is not in the repository."""
    return f"missing: {version}"


def _skipped(version: int) -> str:
    """``_say_once``'s mark for a DEFAULT naming ``version``, which failed (files unchanged since) or was unloaded."""
    return f"skipped: {version}"


def _few(names: list[str], limit: int = 5) -> str:
    """``'a', 'b' and 3 more``: names for a message, at most ``limit`` of them (a message stays short)."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
