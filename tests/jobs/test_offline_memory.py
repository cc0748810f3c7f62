"""``segsvc batch`` bounds memory per image as the server's admission does: an image whose estimate is over the
budget (``--max-inflight-mb``) fails with its reason before its forward pass, and the run finishes; a forward pass
that still runs out of memory fails its image, not the run. No test here allocates more than a few MiB: budgets
are set below modest images instead."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from segsvc.cli import main
from segsvc.errors import ArtifactError
from segsvc.jobs import offline
from segsvc.jobs.offline import run_batch
from tests.server.conftest import encode, make_image, publish

MIB = 1 << 20
# What torch's CPU allocator raises when a tensor cannot be had (here under ulimit -v, from a QA run).
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 4096000000 bytes. Error code 12 (Cannot allocate memory)")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("memory")
    publish(root / "repo", "tiny", seed=1)
    return root / "repo"


def _inputs(folder: Path, small: int = 6, big: tuple[int, int] | None = (400, 400)) -> Path:
    """``small`` 32x32 PNGs and one ``big`` JPEG (named big.jpg), as the QA run had tiles and one large photo."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(small):
        (folder / f"tile{i}.png").write_bytes(encode(make_image(32, 32, seed=i)))
    if big is not None:
        (folder / "big.jpg").write_bytes(encode(make_image(*big, seed=99), ".jpg"))
    return folder


