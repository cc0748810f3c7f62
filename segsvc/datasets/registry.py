"""The dataset registry: validated datasets by content hash, with human names, in SQLite (WAL).

Training jobs name a dataset and get its description back::

    registry = DatasetRegistry(DatasetsConfig(state_dir))
    dataset = registry.get("shapes")          # a name, the hash, or a unique hash prefix (>= 8 hex digits)
    spec = load_dataset_spec(dataset.spec_path)   # == dataset.load_spec()
    dataset.sha256                            # the content's identity: record it with the model

``Dataset.spec_path`` and ``Dataset.sha256`` are the stable contract: the spec
is a ``dataset.yaml`` that ``segsvc.data.spec.load_dataset_spec`` loads, with
the deterministic val split written into it when the dataset came without one
(``split.source_split``); the hash is ``content.content_hash`` of the files.

On disk, under ``<state_dir>``::

    datasets.sqlite                 one row per dataset (WAL; other processes may read it)
    datasets/<sha256>/spec.yaml     the training spec (root: data/... or the registered folder)
    datasets/<sha256>/data/         an uploaded dataset's files (a registered one stays in the data root)
    datasets/.work-<hex>/           an upload or registration in progress

A new dataset is prepared in a ``.work-`` folder, validated, renamed to its
hash and only then given its row; on any failure the folder goes and no row is
written. At start-up, work folders and hash folders without a row (a crash
between rename and insert) are removed.

Example:
    >>> registry = DatasetRegistry(DatasetsConfig("state", data_root="data"))  # doctest: +SKIP
    >>> registry.register("shapes", name="shapes").split_sizes  # doctest: +SKIP
    {'train': 160, 'val': 40}
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import posixpath
import re
import secrets
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from segsvc.data.spec import DatasetSpec, load_dataset_spec
from segsvc.datasets.archive import FORMATS, ExtractLimits
from segsvc.datasets.ingest import (
    MAX_CLASSES, SPEC_FILE, check_class_names, class_shares, fingerprint, load_confined, registered_files,
    registered_folder, scrub_paths, validate, write_training_spec,
)
from segsvc.datasets.split import VAL_FRACTION
from segsvc.datasets.upload import DatasetUpload
from segsvc.errors import (
    AlreadyExists, DatasetInvalid, FailedPrecondition, InvalidArgument, NotFound, Overloaded, PathOutsideRoot,
    SegsvcError, Unavailable, UploadError,
)
from segsvc.files import fsync_folder, fsync_tree

log = logging.getLogger("segsvc.datasets")

SOURCES = ("upload", "register")
BUSY_TIMEOUT_S = 5.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_PREFIX = re.compile(r"[0-9a-f]{8,64}")
_WORK, _DELETING = ".work-", ".deleting-"
_MAX_JOBS_SHOWN = 10  # job ids a refused delete names
_SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS datasets (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, sha256 TEXT NOT NULL UNIQUE, name TEXT NOT NULL UNIQUE,
        source TEXT NOT NULL CHECK (source IN {SOURCES!r}), source_path TEXT NOT NULL, format TEXT NOT NULL,
        class_names TEXT NOT NULL, split_sizes TEXT NOT NULL, class_shares TEXT NOT NULL,
        split_assigned INTEGER NOT NULL, files INTEGER NOT NULL, total_bytes INTEGER NOT NULL,
        created_at REAL NOT NULL
    )""",
)


