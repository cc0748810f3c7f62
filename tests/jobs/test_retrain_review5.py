"""Retraining through the service, fifth review: one rule for children stopped by a signal from outside (SIGTERM,
SIGINT: an operator's ``kill``, a container runtime), what a torchrun agent that failed by itself printed, an
evaluation killed between its two files, and the phase a cancel names when it lands as a child finishes.

No model trains: the trainer, torchrun's workers and ``segsvc eval`` are stand-ins written into the children's
working folder (``python -m training`` and ``python -m segsvc`` find them there first; under torchrun, the real
``torch.distributed.run`` starts the stand-in workers), a few lines that record each start and stop by a signal or
write what the real ones would.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from segsvc.inference.repository import ModelRepository
from segsvc.jobs import training
from segsvc.jobs.procgroup import GroupProcess
from segsvc.jobs.store import JobStore
from segsvc.jobs.training import TrainingRunner, _Run, _Stop
from segsvc.jobs.trainspec import TrainingConfig, TrainingRequest
from tests.jobs.conftest import run_to_end
from tests.jobs.test_retrain_review3 import _Datasets, _Store
from tests.jobs.test_retrain_review4 import _root_cause

NAME = "m"

# A lone trainer: like training/train.py, SIGTERM raises in it and it exits 143 with its run ended "terminated".
FAKE_TRAINER = '''
"""Stand-in for ``python -m training``. Mode "term": a fresh start writes a checkpoint and is stopped by SIGTERM as the
real trainer is (its handler ends the run "terminated", exit 143); a resumed one finishes. Mode "ok": it finishes."""
import json, os, signal, sys
from pathlib import Path

args = sys.argv[1:]
sets = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")
run_dir = Path(json.loads(sets["output.runs_dir"])) / "r" / "run"
with open("starts.txt", "a") as f:
    f.write("resume\\n" if "--resume" in args else "fresh\\n")


class Terminated(Exception):
    pass


def handler(signum, frame):
    raise Terminated()


if Path("mode.txt").read_text().strip() == "term" and "--resume" not in args:
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / "last.pt").write_text("epoch 1")
    signal.signal(signal.SIGTERM, handler)
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # an operator's kill, a container runtime's stop
    except Terminated:
        with open(run_dir / "events.jsonl", "a") as f:
            f.write(json.dumps({"event": "end", "status": "failed", "reason": "terminated"}) + "\\n")
        print("training: terminated by SIGTERM; its last checkpoint is kept", flush=True)
        sys.exit(143)
version = Path(json.loads(sets["output.repo"])) / sets["output.model_name"] / "1"
version.mkdir(parents=True)
(version / "manifest.json").write_text("{}")
'''

# torchrun's workers: a fresh start is stopped by SIGTERM (mode "worker": rank 1, which exits 143 as the trainer does;
# mode "agent": rank 0 sends it to the agent, which stops both workers and exits 1); a resumed start finishes.
FAKE_WORKER = '''
"""Stand-in for ``python -m training`` under torchrun (see the test module)."""
import json, os, signal, sys, time
from pathlib import Path

args = sys.argv[1:]
sets = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")
run_dir = Path(json.loads(sets["output.runs_dir"])) / "r" / "run"
rank = int(os.environ["LOCAL_RANK"])
mode = Path("mode.txt").read_text().strip()
if rank == 0:
    with open("starts.txt", "a") as f:
        f.write("resume\\n" if "--resume" in args else "fresh\\n")
if "--resume" in args:
    if rank == 0:
        version = Path(json.loads(sets["output.repo"])) / sets["output.model_name"] / "1"
        version.mkdir(parents=True)
        (version / "manifest.json").write_text("{}")
    sys.exit(0)


class Terminated(Exception):
    pass


def handler(signum, frame):
    raise Terminated()


if (mode, rank) in (("worker", 1), ("agent", 0)):
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / "last.pt").write_text("epoch 1")
if (mode, rank) == ("worker", 1):
    signal.signal(signal.SIGTERM, handler)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
    except Terminated:
        print("training: terminated by SIGTERM", flush=True)
        sys.exit(143)
if (mode, rank) == ("agent", 0):
    os.kill(os.getppid(), signal.SIGTERM)  # the agent: it stops this worker and the other
time.sleep(300)  # until the agent stops it
sys.exit(5)
'''

# torchrun's agent that fails before any worker starts (its rendezvous port taken): a traceback, exit 1.
FAKE_AGENT = '''
import sys
print("Traceback (most recent call last):")
print('  File "{workdir}/torch/distributed/run.py", line 1, in <module>')
print("    store = TCPStore(host, port)")
print("            ^^^^^^^^^^^^^^^^^^^^")
print("torch.distributed.DistNetworkError: The server socket has failed to listen on any local network address. "
      "port: 29500, useIPv6: False, code: -98, name: EADDRINUSE, message: address already in use "
      "(log {workdir}/rdzv.log, /var/tmp/torchelastic_x1/attempt_0/rdzv)")
sys.exit(1)
'''

# ``segsvc eval``: like segsvc/cli.py, SIGINT (KeyboardInterrupt) exits 130; SIGTERM kills it (no handler).
FAKE_EVAL = '''
"""Stand-in for ``python -m segsvc eval``: while signals.txt names signals, the next one stops it; then it writes
report.png and metrics.json."""
import json, os, signal, sys
from pathlib import Path

args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
with open("evals.txt", "a") as f:
    f.write("start\\n")
left = Path("signals.txt").read_text().split()
if left:
    Path("signals.txt").write_text(" ".join(left[1:]))
    # as ``segsvc eval`` starts: SIGINT raises KeyboardInterrupt, SIGTERM kills. A shell without job control starts
    # background commands (a suite run with `nohup ... &`) with SIGINT ignored, which every child inherits.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        os.kill(os.getpid(), getattr(signal, left[0]))
    except KeyboardInterrupt:
        print("segsvc: interrupted", file=sys.stderr)
        sys.exit(130)
out.mkdir(parents=True, exist_ok=True)
(out / "report.png").write_bytes(b"png")
(out / "metrics.json").write_text(json.dumps({"metrics": {"miou": 0.7}}))
'''


def _write_package(workdir: Path, package: str, main: str) -> None:
    (workdir / package).mkdir(parents=True, exist_ok=True)
    (workdir / package / "__init__.py").write_text("")
    (workdir / package / "__main__.py").write_text(main)


def _spec(spec_path: Path, nproc: int = 1) -> dict[str, Any]:
    request = TrainingRequest(dataset="shapes", recipe="r", epochs=1, device="cpu", nproc_per_node=nproc)
    dataset = {"name": "shapes", "sha256": "ab" * 32, "spec_path": str(spec_path)}
    return {"request": request.to_dict(), "dataset": dataset, "eval_sets": {"val": dataset}, "base": None,
            "recipe_name": "r", "recipe_text": "name: r\n", "model_name": NAME, "run_dir": "r/run"}


def _runner(tmp_path: Path, store: Any, workdir: Path) -> TrainingRunner:
    spec_path = tmp_path / "shapes.yaml"
    spec_path.write_text("root: .\n")
    (tmp_path / "repo").mkdir(exist_ok=True)
    manager = SimpleNamespace(repository=ModelRepository(tmp_path / "repo"), default_version=lambda name: 0)
    config = TrainingConfig(state_dir=tmp_path / "state", workdir=workdir, kill_grace_s=30)
    return TrainingRunner(store, manager, _Datasets(spec_path), config)  # type: ignore[arg-type]


def _train(tmp_path: Path, workdir: Path, nproc: int = 1) -> tuple[Path | _Stop, dict[str, Any], list[str]]:
    """``_train`` of one job; what it returned (or the ``_Stop`` it raised), the stored metadata, how each start
    began (as the stand-in recorded it)."""
    store = _Store()
    runner = _runner(tmp_path, store, workdir)

    async def main() -> Path | _Stop:
        try:
            return await runner._train(_Run(SimpleNamespace(id="job1", kind="train",
                                                            spec=_spec(tmp_path / "shapes.yaml", nproc))))
        except _Stop as stop:
            return stop

    outcome = asyncio.run(main())
    starts = workdir / "starts.txt"
    return outcome, store.progress, starts.read_text().split() if starts.exists() else []


# -- 1. one rule for a death by a signal from outside ------------------------------------------------------------
@pytest.mark.parametrize("code, signum", [(-9, 9), (-15, 15), (143, 15), (130, 2), (137, 9), (129, 1),
                                          (0, None), (1, None), (2, None), (3, None), (139, None), (255, None),
                                          # its own crash (SIGSEGV, SIGABRT: a CUDA assert) would crash again
                                          (-11, None), (-6, None)])
def test_one_rule_says_which_exit_codes_are_a_death_by_a_signal_from_outside(code, signum):
    assert training.signal_death(code) == signum


def test_a_trainer_stopped_by_sigterm_from_outside_resumes_from_its_checkpoint(tmp_path):
    """The trainer handles SIGTERM and exits 143: an operator's ``kill`` failed the job ("training failed:
    terminated"), while an evaluation killed the same way ran again."""
    workdir = tmp_path / "work"
    _write_package(workdir, "training", FAKE_TRAINER)
    (workdir / "mode.txt").write_text("term")
    outcome, progress, starts = _train(tmp_path, workdir)
    assert isinstance(outcome, Path), outcome
    assert starts == ["fresh", "resume"]
    assert (progress["attempts"], progress["trainer_restarts"]) == (2, 1)
    assert progress["last_trainer_death"] == "the trainer was killed by signal 15 (SIGTERM)"


