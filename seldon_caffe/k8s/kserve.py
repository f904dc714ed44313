"""--target kserve: a KServe ServingRuntime for the image, and the InferenceService using it.

Modelled on KServe's own MLServer runtime (config/runtimes/kserve-mlserver.yaml, v0.20.0):
the container `kserve-container` runs MLServer on KServe's ports (HTTP 8080, gRPC 9000), and
MLSERVER_MODEL_* variables describe the model for a directory without a model-settings.json
(KServe fills in `{{.Name}}`, the InferenceService's name). It starts MLServer directly,
`mlserver start DIR`, as KServe's runtime starts the MLServer image, rather than through
s2i/bin/run: KServe's storage initializer has already put the model in /mnt/models, KServe
routes by the MLSERVER_* ports it sets, and no wrapper stands between it and the server.
DIR is /mnt/models with --model-uri, else the model built into the image (/microservice).

Not the ServingRuntime's `{{.Labels.modelClass}}` trick: the runtime class is ours, fixed.
MLSERVER_PARALLEL_WORKERS=0: our runtime runs hooks in its own thread pool in the serving
process; MLServer's parallel workers would prefix every error message with an exception
class path. Checked in the tests against KServe v0.20.0's InferenceService and
ServingRuntime CRDs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import (
    APP_DIR,
    MLSERVER_IMPLEMENTATION,
    MODEL_MOUNT,
    MODEL_SETTINGS,
    DeploySpec,
    K8sError,
    child_name,
    dns_name,
    env_list,
    gpu_tolerations,
    implementation_advice,
    metadata,
    read_model_settings,
    refuse,
    refuse_seldon_workers,
    resources,
)

API_VERSION = "serving.kserve.io/v1beta1"
RUNTIME_API_VERSION = "serving.kserve.io/v1alpha1"
CONTAINER = "kserve-container"  # the container KServe merges the InferenceService's model into
MODEL_FORMAT = "seldon-caffe"  # a model directory: model.yaml, the model's files, hooks.py
HTTP_PORT, GRPC_PORT = 8080, 9000  # KServe's MLServer runtime's
METRICS_PORT = 8082  # MLServer's default: metrics have their own port
TARGET = "kserve"


def build(spec: DeploySpec) -> list[dict[str, Any]]:
    """[ServingRuntime, InferenceService]: the runtime first, so the service finds it when applied in order."""
    refuse_seldon_workers(spec, TARGET)
    refuse(
        TARGET,
        {"--storage-secret": spec.storage_secret},
        "KServe's storage initializer takes credentials from the predictor's ServiceAccount "
        "(serviceAccountName) or its storage-config Secret",
    )
    if spec.model_uri and "://" not in spec.model_uri:
        raise K8sError(
            f"--model-uri {spec.model_uri}: KServe's storage initializer takes a URI (s3://, gs://, pvc://, "
            "https://...), not rclone's REMOTE:PATH"
        )
    name = dns_name(spec.name)
    runtime_name = child_name(name, "-runtime")
    model_dir = MODEL_MOUNT if spec.model_uri else APP_DIR
    container = {
        "name": CONTAINER,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["mlserver", "start", model_dir],
        "env": env_list(
            {
                "MLSERVER_MODEL_IMPLEMENTATION": MLSERVER_IMPLEMENTATION,
                "MLSERVER_MODEL_NAME": "{{.Name}}",
                "MLSERVER_MODEL_URI": model_dir,
                "MLSERVER_HTTP_PORT": HTTP_PORT,
                "MLSERVER_GRPC_PORT": GRPC_PORT,
                "MLSERVER_METRICS_PORT": METRICS_PORT,
                "MLSERVER_PARALLEL_WORKERS": 0,
            }
        ),
        # Ready when this model is (MLServer's /v2/health/ready is already true before any model
        # is registered); the runtime is this model's own, so its name is known here.
        "readinessProbe": _probe(f"/v2/models/{name}/ready", period=5, failures=3),
        "livenessProbe": _probe("/v2/health/live", period=10, failures=3),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "runAsNonRoot": True,  # the image runs as uid 8888 (s2i/Dockerfile)
            "capabilities": {"drop": ["ALL"]},
        },
    }
    runtime = {
        "apiVersion": RUNTIME_API_VERSION,
        "kind": "ServingRuntime",
        "metadata": metadata(spec, runtime_name),
        "spec": {
            "annotations": {"prometheus.kserve.io/port": str(METRICS_PORT), "prometheus.kserve.io/path": "/metrics"},
            "supportedModelFormats": [{"name": MODEL_FORMAT}],
            "protocolVersions": ["v2"],
            "multiModel": False,
            "containers": [container],
        },
    }
    model: dict[str, Any] = {"modelFormat": {"name": MODEL_FORMAT}, "runtime": runtime_name, "protocolVersion": "v2"}
    if spec.model_uri:
        model["storageUri"] = spec.model_uri
    env: dict[str, str] = {}
    if _extra(spec):
        # parameters.extra of the model settings MLServer reads from MLSERVER_MODEL_* (unless
        # the directory's model-settings.json has parameters of its own: see `advice`).
        env["MLSERVER_MODEL_EXTRA"] = json.dumps(_extra(spec))
    env.update(spec.env)
    if env:
        model["env"] = env_list(env)
    model["resources"] = resources(spec)
    predictor: dict[str, Any] = {}
    if spec.hpa:
        predictor.update(
            minReplicas=spec.hpa.min_replicas,
            maxReplicas=spec.hpa.max_replicas,
            scaleMetric="cpu",
            scaleMetricType="Utilization",
            scaleTarget=spec.hpa.cpu_percent,
        )
    else:
        predictor.update(minReplicas=spec.replicas, maxReplicas=spec.replicas)
    if spec.gpus:
        predictor["tolerations"] = gpu_tolerations(spec)
    predictor["model"] = model
    service = {"apiVersion": API_VERSION, "kind": "InferenceService", "metadata": metadata(spec, name)}
    service["spec"] = {"predictor": predictor}
    return [runtime, service]


def advice(spec: DeploySpec, model_dir: Path) -> list[str]:
    """What DIR's own model-settings.json changes: the model's name, and whether --runtime reaches it."""
    settings = read_model_settings(model_dir)
    if settings is None:
        return []  # MLServer takes the model from the MLSERVER_MODEL_* variables
    lines = implementation_advice(model_dir, settings)
    name = dns_name(spec.name)
    if settings.get("name") not in (None, "", name):
        lines.append(
            f"note: {model_dir / MODEL_SETTINGS} names the model {settings['name']!r}, so MLServer serves "
            f"/v2/models/{settings['name']}/infer, not /v2/models/{name}/infer; pass --name {settings['name']} "
            "or change the file to match"
        )
    extra = _extra(spec)
    if extra and "parameters" in settings:
        options = " and ".join(f"--{key}" for key in extra)
        lines.append(
            f"warning: {model_dir / MODEL_SETTINGS} has its own parameters, so MLServer ignores "
            f'MLSERVER_MODEL_EXTRA and {options} do not reach the model; add "extra": {json.dumps(extra)} '
            "to its parameters instead"
        )
    return lines


def _extra(spec: DeploySpec) -> dict[str, Any]:
    """The runtime's parameters.extra from the options: model.yaml's runtime overridden, the hook threads."""
    extra: dict[str, Any] = {}
    if spec.runtime:
        extra["runtime"] = spec.runtime
    if spec.threads:
        extra["threads"] = spec.threads
    return extra


def _probe(path: str, *, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": HTTP_PORT}, "periodSeconds": period, "failureThreshold": failures}
