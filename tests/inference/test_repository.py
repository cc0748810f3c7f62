"""ModelRepository and ModelManager on a repository that is not tidy: odd root entries, symlinks,
corrupt or half-copied versions, manifests that name another version."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from segsvc.errors import ArtifactError, InvalidArgument, PathOutsideRoot, UnknownModel, UnknownVersion
from segsvc.inference.batcher import BatchingConfig
from segsvc.inference.engine import EngineConfig
from segsvc.inference.manager import ManagerConfig, ModelManager, VersionState
from segsvc.inference.repository import ModelRepository, Skipped, parse_model_ref
from segsvc.models.artifact import MANIFEST_FILE, WEIGHTS_FILE
from tests.server.conftest import publish


def no_abs_path(message: str, *roots: Path) -> bool:
    return all(str(r) not in message and str(r.resolve()) not in message for r in roots)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    publish(root, "good", seed=1)
    return root


def manager_for(root: Path) -> ModelManager:
    config = ManagerConfig(engine=EngineConfig(device="cpu", warmup=False),
                           batching=BatchingConfig(max_batch_size=2, max_delay_s=0.001))
    return ModelManager(ModelRepository(root), config)


def run_with(root: Path, body):
    """Start a manager on ``root``, run ``await body(manager)``, stop it."""
    async def main():
        manager = manager_for(root)
        await manager.start()
        try:
            return await body(manager)
        finally:
            await manager.stop()
    return asyncio.run(main())


# -- model references -------------------------------------------------------------------
@pytest.mark.parametrize("ref", ["m:\u00b2", "m:\u0663", "m:\uff13", "m:0", "m:07", "m:+7", "m: 7", "m:", "m:7x",
                                 "m:1234567890123456789"])
def test_a_version_that_is_not_ascii_digits_is_an_invalid_argument(ref):
    """str.isdigit takes "²" (int() then raises ValueError: INTERNAL over gRPC) and "٣" (read as version 3)."""
    with pytest.raises(InvalidArgument, match="the version after ':' must be a positive integer"):
        parse_model_ref(ref)


def test_a_model_reference_with_or_without_a_version():
    assert parse_model_ref("m") == ("m", None)
    assert parse_model_ref("m:3") == ("m", 3) and parse_model_ref("m:10") == ("m", 10)


# -- scanning -------------------------------------------------------------------------
def test_odd_root_and_version_entries_are_skipped_listed_and_logged_once(repo, tmp_path, caplog):
    (repo / "lost+found").mkdir()
    (repo / "README.txt").write_text("not a model")
    (repo / "dangling").symlink_to("missing")  # inside the root, to nothing
    outside = tmp_path / "elsewhere"
    publish(outside, "evil", seed=2)
    (repo / "evil").symlink_to(outside / "evil")  # a model directory out of the root
    (repo / ".hidden").mkdir()  # hidden: ignored silently
    (repo / "good" / "007").mkdir()
    (repo / "good" / "v2").mkdir()
    (repo / "good" / ".tmp-2-abc").mkdir()  # a version being written: ignored silently
    repository = ModelRepository(repo)
    with caplog.at_level(logging.WARNING, logger="segsvc.inference.repository"):
        assert repository.list_models() == {"good": [1]}
        assert repository.list_models() == {"good": [1]}  # a second scan logs nothing new
    skipped = {s.path: s.reason for s in repository.skipped}
    assert set(skipped) == {"lost+found", "README.txt", "dangling", "evil", "good/007", "good/v2"}
    assert "not a valid model name" in skipped["lost+found"]
    assert skipped["README.txt"] == "not a directory"
    assert skipped["dangling"] == "a broken symlink"
    assert "outside the repository root" in skipped["evil"]
    assert "not a version number" in skipped["good/007"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 6, warnings
    assert all(no_abs_path(w, tmp_path) for w in warnings)
    with pytest.raises(PathOutsideRoot, match="outside the repository root"):
        repository.scan("evil")
    # the root entry goes away -> so does its report
    (repo / "README.txt").unlink()
    repository.list_models()
    assert Skipped("README.txt", "not a directory") not in repository.skipped


def test_unknown_model_message_names_no_server_path(repo, tmp_path):
    with pytest.raises(UnknownModel) as info:
        ModelRepository(repo).versions("absent")
    assert "good" in str(info.value) and no_abs_path(str(info.value), tmp_path)


def test_a_version_symlinked_out_of_the_root_is_refused_by_relative_name(repo, tmp_path):
    outside = publish(tmp_path / "outside", "good", seed=3, version=2)
    (repo / "good" / "2").symlink_to(outside, target_is_directory=True)
    repository = ModelRepository(repo)
    [v1, v2] = repository.scan("good")
    assert v1.problem == "" and v2.version == 2
    assert v2.problem == "good/2 is a symlink that leads outside the repository root; refused"
    assert repository.versions("good") == [1]
    with pytest.raises(PathOutsideRoot, match="^good/2 is a symlink"):
        repository.load("good", 2)


def test_a_symlink_that_stays_inside_the_root_is_followed(repo):
    store = publish(repo / ".store", "good", seed=4, version=2)  # hidden folder inside the root
    (repo / "good" / "2").symlink_to(store, target_is_directory=True)
    repository = ModelRepository(repo)
    assert repository.versions("good") == [1, 2]
    _, manifest = repository.load("good", 2)
    assert manifest.version == 2


def test_a_weights_file_symlinked_out_of_the_root_is_refused(repo, tmp_path):
    v2 = publish(repo, "good", seed=5)
    moved = tmp_path / "weights.safetensors"
    shutil.move(v2 / WEIGHTS_FILE, moved)
    (v2 / WEIGHTS_FILE).symlink_to(moved)
    repository = ModelRepository(repo)
    assert repository.scan("good")[1].problem.startswith("good/2/weights.safetensors is a symlink")
    with pytest.raises(PathOutsideRoot, match="good/2/weights.safetensors"):
        repository.load("good", 2)


def test_a_manifest_naming_another_version_is_refused(repo, tmp_path):
    shutil.copytree(repo / "good" / "1", repo / "good" / "2")  # copied without a new manifest
    with pytest.raises(ArtifactError, match="describes model 'good' version 1, not 'good' version 2") as info:
        ModelRepository(repo).load("good", 2)
    assert no_abs_path(str(info.value), tmp_path)


def test_artifact_errors_name_paths_relative_to_the_root(repo, tmp_path):
    (repo / "good" / "1" / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="^good/1/weights.safetensors is corrupt") as info:
        ModelRepository(repo).load("good")
    assert no_abs_path(str(info.value), tmp_path)


def test_the_fingerprint_changes_when_a_file_arrives_or_grows(repo):
    repository = ModelRepository(repo)
    v1 = repo / "good" / "1"
    before = repository.scan("good")[0].fingerprint
    weights = (v1 / WEIGHTS_FILE).read_bytes()
    (v1 / WEIGHTS_FILE).unlink()
    without = repository.scan("good")[0].fingerprint
    (v1 / WEIGHTS_FILE).write_bytes(weights[:10])
    partial = repository.scan("good")[0].fingerprint
    with open(v1 / WEIGHTS_FILE, "ab") as f:
        f.write(weights[10:])
    complete = repository.scan("good")[0].fingerprint
    assert len({before, without, partial, complete}) == 4


def finishes(fn: Callable[[], Any], fifos: tuple[Path, ...], timeout: float = 60.0) -> Any:
    """``fn()`` on a thread: still blocked after ``timeout`` (reading a FIFO), the test fails rather than hangs."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (re-raised on the test's thread)
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in fifos:  # a writer that goes away at once: the blocked reader sees end of file
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(10)
        pytest.fail(f"still blocked after {timeout:.0f} s: a FIFO in a version directory was read")
    if "error" in out:
        raise out["error"]
    return out.get("value")


