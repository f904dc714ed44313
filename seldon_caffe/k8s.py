"""`seldon-caffe k8s`: a SeldonDeployment for a model directory's image.

The manifest is built as plain data (`build_manifest`) so that `seldon-caffe init` writes the
same thing the command prints, and the tests can check every variant against the
SeldonDeployment CRD schema of Seldon Core 1.17.1. Nothing here talks to a cluster.

Choices that are not obvious from the CRD:
- Probes go to Seldon's own health endpoints on the port the operator names `http`:
  readiness on /health/status (answers 200 only once the model loaded), liveness on
  /health/ping, and a startup probe so a slow model load is not mistaken for a hung pod.
- `--model-uri` writes the storage-initializer init container itself: the Seldon operator
  only injects one for its prepackaged servers, never for a custom image like ours. It uses
  the operator's own names, so an operator that does inject one sees ours and adds nothing.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from . import advice
from .config import FORMAT_RUNTIMES
from .errors import SeldonCaffeError
from .paths import check_output_path

API_VERSION = "machinelearning.seldon.io/v1"
MODEL_MOUNT = "/mnt/models"  # where Seldon's storage initializer puts modelUri
PVC_MOUNT = "/mnt/pvc"
STORAGE_INITIALIZER = "seldonio/rclone-storage-initializer:1.17.1"
GPU_RESOURCE = "nvidia.com/gpu"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE])?$")
# Kubernetes quantity suffixes as powers: binary (Ki = 1024) and decimal (m = 10**-3)
_BINARY_SUFFIX = {f"{s}i": 10 * (i + 1) for i, s in enumerate("KMGTPE")}
_DECIMAL_SUFFIX = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
# A storage URI: a scheme of two or more letters (one letter is a Windows drive), then a
# location: gs://, s3://, pvc://, https://, or rclone's REMOTE:PATH. Not a path on this machine.
_STORAGE_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):[^\s]")


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
    """Everything the manifest depends on; the defaults are what `init` writes."""

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
    workers: int = 1
    threads: int = 4
    grpc_workers: int = 1
    env: dict[str, str] = field(default_factory=dict)


def build_manifest(spec: DeploySpec) -> dict[str, Any]:
    """The SeldonDeployment for `spec`, as the dict `yaml.safe_dump` turns into the manifest."""
    name = dns_name(spec.name)
    container: dict[str, Any] = {
        "name": name,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "env": _env(spec),
        "resources": _resources(spec),
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
        # GPU node pools are usually tainted so that only pods asking for GPUs land there.
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]

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

    metadata: dict[str, Any] = {"name": name}
    if spec.namespace:
        if not _DNS_LABEL.match(spec.namespace):
            raise K8sError(f"namespace {spec.namespace!r} is not a Kubernetes name (lower case, digits, '-')")
        metadata["namespace"] = spec.namespace
    return {
        "apiVersion": API_VERSION,
        "kind": "SeldonDeployment",
        "metadata": metadata,
        "spec": {"name": name, "protocol": "seldon", "predictors": [predictor]},
    }


def dump_manifest(manifest: dict[str, Any], header: str = "") -> str:
    """YAML text of `manifest`, with `header` as leading comment lines."""
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    return comment + yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False, width=120)


def dns_name(text: str) -> str:
    """`text` as a Kubernetes name: lower case, digits and '-', <= 63 chars, starting with a letter.

    A letter first because the operator names Services after the deployment, and Service
    names must start with one (DNS-1035), stricter than most objects' DNS-1123.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:63].rstrip("-")
    if not slug:
        raise K8sError(f"{text!r} has no letters or digits to make a Kubernetes name from; pass --name")
    return slug if slug[0].isalpha() else f"m-{slug}"[:63].rstrip("-")


def _env(spec: DeploySpec) -> list[dict[str, str]]:
    settings = {
        "GUNICORN_WORKERS": spec.workers,
        "GUNICORN_THREADS": spec.threads,
        "GRPC_WORKERS": spec.grpc_workers,
        "GRPC_THREADS": spec.threads,
        **spec.env,
    }
    return [{"name": key, "value": str(value)} for key, value in settings.items()]


