"""Minimal JSON schemas of the custom resources in deploy/k8s (KubeRay RayJob, KServe InferenceService and
ServingRuntime).

kubernetes-validate knows Kubernetes' own kinds only, and the CRDs' full OpenAPI schemas (megabytes,
one per operator release) are not vendored here. These schemas pin what deploy/k8s relies on: the
API version, the required fields, their types and the enumerations (submission mode, protocol
version), and they refuse unknown keys at the levels written here, so a misspelt field fails. The
pod specs inside the resources are checked against Kubernetes' own Pod schema (test_kubernetes.py).
"""

from __future__ import annotations

from typing import Any

_STR = {"type": "string", "minLength": 1}
_INT = {"type": "integer", "minimum": 0}
_POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"spec": {"type": "object"}}}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": _STR}}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _METADATA,
                       "spec": spec},
    }


RAY_JOB = _resource("ray.io/v1", "RayJob", {
    "type": "object",
    "required": ["entrypoint", "rayClusterSpec"],
    "additionalProperties": False,
    "properties": {
        "entrypoint": _STR,
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": _INT,
        "activeDeadlineSeconds": _INT,
        "backoffLimit": _INT,
        "runtimeEnvYAML": {"type": "string"},
        "jobId": _STR,
        "metadata": {"type": "object"},
        "suspend": {"type": "boolean"},
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "entrypointResources": {"type": "string"},
        "submitterPodTemplate": _POD_TEMPLATE,
        "submitterConfig": {"type": "object"},
        "clusterSelector": {"type": "object"},
        "managedBy": _STR,
        "deletionStrategy": {"type": "object"},
        "rayClusterSpec": {
            "type": "object",
            "required": ["headGroupSpec"],
            "additionalProperties": False,
            "properties": {
                "rayVersion": _STR,
                "enableInTreeAutoscaling": {"type": "boolean"},
                "autoscalerOptions": {"type": "object"},
                "headServiceAnnotations": {"type": "object"},
                "suspend": {"type": "boolean"},
                "managedBy": _STR,
                "gcsFaultToleranceOptions": {"type": "object"},
                "headGroupSpec": {
                    "type": "object",
                    "required": ["template"],
                    "additionalProperties": False,
                    "properties": {"rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
                                   "template": _POD_TEMPLATE, "serviceType": _STR, "headService": {"type": "object"},
                                   "enableIngress": {"type": "boolean"}},
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["groupName", "template"],
                        "additionalProperties": False,
                        "properties": {"groupName": _STR, "replicas": _INT, "minReplicas": _INT, "maxReplicas": _INT,
                                       "numOfHosts": _INT, "idleTimeoutSeconds": _INT, "suspend": {"type": "boolean"},
                                       "rayStartParams": {"type": "object",
                                                          "additionalProperties": {"type": "string"}},
                                       "template": _POD_TEMPLATE, "scaleStrategy": {"type": "object"}},
                    },
                },
            },
        },
    },
})

_MODEL = {
    "type": "object",
    "required": ["modelFormat"],
    "properties": {
        "modelFormat": {"type": "object", "required": ["name"],
                        "properties": {"name": _STR, "version": _STR}, "additionalProperties": False},
        "runtime": _STR,
        "protocolVersion": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]},
        "storageUri": {"type": "string", "pattern": "^(pvc|s3|gs|hdfs|webhdfs|https?|oci|hf)://"},
    },
}

INFERENCE_SERVICE = _resource("serving.kserve.io/v1beta1", "InferenceService", {
    "type": "object",
    "required": ["predictor"],
    "properties": {
        "predictor": {
            "type": "object",
            "properties": {"model": _MODEL, "minReplicas": _INT, "maxReplicas": _INT, "scaleTarget": _INT,
                           "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]}},
        },
    },
})

SERVING_RUNTIME = _resource("serving.kserve.io/v1alpha1", "ServingRuntime", {
    "type": "object",
    "required": ["supportedModelFormats", "containers"],
    "properties": {
        "supportedModelFormats": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": _STR, "version": _STR, "autoSelect": {"type": "boolean"},
                           "priority": _INT}}},
        "protocolVersions": {"type": "array", "items": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}},
        "multiModel": {"type": "boolean"},
        "disabled": {"type": "boolean"},
        "containers": {"type": "array", "minItems": 1},
    },
})

SCHEMAS = {("ray.io/v1", "RayJob"): RAY_JOB,
           ("serving.kserve.io/v1beta1", "InferenceService"): INFERENCE_SERVICE,
           ("serving.kserve.io/v1alpha1", "ServingRuntime"): SERVING_RUNTIME}
