"""The stop budget of every shipped server: the platform waits for the whole drain before it kills.

On SIGTERM ``segsvc serve`` turns health NOT_SERVING, gives the calls in flight ``--grace-s``, then
drains the models' batchers for at most ``--drain-timeout-s`` (forward passes already running), then
stops jobs and exits. Kubernetes sends SIGKILL ``terminationGracePeriodSeconds`` after the pod's
deletion began (the preStop hook's time counts against it), Compose ``stop_grace_period`` after
SIGTERM. Each must cover preStop + grace + drain + a margin for the rest of the stop, or a slow drain
is killed halfway, the very case the drain timeout is there to bound. The manifests state both flags,
so the budget can be read (and checked) where the period is set.

Every ``segsvc`` command line of the manifests is also parsed with the real CLI parser, so a flag the
server does not know (misspelt, or not yet released) fails here rather than in a crash-looping pod.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from segsvc.cli import build_parser
from tests.deploy.conftest import DEPLOY, ROOT
from tests.deploy.k8s_objects import Obj, flag, load_all, pod_specs

MARGIN_S = 5.0  # jobs stop, metrics close, interpreter exit (1.6 s measured with nothing in flight)
TRAINERS_EXIT_S = 10.0  # with training jobs on: their trainers' own stop (segsvc serve --help, --drain-timeout-s)
SUBCOMMANDS = {"serve", "batch", "train", "eval", "health", "segment", "jobs", "models", "export", "data",
               "datasets", "curves"}


@pytest.fixture(scope="module")
def objects() -> list[Obj]:
    return load_all()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _serve_containers(objects: list[Obj]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(what, pod spec, container) of every container that runs ``segsvc serve`` as the image's entrypoint.

    A KServe predictor's pod gets the ServingRuntime's containers: the runtime's container is paired with
    the InferenceService's pod spec (where terminationGracePeriodSeconds goes).
    """
    found = []
    runtimes = {o.name: o.doc["spec"] for o in objects if o.kind == "ServingRuntime"}
    for obj in objects:
        if obj.kind == "ServingRuntime":
            continue
        for where, pod in pod_specs(obj.doc):
            containers = list(pod.get("containers", ()))
            if obj.kind == "InferenceService":
                runtime = runtimes[obj.doc["spec"]["predictor"]["model"]["runtime"]]
                containers = list(runtime["containers"])
            for c in containers:
                if not c.get("command") and c.get("args", [None])[0] == "serve":
                    found.append((f"{obj} {where}: {c['name']}", pod, c))
    return found


def _seconds(text: str | int | float) -> float:
    """A Compose duration (``60s``, ``1m30s``) or a number of seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", text)
    assert parts and text, f"not a duration: {text!r}"
    return 60 * float(parts.group(1) or 0) + float(parts.group(2) or 0)


def _pre_stop_s(container: dict[str, Any]) -> float:
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep", f"a preStop hook whose length is unknown: {command}"
    return float(command[1])


def _margin_s(args: list[str]) -> float:
    """The margin a stop needs besides preStop, grace and drain: more where the server runs training jobs
    (``--state-dir`` turns jobs on; ``--max-training-jobs`` defaults to 1)."""
    training = flag(args, "--state-dir") is not None and flag(args, "--max-training-jobs") != "0"
    return MARGIN_S + (TRAINERS_EXIT_S if training else 0.0)


def _parse(args: list[str]) -> Any:
    """``args`` through segsvc's own parser, as the entrypoint would see them (``$(VAR)`` filled in)."""
    argv = [re.sub(r"\$\((\w+)\)", "4", a) for a in args]
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"segsvc {' '.join(argv[:1])} refuses the manifest's arguments {argv} (exit {exc.code}); "
                    "see the parser's message above")


def test_the_servers_found_are_the_ones_shipped(objects: list[Obj]) -> None:
    found = {what.split(":")[0] for what, _, _ in _serve_containers(objects)}
    assert {".", "kserve"} <= found, found  # the base Deployment and the KServe predictor


def test_kubernetes_stop_budget_covers_pre_stop_grace_drain_and_a_margin(objects: list[Obj]) -> None:
    problems = []
    for what, pod, container in _serve_containers(objects):
        args = container["args"]
        grace, drain = flag(args, "--grace-s"), flag(args, "--drain-timeout-s")
        if grace is None or drain is None:
            problems.append(f"{what}: states no --grace-s / --drain-timeout-s, so its budget cannot be read")
            continue
        needed = _pre_stop_s(container) + float(grace) + float(drain) + _margin_s(args)
        period = pod.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
        if period < needed:
            problems.append(f"{what}: terminationGracePeriodSeconds {period} < preStop {_pre_stop_s(container)} "
                            f"+ grace {grace} + drain {drain} + margin {_margin_s(args)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", ["segsvc", "segsvc-cpu"])
