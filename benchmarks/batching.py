"""Adaptive batching, served: the same model unbatched and batched, at concurrency 1, 4, 16, 32.

    .venv/bin/python benchmarks/batching.py [--rounds 4 --duration 3]     # ~15 min on 2 cores

Models: GoogLeNet from the zoo prototxt with `seldon-caffe weights` on openvino, fp32 and (where
the CPU has avx512_bf16 or AMX) bf16, without hooks: a 1x3x224x224 float32 .npy in, as binData;
and examples/ranking with its hooks: samples/request.json, one user and 10 candidates, so 10 rows
per request, over Seldon v1 and over V2 (the same JSON as a BYTES input, content_type json).
Each model is served twice at once by `seldon-caffe serve`: without `batching:`, and with
`batching: {max_queue_delay_ms: 0, max_batch_size: 16 requests' rows}` (0: an idle model runs a
request at once, and batches form from what arrives while a run is in progress). Both get 16
threads (v1: REST and gRPC; V2: the runtime's), what `serve` picks for the batched one, so
batching is the one difference. The load is `seldon-caffe bench`'s own (its Python API) over gRPC.

The two services take turns level by level, and round by round in the other order, so the
machine's noise falls on both alike; the table gives the medians over the rounds, and each
ratio the median of the rounds' own ratios (the two ran back to back). Before the
services start, `model.run` on a batch of 1 and of 16 requests is timed in this process: the
batch-of-16 time is what the p99 goal is measured against. The goals (issue 16), for GoogLeNet:
at concurrency 16, batched >= 1.15x unbatched req/s with p99 <= 2x the batch-of-16 run time; at
concurrency 1, batched loses at most 5%. The result replaces the `batching` section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from _report import median, served_measured_line, served_table_lines, wait_for_quiet, write_section  # noqa: E402
from served_overhead import googlenet_dir  # noqa: E402
from service import Service, running_service  # noqa: E402

from seldon_caffe import cpu  # noqa: E402
from seldon_caffe.bench.clients import Request, v2_model  # noqa: E402
from seldon_caffe.bench.load import Plan, run_level  # noqa: E402
from seldon_caffe.bench.report import summarize  # noqa: E402
from seldon_caffe.pipeline import Pipeline  # noqa: E402

MARKERS = ("<!-- batching:start -->", "<!-- batching:end -->")
LEVELS = (1, 4, 16, 32)
CONDITIONS = ("unbatched", "batched")
BATCH_REQUESTS = 16  # a full batch: this many requests' rows
THREADS = ("--threads", str(BATCH_REQUESTS), "--grpc-threads", str(BATCH_REQUESTS))


def ranking_input(request: dict[str, Any]) -> dict[str, Any]:
    """The ranking example's jsonData as a V2 input: a BYTES tensor of JSON (docs/v2.md)."""
    data = [json.dumps(request)]
    return {"name": "request", "datatype": "BYTES", "shape": [1], "parameters": {"content_type": "json"}, "data": data}


def served_copy(model_dir: Path, target: Path, rows: int | None = None, runtime: str | None = None) -> Path:
    """`model_dir` copied to `target` (what a service writes, such as caches, stays out of the
    repo); with `rows`, batching on: a full batch is BATCH_REQUESTS requests of that many rows.
    `runtime` pins what `auto` chose for the other copy, so both serve with the same engine."""
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("__pycache__", ".cache"))
    config = yaml.safe_load((target / "model.yaml").read_text())
    if rows is not None:
        config["batching"] = {"max_batch_size": BATCH_REQUESTS * rows, "max_queue_delay_ms": 0}
    if runtime is not None:
        config["runtime"] = runtime
    (target / "model.yaml").write_text(yaml.safe_dump(config))
    return target


def run_times_ms(model_dir: Path, payload: Any) -> tuple[float, float, int, str]:
    """(ms of model.run on one request's inputs, on BATCH_REQUESTS requests' inputs, rows per
    request, the runtime): medians, in this process, while no service runs."""
    pipeline = Pipeline.load(model_dir)
    try:
        ctx = pipeline.context
        one = pipeline.model.check_inputs(pipeline.hooks.preprocess(payload, ctx))
        full = {name: np.concatenate([array] * BATCH_REQUESTS) for name, array in one.items()}
        samples: dict[str, list[float]] = {"one": [], "full": []}
        pipeline.model.run(one), pipeline.model.run(full)  # the first run of a shape may compile
        for _ in range(10):  # interleaved, so a burst of load on the machine hits both
            for label, inputs, repeats in (("one", one, 4), ("full", full, 1)):
                for _ in range(repeats):
                    start = time.perf_counter()
                    pipeline.model.run(inputs)
                    samples[label].append((time.perf_counter() - start) * 1000)
        one_ms, full_ms = (statistics.median(samples[label]) for label in ("one", "full"))
        return one_ms, full_ms, len(next(iter(one.values()))), pipeline.model.name
    finally:
        pipeline.close()


