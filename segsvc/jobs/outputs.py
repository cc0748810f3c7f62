"""The output layout of a batch segmentation job, shared by the server's job runner and ``segsvc batch``.

Under one output folder (``<output-root>/<job-id>/`` for the server, ``--out``
for the offline runners)::

    labels/<rel>.png        single-channel class ids (8-bit; 16-bit above 256 classes)
    color/<rel>.png         optional: palette colours
    overlay/<rel>.png       optional: palette colours blended over the image
    confidence/<rel>.png    optional: max softmax probability as uint8 (round(255 p))
    results.jsonl           one record per image, sorted by input
    failures.jsonl          one {"input", "reason"} line per failed input, sorted by input
    summary.json            counts, per-class pixel totals and shares, the first failures, throughput
    class_shares.png        horizontal bar chart of the class pixel shares

``<rel>`` is the input's path relative to the job's input root with ``.png``
*appended* (``a/b/img.jpg`` -> ``labels/a/b/img.jpg.png``): nested folders are
kept and ``x.png`` / ``x.jpg`` never collide. An input whose name cannot become
an output name (a backslash, bytes that are not UTF-8, a name too long for its
output's temporary) fails alone, with that reason, when its job is created
(``checked_inputs``); the job's other inputs are segmented as usual.

Every file is written under a temporary name in its own folder
(``.<name>.tmp-<hex>``) and renamed into place with ``os.replace``, so a reader
(or a resumed job after ``kill -9``) sees either no file or a complete one;
``clean_temporaries`` removes what a killed writer left behind. Item files are
not fsynced: the guarantee is against crashed processes, not power loss.
``results.jsonl`` is written one line at a time as the records are read (a job
of a million images holds neither its records nor the file in memory), and
fsynced before its rename: one sync per job, so a power loss cannot leave the
job's index renamed into place but empty. ``failures.jsonl`` is written the same
way, and ``summary.json`` lists only the first ``FAILURES_SHOWN`` failures by input
(with ``failures_truncated`` when there are more; ``counts.failed`` is exact): a
job whose million inputs all fail keeps its summary, its stored result and its
``GetOperation`` response small.

Example:
    >>> import numpy as np, tempfile
    >>> out = JobOutputs(tempfile.mkdtemp())
    >>> out.write_item("a/x.jpg", np.zeros((4, 4), np.uint8), palette=[(0, 0, 0)])
    {'labels': 'labels/a/x.jpg.png'}
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Mapping, Sequence

import cv2
import numpy as np

from segsvc.errors import FailedPrecondition, InvalidArgument
from segsvc.files import NAME_MAX
from segsvc.inference.codec import colorize, encode_png
from segsvc.inference.codec import overlay as blend

KINDS = ("labels", "color", "overlay", "confidence")
RESULTS_FILE = "results.jsonl"
FAILURES_FILE = "failures.jsonl"
# Failures listed in summary.json (and a job's result): the first by input; failures.jsonl lists them all.
FAILURES_SHOWN = 100
SUMMARY_FILE = "summary.json"
CHART_FILE = "class_shares.png"
CHART_MAX_CLASSES = 40  # more bars than this are unreadable; the rest are summed into one bar
RECORD_KEYS = ("input", "output", "height", "width", "class_counts", "mean_confidence", "model", "version", "ms")
_TMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{12}$")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a file being written here (``.<name>.tmp-<12 hex>``), not an output."""
    return _TMP_RE.match(name) is not None


def check_rel(rel: str) -> str:
    """``rel`` as a clean relative POSIX path, or ``InvalidArgument`` if it could escape the output folder."""
    if not rel or "\x00" in rel or "\\" in rel:
        raise InvalidArgument(f"output name {rel!r} must be a non-empty relative path with '/' separators")
    path = PurePosixPath(rel)
    if path.is_absolute():
        raise InvalidArgument(f"output name {rel!r} must be relative, not absolute")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidArgument(f"output name {rel!r} must not contain '..', '.' or empty components")
    return rel


# What the name of an output's temporary adds to its input's file name: ".<name>.png.tmp-<12 hex>".
_NAME_OVERHEAD = len(".") + len(".png") + len(".tmp-") + 12


