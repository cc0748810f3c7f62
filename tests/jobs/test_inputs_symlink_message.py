"""What a job submission refused for a symlink out of the data root says: one sentence naming the input and the link.

`segsvc jobs submit 'links/*'` over a link out printed "input 'links/*' reaches symlink 'links/link_out.png'
resolves outside the data root (a symlink leads out)": two messages glued together. Every wording ``confine``
builds is checked here, for the walk of a folder, a glob, a named path, and the runner's check before a read.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from segsvc.errors import InvalidArgument, PathOutsideRoot
from segsvc.jobs import batch
from segsvc.jobs.inputs import resolve_inputs


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """``data/links`` holds an image and ``link_out.png``, a link to an image outside; ``data/escape`` is a link
    to the outside folder."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "links").mkdir(parents=True)
    outside.mkdir()
    (data / "links" / "a.png").write_bytes(b"a")
    (outside / "secret.png").write_bytes(b"secret")
    os.symlink(outside / "secret.png", data / "links" / "link_out.png")
    os.symlink(outside, data / "escape")
    return data


def _refusal(root: Path, spec: str) -> str:
    with pytest.raises(PathOutsideRoot) as info:
        resolve_inputs(root, [spec])
    message = str(info.value)
    assert str(root.parent) not in message, message  # never the server's own paths
    return message


@pytest.mark.parametrize("spec", ["links/*", "links/*.png", "links", "./links", "links/**"])
def test_a_walk_that_reaches_a_link_out_names_the_input_and_the_link(root: Path, spec: str) -> None:
    assert _refusal(root, spec) == (f"input {spec!r} reaches the symlink 'links/link_out.png', which leads outside "
                                    "the data root")


def test_an_input_that_is_a_link_out_says_so(root: Path) -> None:
    assert _refusal(root, "links/link_out.png") == ("input 'links/link_out.png' is a symlink that leads outside the "
                                                    "data root")
    assert _refusal(root, "escape") == "input 'escape' is a symlink that leads outside the data root"


@pytest.mark.parametrize("spec", ["escape/secret.png", "escape/*.png", "escape/**"])
def test_an_input_through_a_link_out_names_the_link(root: Path, spec: str) -> None:
    assert _refusal(root, spec) == f"input {spec!r} reaches the symlink 'escape', which leads outside the data root"


def test_an_absolute_input_is_named_relative_to_the_root(root: Path) -> None:
    assert _refusal(root, str(root / "links" / "link_out.png")) == (
        "input 'links/link_out.png' is a symlink that leads outside the data root")


def test_a_path_that_leads_out_with_no_link_left_to_name_still_reads_as_a_sentence(root: Path, monkeypatch) -> None:
    """The tree changed between the resolve and the search for the link: no link on the path leads out now."""
    real = os.path.realpath
    outside = root.parent / "outside" / "secret.png"
    monkeypatch.setattr(os.path, "realpath",
                        lambda path, **kw: str(outside) if str(path).endswith("links/a.png") else real(path, **kw))
    assert _refusal(root, "links/a.png") == "input 'links/a.png' leads outside the data root through a symlink"


def test_a_link_that_changes_while_it_is_resolved_is_named(root: Path, monkeypatch) -> None:
    real = os.path.realpath

    def vanishing(path, **kw):  # type: ignore[no-untyped-def]  # the link went between its lstat and its readlink
        if str(path).endswith("link_out.png"):
            raise FileNotFoundError(2, "No such file or directory")
        return real(path, **kw)

    monkeypatch.setattr(os.path, "realpath", vanishing)
    with pytest.raises(InvalidArgument) as walked:
        resolve_inputs(root, ["links/*"])
    assert str(walked.value) == ("input 'links/*' reaches the symlink 'links/link_out.png', which changed while it "
                                 "was resolved: No such file or directory")
    with pytest.raises(InvalidArgument) as named:
        resolve_inputs(root, ["links/link_out.png"])
    assert str(named.value) == "input 'links/link_out.png' changed while it was resolved: No such file or directory"


def test_the_runner_check_before_a_read_names_the_link(root: Path) -> None:
    """An item whose file became a link out after the submission fails with the same sentence."""
    with pytest.raises(PathOutsideRoot) as info:
        batch._confined(root, "links/link_out.png")
    assert str(info.value) == "input 'links/link_out.png' is a symlink that leads outside the data root"
    with pytest.raises(PathOutsideRoot) as through:
        batch._confined(root, "escape/secret.png")
    assert str(through.value) == ("input 'escape/secret.png' reaches the symlink 'escape', which leads outside the "
                                  "data root")
