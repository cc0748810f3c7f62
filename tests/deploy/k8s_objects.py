"""Loading deploy/k8s: every object as kubectl would apply it, and the pod specs inside them.

``kubectl kustomize`` renders each kustomization (namespace and image overrides applied) when kubectl
is installed; without it, the files a kustomization lists are loaded and its ``namespace`` and the
``images`` of its components applied here (the kustomize features deploy/k8s uses, but for the optional
autoscaling component's patch, which the tests render with kubectl). Components (images/, autoscaling/)
are not rendered on their own; YAML files no kustomization lists are loaded as they are; files that hold
no Kubernetes object (helm values) are left out.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
CRD_GROUPS = ("ray.io", "serving.kserve.io")  # custom resources: their schemas are not Kubernetes'
CLUSTER_SCOPED = ("Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "ClusterServingRuntime")


@dataclass(frozen=True)
class Obj:
    source: str  # the kustomization directory or file, relative to deploy/k8s
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.doc["kind"]

    @property
    def name(self) -> str:
        return self.doc["metadata"]["name"]

    @property
    def is_custom(self) -> bool:
        return self.doc["apiVersion"].split("/")[0] in CRD_GROUPS

    def __str__(self) -> str:
        return f"{self.source}: {self.kind}/{self.name}"


def _is_object(doc: Any) -> bool:
    return (isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc
            and not doc["apiVersion"].startswith("kustomize.config.k8s.io"))


def _kustomize_fallback(directory: Path) -> list[dict[str, Any]]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    images = list(spec.get("images", ()))
    for component in spec.get("components", ()):
        images += yaml.safe_load((directory / component / "kustomization.yaml").read_text()).get("images", ())
    new = {i["name"]: (i.get("newName", i["name"]), i.get("newTag")) for i in images}
    docs = []
    for resource in spec.get("resources", ()):
        for doc in yaml.safe_load_all((directory / resource).read_text()):
            if not _is_object(doc):
                continue
            if spec.get("namespace") and doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = spec["namespace"]
            for container in _all_containers(doc):
                name, _, tag = container["image"].partition(":")
                if name in new:
                    new_name, new_tag = new[name]
                    container["image"] = f"{new_name}:{new_tag or tag}"
            docs.append(doc)
    return docs


def render(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return _kustomize_fallback(directory)
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if _is_object(d)]


def load_all() -> list[Obj]:
    objects: list[Obj] = []
    listed: set[Path] = set()
    for kustomization in sorted(K8S.rglob("kustomization.yaml")):
        directory = kustomization.parent
        spec = yaml.safe_load(kustomization.read_text())
        listed.update((directory / r).resolve() for r in spec.get("resources", ()))
        listed.update((directory / p["path"]).resolve() for p in spec.get("patches", ()) if "path" in p)
        if spec.get("kind") == "Component":
            continue  # rendered as part of the kustomizations that include it
        source = str(directory.relative_to(K8S)) if directory != K8S else "."
        objects += [Obj(source, d) for d in render(directory)]
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.resolve() in listed:
            continue
        objects += [Obj(str(path.relative_to(K8S)), d) for d in yaml.safe_load_all(path.read_text()) if _is_object(d)]
    return objects


# -- pod specs inside the objects -------------------------------------------------------------------
def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod an object creates, custom resources included."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield "spec.template.spec", spec["template"]["spec"]
    elif kind == "CronJob":
        yield "spec.jobTemplate.spec.template.spec", spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "Pod":
        yield "spec", spec
    elif kind == "RayJob":
        cluster = spec["rayClusterSpec"]
        yield "headGroupSpec", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", ()):
            yield f"workerGroupSpecs[{group['groupName']}]", group["template"]["spec"]
    elif kind == "InferenceService":
        yield "spec.predictor", inference_service_pod(doc)
    elif kind == "ServingRuntime":
        yield "spec", {k: v for k, v in spec.items() if k in POD_SPEC_FIELDS_OF_RUNTIME}


# KServe fields around the pod spec fields of a predictor, and around the container fields of its model.
KSERVE_COMPONENT_FIELDS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency",
                           "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
                           "deploymentStrategy", "model", "workerSpec"}
KSERVE_MODEL_FIELDS = {"modelFormat", "runtime", "protocolVersion", "storageUri", "storage"}
POD_SPEC_FIELDS_OF_RUNTIME = {"containers", "volumes", "nodeSelector", "affinity", "tolerations", "labels",
                              "annotations", "imagePullSecrets"}


def inference_service_pod(doc: dict[str, Any]) -> dict[str, Any]:
    """The predictor as a pod spec: its pod fields plus the model as the ``kserve-container``.

    The image comes from the ServingRuntime; a placeholder stands in for it here.
    """
    predictor = doc["spec"]["predictor"]
    pod = {k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_FIELDS}
    model = {k: v for k, v in predictor.get("model", {}).items() if k not in KSERVE_MODEL_FIELDS}
    pod["containers"] = [*pod.get("containers", ()), {"name": "kserve-container", "image": "runtime:image", **model}]
    return pod


def as_pod(name: str, pod_spec: dict[str, Any]) -> dict[str, Any]:
    """A Pod object around a pod spec, for Kubernetes' own schema."""
    spec = {k: v for k, v in pod_spec.items() if k not in ("labels", "annotations")}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def _all_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for _, spec in pod_specs(doc) for c in [*spec.get("initContainers", ()), *spec.get("containers", ())]
            if "image" in c]


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", ()), *pod_spec.get("containers", ())]


def flag(args: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in a container's args."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None
