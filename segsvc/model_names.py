"""How models and their versions are named: ``check_name``, ``VERSION_NAME`` and ``parse_model_ref``.

Pure string rules, with no torch: a client command (``segsvc jobs submit --model NAME:V``, ``segsvc segment
--model``) checks a reference before it sends it, and a client install may not have torch at all. The model
artifact (``segsvc.models.artifact``) and the repository (``segsvc.inference.repository``) use these same
rules and still export them under their old names. This module lives outside ``segsvc.models``, whose package
imports the architecture registry (torch).
"""

from __future__ import annotations

import re

from segsvc.errors import InvalidArgument

# A version directory's name, as the repository reads it: "7", never "007", "+7" or "²" (``str.isdigit`` takes
# "²", whose ``int`` raises), and at most 18 digits (a version past them would be published unseen).
VERSION_NAME = re.compile(r"[1-9][0-9]{0,17}")


def check_name(name: str) -> str:
    """Model names become directory names: letters, digits, '-', '_' and '.' only, at most 128 bytes in UTF-8
    (a file system's name limit is 255 bytes: 128 CJK characters, 384 bytes, failed there as an OSError)."""
    if (not name or len(name.encode("utf-8", "surrogatepass")) > 128 or name.startswith(".")
            or not all(c.isalnum() or c in "-_." for c in name)):
        shown = f"{name[:64]!r}..." if len(name) > 64 else repr(name)  # a manifest's name may be megabytes
        raise InvalidArgument(
            f"invalid model name {shown}: use 1-128 letters, digits, '-', '_' or '.' (128 bytes in UTF-8), "
            "not starting with '.'"
        )
    return name


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """``"name"`` -> (name, None); ``"name:3"`` -> (name, 3). The version is spelt as version directories are:
    ASCII digits without leading zeros (``str.isdigit`` would take ``"²"`` and ``"٣"``)."""
    name, sep, version = ref.partition(":")
    if not sep:
        return check_name(name), None
    if not VERSION_NAME.fullmatch(version):
        raise InvalidArgument(f"model reference {ref!r}: the version after ':' must be a positive integer")
    return check_name(name), int(version)
