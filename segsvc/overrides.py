"""Dotted recipe overrides, ``a.b=value``: the value parsed as YAML and set into nested mappings.

One implementation for the trainer (``training/config.py``, which raises its
``ConfigError``) and for the service's check of what a training request sets
(``segsvc/jobs/trainspec.py``): both must read an override the same way.
"""

from __future__ import annotations

from typing import Any

import yaml

from segsvc.errors import InvalidArgument


def parse_override(text: str, error: type[InvalidArgument] = InvalidArgument) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", yaml-parsed value)``."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise error(f"override {text[:80]!r} must look like key.subkey=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise error(f"override {text[:80]!r}: value is not valid YAML ({str(exc)[:200]})") from None
    return key, value


def apply_override(data: dict[str, Any], key: str, value: Any, error: type[InvalidArgument] = InvalidArgument
                   ) -> None:
    """Set a dotted ``key`` inside nested dicts, creating intermediate mappings."""
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise error(f"cannot set {key!r}: {'.'.join(parts[: i + 1])!r} is not a mapping")
        node = child
    node[parts[-1]] = value