def test_a_trainer_stopped_by_sigterm_past_its_restarts_fails_saying_so_not_terminated(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "_TRAINER", training._Rerun("trainer", 0, "the trainer", "training",
                                                                "from its checkpoint"))
    workdir = tmp_path / "work"
    _write_package(workdir, "training", FAKE_TRAINER)
    (workdir / "mode.txt").write_text("term")
    outcome, progress, starts = _train(tmp_path, workdir)
    assert isinstance(outcome, _Stop) and outcome.state == "FAILED", outcome
    assert str(outcome).startswith("training failed: the trainer was killed by signal 15 (SIGTERM) and had already "
                                   "been restarted 0 times"), outcome
    assert starts == ["fresh"]


@pytest.mark.parametrize("mode, death", [
    ("worker", "the trainer's torchrun worker of rank 1 was killed by signal 15 (SIGTERM)"),
    ("agent", "the trainer's torchrun agent was killed by signal 15 (SIGTERM)"),
])
def test_a_torchrun_run_stopped_by_sigterm_from_outside_resumes_from_its_checkpoint(tmp_path, mode, death):
    """torchrun reports its worker's 143 as it is (exitcode 143, not -15), and an agent stopped by SIGTERM stops its
    workers and exits 1: both failed the job, while a worker killed by SIGKILL was resumed."""
    workdir = tmp_path / "work"
    _write_package(workdir, "training", FAKE_WORKER)
    (workdir / "mode.txt").write_text(mode)
    outcome, progress, starts = _train(tmp_path, workdir, nproc=2)
    assert isinstance(outcome, Path), outcome
    assert starts == ["fresh", "resume"]
    assert (progress["attempts"], progress["trainer_restarts"]) == (2, 1)
    assert progress["last_trainer_death"] == death