def batch_totals(service: Service) -> tuple[float, float]:
    """(sum, count) of seldon_caffe_batch_size over the service's processes."""
    with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    totals = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            kind = sample.name.removeprefix("seldon_caffe_batch_size_")
            if sample.name.startswith("seldon_caffe_batch_size_") and kind in totals:
                totals[kind] += sample.value
    return totals["sum"], totals["count"]


def measure(
    services: dict[str, Service], requests: dict[str, Request], protocol: str, args: argparse.Namespace
) -> dict[tuple, list[dict]]:
    """{(condition, level): one report row per round}, conditions alternating within each level
    and their order swapped every round. A batched row also has `rows`: the mean rows of the run
    that answered a request, from the service's seldon_caffe_batch_size."""
    rows: dict[tuple, list[dict]] = {}
    for round_ in range(args.rounds):
        order = CONDITIONS if round_ % 2 == 0 else CONDITIONS[::-1]
        for level in LEVELS:
            for condition in order:
                service = services[condition]
                before = batch_totals(service) if condition == "batched" else None
                request = requests[condition]
                plan = Plan(protocol, "127.0.0.1", service.grpc_port, request, level, args.warmup, args.duration)
                result = run_level(plan)
                if result.errors:
                    raise SystemExit(f"{condition} c={level}: errors {result.errors}")
                row = summarize(result, None)
                if before is not None:
                    after = batch_totals(service)
                    row["rows"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
                rows.setdefault((condition, level), []).append(row)
                print(
                    f"  round {round_ + 1}, c={level}, {condition}: {row['req_s']:.1f} req/s, "
                    f"p50 {row['p50']:.1f} ms, p99 {row['p99']:.1f} ms"
                    + (f", {row['rows']:.1f} rows per run" if "rows" in row else ""),
                    flush=True,
                )
    return rows


def gain(rows: dict[tuple, list[dict]], level: int) -> float:
    """Batched over unbatched req/s at `level`: the median of each round's ratio. The two ran
    back to back in a round, so a burst of load on this shared machine that hits one round
    cancels out in its ratio, where a ratio of the two medians would keep it."""
    pairs = zip(rows[("batched", level)], rows[("unbatched", level)], strict=True)
    return statistics.median(batched["req_s"] / unbatched["req_s"] for batched, unbatched in pairs)


def gain_line(model: str, rows: dict[tuple, list[dict]]) -> str:
    """The model's row of the second table: batched / unbatched req/s and rows per run, per level."""
    cells = [f"{gain(rows, level):.2f}x ({median(rows[('batched', level)], 'rows'):.1f})" for level in LEVELS]
    return f"| {model} | {' | '.join(cells)} |"


def verdicts(model: str, rows: dict[tuple, list[dict]], full_ms: float) -> list[str]:
    """The issue's goals for one GoogLeNet model."""
    faster = gain(rows, 16)
    p99 = median(rows[("batched", 16)], "p99")
    loss = 1 - gain(rows, 1)
    met = {True: "met", False: "NOT met"}
    return [
        f"- {model}, c=16: batched {faster:.2f}x unbatched req/s (goal >= 1.15x: {met[faster >= 1.15]}); "
        f"batched p99 {p99:.0f} ms = {p99 / full_ms:.2f}x the batch-of-16 run ({full_ms:.0f} ms; goal <= 2x: "
        f"{met[p99 <= 2 * full_ms]}).",
        f"- {model}, c=1: batched {'loses' if loss > 0 else 'gains'} {abs(loss) * 100:.1f}% req/s "
        f"(goal: loses at most 5%: {met[loss <= 0.05]}).",
    ]


def wait_for_other_benchmarks(limit_s: float = 1800) -> None:
    """Another benchmark on these 2 cores would be measured with ours: let it finish first."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and any(
        "benchmarks/" in _cmdline(pid) and "benchmarks/batching.py" not in _cmdline(pid)
        for pid in os.listdir("/proc")
        if pid.isdigit() and int(pid) != os.getpid()
    ):
        print("another benchmark is running: waiting...", flush=True)
        time.sleep(60)


def _cmdline(pid: str) -> str:
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    wait_for_other_benchmarks()
    wait_for_quiet(120, 1.0)
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="batching-"))
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    npy = root / "googlenet.npy"
    np.save(npy, x)
    ranking = REPO / "examples" / "ranking"
    ranking_json = json.loads((ranking / "samples" / "request.json").read_text())["jsonData"]
    ranking_v2 = root / "ranking-v2.json"
    ranking_v2.write_text(json.dumps({"inputs": [ranking_input(ranking_json)]}))
    cases = [
        *[
            (f"GoogLeNet {p}", googlenet_dir(root, p), npy, x, "seldon-grpc")
            for p in ("fp32", "bf16")[: 1 + cpu.has_bf16()]
        ],
        ("ranking", ranking, ranking / "samples" / "request.json", ranking_json, "seldon-grpc"),
        ("ranking", ranking, ranking_v2, ranking_json, "v2-grpc"),
    ]
    lines, gains, checks, runs = [], [], [], []
    for index, (name, source, request_file, payload, protocol) in enumerate(cases):
        unbatched = served_copy(source, root / f"{index}-{source.name}-unbatched")
        one_ms, full_ms, rows, runtime = run_times_ms(unbatched, payload)
        name = f"{name} ({runtime}, {rows} row{'s' * (rows > 1)} per request)"
        engine = f"- {name}: `model.run` {one_ms:.1f} ms for one request, {full_ms:.1f} ms for {BATCH_REQUESTS}."
        runs += [engine] if engine.split(":")[0] not in "".join(runs) else []  # ranking: once for both protocols
        name += f", {'V2' if protocol.startswith('v2') else 'Seldon v1'} gRPC"
        print(name, flush=True)
        batched = served_copy(source, root / f"{index}-{source.name}-batched", rows, runtime)
        dirs = {"unbatched": unbatched, "batched": batched}
        serve_args = ("--protocol", "v2", "--threads", str(BATCH_REQUESTS)) if protocol.startswith("v2") else THREADS
        with contextlib.ExitStack() as stack:
            services = {
                condition: stack.enter_context(running_service(dirs[condition], *serve_args, verbose=False))
                for condition in CONDITIONS
            }
            requests = {condition: Request.from_file(request_file, protocol) for condition in CONDITIONS}
            if protocol.startswith("v2"):
                requests = {
                    condition: request.for_model(*v2_model(protocol, "127.0.0.1", services[condition].grpc_port, None))
                    for condition, request in requests.items()
                }
            rows_by_level = measure(services, requests, protocol, args)
        lines += served_table_lines(name, rows_by_level, CONDITIONS, LEVELS)
        gains.append(gain_line(name, rows_by_level))
        if name.startswith("GoogLeNet"):
            checks += verdicts(name, rows_by_level, full_ms)
    shutil.rmtree(root)
    header = " | ".join(f"c{c} req/s | c{c} p50 | c{c} p99" for c in LEVELS)
    section = "\n".join(
        [
            "## Adaptive batching: unbatched and batched, served",
            "",
            served_measured_line(began),
            "",
            f"    .venv/bin/python benchmarks/batching.py --rounds {args.rounds} --duration {args.duration:g}",
            "",
            "Each model served twice at once by `seldon-caffe serve`, without `batching:` and with `batching: "
            f"{{max_batch_size: {BATCH_REQUESTS} requests' rows, max_queue_delay_ms: 0}}`, both with "
            f"{BATCH_REQUESTS} threads (v1: REST and gRPC; V2: the runtime's), loaded over gRPC by `seldon-caffe "
            f"bench`'s load at concurrency {', '.join(map(str, LEVELS))} ({args.duration:g} s per level after "
            f"{args.warmup:g} s), clients on the same 2 cores. GoogLeNet: openvino (options.threads 2), no hooks, "
            "a 1x3x224x224 float32 .npy as binData. ranking: examples/ranking with its hooks, its "
            "samples/request.json (10 candidates: 10 rows per request), as jsonData over Seldon v1 and as a JSON "
            "BYTES input over V2. The two services take turns "
            f"level by level, {args.rounds} rounds in alternating order; medians over the rounds, latencies in ms. "
            "rows per run: the mean, over requests, of the rows in the run that answered each "
            "(seldon_caffe_batch_size).",
            "",
            f"| model | service | {header} |",
            "|---|---|" + "---:|" * (3 * len(LEVELS)),
            *lines,
            "",
            "Batched over unbatched req/s (the median of each round's ratio: the two ran back to back), and in "
            "brackets the rows per run:",
            "",
            f"| model | {' | '.join(f'c{c}' for c in LEVELS)} |",
            "|---|" + "---:|" * len(LEVELS),
            *gains,
            "",
            "The engine alone, in one process, before the services started (medians):",
            "",
            *runs,
            "",
            "The goals of issue 16:",
            "",
            *checks,
            "",
        ]
    )
    print(section)
    write_section(section, args.out, MARKERS)


if __name__ == "__main__":
    main()
