"""One dataset upload being received: chunks in, then extract, describe and hand over for validation.

``DatasetRegistry.open_upload`` makes one; the server's ``UploadDataset``
feeds it. Every byte goes to a ``.work-`` folder of the registry (the archive
spooled to ``archive``, the files to ``data/``) within the upload limits, and
``commit`` gives the dataset folder to the registry's ``ingest`` step, which
validates it and renames the work folder into place. Any failure, and
``abort``, remove the work folder: a failed upload leaves nothing behind.
Every byte is charged to the registry's disk quota before it is written, and
the end of the upload, whichever way it ends, gives its slot back (``release``).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from segsvc.datasets.archive import Charge, ExtractLimits, PairsWriter, Spool, extract_archive, no_charge
from segsvc.datasets.content import local_files
from segsvc.datasets.ingest import add_metadata_yaml, dataset_root
from segsvc.errors import UploadError

if TYPE_CHECKING:
    from segsvc.datasets.registry import Dataset

# (work folder, dataset root, its files as (relative name, path)) -> the registered dataset
Ingest = Callable[[Path, Path, list[tuple[str, Path]]], "Dataset"]


class DatasetUpload:
    """One upload being received; made by ``DatasetRegistry.open_upload``, used by one caller.

    ``write`` each chunk (tar/zip: the archive's bytes in order, ``name``
    ignored; pairs: chunks of the named file, ``last`` on its final chunk),
    then ``commit`` (extract, validate, register) or ``abort``. Limits are
    checked before each write; ``commit`` and every error remove the work
    folder, so a failed upload leaves nothing behind. ``charge`` is told of every byte before it is
    written (the registry's disk quota); ``release`` is called once when the upload ends, however it
    ends (its slot among the concurrent uploads). If this constructor raises, the caller cleans up.
    """

    def __init__(self, work: Path, name: str, fmt: str, limits: ExtractLimits, ingest: Ingest, *,
                 dataset_yaml: str = "", class_names: tuple[str, ...] = (), charge: Charge = no_charge,
                 release: Callable[[], None] = lambda: None) -> None:
        self.name, self.format = name, fmt
        self._work, self._limits, self._ingest = work, limits, ingest
        self._yaml, self._classes = dataset_yaml, class_names
        self._charge, self._release = charge, release
        self._closed = False
        self._lock = threading.Lock()  # abort (e.g. the caller went away) waits for a write or commit in progress
        self._pairs: PairsWriter | None = None
        self._spool: Spool | None = None
        self._data = work / "data"
        self._data.mkdir()
        self._pairs = PairsWriter(self._data, limits, charge) if fmt == "pairs" else None
        self._spool = Spool(work / "archive", limits, charge) if fmt != "pairs" else None

    def write(self, data: bytes, name: str = "", last: bool = False) -> None:
        with self._lock:
            if self._closed:
                raise UploadError("the upload is already finished")
            self._write(data, name, last)

    def _write(self, data: bytes, name: str, last: bool) -> None:
        try:
            if self._pairs is not None:
                self._pairs.write(name, data, last)
            else:
                assert self._spool is not None
                self._spool.write(data)
        except BaseException:
            self._abort()
            raise

    def commit(self) -> Dataset:
        with self._lock:
            if self._closed:
                raise UploadError("the upload is already finished")
            return self._commit()

    def _commit(self) -> Dataset:
        try:
            if self._pairs is not None:
                self._pairs.finish()
            else:
                assert self._spool is not None
                self._spool.close()
                extract_archive(self._spool.path, self.format, self._data, self._limits, self._charge)
                self._spool.path.unlink()
                self._charge(-self._spool.size)
            # An archive of one folder holds the dataset in it; files sent one by one name their paths
            # relative to the dataset's root (a folder whose only entry is a folder included).
            root = self._data if self._pairs is not None else dataset_root(self._data)
            add_metadata_yaml(root, self._yaml, self._classes)
            return self._ingest(self._work, root, local_files(root))
        finally:
            self._abort()

    def abort(self) -> None:
        """Drop everything received (safe to call twice; after a commit the work folder is already renamed)."""
        with self._lock:
            self._abort()

    def _abort(self) -> None:
        was_closed, self._closed = self._closed, True
        try:
            if self._pairs is not None:
                self._pairs.close()
            if self._spool is not None:
                self._spool.close()
            shutil.rmtree(self._work, ignore_errors=True)
        finally:
            if not was_closed:
                self._release()