def _evaluate_with(tmp_path: Path, signals: list[str]) -> tuple[Any, dict[str, Any], int]:
    """``_evaluate`` of a job with no default, whose evaluation child is stopped by ``signals`` in turn; what it
    returned (or the ``_Stop`` it raised), the stored metadata and how often the evaluation started."""
    workdir = tmp_path / "work"
    _write_package(workdir, "segsvc", FAKE_EVAL)
    (workdir / "signals.txt").write_text(" ".join(signals))
    store = _Store()
    runner = _runner(tmp_path, store, workdir)
    run = _Run(SimpleNamespace(id="job1", kind="train", spec=_spec(tmp_path / "shapes.yaml")),
               progress={"default_version": 0})

    async def main() -> Any:
        try:
            return await runner._evaluate(run, tmp_path / "candidate" / NAME / "1")
        except _Stop as stop:
            return stop

    outcome = asyncio.run(main())
    evals = workdir / "evals.txt"
    return outcome, store.progress, len(evals.read_text().split()) if evals.exists() else 0


def test_an_evaluation_stopped_by_sigint_from_outside_runs_again_as_one_killed_by_sigterm(tmp_path):
    """``segsvc eval`` exits 130 on SIGINT: it failed the job ("exit code 130"), while its death by SIGTERM (-15, no
    handler) ran it again."""
    outcome, progress, starts = _evaluate_with(tmp_path, ["SIGINT", "SIGTERM"])
    assert outcome == {"candidate": {"val": {"miou": 0.7}}, "default": {}}, outcome
    assert starts == 3 and progress["eval_restarts"] == 2
    assert progress["last_eval_death"] == "an evaluation was killed by signal 15 (SIGTERM)"


