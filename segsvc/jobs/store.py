"""Durable store of long-running jobs: batch segmentation now, training later.

A job is one SQLite row plus one row per input item; a runner resumes from
``unfinished()`` and ``pending_items()`` after a restart, reading the items a
page at a time (``iter_items``, ``ITEM_PAGE``) so a job of millions of items is
never held whole. Every method is one
transaction in WAL mode, so a ``kill -9`` at any moment loses nothing committed
and leaves nothing half-written: a job never exists without all its items (but
see ``submit``'s ``chunk_size``), an item never becomes DONE without its job's
counter moving. ``synchronous=NORMAL`` may lose the last transactions on a
*power* loss only, and saves a sync per item.
One connection, guarded by a lock, serves ``asyncio.to_thread`` callers and
worker threads (SQLite serialises writers anyway); another process opening the
file waits for the write lock (``busy_timeout``) instead of failing.

Example:
    >>> import os, tempfile
    >>> store = JobStore(os.path.join(tempfile.mkdtemp(), "jobs.db"))
    >>> job, created = store.submit("segmentation", {"model": "unet"}, ["a.png", "b.png"])
    >>> store.start(job.id).state, created
    ('RUNNING', True)
    >>> store.finish_item(job.id, 0, "DONE", result={"mask": "a.mask.png"})
    True
    >>> store.get(job.id).done, [item.input for item in store.pending_items(job.id)]
    (1, ['b.png'])
    >>> store.close()
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from segsvc.errors import AlreadyExists, InvalidArgument, JobNotFound, NotFound, Unavailable

JOB_STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
FINISHED_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
ITEM_STATES = ("PENDING", "DONE", "FAILED", "SKIPPED")

SCHEMA_VERSION = 1
# Items read per query by ``iter_items`` (and by runners paging ``pending_items``): a job of millions of items
# is held a page at a time, never whole.
ITEM_PAGE = 1_000
BUSY_TIMEOUT_S = 5.0
# An item's failure reason is an exception's message (a decoder's, the OS's): stored on one line, cut to this
# many characters, since it goes on to failures.jsonl, summary.json and GetOperation.
MAX_REASON_CHARS = 500
# A job's error may list several problems (a dataset check's report), one per line: its lines are kept, and the
# whole is cut to this many characters, since GetOperation and every listing of the job carry it.
MAX_ERROR_CHARS = 4_000
# A finished item's state -> the job counter it feeds.
_COUNTERS = {"DONE": "done", "FAILED": "failed", "SKIPPED": "skipped"}

# Executed one by one inside a transaction (executescript would commit first).
_SCHEMA = (
    # AUTOINCREMENT: a deleted job's seq is never reused, so paging by seq stays monotonic.
    f"""CREATE TABLE IF NOT EXISTS jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL CHECK (kind <> ''),
        state TEXT NOT NULL CHECK (state IN {JOB_STATES!r}),
        request_id TEXT, spec TEXT NOT NULL, inputs_sha256 TEXT NOT NULL, total INTEGER NOT NULL,
        done INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0, skipped INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at REAL,
        cancel_requested INTEGER NOT NULL DEFAULT 0, error TEXT, result TEXT, progress TEXT NOT NULL DEFAULT '{{}}'
    )""",
    # NULL request_ids are distinct in SQLite, so jobs without a key never collide.
    "CREATE UNIQUE INDEX IF NOT EXISTS jobs_kind_request_id ON jobs (kind, request_id)",
    "CREATE INDEX IF NOT EXISTS jobs_state_seq ON jobs (state, seq)",
    f"""CREATE TABLE IF NOT EXISTS items (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE, idx INTEGER NOT NULL, input TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN {ITEM_STATES!r}),
        result TEXT, reason TEXT, PRIMARY KEY (job_id, idx)
    ) WITHOUT ROWID""",
    # The primary key rides along in a WITHOUT ROWID index, so this also orders by idx.
    "CREATE INDEX IF NOT EXISTS items_job_id_state ON items (job_id, state)",
)


@dataclass(frozen=True)
class Job:
    """A snapshot of one job row; call ``JobStore.get`` again for fresh values.

    ``spec``, ``result`` and ``progress`` are what was stored, read back from JSON
    (tuples come back as lists). ``seq`` orders jobs by submission and is the
    paging cursor of ``JobStore.list``.
    """

    id: str
    kind: str
    state: str
    request_id: str | None
    spec: dict[str, Any]
    total: int
    done: int
    failed: int
    skipped: int
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    cancel_requested: bool
    error: str | None
    result: dict[str, Any] | None
    progress: dict[str, Any]
    seq: int

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


@dataclass(frozen=True)
class Item:
    """One input of a job, its outcome (``result``) or why it did not produce one (``reason``)."""

    job_id: str
    index: int
    input: str
    state: str
    result: dict[str, Any] | None
    reason: str | None


class JobStore:
    """Jobs and their items in one SQLite file (WAL), safe to share between threads.

    Args:
        path: the database file; missing parent directories are created. The
            file is created with the current schema or must already carry it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        in_memory = self.path == ":memory:"
        if not in_memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal" and not in_memory:
                raise InvalidArgument(f"{self.path}: SQLite refused WAL mode (got {mode!r}); use a local filesystem")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._conn: sqlite3.Connection | None = conn
            self._lock = threading.Lock()
            self._create_schema()
        except BaseException:
            conn.close()
            raise

    def _create_schema(self) -> None:
        with self._tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = c.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                c.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise InvalidArgument(f"{self.path} holds job-store schema version {row[0]} but this segsvc reads "
                                      f"version {SCHEMA_VERSION}; use a new file or the matching segsvc release")
            for statement in _SCHEMA:
                c.execute(statement)

    def close(self) -> None:
        """Close the connection; later calls raise ``Unavailable``. Closing twice is fine."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- plumbing ---------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise Unavailable(f"job store {self.path} is closed")
        return self._conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._connection()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. BEGIN IMMEDIATE takes the write lock up front, so a
        check-then-write (idempotency, state transitions) cannot race another process."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @staticmethod
    def _job_row(c: sqlite3.Connection, job_id: str) -> sqlite3.Row:
        row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job with id {job_id!r}")
        return row

    @staticmethod
    def _item_row(c: sqlite3.Connection, job_id: str, index: int) -> sqlite3.Row:
        row = c.execute("SELECT * FROM items WHERE job_id = ? AND idx = ?", (job_id, index)).fetchone()
        if row is None:
            job = JobStore._job_row(c, job_id)
            raise NotFound(f"job {job_id} has no item {index!r} (its items are 0..{job['total'] - 1})")
        return row

    def _select(self, where: builtins.list[str], params: builtins.list[Any], kind: str | None, limit: int | None
                ) -> builtins.list[Job]:
        if kind is not None:
            where, params = [*where, "kind = ?"], [*params, kind]
        sql = f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._read() as c:
            return [_to_job(row) for row in c.execute(sql, params)]

    # -- jobs -------------------------------------------------------------------
    def submit(self, kind: str, spec: dict[str, Any], inputs: Sequence[str], *,
               request_id: str | None = None, job_id: str | None = None,
               failed: Mapping[int, str] | None = None,
               precondition: Callable[[], object] | None = None,
               chunk_size: int | None = None) -> tuple[Job, bool]:
        """Create a QUEUED job with one PENDING item per input, or find the one already made.

        ``request_id`` makes a retried submission safe: the same (kind, request_id)
        with the same spec and inputs returns the existing job and ``False``; with a
        different spec or inputs it raises ``AlreadyExists``, because silently
        returning a different job than the caller described would lose work.
        ``failed`` maps the index of an input known to be unusable to its reason:
        that item is created FAILED (and counted), in the same transaction.
        ``precondition`` runs inside that transaction just before a new job is
        inserted; whatever it raises cancels the submission. It holds the write
        lock, so it cannot interleave with ``release_unreferenced``: a resource
        it checks is either still there with the job inserted, or already gone.

        ``chunk_size`` bounds the items inserted per transaction (millions of inputs
        would otherwise grow the WAL and the page cache with the input count, and a
        crash would lose them all). The job then exists, QUEUED, before all its items
        do: items are inserted in index order, so after a crash it holds a prefix of
        them, ``missing_items`` says how many are not there yet, and the same call
        again (same ``request_id``, spec and inputs) finds the job and inserts the
        rest, neither twice nor skipping one. Only a caller that starts the job after
        this returns (``segsvc batch``) should use it: a scheduler polling
        ``unfinished`` could start it half-inserted.
        """
        if not isinstance(kind, str) or not kind:
            raise InvalidArgument(f"job kind must be a non-empty string, got {kind!r}")
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
            raise InvalidArgument(f"inputs must be a sequence of strings, got {type(inputs).__name__}")
        for i, value in enumerate(inputs):
            if not isinstance(value, str):
                raise InvalidArgument(f"inputs[{i}] must be a string, got {type(value).__name__}")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a file name's undecodable bytes (os.fsdecode): SQLite cannot store it
                raise InvalidArgument(f"inputs[{i}] {value!r} is not valid UTF-8 text (a file name with bytes "
                                      "that are not UTF-8?): store a printable form of it") from None
        failed = dict(failed or {})
        for i, reason in failed.items():
            if not isinstance(i, int) or not 0 <= i < len(inputs):
                raise InvalidArgument(f"failed input index {i!r} is not one of 0..{len(inputs) - 1}")
            _check_str(reason, f"the reason input {i} failed")
        failed = {i: _bounded_reason(reason) for i, reason in failed.items()}
        _check_str(request_id, "request_id")
        _check_str(job_id, "job_id")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise InvalidArgument(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        chunk = max(len(inputs), 1) if chunk_size is None else chunk_size
        spec_json = _dumps(spec, "job spec")
        inputs_sha256 = _inputs_sha256(inputs)
        new_id = job_id or uuid.uuid4().hex
        now = time.time()
        with self._tx() as c:
            row = None
            if request_id is not None:
                row = c.execute("SELECT * FROM jobs WHERE kind = ? AND request_id = ?", (kind, request_id)).fetchone()
            if row is not None:
                same = row["spec"] == spec_json and row["inputs_sha256"] == inputs_sha256
                if not same or job_id not in (None, row["id"]):
                    raise AlreadyExists(
                        f"request_id {request_id!r} was already used for {kind} job {row['id']} with a "
                        "different spec or inputs; use a new request_id to submit a different job"
                    )
                new_id, created = row["id"], False
            else:
                if c.execute("SELECT 1 FROM jobs WHERE id = ?", (new_id,)).fetchone() is not None:
                    raise AlreadyExists(f"a job with id {new_id!r} already exists")
                if precondition is not None:
                    precondition()
                c.execute(
                    "INSERT INTO jobs (id, kind, state, request_id, spec, inputs_sha256, total, created_at,"
                    " updated_at) VALUES (?, ?, 'QUEUED', ?, ?, ?, ?, ?, ?)",
                    (new_id, kind, request_id, spec_json, inputs_sha256, len(inputs), now, now),
                )
                created = True
            held = self._insert_items(c, new_id, inputs, failed, 0 if created else _held(c, new_id), chunk)
            job = _to_job(self._job_row(c, new_id))
        while held < len(inputs):  # chunked: one transaction per chunk
            with self._tx() as c:
                held = self._insert_items(c, new_id, inputs, failed, _held(c, new_id), chunk)
                job = _to_job(self._job_row(c, new_id))
        return job, created

    @staticmethod
    def _insert_items(c: sqlite3.Connection, job_id: str, inputs: Sequence[str], failed: Mapping[int, str],
                      start: int, chunk: int) -> int:
        """Insert the job's items from index ``start`` (how many it holds: a prefix, as chunks go in index
        order), ``chunk`` at most, counting the FAILED ones; returns how many items the job now holds."""
        stop = min(len(inputs), start + chunk)
        if start >= stop:
            return start
        c.executemany(
            "INSERT INTO items (job_id, idx, input, state, reason) VALUES (?, ?, ?, ?, ?)",
            ((job_id, i, inputs[i], "FAILED" if i in failed else "PENDING", failed.get(i))
             for i in range(start, stop)),
        )
        n_failed = sum(1 for i in range(start, stop) if i in failed)
        if n_failed:
            c.execute("UPDATE jobs SET failed = failed + ? WHERE id = ?", (n_failed, job_id))
        return stop

    def missing_items(self, job_id: str) -> int:
        """How many of the job's items a chunked ``submit`` cut short by a crash has not inserted yet (0: none)."""
        with self._read() as c:
            return self._job_row(c, job_id)["total"] - _held(c, job_id)

    def get(self, job_id: str) -> Job:
        with self._read() as c:
            return _to_job(self._job_row(c, job_id))

    def list(self, *, kind: str | None = None, states: Iterable[str] | None = None, after_seq: int = 0,
             limit: int = 100) -> builtins.list[Job]:
        """Jobs with ``seq > after_seq`` in submission order; pass the last ``seq`` seen to page on."""
        if not isinstance(after_seq, int) or after_seq < 0:
            raise InvalidArgument(f"after_seq must be an integer >= 0, got {after_seq!r}")
        if not isinstance(limit, int) or limit < 1:
            raise InvalidArgument(f"limit must be a positive integer, got {limit!r}")
        where, params = ["seq > ?"], [after_seq]
        if states is not None:
            if isinstance(states, str):
                raise InvalidArgument(f"states must be a collection of state names, not the string {states!r}")
            wanted = sorted(set(states))
            for state in wanted:
                _check_state(state, JOB_STATES, "job state")
            if not wanted:
                return []
            where.append(f"state IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
        return self._select(where, params, kind, limit)

    def find(self, kind: str, request_id: str) -> Job | None:
        """The job submitted with this idempotency key, if any."""
        jobs = self._select(["request_id = ?"], [request_id], kind, 1)
        return jobs[0] if jobs else None

    def unfinished(self, kind: str | None = None) -> builtins.list[Job]:
        """Every QUEUED or RUNNING job, oldest first: what a runner resumes after a restart."""
        return self._select(["state IN ('QUEUED', 'RUNNING')"], [], kind, None)

    def next_queued(self, kind: str | None = None) -> Job | None:
        jobs = self._select(["state = 'QUEUED'"], [], kind, 1)
        return jobs[0] if jobs else None

    def start(self, job_id: str) -> Job:
        """QUEUED -> RUNNING. A RUNNING job stays as it is, so a resumed runner can call this
        again; a finished one raises, so a job cancelled while queued is never run."""
        with self._tx() as c:
            row = self._job_row(c, job_id)
            if row["state"] in FINISHED_STATES:
                raise InvalidArgument(f"job {job_id} is {row['state']} and cannot start again; submit a new job")
            if row["state"] == "QUEUED":
                now = time.time()
                c.execute("UPDATE jobs SET state = 'RUNNING', started_at = ?, updated_at = ? WHERE id = ?",
                          (now, now, job_id))
                row = self._job_row(c, job_id)
            return _to_job(row)

    def finish(self, job_id: str, state: str, *, error: str | None = None, result: dict[str, Any] | None = None) -> Job:
        """Record a job's outcome once. Finishing a finished job raises: the first outcome stands."""
        _check_state(state, sorted(FINISHED_STATES), "finished job state")
        _check_str(error, "error", empty_ok=True)
        result_json = None if result is None else _dumps(result, "job result")
        with self._tx() as c:
            row = self._job_row(c, job_id)
            if row["state"] in FINISHED_STATES:
                raise InvalidArgument(f"job {job_id} already finished as {row['state']}; cannot finish it as {state}")
            now = time.time()
            c.execute(
                "UPDATE jobs SET state = ?, error = ?, result = ?, finished_at = ?, updated_at = ? WHERE id = ?",
                (state, _bounded_error(error), result_json, now, now, job_id),
            )
            return _to_job(self._job_row(c, job_id))

    def request_cancel(self, job_id: str) -> Job:
        """Ask a job to stop. A QUEUED job is CANCELLED at once (nothing runs it yet), its PENDING
        items SKIPPED as a runner would skip them, so its counters add up to its total; a RUNNING
        one only gets the flag, which its runner polls between items; a finished one is unchanged."""
        with self._tx() as c:
            row = self._job_row(c, job_id)
            if row["state"] in FINISHED_STATES:
                return _to_job(row)
            now = time.time()
            if row["state"] == "QUEUED":  # never started, so none of its items has files to delete
                skipped = c.execute("UPDATE items SET state = 'SKIPPED', reason = 'cancelled' WHERE job_id = ?"
                                    " AND state = 'PENDING'", (job_id,)).rowcount
                c.execute("UPDATE jobs SET state = 'CANCELLED', cancel_requested = 1, skipped = skipped + ?,"
                          " finished_at = ?, updated_at = ? WHERE id = ?", (skipped, now, now, job_id))
            else:
                c.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?", (now, job_id))
            return _to_job(self._job_row(c, job_id))

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        """Replace the job's live metadata (images_per_s, eta_s, epoch, ...)."""
        progress_json = _dumps(progress, "progress")
        with self._tx() as c:
            sql = "UPDATE jobs SET progress = ?, updated_at = ? WHERE id = ?"
            if c.execute(sql, (progress_json, time.time(), job_id)).rowcount == 0:
                raise JobNotFound(f"no job with id {job_id!r}")

    def delete(self, job_id: str) -> None:
        """Forget a job and its items, whatever its state (like longrunning's DeleteOperation,
        this does not cancel work; a runner still holding the id gets ``JobNotFound``)."""
        with self._tx() as c:
            if c.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount == 0:
                raise JobNotFound(f"no job with id {job_id!r}")

    def release_unreferenced(self, spec_path: str, value: str, release: Callable[[], object]) -> bool:
        """Call ``release`` unless a job (any kind, any state) has ``value`` at ``spec_path`` in its spec.

        ``spec_path`` is an SQLite JSON path such as ``'$.request.upload_id'``. The
        check and ``release`` run in one write transaction, so a ``submit`` whose
        ``precondition`` checks the same resource either committed first (and
        ``release`` is not called) or runs after ``release`` (and is refused).
        ``release`` should be quick (a rename): it holds every writer up.
        Returns whether it was called.
        """
        if not isinstance(spec_path, str) or not spec_path.startswith("$"):
            raise InvalidArgument(f"spec_path must be a JSON path starting with '$', got {spec_path!r}")
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f"value must be a non-empty string, got {value!r}")
        with self._tx() as c:
            if c.execute("SELECT 1 FROM jobs WHERE json_extract(spec, ?) = ? LIMIT 1",
                         (spec_path, value)).fetchone() is not None:
                return False
            release()
            return True

    # -- items ------------------------------------------------------------------
    def pending_items(self, job_id: str, limit: int | None = None, *, after: int = -1) -> builtins.list[Item]:
        """The job's PENDING items with an index above ``after``, in index order, ``limit`` at most (None: all).

        A runner pages with ``limit`` and the last index it got as ``after``: an item it
        finished meanwhile is not read again, and one still PENDING is never skipped.
        """
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise InvalidArgument(f"limit must be a positive integer or None, got {limit!r}")
        return self._items(job_id, "PENDING", limit, after)

    def iter_items(self, job_id: str, state: str | None = None) -> Iterator[Item]:
        """The job's items (in ``state``, when given) in index order, read ``ITEM_PAGE`` per query.

        Memory holds one page however many items the job has (``items`` holds them all). Each
        page is its own read, after the last index of the one before, so no item comes twice.
        """
        if state is not None:
            _check_state(state, ITEM_STATES, "item state")
        after = -1
        while page := self._items(job_id, state, ITEM_PAGE, after):
            yield from page
            after = page[-1].index

    def item(self, job_id: str, index: int) -> Item:
        """One item of a job (``NotFound`` when the job has no such item)."""
        with self._read() as c:
            return _to_item(self._item_row(c, job_id, index))

    def items(self, job_id: str, state: str | None = None) -> builtins.list[Item]:
        if state is not None:
            _check_state(state, ITEM_STATES, "item state")
        return self._items(job_id, state, None)

    def _items(self, job_id: str, state: str | None, limit: int | None, after: int = -1) -> builtins.list[Item]:
        if not isinstance(after, int):
            raise InvalidArgument(f"after must be an item index, got {after!r}")
        sql, params = "SELECT * FROM items WHERE job_id = ? AND idx > ?", [job_id, after]
        if state is not None:
            sql += " AND state = ?"
            params.append(state)
        sql += " ORDER BY idx" + ("" if limit is None else f" LIMIT {int(limit)}")
        with self._read() as c:
            self._job_row(c, job_id)
            return [_to_item(row) for row in c.execute(sql, params)]

    def finish_item(self, job_id: str, index: int, state: str, *, result: dict[str, Any] | None = None,
                    reason: str | None = None) -> bool:
        """Record one item's outcome and move the job's counter in the same transaction.

        Only a PENDING item changes, so a runner that redoes an item after a crash
        (or two workers racing on one) cannot count it twice: the loser gets ``False``.
        """
        _check_state(state, tuple(_COUNTERS), "finished item state")
        if not isinstance(index, int):
            raise InvalidArgument(f"item index must be an integer, got {type(index).__name__}")
        _check_str(reason, "reason", empty_ok=True)
        reason = _bounded_reason(reason)
        result_json = None if result is None else _dumps(result, "item result")
        with self._tx() as c:
            cur = c.execute(
                "UPDATE items SET state = ?, result = ?, reason = ? WHERE job_id = ? AND idx = ? AND state = 'PENDING'",
                (state, result_json, reason, job_id, index),
            )
            if cur.rowcount == 0:
                self._item_row(c, job_id, index)  # raises when the job or item does not exist
                return False
            column = _COUNTERS[state]
            c.execute(f"UPDATE jobs SET {column} = {column} + 1, updated_at = ? WHERE id = ?", (time.time(), job_id))
            return True

    def skip_pending(self, job_id: str, reason: str, *, through: int | None = None) -> int:
        """Record every PENDING item (with an index up to ``through``, when given) SKIPPED with ``reason``
        and move the job's counter by as many: one statement, one transaction, however many items
        (a transaction per item, as ``finish_item`` takes, would hold the writer for minutes on a
        large job). Returns how many items were skipped."""
        _check_str(reason, "reason", empty_ok=True)
        reason = _bounded_reason(reason)
        if through is not None and not isinstance(through, int):
            raise InvalidArgument(f"through must be an item index or None, got {through!r}")
        sql = "UPDATE items SET state = 'SKIPPED', result = NULL, reason = ? WHERE job_id = ? AND state = 'PENDING'"
        params: builtins.list[Any] = [reason, job_id]
        if through is not None:
            sql += " AND idx <= ?"
            params.append(through)
        with self._tx() as c:
            self._job_row(c, job_id)  # raises when the job does not exist
            skipped = c.execute(sql, params).rowcount
            if skipped:
                c.execute("UPDATE jobs SET skipped = skipped + ?, updated_at = ? WHERE id = ?",
                          (skipped, time.time(), job_id))
            return skipped

    def reset_item(self, job_id: str, index: int) -> None:
        """Put a finished item back to PENDING (taking it off its counter) so it runs again."""
        with self._tx() as c:
            row = self._item_row(c, job_id, index)
            if row["state"] == "PENDING":
                return
            column = _COUNTERS[row["state"]]
            c.execute("UPDATE items SET state = 'PENDING', result = NULL, reason = NULL WHERE job_id = ? AND idx = ?",
                      (job_id, index))
            c.execute(f"UPDATE jobs SET {column} = {column} - 1, updated_at = ? WHERE id = ?", (time.time(), job_id))


