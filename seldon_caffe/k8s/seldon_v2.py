"""--target seldon-v2: a Seldon Core v2 Server running the image, and the Model it serves.

Seldon Core v2 (mlops.seldon.io/v1alpha1) runs inference servers that load models on
demand: its agent downloads a Model's storageUri into the server pod and asks MLServer to
load it through MLServer's model repository API, after reading (and rewriting the name of)
the model-settings.json it finds there. So the Server here is Seldon's own `mlserver`
ServerConfig with our image in its `mlserver` container, started the way Seldon's ServerConfig
expects an MLServer image to start: `mlserver start $MLSERVER_MODELS_DIR`, a repository
that begins empty. Not s2i/bin/run: `seldon-caffe serve --protocol v2` serves one fixed
directory and would never see the models the agent adds. The image contributes seldon-caffe
(the runtime class model-settings.json names), its engines and the model's requirements.

Routing: the Server advertises only the capability `seldon-caffe` (replacing the ServerConfig's
list, so models for MLServer's other runtimes are never placed on it), the Model requires it
and names the Server. Checked in the tests against Seldon Core v2.10.2's Model and Server CRDs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import (
    MLSERVER_IMPLEMENTATION,
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

API_VERSION = "mlops.seldon.io/v1alpha1"
SERVER_CONFIG = "mlserver"  # Seldon's ServerConfig for MLServer...
SERVER_CONTAINER = "mlserver"  # ...and the name of its MLServer container, which ours replaces
CAPABILITY = "seldon-caffe"
TARGET = "seldon-v2"


def build(spec: DeploySpec) -> list[dict[str, Any]]:
    """[Server, Model]: the Server first, so that the Model finds it when applied in order."""
    refuse_seldon_workers(spec, TARGET)
    refuse(
        TARGET,
        {"--hpa": spec.hpa},
        "Seldon Core v2 scales models on inference lag, not CPU; use --replicas, then set "
        "minReplicas/maxReplicas on the Model and Server",
    )
    if not spec.model_uri:
        raise K8sError(
            f"--target {TARGET} needs --model-uri: Seldon Core v2's agent always fetches a Model from storage; "
            f"upload the model directory (with its {MODEL_SETTINGS}) and pass its URI"
        )
    if spec.model_uri.startswith("pvc://"):
        raise K8sError(
            f"--model-uri {spec.model_uri}: Seldon Core v2 fetches models with rclone, which cannot read a "
            "PersistentVolumeClaim; give gs://, s3://, https:// or an rclone REMOTE:PATH"
        )
    name = dns_name(spec.name)
    server_name = child_name(name, "-server")
    container: dict[str, Any] = {
        "name": SERVER_CONTAINER,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        # $(VAR) is expanded by Kubernetes from the container's env, where the ServerConfig sets it.
        "command": ["mlserver", "start", "$(MLSERVER_MODELS_DIR)"],
        # No parallel inference workers: our runtime runs hooks in its own thread pool, and
        # MLServer's workers would prefix every error message with an exception class path.
        "env": env_list({"MLSERVER_PARALLEL_WORKERS": 0, **spec.env}),
        "resources": resources(spec),
    }
    pod: dict[str, Any] = {"containers": [container]}
    if spec.gpus:
        pod["tolerations"] = gpu_tolerations(spec)
    server = {
        "apiVersion": API_VERSION,
        "kind": "Server",
        "metadata": metadata(spec, server_name),
        "spec": {
            "serverConfig": SERVER_CONFIG,
            "capabilities": [CAPABILITY],
            "replicas": spec.replicas,
            "podSpec": pod,
        },
    }
    model_spec: dict[str, Any] = {
        "storageUri": spec.model_uri,
        "requirements": [CAPABILITY],
        "server": server_name,
        "replicas": spec.replicas,
        # What the scheduler reserves on the server: the pod's whole memory request (one model a pod).
        "memory": spec.memory[0],
    }
    if spec.storage_secret:
        model_spec["secretName"] = spec.storage_secret  # a Secret holding the rclone remote's config
    # The agent copies a Model's parameters (strings) into model-settings.json's parameters.extra.
    parameters = {"runtime": spec.runtime, "threads": str(spec.threads) if spec.threads else None}
    if any(parameters.values()):
        model_spec["parameters"] = [{"name": k, "value": v} for k, v in parameters.items() if v]
    model = {"apiVersion": API_VERSION, "kind": "Model", "metadata": metadata(spec, name), "spec": model_spec}
    return [server, model]


def advice(spec: DeploySpec, model_dir: Path) -> list[str]:
    """The agent loads a model only through its model-settings.json: say when DIR's is missing or not ours."""
    settings = read_model_settings(model_dir)
    if settings is None:
        return [
            f"warning: {model_dir} has no {MODEL_SETTINGS}, without which Seldon Core v2's agent cannot load "
            f'the model; add {{"name": "{dns_name(spec.name)}", "implementation": "{MLSERVER_IMPLEMENTATION}"}} '
            "(seldon-caffe init writes it) before uploading the directory"
        ]
    return implementation_advice(model_dir, settings)
