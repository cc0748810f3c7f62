"""Which files a batch job reads: input specs resolved under the data root.

A batch request names its inputs as folders, glob patterns or single files,
relative to the server's configured data root. This module turns those specs
into a sorted, de-duplicated list of files and is the one place that enforces
the confinement rule for them: every file a job will read, and every folder it
walks, resolves (symlinks included) to a path inside the root. A request that
would leave the root is refused outright rather than silently trimmed, so a
misplaced symlink is noticed instead of quietly leaking or dropping data.

Costs are bounded while listing: the walk stops as soon as ``max_files`` is
passed, so a spec like ``**`` over a huge tree fails fast instead of first
building a million-entry list. Each spec is a walk of its own, so the number of
specs is bounded too (``max_specs``, checked before anything is listed), a spec
naming a path already expanded (``.``, ``./``, the root's absolute path) is not
walked again, and all the walks of one request together list at most
``ENTRIES_PER_FILE`` folder entries per file ``max_files`` allows. Only the
entries a walk keeps or descends into are held, so memory follows the files
named and the folders still to walk, not the entries listed.

Error messages name paths as the client wrote them or relative to the root,
never the root's absolute location on the server.

Example:
    >>> files = resolve_inputs("/srv/data", ["scans/a", "extra/**/*.png"])  # doctest: +SKIP
    >>> [f.rel for f in files]  # doctest: +SKIP
    ['extra/x/1.png', 'scans/a/001.png']
"""

from __future__ import annotations

import functools
import os
import posixpath
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Callable, Iterator, Sequence

from segsvc.errors import InvalidArgument, NotFound, PathOutsideRoot
from segsvc.files import check_path_length

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")

GLOB_CHARS = frozenset("*?[")
# Folder entries one request may list, over all its specs, per file it may name: room for labels, masks and
# notes beside the images, while distinct specs cannot walk a large data root over and over.
ENTRIES_PER_FILE = 20


@dataclass(frozen=True)
class InputFile:
    """One file a job will read.

    Args:
        path: resolved absolute path, guaranteed to lie inside the data root.
        rel: POSIX path relative to the root as the client named it (through a
            symlink if the client went through one); outputs are named after it.
    """

    path: Path
    rel: str


def resolve_inputs(
    root: str | os.PathLike[str], specs: Sequence[str], *, max_files: int = 100_000, max_specs: int | None = None
) -> list[InputFile]:
    """Expand ``specs`` into the files under ``root`` they name, sorted by ``rel``.

    Each spec is a folder (walked recursively, keeping files whose suffix is in
    ``IMAGE_SUFFIXES``, case-insensitively), a glob pattern (contains ``*``,
    ``?`` or ``[``; ``**`` spans folders; matched case-sensitively against
    paths relative to the root) or a single file of any suffix (the decoder
    judges it later). Absolute specs are accepted only inside the root.

    Raises:
        PathOutsideRoot: a spec, or a symlink it would read or walk through,
            leads outside the root.
        InvalidArgument: no specs, more than ``max_specs`` specs (None: no
            limit), an empty or malformed spec, a spec that matches nothing, or
            more than ``max_files`` files.
        NotFound: the data root itself does not exist (a server misconfiguration).
    """
    if max_files < 1:
        raise InvalidArgument(f"max_files must be at least 1, got {max_files}")
    if max_specs is not None and max_specs < 1:
        raise InvalidArgument(f"max_specs must be at least 1 or None, got {max_specs}")
    if not specs:
        raise InvalidArgument("no inputs given: name at least one folder, glob pattern or file")
    if max_specs is not None and len(specs) > max_specs:
        raise InvalidArgument(f"{len(specs)} input paths given, over the limit of {max_specs}: name their folders "
                              "or a glob pattern instead, or split the job")
    real_root = _real_root(root)
    budget = _Budget(ENTRIES_PER_FILE * max_files)
    found: dict[Path, InputFile] = {}  # keyed by resolved path: see add_unique for the name kept
    expanded: set[str] = set()  # normalised specs already walked
    for spec in specs:
        rel, shown = _relative_spec(real_root, root, spec)
        check_path_length(real_root, rel, "input")
        if rel in expanded:  # the same path again: it names nothing new
            continue
        expanded.add(rel)
        matched = False
        for file in _expand(real_root, rel, shown, budget):
            matched = True
            add_unique(found, file, real_root)
            if len(found) > max_files:
                raise InvalidArgument(
                    f"inputs name more than {max_files} files (counted {len(found)} "
                    f"before stopping): split the job or narrow the inputs"
                )
        if not matched:
            raise InvalidArgument(f"input {shown!r} matches no image under the data root")
    return sorted(found.values(), key=lambda f: f.rel)


