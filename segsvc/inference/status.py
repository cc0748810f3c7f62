"""What the model manager reports about models and their versions (``GetModel``, ``ListModels``, health, metrics).

A version that fails to load must be visible to the people running the
service, not only in the log: every version gets a state and, when it failed,
the reason. Kept apart from ``manager.py`` so the reporting types stay
readable without the loading machinery.
"""

from __future__ import annotations

import contextlib
import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Collection, Iterator, Mapping

from segsvc.errors import UnknownModel, UnknownVersion
from segsvc.inference.repository import Fingerprint, VersionEntry
from segsvc.models.artifact import Manifest

if TYPE_CHECKING:
    from segsvc.inference.loader import LoadedModel


# the reason of a READY version whose reload failed, before the failure's own
SERVES_ON = "its files changed and did not load again; the instance loaded before serves on: "


class VersionState(str, enum.Enum):
    """Where one version of a model stands on this server."""

    AVAILABLE = "AVAILABLE"  # in the repository, not loaded (never tried, unloaded, or replaced)
    LOADING = "LOADING"  # being loaded now
    READY = "READY"  # loaded and accepting requests (a ``reason``: its files changed and did not load again)
    FAILED = "FAILED"  # its last load failed, or it is refused (see ``reason``)


@dataclass(frozen=True)
class VersionStatus:
    """One version's state; ``reason`` says why it FAILED, or why a READY version's files did not load again
    (the instance loaded before serves on); paths relative to the repository root."""

    version: int
    state: VersionState
    reason: str = ""


@dataclass(frozen=True)
class VersionFailure:
    """Why a version did not load, and what its files looked like then.

    Args:
        reason: the load error's message.
        fingerprint: the version's files at the attempt; the poller retries only once they change.
        at: when it failed (``time.time()``).
    """

    reason: str
    fingerprint: Fingerprint
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ModelStatus:
    """A model version as the service reports it (``GetModel``/``ListModels``).

    ``manifest`` is None when the described version is not loaded and its
    manifest cannot be read (the reason is then in ``version_status``).
    """

    name: str
    version: int
    versions: tuple[int, ...]
    loaded_versions: tuple[int, ...]
    default_version: int
    default_pinned: bool
    ready: bool
    manifest: Manifest | None
    output_stride: int = 0
    device: str = ""
    version_status: tuple[VersionStatus, ...] = ()