def storable_name(rel: str) -> str:
    """``rel`` as valid Unicode text, to be stored, printed and written to JSON.

    A file name whose bytes are not UTF-8 reaches Python with each bad byte as a
    lone surrogate (``os.fsdecode``); those bytes are shown as ``\\xNN`` here
    (``caf\\xe9.png``). Other names are returned unchanged.
    """
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        pass
    try:
        return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file-name decoding makes
        return rel.encode("utf-8", "backslashreplace").decode("utf-8")


def input_name_problem(rel: str) -> str | None:
    """Why input ``rel`` (a path relative to the input root) cannot get output files, else None.

    The reason is recorded as that input's failure, like an undecodable image's,
    so the other inputs of the job are still segmented.
    """
    if storable_name(rel) != rel:
        return ("its file name is not valid UTF-8, so no output can be named after it: rename the file "
                "(e.g. convmv -f latin1 -t utf8)")
    if "\\" in rel:
        return "its file name contains a backslash, which output names may not hold: rename the file"
    try:
        check_rel(rel)
    except InvalidArgument as exc:
        return str(exc)
    name_bytes = len(rel.rsplit("/", 1)[-1].encode())
    if name_bytes + _NAME_OVERHEAD > NAME_MAX:
        return (f"its file name is too long for its outputs ({name_bytes} bytes; outputs add "
                f"{_NAME_OVERHEAD} to at most {NAME_MAX}): rename the file")
    return None


def checked_inputs(rels: Sequence[str]) -> tuple[list[str], dict[int, str]]:
    """The names to store for inputs ``rels`` (``storable_name``), and by index why an input can get no outputs."""
    names, problems = [], {}
    for index, rel in enumerate(rels):
        names.append(storable_name(rel))
        problem = input_name_problem(rel)
        if problem is not None:
            problems[index] = problem
    return names, problems


def output_relpath(rel: str, kind: str = "labels") -> str:
    """Where ``kind`` of input ``rel`` goes, relative to the output folder (``labels/a/x.jpg.png``)."""
    if kind not in KINDS:
        raise InvalidArgument(f"unknown output kind {kind!r}; expected one of {KINDS}")
    return f"{kind}/{check_rel(rel)}.png"


def temporary_name(path: Path) -> Path:
    """A unique temporary sibling of ``path``: same folder, so ``os.replace`` is an atomic rename."""
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")