def add_unique(found: dict[Path, InputFile], file: InputFile, real_root: Path) -> None:
    """Add ``file`` to ``found`` (keyed by its resolved path), or pick the name it keeps if it is there already.

    A file named more than once (a symlink to it, two specs) is read once, under one name: its own, the one
    that is its resolved path below ``real_root``, when that is among its names, else the first met. Keeping
    the first in name order let ``0link.png -> 1.png`` take the name of ``1.png``, which then appeared nowhere
    in the outputs. Every caller that merges listings goes through here, so one rule names them all.
    """
    kept = found.get(file.path)
    if kept is None or (not is_own_name(kept, real_root) and is_own_name(file, real_root)):
        found[file.path] = file


def is_own_name(file: InputFile, real_root: Path) -> bool:
    """Whether ``file`` is named by its resolved path below ``real_root``, not through a symlink."""
    return file.path == real_root / file.rel


def _real_root(root: str | os.PathLike[str]) -> Path:
    """The root with every symlink resolved: the reference every check compares with."""
    try:
        real = Path(root).resolve(strict=True)
    except (FileNotFoundError, RuntimeError):
        raise NotFound("the data root does not exist (check the server configuration)") from None
    if not real.is_dir():
        raise NotFound("the data root is not a folder (check the server configuration)")
    return real


class _Budget:
    """The folder entries a request may still list, over all its specs."""

    def __init__(self, entries: int) -> None:
        self.limit = self.left = entries

    def spend(self, entries: int) -> None:
        self.left -= entries
        if self.left < 0:
            raise InvalidArgument(
                f"listing the inputs looked at more than {self.limit} entries under the data root "
                f"({ENTRIES_PER_FILE} per allowed file): name narrower folders or patterns, or split the job"
            )


def _expand(real_root: Path, rel: str, shown: str, budget: _Budget) -> Iterator[InputFile]:
    """Yield the files one spec names (possibly none); refuse escapes as they are met."""
    if GLOB_CHARS.intersection(rel):
        yield from _expand_glob(real_root, rel, shown, budget)
        return
    real = confine(real_root, rel, shown, what="input")
    if real.is_dir():
        yield from _walk(real_root, real, rel, shown, _keep_images, budget)
    elif real.is_file():
        yield InputFile(real, rel)
    # anything else (missing, a FIFO, a device) matches nothing


