"""``segsvc.model_names``: the model name and ``NAME:VERSION`` rules, with no torch, under their old names too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from segsvc.errors import InvalidArgument
from segsvc.model_names import VERSION_NAME, check_name, parse_model_ref

ROOT = Path(__file__).resolve().parents[1]


def test_the_rules_load_no_torch() -> None:
    code = ("import sys, segsvc.model_names as n\n"
            "print(n.parse_model_ref('unet-3.v2:12'), [m for m in ('torch', 'segsvc.models', 'segsvc.inference')"
            " if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "('unet-3.v2', 12) []", out.stdout


def test_the_old_import_paths_are_the_same_objects() -> None:
    from segsvc.inference import repository
    from segsvc.models import artifact

    assert repository.parse_model_ref is parse_model_ref
    assert artifact.check_name is check_name and repository.check_name is check_name
    assert artifact.VERSION_NAME is VERSION_NAME


@pytest.mark.parametrize("ref, expected", [("m", ("m", None)), ("m:3", ("m", 3)), ("m:10", ("m", 10)),
                                           ("m:" + "9" * 18, ("m", 10**18 - 1))])
def test_a_reference_is_a_name_and_maybe_a_version(ref: str, expected: tuple[str, int | None]) -> None:
    assert parse_model_ref(ref) == expected


@pytest.mark.parametrize("ref", ["m:0", "m:07", "m:+7", "m:\u00b2", "m:", "m:" + "1" * 19])
def test_a_version_that_is_not_a_version_directory_name_is_refused(ref: str) -> None:
    with pytest.raises(InvalidArgument, match="the version after ':' must be a positive integer"):
        parse_model_ref(ref)


@pytest.mark.parametrize("ref", ["", ":3", ".hidden:3", "a/b:3", "x" * 129])
def test_a_bad_name_is_refused_with_or_without_a_version(ref: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid model name"):
        parse_model_ref(ref)
    assert check_name("a.b-c_9") == "a.b-c_9"