def atomic_write(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file.

    ``data`` is the bytes, or pieces of them written as they come (a file too large to
    build in memory: ``results.jsonl``); such a file is fsynced before its rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                for piece in data:
                    f.write(piece)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def clean_temporaries(root: str | os.PathLike[str]) -> int:
    """Remove temporary files a killed writer left under ``root``; returns how many were removed."""
    removed = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if is_temporary(name):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except FileNotFoundError:  # another cleaner got there first
                    pass
    return removed


# A write failing with these is about the one item's output path (a folder where its file goes, a file
# where its folder goes: EEXIST from mkdir, ENOTDIR; a name too long), not the disk: that input fails and
# the run goes on. Any other OSError (ENOSPC, EROFS, EDQUOT, EACCES, EIO) would fail every item alike, so
# it stops the run; --resume redoes it (the server pauses a job on ENOSPC and EDQUOT until space is freed,
# and fails it with the reason on the others).
ITEM_WRITE_ERRNOS = frozenset({errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG})


def item_write_problem(exc: BaseException, out: Path) -> str | None:
    """Why one item's outputs could not be written, when ``exc`` is about that item alone; else None."""
    if isinstance(exc, InvalidArgument):
        return str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.errno in ITEM_WRITE_ERRNOS:
        where = exc.filename2 or exc.filename  # os.replace names the destination second
        if where is None:  # no path to tell whose it is: only the item's own output could be meant
            return f"cannot write its outputs: {exc}"
        # Named from the output folder: the reason is read next to it.
        where = Path(os.path.relpath(os.path.abspath(os.fsdecode(where)), os.path.abspath(out))).as_posix()
        parts = Path(where).parts
        if len(parts) < 2 or where.startswith("../") or not (out / parts[0]).is_dir():
            # out itself or a kind folder (labels/, color/...) is every input's, also when the error names a
            # path below a kind folder that is not a folder (labels/sub for sub/x.png): failing each input for
            # it would keep them FAILED after the folder is fixed. Stop the run; --resume redoes it.
            return None
        clash = "" if exc.errno == errno.ENAMETOOLONG else " (another input's output file or folder has that name)"
        return f"cannot write its output {where}: {exc.strerror}{clash}"
    return None


def _undeletable(rel: str, exc: OSError) -> FailedPrecondition:
    """Why an input's earlier files could not be deleted: the input and the reason, not the server's paths."""
    return FailedPrecondition(
        f"cannot delete the earlier outputs of input {rel!r}, which failed or was skipped (no file may outlive "
        f"its input's record): {exc.strerror or type(exc).__name__}; make the output folder writable, then run "
        "the job again (segsvc batch: --resume)"
    )


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels per class id (length ``max(num_classes, max label + 1)``)."""
    return np.bincount(labels.ravel(), minlength=num_classes).astype(np.int64)


def _class_name(class_names: Sequence[str], index: int) -> str:
    return class_names[index] if index < len(class_names) else str(index)


class JobOutputs:
    """Writes one job's files under ``root`` in the layout described in the module docstring.

    Args:
        root: the job's output folder; created on the first write.

    Example:
        >>> out = JobOutputs("runs/batch/out")  # doctest: +SKIP
        >>> files = out.write_item("a/x.jpg", labels, palette=manifest.palette, color=True)  # doctest: +SKIP
        >>> record = out.item_record("a/x.jpg", labels, class_names=manifest.class_names,
        ...                          model="m", version=1, ms=12.5)  # doctest: +SKIP
        >>> summary = out.finalize([record], [], class_names=manifest.class_names,
        ...                        palette=manifest.palette, summary_fields={"model": "m", "version": 1})  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, rel: str, kind: str = "labels") -> Path:
        return self.root / output_relpath(rel, kind)

    def write_item(
        self,
        rel: str,
        labels: np.ndarray,
        *,
        palette: Sequence[Sequence[int]] | np.ndarray,
        image: np.ndarray | None = None,
        confidence: np.ndarray | None = None,
        color: bool = False,
        overlay: bool = False,
        alpha: float = 0.5,
    ) -> dict[str, str]:
        """Write the label PNG of one input (and the extras asked for); returns kind -> path relative to root.

        The label PNG is written last, so its presence implies the extras are complete too.
        """
        if labels.ndim != 2 or labels.dtype not in (np.uint8, np.uint16):
            raise InvalidArgument(f"labels must be an HxW uint8 or uint16 array, got {labels.dtype} {labels.shape}")
        if overlay and image is None:
            raise InvalidArgument("an overlay needs the input image")
        if confidence is not None and confidence.shape != labels.shape:
            raise InvalidArgument(f"confidence is {confidence.shape} but the label map is {labels.shape}")
        files: dict[str, str] = {}
        extras: list[tuple[str, np.ndarray]] = []
        if color:
            extras.append(("color", colorize(labels, palette)))
        if overlay:
            assert image is not None
            extras.append(("overlay", blend(image, labels, palette, alpha)))
        if confidence is not None:
            extras.append(("confidence", np.ascontiguousarray(confidence, dtype=np.uint8)))
        for kind, array in [*extras, ("labels", labels)]:
            files[kind] = output_relpath(rel, kind)
            atomic_write(self.root / files[kind], encode_png(array))
        return {k: files[k] for k in KINDS if k in files}

    def remove_item(self, rel: str) -> int:
        """Delete the files of input ``rel`` (every kind); returns how many there were.

        Called before an input is recorded FAILED or SKIPPED: a run killed after renaming its
        files into place, or a write that failed after its extras, leaves files that would
        otherwise outlive the item's record. Only files go: a folder at one of these names
        holds another input's outputs (``a.png.png/`` for ``a.png.png/b.png``).

        An output folder that refuses the deletion (read-only, permissions, I/O error) raises
        ``FailedPrecondition`` naming the input and the reason, never the server's paths.
        """
        if input_name_problem(rel) is not None:  # no output was ever named after it
            return 0
        removed = 0
        for kind in KINDS:
            try:
                os.unlink(self.path(rel, kind))
                removed += 1
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                pass
            except OSError as exc:
                if isinstance(exc, PermissionError) and self.path(rel, kind).is_dir():
                    continue  # what macOS raises for unlink on a folder
                raise _undeletable(rel, exc) from exc
        return removed

    def remove_items(self, rels: Iterable[str]) -> int:
        """``remove_item`` for each of ``rels`` (one call for many inputs: one trip to an I/O thread)."""
        return sum(self.remove_item(rel) for rel in rels)

    @staticmethod
    def item_record(
        rel: str,
        labels: np.ndarray,
        *,
        class_names: Sequence[str],
        model: str,
        version: int,
        ms: float,
        confidence: np.ndarray | None = None,
        counts: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """The ``results.jsonl`` record of one image.

        ``class_counts`` lists only the classes present, in class order, so records
        stay small for models with hundreds of classes. ``counts`` may be given when
        the engine already computed them on the device.
        """
        if counts is None:
            counts = class_counts(labels, len(class_names))
        present = {_class_name(class_names, int(i)): int(counts[i]) for i in np.flatnonzero(counts)}
        mean_conf = None if confidence is None else round(float(confidence.mean()) / 255.0, 6)
        return {
            "input": check_rel(rel),
            "output": output_relpath(rel),
            "height": int(labels.shape[0]),
            "width": int(labels.shape[1]),
            "class_counts": present,
            "mean_confidence": mean_conf,
            "model": model,
            "version": int(version),
            "ms": round(float(ms), 3),
        }

    def finalize(
        self,
        records: Iterable[Mapping[str, Any]],
        failures: Iterable[Mapping[str, Any]],
        *,
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]] | np.ndarray,
        summary_fields: Mapping[str, Any],
        failures_shown: int | None = None,
    ) -> dict[str, Any]:
        """Write ``results.jsonl``, ``failures.jsonl``, ``summary.json`` and ``class_shares.png``; returns the
        summary.

        ``records`` are written to ``results.jsonl`` one line at a time, sorted by input: a
        sequence (held in memory already) is sorted here; any other iterable must come in that
        order, as a job's DONE items read from its store a page at a time do (jobs register
        their inputs sorted), and is never held whole. ``failures`` go to ``failures.jsonl``
        the same way; the summary lists the first ``failures_shown`` of them by input
        (default ``FAILURES_SHOWN``), sets ``failures_truncated`` when there were more, and
        counts them all in ``counts.failed``.

        ``summary_fields`` recognises ``job_id``, ``model``, ``version``, ``total``
        (default: done + failed + skipped), ``skipped`` (default 0), ``elapsed_s``
        and ``created`` (default: now, UTC); any other key is copied into the summary.
        """
        shown = FAILURES_SHOWN if failures_shown is None else failures_shown
        if not isinstance(shown, int) or shown < 0:
            raise InvalidArgument(f"failures_shown must be an integer >= 0, got {shown!r}")
        if isinstance(records, Sequence):
            records = sorted(records, key=lambda r: r["input"])
        if isinstance(failures, Sequence):
            failures = sorted(failures, key=lambda f: f["input"])
        pixels = {name: 0 for name in class_names}
        done = self._write_results(records, pixels)
        failed, first_failures = self._write_failures(failures, shown)
        fields = dict(summary_fields)
        total_pixels = sum(pixels.values())
        skipped = int(fields.pop("skipped", 0) or 0)
        elapsed_s = fields.pop("elapsed_s", None)
        summary: dict[str, Any] = {
            "job_id": fields.pop("job_id", None),
            "model": fields.pop("model", None),
            "version": fields.pop("version", None),
            "counts": {"total": int(fields.pop("total", None) or done + failed + skipped),
                       "done": done, "failed": failed, "skipped": skipped},
            "class_pixels": pixels,
            "class_shares": {k: (round(v / total_pixels, 6) if total_pixels else 0.0) for k, v in pixels.items()},
            "failures": first_failures,
            "failures_truncated": failed > len(first_failures),
            "failures_file": FAILURES_FILE,
            "elapsed_s": None if elapsed_s is None else round(float(elapsed_s), 3),
            "images_per_s": round(done / elapsed_s, 3) if elapsed_s else None,
            "created": fields.pop("created", None) or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **fields,
        }
        atomic_write(self.root / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
        atomic_write(self.root / CHART_FILE, class_shares_chart(pixels, class_names, palette))
        return summary

    def _write_results(self, records: Iterable[Mapping[str, Any]], pixels: dict[str, int]) -> int:
        """Write ``results.jsonl`` a line per record as they come (temporary, fsync, rename), adding each
        record's class counts to ``pixels`` (class order, then any unknown names); returns how many."""
        written = 0

        def lines() -> Iterator[bytes]:
            nonlocal written
            for record in records:
                # Records may come back from a store with their keys re-ordered: restore the documented order.
                row = {**{k: record[k] for k in RECORD_KEYS if k in record}, **record}
                for name, n in row["class_counts"].items():
                    pixels[name] = pixels.get(name, 0) + int(n)
                written += 1
                yield (json.dumps(row, sort_keys=False) + "\n").encode()

        atomic_write(self.root / RESULTS_FILE, lines())
        return written

    def _write_failures(self, failures: Iterable[Mapping[str, Any]], shown: int) -> tuple[int, list[dict[str, Any]]]:
        """Write ``failures.jsonl`` a line per failure as they come (temporary, fsync, rename); returns how many
        there were and the first ``shown`` of them by input (the only ones held)."""
        written = 0
        first: list[dict[str, Any]] = []

        def lines() -> Iterator[bytes]:
            nonlocal written
            for failure in failures:
                row = {"input": failure["input"], "reason": failure.get("reason")}
                written += 1
                _keep_first(first, row, shown)
                yield (json.dumps(row) + "\n").encode()

        atomic_write(self.root / FAILURES_FILE, lines())
        return written, first


def _failure_key(failure: Mapping[str, Any]) -> tuple[str, str]:
    return failure["input"], failure["reason"] or ""


def _keep_first(first: list[dict[str, Any]], failure: dict[str, Any], shown: int) -> None:
    """Add ``failure`` to ``first`` (sorted by input) when it is among the first ``shown`` seen so far by input."""
    if shown == 0 or (len(first) == shown and _failure_key(failure) >= _failure_key(first[-1])):
        return
    bisect.insort(first, failure, key=_failure_key)
    del first[shown:]


def class_shares_chart(
    pixels: Mapping[str, int],
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]] | np.ndarray,
) -> bytes:
    """PNG bytes of a horizontal bar chart of class pixel shares, bars in the palette colours.

    Drawn with OpenCV, which every segsvc image has: the serving image (no
    matplotlib) gets the chart too, and a batch run does not pay matplotlib's
    import (~0.3 s, a tenth of a 200-image run on 2 cores).
    """
    total = sum(pixels.values())
    colours = {name: tuple(int(c) for c in palette[i]) for i, name in enumerate(class_names) if i < len(palette)}
    ranked = sorted(pixels.items(), key=lambda kv: -kv[1])
    shown, rest = ranked[:CHART_MAX_CLASSES], ranked[CHART_MAX_CLASSES:]
    if rest:
        shown.append((f"{len(rest)} other classes", sum(v for _, v in rest)))
    shares = [100.0 * v / total if total else 0.0 for _, v in shown]
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1
    names = [name if len(name) <= 24 else name[:23] + "~" for name, _ in shown]
    label_w = max(cv2.getTextSize(n, font, scale, thick)[0][0] for n in names) + 16
    bar_w, row_h, top, left = 360, 22, 36, label_w
    width, height = left + bar_w + 70, top + row_h * len(shown) + 30
    image = np.full((height, width, 3), 255, np.uint8)
    title = f"class shares over {total:,} pixels"
    cv2.putText(image, title, (8, 22), font, 0.55, (0, 0, 0), thick, cv2.LINE_AA)
    longest = max([*shares, 1e-9])
    for row, ((name, _), label, share) in enumerate(zip(shown, names, shares)):
        y = top + row * row_h
        (tw, th), _ = cv2.getTextSize(label, font, scale, thick)
        cv2.putText(image, label, (left - 8 - tw, y + (row_h + th) // 2), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
        r, g, b = colours.get(name, (153, 153, 153))
        x1 = left + max(1, round(bar_w * share / longest))
        cv2.rectangle(image, (left, y + 3), (x1, y + row_h - 4), (b, g, r), cv2.FILLED)
        cv2.rectangle(image, (left, y + 3), (x1, y + row_h - 4), (0, 0, 0), 1)
        cv2.putText(image, f"{share:.1f}%", (x1 + 6, y + (row_h + th) // 2), font, scale, (0, 0, 0), thick,
                    cv2.LINE_AA)
    cv2.line(image, (left, top - 2), (left, top + row_h * len(shown)), (0, 0, 0), 1)
    cv2.putText(image, "share of predicted pixels (%)", (left, height - 10), font, scale, (80, 80, 80), thick,
                cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("OpenCV could not encode the class-share chart")
    return buf.tobytes()
