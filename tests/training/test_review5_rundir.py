"""Review 5: a run folder the trainer cannot write its ``run.lock`` in (read-only, EACCES, EROFS).

``hold_run_dir`` let the ``OSError`` of ``os.open`` (or of making the folder) through: the trainer died with a
traceback instead of naming the folder. The tests run as root, whom permissions do not stop, so ``os.open``
and ``os.mkdir`` are made to fail for the run folder only.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import pytest

from segsvc.errors import InvalidArgument
from training import rundir
from training.rundir import LOCK_FILE, hold_run_dir, release_run_dir
from training.train import cli


def _refuse(monkeypatch: pytest.MonkeyPatch, name: str, code: int, refused: str) -> None:
    """Make ``os.<name>`` fail with ``code`` for paths ending in ``refused`` (or, given ``.../``, inside it),
    as the kernel says it."""
    real = getattr(os, name)

    def refusing(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith(refused) or (refused.endswith("/") and refused in str(path)):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(rundir.os, name, refusing)


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_a_lock_file_that_cannot_be_opened_is_one_line_naming_the_folder(tmp_path: Path, code: int,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "runs" / "r"
    _refuse(monkeypatch, "open", code, LOCK_FILE)
    with pytest.raises(InvalidArgument) as info:
        hold_run_dir(run_dir)
    message = str(info.value)
    assert message == f"run directory {run_dir} is not writable: cannot open its {LOCK_FILE} ({os.strerror(code)})"
    assert info.value.__suppress_context__  # no OSError chained into a traceback
    monkeypatch.undo()
    hold_run_dir(run_dir)  # nothing was left held: the folder locks once it can be written
    release_run_dir(run_dir)


def test_a_run_folder_that_cannot_be_made_is_one_line_naming_it(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "runs" / "r"
    _refuse(monkeypatch, "mkdir", errno.EROFS, "/runs/r")
    with pytest.raises(InvalidArgument, match=f"^run directory {run_dir} is not writable: cannot make it "
                                              r"\(Read-only file system\)$"):
        hold_run_dir(run_dir)


def test_the_trainer_says_so_in_one_line(tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _refuse(monkeypatch, "open", errno.EROFS, LOCK_FILE)
    assert cli(["--config", str(tiny_recipe), "--set", "output.run_name=ro"]) == 2
    run_dir = tiny_recipe.parent / "runs" / "tiny" / "ro"
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"training: error: run directory {run_dir} is not writable: cannot open its {LOCK_FILE} "
                       "(Read-only file system)"), err
    assert not any("Traceback" in line for line in err), err


def test_a_runs_folder_without_room_for_a_new_run_says_so_in_one_line(tiny_recipe: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Without ``output.run_name`` the run's folder is claimed under ``runs/<recipe>`` (``fresh_run_name``)."""
    _refuse(monkeypatch, "mkdir", errno.EACCES, "/runs/tiny/")
    assert cli(["--config", str(tiny_recipe)]) == 2
    parent = tiny_recipe.parent / "runs" / "tiny"
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(f"training: error: runs folder {re.escape(str(parent))} is not writable: cannot make the run "
                        r"directory \d{8}-\d{6} in it \(Permission denied\)", err[-1]), err
    assert not any("Traceback" in line for line in err), err