def _failures(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


def _records(out: Path) -> list[str]:
    return sorted(json.loads(line)["input"] for line in (out / "results.jsonl").read_text().splitlines())


@pytest.fixture
def passes(monkeypatch) -> list[list[tuple[int, int]]]:
    """The network input sizes of every forward pass the batch runs (the passes still run)."""
    seen: list[list[tuple[int, int]]] = []
    real = offline.ItemWorker.predict

    def spy(self, prepared):
        seen.append([p.size for p in prepared])
        return real(self, prepared)

    monkeypatch.setattr(offline.ItemWorker, "predict", spy)
    return seen


@pytest.fixture
def decoded(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the images the batch decodes."""
    shapes: list[tuple[int, ...]] = []
    real = offline.decode_image

    def spy(data, max_pixels):
        image = real(data, max_pixels)
        shapes.append(image.shape)
        return image

    monkeypatch.setattr(offline, "decode_image", spy)
    return shapes


# -- an image over the budget fails before it is decoded; the run completes -------------------------------
def test_an_image_over_the_budget_fails_with_its_reason_and_the_run_completes(repo, tmp_path, passes,
                                                                              decoded, capsys) -> None:
    inputs, out = _inputs(tmp_path / "in"), tmp_path / "out"
    code = main(["batch", str(inputs), "--model-repo", str(repo), "--model", "tiny", "--out", str(out),
                 "--device", "cpu", "--no-progress", "--max-inflight-mb", "16"])
    assert code == 1  # some inputs failed; no traceback, no crash
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"total": 7, "done": 6, "failed": 1, "skipped": 0}
    assert _records(out) == [f"tile{i}.png" for i in range(6)]
    [failure] = _failures(out)
    assert failure["input"] == "big.jpg"
    reason = failure["reason"]
    assert "the 400x400 image needs about" in reason and "untiled" in reason
    assert "over this batch's memory budget of 16 MiB (--max-inflight-mb 16)" in reason
    assert "--tile-size" in reason and "raise --max-inflight-mb" in reason
    assert "big.jpg: error: the 400x400 image needs about" in capsys.readouterr().err
    # Refused from its header: never decoded, never in a forward pass.
    assert (400, 400, 3) not in decoded
    assert all(size != (400, 400) for sizes in passes for size in sizes)

    # --resume has nothing left to do: the failure is final, not retried at every resume.
    passes.clear()
    assert main(["batch", "--resume", "--model-repo", str(repo), "--out", str(out), "--device", "cpu",
                 "--no-progress", "--max-inflight-mb", "16"]) == 1
    assert passes == []
    assert json.loads((out / "summary.json").read_text())["counts"]["failed"] == 1
    assert [f["input"] for f in _failures(out)] == ["big.jpg"]


def test_by_default_the_budget_is_a_share_of_the_memory_available(repo, tmp_path, monkeypatch, passes) -> None:
    """No flag: with 28 MiB available (faked), the 400x400 image (about 23 MiB for this model, untiled) is over
    the 21 MiB budget and fails before its pass; the small ones are segmented, and the run completes."""
    monkeypatch.setattr(offline, "available_memory", lambda device: (28 * MIB, "available"), raising=False)
    monkeypatch.setattr(offline, "_address_space_room", lambda proc: None)
    inputs, out = _inputs(tmp_path / "in", small=3), tmp_path / "out"
    summary = run_batch([str(inputs)], model_repo=repo, model="tiny", out=out, device="cpu")
    assert summary["counts"] == {"total": 4, "done": 3, "failed": 1, "skipped": 0}
    [failure] = _failures(out)
    assert failure["input"] == "big.jpg"
    assert "over this batch's memory budget of 21 MiB (--max-inflight-mb auto: 75% of the 28 MiB available)" \
        in failure["reason"]
    assert all(size != (400, 400) for sizes in passes for size in sizes)


def test_tiled_options_are_estimated_tiled_and_a_smaller_tile_that_fits_is_named(repo, tmp_path) -> None:
    """With --tile-size the estimate is of the tiled run; over the budget, the message names a smaller tile
    side whose estimate fits."""
    inputs = _inputs(tmp_path / "in", small=2, big=(600, 600))
    worker = offline.ItemWorker(str(repo), "tiny", 1, str(tmp_path / "probe"), offline.BatchOptions(tile_size=512),
                                device="cpu", max_inflight_mb=1024)
    tiled = worker.engine.cost(600, 600, worker.inference)
    small_tiles = worker.engine.cost(600, 600, offline.replace(worker.inference, tile_size=128))
    assert tiled.tiled and small_tiles.peak_bytes < tiled.peak_bytes
    budget_mb = -(-small_tiles.peak_bytes // MIB)  # 128-pixel tiles fit, 512-pixel ones do not
    assert tiled.peak_bytes > budget_mb * MIB
    summary = run_batch([str(inputs)], model_repo=repo, model="tiny", out=tmp_path / "out", device="cpu",
                        options=offline.BatchOptions(tile_size=512), max_inflight_mb=budget_mb)
    assert summary["counts"]["done"] == 2 and summary["counts"]["failed"] == 1
    [failure] = summary["failures"]
    assert failure["input"] == "big.jpg"
    assert "untiled" not in failure["reason"]
    assert "use smaller tiles: --tile-size 128 (about" in failure["reason"]


def test_an_image_too_large_even_tiled_says_so(repo, tmp_path) -> None:
    """Its full-size accumulators alone are over the budget: no tile size helps, and the message says so."""
    inputs = _inputs(tmp_path / "in", small=2)
    summary = run_batch([str(inputs)], model_repo=repo, model="tiny", out=tmp_path / "out", device="cpu",
                        max_inflight_mb=2)
    assert summary["counts"]["done"] == 2 and summary["counts"]["failed"] == 1
    reason = summary["failures"][0]["reason"]
    assert "over this batch's memory budget of 2 MiB" in reason and "even tiled" in reason
    assert "whatever the tile size" in reason and "downscale it" in reason


def test_the_budget_is_checked_again_on_the_decoded_image(repo, tmp_path, monkeypatch) -> None:
    """A header that understates the image (its pixels are what count) is caught once decoded, before the pass."""
    inputs = _inputs(tmp_path / "in", small=2)
    monkeypatch.setattr(offline, "image_header", lambda data: type("H", (), {"height": 8, "width": 8})())
    seen: list[int] = []
    real = offline.ItemWorker.predict
    monkeypatch.setattr(offline.ItemWorker, "predict",
                        lambda self, prepared: (seen.extend(p.pixels for p in prepared), real(self, prepared))[1])
    summary = run_batch([str(inputs)], model_repo=repo, model="tiny", out=tmp_path / "out", device="cpu",
                        max_inflight_mb=16)
    assert summary["counts"]["failed"] == 1 and "400x400" in summary["failures"][0]["reason"]
    assert max(seen) < 400 * 400


# -- a forward pass that runs out of memory fails its image, not the run ---------------------------------
def test_a_pass_out_of_memory_fails_that_image_and_the_run_finishes(repo, tmp_path, monkeypatch) -> None:
    """As in the QA run: torch's allocator fails on the large image; the other images are all segmented,
    the large one is listed with the error, and --resume does not run it again."""
    inputs, out = _inputs(tmp_path / "in", small=10), tmp_path / "out"
    calls: list[int] = []
    real = offline.ItemWorker.predict

    def allocator_fails_on_big(self, prepared):
        calls.append(len(prepared))
        if any(p.image_size == (400, 400) for p in prepared):
            raise RuntimeError(CPU_OOM)
        return real(self, prepared)

    monkeypatch.setattr(offline.ItemWorker, "predict", allocator_fails_on_big)
    summary = run_batch([str(inputs)], model_repo=repo, model="tiny", out=out, device="cpu")
    assert summary["counts"] == {"total": 11, "done": 10, "failed": 1, "skipped": 0}
    [failure] = _failures(out)
    assert failure["input"] == "big.jpg"
    assert "ran out of memory" in failure["reason"] and "can't allocate memory" in failure["reason"]
    assert "--max-inflight-mb" in failure["reason"]
    assert len(_records(out)) == 10
    calls.clear()
    summary = run_batch(None, model_repo=repo, model=None, out=out, device="cpu", resume=True)
    assert calls == [] and summary["counts"]["failed"] == 1


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")])
def test_a_batch_out_of_memory_is_retried_one_image_per_pass(repo, tmp_path, monkeypatch, error) -> None:
    """Same-size images batched together run out of memory only together: each alone goes through."""
    inputs = _inputs(tmp_path / "in", small=4, big=None)
    calls: list[int] = []
    real = offline.ItemWorker.predict

    def only_alone(self, prepared):
        calls.append(len(prepared))
        if len(prepared) > 1:
            raise error
        return real(self, prepared)

    monkeypatch.setattr(offline.ItemWorker, "predict", only_alone)
    summary = run_batch([str(inputs)], model_repo=repo, model="tiny", out=tmp_path / "out", device="cpu",
                        batch_size=4, max_batch_pixels=None)
    assert summary["counts"] == {"total": 4, "done": 4, "failed": 0, "skipped": 0}
    assert calls == [4, 1, 1, 1, 1]


def test_other_pass_errors_still_stop_the_run(repo, tmp_path, monkeypatch, capsys) -> None:
    """Only a refusal or running out of memory is one image's: a bug (any other error) stops the run."""
    inputs = _inputs(tmp_path / "in", small=2, big=None)

    def broken(self, prepared):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x5 and 6x7)")

    monkeypatch.setattr(offline.ItemWorker, "predict", broken)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        run_batch([str(inputs)], model_repo=repo, model="tiny", out=tmp_path / "out", device="cpu")
    assert not (tmp_path / "out" / "summary.json").exists()


def test_the_ray_workers_path_applies_the_budget_and_fails_an_out_of_memory_image(repo, tmp_path,
                                                                                monkeypatch) -> None:
    """``ItemWorker.process`` (one Ray actor's batch): the image over the budget and the one whose pass runs
    out of memory fail alone; the others are written."""
    folder = _inputs(tmp_path / "in", small=3)
    (folder / "odd.png").write_bytes(encode(make_image(40, 48, seed=7)))
    worker = offline.ItemWorker(str(repo), "tiny", 1, str(tmp_path / "out"), offline.BatchOptions(), device="cpu",
                                max_inflight_mb=16)
    real = worker.predict

    def odd_runs_out(prepared):
        if any(p.image_size == (40, 48) for p in prepared):
            raise MemoryError()
        return real(prepared)

    monkeypatch.setattr(worker, "predict", odd_runs_out)
    names = ["big.jpg", "odd.png", "tile0.png", "tile1.png", "tile2.png"]
    outcomes = worker.process([(i, str(folder / n), n) for i, n in enumerate(names)])
    by_index = {index: (record, reason) for index, record, reason in outcomes}
    assert sorted(by_index) == [0, 1, 2, 3, 4]
    assert "over this batch's memory budget of 16 MiB" in by_index[0][1]
    assert "ran out of memory (MemoryError" in by_index[1][1]
    assert all(by_index[i][0] is not None and by_index[i][1] is None for i in (2, 3, 4))


# -- the budget bounds the passes in flight together, and a pass's size ------------------------------------
def _worker_cost(repo: Path, tmp_path: Path, size: tuple[int, int]) -> int:
    worker = offline.ItemWorker(str(repo), "tiny", 1, str(tmp_path / "probe"), offline.BatchOptions(), device="cpu",
                                max_inflight_mb=1024)
    return worker.engine.cost(*size, worker.inference).peak_bytes


@pytest.mark.parametrize("fit", [1, 2])
def test_passes_in_flight_stay_within_the_budget(repo, tmp_path, monkeypatch, fit) -> None:
    """Two forward streams; a budget that holds one pass runs them one at a time, one that holds two lets two
    run at once (a barrier only two concurrent passes can cross proves it)."""
    import torch

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes(encode(make_image(96, 96, seed=i)))
    cost = _worker_cost(repo, tmp_path, (96, 96))
    monkeypatch.setattr(offline, "inflight_budget", lambda mb, device, share=1: (fit * cost + cost // 2, "test"))
    lock, active, most, calls = threading.Lock(), [0], [0], [0]
    second = threading.Event()  # set when a pass starts while another runs
    barrier = threading.Barrier(2, timeout=120)
    real = offline.ItemWorker.predict

    def counted(self, prepared):
        with lock:
            active[0] += 1
            calls[0] += 1
            most[0] = max(most[0], active[0])
            first, overlapping = calls[0], active[0] > 1
        if overlapping:
            second.set()
        try:
            if fit == 2 and first <= 2:
                barrier.wait()  # BrokenBarrierError unless a second pass runs meanwhile
            elif fit == 1 and first == 1:
                second.wait(1.5)  # room for a second pass to start, which the budget must not let happen
            return real(self, prepared)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(offline.ItemWorker, "predict", counted)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # two forward streams on CPU
    try:
        summary = run_batch([str(folder)], model_repo=repo, model="tiny", out=tmp_path / "out", device="cpu",
                            batch_size=1)
    finally:
        torch.set_num_threads(before)
    assert summary["counts"]["done"] == 6
    assert most[0] == fit


def test_a_pass_ends_before_it_outgrows_the_budget(repo, tmp_path, monkeypatch) -> None:
    """Same-size images batch by count (8 here), but no pass holds more images than the budget does."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes(encode(make_image(96, 96, seed=i)))
    cost = _worker_cost(repo, tmp_path, (96, 96))
    monkeypatch.setattr(offline, "inflight_budget", lambda mb, device, share=1: (2 * cost + cost // 2, "test"))
    sizes: list[int] = []
    real = offline.ItemWorker.predict
    monkeypatch.setattr(offline.ItemWorker, "predict",
                        lambda self, prepared: (sizes.append(len(prepared)), real(self, prepared))[1])
    summary = run_batch([str(folder)], model_repo=repo, model="tiny", out=tmp_path / "out", device="cpu",
                        batch_size=8, max_batch_pixels=None)
    assert summary["counts"]["done"] == 6
    assert sizes == [2, 2, 2]


def test_a_model_broken_for_every_image_still_stops_after_one_pass(repo, tmp_path, monkeypatch) -> None:
    inputs = _inputs(tmp_path / "in", small=3, big=None)
    calls: list[int] = []

    def broken(self, prepared):
        calls.append(len(prepared))
        raise ArtifactError("the model broke the [N, C, H, W] contract")

    monkeypatch.setattr(offline.ItemWorker, "predict", broken)
    with pytest.raises(ArtifactError):
        run_batch([str(inputs)], model_repo=repo, model="tiny", out=tmp_path / "out", device="cpu")
    assert calls == [3]


# -- the budget: --max-inflight-mb, auto from the memory available -----------------------------------------
def _fake_system(root: Path, meminfo_kb: int, cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc, fs = root / "proc", root / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {meminfo_kb} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "status").write_text("Name:\tpython\nVmSize:\t  1048576 kB\n")
    for rel, text in files.items():
        (fs / rel).parent.mkdir(parents=True, exist_ok=True)
        (fs / rel).write_text(text)
    return proc, fs


def test_available_memory_is_the_least_of_ram_and_the_cgroup(tmp_path, monkeypatch) -> None:
    import resource

    import torch

    cpu = torch.device("cpu")
    monkeypatch.setattr(offline.resource, "getrlimit", lambda which: (resource.RLIM_INFINITY,) * 2)
    # cgroup v2, the container's limit leaves 1 GiB of 8 available
    proc, fs = _fake_system(tmp_path / "v2", 8 << 20, "0::/job\n",
                            {"job/memory.max": f"{3 << 30}\n", "job/memory.current": f"{2 << 30}\n",
                             "memory.max": "max\n", "memory.current": "5\n"})
    assert offline.available_memory(cpu, proc, fs) == (1 << 30, "left under the memory cgroup's limit")
    # cgroup v1 with no limit: RAM
    proc, fs = _fake_system(tmp_path / "v1", 8 << 20, "4:memory:/job\n1:cpu:/\n",
                            {"memory/job/memory.limit_in_bytes": "9223372036854771712\n",
                             "memory/job/memory.usage_in_bytes": "100\n"})
    assert offline.available_memory(cpu, proc, fs) == (8 << 30, "available")
    # the page cache a container's usage counts is room: the kernel reclaims it (v2 inactive_file, v1 total_)
    proc, fs = _fake_system(tmp_path / "cache2", 40 << 20, "0::/job\n",
                            {"job/memory.max": f"{8 << 30}\n", "job/memory.current": f"{7 << 30}\n",
                             "job/memory.stat": f"active_file 5\ninactive_file {6 << 30}\ninactive_file_x 9\n"})
    assert offline.available_memory(cpu, proc, fs) == (7 << 30, "left under the memory cgroup's limit")
    proc, fs = _fake_system(tmp_path / "cache1", 40 << 20, "4:memory:/job\n",
                            {"memory/job/memory.limit_in_bytes": f"{8 << 30}\n",
                             "memory/job/memory.usage_in_bytes": f"{7 << 30}\n",
                             "memory/job/memory.stat": f"inactive_file 1\ntotal_inactive_file {6 << 30}\n"})
    assert offline.available_memory(cpu, proc, fs) == (7 << 30, "left under the memory cgroup's limit")
    # ulimit -v 4 GiB with 1 GiB mapped: 3 GiB, this process's own room (inflight_budget takes it whole)
    monkeypatch.setattr(offline.resource, "getrlimit", lambda which: (4 << 30, resource.RLIM_INFINITY))
    assert offline.available_memory(cpu, proc, fs) == (7 << 30, "left under the memory cgroup's limit")
    assert offline._address_space_room(proc) == 3 << 30
    # nothing readable
    monkeypatch.setattr(offline.resource, "getrlimit", lambda which: (resource.RLIM_INFINITY,) * 2)
    assert offline.available_memory(cpu, tmp_path / "none", tmp_path / "none") is None


def test_the_auto_budget_is_a_share_of_the_memory_available(monkeypatch) -> None:
    import torch

    cpu = torch.device("cpu")
    monkeypatch.setattr(offline, "available_memory", lambda device: (8 << 30, "available"))
    monkeypatch.setattr(offline, "_address_space_room", lambda proc: None)
    budget, how = offline.inflight_budget(None, cpu)
    assert budget == int((8 << 30) * offline.AUTO_MEMORY_SHARE) and "auto" in how and "8192 MiB available" in how
    assert offline.inflight_budget(None, cpu, share=4)[0] == budget // 4  # Ray actors sharing the machine
    assert offline.inflight_budget(300, cpu) == (300 * MIB, "--max-inflight-mb 300")
    monkeypatch.setattr(offline, "available_memory", lambda device: None)
    assert offline.inflight_budget(None, cpu)[0] == offline.FALLBACK_INFLIGHT_MB * MIB == 2048 * MIB
    # under ulimit -v, the room left is the bound when it is less than the share: whole, not a share of it (3.5 GiB
    # mapped at the start is mostly reserved; half of the rest refused an image that ran)
    monkeypatch.setattr(offline, "available_memory", lambda device: (8 << 30, "available"))
    monkeypatch.setattr(offline, "_address_space_room", lambda proc: 4262 * MIB)
    assert offline.inflight_budget(None, cpu) == (4262 * MIB, "--max-inflight-mb auto: the 4262 MiB left under the "
                                                              "address-space limit (ulimit -v)")
    monkeypatch.setattr(offline, "_address_space_room", lambda proc: 7 << 30)
    assert offline.inflight_budget(None, cpu)[0] == int((8 << 30) * offline.AUTO_MEMORY_SHARE)


def test_the_cli_flag(repo, tmp_path, monkeypatch, capsys) -> None:
    seen: list = []

    def fake_run_batch(inputs, **kwargs):
        seen.append(kwargs["max_inflight_mb"])
        return {"counts": {"total": 0, "done": 0, "failed": 0, "skipped": 0}, "failures": [], "images_per_s": None,
                "model": "tiny", "version": 1}

    monkeypatch.setattr(offline, "run_batch", fake_run_batch)
    base = ["batch", str(tmp_path), "--model-repo", str(repo), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(base) == 0 and main([*base, "--max-inflight-mb", "auto"]) == 0
    assert main([*base, "--max-inflight-mb", "4096"]) == 0
    assert seen == [None, None, 4096]
    for bad in ("0", "-5", "lots"):
        with pytest.raises(SystemExit) as exc:
            main([*base, "--max-inflight-mb", bad])
        assert exc.value.code == 2
    assert "argument --max-inflight-mb: must be a whole number >= 1" in capsys.readouterr().err
    with pytest.raises(offline.InvalidArgument, match="max_inflight_mb"):
        run_batch([str(tmp_path)], model_repo=repo, model="tiny", out=tmp_path / "o2", max_inflight_mb=0)