def test_an_evaluation_stopped_by_sigint_past_its_restarts_fails_saying_so(tmp_path):
    outcome, progress, starts = _evaluate_with(tmp_path, ["SIGINT"] * (training.MAX_EVAL_RESTARTS + 1))
    assert isinstance(outcome, _Stop) and outcome.state == "FAILED", outcome
    assert "an evaluation was killed by signal 2 (SIGINT) and had already been restarted 2 times" in str(outcome)
    assert starts == training.MAX_EVAL_RESTARTS + 1


# -- 2. a torchrun agent that fails with no report -----------------------------------------------------------------
def test_a_torchrun_agent_that_fails_by_itself_says_what_it_printed_in_one_line_without_paths(tmp_path):
    """It said only "the trainer exited with code 1": why (the rendezvous port taken) was in train.log alone."""
    workdir = tmp_path / "work"
    (workdir / "torch" / "distributed").mkdir(parents=True)  # found before the real torch (PYTHONPATH)
    (workdir / "torch" / "__init__.py").write_text("")
    (workdir / "torch" / "distributed" / "__init__.py").write_text("")
    (workdir / "torch" / "distributed" / "run.py").write_text(FAKE_AGENT.replace("{workdir}", str(workdir)))
    outcome, progress, _ = _train(tmp_path, workdir, nproc=2)
    assert isinstance(outcome, _Stop) and outcome.state == "FAILED", outcome
    said = str(outcome)
    assert said.startswith("training failed: the trainer exited with code 1: torch.distributed.DistNetworkError: "
                           "The server socket has failed"), said
    assert "EADDRINUSE" in said and "(log <project>/rdzv.log, .../rdzv)" in said, said
    assert "\n" not in said and "Traceback" not in said and str(tmp_path) not in said and "/var/tmp" not in said
    assert "trainer_restarts" not in progress


