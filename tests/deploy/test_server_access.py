"""deploy/k8s: every `segsvc serve` reachable from other pods asks for a token and sits behind a NetworkPolicy.

Without ``--token-file`` a server answers every call unauthenticated, management ones included
(LoadModel, UnloadModel, SetDefaultVersion, jobs); without a NetworkPolicy selecting its pod, its
gRPC and unauthenticated metrics ports are open to the whole cluster. This holds for every manifest
that runs the server: the base Deployment, and the KServe predictor, whose pod KServe builds from the
ServingRuntime's containers and labels ``serving.kserve.io/inferenceservice: <name>``, ``component: predictor``.
"""

from __future__ import annotations

import shlex
from typing import Any, Iterator

import pytest

from tests.deploy.k8s_objects import Obj, containers, flag, load_all, pod_specs

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
DEFAULT_HOST = "0.0.0.0"  # segsvc serve --host, when not given
TEMPLATED = ("Deployment", "StatefulSet", "DaemonSet", "Job")


@pytest.fixture(scope="module")
def objects() -> list[Obj]:
    return load_all()


def serve_args(container: dict[str, Any]) -> list[str] | None:
    """The arguments after ``serve`` when the container runs ``segsvc serve`` (image entrypoint or not), else None.

    A shell script (``sh -c "... segsvc serve ..."``) is split into words.
    """
    words: list[str] = []
    for item in [*container.get("command", ()), *container.get("args", ())]:
        words += shlex.split(item) if any(c.isspace() for c in item) else [item]
    for i, word in enumerate(words):
        if word == "serve" and (i == 0 or words[i - 1].rsplit("/", 1)[-1] == "segsvc"):
            return words[i + 1:]
    return None


def listens_beyond_localhost(args: list[str]) -> bool:
    return (flag(args, "--host") or DEFAULT_HOST) not in LOCAL_HOSTS


def _namespace(obj: Obj) -> str:
    return obj.doc["metadata"].get("namespace", "default")


def server_pods(objects: list[Obj]) -> Iterator[tuple[str, str, dict[str, str], dict[str, Any]]]:
    """(what, namespace, pod labels, pod spec) of every pod that runs ``segsvc serve``.

    A KServe predictor's pod is its InferenceService's pod fields with the ServingRuntime's containers and
    volumes, labelled by KServe; the ServingRuntime itself is no pod.
    """
    runtimes = {(_namespace(o), o.name): o.doc["spec"] for o in objects if o.kind == "ServingRuntime"}
    for obj in objects:
        if obj.kind == "InferenceService":
            predictor = obj.doc["spec"]["predictor"]
            runtime = runtimes.get((_namespace(obj), predictor["model"]["runtime"]), {})
            (_, pod), = pod_specs(obj.doc)
            pod = {**pod, "containers": [*runtime.get("containers", ()), *pod.get("containers", ())],
                   "volumes": [*runtime.get("volumes", ()), *pod.get("volumes", ())]}
            labels = {**predictor.get("labels", {}), "serving.kserve.io/inferenceservice": obj.name,
                      "component": "predictor"}
        elif obj.kind in TEMPLATED or obj.kind == "Pod":
            template = obj.doc if obj.kind == "Pod" else obj.doc["spec"]["template"]
            (_, pod), = pod_specs(obj.doc)
            labels = template["metadata"].get("labels", {})
        else:
            continue
        if any(serve_args(c) is not None for c in containers(pod)):
            yield str(obj), _namespace(obj), labels, pod


def _selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    selector = policy["spec"]["podSelector"]
    assert not selector.get("matchExpressions"), "matchExpressions: not modelled by this check"
    return selector.get("matchLabels", {}).items() <= labels.items()


def token_problems(objects: list[Obj]) -> list[str]:
    """Each serve container that listens beyond localhost with no token file from a mounted Secret."""
    problems = []
    for obj in objects:
        for where, pod in pod_specs(obj.doc):
            secrets = {v["name"] for v in pod.get("volumes", ()) if "secret" in v}
            for c in containers(pod):
                args = serve_args(c)
                if args is None or not listens_beyond_localhost(args):
                    continue
                token_file = flag(args, "--token-file")
                what = f"{obj} {where}: {c['name']}"
                if token_file is None:
                    problems.append(f"{what}: serves on {flag(args, '--host') or DEFAULT_HOST} without --token-file")
                    continue
                mounts = [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts", ())
                          if m["name"] in secrets and m.get("readOnly")]
                if not any(token_file.startswith(path) for path in mounts):
                    problems.append(f"{what}: --token-file {token_file} is not in a read-only Secret mount")
    return problems


def policy_problems(objects: list[Obj]) -> list[str]:
    """Each server pod that no NetworkPolicy of its namespace restricting ingress selects."""
    policies = [o for o in objects if o.kind == "NetworkPolicy" and "Ingress" in o.doc["spec"].get("policyTypes", ())]
    problems = []
    for what, namespace, labels, _ in server_pods(objects):
        if not any(_namespace(p) == namespace and _selects(p.doc, labels) for p in policies):
            problems.append(f"{what}: no NetworkPolicy selects its pod (labels {labels})")
    return problems


def test_every_reachable_server_requires_a_token(objects: list[Obj]) -> None:
    runtimes = [o for o in objects if o.kind == "ServingRuntime"]
    assert runtimes and all(any(serve_args(c) is not None for c in o.doc["spec"]["containers"]) for o in runtimes)
    problems = token_problems(objects)
    assert not problems, "\n".join(problems)


def test_every_server_pod_is_behind_a_network_policy(objects: list[Obj]) -> None:
    found = {what.split(":")[0] for what, *_ in server_pods(objects)}
    assert {".", "kserve"} <= found, found  # the base Deployment and the KServe predictor
    problems = policy_problems(objects)
    assert not problems, "\n".join(problems)


def test_the_checks_catch_an_open_server() -> None:
    """A serve container without --token-file, on a pod no policy selects, fails both checks; on 127.0.0.1 neither."""
    def deployment(host: str) -> Obj:
        container = {"name": "s", "image": "segsvc:1", "args": ["serve", f"--host={host}"]}
        return Obj("x", {"apiVersion": "apps/v1", "kind": "Deployment",
                         "metadata": {"name": "open", "namespace": "segsvc"},
                         "spec": {"template": {"metadata": {"labels": {"app": "open"}},
                                               "spec": {"containers": [container]}}}})

    policy = Obj("x", {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                       "metadata": {"name": "p", "namespace": "segsvc"},
                       "spec": {"podSelector": {"matchLabels": {"app": "other"}}, "policyTypes": ["Ingress"]}})
    assert len(token_problems([deployment("0.0.0.0"), policy])) == 1
    assert len(policy_problems([deployment("0.0.0.0"), policy])) == 1
    assert not token_problems([deployment("127.0.0.1")])
    assert serve_args({"command": ["sh", "-c", "exec segsvc serve --port 1"]}) == ["--port", "1"]
    assert serve_args({"args": ["batch", "--out", "serve"]}) is None
