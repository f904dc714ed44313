"""--target seldon-v1: a SeldonDeployment (machinelearning.seldon.io/v1) running the image.

The pod runs the image's own command, s2i/bin/run, which serves Seldon's protocol
(`seldon-caffe serve`), configured by the variables the Seldon operator sets. Checked in the
tests against the SeldonDeployment CRD of Seldon Core 1.17.1.

Choices that are not obvious from the CRD:
- Probes go to Seldon's own health endpoints on the port the operator names `http`:
  readiness on /health/status (answers 200 only once the model loaded), liveness on
  /health/ping, and a startup probe so a slow model load is not mistaken for a hung pod.
- `--model-uri` writes the storage-initializer init container itself: the Seldon operator
  only injects one for its prepackaged servers, never for a custom image like ours. It uses
  the operator's own names, so an operator that does inject one sees ours and adds nothing.
"""

from __future__ import annotations

from typing import Any

from .common import (
    MODEL_MOUNT,
    DeploySpec,
    K8sError,
    dns_name,
    env_list,
    gpu_tolerations,
    metadata,
    resources,
)

API_VERSION = "machinelearning.seldon.io/v1"
PVC_MOUNT = "/mnt/pvc"
STORAGE_INITIALIZER = "seldonio/rclone-storage-initializer:1.17.1"
# Seldon's serving defaults, as s2i/environment sets them: 1 REST worker x 4 threads, 1 gRPC server.
WORKERS, THREADS, GRPC_WORKERS = 1, 4, 1


def build_manifest(spec: DeploySpec) -> dict[str, Any]:
    """The SeldonDeployment for `spec`, as the dict `yaml.safe_dump` turns into the manifest."""
    name = dns_name(spec.name)
    container: dict[str, Any] = {
        "name": name,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "env": _env(spec),
        "resources": resources(spec),
        "startupProbe": _probe("/health/ping", period=5, timeout=3, failures=120),  # up to 10 min to load
        "readinessProbe": _probe("/health/status", period=5, timeout=3, failures=3),
        "livenessProbe": _probe("/health/ping", period=10, timeout=5, failures=3),
    }
    pod: dict[str, Any] = {"containers": [container]}
    graph: dict[str, Any] = {"name": name, "type": "MODEL", "children": []}
    parameters = []
    if spec.model_uri:
        parameters.append(_parameter("model_dir", _attach_model(spec, name, pod, container)))
    if spec.runtime:
        parameters.append(_parameter("runtime", spec.runtime))
    if parameters:
        graph["parameters"] = parameters
    if spec.gpus:
        pod["tolerations"] = gpu_tolerations(spec)

    component: dict[str, Any] = {"spec": pod}
    predictor: dict[str, Any] = {"name": "default"}
    if not spec.hpa:
        predictor["replicas"] = spec.replicas  # with an HPA, the HPA alone sets the count
    predictor.update(graph=graph, componentSpecs=[component])
    if spec.hpa:
        component["hpaSpec"] = {
            "minReplicas": spec.hpa.min_replicas,
            "maxReplicas": spec.hpa.max_replicas,
            "metricsv2": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": spec.hpa.cpu_percent},
                    },
                }
            ],
        }
    return {
        "apiVersion": API_VERSION,
        "kind": "SeldonDeployment",
        "metadata": metadata(spec, name),
        "spec": {"name": name, "protocol": "seldon", "predictors": [predictor]},
    }


def build(spec: DeploySpec) -> list[dict[str, Any]]:
    """The target's documents: the one SeldonDeployment."""
    return [build_manifest(spec)]


def _env(spec: DeploySpec) -> list[dict[str, str]]:
    threads = spec.threads or THREADS
    return env_list(
        {
            "GUNICORN_WORKERS": spec.workers or WORKERS,
            "GUNICORN_THREADS": threads,
            "GRPC_WORKERS": spec.grpc_workers or GRPC_WORKERS,
            "GRPC_THREADS": threads,
            **spec.env,
        }
    )


def _probe(path: str, *, period: int, timeout: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _parameter(name: str, value: str) -> dict[str, str]:
    return {"name": name, "type": "STRING", "value": value}


def _attach_model(spec: DeploySpec, name: str, pod: dict[str, Any], container: dict[str, Any]) -> str:
    """Make the model at spec.model_uri appear in the pod; return the model directory there."""
    uri = spec.model_uri or ""
    if uri.startswith("pvc://"):
        claim, _, sub_path = uri[len("pvc://") :].partition("/")
        if not claim:
            raise K8sError(f"--model-uri {uri}: expected pvc://CLAIM[/PATH]")
        volume = f"{name}-model-pvc"[:63]
        pod["volumes"] = [{"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}]
        container["volumeMounts"] = [{"name": volume, "mountPath": PVC_MOUNT, "readOnly": True}]
        return f"{PVC_MOUNT}/{sub_path}".rstrip("/")

    volume = f"{name}-provision-location"[:63].rstrip("-")
    initializer: dict[str, Any] = {
        "name": f"{name}-model-initializer"[:63].rstrip("-"),
        "image": STORAGE_INITIALIZER,
        "imagePullPolicy": "IfNotPresent",
        "args": [uri, MODEL_MOUNT],
        "volumeMounts": [{"name": volume, "mountPath": MODEL_MOUNT}],
        "resources": {"requests": {"cpu": "100m", "memory": "100Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
    }
    if spec.storage_secret:
        # rclone reads its remotes from RCLONE_CONFIG_<REMOTE>_* variables: keep them in a Secret.
        initializer["envFrom"] = [{"secretRef": {"name": spec.storage_secret}}]
    pod["initContainers"] = [initializer]
    pod["volumes"] = [{"name": volume, "emptyDir": {}}]
    container["volumeMounts"] = [{"name": volume, "mountPath": MODEL_MOUNT, "readOnly": True}]
    return MODEL_MOUNT
