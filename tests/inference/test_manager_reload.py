"""A load of a version already loaded reads its files again (Triton's reload of a loaded model).

QA, through tritonclient's ``load_model``: with ``synthetic-quick:1`` served by onnxruntime and its ONNX export
overwritten with garbage, the load answered OK and the garbage surfaced only at the next unload and load; a
re-export (the manifest naming a new file) or new weights were not picked up by a load either. Now a changed
version is built again beside the loaded one and swapped in; a build that fails leaves the loaded one serving
and reports the failure; an unchanged version keeps its instance, with no build. Waits are on events and loop
steps only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np
import pytest
import torch

from segsvc.errors import ArtifactError
from segsvc.inference.batcher import BatchingConfig
from segsvc.inference.engine import EngineConfig, InferenceOptions
from segsvc.inference.loader import VersionLoader
from segsvc.inference.manager import ManagerConfig, ModelManager
from segsvc.inference.repository import ModelRepository
from segsvc.inference.status import SERVES_ON, ModelStatus
from segsvc.models.artifact import MANIFEST_FILE, WEIGHTS_FILE
from tests.inference.managers import with_manager
from tests.server.conftest import make_image, publish

BACKENDS = ("torch", "onnxruntime")
ONES = torch.ones(1, 3, 8, 8)


def _manager(root: Path, backend: str) -> ModelManager:
    engine = EngineConfig(device="cpu", backend=backend, warmup=False)
    config = ManagerConfig(engine=engine, batching=BatchingConfig(max_batch_size=2, max_delay_s=0.001))
    return ModelManager(ModelRepository(root), config)


def _served(root: Path, backend: str, check: Callable[[ModelManager], Awaitable[None]]) -> None:
    with_manager(root, check, make=lambda r: _manager(r, backend))


def _export(version_dir: Path, weights: tuple[float, float, float], file: str) -> Path:
    """A graph ``logits[:, k] = input.sum(channels) * weights[k]`` written as ``file``, and a manifest naming it
    (written to a temporary file and renamed over the old one, as an export does)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.asarray(weights, np.float32).reshape(1, 3, 1, 1), "w")
    nodes = [helper.make_node("ReduceSum", ["input", "axes"], ["s"], keepdims=1),
             helper.make_node("Mul", ["s", "w"], ["logits"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [w, numpy_helper.from_array(np.asarray([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = version_dir / file
    onnx.save_model(model, path)
    data = json.loads((version_dir / MANIFEST_FILE).read_text())
    data["exports"] = {"onnx": {"file": file, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}
    tmp = version_dir / ".manifest.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, version_dir / MANIFEST_FILE)
    return path


def _version(root: Path, backend: str) -> tuple[Path, Path]:
    """``m:1`` published (with an export for onnxruntime), and the file its backend reads the model from."""
    version = publish(root, "m", seed=1)
    if backend == "onnxruntime":
        return version, _export(version, (1.0, 2.0, 3.0), "model-a.onnx")
    return version, version / WEIGHTS_FILE


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> Counter[int]:
    """Engine builds, counted per version."""
    counted: Counter[int] = Counter()
    build = VersionLoader._build_engine

    def counting(loader, name, version):  # type: ignore[no-untyped-def]
        counted[version] += 1
        return build(loader, name, version)

    monkeypatch.setattr(VersionLoader, "_build_engine", counting)
    return counted


async def _first_load_error(root: Path, backend: str) -> Exception:
    """What a first load of ``m:1`` says, in a manager of its own."""
    manager = _manager(root, backend)
    try:
        with pytest.raises(Exception) as caught:
            await manager.load("m", 1)
        return caught.value
    finally:
        await manager.stop()


async def _segment(manager: ModelManager) -> tuple[int, ...]:
    with manager.lease("m", None) as lm:
        result = await lm.batcher.submit(lm.engine.prepare(make_image(16, 16), InferenceOptions()))
    return tuple(np.asarray(result.value.labels).shape)


def _states(status: ModelStatus) -> list[tuple[int, str, str]]:
    return [(s.version, s.state.value, s.reason) for s in status.version_status]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_load_of_a_version_whose_file_was_overwritten_fails_and_the_old_instance_serves_on(tmp_path, backend,
                                                                                            builds):
    _, target = _version(tmp_path, backend)

    async def check(manager: ModelManager) -> None:
        old = manager.resolve("m", 1)
        target.write_bytes(b"garbage\n")  # printf garbage > the file, in place
        fresh = await _first_load_error(tmp_path, backend)
        assert isinstance(fresh, ArtifactError)
        for load in (manager.load("m"), manager.load("m", 1)):  # OIP's load_model, and LoadModel by number
            with pytest.raises(type(fresh)) as caught:
                await load
            assert str(caught.value) == str(fresh)  # what a first load of the same files says
        assert manager.resolve("m", None) is old and manager.loaded("m") == [old]
        assert await _segment(manager) == (16, 16)  # the old instance still serves
        # it serves, so it is no failed version (no alert): READY, with the failure as its reason
        assert manager.failed_versions() == []
        assert _states(await manager.describe("m")) == [(1, "READY", SERVES_ON + str(fresh))]
        await manager.unload("m")  # once it no longer serves, its files are what a load would use: FAILED
        assert manager.failed_versions() == [("m", 1, str(fresh))]
        assert _states(await manager.describe("m")) == [(1, "FAILED", str(fresh))]

    _served(tmp_path, backend, check)
    assert builds[1] == 2 + 2  # the first load, two reloads that failed, the fresh manager's load


@pytest.mark.parametrize("version", [None, 1])
def test_a_load_after_a_re_export_swaps_to_the_new_file_and_the_old_instance_drains(tmp_path, version, builds):
    folder, _ = _version(tmp_path, "onnxruntime")

    async def check(manager: ModelManager) -> None:
        old = manager.resolve("m", 1)
        assert old.engine.backend.forward(ONES).argmax(1).unique().tolist() == [2]
        with manager.lease("m", None) as held:  # a request in flight on the old instance
            _export(folder, (3.0, 2.0, 1.0), "model-b.onnx")  # exported again: the manifest names another file
            new = await manager.load("m", version)
            assert new is not old and manager.resolve("m", None) is new and manager.loaded("m") == [new]
            assert held is old and old.batcher.running  # what it holds finishes on it
        await asyncio.gather(*list(manager._retiring))  # then it retires, as a replaced version does
        assert not old.batcher.running
        assert new.engine.backend.forward(ONES).argmax(1).unique().tolist() == [0]
        assert new.manifest.exports["onnx"]["file"] == "model-b.onnx"
        assert await _segment(manager) == (16, 16)

    _served(tmp_path, "onnxruntime", check)
    assert builds[1] == 2


def test_a_load_after_new_weights_swaps_to_them(tmp_path, builds):
    folder, _ = _version(tmp_path, "torch")
    retrained = publish(tmp_path / "other", "m", seed=2)  # m:1 too, with other weights

    async def check(manager: ModelManager) -> None:
        old = manager.resolve("m", 1)
        for file in (WEIGHTS_FILE, MANIFEST_FILE):  # each written aside and renamed into place
            shutil.copyfile(retrained / file, folder / f".{file}.tmp")
            os.replace(folder / f".{file}.tmp", folder / file)
        new = await manager.load("m")
        assert new is not old and manager.resolve("m", None) is new
        assert new.manifest.weights_sha256 != old.manifest.weights_sha256
        assert new.manifest.weights_sha256 == json.loads((retrained / MANIFEST_FILE).read_text())["weights_sha256"]

    _served(tmp_path, "torch", check)
    assert builds[1] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_load_of_an_unchanged_version_keeps_its_instance_and_builds_nothing(tmp_path, backend, builds):
    _version(tmp_path, backend)

    async def check(manager: ModelManager) -> None:
        old = manager.resolve("m", 1)
        assert await manager.load("m") is old
        assert await manager.load("m", 1) is old
        assert manager.resolve("m", None) is old and not manager._retiring

    _served(tmp_path, backend, check)
    assert builds[1] == 1


def test_a_load_of_the_model_is_not_failed_by_an_older_version_it_did_not_name(tmp_path, builds):
    """Review: versions 1-3, 1 loaded by number, 3 unloaded, 1's weights damaged on disk. ``load("m")`` (OIP's
    load_model, LoadModel without a version, a training job after publishing) raised about m/1 and left the unload
    mark on 3, so requests without a version went to 1 and the poller ignored 3."""
    for v in (1, 2, 3):
        publish(tmp_path, "m", seed=v, version=v)

    async def check(manager: ModelManager) -> None:
        one = await manager.load("m", 1)
        await manager.unload("m", 3)
        assert manager.default_version("m") == 1
        (tmp_path / "m" / "1" / WEIGHTS_FILE).write_bytes(b"garbage\n")
        three = await manager.load("m")  # 1 fails to load again: logged and shown, not raised
        assert three.version == 3 and [lm.version for lm in manager.loaded("m")] == [1, 3]
        assert manager.default_version("m") == 3 and not manager._unloaded_versions  # the unload mark is gone
        assert manager.resolve("m", 1) is one and one.batcher.running  # 1 serves on from what loaded before
        assert manager.failed_versions() == []
        (v1, state, reason), _, v3 = _states(await manager.describe("m"))
        assert (v1, state) == (1, "READY") and reason.startswith(SERVES_ON) and "m/1/weights.safetensors" in reason
        assert v3 == (3, "READY", "")
        with pytest.raises(ArtifactError, match="m/1/weights.safetensors"):  # named, it is raised
            await manager.load("m", 1)
        assert manager.resolve("m", 1) is one and manager.default_version("m") == 3

    _served(tmp_path, "torch", check)
    assert builds == Counter({1: 3, 3: 2})  # 1: its load, two reloads that failed; 3: at start, then load("m")


@pytest.mark.parametrize("version", [None, 1])
def test_a_reload_keeps_the_version_s_statistics(tmp_path, version):
    folder, _ = _version(tmp_path, "onnxruntime")

    async def check(manager: ModelManager) -> None:
        old = manager.resolve("m", 1)
        await _segment(manager)
        counted = old.stats.snapshot()
        assert counted.execution_count == 1
        _export(folder, (3.0, 2.0, 1.0), "model-b.onnx")
        new = await manager.load("m", version)
        assert new is not old and new.stats.snapshot() == counted  # the same version: its counts go on
        await _segment(manager)
        assert new.stats.snapshot().execution_count == 2

    _served(tmp_path, "onnxruntime", check)
