"""Memory at scale: ``segsvc batch`` and the server's job runner hold a page of items, not the job.

Each test counts what is held (rows a store query returns, peak Python allocations under
``tracemalloc``) for a small and a larger input, never how long anything takes.
"""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from segsvc.errors import InvalidArgument
from segsvc.jobs import offline
from segsvc.jobs import store as store_module
from segsvc.jobs.inputs import resolve_inputs
from segsvc.jobs.offline import ItemWorker, batch_inputs, run_batch
from segsvc.jobs.outputs import JobOutputs
from segsvc.jobs.store import JobStore
from tests.jobs.test_batch_runner import _images, _run_one_job, _Service, clock  # noqa: F401  (clock: a fixture)
from tests.server.conftest import encode, make_image, publish

PAGE = 2
NAMES = ["sky", "road", "car"]
PALETTE = [(0, 0, 255), (255, 0, 0), (0, 255, 0)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scale")
    publish(root / "repo", "tiny", seed=1)
    return root / "repo"


def _rows_per_query(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Set the store's page to ``PAGE`` items; the rows each item query then returns (``JobStore._items`` is the
    store's one reader of many items)."""
    fetched: list[int] = []
    real = JobStore._items

    def counting(self: JobStore, *args: Any, **kwargs: Any) -> list[Any]:
        rows = real(self, *args, **kwargs)
        fetched.append(len(rows))
        return rows

    monkeypatch.setattr(JobStore, "_items", counting)
    monkeypatch.setattr(store_module, "ITEM_PAGE", PAGE, raising=False)
    return fetched


def _pngs(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(encode(make_image(32, 32, seed=i)))


def _results(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


# -- 1: segsvc batch and the job runner read their items a page at a time ----------------------------------
def test_segsvc_batch_reads_its_items_a_page_at_a_time(repo: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"{i:02d}.png" for i in range(7)]
    _pngs(tmp_path / "in", names)
    (tmp_path / "in" / "zz-broken.png").write_bytes(b"not a PNG")
    fetched = _rows_per_query(monkeypatch)
    summary = run_batch([str(tmp_path / "in")], model_repo=repo, model="tiny", out=tmp_path / "out", device="cpu",
                        batch_size=2)
    assert summary["counts"] == {"total": 8, "done": 7, "failed": 1, "skipped": 0}
    assert [f["input"] for f in summary["failures"]] == ["zz-broken.png"]
    assert [r["input"] for r in _results(tmp_path / "out")] == names
    assert fetched and max(fetched) <= PAGE, fetched


def test_segsvc_batch_killed_between_pages_resumes_each_item_once(repo: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"{i:02d}.png" for i in range(7)]
    _pngs(tmp_path / "in", names)
    _rows_per_query(monkeypatch)
    real_write, written = ItemWorker.write, []

    class Killed(BaseException):
        """What ``kill -9`` leaves: the run stops, with no cleanup of its own."""

    def killed_after_three(self: ItemWorker, index: int, *args: Any) -> Any:
        if len(written) == 3:
            raise Killed
        written.append(index)
        return real_write(self, index, *args)

    monkeypatch.setattr(ItemWorker, "write", killed_after_three)
    with pytest.raises(Killed):
        run_batch([str(tmp_path / "in")], model_repo=repo, model="tiny", out=tmp_path / "out", device="cpu",
                  batch_size=1, io_threads=1)
    monkeypatch.setattr(ItemWorker, "write", real_write)
    summary = run_batch(None, model_repo=repo, model=None, out=tmp_path / "out", resume=True, device="cpu")
    assert summary["counts"] == {"total": 7, "done": 7, "failed": 0, "skipped": 0}
    assert [r["input"] for r in _results(tmp_path / "out")] == names
    labels = sorted(p.name for p in (tmp_path / "out" / "labels").iterdir())
    assert labels == [f"{n}.png" for n in names]


def test_the_job_runner_reads_its_items_a_page_at_a_time(tmp_path: Path, clock: Any,  # noqa: F811
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"{i}.png" for i in range(7)]
    _images(tmp_path / "data", names)
    (tmp_path / "data" / "8-broken.png").write_bytes(b"not a PNG")
    fetched = _rows_per_query(monkeypatch)
    job = _run_one_job(tmp_path, _Service(clock), window=2)
    assert (job.state, job.done, job.failed) == ("SUCCEEDED", 7, 1), job.error
    out = tmp_path / "out" / job.id
    assert [r["input"] for r in _results(out)] == names
    assert [f["input"] for f in json.loads((out / "summary.json").read_text())["failures"]] == ["8-broken.png"]
    assert fetched and max(fetched) <= PAGE, fetched


# -- 1: finalize streams results.jsonl ---------------------------------------------------------------
def _peak(work: Callable[[], object]) -> int:
    """Peak Python allocations (bytes) while ``work`` runs."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _records(n: int) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {"input": f"{i:07d}.png", "output": f"labels/{i:07d}.png.png", "height": 4, "width": 4,
               "class_counts": {"sky": 10, "road": 6}, "mean_confidence": None, "model": "m", "version": 1, "ms": 1.0}


def _finalize(out: Path, n: int) -> Callable[[], object]:
    return lambda: JobOutputs(out).finalize(_records(n), [{"input": "bad.png", "reason": "corrupt"}],
                                            class_names=NAMES, palette=PALETTE, summary_fields={"job_id": "j"})


def test_finalize_holds_no_record_it_has_written(tmp_path: Path) -> None:
    small = _peak(_finalize(tmp_path / "small", 1_000))
    large = _peak(_finalize(tmp_path / "large", 21_000))
    assert large - small < 20_000 * 16, (small, large)  # under 16 bytes per further record: none is held
    rows = _results(tmp_path / "large")
    assert len(rows) == 21_000 and rows[-1] == list(_records(21_000))[-1]
    summary = json.loads((tmp_path / "large" / "summary.json").read_text())
    assert summary["counts"] == {"total": 21_001, "done": 21_000, "failed": 1, "skipped": 0}
    assert summary["class_pixels"] == {"sky": 210_000, "road": 126_000, "car": 0}
    assert not [p for p in (tmp_path / "large").iterdir() if ".tmp-" in p.name]


# -- 2: the input listing's bound holds over all the inputs together -------------------------------------
def test_batch_inputs_refuses_more_files_than_its_limit_over_all_inputs(tmp_path: Path) -> None:
    for folder in ("d[1]", "e[1]"):  # a folder holding *?[ is listed alone: each is one listing
        for name in ("a.png", "b.png"):
            (tmp_path / folder).mkdir(exist_ok=True)
            (tmp_path / folder / name).write_bytes(b"listed, not read")
    specs = [str(tmp_path / "d[1]"), str(tmp_path / "e[1]")]
    assert [f.rel for f in batch_inputs(specs, max_files=4)[1]] == ["d[1]/a.png", "d[1]/b.png", "e[1]/a.png",
                                                                     "e[1]/b.png"]
    with pytest.raises(InvalidArgument, match="more than 3 files"):
        batch_inputs(specs, max_files=3)


# -- 3: the glob matcher keeps nothing per entry walked ------------------------------------------------
def _tree(root: Path, subfolders: int) -> int:
    """5 folders of ``subfolders`` folders of 20 files, one of which the pattern matches; the entries listed."""
    for a in range(5):
        for b in range(subfolders):
            folder = root / f"t{a}" / f"s{b:02d}"
            folder.mkdir(parents=True)
            for c in range(20):
                (folder / f"f{c:02d}.txt").write_bytes(b"")
    (root / "t0" / "s00" / "keep.png").write_bytes(b"")
    return 5 + 5 * subfolders * 21


def test_the_glob_matcher_memory_does_not_grow_with_the_entries_walked(tmp_path: Path) -> None:
    small_n, large_n = _tree(tmp_path / "small", 4), _tree(tmp_path / "large", 24)
    found: list[Any] = []
    small = _peak(lambda: found.append(resolve_inputs(tmp_path / "small", ["**/keep.png"])))
    large = _peak(lambda: found.append(resolve_inputs(tmp_path / "large", ["**/keep.png"])))
    assert [[f.rel for f in files] for files in found] == [["t0/s00/keep.png"]] * 2
    # The walk holds one folder's listing and the folders still to walk; no more per entry matched.
    assert large - small < (large_n - small_n) * 64, (small, large)


def test_the_ray_engine_hands_ray_a_page_of_rows_at_a_time(repo: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray", reason="the ray engine needs Ray Data: pip install 'segsvc[ray]'")
    pytest.importorskip("ray.data", reason="the ray engine needs Ray Data: pip install 'segsvc[ray]'")
    names = [f"{i:02d}.png" for i in range(5)]
    _pngs(tmp_path / "in", names)
    monkeypatch.setattr(offline, "RAY_PAGE", 3, raising=False)
    rows: list[int] = []  # the rows of each dataset the driver builds
    real_from_items = ray.data.from_items
    monkeypatch.setattr(ray.data, "from_items",
                        lambda items, **kw: rows.append(len(items)) or real_from_items(items, **kw))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        summary = run_batch([str(tmp_path / "in")], model_repo=repo, model="tiny", out=tmp_path / "out",
                            engine="ray", batch_size=2, device="cpu")
    finally:
        ray.shutdown()
    assert summary["counts"] == {"total": 5, "done": 5, "failed": 0, "skipped": 0}
    assert [r["input"] for r in _results(tmp_path / "out")] == names
    assert rows == [3, 2]


def test_listing_a_folder_holds_only_the_entries_it_keeps(tmp_path: Path) -> None:
    peaks = []
    for others in (1_000, 5_000):  # notes beside one image: listed and paid for, never kept
        folder = tmp_path / f"f{others}"
        folder.mkdir()
        for i in range(others):
            (folder / f"note{i:05d}.txt").write_bytes(b"")
        (folder / "scan.png").write_bytes(b"")
        files: list[Any] = []
        peaks.append(_peak(lambda: files.extend(resolve_inputs(folder, ["."]))))
        assert [f.rel for f in files] == ["scan.png"]
    assert peaks[1] - peaks[0] < 4_000 * 16, peaks  # under 16 bytes per further entry listed: none is held


def test_an_entry_that_cannot_be_judged_does_not_hide_its_folder(tmp_path, monkeypatch) -> None:
    """A link whose target this server may not search made ``DirEntry.is_dir`` raise EACCES inside the folder's
    listing, and the whole folder was skipped as unreadable: ``a.png`` and ``b.png`` went missing from the
    batch without a word. Now that entry alone is judged by the walk (here, refused: it cannot be read)."""
    from segsvc.jobs import inputs

    root = tmp_path / "root"
    (root / "in").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        (root / "in" / name).write_bytes(b"x")
    real_scandir = os.scandir

    class Unsearchable:
        def __init__(self, entry: os.DirEntry) -> None:
            self._entry, self.name, self.path = entry, entry.name, entry.path

        def is_dir(self) -> bool:
            if self.name == "c.png":
                raise PermissionError(13, "Permission denied")
            return self._entry.is_dir()

        def __getattr__(self, name: str):
            return getattr(self._entry, name)

    class Listing:
        def __init__(self, path) -> None:
            self._it = real_scandir(path)

        def __enter__(self):
            return (Unsearchable(e) for e in self._it)

        def __exit__(self, *exc) -> None:
            self._it.close()

    monkeypatch.setattr(inputs.os, "scandir", Listing)
    found = [f.rel for f in inputs.resolve_inputs(root, ["in"])]
    assert found == ["in/a.png", "in/b.png", "in/c.png"]
