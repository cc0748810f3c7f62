"""ModelManager.resolve for a request that names no model: which model it gets, or why it gets none."""

from __future__ import annotations

import asyncio

import pytest

from segsvc.errors import FailedPrecondition, InvalidArgument
from tests.inference.managers import quiet_manager
from tests.server.conftest import publish


def test_after_unloading_the_only_model_a_request_without_a_name_is_told_to_load_one(tmp_path):
    """UnloadModel of the only model, then a request with no model name: not "0 models are loaded; name one of
    []" (INVALID_ARGUMENT), but the server's state (FAILED_PRECONDITION), what the repository holds, and how to
    fix it."""
    publish(tmp_path, "synthetic-quick", seed=1)

    async def main() -> tuple[str, str]:
        manager = quiet_manager(tmp_path)
        await manager.start()
        try:
            served = manager.resolve(None, None).name
            await manager.unload("synthetic-quick")
            with pytest.raises(FailedPrecondition) as info:
                manager.resolve("", None)
            return served, str(info.value)
        finally:
            await manager.stop()

    served, message = asyncio.run(main())
    assert served == "synthetic-quick"
    assert message == ("no model is loaded (the model repository holds 'synthetic-quick'): "
                       "load one with LoadModel")


def test_with_nothing_loaded_a_few_repository_models_are_named_and_an_empty_repository_says_so(tmp_path):
    for i in range(7):
        publish(tmp_path / "repo", f"m{i}", seed=i)
    with pytest.raises(FailedPrecondition, match=r"holds 'm0', 'm1', 'm2', 'm3', 'm4' and 2 more\): load one "
                                                 "with LoadModel$"):
        quiet_manager(tmp_path / "repo").resolve(None, None)  # not started: nothing is loaded
    with pytest.raises(FailedPrecondition, match="no model is loaded and the model repository holds none"):
        quiet_manager(tmp_path / "empty").resolve(None, None)


def test_with_several_loaded_a_request_without_a_name_must_name_one(tmp_path):
    for name in ("a", "b"):
        publish(tmp_path, name, seed=1)

    async def main() -> str:
        manager = quiet_manager(tmp_path)
        await manager.start()
        try:
            with pytest.raises(InvalidArgument) as info:
                manager.resolve(None, None)
            return str(info.value)
        finally:
            await manager.stop()

    assert asyncio.run(main()) == "the request names no model and 2 models are loaded; name one of 'a', 'b'"
