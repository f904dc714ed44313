"""`seldon-caffe k8s`: the manifests that run a model directory's image in a cluster.

Three targets, one module each, from the same settings (`DeploySpec`):
- seldon-v1 (default): a SeldonDeployment; the pod serves Seldon's protocol (s2i/bin/run).
- seldon-v2: a Seldon Core v2 Server (MLServer with our image) and the Model it loads.
- kserve: a KServe ServingRuntime (MLServer with our image) and an InferenceService.
The two V2 targets serve the Open Inference Protocol with seldon_caffe.v2's MLServer runtime.

The manifests are built as plain data so that `seldon-caffe init` writes the same thing the
command prints, and the tests check every variant against the targets' real CRD schemas.
Nothing here talks to a cluster. Options a target cannot honour are one-line errors, raised
before anything is printed or written.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from .. import advice
from ..config import FORMAT_RUNTIMES
from ..paths import check_output_path
from . import kserve, seldon_v1, seldon_v2
from .common import (
    MLSERVER_IMPLEMENTATION,
    MODEL_SETTINGS,
    DeploySpec,
    Hpa,
    K8sError,
    dns_name,
    dump_manifests,
    model_settings,
)
from .seldon_v1 import build_manifest

__all__ = [
    "MLSERVER_IMPLEMENTATION",
    "MODEL_SETTINGS",
    "TARGETS",
    "DeploySpec",
    "Hpa",
    "K8sError",
    "advice_lines",
    "build_documents",
    "build_manifest",
    "dns_name",
    "dump_manifest",
    "dump_manifests",
    "model_settings",
    "read_model_yaml",
    "register",
]

_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE])?$")
# Kubernetes quantity suffixes as powers: binary (Ki = 1024) and decimal (m = 10**-3)
_BINARY_SUFFIX = {f"{s}i": 10 * (i + 1) for i, s in enumerate("KMGTPE")}
_DECIMAL_SUFFIX = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
# A storage URI: a scheme of two or more letters (one letter is a Windows drive), then a
# location: gs://, s3://, pvc://, https://, or rclone's REMOTE:PATH. Not a path on this machine.
_STORAGE_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):[^\s]")


@dataclass(frozen=True)
class Target:
    """A deployment target: its documents, and the advice that depends on the model directory."""

    build: Callable[[DeploySpec], list[dict[str, Any]]]
    advice: Callable[[DeploySpec, Path], list[str]]


TARGETS: dict[str, Target] = {
    "seldon-v1": Target(seldon_v1.build, lambda spec, model_dir: []),
    "seldon-v2": Target(seldon_v2.build, seldon_v2.advice),
    "kserve": Target(kserve.build, kserve.advice),
}


def build_documents(spec: DeploySpec, target: str = "seldon-v1") -> list[dict[str, Any]]:
    """The documents `target` needs for `spec`, in the order to apply them. Raises K8sError."""
    return TARGETS[target].build(spec)


def dump_manifest(manifest: dict[str, Any], header: str = "") -> str:
    """YAML text of one `manifest`, with `header` as leading comment lines."""
    return dump_manifests([manifest], header)


# -- the command ---------------------------------------------------------------------------

_HELP = """\
targets: seldon-v1 (default) writes a SeldonDeployment: Seldon's protocol, s2i/bin/run in the pod.
seldon-v2 writes a Seldon Core v2 Server (Seldon's mlserver ServerConfig with IMAGE) and Model;
kserve a KServe ServingRuntime (MLServer in IMAGE) and InferenceService. Both V2 targets start
`mlserver start` in IMAGE (built with the mlserver extra, the s2i builder's default) and speak
the V2 (Open Inference) protocol.

how options map, as seldon-v1 / seldon-v2 / kserve:
--replicas: predictor replicas / Server and Model replicas / min = max replicas.
--hpa: hpaSpec / error on seldon-v2 (it scales on inference lag) / KServe's scaleMetric cpu.
--model-uri: storage initializer + model_dir / Model storageUri (required; no pvc://) /
storageUri (no rclone REMOTE:PATH). --storage-secret: rclone env Secret / Model secretName /
error on kserve (use the predictor's ServiceAccount). --runtime: Seldon parameter / Model
parameter (model-settings' parameters.extra) / MLSERVER_MODEL_EXTRA. --threads: threads per
REST and gRPC worker / the runtime's hook threads (a Model parameter) / the runtime's hook
threads (MLSERVER_MODEL_EXTRA). --cpu, --memory, --gpu: the model
container's resources everywhere (seldon-v2 also sets the Model's memory to the request).
--workers, --grpc-workers: seldon-v1 only, an error elsewhere.
"""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `k8s` to the `seldon-caffe` command."""
    parser = subparsers.add_parser(
        "k8s",
        help="print the manifests (SeldonDeployment, Seldon Core v2, KServe) for a model directory's image",
        description="Print (or write with -o) the manifests that run IMAGE, built from DIR with s2i.",
        epilog=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir", type=Path, metavar="DIR", help="the model directory (its model.yaml names it)")
    parser.add_argument("--image", required=True, help="the image s2i built from DIR, as the cluster pulls it")
    parser.add_argument(
        "--target", choices=sorted(TARGETS), default="seldon-v1", help="what to deploy with (default seldon-v1)"
    )
    parser.add_argument("--name", help="the deployment's name (default: model.yaml's name)")
    parser.add_argument("--namespace", help="metadata.namespace (default: kubectl's current one)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=_positive, default=1, help="a fixed number of pods (default 1)")
    scale.add_argument("--hpa", type=parse_hpa, metavar="MIN:MAX:CPU%", help="autoscale on CPU, e.g. 2:10:70")
    parser.add_argument("--gpu", type=_positive, default=0, metavar="N", help="GPUs per pod (nvidia.com/gpu)")
    parser.add_argument("--model-uri", metavar="URI", help="fetch the model at start-up (s3:, gs:, pvc://...)")
    parser.add_argument("--storage-secret", metavar="SECRET", help="Secret with the storage settings for --model-uri")
    parser.add_argument("--runtime", help="override model.yaml's runtime")
    parser.add_argument("--cpu", type=_requests_limits, default=("1", "2"), metavar="REQ[:LIMIT]", help="default 1:2")
    parser.add_argument(
        "--memory", type=_requests_limits, default=("1Gi", "2Gi"), metavar="REQ[:LIMIT]", help="default 1Gi:2Gi"
    )
    parser.add_argument("--workers", type=_positive, help="seldon-v1: REST worker processes, each with the model (1)")
    parser.add_argument(
        "--threads", type=_positive, help="threads per REST and gRPC worker (default 4); V2 targets: hook threads"
    )
    parser.add_argument("--grpc-workers", type=_positive, help="seldon-v1: gRPC server processes (default 1)")
    parser.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here instead of printing")
    parser.add_argument("--force", action="store_true", help="let -o replace an existing file")
    parser.set_defaults(handler=k8s_command)
    return parser


def k8s_command(args: argparse.Namespace) -> int:
    """Build the manifests for the parsed command line; print them or write them to -o."""
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
    documents = build_documents(spec, args.target)  # a setting the target refuses stops here, before advice
    lines = advice_lines(args.model_dir, model, args.runtime, args.gpu)
    for line in lines + TARGETS[args.target].advice(spec, args.model_dir):
        print(f"seldon-caffe: {line}", file=sys.stderr)
    command = "seldon-caffe k8s" if args.target == "seldon-v1" else f"seldon-caffe k8s --target {args.target}"
    header = f"Generated by {command}. Apply: kubectl apply -f FILE"
    text = dump_manifests(documents, header=header)
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
    """--runtime is read only in the pod: check it against the format now."""
    fmt = model.get("format", "caffe")
    if runtime and fmt in FORMAT_RUNTIMES and runtime not in ("auto", *FORMAT_RUNTIMES[fmt]):
        allowed = ", ".join(("auto", *FORMAT_RUNTIMES[fmt]))
        raise K8sError(f"--runtime {runtime} cannot serve format {fmt}; allowed: {allowed}")


def advice_lines(model_dir: Path, model: dict[str, Any], runtime: str | None, gpus: int) -> list[str]:
    """Warnings about settings the pod would ignore, and the builder image its runtime needs.

    The same for every target: each runs the same runtimes in the same image. Nothing
    without a model.yaml: the model then comes from --model-uri and is unknown here.
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
