"""Retraining through the service, third review: what a job says after a promotion the server could not serve,
promote NEVER on a new model, torchrun's process count, YAML alias bombs, and a trainer killed on its own.

The promotion tests publish into a real repository served by a real ``ModelManager`` (``_publish`` with fixed
evaluation results, no child process). The trainer tests run ``_train`` with a stand-in ``training`` package in
the trainer's working folder: a few lines of Python that kill themselves or write a candidate, so no model trains.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import os
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from segsvc.errors import InvalidArgument
from segsvc.inference.manager import ModelManager
from segsvc.inference.repository import ModelRepository
from segsvc.jobs import gate, training, trainspec
from segsvc.jobs.training import TrainingRunner, _Run, _Stop
from segsvc.jobs.trainspec import TrainingConfig, TrainingRequest, resolve_submission
from segsvc.models.artifact import WEIGHTS_FILE
from segsvc.overrides import parse_override
from tests.inference.managers import quiet_manager
from tests.jobs.test_training_gate_races import _served_after_restart
from tests.server.conftest import publish

NAME = "m"


class _Store:
    """What ``_publish`` and ``_train`` use of the job store: progress writes, kept to be looked at."""

    def __init__(self) -> None:
        self.progress: dict[str, Any] = {}

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        self.progress = dict(progress)


class _Record:
    def __init__(self, spec_path: Path) -> None:
        self.name, self.sha256, self.spec_path = "shapes", "ab" * 32, str(spec_path)


class _Datasets:
    def __init__(self, spec_path: Path) -> None:
        self.spec_path = spec_path

    def get(self, query: str) -> _Record:
        return _Record(self.spec_path)

    check_unchanged = get

    def guard_deletes(self, users) -> None:  # type: ignore[no-untyped-def]
        pass


# -- 1. a promotion the server cannot serve ---------------------------------------------------------------------
def _gate_run(job_id: str, compared: int) -> _Run:
    spec = {"model_name": NAME, "dataset": {"name": "d", "sha256": "0" * 64}, "recipe_name": "r", "base": None,
            "run_dir": "run", "request": {"promote": "gate", "gate_margin": 0.0, "overrides": []}}
    return _Run(SimpleNamespace(id=job_id, kind="train", spec=spec), progress={"default_version": compared})


def _publish_served(root: Path, state: Path, candidate: Path, results: dict[str, Any], compared: int,
                    broken: Any = None) -> tuple[dict[str, Any], int]:
    """A gate job that compared with ``compared`` publishes ``candidate`` into ``root``, served by a running
    manager; ``broken(manager)`` (awaited when it returns an awaitable) breaks serving first. The job's result
    and the version the running server serves by default."""

    async def main() -> tuple[dict[str, Any], int]:
        manager = quiet_manager(root)
        await manager.start()
        try:
            if broken is not None and inspect.isawaitable(done := broken(manager)):
                await done
            runner = TrainingRunner(_Store(), manager, None, TrainingConfig(state_dir=state))  # type: ignore[arg-type]
            result = await runner._publish(_gate_run("jobA", compared), candidate, results)
            return result, manager.default_version(NAME)
        finally:
            await manager.stop()

    return asyncio.run(main())


def _better_than_v1(tmp_path: Path, broken: Any = None) -> tuple[dict[str, Any], int]:
    """Publish a candidate that beats v1 (the default) into a served repository (``_publish_served``)."""
    root = tmp_path / "repo"
    publish(root, NAME, seed=1)
    candidate = publish(tmp_path / "cand", NAME, seed=2)
    results = {"candidate": {"val": {"miou": 0.9}}, "default": {"val": {"miou": 0.5}}}
    return _publish_served(root, tmp_path / "state", candidate, results, 1, broken)


def test_a_promoted_version_that_does_not_load_is_reported_and_default_stays_on_the_served_one(tmp_path,
                                                                                              monkeypatch):
    """The new version's weights are damaged once published: the server keeps v1, and the job used to say
    "promoted" with DEFAULT naming v2, a version no server can load (a restart then took the newest that loads)."""
    real_publish = gate.publish_candidate

    def publish_damaged(*args: Any) -> Path:
        path = real_publish(*args)
        weights = path / WEIGHTS_FILE
        weights.write_bytes(b"\0" * weights.stat().st_size)  # same size, other bytes: the hash no longer matches
        return path

    monkeypatch.setattr(gate, "publish_candidate", publish_damaged)
    result, served = _better_than_v1(tmp_path)
    assert result["version"] == 2 and served == 1
    assert result["promoted"] is False, result["verdict"]
    assert "version 2 does not load" in result["verdict"] and "v1" in result["verdict"], result["verdict"]
    assert str(tmp_path) not in result["verdict"]
    assert result["serving_error"] in result["verdict"]
    assert ModelRepository(tmp_path / "repo").default_version(NAME) == 1
    assert asyncio.run(_served_after_restart(tmp_path / "repo")) == 1


def test_a_disk_error_while_switching_finishes_the_job_with_its_version_instead_of_failing_it(tmp_path):
    """``refresh_default`` raising (a disk error reading the repository) used to fail the job with "internal
    error" after v2 was published and DEFAULT written: the job lost its version."""

    def failing_refresh(manager: ModelManager) -> None:
        async def refresh_default(name: str) -> int:
            raise OSError(errno.EIO, "Input/output error")

        manager.refresh_default = refresh_default  # type: ignore[method-assign]

    result, served = _better_than_v1(tmp_path, failing_refresh)
    assert (result["version"], result["promoted"], served) == (2, False, 1), result["verdict"]
    assert "Input/output error" in result["verdict"]
    assert ModelRepository(tmp_path / "repo").default_version(NAME) == 1


