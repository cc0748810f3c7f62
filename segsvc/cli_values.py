"""argparse ``type=`` functions for the command line's numeric flags.

A bad value is refused while the flags are parsed, so the error names the flag
and the value as the operator typed them (``argument --max-delay-ms: must be a
number >= 0, got -1``), not the configuration field it becomes, in its own unit
(``max_delay_s must be >= 0, got -0.001``). The configuration dataclasses keep
their own checks: they guard the Python API. Each function here only bounds a
value; what a valid value means (``0``: off, one per CPU, ...) stays where the
flag is defined. Nothing heavy is imported: ``segsvc --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

MIB = 1 << 20


def whole_number(least: int, most: int | None = None) -> Callable[[str], int]:
    """A type for a whole number in ``least..most`` (no upper bound when ``most`` is None)."""
    bound = f">= {least}" if most is None else f"in {least}..{most}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"must be a whole number {bound}, got {text}")
        return value

    parse.__name__ = "whole number"  # argparse names the type by it in its own messages
    return parse


positive_int = whole_number(1)
non_negative_int = whole_number(0)
port = whole_number(0, 65535)


def number(least: float, *, strict: bool = False, most: float | None = None,
           finite: bool = True) -> Callable[[str], float]:
    """A type for a number ``>= least`` (``> least`` when ``strict``), at most ``most``.

    NaN is always refused (it passes every ``<`` check of the configuration); infinity only when ``finite``,
    for the flags whose value becomes an integer or a deadline that cannot hold it.
    """
    low = f"{'(' if strict else '['}{least:g}"
    bound = (f"{'>' if strict else '>='} {least:g}" if most is None else f"in {low}, {most:g}]")
    kind = "a finite number" if finite else "a number"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if (math.isnan(value) or (finite and math.isinf(value)) or value < least or (strict and value == least)
                or (most is not None and value > most)):
            raise argparse.ArgumentTypeError(f"must be {kind} {bound}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


non_negative_float = number(0.0)
positive_float = number(0.0, strict=True, finite=False)  # a duration where infinity means "never"
fraction = number(0.0, most=1.0)


def mebibytes(text: str) -> float:
    """A size in MiB that is at least one byte and finite (it becomes ``int(value * MIB)`` bytes)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value * MIB) and value * MIB >= 1):  # 1e308 MiB is finite, its bytes are not
        raise argparse.ArgumentTypeError(f"must be a finite number of MiB > 0 (at least one byte), got {text}")
    return value


def tile_size(text: str) -> int:
    """A sliding-window tile side: ``0`` (no tiling) or ``MIN_TILE_SIZE..MAX_TILE_SIZE`` pixels."""
    from segsvc.config import MAX_TILE_SIZE, MIN_TILE_SIZE

    try:
        value = int(text)
    except ValueError:
        value = -1
    if value != 0 and not MIN_TILE_SIZE <= value <= MAX_TILE_SIZE:
        raise argparse.ArgumentTypeError(f"must be 0 (no tiling) or a whole number of pixels from {MIN_TILE_SIZE} "
                                         f"to {MAX_TILE_SIZE}, got {text}")
    return value


def tile_overlap(text: str) -> float:
    """``--overlap``: a fraction of the tile in ``[0, MAX_TILE_OVERLAP]``, as a manifest's tile overlap."""
    from segsvc.config import MAX_TILE_OVERLAP

    return number(0.0, most=MAX_TILE_OVERLAP)(text)


def check_overlap_flags(tile_size: int | None, overlap: float | None) -> None:
    """``--overlap`` with ``--tile-size``: a request sends an overlap only with an explicit tile size (the client's
    ``tile_overlap needs tile_size`` names its Python parameter, not the flag)."""
    from segsvc.errors import InvalidArgument

    if overlap is not None and tile_size is None:
        raise InvalidArgument("--overlap needs --tile-size: an overlap is sent only with an explicit tile size (the "
                              "model's is in its manifest: segsvc models show)")