def _held(c: sqlite3.Connection, job_id: str) -> int:
    """How many items the job holds, read off the primary key: a chunked ``submit`` inserts them in index order,
    so they are items 0..n-1."""
    last = c.execute("SELECT MAX(idx) FROM items WHERE job_id = ?", (job_id,)).fetchone()[0]
    return 0 if last is None else last + 1


def _inputs_sha256(inputs: Sequence[str]) -> str:
    """SHA-256 of ``json.dumps(list(inputs))``, hashed piece by piece: the same digest as before, without
    building one string as large as every input together."""
    digest = hashlib.sha256(b"[")
    for i, value in enumerate(inputs):
        digest.update(((", " if i else "") + json.dumps(value)).encode())
    digest.update(b"]")
    return digest.hexdigest()


def _check_state(state: object, allowed: Sequence[str], what: str) -> None:
    if state not in allowed:
        raise InvalidArgument(f"unknown {what} {state!r}; expected one of {', '.join(allowed)}")


def _check_str(value: object, what: str, empty_ok: bool = False) -> None:
    """Optional string arguments. Ids must not be empty; messages may be (``str(KeyError())`` is '')."""
    if value is not None and (not isinstance(value, str) or not (value or empty_ok)):
        raise InvalidArgument(f"{what} must be a {'' if empty_ok else 'non-empty '}string or None, got {value!r}")


