"""The same models served over Seldon v1 (REST, gRPC) and V2 (REST, gRPC), side by side.

    .venv/bin/python benchmarks/protocols.py [--rounds 3 --duration 3]     # ~14 min on 2 cores

Models: GoogLeNet from the zoo prototxt with `seldon-caffe weights` on openvino fp32 (no hooks:
a 1x3x224x224 float32 tensor in, arrays out), and examples/vision (its hooks decode a PNG). Each
is served twice at once, `seldon-caffe serve` and `seldon-caffe serve --protocol v2`, and loaded
with `seldon-caffe bench`'s own load (its Python API: what a user of the command measures) at
concurrency 1, 4 and 16, over every payload a client of each protocol would send:

    v1 REST    JSON ndarray (tensors), binData (an .npy, an image)
    v1 gRPC    DefaultData tensor, binData
    V2 REST    JSON tensor, BYTES with content_type base64 (an .npy, an image): JSON only
    V2 gRPC    raw_input_contents (tensors), raw bytes (an .npy, an image)

The payloads take turns level by level and round by round (each round in another order), so
the machine's noise falls on all alike; the table gives the medians over the rounds. The check:
V2 gRPC reaches at least v1 gRPC's req/s. The result replaces the `protocols` section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from _report import median, served_measured_line, served_table_lines, wait_for_quiet, write_section  # noqa: E402
from served_overhead import googlenet_dir, payload_files  # noqa: E402
from service import Service, running_service  # noqa: E402

from seldon_caffe.bench.clients import Request, v2_model  # noqa: E402
from seldon_caffe.bench.load import Plan, run_level  # noqa: E402
from seldon_caffe.bench.report import summarize  # noqa: E402

MARKERS = ("<!-- protocols:start -->", "<!-- protocols:end -->")
LEVELS = (1, 4, 16)
# served_overhead.py's v1 labels -> ours
V1_LABELS = {
    "REST ndarray": "v1 REST ndarray",
    "REST binData": "v1 REST binData",
    "gRPC tensor": "v1 gRPC tensor",
    "gRPC binData": "v1 gRPC binData",
}


def payloads(root: Path, name: str, x: np.ndarray | None) -> dict[str, tuple[str, Path]]:
    """label -> (bench protocol, request file), v1's (as served_overhead.py sends them) then V2's."""
    v1 = {V1_LABELS[label]: value for label, value in payload_files(root, name, x).items()}
    binary = v1["v1 REST binData"][1]  # the .npy, or the image
    if x is None:
        return {**v1, "V2 REST base64": ("v2-rest", binary), "V2 gRPC bytes": ("v2-grpc", binary)}
    tensor = root / f"{name}-v2.json"
    tensor.write_text(json.dumps({"inputs": [{"name": "data", "datatype": "FP32", "shape": list(x.shape),
                                              "data": x.ravel().tolist()}]}))  # fmt: skip
    return {
        **v1,
        "V2 REST tensor": ("v2-rest", tensor),
        "V2 REST base64": ("v2-rest", binary),
        "V2 gRPC tensor": ("v2-grpc", tensor),
        "V2 gRPC bytes": ("v2-grpc", binary),
    }


def requests_for(payload_map: dict[str, tuple[str, Path]], v1: Service, v2: Service) -> dict[str, tuple]:
    """label -> (protocol, port, Request), the V2 ones addressed to the model the server lists."""
    prepared = {}
    for label, (protocol, path) in payload_map.items():
        service = v2 if protocol.startswith("v2-") else v1
        port = service.http_port if protocol.endswith("-rest") else service.grpc_port
        request = Request.from_file(path, protocol)
        if protocol.startswith("v2-"):
            request = request.for_model(*v2_model(protocol, "127.0.0.1", port, None))
        prepared[label] = (protocol, port, request)
    return prepared


def measure(prepared: dict[str, tuple], args: argparse.Namespace) -> dict[tuple[str, int], list[dict]]:
    """{(label, level): one report row per round}; the payloads take turns within each level,
    in an order rotated from round to round."""
    rows: dict[tuple[str, int], list[dict]] = {}
    labels = list(prepared)
    for round_ in range(args.rounds):
        order = labels[round_ % len(labels) :] + labels[: round_ % len(labels)]
        for level in LEVELS:
            for label in order:
                protocol, port, request = prepared[label]
                result = run_level(Plan(protocol, "127.0.0.1", port, request, level, args.warmup, args.duration))
                if result.errors:
                    raise SystemExit(f"{label} c={level}: errors {result.errors}")
                row = summarize(result, None)
                rows.setdefault((label, level), []).append(row)
                print(
                    f"  round {round_ + 1}, c={level}, {label}: {row['req_s']:.1f} req/s, "
                    f"p50 {row['p50']:.1f} ms, p99 {row['p99']:.1f} ms",
                    flush=True,
                )
    return rows


def verdicts(model: str, rows: dict[tuple[str, int], list[dict]], v2_label: str, v1_label: str) -> list[str]:
    """V2 gRPC's median req/s over v1 gRPC's, at each level."""
    ratios = [median(rows[(v2_label, c)], "req_s") / median(rows[(v1_label, c)], "req_s") for c in LEVELS]
    reached = "reaches" if min(ratios) >= 1 else "does not reach"
    per_level = ", ".join(f"c={c} {r:.2f}" for c, r in zip(LEVELS, ratios, strict=True))
    return [f"- {model}: {v2_label} / {v1_label} = {per_level}: V2 gRPC {reached} v1 gRPC at every level."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    wait_for_quiet(120, 1.0)
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="protocols-"))
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    cases = [
        ("GoogLeNet openvino fp32", googlenet_dir(root, "fp32"), x, ("V2 gRPC tensor", "v1 gRPC tensor")),
        ("vision (opencv)", REPO / "examples" / "vision", None, ("V2 gRPC bytes", "v1 gRPC binData")),
    ]
    lines, checks = [], []
    for name, model_dir, array, compared in cases:
        print(name, flush=True)
        payload_map = payloads(root, name.split()[0], array)
        with contextlib.ExitStack() as stack:
            v1 = stack.enter_context(running_service(model_dir, verbose=False))
            v2 = stack.enter_context(running_service(model_dir, "--protocol", "v2", verbose=False))
            rows = measure(requests_for(payload_map, v1, v2), args)
        lines += served_table_lines(name, rows, list(payload_map), LEVELS)
        checks += verdicts(name, rows, *compared)
    shutil.rmtree(root)
    header = " | ".join(f"c{c} req/s | c{c} p50 | c{c} p99" for c in LEVELS)
    section = "\n".join(
        [
            "## Protocols: Seldon v1 and V2 (Open Inference), REST and gRPC",
            "",
            served_measured_line(began),
            "",
            f"    .venv/bin/python benchmarks/protocols.py --rounds {args.rounds} --duration {args.duration:g}",
            "",
            "Each model served at once by `seldon-caffe serve` (v1: 1 REST worker with 4 threads, 1 gRPC worker) "
            "and `seldon-caffe serve --protocol v2` (MLServer 1.7, 4 runtime threads), loaded by `seldon-caffe "
            f"bench`'s load at concurrency {', '.join(map(str, LEVELS))} ({args.duration:g} s per level after "
            f"{args.warmup:g} s), clients on the same 2 cores. The payloads take turns level by level, "
            f"{args.rounds} rounds in rotated order; medians over the rounds, latencies in ms. ndarray and V2 "
            "REST tensor: the numbers as JSON; binData and base64: the file (GoogLeNet: an .npy of the tensor; "
            "vision: its sample PNG) base64 in JSON; v1 gRPC tensor: Seldon's DefaultData; V2 gRPC tensor: "
            "`raw_input_contents`; gRPC binData and bytes: the file's raw bytes.",
            "",
            f"| model | payload | {header} |",
            "|---|---|" + "---:|" * (3 * len(LEVELS)),
            *lines,
            "",
            "V2 gRPC against v1 gRPC (median req/s):",
            "",
            *checks,
            "",
        ]
    )
    print(section)
    write_section(section, args.out, MARKERS)


if __name__ == "__main__":
    main()
