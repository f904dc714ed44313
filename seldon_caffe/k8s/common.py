"""What every deployment target shares: the settings, names, resources and YAML output.

A package rather than one module because each target (Seldon Core v1, Seldon Core v2,
KServe) writes different objects from the same settings; one file each keeps every target
readable on its own, and this one keeps what they must agree on (names, quantities, the
MLServer runtime class) in one place.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import SeldonCaffeError

GPU_RESOURCE = "nvidia.com/gpu"
MODEL_MOUNT = "/mnt/models"  # where Seldon v1's and KServe's storage initializers put the model
APP_DIR = "/microservice"  # where s2i/bin/assemble installs the model directory in the image
# The MLServer runtime (seldon_caffe/v2) that serves a model directory over V2: named in
# model-settings.json (init) and in KServe's MLSERVER_MODEL_IMPLEMENTATION.
MLSERVER_IMPLEMENTATION = "seldon_caffe.v2.SeldonCaffeRuntime"
MODEL_SETTINGS = "model-settings.json"  # the file MLServer (and Seldon Core v2's agent) looks for
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class K8sError(SeldonCaffeError):
    """A k8s option that cannot make a valid manifest; the message says what is allowed."""


@dataclass
class Hpa:
    """Horizontal pod autoscaling on CPU: MIN..MAX replicas around CPU% of the request."""

    min_replicas: int
    max_replicas: int
    cpu_percent: int


@dataclass
class DeploySpec:
    """Everything the manifests depend on; the defaults are what `init` writes.

    workers, threads and grpc_workers are None when not asked for: they size Seldon v1's
    gunicorn and gRPC servers (default 1, 4, 1 there). On V2, threads is the size of the
    runtime's pool running the hooks (its parameters.extra.threads); the rest are refused.
    """

    name: str
    image: str
    replicas: int = 1
    hpa: Hpa | None = None
    gpus: int = 0
    model_uri: str | None = None
    storage_secret: str | None = None
    runtime: str | None = None
    namespace: str | None = None
    cpu: tuple[str, str] = ("1", "2")  # request, limit
    memory: tuple[str, str] = ("1Gi", "2Gi")
    workers: int | None = None
    threads: int | None = None
    grpc_workers: int | None = None
    env: dict[str, str] = field(default_factory=dict)


def dns_name(text: str) -> str:
    """`text` as a Kubernetes name: lower case, digits and '-', <= 63 chars, starting with a letter.

    A letter first because the operators name Services after the deployment, and Service
    names must start with one (DNS-1035), stricter than most objects' DNS-1123.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:63].rstrip("-")
    if not slug:
        raise K8sError(f"{text!r} has no letters or digits to make a Kubernetes name from; pass --name")
    return slug if slug[0].isalpha() else f"m-{slug}"[:63].rstrip("-")


def child_name(name: str, suffix: str) -> str:
    """`name` + `suffix` within 63 chars, shortening the name rather than the suffix."""
    return name[: 63 - len(suffix)].rstrip("-") + suffix


def metadata(spec: DeploySpec, name: str) -> dict[str, Any]:
    """metadata of every generated object: its name, and --namespace once checked."""
    meta: dict[str, Any] = {"name": name}
    if spec.namespace:
        if not _DNS_LABEL.match(spec.namespace):
            raise K8sError(f"namespace {spec.namespace!r} is not a Kubernetes name (lower case, digits, '-')")
        meta["namespace"] = spec.namespace
    return meta


def resources(spec: DeploySpec) -> dict[str, Any]:
    """The model container's requests and limits (--cpu, --memory, --gpu)."""
    requests: dict[str, Any] = {"cpu": spec.cpu[0], "memory": spec.memory[0]}
    limits: dict[str, Any] = {"cpu": spec.cpu[1], "memory": spec.memory[1]}
    if spec.gpus:
        limits[GPU_RESOURCE] = spec.gpus  # extended resources: requests default to the limit
    return {"requests": requests, "limits": limits}


def gpu_tolerations(spec: DeploySpec) -> list[dict[str, str]]:
    """GPU node pools are usually tainted so that only pods asking for GPUs land there."""
    return [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}] if spec.gpus else []


def env_list(settings: Mapping[str, object]) -> list[dict[str, str]]:
    """A container's env from a mapping; Kubernetes wants every value as a string."""
    return [{"name": key, "value": str(value)} for key, value in settings.items()]


def refuse(target: str, given: Mapping[str, object], why: str) -> None:
    """One line naming the options that `target` cannot honour, when any of them was given."""
    named = [option for option, value in given.items() if value not in (None, False)]
    if named:
        raise K8sError(f"{', '.join(named)}: not for --target {target}: {why}")


def refuse_seldon_workers(spec: DeploySpec, target: str) -> None:
    """--workers/--grpc-workers size Seldon v1's server processes; MLServer serves V2 from one."""
    given = {"--workers": spec.workers, "--grpc-workers": spec.grpc_workers}
    why = (
        "they size Seldon v1's gunicorn and gRPC server processes; MLServer serves V2 from one process, "
        "with a thread pool for the hooks (--threads where the target can set it)"
    )
    refuse(target, given, why)


def model_settings(name: str) -> dict[str, str]:
    """The model-settings.json that makes MLServer serve a model directory with our runtime.

    Only the name and the class: MLServer defaults `parameters.uri` to the folder holding the
    file, which is the model directory, and Seldon Core v2's agent adds the version.
    """
    return {"name": dns_name(name), "implementation": MLSERVER_IMPLEMENTATION}


def read_model_settings(model_dir: Path) -> dict[str, Any] | None:
    """MODEL_DIR/model-settings.json as data; None without one; {} when it is not a JSON object."""
    path = model_dir / MODEL_SETTINGS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def implementation_advice(model_dir: Path, settings: dict[str, Any]) -> list[str]:
    """A model-settings.json that names another runtime would not be served by seldon-caffe."""
    implementation = settings.get("implementation")
    if implementation == MLSERVER_IMPLEMENTATION:
        return []
    return [
        f"warning: {model_dir / MODEL_SETTINGS} has implementation {implementation!r}, so MLServer would not "
        f"serve it with seldon-caffe; expected {MLSERVER_IMPLEMENTATION!r}"
    ]


def dump_manifests(documents: list[dict[str, Any]], header: str = "") -> str:
    """YAML text of `documents` (a `---` stream when several), with `header` as leading comments."""
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    return comment + yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False, width=120)
