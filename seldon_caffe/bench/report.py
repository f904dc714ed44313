"""What a bench run says: the table, perf_analyzer-style CSV, the plot, and the server's own
stage timings read from its Prometheus endpoint."""

from __future__ import annotations

import csv
import re
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SeldonCaffeError
from .load import Result

STAGES = ("preprocess", "run_model", "postprocess")
_STAGE_LINE = re.compile(r"^seldon_caffe_(\w+?)_seconds_(sum|count)(?:\{[^}]*\})?\s+(\S+)$")
# perf_analyzer's CSV column names where a column means the same; latencies in microseconds.
CSV_COLUMNS = [
    "Concurrency",
    "Inferences/Second",
    "Client Send Rate",
    "p50 latency",
    "p90 latency",
    "p95 latency",
    "p99 latency",
    "Avg latency",
    "Max latency",
    "Errors",
    "Server Compute Input",
    "Server Compute Infer",
    "Server Compute Output",
    "Client CPU %",
]


def scrape_stages(metrics_url: str | None) -> dict[str, tuple[float, float]] | None:
    """{stage: (sum of seconds, count)} from the service's metrics endpoint, or None without one."""
    if metrics_url is None:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    totals: dict[str, list[float]] = {stage: [0.0, 0.0] for stage in STAGES}
    for line in text.splitlines():
        match = _STAGE_LINE.match(line)
        if match and match.group(1) in totals:
            totals[match.group(1)][0 if match.group(2) == "sum" else 1] += float(match.group(3))
    return {stage: (values[0], values[1]) for stage, values in totals.items()}


def stage_ms(before: dict | None, after: dict | None) -> dict[str, float] | None:
    """Mean milliseconds per request in each stage, between two scrapes."""
    if before is None or after is None:
        return None
    means = {}
    for stage in STAGES:
        count = after[stage][1] - before[stage][1]
        means[stage] = 1000 * (after[stage][0] - before[stage][0]) / count if count > 0 else float("nan")
    return means


def summarize(result: Result, stages: dict[str, float] | None) -> dict[str, Any]:
    """One row of the report."""
    latencies = np.asarray(result.latencies) * 1000
    done = sum(result.statuses.values())
    row: dict[str, Any] = {
        "concurrency": result.plan.concurrency if result.plan.rate is None else None,
        "rate": result.plan.rate,
        "req_s": len(latencies) / result.window_s if result.window_s else 0.0,
        "sent_s": done / result.window_s if result.window_s else 0.0,
        "errors": result.errors,
        "client_cpu": 100 * result.client_cpu_s / result.window_s if result.window_s else 0.0,
        "stages": stages,
        "partial": result.partial,
    }
    for name, q in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99)):
        row[name] = float(np.percentile(latencies, q)) if latencies.size else float("nan")
    row["avg"] = float(latencies.mean()) if latencies.size else float("nan")
    row["max"] = float(latencies.max()) if latencies.size else float("nan")
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "load     req/s   p50 ms   p90 ms   p95 ms   p99 ms   max ms  errors       "
        "server ms: pre / run / post   clients' CPU (100% = 1 core)"
    ]
    for row in rows:
        load = f"c={row['concurrency']}" if row["rate"] is None else f"{row['rate']:g}/s"
        errors = ", ".join(f"{n}x{_status(s)}" for s, n in sorted(row["errors"].items())) or "0"
        stages = row["stages"]
        # "-": no request went through that stage (e.g. no postprocess hook over V2)
        server = (
            " / ".join(f"{stages[s]:.1f}" if stages[s] == stages[s] else "-" for s in STAGES)
            if stages
            else "(no metrics)"
        )
        lines.append(
            f"{load:<7} {row['req_s']:6.1f} {row['p50']:8.1f} {row['p90']:8.1f} {row['p95']:8.1f} {row['p99']:8.1f} "
            f"{row['max']:8.1f}  {errors:<12} {server:<28} {row['client_cpu']:5.0f}%"
            + ("  (partial)" if row["partial"] else "")
        )
    return "\n".join(lines)


def _status(status: int) -> str:
    return "no answer" if status == 0 else str(status)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            stages = row["stages"] or {}
            us = [round(1000 * row[k]) if row[k] == row[k] else "" for k in ("p50", "p90", "p95", "p99", "avg", "max")]
            server = [round(1000 * stages[s]) if s in stages and stages[s] == stages[s] else "" for s in STAGES]
            load = row["concurrency"] if row["rate"] is None else ""
            writer.writerow(
                [
                    load,
                    f"{row['req_s']:.2f}",
                    f"{row['sent_s']:.2f}",
                    *us,
                    sum(row["errors"].values()),
                    *server,
                    f"{row['client_cpu']:.0f}",
                ]
            )


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Throughput against p99 latency, one point per level, labelled with its concurrency."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SeldonCaffeError("--plot needs matplotlib (pip install seldon-caffe[bench])") from None
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([r["p99"] for r in rows], [r["req_s"] for r in rows], marker="o")
    for row in rows:
        label = f"c={row['concurrency']}" if row["rate"] is None else f"{row['rate']:g}/s"
        axes.annotate(label, (row["p99"], row["req_s"]), textcoords="offset points", xytext=(5, 5))
    axes.set_xlabel("p99 latency (ms)")
    axes.set_ylabel("requests / s")
    axes.set_title(title, fontsize=9)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