def test_a_version_whose_manifest_or_weights_is_a_fifo_is_skipped_without_reading_it(repo, tmp_path):
    """Reading a FIFO blocks until something writes to it (its st_size is 0): such a version is no version."""
    fifos = []
    for version, name in ((2, MANIFEST_FILE), (4, WEIGHTS_FILE)):
        v = repo / "good" / str(version)
        v.mkdir()
        os.mkfifo(v / name)
        fifos.append(v / name)
    staged = publish(tmp_path / "staging", "good", seed=12, version=4)
    shutil.copy(staged / MANIFEST_FILE, repo / "good" / "4" / MANIFEST_FILE)
    os.mkfifo(repo / ".pipe")  # version 3's manifest: a symlink inside the root, to a FIFO
    fifos.append(repo / ".pipe")
    (repo / "good" / "3").mkdir()
    (repo / "good" / "3" / MANIFEST_FILE).symlink_to(repo / ".pipe")
    repository = ModelRepository(repo)

    def scan_and_load():
        return (repository.list_models(), repository.resolve_version("good"), repository.load("good")[1].version,
                {s.path: s.reason for s in repository.skipped})

    models, default, loaded, skipped = finishes(scan_and_load, tuple(fifos))
    assert models == {"good": [1]} and default == 1 and loaded == 1
    assert skipped == {"good/2": "manifest.json is a FIFO, not a regular file",
                       "good/3": "manifest.json is a FIFO, not a regular file",
                       "good/4": "weights.safetensors is a FIFO, not a regular file"}
    with pytest.raises(UnknownVersion, match=r"has no version 2; versions: \[1\]"):
        finishes(lambda: repository.read_manifest("good", 2), tuple(fifos))