class LoadRecord:
    """Which versions are loading, which failed and why, and which models a load was tried for.

    Its tables are replaced, never mutated, so metric scrapes on other threads
    read a consistent view while the event loop updates them.
    """

    def __init__(self) -> None:
        self._failed: dict[tuple[str, int], VersionFailure] = {}
        self._loading: frozenset[tuple[str, int]] = frozenset()
        self.known: frozenset[str] = frozenset()

    def seen(self, name: str, entries: list[VersionEntry]) -> None:
        """``name`` was scanned: remember it, and forget failures of its versions that are gone."""
        self.known = self.known | {name}
        on_disk = {e.version for e in entries}
        if any(k[0] == name and k[1] not in on_disk for k in self._failed):
            self._failed = {k: f for k, f in self._failed.items() if k[0] != name or k[1] in on_disk}

    def keep_models(self, names: Collection[str]) -> None:
        """Forget failures of models no longer in the repository."""
        if any(k[0] not in names for k in self._failed):
            self._failed = {k: f for k, f in self._failed.items() if k[0] in names}

    @contextlib.contextmanager
    def loading(self, name: str, version: int) -> Iterator[None]:
        """Mark ``name:version`` LOADING for the duration of the block."""
        key = (name, version)
        self._loading = self._loading | {key}
        try:
            yield
        finally:
            self._loading = self._loading - {key}

    def failed(self, name: str, entry: VersionEntry, reason: str) -> bool:
        """Record a failed load; True when it is news (another reason or other files), to log it once."""
        key = (name, entry.version)
        old = self._failed.get(key)
        self._failed = {**self._failed, key: VersionFailure(reason, entry.fingerprint)}
        return old is None or old.reason != reason or old.fingerprint != entry.fingerprint

    def loaded(self, name: str, version: int) -> None:
        if (name, version) in self._failed:
            self._failed = {k: f for k, f in self._failed.items() if k != (name, version)}

    def unchanged(self, name: str, entry: VersionEntry) -> bool:
        """True when ``entry`` failed before and its files have not changed since (retrying is pointless)."""
        failure = self._failed.get((name, entry.version))
        return failure is not None and failure.fingerprint == entry.fingerprint

    def reason(self, name: str, version: int) -> str:
        failure = self._failed.get((name, version))
        return failure.reason if failure else ""

    def rows(self) -> list[tuple[str, int, str]]:
        """``(model, version, reason)`` of every failed version; safe from any thread."""
        return [(name, v, f.reason) for (name, v), f in sorted(self._failed.items())]

    def states(self, name: str, entries: list[VersionEntry], ready: dict[int, bool]) -> tuple[VersionStatus, ...]:
        """The state of every version of ``name`` on disk or in memory, ascending.

        Args:
            name: the model.
            entries: its versions on disk (``ModelRepository.scan``).
            ready: its loaded versions -> whether their batcher runs.
        """
        problems = {e.version: e.problem for e in entries}
        failed = {k[1]: f for k, f in self._failed.items() if k[0] == name}
        loading = {k[1] for k in self._loading if k[0] == name}
        out = []
        for v in sorted(set(problems) | set(ready) | loading | set(failed)):
            if v in ready:  # a failure recorded for it is a reload's: it serves on from what loaded before
                reason = f"{SERVES_ON}{failed[v].reason}" if v in failed else ""
                out.append(VersionStatus(v, VersionState.READY if ready[v] else VersionState.AVAILABLE, reason))
            elif v in loading:
                out.append(VersionStatus(v, VersionState.LOADING))
            elif problems.get(v):
                out.append(VersionStatus(v, VersionState.FAILED, problems[v]))
            elif v in failed:
                out.append(VersionStatus(v, VersionState.FAILED, failed[v].reason))
            else:
                out.append(VersionStatus(v, VersionState.AVAILABLE))
        return tuple(out)


def pick_version(name: str, version: int, entries: list[VersionEntry], loaded: Mapping[int, "LoadedModel"]) -> int:
    """The version ``describe`` reports: ``version`` (0: the newest complete one on disk, else the newest entry).

    Raises:
        UnknownModel: the model has no version at all.
        UnknownVersion: ``version`` is neither on disk nor loaded.
    """
    complete = [e.version for e in entries if not e.problem]
    v = version or (complete or [e.version for e in entries] or [0])[-1]
    if not v:
        raise UnknownModel(f"model {name!r} has no versions in the repository")
    if v not in loaded and v not in {e.version for e in entries}:
        raise UnknownVersion(f"model {name!r} has no version {v}; versions: {sorted(set(complete) | set(loaded))}")
    return v


def model_status(
    name: str,
    version: int,
    entries: list[VersionEntry],
    loaded: Mapping[int, "LoadedModel"],
    default_version: int,
    default_pinned: bool,
    record: LoadRecord,
    manifest: Manifest | None,
) -> ModelStatus:
    """Assemble the ``ModelStatus`` of ``name:version`` from what is on disk, in memory and in the record."""
    lm = loaded.get(version)
    return ModelStatus(
        name=name,
        version=version,
        versions=tuple(e.version for e in entries if not e.problem),
        loaded_versions=tuple(sorted(loaded)),
        default_version=default_version,
        default_pinned=default_pinned,
        ready=lm is not None and lm.batcher.running,
        manifest=manifest,
        output_stride=lm.engine.predictor.stride if lm else 0,
        device=str(lm.engine.device) if lm else "",
        version_status=record.states(name, entries, {v: m.batcher.running for v, m in loaded.items()}),
    )