def _resources(spec: DeploySpec) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": spec.cpu[0], "memory": spec.memory[0]}
    limits: dict[str, Any] = {"cpu": spec.cpu[1], "memory": spec.memory[1]}
    if spec.gpus:
        limits[GPU_RESOURCE] = spec.gpus  # extended resources: requests default to the limit
    return {"requests": requests, "limits": limits}


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


# -- the command ---------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `k8s` to the `seldon-caffe` command."""
    parser = subparsers.add_parser(
        "k8s",
        help="print a SeldonDeployment for a model directory's image",
        description="Print (or write with -o) a SeldonDeployment that runs IMAGE, built from DIR with s2i.",
    )
    parser.add_argument("model_dir", type=Path, metavar="DIR", help="the model directory (its model.yaml names it)")
    parser.add_argument("--image", required=True, help="the image s2i built from DIR, as the cluster pulls it")
    parser.add_argument("--name", help="the SeldonDeployment's name (default: model.yaml's name)")
    parser.add_argument("--namespace", help="metadata.namespace (default: kubectl's current one)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=_positive, default=1, help="a fixed number of pods (default 1)")
    scale.add_argument("--hpa", type=parse_hpa, metavar="MIN:MAX:CPU%", help="autoscale, e.g. 2:10:70")
    parser.add_argument("--gpu", type=_positive, default=0, metavar="N", help="GPUs per pod (nvidia.com/gpu)")
    parser.add_argument("--model-uri", metavar="URI", help="fetch the model at start-up (s3:, gs:, pvc://...)")
    parser.add_argument("--storage-secret", metavar="SECRET", help="Secret with the rclone settings for --model-uri")
    parser.add_argument("--runtime", help="override model.yaml's runtime (Seldon parameter `runtime`)")
    parser.add_argument("--cpu", type=_requests_limits, default=("1", "2"), metavar="REQ[:LIMIT]", help="default 1:2")
    parser.add_argument(
        "--memory", type=_requests_limits, default=("1Gi", "2Gi"), metavar="REQ[:LIMIT]", help="default 1Gi:2Gi"
    )
    parser.add_argument("--workers", type=_positive, default=1, help="REST worker processes, each with the model")
    parser.add_argument("--threads", type=_positive, default=4, help="threads per REST and gRPC worker (default 4)")
    parser.add_argument("--grpc-workers", type=_positive, default=1, help="gRPC server processes (default 1)")
    parser.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here instead of printing")
    parser.add_argument("--force", action="store_true", help="let -o replace an existing file")
    parser.set_defaults(handler=k8s_command)
    return parser


def k8s_command(args: argparse.Namespace) -> int:
    """Build the manifest for the parsed command line; print it or write it to -o."""
    if args.storage_secret and not args.model_uri:
        raise K8sError("--storage-secret only makes sense with --model-uri")
    if args.output:
        check_output_path(args.output)  # its folder must exist: a typo should not create folders
        if args.output.exists() and not args.force:
            raise K8sError(f"{args.output} exists; pass --force to replace it")
    check_requests_limits("--cpu", args.cpu)
    check_requests_limits("--memory", args.memory)
    if args.model_uri:
        check_storage_uri(args.model_uri)
    model = read_model_yaml(args.model_dir)
    check_runtime(model, args.runtime)
    for line in advice_lines(args.model_dir, model, args.runtime, args.gpu):
        print(f"seldon-caffe: {line}", file=sys.stderr)
    spec = DeploySpec(
        name=args.name or str(model.get("name") or args.model_dir.resolve().name),
        image=args.image,
        replicas=args.replicas,
        hpa=args.hpa,
        gpus=args.gpu,
        model_uri=args.model_uri,
        storage_secret=args.storage_secret,
        runtime=args.runtime,
        namespace=args.namespace,
        cpu=args.cpu,
        memory=args.memory,
        workers=args.workers,
        threads=args.threads,
        grpc_workers=args.grpc_workers,
    )
    text = dump_manifest(build_manifest(spec), header="Generated by seldon-caffe k8s. Apply: kubectl apply -f FILE")
    if args.output is None:
        sys.stdout.write(text)
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def check_requests_limits(option: str, value: tuple[str, str]) -> None:
    """The API server refuses a request above its limit; say so before anything is written."""
    request, limit = value
    if quantity(request) > quantity(limit):
        raise K8sError(f"{option} {request}:{limit}: the request must be <= the limit (REQ[:LIMIT])")


def quantity(text: str) -> Decimal:
    """A Kubernetes quantity ('500m', '2', '1Gi') as a number, exactly, to compare two of them."""
    match = _QUANTITY.match(text)
    if not match:
        raise K8sError(f"{text!r} is not a Kubernetes quantity (e.g. 500m, 2, 1Gi)")
    number, suffix = Decimal(match.group(1)), match.group(3) or ""
    if suffix in _BINARY_SUFFIX:
        return number * 2 ** _BINARY_SUFFIX[suffix]
    return number.scaleb(_DECIMAL_SUFFIX[suffix])


def check_storage_uri(uri: str) -> None:
    """--model-uri is fetched inside the pod, where a path on this machine means nothing."""
    match = _STORAGE_URI.match(uri)
    if not match or match.group("scheme").lower() == "file":
        raise K8sError(
            f"--model-uri {uri}: expected a storage URI (gs://BUCKET/PATH, s3://BUCKET/PATH, pvc://CLAIM/PATH, "
            "https://..., or rclone's REMOTE:PATH), not a local path; upload the model directory, or build it "
            "into the image"
        )


def check_runtime(model: dict[str, Any], runtime: str | None) -> None:
    """--runtime becomes a Seldon parameter read only in the pod: check it against the format now."""
    fmt = model.get("format", "caffe")
    if runtime and fmt in FORMAT_RUNTIMES and runtime not in ("auto", *FORMAT_RUNTIMES[fmt]):
        allowed = ", ".join(("auto", *FORMAT_RUNTIMES[fmt]))
        raise K8sError(f"--runtime {runtime} cannot serve format {fmt}; allowed: {allowed}")


def advice_lines(model_dir: Path, model: dict[str, Any], runtime: str | None, gpus: int) -> list[str]:
    """Warnings about settings the pod would ignore, and the builder image its runtime needs.

    Nothing without a model.yaml: the model then comes from --model-uri and is unknown here.
    """
    config = advice.model_settings(model_dir.resolve(), model, runtime) if model else None
    if config is None:
        return []
    name = advice.image_runtime(config)
    lines = [f"warning: {text}" for text in advice.settings_warnings(config, name, gpus)]
    image = advice.builder(config, name)
    if image.note:
        lines.append(f"note: runtime {name}: {image.note}")
    elif not image.is_default:
        lines.append(
            f"note: runtime {name} needs its engine in the builder image: {image.command()} "
            f"(from the seldon-caffe repository), then s2i build {model_dir} {image.tag} IMAGE"
        )
    return lines


def read_model_yaml(model_dir: Path) -> dict[str, Any]:
    """model.yaml as raw data, or {} without one.

    Deliberately not `config.load_config`: with --model-uri the model's files live in object
    storage, not in DIR, and the manifest only needs the name and the device.
    """
    if not model_dir.is_dir():
        raise K8sError(f"{model_dir}: no such model directory")
    path = model_dir / "model.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise K8sError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise K8sError(f"{path}: expected a mapping of fields")
    options = data.get("options")
    data["options"] = options if isinstance(options, dict) else {}
    return data


def parse_hpa(text: str) -> Hpa:
    """'MIN:MAX:CPU%' (e.g. '2:10:70') -> Hpa, with the reason when it is not one."""
    parts = text.rstrip("%").split(":")
    try:
        low, high, cpu = (int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MIN:MAX:CPU%, e.g. 2:10:70") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= MAX")
    if not 1 <= cpu <= 100:
        raise argparse.ArgumentTypeError(f"{text!r}: CPU% is the target utilisation of the request, 1..100")
    return Hpa(low, high, cpu)


def _requests_limits(text: str) -> tuple[str, str]:
    request, _, limit = text.partition(":")
    limit = limit or request
    for quantity in (request, limit):
        if not _QUANTITY.match(quantity):
            raise argparse.ArgumentTypeError(f"{quantity!r} is not a Kubernetes quantity (e.g. 500m, 2, 1Gi)")
    return request, limit


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value
