"""What serving costs over the engine: raw `model.run`, the in-process Seldon path, and the
served service over each protocol and payload, measured with `seldon-caffe bench`'s load.

    .venv/bin/python benchmarks/served_overhead.py [--duration 4]     # ~10 min on 2 cores

Models: examples/vision (a tiny digit net; image files as binData, its hooks decode them) and
GoogLeNet from the zoo prototxt with `seldon-caffe weights` on openvino, fp32 and bf16 (no hooks:
arrays in, arrays out). For each: img/s of `model.run` on one preprocessed input; req/s of the
in-process Seldon path (`seldon_methods.predict`: JSON decode, hooks, model, encode, no network);
req/s served at concurrency 1, 2 and 8 with 1 and 2 worker processes (REST and gRPC alike).
The result replaces the `served-overhead` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from _report import cpu_model, wait_for_quiet, write_section  # noqa: E402
from helpers import ZOO  # noqa: E402
from service import running_service  # noqa: E402

from seldon_caffe.bench.clients import Request  # noqa: E402
from seldon_caffe.bench.load import Plan, run_level  # noqa: E402

MARKERS = ("<!-- served-overhead:start -->", "<!-- served-overhead:end -->")
LEVELS = (1, 2, 8)
WORKERS = (1, 2)


def googlenet_dir(root: Path, precision: str) -> Path:
    model_dir = root / f"googlenet-{precision}"
    model_dir.mkdir()
    shutil.copy(ZOO / "bvlc_googlenet.prototxt", model_dir / "deploy.prototxt")
    weights = root / "googlenet.caffemodel"
    if not weights.exists():
        command = [sys.executable, "-m", "seldon_caffe.cli", "weights", str(ZOO / "bvlc_googlenet.prototxt")]
        subprocess.run([*command, "-o", str(weights)], check=True, capture_output=True)
    shutil.copy(weights, model_dir / "weights.caffemodel")
    config = {
        "format": "caffe",
        "files": {"prototxt": "deploy.prototxt", "weights": "weights.caffemodel"},
        "runtime": "openvino",
        "options": {"threads": 2, "precision": precision},
    }
    (model_dir / "model.yaml").write_text(json.dumps(config))
    return model_dir


def payload_files(root: Path, name: str, x: np.ndarray | None) -> dict[str, tuple[str, Path]]:
    """payload label -> (protocol, request file): what a client of that kind sends."""
    if x is None:  # the vision example: an image file, as binData
        image = REPO / "examples" / "vision" / "sample.png"
        return {"REST binData": ("seldon-rest", image), "gRPC binData": ("seldon-grpc", image)}
    npy = root / f"{name}.npy"
    np.save(npy, x)
    ndarray = root / f"{name}-ndarray.json"
    ndarray.write_text(json.dumps({"data": {"ndarray": x.tolist()}}))
    tensor = root / f"{name}-tensor.json"
    tensor.write_text(json.dumps({"data": {"tensor": {"shape": list(x.shape), "values": x.ravel().tolist()}}}))
    return {
        "REST ndarray": ("seldon-rest", ndarray),
        "REST binData": ("seldon-rest", npy),
        "gRPC tensor": ("seldon-grpc", tensor),
        "gRPC binData": ("seldon-grpc", npy),
    }


def per_second(call: Any, seconds: float = 3.0) -> float:
    """Calls per second, median of 5 timed blocks after a warm-up call."""
    call()
    rates = []
    for _ in range(5):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 5:
            call()
            count += 1
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def in_process(model_dir: Path, payloads: dict[str, tuple[str, Path]], x: np.ndarray | None) -> tuple[float, dict]:
    """(model.run img/s, {REST payload: in-process Seldon path req/s})."""
    from seldon_core import seldon_methods
    from seldon_core.metrics import SeldonMetrics

    from seldon_caffe.model import SeldonCaffeModel

    user = SeldonCaffeModel(str(model_dir))
    user.load()
    if x is None:  # what the vision hooks make of the sample image
        image = (REPO / "examples" / "vision" / "sample.png").read_bytes()
        x = user.hooks.preprocess(image, user.context)
    raw = per_second(lambda: user.model.run(x))
    metrics = SeldonMetrics(worker_id_func=lambda: 0)
    seldon = {}
    for label, (protocol, path) in payloads.items():
        if protocol == "seldon-rest":
            message = Request.from_file(path).message
            seldon[label] = per_second(lambda m=message: seldon_methods.predict(user, m, metrics))
    user.model.close()
    return raw, seldon


def served(model_dir: Path, payloads: dict, args: argparse.Namespace) -> dict[tuple, float]:
    """{(payload, workers, concurrency): req/s} over the real service."""
    results = {}
    for workers in WORKERS:
        extra = ("--workers", str(workers), "--grpc-workers", str(workers))
        with running_service(model_dir, *extra, verbose=False) as service:
            for label, (protocol, path) in payloads.items():
                port = service.http_port if protocol == "seldon-rest" else service.grpc_port
                request = Request.from_file(path)
                for level in LEVELS:
                    plan = Plan(protocol, "127.0.0.1", port, request, level, args.warmup, args.duration)
                    result = run_level(plan)
                    assert not result.errors, (label, result.errors)
                    results[(label, workers, level)] = len(result.latencies) / result.window_s
                    print(
                        f"  {label}, {workers} worker(s), c={level}: {results[(label, workers, level)]:.1f} req/s",
                        flush=True,
                    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    wait_for_quiet(120, 1.0)
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="served-overhead-"))
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    cases = [("vision (opencv)", REPO / "examples" / "vision", None)]
    cases += [(f"GoogLeNet openvino {p}", googlenet_dir(root, p), x) for p in ("fp32", "bf16")]
    lines = []
    for name, model_dir, array in cases:
        print(name, flush=True)
        payloads = payload_files(root, name.split()[0], array)
        raw, seldon = in_process(model_dir, payloads, array)
        rates = served(model_dir, payloads, args)
        for label in payloads:
            cells = [f"{rates[(label, w, c)]:.1f}" for w in WORKERS for c in LEVELS]
            best = max(rates[(label, w, c)] for w in WORKERS for c in LEVELS)
            inproc = f"{seldon[label]:.1f}" if label in seldon else "-"
            versus = f"{best / seldon[label]:.2f}" if label in seldon else "-"
            lines.append(
                f"| {name} | {label} | {raw:.1f} | {inproc} | {' | '.join(cells)} | {best / raw:.2f} | {versus} |"
            )
    shutil.rmtree(root)
    header = " | ".join(f"w{w} c{c}" for w in WORKERS for c in LEVELS)
    section = "\n".join(
        [
            "## Served overhead: engine, in-process Seldon path, and the service",
            "",
            f"Measured {datetime.date.today().isoformat()} on {cpu_model()}; "
            f"{(time.monotonic() - began) / 60:.0f} min.",
            "",
            f"    .venv/bin/python benchmarks/served_overhead.py --duration {args.duration:g}",
            "",
            "raw: `model.run` on one preprocessed input (img/s). in-process: Seldon's own predict path with the "
            "hooks, no network (REST payloads only). wN cC: served req/s with N REST and N gRPC worker processes "
            f"at concurrency C, measured by `seldon-caffe bench`'s load ({args.duration:g} s per level after "
            f"{args.warmup:g} s), clients on the same 2 cores. best / raw and best / in-process: the best served "
            "req/s over those (the in-process path pays the hooks and Seldon's encoding, as the service does).",
            "",
            f"| model | payload | raw img/s | in-process req/s | {header} | best / raw | best / in-process |",
            "|---|---|---:|---:|" + "---:|" * (len(WORKERS) * len(LEVELS)) + "---:|---:|",
            *lines,
            "",
        ]
    )
    print(section)
    write_section(section, args.out, MARKERS)


if __name__ == "__main__":
    main()