def test_a_manifest_that_is_a_directory_is_skipped(repo):
    (repo / "good" / "2" / MANIFEST_FILE).mkdir(parents=True)
    repository = ModelRepository(repo)
    assert repository.versions("good") == [1]
    assert Skipped("good/2", "manifest.json is a directory, not a regular file") in repository.skipped


def test_the_manager_starts_and_serves_beside_a_version_whose_manifest_is_a_fifo(repo):
    (repo / "good" / "2").mkdir()
    os.mkfifo(repo / "good" / "2" / MANIFEST_FILE)

    async def body(manager: ModelManager):
        return manager.ready, manager.resolve("good", None).version, manager.failed_versions()

    ready, served, failed = finishes(lambda: run_with(repo, body), (repo / "good" / "2" / MANIFEST_FILE,))
    assert ready and served == 1 and failed == []


# -- the manager ------------------------------------------------------------------------
def test_load_falls_back_to_the_newest_version_that_loads_and_records_why(repo, tmp_path):
    publish(repo, "good", seed=6)
    v3 = publish(repo, "good", seed=7)
    (v3 / WEIGHTS_FILE).write_bytes(b"garbage")
    (repo / "good" / "2" / MANIFEST_FILE).write_text("{not json")

    async def body(manager: ModelManager):
        lm = manager.resolve("good", None)
        status = await manager.describe("good")
        return lm.version, status, manager.failed_versions(), manager.model_health()

    served, status, failed, health = run_with(repo, body)
    assert served == 1
    states = {s.version: s for s in status.version_status}
    assert states[1].state == VersionState.READY
    assert states[2].state == VersionState.FAILED and "good/2/manifest.json" in states[2].reason
    assert states[3].state == VersionState.FAILED and states[3].reason.startswith("good/3/weights.safetensors is corrupt")
    assert [(n, v) for n, v, _ in failed] == [("good", 2), ("good", 3)]
    assert all(no_abs_path(s.reason, tmp_path) for s in status.version_status)
    assert health == {"good": True}


def test_a_model_with_no_loadable_version_is_reported_not_serving(repo):
    bad = publish(repo, "bad", seed=8)
    (bad / WEIGHTS_FILE).write_bytes(b"garbage")

    async def body(manager: ModelManager):
        with pytest.raises(ArtifactError, match="no version of model 'bad' loads: version 1: bad/1/weights"):
            await manager.load("bad")
        return manager.model_health(), [s.name for s in await manager.describe_all()]

    health, listed = run_with(repo, body)
    assert health == {"bad": False, "good": True}
    assert listed == ["bad", "good"]


def test_a_manifest_first_copy_loads_once_its_weights_arrive(repo, tmp_path):
    staged = publish(tmp_path / "staging", "good", seed=9, version=2)
    target = repo / "good" / "2"

    async def body(manager: ModelManager):
        target.mkdir()
        shutil.copy(staged / MANIFEST_FILE, target / MANIFEST_FILE)  # manifest first: a non-atomic copy
        assert await manager.poll_once() == []
        first = manager.record.rows()
        assert [(n, v) for n, v, _ in first] == [("good", 2)] and "does not exist" in first[0][2]
        assert await manager.poll_once() == []  # files unchanged: not retried
        assert manager.record.rows() == first
        shutil.copy(staged / WEIGHTS_FILE, target / WEIGHTS_FILE)
        assert await manager.poll_once() == [("good", 2)]
        return manager.resolve("good", None).version, manager.failed_versions()

    served, failed = run_with(repo, body)
    assert served == 2 and failed == []


def test_a_failed_version_is_not_reloaded_until_its_files_change(repo, monkeypatch):
    v2 = publish(repo, "good", seed=10)
    (v2 / WEIGHTS_FILE).write_bytes(b"garbage")
    attempts: list[int] = []
    original = ModelRepository.load

    def counting(self, name, version=None, device="cpu"):
        attempts.append(version)
        return original(self, name, version, device)

    monkeypatch.setattr(ModelRepository, "load", counting)

    async def body(manager: ModelManager):
        for _ in range(3):
            await manager.poll_once()
        return list(attempts)

    assert run_with(repo, body) == [2, 1]  # start: 2 fails, 1 loads; the polls leave 2 alone


