"""deploy/k8s: every object valid for current Kubernetes releases, and what a GPU service that scales needs.

Validation: kubernetes-validate --strict (unknown fields are errors) with its bundled schemas, for
every Kubernetes minor release from MIN_VERSION to the newest it ships; the custom resources (KubeRay,
KServe) against the minimal schemas of crd_schemas.py, and the pods inside them against Kubernetes'
own Pod schema. Then the contents: GPU limits and tolerations, probes, hardening, threads from the
CPU limit, the token file, the grace budget, Service, PVC, HPA, PDB, NetworkPolicy, KServe, RayJob.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError, all_versions

from tests.deploy.conftest import ROOT
from tests.deploy.crd_schemas import SCHEMAS
from tests.deploy.k8s_objects import K8S, Obj, as_pod, containers, flag, load_all, pod_specs, render

MIN_VERSION = (1, 31)  # the oldest Kubernetes minor release still maintained upstream when this was written


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


VERSIONS = sorted({v for v in all_versions() if _minor(v) >= MIN_VERSION}, key=_minor)


@pytest.fixture(scope="module")
def objects() -> list[Obj]:
    return load_all()


def _one(objects: list[Obj], kind: str, name: str = "segsvc", source: str = ".") -> dict:
    found = [o.doc for o in objects if o.kind == kind and o.name == name and o.source == source]
    assert len(found) == 1, f"expected one {kind}/{name} in deploy/k8s/{source}, found {len(found)}"
    return found[0]


README = (ROOT / "deploy" / "README.md").read_text()
KUBECTL_WHY = "kubectl renders the kustomizations (kubectl kustomize) with their components and patches"


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip(f"kubectl is not installed: {KUBECTL_WHY}")
    return found


def _readme_route(number: int) -> str:
    start = README.index(f"## Route {number}:")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def _bash_lines(text: str) -> list[str]:
    """The commands of the ```bash blocks of ``text``, continuation lines joined."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                lines.append(" ".join(line.split()))
    return lines


def _server(objects: list[Obj]) -> tuple[dict, dict, dict]:
    deployment = _one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "segsvc"]
    return deployment, pod, container


# -- validators -------------------------------------------------------------------------------------
def test_validator_knows_current_kubernetes() -> None:
    assert VERSIONS, f"kubernetes-validate ships no schema for Kubernetes >= {MIN_VERSION}: {all_versions()}"


def test_every_kubernetes_object_is_valid_strict(objects: list[Obj]) -> None:
    standard = [o for o in objects if not o.is_custom]
    kinds = {o.kind for o in standard}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy", "Job", "Namespace", "ServiceAccount"} <= kinds, kinds
    errors = []
    for obj in standard:
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(obj.doc, version, strict=True)
            except ValidationError as exc:
                errors.append(f"{obj} (Kubernetes {version}): {'.'.join(map(str, exc.path))}: {exc.message}")
            except SchemaNotFoundError as exc:
                errors.append(f"{obj}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_custom_resources_match_their_schemas_and_their_pods_kubernetes(objects: list[Obj]) -> None:
    """RayJob, InferenceService, ServingRuntime: minimal CRD schemas; their pod specs: Kubernetes' Pod, strict."""
    custom = [o for o in objects if o.is_custom]
    assert {o.kind for o in custom} == {"RayJob", "InferenceService", "ServingRuntime"}
    errors = []
    for obj in custom:
        schema = SCHEMAS.get((obj.doc["apiVersion"], obj.kind))
        assert schema is not None, f"{obj}: no schema for {obj.doc['apiVersion']} {obj.kind} in crd_schemas.py"
        for error in jsonschema.Draft202012Validator(schema).iter_errors(obj.doc):
            errors.append(f"{obj}: {'.'.join(map(str, error.path))}: {error.message}")
        for where, pod_spec in pod_specs(obj.doc):
            try:
                kubernetes_validate.validate(as_pod(obj.name, pod_spec), VERSIONS[-1], strict=True)
            except ValidationError as exc:
                errors.append(f"{obj} {where} as a Pod: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_strict_validation_catches_a_misspelt_field(objects: list[Obj]) -> None:
    """The validator really validates: one misspelt securityContext key fails."""
    deployment, _, _ = _server(objects)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(ValidationError, match="securityContxt"):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


# -- the server Deployment ----------------------------------------------------------------------------
def test_server_gets_a_gpu_and_whole_cpus(objects: list[Obj]) -> None:
    _, pod, container = _server(objects)
    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    for kind in ("cpu", "memory"):
        assert kind in resources["requests"] and kind in resources["limits"], kind
    assert resources["requests"] == resources["limits"], "requests = limits: Guaranteed QoS"
    assert flag(container["args"], "--device") == "cuda"


def test_torch_threads_come_from_the_cpu_limit(objects: list[Obj]) -> None:
    _, _, container = _server(objects)
    args = container["args"]
    assert flag(args, "--torch-threads") == "$(SEGSVC_CPU_LIMIT)"
    assert flag(args, "--io-threads") == "$(SEGSVC_CPU_LIMIT)"
    (env,) = [e for e in container["env"] if e["name"] == "SEGSVC_CPU_LIMIT"]
    field = env["valueFrom"]["resourceFieldRef"]
    assert field["resource"] == "limits.cpu" and field["containerName"] == container["name"]
    assert str(field["divisor"]) == "1"


def test_native_grpc_probes_on_the_grpc_port(objects: list[Obj]) -> None:
    _, _, container = _server(objects)
    port = int(flag(container["args"], "--port"))
    assert {"name": "grpc", "containerPort": port, "protocol": "TCP"} in container["ports"]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "time to load and warm up models"
    # Liveness must not restart a draining server (NOT_SERVING): it checks the socket only.
    assert container["livenessProbe"]["tcpSocket"]["port"] == port


def test_shutdown_fits_the_grace_period(objects: list[Obj]) -> None:
    _, pod, container = _server(objects)
    grace_s = float(flag(container["args"], "--grace-s"))
    drain_s = float(flag(container["args"], "--drain-timeout-s"))  # the batchers' drain, after the grace
    pre_stop_s = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pre_stop_s + grace_s + drain_s < pod["terminationGracePeriodSeconds"], \
        "preStop + grace + drain must finish before SIGKILL (test_review3_shutdown.py: with the margin, KServe too)"


def test_connections_age_so_clients_spread(objects: list[Obj]) -> None:
    _, _, container = _server(objects)
    assert 0 < float(flag(container["args"], "--max-connection-age-s")) <= 600


def test_token_comes_from_a_mounted_secret_file(objects: list[Obj]) -> None:
    _, pod, container = _server(objects)
    token_file = flag(container["args"], "--token-file")
    secret_volumes = {v["name"] for v in pod["volumes"] if "secret" in v}
    mounts = [m for m in container["volumeMounts"] if m["name"] in secret_volumes]
    assert any(token_file.startswith(m["mountPath"].rstrip("/") + "/") and m.get("readOnly") for m in mounts)
    (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[0]["name"]]
    assert not volume["secret"].get("optional"), "no token Secret must mean no pod, not an open server"


def test_server_pods_take_no_training_jobs(objects: list[Obj]) -> None:
    """The server image lacks the trainer's packages (serve.txt): a `serve` with --state-dir (jobs on, training
    too unless --max-training-jobs 0) would accept training jobs whose trainer dies on import."""
    for obj in objects:
        for where, pod in pod_specs(obj.doc):
            for c in containers(pod):
                args = c.get("args", [])
                if args[:1] == ["serve"] and flag(args, "--state-dir") is not None:
                    assert flag(args, "--max-training-jobs") == "0", f"{obj} {where}: {c['name']} would train"


def test_metrics_are_reachable_for_scraping(objects: list[Obj]) -> None:
    deployment, _, container = _server(objects)
    assert flag(container["args"], "--metrics-host") == "0.0.0.0"
    port = int(flag(container["args"], "--metrics-port"))
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in container["ports"]
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)


# -- hardening of every pod ---------------------------------------------------------------------------------
HARDENING_CHECKS = (
    "runAsNonRoot", "non-root uid", "allowPrivilegeEscalation false", "not privileged", "drop ALL capabilities",
    "no added capabilities", "readOnlyRootFilesystem", "seccomp RuntimeDefault", "no service-account token",
    "no secret in an environment variable", "pinned image tag", "cpu and memory requests and limits",
    "no host namespaces", "no hostPath volume",
)


def _hardening_problems(pod: dict, whole_pod: bool = True) -> list[str]:
    """The checks of HARDENING_CHECKS that ``pod`` fails (``whole_pod=False``: containers only)."""
    problems = []
    pod_ctx = pod.get("securityContext", {})
    if whole_pod and pod.get("automountServiceAccountToken") is not False:
        problems.append("no service-account token")
    if any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")):
        problems.append("no host namespaces")
    if any("hostPath" in v for v in pod.get("volumes", ())):
        problems.append("no hostPath volume")
    for c in containers(pod):
        ctx = {**pod_ctx, **c.get("securityContext", {})}
        name = c["name"]
        checks = {
            "runAsNonRoot": ctx.get("runAsNonRoot") is True,
            "non-root uid": ctx.get("runAsUser", 10001) >= 10000,
            "allowPrivilegeEscalation false": ctx.get("allowPrivilegeEscalation") is False,
            "not privileged": not ctx.get("privileged"),
            "drop ALL capabilities": ctx.get("capabilities", {}).get("drop") == ["ALL"],
            "no added capabilities": not ctx.get("capabilities", {}).get("add"),
            "readOnlyRootFilesystem": ctx.get("readOnlyRootFilesystem") is True,
            "seccomp RuntimeDefault": ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault",
            "no secret in an environment variable": not any(
                "secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", ())) and not any(
                "secretRef" in e for e in c.get("envFrom", ())),
            "pinned image tag": bool(re.fullmatch(r"[^:@]+(:[\w][\w.-]*|@sha256:[0-9a-f]{64})", c["image"]))
                                and not c["image"].endswith(":latest"),
            "cpu and memory requests and limits": all(
                k in c.get("resources", {}).get(level, {}) for level in ("requests", "limits")
                for k in ("cpu", "memory")),
        }
        problems += [f"{name}: {check}" for check, ok in checks.items() if not ok]
    return problems


def test_every_pod_passes_the_hardening_checks(objects: list[Obj]) -> None:
    problems = []
    checked = 0
    for obj in objects:
        for where, pod in pod_specs(obj.doc):
            checked += 1
            # A ServingRuntime holds containers, not a pod: KServe builds the pod from the InferenceService.
            problems += [f"{obj} {where}: {p}" for p in _hardening_problems(pod, obj.kind != "ServingRuntime")]
    assert checked >= 7, checked  # server, batch, train, ray head + worker, KServe predictor and runtime
    assert not problems, "\n".join(problems)


def test_hardening_checks_catch_a_weak_pod() -> None:
    weak = {"containers": [{"name": "c", "image": "segsvc:latest",
                            "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}]}
    found = {p.removeprefix("c: ") for p in _hardening_problems(weak)}
    assert found == set(HARDENING_CHECKS) - {"non-root uid", "not privileged", "no added capabilities",
                                             "no host namespaces", "no hostPath volume"}, found


def test_writable_paths_are_volumes(objects: list[Obj]) -> None:
    """With a read-only root filesystem, /tmp (and HOME=/tmp in the image) must be an emptyDir."""
    for obj in objects:
        for where, pod in pod_specs(obj.doc):
            if obj.kind in ("InferenceService", "ServingRuntime"):
                continue  # KServe adds its own volumes; the runtime writes nothing but /tmp caches
            empty_dirs = {v["name"] for v in pod.get("volumes", ()) if "emptyDir" in v}
            for c in pod["containers"]:
                tmp = [m for m in c.get("volumeMounts", ()) if m["mountPath"] == "/tmp"]
                assert tmp and tmp[0]["name"] in empty_dirs, f"{obj} {where}: {c['name']} needs an emptyDir on /tmp"


# -- Service, storage, scaling, disruption, network ---------------------------------------------------------
def test_service_exposes_grpc_and_metrics(objects: list[Obj]) -> None:
    deployment, _, _ = _server(objects)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = _one(objects, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["targetPort"] == "grpc" and ports["grpc"]["appProtocol"] == "grpc"
    assert ports["metrics"]["targetPort"] == "metrics"
    headless = _one(objects, "Service", "segsvc-headless")
    assert headless["spec"]["clusterIP"] == "None"


def test_model_repository_pvc(objects: list[Obj]) -> None:
    _, pod, container = _server(objects)
    pvc = _one(objects, "PersistentVolumeClaim", "segsvc-models")
    assert set(pvc["spec"]["accessModes"]) <= {"ReadOnlyMany", "ReadWriteMany"}
    (volume,) = [v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "segsvc-models"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] and flag(container["args"], "--model-repo") == mount["mountPath"]


def test_hpa_scales_the_deployment_on_cpu(objects: list[Obj]) -> None:
    deployment, _, _ = _server(objects)
    hpa = _one(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


@pytest.fixture(scope="module")
def with_queue_hpa(tmp_path_factory) -> list[dict]:
    """The base rendered as deploy/README.md says to scale on the queue: `- autoscaling` uncommented."""
    _kubectl()
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy)
    kustomization = copy / "kustomization.yaml"
    text = kustomization.read_text()
    assert "`- autoscaling`" in README and "\n  # - autoscaling" in text, "the component to uncomment"
    kustomization.write_text(text.replace("\n  # - autoscaling", "\n  - autoscaling"))
    return render(copy)


def test_queue_depth_hpa_replaces_the_cpu_one_at_every_apply_of_the_base(with_queue_hpa: list[dict]) -> None:
    """Applying the base again must not bring the CPU HPA back: the queue HPA is part of the base's render."""
    hpas = [d for d in with_queue_hpa if d["kind"] == "HorizontalPodAutoscaler"]
    assert [h["metadata"]["name"] for h in hpas] == ["segsvc"], hpas
    (metric,) = hpas[0]["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "segsvc_queue_depth"
    assert hpas[0]["metadata"]["namespace"] == "segsvc"
    kubernetes_validate.validate(hpas[0], VERSIONS[-1], strict=True)
    kinds = {d["kind"] for d in with_queue_hpa}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget", "NetworkPolicy"} <= kinds


def test_queue_depth_hpa_uses_the_metric_the_adapter_serves(with_queue_hpa: list[dict]) -> None:
    (hpa,) = [d for d in with_queue_hpa if d["kind"] == "HorizontalPodAutoscaler"]
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    values = yaml.safe_load((K8S / "autoscaling" / "prometheus-adapter-values.yaml").read_text())
    served = [r["name"]["as"] for r in values["rules"]["custom"]]
    assert name in served
    assert any(r["seriesQuery"].startswith(name + "{") for r in values["rules"]["custom"])
    from segsvc.server.metrics import ServerMetrics  # the server exports that metric

    metrics = ServerMetrics()
    metrics.watch_models(lambda: [("m", 1, 3, True)])
    assert metrics.registry.get_sample_value(name, {"model": "m", "version": "1"}) == 3


def test_the_queue_depth_metric_counts_the_requests_waiting_for_memory() -> None:
    """With --max-inflight-mb the binding limit, requests pile up in the memory budget, in no batch queue: the HPA
    saw a queue depth near 0 and never scaled out while clients got RESOURCE_EXHAUSTED."""
    values = yaml.safe_load((K8S / "autoscaling" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = [r for r in values["rules"]["custom"] if r["name"]["as"] == "segsvc_queue_depth"]
    query = " ".join(rule["metricsQuery"].split())
    assert 'segsvc_memory_waiting{lane="interactive",<<.LabelMatchers>>}' in query, query
    assert query.count("by (<<.GroupBy>>)") == 3, query  # every term per pod, a pod without the line kept
    from segsvc.server.metrics import ServerMetrics  # the server exports that metric, per lane

    metrics = ServerMetrics()
    metrics.watch_memory(lambda: {"interactive": 5})
    assert metrics.registry.get_sample_value("segsvc_memory_waiting", {"lane": "interactive"}) == 5


def test_pdb_keeps_a_server_up(objects: list[Obj]) -> None:
    deployment, _, _ = _server(objects)
    pdb = _one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # one at a time whatever the scale (test_review3_disruption.py), and never all of the minimum replicas
    assert pdb["spec"]["maxUnavailable"] == 1 < _one(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"]


def test_network_policy_limits_metrics_and_egress(objects: list[Obj]) -> None:
    deployment, _, _ = _server(objects)
    policy = _one(objects, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"} and policy["spec"]["egress"] == []
    by_port = {r["ports"][0]["port"]: r for r in policy["spec"]["ingress"]}
    assert "from" not in by_port["grpc"]  # clients anywhere in the cluster
    assert by_port["metrics"]["from"], "the unauthenticated metrics endpoint is open to the monitoring namespace only"


def test_namespace_enforces_restricted_pod_security(objects: list[Obj]) -> None:
    namespace = _one(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    outside = [str(o) for o in objects if o.kind != "Namespace" and o.doc["metadata"].get("namespace") != "segsvc"]
    assert not outside, f"outside the segsvc namespace: {outside}"


# -- KServe, batch and Ray ------------------------------------------------------------------------------
def test_kserve_targets_the_open_inference_protocol_over_grpc(objects: list[Obj]) -> None:
    isvc = _one(objects, "InferenceService", source="kserve")
    runtime = _one(objects, "ServingRuntime", source="kserve")
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "grpc-v2" and model["runtime"] == runtime["metadata"]["name"]
    assert model["storageUri"] == "pvc://segsvc-models"
    assert int(model["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert "grpc-v2" in runtime["spec"]["protocolVersions"]
    (container,) = runtime["spec"]["containers"]
    (port,) = container["ports"]
    assert port["name"] == "h2c" and flag(container["args"], "--port") == str(port["containerPort"])
    assert flag(container["args"], "--model-repo") == "/mnt/models"
    text = (K8S / "kserve" / "inferenceservice.yaml").read_text()
    assert "Open Inference Protocol" in text and "inference.GRPCInferenceService" in text
    from segsvc.server.oip_pb import grpc_service_pb2

    assert "GRPCInferenceService" in grpc_service_pb2.DESCRIPTOR.services_by_name  # the endpoint it names exists


def test_batch_job_resumes_on_retry(objects: list[Obj]) -> None:
    job = _one(objects, "Job", "segsvc-batch", source="jobs")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    script = container["args"][0]
    assert "segsvc batch --resume" in script and ".segsvc-batch.sqlite" in script
    from segsvc.jobs.offline import STATE_FILE

    assert STATE_FILE in script
    assert job["spec"]["backoffLimit"] >= 1
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1


def test_training_job_runs_torchrun_on_its_gpus(objects: list[Obj]) -> None:
    job = _one(objects, "Job", "segsvc-train", source="jobs")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["torchrun"]
    nproc = int(flag(container["args"], "--nproc_per_node"))
    assert nproc == int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert "-m" in container["args"] and container["args"][container["args"].index("-m") + 1] == "training"
    recipe = flag(container["args"], "--config")
    assert (ROOT / recipe).is_file(), recipe


def test_rayjob_runs_segsvc_batch_on_ray(objects: list[Obj]) -> None:
    rayjob = _one(objects, "RayJob", "segsvc-batch-ray", source="jobs")
    entrypoint = rayjob["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["segsvc", "batch"] and flag(entrypoint, "--engine") == "ray"
    actors = int(flag(entrypoint, "--actors"))
    (workers,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (worker,) = workers["template"]["spec"]["containers"]
    assert actors <= workers["replicas"] * int(worker["resources"]["limits"]["nvidia.com/gpu"])
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (ray_pin,) = pyproject["project"]["optional-dependencies"]["ray"]
    assert ray_pin.endswith("==" + rayjob["spec"]["rayClusterSpec"]["rayVersion"]), "the image's Ray = rayVersion"


def test_jobs_apply_by_the_labels_the_readme_gives(objects: list[Obj]) -> None:
    """deploy/README.md applies deploy/k8s/jobs one piece at a time with -l app.kubernetes.io/component=..."""
    readme = (ROOT / "deploy" / "README.md").read_text()
    selectors = re.findall(r"kubectl apply -k deploy/k8s/jobs -l app\.kubernetes\.io/component=([\w-]+)", readme)
    by_component: dict[str, list[str]] = {}
    for obj in objects:
        if obj.source == "jobs":
            by_component.setdefault(obj.doc["metadata"]["labels"]["app.kubernetes.io/component"], []).append(obj.kind)
    assert set(selectors) == set(by_component), (selectors, by_component)
    assert by_component["storage"] == ["PersistentVolumeClaim", "PersistentVolumeClaim"]
    assert all(len(kinds) == 1 for c, kinds in by_component.items() if c != "storage"), by_component


# -- images, models and the order of the README -----------------------------------------------------------
def _images(doc: object) -> list[str]:
    """Every ``image`` value anywhere in an object (custom resources' pod templates included)."""
    if isinstance(doc, dict):
        return [v for k, v in doc.items() if k == "image" and isinstance(v, str)] + \
               [i for v in doc.values() for i in _images(v)]
    if isinstance(doc, list):
        return [i for v in doc for i in _images(v)]
    return []


def test_one_registry_edit_retargets_every_image(tmp_path: Path) -> None:
    """deploy/README.md's one `kustomize edit` gives every manifest (base, jobs, KServe) the registry's images."""
    kubectl = _kubectl()
    match = re.search(r"\(cd deploy/k8s/images && kustomize edit set image ([^)]*)\)", README)
    assert match, "deploy/README.md sets the images in deploy/k8s/images"
    registry = "registry.example.com/team"
    assignments = shlex.split(match.group(1).replace("$REGISTRY", registry))
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    if shutil.which("kustomize"):
        subprocess.run([shutil.which("kustomize"), "edit", "set", "image", *assignments], cwd=copy / "images",
                       check=True, capture_output=True, timeout=60)
    else:  # what `kustomize edit set image NAME=NEW_NAME:TAG` does to the entry NAME
        spec_path = copy / "images" / "kustomization.yaml"
        spec = yaml.safe_load(spec_path.read_text())
        for assignment in assignments:
            name, new = assignment.split("=", 1)
            new_name, new_tag = new.rsplit(":", 1)
            (entry,) = [i for i in spec["images"] if i["name"] == name]
            entry.update(newName=new_name, newTag=new_tag)
        spec_path.write_text(yaml.safe_dump(spec))
    seen: dict[str, set[str]] = {}
    for directory in (copy, copy / "jobs", copy / "kserve"):
        out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        images = [i for d in yaml.safe_load_all(out.stdout) if d for i in _images(d)]
        assert images, directory
        seen[directory.name] = set(images)
    everywhere = set().union(*seen.values())
    assert everywhere == {f"{registry}/segsvc:0.1.0", f"{registry}/segsvc-trainer:0.1.0"}, seen
    assert seen["kserve"] == {f"{registry}/segsvc:0.1.0"}
    # The trainer image the jobs need is built and pushed in the same route.
    route = "\n".join(_bash_lines(_readme_route(2)))
    for image in ("segsvc", "segsvc-trainer"):
        assert f"docker push $REGISTRY/{image}:0.1.0" in route, image


def test_no_kustomization_sets_images_of_its_own() -> None:
    """Only the images component names images, so no kustomization can override it with an unqualified one."""
    for path in sorted(K8S.rglob("kustomization.yaml")):
        spec = yaml.safe_load(path.read_text())
        if path.parent.name == "images":
            assert spec["kind"] == "Component"
            continue
        assert "images" not in spec, path
        if spec.get("kind") != "Component":
            assert any(Path(c).name == "images" for c in spec.get("components", ())), f"{path} lacks the images"


def test_jobs_ask_for_the_model_the_train_job_publishes(objects: list[Obj]) -> None:
    """The model name of the train Job's recipe (output.model_name, else the recipe's name, with the
    Job's profile and --set overrides) is the model the batch Job and the RayJob segment with."""
    from training.config import load_config

    job = _one(objects, "Job", "segsvc-train", source="jobs")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_config(ROOT / flag(args, "--config"), overrides, flag(args, "--profile"))
    assert cfg.output.repo == "/models"
    published = cfg.model_name

    batch = _one(objects, "Job", "segsvc-batch", source="jobs")
    (batch_container,) = batch["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in batch_container["env"]}
    assert "--model \"$MODEL\"" in batch_container["args"][0]
    assert env["MODEL"] == published

    rayjob = _one(objects, "RayJob", "segsvc-batch-ray", source="jobs")
    assert flag(rayjob["spec"]["entrypoint"].split(), "--model") == published


def test_models_shell_mounts_the_repository_read_write(objects: list[Obj]) -> None:
    pod = _one(objects, "Pod", "segsvc-models-shell", source="jobs")
    spec = pod["spec"]
    (volume,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"] == {"claimName": "segsvc-models"}, "read-write: no readOnly"
    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == "/models" and not mount.get("readOnly")
    _, _, server = _server(objects)
    assert container["image"] == server["image"], "the server image: python and segsvc for DEFAULT"
    assert spec["restartPolicy"] == "Never" and spec["activeDeadlineSeconds"] <= 4 * 3600


def test_readme_puts_a_model_on_the_pvc_before_the_first_rollout(objects: list[Obj]) -> None:
    """An empty PVC keeps the servers NOT_SERVING until the startup probe restarts them: the model goes first."""
    lines = _bash_lines(_readme_route(2))

    def first(pattern: str) -> int:
        found = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        assert found, pattern
        return found[0]

    pvc = first(r"^kubectl apply -k deploy/k8s -l app\.kubernetes\.io/component=models\b")
    shell = first(r"^kubectl apply -k deploy/k8s/jobs -l app\.kubernetes\.io/component=models-shell\b")
    copy = first(r"kubectl -n segsvc exec -i segsvc-models-shell -- tar -x\S* .*-C /models")
    servers = first(r"^kubectl apply -k deploy/k8s(\s|$)(?!.*-l)")
    rollout = first(r"^kubectl -n segsvc rollout status deploy/segsvc")
    assert pvc < shell < copy < servers < rollout, lines
    # The selector picks the model repository PVC alone out of the base.
    base = [o for o in objects if o.source == "."]
    selected = [f"{o.kind}/{o.name}" for o in base
                if o.doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "models"]
    assert selected == ["PersistentVolumeClaim/segsvc-models"], selected


def test_readme_command_moves_the_default_version_in_the_repository(tmp_path: Path) -> None:
    """The documented way to change a model's default for every replica: the exact command writes DEFAULT."""
    from segsvc.inference.repository import DEFAULT_FILE
    from segsvc.models.artifact import MANIFEST_FILE

    match = re.search(r"kubectl -n segsvc exec segsvc-models-shell -- python -c \\\n\s*'([^']+)'", README)
    assert match, "deploy/README.md gives the command that writes DEFAULT from the models pod"
    code = match.group(1)
    assert '"/models"' in code
    name = re.search(r'set_default\("([^"]+)", (\d+)\)', code)
    model, version = name.group(1), name.group(2)
    repo = tmp_path / "models"
    for v in ("1", version, str(int(version) + 1)):
        (repo / model / v).mkdir(parents=True, exist_ok=True)
        (repo / model / v / MANIFEST_FILE).write_text("{}")
    out = subprocess.run([sys.executable, "-c", code.replace('"/models"', repr(str(repo)))], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert out.returncode == 0, out.stderr
    assert (repo / model / DEFAULT_FILE).read_text() == f"{version}\n"
    assert "SetDefaultVersion" in README and "only the replica that took the call" in README