def test_compose_stop_grace_covers_grace_drain_and_a_margin(compose: dict[str, Any], name: str) -> None:
    server = compose["services"][name]
    command = server["command"]
    assert "--grace-s" in command and "--drain-timeout-s" in command, "the budget stated in the command"
    grace = float(command[command.index("--grace-s") + 1])
    drain = float(command[command.index("--drain-timeout-s") + 1])
    assert _seconds(server["stop_grace_period"]) >= grace + drain + _margin_s(command)


def test_every_segsvc_command_line_of_the_manifests_parses(objects: list[Obj], compose: dict[str, Any]) -> None:
    """The arguments of every container whose entrypoint is the image's ``segsvc`` (no ``command``), of the
    Compose services and of the Dockerfile's CMD are ones the real parser accepts."""
    lines: list[tuple[str, list[str]]] = []
    for obj in objects:
        for where, pod in pod_specs(obj.doc):
            for c in [*pod.get("initContainers", ()), *pod.get("containers", ())]:
                if not c.get("command") and c.get("args") and c["args"][0] in SUBCOMMANDS:
                    lines.append((f"{obj} {where}: {c['name']}", c["args"]))
        if obj.kind == "ServingRuntime":
            lines += [(f"{obj}: {c['name']}", c["args"]) for c in obj.doc["spec"]["containers"]]
    for name, service in compose["services"].items():
        if isinstance(service.get("command"), list) and service["command"][0] in SUBCOMMANDS:
            lines.append((f"docker-compose.yml: {name}", service["command"]))
    dockerfile = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    for cmd in re.findall(r"^CMD (\[.*\])$", dockerfile, re.M):
        if "--help" not in cmd:  # the trainer's CMD prints its help: nothing to parse
            lines.append(("Dockerfile CMD", yaml.safe_load(cmd)))
    assert len(lines) >= 6, lines  # server, KServe, compose x2 and the trainer, the Dockerfile's server CMD
    for what, args in lines:
        parsed = _parse(args)
        assert parsed.command == args[0], what
        if args[0] == "serve":
            for name in ("--grace-s", "--drain-timeout-s"):
                stated = flag(args, name)
                if stated is not None:  # the value the server will use is the one the budget reads
                    assert getattr(parsed, name[2:].replace("-", "_")) == float(stated), (what, name)


BASELINE_MIB = 3 * 1024  # torch, the CUDA context's host side, gRPC, the loaded models (0.8-1.0 GB RSS on CPU)


def _mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 ** 2, "K": 1e3 / 2 ** 20, "M": 1e6 / 2 ** 20,
             "G": 1e9 / 2 ** 20}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity)).groups()
    return float(number) * units[unit] if unit else float(number) / 2 ** 20


def _server_memory_mib(args: list[str]) -> float:
    """The most memory ``segsvc serve`` with ``args`` may take: the process itself, the images being served
    (--max-inflight-mb), and the requests its calls hold before they are admitted to that budget: one message
    each (--max-message-mb), at most --max-concurrent-rpcs calls at once and MANAGE_RESERVE management calls."""
    from segsvc.server.app import MANAGE_RESERVE

    parsed = _parse(args)
    return BASELINE_MIB + parsed.max_inflight_mb + (parsed.max_concurrent_rpcs + MANAGE_RESERVE) * parsed.max_message_mb


def test_memory_limit_holds_the_servers_image_budget(objects: list[Obj]) -> None:
    """--max-inflight-mb bounds the memory of the images being served, --max-concurrent-rpcs x --max-message-mb
    the requests waiting for it; the container's limit must hold both on top of the process itself, or the
    budget's worst case (a burst of large images) is an OOM kill instead of a wait or a RESOURCE_EXHAUSTED."""
    checked = 0
    for what, _, container in _serve_containers(objects):  # the Deployment's container, the KServe runtime's
        memory = container["resources"]["limits"]["memory"]
        assert _mib(memory) >= _server_memory_mib(container["args"]), (what, memory)
        checked += 1
    runtimes = {o.name: o.doc["spec"]["containers"][0] for o in objects if o.kind == "ServingRuntime"}
    for obj in [o for o in objects if o.kind == "InferenceService"]:  # KServe puts the model's resources on it
        model = obj.doc["spec"]["predictor"]["model"]
        memory = model["resources"]["limits"]["memory"]
        assert _mib(memory) >= _server_memory_mib(runtimes[model["runtime"]]["args"]), memory
        checked += 1
    assert checked >= 3, "the Deployment, the KServe runtime and its InferenceService"
