"""A model repository on disk, in Triton's layout: ``<root>/<model>/<version>/``.

Every name a request gives is checked and resolved inside the root, so no
request can read outside it. The root is often a volume the server does not
own (a Kubernetes PV with its ``lost+found``, a share others copy into), so a
scan never fails because of one odd entry:

- root entries that are not valid model names (``lost+found``), plain files
  and broken symlinks are *skipped*; so are version entries whose name is not a
  version number (``1``, ``2``, ... without leading zeros). Each is logged once
  and listed in ``ModelRepository.skipped``. Hidden entries (``.tmp-*`` being
  written by ``save_artifact``) and version directories without a
  ``manifest.json`` yet are ignored silently: they are not versions yet.
- a symlink (model directory, version directory, or a file inside a version)
  is followed only when it stays inside the root. A version that leads
  outside is *refused*: it is listed by ``scan`` with its ``problem`` and
  never read. Its files are then opened beneath the root without following a
  symlink that appeared since that check (``artifact.open_version_file``).

A model may name its default version in ``<root>/<model>/DEFAULT`` (the
version number and a newline, written by ``set_default`` through a temporary
file and a rename, so readers never see half a pointer). ``resolve_version``
without a version, and the server, honour it; without the file the default is
the newest complete version, as before. A file there that names no version
(empty, truncated, garbled) is not "no pointer" to the server (``read_default``
raises; it keeps its current default); one-off readers ignore it, logged
(``default_version``). The pointer is read like a version's files: a symlink
out of the root is refused (``PathOutsideRoot``), and at most
``DEFAULT_MAX_BYTES`` are read (a bigger file is an ``ArtifactError``).

Messages name paths relative to the root (``m/3/weights.safetensors``), never
the server's absolute paths, because they reach clients.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from segsvc.errors import (
    ArtifactError, InvalidArgument, NotFound, PathOutsideRoot, SegsvcError, UnknownModel, UnknownVersion,
)
from segsvc.files import fsync_folder, write_atomic
from segsvc.model_names import VERSION_NAME, check_name, parse_model_ref  # noqa: F401  (parse_model_ref: its old name)
from segsvc.models.artifact import MANIFEST_FILE, Manifest, load_artifact, read_manifest

log = logging.getLogger(__name__)

_VERSION_NAME = VERSION_NAME  # the canonical spelling: "7", never "007" or "+7"
DEFAULT_FILE = "DEFAULT"  # <model>/DEFAULT: the persistent default version
DEFAULT_MAX_BYTES = 64  # a version number (at most 18 digits) and whitespace; a bigger DEFAULT is refused

# (entry name, size in bytes, mtime in ns) of every entry of a version directory.
Fingerprint = tuple[tuple[str, int, int], ...]


def _odd_entry(name: str, mode: int) -> str:
    """Why a version whose entry ``name`` (of ``st_mode`` ``mode``) is no version, or "" when the entry is fine.

    The manifest must be a regular file; no entry may be a FIFO, socket or device, whose reading blocks or
    never ends (``stat`` of a FIFO says 0 bytes, so a size check does not catch it).
    """
    if stat.S_ISREG(mode) or (stat.S_ISDIR(mode) and name != MANIFEST_FILE):
        return ""
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "not a regular file")
    return f"{name} is {kind}, not a regular file"


@dataclass(frozen=True)
class Skipped:
    """A repository entry that is not a model or a version, and why it was left out.

    Args:
        path: relative to the repository root (``lost+found``, ``m/v2``).
        reason: why it is not used.
    """

    path: str
    reason: str


@dataclass(frozen=True)
class VersionEntry:
    """One ``<model>/<version>`` found on disk, before anything is loaded from it.

    Args:
        version: the directory's number; this, not the manifest's, is the version served.
        problem: why the version is refused without reading it (a symlink out of
            the root); empty when it looks complete.
        fingerprint: size and mtime of each of its entries: a failed version is
            worth retrying only once this changes (a copy that was not atomic).
    """

    version: int
    problem: str = ""
    fingerprint: Fingerprint = ()


class ModelRepository:
    """Read access to the versions stored under one root directory.

    Args:
        root: the repository root; it need not exist yet (it is then empty).

    Example:
        >>> repo = ModelRepository("runs/model_repository")  # doctest: +SKIP
        >>> model, manifest = repo.load("camvid-unet")  # latest version  # doctest: +SKIP
        >>> repo.skipped  # e.g. (Skipped(path='lost+found', reason='not a valid model name ...'),)  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self._skipped: dict[str, str] = {}
        self._skipped_lock = threading.Lock()

    @classmethod
    def existing(cls, root: str | os.PathLike[str]) -> "ModelRepository":
        """The repository at ``root``, which must be a folder (the command line's ``--repo``).

        Raises:
            NotFound: ``root`` does not exist or is not a directory ("no model named ..." would mislead).
        """
        if not Path(root).is_dir():
            raise NotFound(f"model repository {root} " + ("is not a directory" if Path(root).exists()
                                                          else "does not exist"))
        return cls(root)

    # -- paths ------------------------------------------------------------------------
    def relative(self, path: Path) -> str:
        """``path`` (built under the root) as the root-relative text that messages show."""
        try:
            return path.relative_to(self.root).as_posix() or "."
        except ValueError:
            return path.name

    def redact(self, message: str) -> str:
        """``message`` with the root's absolute path removed (artifact errors name full paths)."""
        root = re.escape(str(self.root))
        message = re.sub(root + re.escape(os.sep), "", message)
        return re.sub(root + r"(?=$|[\s'\":;,)])", "<repository root>", message)

    def _inside(self, path: Path) -> bool:
        """True when ``path``, with every symlink resolved, stays inside the root (without reading it)."""
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError):  # a symlink loop: it leads nowhere usable
            return False
        return resolved != self.root and resolved.is_relative_to(self.root)

    def _model_dir(self, name: str) -> Path:
        path = self.root / check_name(name)
        if path.is_symlink() and not self._inside(path):
            raise PathOutsideRoot(f"model {name!r} is a symlink that leads outside the repository root; refused")
        return path

    # -- scanning ---------------------------------------------------------------------
    @property
    def skipped(self) -> tuple[Skipped, ...]:
        """Entries the latest scans left out (root entries and version entries), sorted by path."""
        with self._skipped_lock:
            return tuple(Skipped(p, r) for p, r in sorted(self._skipped.items()))

    def _note_skipped(self, found: dict[str, str], prefix: str | None) -> None:
        """Replace the skipped entries under ``prefix`` (None: all of them), logging new ones once."""
        with self._skipped_lock:
            keep = {} if prefix is None else {p: r for p, r in self._skipped.items() if not p.startswith(prefix)}
            for path, reason in sorted(found.items()):
                if self._skipped.get(path) != reason:
                    log.warning("model repository: skipping %s: %s", path, reason)
            self._skipped = {**keep, **found}

    def scan(self, name: str) -> list[VersionEntry]:
        """Every version of ``name`` on disk (complete or refused), ascending.

        Raises:
            UnknownModel: no directory ``name`` in the root.
            PathOutsideRoot: ``name`` is a symlink out of the root.
        """
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            raise UnknownModel(
                f"no model named {name!r} in the repository; available: {sorted(self.list_models()) or 'none'}"
            )
        found: dict[str, str] = {}
        try:
            entries = self._scan_model(model_dir, found)
        except OSError as exc:  # unreadable (permissions), or removed while scanning
            raise ArtifactError(f"model directory {name} cannot be read ({exc.strerror or type(exc).__name__})") from None
        self._note_skipped(found, f"{name}/")
        return entries

    def _scan_model(self, model_dir: Path, skipped: dict[str, str]) -> list[VersionEntry]:
        entries = []
        for p in sorted(model_dir.iterdir()):
            if p.name.startswith(".") or p.name == DEFAULT_FILE:
                continue  # a temporary directory save_artifact is writing, or the default pointer
            rel = self.relative(p)
            if not _VERSION_NAME.fullmatch(p.name):
                skipped[rel] = "not a version number (versions are directories named 1, 2, 3, ...)"
                continue
            try:
                entry = self._version_entry(p)
            except OSError as exc:
                skipped[rel] = f"cannot be read ({exc.strerror or type(exc).__name__})"
                continue
            if isinstance(entry, str):
                if entry:
                    skipped[rel] = entry
                continue
            entries.append(entry)
        return sorted(entries, key=lambda e: e.version)

    def _version_entry(self, path: Path) -> VersionEntry | str:
        """The entry of one version directory, or why it is not one ("" when it is still being written)."""
        version = int(path.name)
        rel = self.relative(path)
        if path.is_symlink() and not self._inside(path):
            return VersionEntry(version, f"{rel} is a symlink that leads outside the repository root; refused",
                                ((f"-> {os.readlink(path)}", 0, 0),))
        if not path.is_dir():
            return "a broken symlink" if path.is_symlink() else "not a directory"
        names = sorted(os.listdir(path))
        if MANIFEST_FILE not in names:
            return ""  # not a version yet (a copy in progress, weights first)
        fingerprint = []
        problem = ""
        for entry_name in names:
            entry = path / entry_name
            inside = not entry.is_symlink() or self._inside(entry)
            if not inside and not problem:
                problem = f"{self.relative(entry)} is a symlink that leads outside the repository root; refused"
            try:
                st = entry.stat() if inside else entry.lstat()
            except OSError:  # a dangling symlink inside the root, or deleted since listdir
                fingerprint.append((entry_name, -1, 0))
                continue
            if inside and (odd := _odd_entry(entry_name, st.st_mode)):
                return odd  # never counted: reading it would block (a FIFO) or fail
            fingerprint.append((entry_name, st.st_size, st.st_mtime_ns))
        return VersionEntry(version, problem, tuple(fingerprint))

    def scan_all(self) -> dict[str, list[VersionEntry]]:
        """Every model with at least one version on disk (complete or refused), by name; never raises on odd entries."""
        if not self.root.is_dir():
            self._note_skipped({}, None)
            return {}
        out: dict[str, list[VersionEntry]] = {}
        skipped: dict[str, str] = {}
        for p in sorted(self.root.iterdir()):
            if p.name.startswith("."):
                continue
            rel = self.relative(p)
            try:
                check_name(p.name)
            except InvalidArgument:
                skipped[rel] = "not a valid model name (letters, digits, '-', '_' and '.' only)"
                continue
            try:
                if p.is_symlink() and not self._inside(p):
                    skipped[rel] = "a symlink that leads outside the repository root; refused"
                elif not p.is_dir():
                    skipped[rel] = "a broken symlink" if p.is_symlink() else "not a directory"
                elif entries := self._scan_model(p, skipped):
                    out[p.name] = entries
            except OSError as exc:  # unreadable (permissions), or removed while scanning
                skipped[rel] = f"cannot be read ({exc.strerror or type(exc).__name__})"
        self._note_skipped(skipped, None)
        return out

    def list_models(self) -> dict[str, list[int]]:
        """Models with at least one complete version, and those versions ascending."""
        out = {}
        for name, entries in self.scan_all().items():
            versions = [e.version for e in entries if not e.problem]
            if versions:
                out[name] = versions
        return out

    def versions(self, name: str) -> list[int]:
        """The complete versions of ``name`` (refused ones left out), ascending."""
        return [e.version for e in self.scan(name) if not e.problem]

    def resolve_version(self, name: str, version: int | None = None) -> int:
        """``version`` checked to exist, or (None) the default: ``DEFAULT`` when it names a complete
        version, else the newest complete version."""
        entries = self.scan(name)
        versions = [e.version for e in entries if not e.problem]
        if version is None:
            if not versions:
                raise UnknownModel(f"model {name!r} has no complete versions in the repository")
            pinned = self.default_version(name)
            return pinned if pinned in versions else versions[-1]
        refused = next((e for e in entries if e.version == version and e.problem), None)
        if refused is not None:
            raise PathOutsideRoot(refused.problem)
        if version not in versions:
            raise UnknownVersion(f"model {name!r} has no version {version}; versions: {versions}")
        return version

    # -- the persistent default ------------------------------------------------------------
    def default_version(self, name: str) -> int | None:
        """The version ``<model>/DEFAULT`` names, or None: no file, or one that names no version (empty, not a
        version number, not ASCII, not a regular file, unreadable; logged at each call).

        For one-off readers (the command line, ``resolve_version``, a promotion's gate), which then use the newest
        version. The server's poll uses ``read_default``: to it, a file that names no version is not "no pointer".
        The version named may be missing or incomplete: callers check it against the scan. The pointer is read
        only inside the root and at most ``DEFAULT_MAX_BYTES`` of it: a version number is a few bytes.

        Raises:
            PathOutsideRoot: ``DEFAULT`` (or the model directory) is a symlink that leads outside the root.
            ArtifactError: ``DEFAULT`` is larger than ``DEFAULT_MAX_BYTES``.
        """
        version, problem = self._pointer(name)
        if problem:
            log.warning("model repository: %s; ignored", problem)
        return version

    def read_default(self, name: str) -> int | None:
        """The version ``<model>/DEFAULT`` names; None only when there is no ``DEFAULT`` file.

        A ``DEFAULT`` that is there but names no version is an error, not "no pointer": an empty or truncated file
        is what a non-atomic ``echo 1 > DEFAULT`` looks like half written, and a server reading it as "no pointer"
        switched traffic to the newest version, undoing a rollback. The server keeps its current default instead
        and says so once (``ModelManager``), so nothing is logged here.

        Raises:
            ArtifactError: ``DEFAULT`` names no version (empty, not a version number, not ASCII, not a regular
                file, unreadable), or is larger than ``DEFAULT_MAX_BYTES``.
            PathOutsideRoot: ``DEFAULT`` (or the model directory) is a symlink that leads outside the root.
        """
        version, problem = self._pointer(name)
        if problem:
            raise ArtifactError(f"{problem} (write it with SetDefaultVersion, or to a temporary file renamed over "
                                "it, so that no reader sees it half written)")
        return version

    def _pointer(self, name: str) -> tuple[int | None, str]:
        """``(version, "")`` from ``<model>/DEFAULT``; ``(None, "")`` when there is no such file; ``(None, why)``
        for a file there that names no version (the text says what it holds, for the log)."""
        path = self._model_dir(name) / DEFAULT_FILE
        rel = self.relative(path)
        try:
            data = self._read_pointer(path, rel)
        except FileNotFoundError:  # removed meanwhile, or a dangling symlink: no pointer
            return None, ""
        except OSError as exc:
            return None, f"cannot read {rel}: {exc.strerror or type(exc).__name__}"
        if data is None:
            return None, ""
        try:
            text = data.decode("ascii").strip()
        except UnicodeDecodeError:
            return None, f"{rel} is not ASCII text"
        if not text:
            return None, f"{rel} is empty"
        if not _VERSION_NAME.fullmatch(text):
            return None, f"{rel} holds {text[:20]!r}, not a version number"
        return int(text), ""

    def _read_pointer(self, path: Path, rel: str) -> bytes | None:
        """At most ``DEFAULT_MAX_BYTES`` of the pointer file at ``path`` (inside the root); None when there is
        nothing there. Opened without following a last symlink (resolved and checked first) and without
        blocking (a FIFO), so what is checked is what is read.

        Raises:
            OSError: unreadable, or not a regular file (a FIFO, a directory: ``EINVAL``).
        """
        if not path.is_symlink() and not path.exists():
            return None
        if path.is_symlink():
            if not self._inside(path):
                log.warning("model repository: %s is a symlink that leads outside the repository root; refused", rel)
                raise PathOutsideRoot(f"{rel} is a symlink that leads outside the repository root; refused")
            path = path.resolve()
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            data = os.read(fd, DEFAULT_MAX_BYTES + 1)  # one byte more tells a file over the limit
        finally:
            os.close(fd)
        if len(data) > DEFAULT_MAX_BYTES:
            message = (f"{rel} is larger than {DEFAULT_MAX_BYTES} bytes: a DEFAULT pointer holds one version number; "
                       "write it again with SetDefaultVersion (or remove it to serve the newest version)")
            log.warning("model repository: %s", message)
            raise ArtifactError(message)
        return data

    def set_default(self, name: str, version: int | None) -> None:
        """Make ``version`` (a complete version) the persistent default of ``name``; None removes the pointer.

        Written to a temporary file in the model directory and renamed over ``DEFAULT``,
        so a reader sees the old or the new pointer, never a partial one. The model directory
        is synced after the rename or the removal: a power cut must not bring back the old default.
        """
        model_dir = self._model_dir(name)
        path = model_dir / DEFAULT_FILE
        if version is None:
            try:
                path.unlink()
            except FileNotFoundError:  # no pointer: nothing changed, nothing to sync
                return
            fsync_folder(model_dir)
            return
        self.resolve_version(name, version)  # must exist and be complete
        write_atomic(path, f"{int(version)}\n".encode("ascii"))

    def version_dir(self, name: str, version: int | None = None) -> Path:
        """The directory of a complete version, checked to lead nowhere outside the root."""
        return self.confine(self._model_dir(name) / str(self.resolve_version(name, version)))

    def confine(self, path: Path) -> Path:
        """``path``, a version directory ``<root>/<model>/<version>``, checked to lead nowhere outside the root.

        Neither the model directory, the version directory nor any entry of it may be a symlink out of the
        root (checked again for a version the scan found: it may have changed since). Every path that opens a
        version goes through here: the server's loads (``version_dir``) and a directory given directly
        (``segsvc eval``, ``open_version_dir``). Its files are then read with ``root=self.root``, which opens
        them beneath the root: a symlink swapped in after this check is not followed either.

        Raises:
            PathOutsideRoot: one of them leads outside, named relative to the root.
            ArtifactError: the version directory cannot be listed.
        """
        for step in (path.parent, path):
            if step.is_symlink() and not self._inside(step):
                raise PathOutsideRoot(
                    f"{self.relative(step)} is a symlink that leads outside the repository root; refused")
        if not self._inside(path):  # not below the root at all
            raise PathOutsideRoot(f"{self.relative(path)} is not inside the repository root; refused")
        try:
            entries = list(path.iterdir())
        except OSError as exc:
            raise ArtifactError(f"{self.relative(path)} cannot be read ({exc.strerror or type(exc).__name__})") from None
        for entry in entries:
            if entry.is_symlink() and not self._inside(entry):
                raise PathOutsideRoot(
                    f"{self.relative(entry)} is a symlink that leads outside the repository root; refused"
                )
        return path

    # -- reading ----------------------------------------------------------------------
    def read_manifest(self, name: str, version: int | None = None) -> Manifest:
        path = self.version_dir(name, version)
        try:
            return read_manifest(path, self.root)
        except SegsvcError as exc:
            raise type(exc)(self.redact(str(exc))) from None

    def load(self, name: str, version: int | None = None, device: str | torch.device = "cpu") -> tuple[nn.Module, Manifest]:
        """Load a version; its manifest must name this model and this version.

        A directory renamed or copied to another number would otherwise serve
        under one version while its manifest (and every log) says another.

        Raises:
            ArtifactError: corrupt or incomplete files, or a manifest that names another model or version.
            PathOutsideRoot: a symlink out of the root.
        """
        path = self.version_dir(name, version)
        v = int(path.name)
        try:
            model, manifest = load_artifact(path, device=device, root=self.root)
        except SegsvcError as exc:
            raise type(exc)(self.redact(str(exc))) from None
        check_manifest(name, v, manifest)
        return model, manifest


def check_manifest(name: str, version: int, manifest: Manifest) -> None:
    """Refuse a manifest whose name or version differs from the directory it was found in."""
    if manifest.name != name or manifest.version != version:
        raise ArtifactError(
            f"{name}/{version}/{MANIFEST_FILE} describes model {manifest.name!r} version {manifest.version}, "
            f"not {name!r} version {version}: the directory was renamed or copied; publish it as a new version "
            "instead (segsvc writes the manifest to match)"
        )