def test_numbered_load_of_a_refused_or_absent_version(repo, tmp_path):
    (repo / "good" / "2").symlink_to(tmp_path, target_is_directory=True)

    async def body(manager: ModelManager):
        with pytest.raises(PathOutsideRoot, match="^good/2 is a symlink"):
            await manager.load("good", 2)
        with pytest.raises(UnknownVersion):
            await manager.load("good", 5)
        return manager.failed_versions()

    assert [(n, v) for n, v, _ in run_with(repo, body)] == [("good", 2)]


def test_retain_and_release_still_pin_a_version(repo):
    publish(repo, "good", seed=11)

    async def body(manager: ModelManager):
        await manager.retain("good", 1)
        assert sorted(manager._models["good"]) == [1, 2]
        manager.release("good", 1)
        await asyncio.sleep(0)
        return sorted(manager._models["good"])

    assert run_with(repo, body) == [2]


def test_broken_root_symlink_loop_does_not_crash(repo):
    os.symlink("loop", repo / "loop")
    assert ModelRepository(repo).list_models() == {"good": [1]}


# -- the DEFAULT pointer file ------------------------------------------------------------
def test_an_oversized_default_pointer_is_a_logged_artifact_error_read_no_further_than_the_limit(repo, caplog,
                                                                                                monkeypatch):
    """DEFAULT was read whole (read_text): a pointer file of gigabytes, by accident or on purpose, took the server's
    memory, at every poll. A version number is a few bytes: a bigger file is refused, naming the file and the fix."""
    pointer = repo / "good" / "DEFAULT"
    pointer.write_text("1" + " " * (1 << 20) + "\n")  # would even parse as version 1 once stripped
    read_sizes: list[int] = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: read_sizes.append(n) or real_read(fd, n))
    repository = ModelRepository(repo)
    with caplog.at_level(logging.WARNING, logger="segsvc.inference.repository"):
        with pytest.raises(ArtifactError, match=r"^good/DEFAULT is larger than 64 bytes: a DEFAULT pointer holds one "
                                                r"version number; write it again with SetDefaultVersion"):
            repository.default_version("good")
    assert all(n <= 65 for n in read_sizes)  # never more than the limit (and one byte to see it is over)
    assert any("good/DEFAULT is larger than 64 bytes" in r.getMessage() for r in caplog.records)
    assert no_abs_path(caplog.text, repo)
    pointer.write_text("1\n")
    assert repository.default_version("good") == 1


def test_a_default_pointer_symlinked_out_of_the_root_is_refused(repo, tmp_path):
    """DEFAULT followed a symlink anywhere: a file outside the repository (another model store, /proc, a FIFO) was
    read and, if it held a number, served as the default."""
    outside = tmp_path / "outside"
    outside.write_text("1\n")
    pointer = repo / "good" / "DEFAULT"
    pointer.symlink_to(outside)
    repository = ModelRepository(repo)
    with pytest.raises(PathOutsideRoot, match="^good/DEFAULT is a symlink that leads outside the repository root; "
                                              "refused$"):
        repository.default_version("good")
    with pytest.raises(PathOutsideRoot):
        repository.resolve_version("good", None)
    pointer.unlink()  # a symlink that stays inside the root is followed, as for versions
    (repo / "good" / "pointer.txt").write_text("1\n")
    pointer.symlink_to(repo / "good" / "pointer.txt")
    assert repository.default_version("good") == 1 and repository.resolve_version("good", None) == 1


def test_a_default_pointer_that_is_a_fifo_or_a_directory_is_ignored_without_blocking(repo):
    """Reading a FIFO blocks until a writer comes: the pointer is opened without blocking and must be a file."""
    pointer = repo / "good" / "DEFAULT"
    os.mkfifo(pointer)
    assert ModelRepository(repo).default_version("good") is None
    pointer.unlink()
    pointer.mkdir()
    assert ModelRepository(repo).default_version("good") is None


def test_the_manager_serves_the_newest_version_beside_a_refused_default_pointer(repo, tmp_path, caplog):
    """A DEFAULT the repository refuses fails neither LoadModel nor the poller: it is logged, the newest is served."""
    publish(repo, "good", seed=12)
    (tmp_path / "outside").write_text("1\n")
    (repo / "good" / "DEFAULT").symlink_to(tmp_path / "outside")

    async def body(manager: ModelManager):
        await manager.load("good")
        await manager.poll_once()
        return manager.default_version("good"), sorted(manager._models["good"])

    with caplog.at_level(logging.ERROR, logger="segsvc.inference.manager"):
        assert run_with(repo, body) == (2, [2])
    assert any("good/DEFAULT is a symlink that leads outside" in r.getMessage() for r in caplog.records)