def test_a_promotion_that_serves_reports_nothing_more(tmp_path):
    result, served = _better_than_v1(tmp_path)
    assert (result["version"], result["promoted"], served) == (2, True, 2)
    assert result["verdict"].startswith("promoted:") and "serving_error" not in result
    assert ModelRepository(tmp_path / "repo").default_version(NAME) == 2


def test_a_promotion_into_a_model_unloaded_on_this_server_stands(tmp_path):
    """An operator's UnloadModel is not a failure to serve: DEFAULT names the new version, loaded with the model."""
    result, served = _better_than_v1(tmp_path, lambda manager: manager.unload(NAME))
    assert (result["version"], result["promoted"], served) == (2, True, 0), result["verdict"]
    assert ModelRepository(tmp_path / "repo").default_version(NAME) == 2


# -- 2. promote NEVER on a model with no version ---------------------------------------------------------------
def _resolve(tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    spec_path = tmp_path / "shapes.yaml"
    spec_path.write_text("root: .\n")
    request = TrainingRequest(dataset="shapes", **{"recipe": "synthetic-quick", "epochs": 1, **kwargs})
    return resolve_submission(request, _Datasets(spec_path), ModelRepository(tmp_path / "repo"),
                              TrainingConfig(state_dir=tmp_path / "state"))


def test_promote_never_into_a_model_without_versions_is_refused_at_submission(tmp_path):
    """Its first version would be the model's only one, served by default whatever the policy said."""
    with pytest.raises(InvalidArgument, match="'fresh' has no version yet") as caught:
        _resolve(tmp_path, model_name="fresh", promote="never")
    assert "GATE or ALWAYS" in str(caught.value)


def test_promote_never_into_a_model_with_a_version_is_accepted(tmp_path):
    publish(tmp_path / "repo", "fresh", seed=1)
    assert _resolve(tmp_path, model_name="fresh", promote="never")["model_name"] == "fresh"
    assert _resolve(tmp_path, model_name="other", promote="gate")["model_name"] == "other"


# -- other: a malformed output section of an inline recipe ------------------------------------------------------
@pytest.mark.parametrize("output", ["[1]", "7", "{model_name: 5}", "{model_name: [a]}"])
def test_an_inline_recipe_whose_output_is_malformed_is_invalid_argument_not_an_internal_error(tmp_path, output):
    """``output: [1]`` used to raise AttributeError in the service's own lookup of output.model_name: INTERNAL."""
    with pytest.raises(InvalidArgument, match="output"):
        _resolve(tmp_path, recipe="", recipe_yaml=f"name: x\noutput: {output}\n")


def test_an_inline_recipe_names_its_model_in_output(tmp_path):
    spec = _resolve(tmp_path, recipe="", recipe_yaml="name: x\noutput: {model_name: mine}\n")
    assert (spec["model_name"], spec["recipe_name"]) == ("mine", "x")


@pytest.mark.parametrize("model", ["123", "true", "null", "1.5", "0x1f"])
def test_a_model_name_yaml_reads_as_another_type_reaches_the_trainer_as_text(tmp_path, model):
    """``--set output.model_name=null`` made the trainer publish under the recipe's name (the job then found no
    candidate), and ``123`` or ``true`` failed its config check: names the service accepts must reach it as text."""
    spec = _resolve(tmp_path, model_name=model)
    argv = trainspec.trainer_argv(spec, tmp_path / "job", TrainingConfig(state_dir=tmp_path / "state"), resume=False)
    sets = dict(parse_override(argv[i + 1]) for i, arg in enumerate(argv) if arg == "--set")
    assert sets["output.model_name"] == model


# -- 3. torchrun's process count -------------------------------------------------------------------------------
def test_more_processes_than_the_host_has_cpus_are_refused_naming_the_limit(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    with pytest.raises(InvalidArgument, match=f"at most {cpus} .*CPU") as caught:
        _resolve(tmp_path, device="cpu", nproc_per_node=cpus + 1)
    assert "nproc_per_node" in str(caught.value)
    assert _resolve(tmp_path, device="cpu", nproc_per_node=cpus)["request"]["nproc_per_node"] == cpus


def test_processes_on_cuda_are_bounded_by_the_visible_gpus(tmp_path, monkeypatch):
    monkeypatch.setattr(trainspec, "_visible_gpus", lambda: 2)
    with pytest.raises(InvalidArgument, match="at most 2 .*GPU"):
        _resolve(tmp_path, device="cuda", nproc_per_node=3)
    assert _resolve(tmp_path, device="cuda", nproc_per_node=2)["request"]["nproc_per_node"] == 2
    monkeypatch.setattr(trainspec, "_visible_gpus", lambda: 0)
    with pytest.raises(InvalidArgument, match="no GPU"):
        _resolve(tmp_path, device="cuda", nproc_per_node=2)


# -- 4. YAML alias bombs ---------------------------------------------------------------------------------------
def _bomb(levels: int = 9, width: int = 9) -> str:
    """The billion-laughs pattern: each level lists the previous one ``width`` times (9 levels: 9**9 leaves)."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "name: x\nextra:\n" + textwrap.indent("\n".join(lines), "  ") + "\n"


def test_an_inline_recipe_whose_aliases_expand_beyond_the_limit_is_refused():
    with pytest.raises(InvalidArgument, match="alias"):
        TrainingRequest(dataset="d", recipe_yaml=_bomb())


def test_an_override_value_whose_aliases_expand_beyond_the_limit_is_refused():
    flow = "[&a [lol, lol, lol, lol, lol, lol, lol, lol, lol], " + ", ".join(
        f"&{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)) + "]"
    with pytest.raises(InvalidArgument, match="alias"):
        TrainingRequest(dataset="d", recipe="r", overrides=(f"extra.x={flow}",))


def test_a_recipe_that_contains_itself_is_refused():
    with pytest.raises(InvalidArgument, match="refers to itself"):
        TrainingRequest(dataset="d", recipe_yaml="name: x\nloop: &a [1, *a]\n")


def test_a_recipe_nested_too_deeply_is_invalid_argument_not_an_internal_error():
    with pytest.raises(InvalidArgument, match="nested"):
        TrainingRequest(dataset="d", recipe_yaml="name: x\nextra: " + "[" * 5000 + "]" * 5000 + "\n")


def test_a_recipe_nested_deeper_than_the_limit_is_refused_before_the_server_writes_it_out(tmp_path):
    """400 levels passed the check and then ``yaml.safe_dump`` of the recipe, at submission, hit Python's recursion
    limit: an internal error instead of INVALID_ARGUMENT."""
    deep = "name: x\nextra: " + "[" * 400 + "]" * 400 + "\n"
    with pytest.raises(InvalidArgument, match="nested"):
        _resolve(tmp_path, recipe="", recipe_yaml=deep)
    _resolve(tmp_path, recipe="", recipe_yaml="name: x\nextra: " + "[" * 20 + "]" * 20 + "\n")


def test_overrides_are_bounded_in_size_together():
    with pytest.raises(InvalidArgument, match="overrides"):
        TrainingRequest(dataset="d", recipe="r", overrides=tuple(f"extra.k{i}={'x' * 2000}" for i in range(40)))


def test_a_recipe_using_a_few_anchors_is_accepted():
    recipe = "name: x\ndata: {crop: &c [64, 64]}\nextra: {same: *c, again: *c}\n"
    request = TrainingRequest(dataset="d", recipe_yaml=recipe, overrides=("extra.y=[&z 1, *z]",))
    assert request.overrides == ("extra.y=[&z 1, *z]",)
    small = _bomb(levels=3, width=3)  # the same pattern, 27 values: the limit is on the expanded size
    assert TrainingRequest(dataset="d", recipe_yaml=small).recipe_yaml == small


# -- 5. a trainer killed on its own ----------------------------------------------------------------------------
FAKE_TRAINER = '''
"""Stand-in for ``python -m training``: while deaths.txt counts down, write a checkpoint and die by SIGKILL."""
import json, os, signal, sys
from pathlib import Path

args = sys.argv[1:]
sets = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")
run_dir = Path(json.loads(sets["output.runs_dir"])) / "r" / "run"
with open("starts.txt", "a") as f:
    f.write("resume\\n" if "--resume" in args else "fresh\\n")
deaths = Path("deaths.txt")
left = int(deaths.read_text())
if left == -1:
    sys.exit(3)  # the trainer's own failure: not a death to recover from
if left > 0:
    deaths.write_text(str(left - 1))
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / "last.pt").write_text("epoch 1")
    os.kill(os.getpid(), signal.SIGKILL)
version = Path(json.loads(sets["output.repo"])) / sets["output.model_name"] / "1"
version.mkdir(parents=True)
(version / "manifest.json").write_text("{}")
'''


def _train_with(tmp_path: Path, deaths: int, trainer: str = FAKE_TRAINER, nproc: int = 1,
                kill_grace_s: float = 5) -> tuple[Path | _Stop, dict[str, Any], list[str]]:
    """``_train`` of one job whose trainer (the stand-in ``trainer``'s source, on ``nproc`` torchrun processes
    when more than 1) dies ``deaths`` times before it finishes (-1: it fails by itself); what it returned (or the
    ``_Stop`` it raised), the stored metadata and how each start began."""
    workdir = tmp_path / "work"
    (workdir / "training").mkdir(parents=True)
    (workdir / "training" / "__init__.py").write_text("")
    (workdir / "training" / "__main__.py").write_text(trainer)
    (workdir / "deaths.txt").write_text(str(deaths))
    spec_path = tmp_path / "shapes.yaml"
    spec_path.write_text("root: .\n")
    request = TrainingRequest(dataset="shapes", recipe="r", epochs=1, device="cpu", nproc_per_node=nproc)
    dataset = {"name": "shapes", "sha256": "ab" * 32, "spec_path": str(spec_path)}
    spec = {"request": request.to_dict(), "dataset": dataset, "eval_sets": {"val": dataset}, "base": None,
            "recipe_name": "r", "recipe_text": "name: r\n", "model_name": NAME, "run_dir": "r/run"}
    store = _Store()
    config = TrainingConfig(state_dir=tmp_path / "state", workdir=workdir, kill_grace_s=kill_grace_s)
    manager = SimpleNamespace(repository=ModelRepository(tmp_path / "repo"))
    runner = TrainingRunner(store, manager, _Datasets(spec_path), config)  # type: ignore[arg-type]

    async def main() -> Path | _Stop:
        try:
            return await runner._train(_Run(SimpleNamespace(id="job1", kind="train", spec=spec)))
        except _Stop as stop:
            return stop

    outcome = asyncio.run(main())
    return outcome, store.progress, (workdir / "starts.txt").read_text().split()


def test_a_trainer_killed_on_its_own_resumes_from_its_checkpoint(tmp_path):
    """A kill -9 of the trainer alone (the server alive) used to fail the job: "the trainer exited with code -9"."""
    outcome, progress, starts = _train_with(tmp_path, deaths=2)
    assert isinstance(outcome, Path), outcome
    assert starts == ["fresh", "resume", "resume"]
    assert (progress["attempts"], progress["trainer_restarts"]) == (3, 2)
    assert "signal 9" in progress["last_trainer_death"]


def test_a_trainer_killed_more_often_than_the_restart_limit_fails_the_job_saying_so(tmp_path):
    outcome, progress, starts = _train_with(tmp_path, deaths=training.MAX_TRAINER_RESTARTS + 1)
    assert isinstance(outcome, _Stop) and outcome.state == "FAILED"
    assert "killed by signal 9" in str(outcome) and f"restarted {training.MAX_TRAINER_RESTARTS} times" in str(outcome)
    assert len(starts) == training.MAX_TRAINER_RESTARTS + 1
    assert progress["trainer_restarts"] == training.MAX_TRAINER_RESTARTS


def test_a_trainer_that_fails_by_itself_is_not_restarted(tmp_path):
    outcome, progress, starts = _train_with(tmp_path, deaths=-1)
    assert isinstance(outcome, _Stop) and "exited with code 3" in str(outcome)
    assert starts == ["fresh"] and "trainer_restarts" not in progress


def test_overrides_whose_aliases_expand_beyond_the_limit_together_are_refused():
    """Each override was checked on its own: 20 of about 9,000 values each (a few hundred bytes apiece, far
    within the byte limit) reached the trainer as 180,000 values, over the 100,000 one recipe may have."""
    flow = "[&a [lol, lol, lol, lol, lol, lol, lol, lol, lol], " + ", ".join(
        f"&{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(3)) + "]"
    assert TrainingRequest(dataset="d", recipe="r", overrides=(f"extra.x0={flow}",))  # one alone is fine
    with pytest.raises(InvalidArgument, match="together"):
        TrainingRequest(dataset="d", recipe="r", overrides=tuple(f"extra.x{i}={flow}" for i in range(20)))