def _relative_spec(real_root: Path, root: str | os.PathLike[str], spec: str) -> tuple[str, str]:
    """Return the spec as a normalised POSIX path relative to the root, and how to name it.

    ``..`` is collapsed lexically and refused if it climbs above the root; what
    the result resolves to is checked separately (symlinks can still escape).
    An absolute spec inside the root is named relative to the root in messages,
    so that an error never echoes the root's location.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidArgument(f"input {spec!r} is empty: name a folder, glob pattern or file")
    if "\x00" in spec:
        raise InvalidArgument(f"input {spec!r} contains a NUL character")
    shown = spec
    if posixpath.isabs(spec):
        norm = posixpath.normpath(spec)
        for base in (posixpath.normpath(os.path.abspath(root)), str(real_root)):
            if norm == base or norm.startswith(base.rstrip("/") + "/"):
                rel = posixpath.relpath(norm, base)
                return rel, rel
        raise PathOutsideRoot(f"input {spec!r} is outside the data root: give a path relative to it")
    rel = posixpath.normpath(spec)
    if rel == ".." or rel.startswith("../"):
        raise PathOutsideRoot(f"input {shown!r} climbs out of the data root with '..'")
    return rel, shown


def _inside(real_root: Path, real: Path) -> bool:
    return real == real_root or real.is_relative_to(real_root)


def confine(real_root: Path, path: str | Path, shown: str, *, what: str, symlink: str | None = None) -> Path:
    """Resolve ``path`` (relative paths: below the root) through every symlink; refuse escapes.

    ``what`` and ``shown`` name the input in messages ("input", its spec); ``symlink`` names ``path`` when it is a
    symlink a walk reached, below the input. The answer holds when it is given: a reader that opens the result
    later opens it with ``segsvc.files.open_beneath``, which refuses a symlink swapped in since.
    """
    subject = f"{what} {shown!r}" + (f" reaches the symlink {symlink!r}, which" if symlink is not None else "")
    try:
        real = Path(os.path.realpath(real_root / path))
    except OSError as exc:  # a link that vanished while it was being read (the tree changing meanwhile)
        raise InvalidArgument(f"{subject} changed while it was resolved: "
                              f"{exc.strerror or type(exc).__name__}") from None
    if not _inside(real_root, real):
        raise PathOutsideRoot(_leads_out(real_root, path, shown, what=what, symlink=symlink))
    return real


def _leads_out(real_root: Path, path: str | Path, shown: str, *, what: str, symlink: str | None) -> str:
    """The refusal of an input that resolves outside the root, naming the symlink that leads out: ``symlink``
    (the one a walk reached), else the first on ``path``."""
    link = symlink if symlink is not None else _first_link_out(real_root, path)
    if link is None:  # the tree changed meanwhile: no link on the path leads out any more
        return f"{what} {shown!r} leads outside the data root through a symlink"
    if link == shown and symlink is None:
        return f"{what} {shown!r} is a symlink that leads outside the data root"
    return f"{what} {shown!r} reaches the symlink {link!r}, which leads outside the data root"


def _first_link_out(real_root: Path, path: str | Path) -> str | None:
    """The first leading part of ``path`` (below the root) that is a symlink resolving outside the root, as a
    POSIX path relative to it; None if there is none (now)."""
    given = Path(path)
    if given.is_absolute():
        if not given.is_relative_to(real_root):
            return None
        given = given.relative_to(real_root)
    parts = [part for part in given.parts if part != "."]
    for n in range(1, len(parts) + 1):
        prefix = real_root.joinpath(*parts[:n])
        try:
            if os.path.islink(prefix) and not _inside(real_root, Path(os.path.realpath(prefix))):
                return posixpath.join(*parts[:n])
        except OSError:
            return None
    return None


def _keep_images(parts: tuple[str, ...], is_dir: bool) -> tuple[bool, bool]:
    """Folder specs: descend into every folder, keep files with an image suffix."""
    if is_dir:
        return True, False
    return False, parts[-1].lower().endswith(IMAGE_SUFFIXES)


# (path parts below the walk's start, is a folder) -> (descend into it, keep it as a file)
_Want = Callable[[tuple[str, ...], bool], tuple[bool, bool]]


def _walk(real_root: Path, start: Path, start_rel: str, shown: str, want: _Want,
          budget: _Budget) -> Iterator[InputFile]:
    """Walk ``start`` depth-first in name order, yielding the files ``want`` keeps (unsorted: see below).

    Symlinks are never followed blindly: each one the walk would descend into
    or keep is resolved and must stay inside the root, else the whole request
    is refused. Symlinked folders inside the root are followed once each (a
    link back to an ancestor cannot loop), and only after every folder reached
    without one: a folder is then named by its own path when the walk reaches
    it that way too (``0scans -> scans`` does not take the names of the files
    in ``scans``). Symlinks the walk would ignore anyway, e.g. a ``notes.txt``
    link in a folder spec, are not judged.
    """
    visited = {start}
    stack: list[tuple[Path, tuple[str, ...]]] = [(start, ())]
    linked: list[tuple[Path, tuple[str, ...]]] = []  # folders reached through a symlink: walked last
    while stack or linked:
        if stack:
            folder, parts = stack.pop()
        else:
            folder, parts = linked.pop()
            if folder in visited:  # walked by its own path meanwhile, or through another link
                continue
            visited.add(folder)
        try:
            entries = _listing(folder, parts, want, budget)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue  # vanished or unreadable while walking: it simply contributes nothing
        subfolders: list[tuple[Path, tuple[str, ...]]] = []
        links: list[tuple[Path, tuple[str, ...]]] = []
        for entry, is_dir, descend, keep in entries:
            sub = (*parts, entry.name)
            rel = _join(start_rel, sub)
            is_link = entry.is_symlink()
            if is_link:
                real = confine(real_root, entry.path, shown, what="input", symlink=rel)
            else:
                real = Path(entry.path)
            if descend and is_dir and real not in visited:
                if is_link:
                    links.append((real, sub))
                else:
                    visited.add(real)
                    subfolders.append((real, sub))
            elif keep and not is_dir and real.is_file():
                yield InputFile(real, rel)
        stack.extend(reversed(subfolders))  # pop in name order
        linked.extend(reversed(links))


def _listing(folder: Path, parts: tuple[str, ...], want: _Want,
             budget: _Budget) -> list[tuple[os.DirEntry[str], bool, bool, bool]]:
    """The entries of ``folder`` (at ``parts`` below the walk's start) that ``want`` descends into or keeps,
    in name order, as (entry, is a folder, descend, keep).

    Each entry is paid for as it is read: a folder of millions of entries is refused once it passes
    the budget, not first read (and sorted) to its end. Only the wanted ones are held: the notes
    and masks beside the images cost budget, not memory.
    """
    wanted = []
    with os.scandir(folder) as it:
        for entry in it:
            budget.spend(1)
            try:
                is_dir = entry.is_dir()  # follows symlinks: a link is judged as what it points to
            except OSError:  # a link to what this server may not search: the walk judges that entry alone
                is_dir = False  # (not the folder's other entries, which a raise here would all have hidden)
            descend, keep = want((*parts, entry.name), is_dir)
            if descend or keep:
                wanted.append((entry, is_dir, descend, keep))
    wanted.sort(key=lambda w: w[0].name)
    return wanted


def _join(start_rel: str, parts: tuple[str, ...]) -> str:
    return posixpath.join(*parts) if start_rel == "." else posixpath.join(start_rel, *parts)


def _expand_glob(real_root: Path, pattern: str, shown: str, budget: _Budget) -> Iterator[InputFile]:
    """Match a glob pattern by walking only the folders that could still match.

    The literal leading folders (``scans/a`` in ``scans/a/*.png``) are resolved
    and confined like any path; below them the walk is pruned by the pattern,
    so ``scans/*/001.png`` never lists deeper than two levels. Hand-rolled
    rather than ``glob``/``Path.glob`` because those follow symlinks out of the
    root without telling us.
    """
    parts = tuple(pattern.split("/"))
    n_literal = next(i for i, p in enumerate(parts) if GLOB_CHARS.intersection(p))
    base_rel = posixpath.join(*parts[:n_literal]) if n_literal else "."
    pat = parts[n_literal:]
    base = confine(real_root, base_rel, shown, what="input")
    if not base.is_dir():
        return

    def want(sub: tuple[str, ...], is_dir: bool) -> tuple[bool, bool]:
        if is_dir:
            return _glob_match(pat, sub, whole=False), False
        return False, _glob_match(pat, sub, whole=True)

    yield from _walk(real_root, base, base_rel, shown, want, budget)


def _glob_match(pat: tuple[str, ...], path: tuple[str, ...], *, whole: bool) -> bool:
    """Whether ``path`` matches the pattern parts ``pat`` (``whole``), or, a folder, can be the start of a match
    with pattern left for its contents.

    Memoised per call, over (pattern part, path part): at most ``len(pat) * len(path)`` pairs, so a pattern of
    many ``**`` stays polynomial. A cache shared by every call would keep an entry per entry walked, growing with
    the tree, and save nothing: the walk asks about each path once.
    """

    @functools.cache
    def full(pi: int, si: int) -> bool:
        if pi == len(pat):
            return si == len(path)
        if pat[pi] == "**":
            return full(pi + 1, si) or (si < len(path) and full(pi, si + 1))
        return si < len(path) and fnmatchcase(path[si], pat[pi]) and full(pi + 1, si + 1)

    @functools.cache
    def prefix(pi: int, si: int) -> bool:
        if si == len(path):
            return pi < len(pat)
        if pi == len(pat):
            return False
        if pat[pi] == "**":
            return prefix(pi + 1, si) or prefix(pi, si + 1)
        return fnmatchcase(path[si], pat[pi]) and prefix(pi + 1, si + 1)

    return full(0, 0) if whole else prefix(0, 0)