@dataclass(frozen=True)
class DatasetsConfig:
    """Where datasets live and what an upload may hold.

    Args:
        state_dir: holds ``datasets.sqlite`` and ``datasets/`` (the server's ``--state-dir``).
        data_root: folders that ``register`` accepts must lie under it (``None``: uploads only).
        limits: bytes, files, compression ratio and image size of a dataset (``--max-dataset-mb``,
            ``--max-dataset-files``, ``--max-dataset-ratio``, ``--max-dataset-pixels``).
        val_fraction: share of samples put in ``val`` when a dataset has no val split.
        max_concurrent_uploads: uploads received at the same time (``--max-dataset-uploads``); one more
            is refused (``Overloaded``) before it writes anything.
        upload_idle_s: longest wait for the next message of an upload (``--dataset-upload-idle-s``); a
            stalled client loses its upload, its slot and its files (the server's ``UploadDataset``).
        max_disk_bytes: most bytes the datasets folder may hold (``--max-datasets-disk-mb``): the files of
            uploaded datasets plus every byte of the uploads in progress (spooled archive and extracted
            files), charged before it is written.
    """

    state_dir: Path
    data_root: Path | None = None
    limits: ExtractLimits = field(default_factory=ExtractLimits)
    val_fraction: float = VAL_FRACTION
    max_concurrent_uploads: int = 4
    upload_idle_s: float = 300.0
    max_disk_bytes: int = 64 << 30

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise InvalidArgument(f"datasets: val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("max_concurrent_uploads", "upload_idle_s", "max_disk_bytes"):
            if not getattr(self, name) > 0:
                raise InvalidArgument(f"datasets: {name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class Dataset:
    """One registered dataset.

    Attributes:
        sha256: the content hash (``content.content_hash``): the dataset's identity.
        name: its unique alias.
        source: ``"upload"`` or ``"register"``; ``source_path`` the format uploaded
            (tar, zip, pairs) or the folder relative to the data root.
        spec_path: the training spec; ``load_dataset_spec(spec_path)`` loads it.
        format: the layout (folder, camvid, membrane, voc).
        class_names: class id i is ``class_names[i]``.
        split_sizes: samples per split, in the spec's order.
        class_shares: share of each class in the labelled pixels.
        split_assigned: the train/val split was assigned by hash (``split.py``).
        files, total_bytes: what was hashed.
        created_at: registration time (Unix seconds).
    """

    sha256: str
    name: str
    source: str
    source_path: str
    spec_path: Path
    format: str
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]
    class_shares: dict[str, float]
    split_assigned: bool
    files: int
    total_bytes: int
    created_at: float

    def load_spec(self) -> DatasetSpec:
        """The training spec (``load_dataset_spec(self.spec_path)``)."""
        return load_dataset_spec(self.spec_path)


# The ids of the unfinished jobs that use a dataset (``DatasetRegistry.guard_deletes``).
DatasetUsers = Callable[[Dataset], Iterable[str]]


def check_name(name: str) -> str:
    """A dataset alias: letters, digits, ``_.-``, at most 64 characters, not a full hash."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(f"dataset name {name[:80]!r} must be 1-64 letters, digits or _.- "
                              f"starting with a letter or digit")
    if _SHA256.fullmatch(name.lower()):
        raise InvalidArgument(f"dataset name {name!r} looks like a content hash; choose another")
    return name


def _folder_name(folder: str) -> str:
    """The name a registered folder gives its dataset when none is given: its own, if it is a valid name."""
    if folder == ".":
        raise InvalidArgument("registering the data root itself ('.'): give the dataset a name")
    try:
        return check_name(posixpath.basename(folder))
    except InvalidArgument as exc:
        raise InvalidArgument(f"folder {folder!r} does not name a dataset ({exc}): give the dataset a name") from None


class DatasetRegistry:
    """Registered datasets: ``register``, ``open_upload``, ``get``, ``list``, ``delete``.

    Thread-safe (one SQLite connection behind a lock; the expensive checks run
    outside it, so uploads proceed in parallel).

    Args:
        config: state folder, data root and upload limits.
    """

    def __init__(self, config: DatasetsConfig) -> None:
        self.config = config
        state = Path(config.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        self.root = state.resolve() / "datasets"
        self.root.mkdir(exist_ok=True)
        self.path = state.resolve() / "datasets.sqlite"
        self._lock = threading.RLock()
        self._users: tuple[DatasetUsers, ...] = ()  # who may hold a dataset (``guard_deletes``)
        self._uploads: dict[int, int] = {}  # uploads in progress (under ``_lock``): id -> bytes charged
        self._upload_ids = itertools.count()
        self._stored: int | None = None  # bytes of uploaded datasets, from their rows (None: to be read)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            conn.close()
            raise InvalidArgument(f"{self.path}: SQLite refused WAL mode; use a local filesystem")
        conn.execute("PRAGMA synchronous = NORMAL")
        for statement in _SCHEMA:
            conn.execute(statement)
        self._conn: sqlite3.Connection | None = conn
        self._clean()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise Unavailable("the dataset registry is closed")
            yield self._conn

    def _clean(self) -> None:
        """Remove what a crash left: work folders, half-deleted ones, hash folders without a row."""
        with self._db() as c:
            known = {row[0] for row in c.execute("SELECT sha256 FROM datasets")}
        for entry in self.root.iterdir():
            leftover = entry.name.startswith((_WORK, _DELETING)) or (
                _SHA256.fullmatch(entry.name) is not None and entry.name not in known)
            if leftover and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)

    # -- reading ------------------------------------------------------------------------
    def _dataset(self, row: sqlite3.Row) -> Dataset:
        return Dataset(
            sha256=row["sha256"], name=row["name"], source=row["source"], source_path=row["source_path"],
            spec_path=self.root / row["sha256"] / SPEC_FILE, format=row["format"],
            class_names=tuple(json.loads(row["class_names"])), split_sizes=json.loads(row["split_sizes"]),
            class_shares=json.loads(row["class_shares"]), split_assigned=bool(row["split_assigned"]),
            files=row["files"], total_bytes=row["total_bytes"], created_at=row["created_at"],
        )

    def get(self, name_or_hash: str) -> Dataset:
        """A dataset by name, content hash, or a unique prefix of the hash (at least 8 hex digits).

        Names are matched exactly: one that differs only in case from a registered name is not found, and the
        error suggests that name (``did you mean 'small'?``).

        Raises:
            NotFound: no such dataset. InvalidArgument: an ambiguous hash prefix.
        """
        key = name_or_hash.strip() if isinstance(name_or_hash, str) else ""
        if not key:
            raise InvalidArgument("name a dataset: its name or content hash")
        with self._db() as c:
            row = c.execute("SELECT * FROM datasets WHERE name = ?", (key,)).fetchone()
            if row is None and _HASH_PREFIX.fullmatch(key.lower()):
                rows = c.execute("SELECT * FROM datasets WHERE substr(sha256, 1, ?) = ? LIMIT 2",
                                 (len(key), key.lower())).fetchall()
                if len(rows) > 1:
                    raise InvalidArgument(f"hash prefix {key!r} matches several datasets; give more digits")
                row = rows[0] if rows else None
            # Names are identifiers, unique without regard to case (``_existing``): another case is not resolved
            # silently, but the one name it could mean is suggested.
            near = None if row is not None else c.execute(
                "SELECT name FROM datasets WHERE lower(name) = lower(?) LIMIT 1", (key,)).fetchone()
        if row is None:
            hint = f"; did you mean {near[0]!r}?" if near is not None else ""
            raise NotFound(f"no dataset named {key[:80]!r} (nor with that hash){hint}")
        return self._dataset(row)

    def list(self) -> list[Dataset]:
        """Every dataset, oldest first."""
        with self._db() as c:
            return [self._dataset(row) for row in c.execute("SELECT * FROM datasets ORDER BY seq")]

    # -- deleting -----------------------------------------------------------------------
    def guard_deletes(self, users: DatasetUsers) -> None:
        """Refuse to delete a dataset while ``users(dataset)`` names unfinished jobs that use it.

        The job layer plugs in here (``TrainingRunner`` does, for its QUEUED and
        RUNNING jobs), so the registry needs to know nothing about jobs. ``users``
        is called under the registry's lock, from the deleting thread.
        """
        with self._lock:
            self._users = (*self._users, users)

    def delete(self, name_or_hash: str) -> Dataset:
        """Forget a dataset and remove its folder (a registered data-root folder is never touched).

        Raises:
            NotFound: no such dataset. FailedPrecondition: an unfinished job uses it
            (see ``guard_deletes``); the message names the jobs.
        """
        with self._lock:
            dataset = self.get(name_or_hash)
            # Under the lock: a job committed before this check is seen; one committed after it (its
            # submission looked the dataset up just before) fails when it starts, naming the dataset.
            jobs = sorted({job_id for users in self._users for job_id in users(dataset)})
            if jobs:
                shown = ", ".join(jobs[:_MAX_JOBS_SHOWN]) + (
                    f" and {len(jobs) - _MAX_JOBS_SHOWN} more" if len(jobs) > _MAX_JOBS_SHOWN else "")
                raise FailedPrecondition(
                    f"dataset {dataset.name!r} ({dataset.sha256[:12]}) is in use by {len(jobs)} unfinished "
                    f"job(s): {shown}; cancel them or wait for them to finish, then delete it")
            with self._db() as c:
                c.execute("DELETE FROM datasets WHERE sha256 = ?", (dataset.sha256,))
            self._stored = None
            doomed = self.root / f"{_DELETING}{secrets.token_hex(6)}"
            try:
                os.rename(self.root / dataset.sha256, doomed)
            except FileNotFoundError:
                return dataset
        shutil.rmtree(doomed, ignore_errors=True)
        return dataset

    # -- adding -------------------------------------------------------------------------
    def register(self, path: str, name: str = "") -> Dataset:
        """Register a folder under the data root (relative to it); its files stay where they are.

        The dataset is the files an upload of the folder would hold, hashed and
        indexed the same way (``ingest.registered_files``: hidden names left out,
        each symlink by its own name), so registering and uploading give one
        identity. Every symlink in it must lie inside the data root. Without a
        ``name`` the dataset is named after the folder; the data root itself
        (``.``) has no name of its own to give, so it needs one. The files stay
        writable on the server: a training job checks them again when it starts
        (``check_unchanged``), not while it runs.

        Raises:
            FailedPrecondition: no data root configured. PathOutsideRoot: the
            folder, or a symlink in it, leads outside the data root.
            InvalidArgument: no such folder, a link loop, over the file limit, no name.
            DatasetInvalid: the dataset fails its check. AlreadyExists: name or content taken.
        """
        if self.config.data_root is None:
            raise FailedPrecondition("registering server folders needs a data root (start the server with "
                                     "--data-root)")
        if not isinstance(path, str) or not path.strip():
            raise InvalidArgument("name the dataset folder, relative to the data root")
        if "\x00" in path:
            raise InvalidArgument(f"folder {path!r} contains a NUL character")
        if posixpath.isabs(path) or "\\" in path:
            raise PathOutsideRoot(f"folder {path!r}: give a path relative to the data root")
        if set("*?[").intersection(path):
            raise InvalidArgument(f"folder {path!r}: name one folder, not a pattern")
        folder = posixpath.normpath(path)
        name = check_name(name) if name else _folder_name(folder)
        real, files = self._registered_walk(folder)
        work = self._new_work()
        try:
            return self._ingest(work, real, files, name=name, source="register", source_path=folder,
                                absolute_root=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _registered_walk(self, folder: str) -> tuple[Path, list[tuple[str, Path]]]:
        """The real path of a folder under the data root and its files: the walk ``register`` hashes."""
        data_root = Path(self.config.data_root)  # type: ignore[arg-type]
        real = registered_folder(data_root, folder)
        return real, registered_files(real, data_root, folder, self.config.limits)

    def check_unchanged(self, name_or_hash: str) -> Dataset:
        """The dataset, checked again before a training job reads it (``TrainingRunner`` calls this at job start).

        An uploaded dataset lives in the state folder, copied there: it only has to
        be still registered. A dataset registered in place is walked again as
        ``register`` walked it (``ingest.registered_files``: every symlink must
        still resolve inside the data root, within the same file and entry limits)
        and its files hashed again (``ingest.fingerprint``): the hash must still be
        its identity, and its spec's root must still lie in that folder. This costs
        what registering it cost (every file is read).

        The check is as of the call: the runner calls it again after the job
        trained and evaluated, before it publishes anything.

        Raises:
            NotFound: no such dataset. FailedPrecondition: a registered folder
            changed (content, or a link now leads outside the data root), or this
            server has no data root to find it in.
        """
        dataset = self.get(name_or_hash)
        if dataset.source != "register":
            return dataset
        if self.config.data_root is None:
            raise FailedPrecondition(f"dataset {dataset.name!r} was registered in place, and this server has no "
                                     "data root (start it with --data-root)")
        try:
            real, files = self._registered_walk(dataset.source_path)
            changed = fingerprint(files).sha256 != dataset.sha256
            spec_root = load_dataset_spec(dataset.spec_path).root.resolve()
            changed = changed or not (spec_root == real or spec_root.is_relative_to(real))
        except (SegsvcError, OSError) as exc:  # a link leading outside, a loop, over the limits, gone, no files
            log.warning("dataset %r (%s): %s", dataset.name, dataset.sha256[:12], exc)
            changed = True
        if changed:
            raise FailedPrecondition(f"dataset {dataset.name!r} changed since it was registered (or a link now "
                                     "leads outside the data root): register it again")
        return dataset

    def open_upload(self, name: str, fmt: str, *, dataset_yaml: str = "", class_names: Sequence[str] = (),
                    sha256: str = "") -> DatasetUpload:
        """Start receiving an upload (``fmt``: tar, zip or pairs); see ``DatasetUpload``.

        Raises:
            InvalidArgument: bad metadata (name, format, hash, too long a description, too many classes).
            Overloaded: ``max_concurrent_uploads`` uploads are in progress, or the disk quota is used up.
        """
        check_name(name)
        if fmt not in FORMATS:
            raise InvalidArgument(f"upload format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if sha256 and not _SHA256.fullmatch(sha256.lower()):
            raise InvalidArgument("the expected sha256 must be 64 hex digits")
        if len(dataset_yaml) > 1 << 20:
            raise InvalidArgument("dataset_yaml is longer than 1 MiB")
        if dataset_yaml and class_names:  # known from the metadata: refused before the files are sent
            raise InvalidArgument("give the classes either in dataset_yaml or as class_names, not both")
        if len(class_names) > MAX_CLASSES:
            raise InvalidArgument(f"the upload names {len(class_names)} class names: more than {MAX_CLASSES}, "
                                  f"the server's limit")
        check_class_names(class_names)  # and each name's length, before the files are sent
        ingest = functools.partial(self._ingest, name=name, source="upload", source_path=fmt, absolute_root=False,
                                   expected_sha256=sha256.lower())
        upload_id = self._take_slot()
        work: Path | None = None
        try:
            work = self._new_work()
            return DatasetUpload(work, name, fmt, self.config.limits, ingest, dataset_yaml=dataset_yaml,
                                 class_names=tuple(class_names), charge=functools.partial(self._charge, upload_id),
                                 release=functools.partial(self._release, upload_id))
        except BaseException:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            self._release(upload_id)
            raise

    # -- what uploads may cost ------------------------------------------------------------
    def _take_slot(self) -> int:
        """A slot among the concurrent uploads, if one is free and the disk quota has room for a byte."""
        with self._lock:
            if len(self._uploads) >= self.config.max_concurrent_uploads:
                raise Overloaded(f"{len(self._uploads)} dataset uploads are in progress, the server's limit "
                                 f"(--max-dataset-uploads); retry when one has finished")
            self._check_room(1)
            upload_id = next(self._upload_ids)
            self._uploads[upload_id] = 0
            return upload_id

    def _check_room(self, size: int) -> None:
        """``Overloaded`` unless the datasets folder has room for ``size`` more bytes (under ``_lock``)."""
        if self._stored is None:
            with self._db() as c:
                self._stored = int(c.execute("SELECT COALESCE(SUM(total_bytes), 0) FROM datasets"
                                             " WHERE source = 'upload'").fetchone()[0])
        in_flight = sum(self._uploads.values())
        if self._stored + in_flight + size > self.config.max_disk_bytes:
            raise Overloaded(
                f"the datasets folder would hold more than {self.config.max_disk_bytes} bytes, the server's limit "
                f"(--max-datasets-disk-mb): {self._stored} bytes of datasets and {in_flight} of uploads in "
                f"progress; delete datasets, or retry when other uploads have finished")

    def _charge(self, upload_id: int, size: int) -> None:
        """Count ``size`` bytes an upload is about to write (negative: bytes it removed), or refuse them."""
        with self._lock:
            if size > 0:
                self._check_room(size)
            self._uploads[upload_id] = self._uploads.get(upload_id, 0) + size

    def _release(self, upload_id: int) -> None:
        """The upload ended: its slot and bytes are free (a committed dataset's bytes are counted by its row)."""
        with self._lock:
            self._uploads.pop(upload_id, None)

    def _new_work(self) -> Path:
        work = self.root / f"{_WORK}{secrets.token_hex(8)}"
        work.mkdir()
        return work

    def _ingest(self, work: Path, root: Path, files: list[tuple[str, Path]], *, name: str, source: str,
                source_path: str, absolute_root: bool, expected_sha256: str = "") -> Dataset:
        """Validate the dataset at ``root`` and commit ``work`` as its entry (see ``ingest``)."""
        try:
            spec = load_confined(root, name, self.config.limits)
            fp = fingerprint(files)
            if expected_sha256 and fp.sha256 != expected_sha256:
                raise UploadError(f"content hash mismatch: the files hash to {fp.sha256}, the client "
                                  f"expected {expected_sha256}")
            existing = self._existing(fp.sha256, name)
            if existing is not None:
                return existing
            report = validate(spec, root, max_pixels=self.config.limits.max_pixels)
            training = write_training_spec(spec, work, self.config.val_fraction, absolute_root)
        except DatasetInvalid:
            raise
        except SegsvcError as exc:  # never show the server's folders
            raise type(exc)(scrub_paths(scrub_paths(str(exc), root), work)) from None
        dataset = Dataset(
            sha256=fp.sha256, name=name, source=source, source_path=source_path,
            spec_path=self.root / fp.sha256 / SPEC_FILE, format=spec.format, class_names=spec.class_names,
            split_sizes=training.split_sizes, class_shares=class_shares(report, spec),
            split_assigned=training.split_assigned, files=fp.files, total_bytes=fp.total_bytes,
            created_at=time.time(),
        )
        return self._commit(work, dataset)

    def _existing(self, sha256: str, name: str) -> Dataset | None:
        """The dataset to return for a repeat (same content, same name); ``AlreadyExists`` on a clash.

        Names are unique without regard to case (``Shapes`` clashes with ``shapes``), whatever the
        filesystem: a name may become a folder or a file name on a case-insensitive one (a training run's
        outputs, a client's download), and two that differ only in case are a typo waiting to happen.
        """
        with self._db() as c:
            row = c.execute("SELECT * FROM datasets WHERE sha256 = ?", (sha256,)).fetchone()
            other = c.execute("SELECT sha256, name FROM datasets WHERE lower(name) = lower(?)", (name,)).fetchone()
        if row is not None:
            if row["name"] == name:
                return self._dataset(row)
            raise AlreadyExists(f"the same content is registered as {row['name']!r} ({sha256[:12]}); "
                                f"use that name, or delete it first")
        if other is not None and other[1] != name:
            raise AlreadyExists(f"name {name!r} differs only in case from dataset {other[1]!r} ({other[0][:12]}): "
                                f"dataset names are compared without case; choose another name")
        if other is not None:
            raise AlreadyExists(f"name {name!r} belongs to dataset {other[0][:12]} with other content; "
                                f"choose another name, or delete that dataset first")
        return None

    def _commit(self, work: Path, dataset: Dataset) -> Dataset:
        """Rename ``work`` to the hash folder, then write the row; a concurrent twin wins or is returned.

        The folder is on disk before its rename (every file and folder synced), and the rename before the
        row: after a power cut, a row never names a folder that is missing or torn.
        """
        fsync_tree(work)
        with self._lock:
            existing = self._existing(dataset.sha256, dataset.name)
            if existing is not None:
                return existing
            final = self.root / dataset.sha256
            if final.exists():  # left by a crash before its row was written
                shutil.rmtree(final)
            os.rename(work, final)
            self._stored = None
            try:
                fsync_folder(self.root)
                with self._db() as c:
                    c.execute(
                        "INSERT INTO datasets (sha256, name, source, source_path, format, class_names, split_sizes,"
                        " class_shares, split_assigned, files, total_bytes, created_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (dataset.sha256, dataset.name, dataset.source, dataset.source_path, dataset.format,
                         json.dumps(list(dataset.class_names)), json.dumps(dataset.split_sizes),
                         json.dumps(dataset.class_shares), int(dataset.split_assigned), dataset.files,
                         dataset.total_bytes, dataset.created_at),
                    )
            except sqlite3.IntegrityError:  # another process wrote the same row since ``_existing`` looked
                shutil.rmtree(final, ignore_errors=True)
                raise AlreadyExists(f"dataset {dataset.name!r} ({dataset.sha256[:12]}) was added by another "
                                    f"process at the same time; get it, or choose another name") from None
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
        return dataset