def test_the_last_words_of_a_torchrun_run_are_its_report_of_the_first_failure(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("[rank1]: RuntimeError: boom\n" + _root_cause(rank=1, exitcode=3))
    assert training.last_words(log) == "its torchrun worker of rank 1 exited with code 3"
    log.write_text("warming up\nRuntimeError: boom\n    ^^^^^\n\n=====\n")
    assert training.last_words(log) == "RuntimeError: boom"
    assert training.last_words(log, start=log.stat().st_size) is None


# -- 3. an evaluation killed between its two files -----------------------------------------------------------------
class _Killed(BaseException):
    """The evaluation child killed where this is raised."""


def test_an_evaluation_killed_before_its_report_is_run_again_after_a_restart(tmp_path, monkeypatch):
    """It wrote metrics.json and then report.png: one killed in between (with the server: a crash, a stop) was taken
    for finished by the restarted server, and report.png was missing from the job's artifacts."""
    from training import evaluate

    def killed(*args: Any, **kwargs: Any) -> None:
        raise _Killed()

    monkeypatch.setattr(evaluate, "plot_eval_report", killed)
    monkeypatch.setattr(evaluate, "isbi_metrics", lambda metrics, names: {})
    out = tmp_path / "state" / "training" / "job1" / "eval" / "candidate-val"
    manifest = SimpleNamespace(name=NAME, version=1, class_names=["bg", "fg"], palette=[(0, 0, 0), (9, 9, 9)],
                               inference=SimpleNamespace(backend="torch"))
    contract = SimpleNamespace(scale=1.0, tile_size=None, tile_overlap=0, flip_tta=False, tta_scales=(),
                               tile_padding=None, to_dict=dict)
    metrics = SimpleNamespace(to_dict=lambda names: {"miou": 0.7}, miou=0.7, pixel_accuracy=0.9, iou=[0.6, 0.8])
    result = SimpleNamespace(images=1, seconds=0.1, contract=contract, metrics=metrics, boundary={},
                             confusion=[[1, 0], [0, 1]], samples=[])
    options = SimpleNamespace(split="val", scale=None, tile=None, overlap=None, hflip=None, tta_scales=None,
                              device="cpu", precision="fp32", backend=None)
    with pytest.raises(_Killed):
        evaluate.write_outputs(out, manifest, SimpleNamespace(name="shapes", ignore_index=None), options, result)

    outcome, _, starts = _evaluate_with(tmp_path, [])  # the restarted server's job
    assert outcome == {"candidate": {"val": {"miou": 0.7}}, "default": {}}, outcome
    assert starts == 1, "the evaluation was taken for finished"
    assert (out / "report.png").is_file()


# -- 4. the phase a cancel names -----------------------------------------------------------------------------------
@pytest.mark.parametrize("child, said", [(1, "cancelled while training"),
                                         (2, "cancelled while evaluating the candidate")])
def test_a_cancel_that_lands_as_a_phases_last_child_finishes_names_that_phase(tmp_path, monkeypatch, child, said):
    """The trainer (or the last evaluation) finished as the cancel came: the job, stopped at its next check, said
    "cancelled while evaluating the candidate" (or "cancelled before publishing")."""
    workdir = tmp_path / "work"
    _write_package(workdir, "training", FAKE_TRAINER)
    _write_package(workdir, "segsvc", FAKE_EVAL)
    (workdir / "mode.txt").write_text("ok")
    (workdir / "signals.txt").write_text("")
    store = JobStore(tmp_path / "jobs.sqlite")
    runner = _runner(tmp_path, store, workdir)
    job, _ = store.submit(training.KIND, _spec(tmp_path / "shapes.yaml"), [])
    real_wait = GroupProcess.wait
    ended: list[int] = []

    async def wait(self: GroupProcess) -> int:
        code = await real_wait(self)
        ended.append(code)
        if len(ended) == child:  # the child has exited; the job has not seen it yet
            await runner.cancel(job.id)
        return code

    monkeypatch.setattr(GroupProcess, "wait", wait)
    try:
        final = asyncio.run(run_to_end(runner, job.id))
    finally:
        store.close()
    assert ended == [0] * child
    assert (final.state, final.error) == ("CANCELLED", said)


# -- from a read-only review ------------------------------------------------------------------------------------
def test_a_child_killed_while_the_server_stops_is_neither_restarted_nor_counted(tmp_path):
    """systemd and supervisord signal the service's whole group: the trainer exits 143 during the server's drain,
    was restarted as an outside death, and each restart of the service used up one of the job's two."""
    config = TrainingConfig(state_dir=tmp_path / "state", workdir=tmp_path, kill_grace_s=5)
    runner = TrainingRunner(_Store(), SimpleNamespace(repository=ModelRepository(tmp_path / "repo")), None,
                            config)  # type: ignore[arg-type]
    run = _Run(SimpleNamespace(id="job1", kind="train", spec={}))

    async def main() -> bool:
        runner.begin_stop()
        task = asyncio.ensure_future(runner._restart_after_kill(run, "the trainer was killed by SIGTERM",
                                                                training._TRAINER))
        for _ in range(20):  # loop turns, not time: it has no I/O to wait for before it would save
            await asyncio.sleep(0)
        parked = not task.done()
        task.cancel()  # what the runner's stop does to the job's task
        await asyncio.gather(task, return_exceptions=True)
        return parked

    assert asyncio.run(main()) is True
    assert "trainer_restarts" not in run.progress and "last_trainer_death" not in run.progress


@pytest.mark.parametrize("tail", [
    "SignalException: Process 1 got signal: 15\nTraceback (most recent call last):\nValueError: bad recipe\n",
    "torch.distributed.elastic.multiprocessing.api.SignalException: Process 7 got signal: 11\n",
], ids=["printed-by-the-trainer-earlier", "not-an-outside-signal"])
def test_torchruns_agent_signal_is_its_last_words_and_an_outside_one(tmp_path, tail):
    """A line the trainer itself printed earlier, or a signal of its own crash, read as the agent killed from
    outside: the run was restarted."""
    log = tmp_path / "train.log"
    log.write_text(tail)
    assert training.torchrun_death(log) is None


def test_server_paths_after_a_colon_are_cut_too():
    found = [m.group(0) for m in training._PATH.finditer("PYTHONPATH=/a:/srv/venv/lib, see file:///srv/x")]
    assert found == ["/a", "/srv/venv/lib", "///srv/x"]
