"""All uploads together are bounded (``--max-uploads-disk-mb``): a security tester filled the state volume, which
also holds the job database, with upload after upload, each within ``--max-upload-mb``; only the 24 h TTL ever
freed them. The budget counts the committed uploads (from the disk after a restart) plus the uploads in progress,
charges each chunk before it is written, and frees the bytes when an upload is aborted, swept or deleted with its
job; a chunk past it is refused with ``Overloaded`` (RESOURCE_EXHAUSTED), naming the flag and the bytes in use.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from segsvc import errors
from segsvc.errors import InvalidArgument, Overloaded
from segsvc.jobs.batch import JobRequest, JobRunner, JobsConfig
from segsvc.jobs.staging import StagingArea, UploadLimits
from segsvc.jobs.store import JobStore
from tests.jobs.conftest import run_to_end
from tests.jobs.test_batch_runner import _Clock, _Service, clock  # noqa: F401  (a fixture)
from tests.server.conftest import encode, make_image, publish, start_server  # noqa: F401  (a fixture)

KIB = 1 << 10
DAY_S = 24 * 3600.0


def _commit(staging: StagingArea, size: int, name: str = "a.png", age_s: float = 0.0) -> str:
    """Commit an upload of one file of ``size`` bytes; with ``age_s`` it looks committed that long ago."""
    up = staging.open()
    up.write(name, 0, os.urandom(size), last=True)
    upload_id = up.commit().upload_id
    if age_s:
        stamp = time.time() - age_s
        os.utime(staging.root / upload_id, (stamp, stamp))
    return upload_id


def _files(staging: StagingArea) -> list[tuple[str, int]]:
    """Every file under the staging root, with its size."""
    return sorted((p.relative_to(staging.root).as_posix(), p.stat().st_size)
                  for p in staging.root.rglob("*") if p.is_file())


def _disk_bytes(staging: StagingArea) -> int:
    return sum(size for _name, size in _files(staging))


# -- the staging area: committed plus in progress, charged before writing --------------------------------------
def test_committed_uploads_count_against_the_budget_and_a_chunk_past_it_is_refused_unwritten(tmp_path: Path) -> None:
    staging = StagingArea(tmp_path / "uploads", max_disk_bytes=10 * KIB)
    _commit(staging, 4 * KIB, "a.png")
    _commit(staging, 4 * KIB, "b.png")  # each upload is far within its own limits ...
    assert staging.bytes_held() == (8 * KIB, 0)
    up = staging.open()
    up.write("c.png", 0, os.urandom(KIB), last=False)
    before = _files(staging)
    with pytest.raises(Overloaded) as refused:  # ... but together they would pass the folder's budget
        up.write("c.png", KIB, os.urandom(2 * KIB), last=True)
    message = str(refused.value)
    assert "--max-uploads-disk-mb" in message and f"{10 * KIB} bytes" in message, message
    assert f"{8 * KIB} bytes of committed uploads and {KIB} of uploads in progress" in message, message
    assert "delete jobs" in message and "--upload-ttl-hours" in message, message
    assert _files(staging) == before  # charged before written: not a byte of the refused chunk is on disk
    assert _disk_bytes(staging) <= staging.max_disk_bytes
    up.write("c.png", KIB, os.urandom(KIB), last=True)  # what still fits is taken: exactly the budget
    assert staging.bytes_held() == (8 * KIB, 2 * KIB)
    up.commit()
    assert staging.bytes_held() == (10 * KIB, 0) and _disk_bytes(staging) == 10 * KIB
    with pytest.raises(Overloaded, match="--max-uploads-disk-mb"):  # full: a new upload is refused at once
        staging.open()
    assert sorted(p.name for p in staging.root.iterdir() if p.name.endswith(".partial")) == []


def test_uploads_in_progress_count_together_and_an_abort_frees_its_bytes(tmp_path: Path) -> None:
    staging = StagingArea(tmp_path / "uploads", max_disk_bytes=6 * KIB)
    first, second = staging.open(), staging.open()
    first.write("a.png", 0, os.urandom(3 * KIB), last=False)
    second.write("b.png", 0, os.urandom(3 * KIB), last=False)
    assert staging.bytes_held() == (0, 6 * KIB)
    with pytest.raises(Overloaded, match=f"0 bytes of committed uploads and {6 * KIB} of uploads in progress"):
        first.write("a.png", 3 * KIB, b"x", last=True)
    second.abort()  # a client that went away (or broke a limit): its bytes are free again
    assert staging.bytes_held() == (0, 3 * KIB)
    first.write("a.png", 3 * KIB, os.urandom(3 * KIB), last=True)
    first.commit()
    assert staging.bytes_held() == (6 * KIB, 0) and _disk_bytes(staging) == 6 * KIB


def test_uploads_racing_from_several_threads_never_pass_the_budget(tmp_path: Path) -> None:
    staging = StagingArea(tmp_path / "uploads", max_disk_bytes=20 * KIB)
    start = threading.Barrier(6)
    refused: list[int] = []

    def client(n: int) -> None:
        up = staging.open()
        start.wait(timeout=60)
        offset = 0
        try:
            while True:
                up.write("a.png", offset, os.urandom(KIB), last=False)
                offset += KIB
        except Overloaded:
            refused.append(n)
        up.write("a.png", offset, b"", last=True)
        up.commit()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(refused) == list(range(6))  # each wrote until the folder was full ...
    assert staging.bytes_held() == (20 * KIB, 0) and _disk_bytes(staging) == 20 * KIB  # ... and not a byte more


def test_a_failed_write_is_not_left_charged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from segsvc.jobs import staging as staging_module

    staging = StagingArea(tmp_path / "uploads", max_disk_bytes=4 * KIB)
    up = staging.open()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(staging_module, "_write_at", disk_full)
    with pytest.raises(OSError):
        up.write("a.png", 0, os.urandom(3 * KIB), last=True)
    assert staging.bytes_held() == (0, 0)
    up.abort()
    assert staging.bytes_held() == (0, 0)


def test_deleting_an_upload_frees_its_bytes_once_its_files_are_gone(tmp_path: Path) -> None:
    staging = StagingArea(tmp_path / "uploads", max_disk_bytes=8 * KIB)
    upload_id = _commit(staging, 6 * KIB)
    staging.detach(upload_id)  # renamed away, but its files are still on the disk: still counted
    assert staging.bytes_held() == (6 * KIB, 0)
    staging.purge(upload_id)
    assert staging.bytes_held() == (0, 0)
    _commit(staging, 8 * KIB)  # the whole budget is there again


def test_a_restart_counts_the_uploads_earlier_runs_left(tmp_path: Path) -> None:
    """The count lives in memory; a restarted server must not start from zero (else each restart grants a new
    budget)."""
    before = StagingArea(tmp_path / "uploads", max_disk_bytes=16 * KIB)
    _commit(before, 5 * KIB, "a.png")
    _commit(before, 3 * KIB, "b.png")
    half = before.open()
    half.write("c.png", 0, os.urandom(2 * KIB), last=False)  # the server dies: a leftover for clean_partial
    detached = _commit(before, 4 * KIB, "d.png")
    before.detach(detached)  # killed between the rename and the removal: cleaned at the start too

    after = StagingArea(tmp_path / "uploads", max_disk_bytes=10 * KIB)
    assert after.clean_partial() == 2
    assert after.bytes_held() == (8 * KIB, 0)
    up = after.open()
    with pytest.raises(Overloaded, match=f"{8 * KIB} bytes of committed uploads"):
        up.write("e.png", 0, os.urandom(3 * KIB), last=True)
    up.write("e.png", 0, os.urandom(2 * KIB), last=True)
    up.commit()
    # without clean_partial (a StagingArea used alone), the first upload counts the disk itself
    alone = StagingArea(tmp_path / "uploads", max_disk_bytes=10 * KIB)
    with pytest.raises(Overloaded, match=f"{10 * KIB} bytes of committed uploads and 0 of uploads in progress"):
        alone.open()


def test_the_budget_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="max_disk_bytes"):
        StagingArea(tmp_path / "uploads", max_disk_bytes=0)
    with pytest.raises(InvalidArgument, match="max_uploads_disk_bytes"):
        JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", max_uploads_disk_bytes=0)


# -- the runner: its staging area has the configured budget; a swept or deleted upload frees it ------------------
def _config(tmp_path: Path, **overrides: object) -> JobsConfig:
    return JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", **overrides)  # type: ignore[arg-type]


def _image_upload(staging: StagingArea, age_s: float = 0.0) -> tuple[str, int]:
    """Commit an upload of two small images; its id and bytes."""
    up = staging.open()
    for i, name in enumerate(("a.png", "b.png")):
        up.write(name, 0, encode(make_image(8, 8, seed=i)), last=True)
    summary = up.commit()
    if age_s:
        stamp = time.time() - age_s
        os.utime(staging.root / summary.upload_id, (stamp, stamp))
    return summary.upload_id, summary.total_bytes


def test_the_runner_s_uploads_are_bounded_and_freed_by_job_deletion_and_by_the_sweep(tmp_path: Path,
                                                                                     clock: _Clock) -> None:
    store = JobStore(tmp_path / "state" / "jobs.sqlite")

    async def main() -> None:
        runner = JobRunner(store, _Service(clock), _config(tmp_path, max_uploads_disk_bytes=64 * KIB,
                                                           upload_ttl_s=DAY_S))  # type: ignore[arg-type]
        assert runner.staging.max_disk_bytes == 64 * KIB
        used, used_bytes = _image_upload(runner.staging)
        stale, stale_bytes = _image_upload(runner.staging, age_s=2 * DAY_S)
        assert runner.staging.bytes_held() == (used_bytes + stale_bytes, 0)
        job = await runner.submit(JobRequest(model="m", upload_id=used))
        assert (await run_to_end(runner, job.id)).state == "SUCCEEDED"  # start() sweeps the stale upload
        assert runner.staging.bytes_held() == (used_bytes, 0)
        await runner.delete(job.id, delete_outputs=True)  # its upload goes with it
        assert runner.staging.bytes_held() == (0, 0)

    asyncio.run(main())
    store.close()


# -- the flag --------------------------------------------------------------------------------------------------
def test_the_serve_flag_reaches_the_jobs_config(serve_config, tmp_path: Path, capsys) -> None:
    status, config = serve_config("--port", "0", "--state-dir", str(tmp_path / "state"),
                                  "--max-uploads-disk-mb", "3")
    assert status == 0 and config.jobs.max_uploads_disk_bytes == 3 << 20
    status, config = serve_config("--port", "0", "--state-dir", str(tmp_path / "state"))
    assert status == 0 and config.jobs.max_uploads_disk_bytes == 8192 << 20
    for bad in ("0", "-1", "nan", "inf"):
        status, config = serve_config("--port", "0", "--state-dir", str(tmp_path / "state"),
                                      "--max-uploads-disk-mb", bad)
        err = capsys.readouterr().err
        assert status == 2 and config is None and "--max-uploads-disk-mb" in err and f"got {bad}" in err, err
    with pytest.raises(SystemExit):
        from segsvc.cli import main

        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max-uploads-disk-mb" in help_text and "job database" in help_text


# -- end to end: the client's upload through a real server ----------------------------------------------------
def test_a_server_refuses_an_upload_past_the_budget_with_resource_exhausted(start_server,  # noqa: F811
                                                                            tmp_path: Path) -> None:
    publish(tmp_path / "repo", "tiny", seed=11)
    local = tmp_path / "local"
    local.mkdir()
    (local / "one.png").write_bytes(b"\x89PNG" + os.urandom(20 * KIB))
    size = (local / "one.png").stat().st_size
    server = start_server(tmp_path / "repo", jobs=_config(
        tmp_path, upload=UploadLimits(max_file_bytes=1 << 20, max_total_bytes=1 << 20),
        max_uploads_disk_bytes=size * 3 // 2))
    uploads = tmp_path / "state" / "uploads"
    with server.client() as c:
        first = c.upload_images([local])  # within every limit
        with pytest.raises(errors.Overloaded) as refused:  # the same again: each is small, both are too much
            c.upload_images([local])
        message = str(refused.value)
        assert "--max-uploads-disk-mb" in message and f"{size} bytes of committed uploads" in message, message
        assert sorted(p.name for p in uploads.iterdir()) == [first]  # the refused upload left nothing
