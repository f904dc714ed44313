"""The detection example (examples/detection) per engine: images/s of the net, and of a request.

    nice .venv/bin/python benchmarks/detection.py      # about 2 minutes; updates docs/benchmarks.md
    .venv/bin/python benchmarks/detection.py --runtimes opencv,onnxruntime --rounds 1

Two figures per engine, one image at a time, with the example's own model.yaml (options.
threads: 1; OMP/OpenBLAS/MKL_NUM_THREADS=1 for every engine):

* net: `model.run` on one prepared 1x3x96x96 image: the convolutions, PriorBox and
  DetectionOutput (decode, per-class NMS, keep_top_k), what the engine itself costs;
* request: `SeldonCaffeModel.predict` on a 96x96 PNG: decode, resize, run, postprocess,
  what a request pays before any transport.

Inputs cycle through the first 16 held-out scenes. Engines are measured in interleaved
rounds (each engine about `--seconds` per round and figure after a warm-up call); a cell is
the median over every call of every round. Results replace this script's section of
docs/benchmarks.md (between its markers), nothing else.
"""

from __future__ import annotations

import os

from seldon_caffe.threads import blas_thread_env

THREADS = 1  # examples/detection/model.yaml: options.threads
os.environ.update(blas_thread_env(THREADS))  # before numpy and the engines start their pools

import argparse  # noqa: E402
import datetime  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "detection"
sys.path[:0] = [str(REPO), str(EXAMPLE), str(REPO / "examples")]
import shapes_data  # noqa: E402
from _report import cpu_model, load_sentence, write_section  # noqa: E402
from _train import load_hooks  # noqa: E402

from seldon_caffe.errors import SeldonCaffeError  # noqa: E402
from seldon_caffe.model import SeldonCaffeModel  # noqa: E402

START, END = "<!-- detection:start -->", "<!-- detection:end -->"
ENGINES = ("opencv", "onnxruntime", "openvino", "torch")
SCENES = 16
FIGURES = ("net", "request")
HOOKS = load_hooks(EXAMPLE / "hooks.py")  # prepares the net's inputs as a request would


def calls(served: SeldonCaffeModel) -> dict[str, Callable[[int], object]]:
    """figure -> one timed call on scene i (mod SCENES)."""
    images = [shapes_data.scene("held-out", i).image for i in range(SCENES)]
    feeds = [{"data": HOOKS.prepare(image)[None]} for image in images]
    files = [shapes_data.png(image) for image in images]
    return {
        "net": lambda i: served.model.run(feeds[i % SCENES]),
        "request": lambda i: served.predict(files[i % SCENES], names=[], meta={}),
    }


def timed(call: Callable[[int], object], seconds: float) -> list[float]:
    """Seconds per call: at least 5 calls, more while they add up to less than `seconds`."""
    times: list[float] = []
    while len(times) < 5 or (sum(times) < seconds and len(times) < 5000):
        start = time.perf_counter()
        call(len(times))
        times.append(time.perf_counter() - start)
    return times


def measure(
    engines: list[str], rounds: int, seconds: float
) -> tuple[dict[tuple[str, str], list[float]], dict[str, str]]:
    """(seconds per call by (engine, figure), why an engine has no figures)."""
    loaded, failed = {}, {}
    for engine in engines:
        served = SeldonCaffeModel(str(EXAMPLE), engine)
        try:
            served.load()
        except (SeldonCaffeError, ImportError) as exc:
            failed[engine] = f"n/a ({str(exc).splitlines()[0][:100]})"
            continue
        loaded[engine] = calls(served), served
    samples: dict[tuple[str, str], list[float]] = {}
    try:
        for k in range(rounds):
            for engine, (figures, _) in loaded.items():
                for figure, call in figures.items():
                    if k == 0:
                        call(0)  # warm-up: first-call allocations
                    samples.setdefault((engine, figure), []).extend(timed(call, seconds))
            print(f"round {k + 1}/{rounds}", flush=True)
    finally:
        for _, served in loaded.values():
            served.model.close()
    return samples, failed


def report(engines: list[str], samples: dict, failed: dict[str, str], command: str, took: float) -> str:
    import cv2

    lines = [
        "## Detection example (SSD) per engine",
        "",
        f"Measured {datetime.date.today().isoformat()} on {cpu_model()}, in one run of `{command}` "
        f"({took / 60:.1f} min). examples/detection: a 96x96 SSD (5 conv layers, 2 feature maps, 720 priors, "
        f"DetectionOutput keeping at most 20 boxes), batch 1, {THREADS} thread for every engine (model.yaml). "
        "net = `model.run` on a prepared input; request = `SeldonCaffeModel.predict` on a 96x96 PNG (decode, "
        "resize, run, postprocess). Images/s = 1 / median seconds per call, engines interleaved. "
        f"OpenCV {cv2.__version__}. {load_sentence()}",
        "",
        "| engine | net img/s | request img/s | request ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for engine in engines:
        if engine in failed:
            lines.append(f"| {engine} | {failed[engine]} | | |")
            continue
        net, request = (statistics.median(samples[(engine, f)]) for f in FIGURES)
        lines.append(f"| {engine} | {1 / net:.0f} | {1 / request:.0f} | {request * 1e3:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtimes", default=",".join(ENGINES), help="engines, as in model.yaml")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per engine, figure and round")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    engines = [name for name in args.runtimes.split(",") if name]
    began = time.perf_counter()
    samples, failed = measure(engines, args.rounds, args.seconds)
    command = "nice .venv/bin/python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/detection.py", *(argv if argv is not None else sys.argv[1:])]
    )
    section = report(engines, samples, failed, command, time.perf_counter() - began)
    print(section)
    write_section(section, args.out, (START, END))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