def _bounded_reason(reason: str | None) -> str | None:
    """A failure reason as stored: its lines joined by one space, cut to ``MAX_REASON_CHARS`` (ending "...");
    None (no reason given) stays None."""
    if reason is None:
        return None
    line = " ".join(part.strip() for part in reason.splitlines() if part.strip())
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 3].rstrip() + "..."


def _bounded_error(error: str | None) -> str | None:
    """A job's error as stored: its lines kept, the whole cut to ``MAX_ERROR_CHARS`` (ending "...")."""
    if error is None or len(error) <= MAX_ERROR_CHARS:
        return error
    return error[: MAX_ERROR_CHARS - 3].rstrip() + "..."


def _dumps(value: object, what: str) -> str:
    """A dict as canonical JSON (sorted keys), so equal specs compare equal as stored text.
    NaN and infinity are refused: they are not JSON and clients could not parse them."""
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a dict, got {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{what} must be JSON-serialisable (no NaN or infinity): {e}") from e


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


_JOB_COLUMNS = ("id", "kind", "state", "request_id", "total", "done", "failed", "skipped", "created_at",
                "updated_at", "started_at", "finished_at", "error", "seq")


def _to_job(row: sqlite3.Row) -> Job:
    return Job(**{name: row[name] for name in _JOB_COLUMNS}, spec=json.loads(row["spec"]),
               cancel_requested=bool(row["cancel_requested"]), result=_loads(row["result"]),
               progress=json.loads(row["progress"]))


def _to_item(row: sqlite3.Row) -> Item:
    return Item(job_id=row["job_id"], index=row["idx"], input=row["input"], state=row["state"],
                result=_loads(row["result"]), reason=row["reason"])
