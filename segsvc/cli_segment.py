"""What ``segsvc segment`` names each input's outputs, and the record that keeps a run from overwriting another
input's.

An input's outputs are ``<stem>_mask.png`` (``_color.png``, ``_overlay.png``) under ``--out``, its stem being
its name (its path under the folder given, or its own name) without the suffix; when another input of the run
has the same stem (``x.jpg`` and ``x.png``), or its stem is another input's whole name, it keeps its suffix
(``x.jpg_mask.png``, ``x.png_mask.png``), whatever order the inputs come in. Inputs whose whole names are the
same (``dayA/img.png`` and ``dayB/img.png``, from two folders or given as files) get the name of the folder they
were found in, or their own folder's, in front (``dayA/img_mask.png``); if that is the same too, they are refused.
The same file given twice is segmented once.

Names still depend on the run (``x.png`` alone writes ``x_mask.png``), so ``--out`` keeps a record,
``RECORD``, of the input each stem's outputs were written for. A run whose outputs would replace files of
another input, or files the record does not know, is refused before anything is sent; a run of the same input
again replaces its own. The record is written, with this run's stems, before the first image is sent.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Sequence

from segsvc.errors import InvalidArgument

RECORD = ".segsvc-segment.json"  # {stem: the resolved path of the input its outputs were written for}


def output_stems(named: Sequence[tuple[Path, PurePosixPath]]) -> tuple[list[Path], list[str]]:
    """The inputs (the same file given twice kept once) and each one's output stem, by the rule above.

    Raises:
        InvalidArgument: two different files with the same name.
    """
    files: list[Path] = []
    names: list[PurePosixPath] = []
    seen: dict[Path, PurePosixPath] = {}
    for path, name in named:
        real = path.resolve()
        if real in seen:
            continue
        seen[real] = name
        files.append(path)
        names.append(name)
    repeated = Counter(name.as_posix() for name in names)
    names = [_with_folder(path, name) if repeated[name.as_posix()] > 1 else name for path, name in zip(files, names)]
    by_name: dict[str, Path] = {}
    for path, name in zip(files, names):
        other = by_name.setdefault(name.as_posix(), path)
        if other != path:
            raise InvalidArgument(f"{other} and {path} have the same name, {name}: their outputs would replace "
                                  "each other; segment them into different --out folders")
    stems = [name.with_suffix("").as_posix() for name in names]
    shared = Counter(stems)
    return files, [stem if shared[stem] == 1 and stem not in by_name else name.as_posix()
                   for stem, name in zip(stems, names)]


def _with_folder(path: Path, name: PurePosixPath) -> PurePosixPath:
    """``name`` with the name of the folder it was found in (or the file's own folder) in front: two folders given
    in one run that hold files of the same name (``dayA/img001.png``, ``dayB/img001.png``) keep them apart."""
    parts = path.resolve().parts
    return PurePosixPath(parts[-len(name.parts) - 1]) / name if len(parts) > len(name.parts) else name


def _read_record(out: Path) -> dict[str, str]:
    try:
        record = json.loads((out / RECORD).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read {out / RECORD}, the record of which input each output in --out was "
                              f"written for: {exc}; delete it only if --out holds no outputs") from None
    if not isinstance(record, dict) or not all(isinstance(v, str) for v in record.values()):
        raise InvalidArgument(f"{out / RECORD} is not a record of segsvc segment's outputs")
    return record


def claim_outputs(out: Path, files: Sequence[Path], stems: Sequence[str]) -> None:
    """Record that ``stems`` are written for ``files``, unless one would replace another input's outputs.

    Raises:
        InvalidArgument: ``<stem>_mask.png`` exists and was written for another input, or for none the record
            knows (before this rule, or by hand); it names both, and how many more there are.
    """
    from segsvc.files import write_atomic

    record = _read_record(out)
    clashes = []
    for path, stem in zip(files, stems):
        source = str(path.resolve())
        if (out / f"{stem}_mask.png").exists() and record.get(stem) != source:
            clashes.append((path, stem, record.get(stem)))
        record[stem] = source
    if clashes:
        path, stem, owner = clashes[0]
        whose = f"the outputs of {owner}" if owner else "outputs this record does not know"
        more = f" (and {len(clashes) - 1} more inputs would too)" if len(clashes) > 1 else ""
        raise InvalidArgument(f"{path} would overwrite {out / (stem + '_mask.png')}, {whose}{more}; nothing was "
                              "sent: segment into another --out, or move those files away")
    write_atomic(out / RECORD, json.dumps(record, indent=0, sort_keys=True).encode())
