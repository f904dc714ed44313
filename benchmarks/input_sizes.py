"""What a new input size costs on the engines that plan per shape (onnxruntime, openvino, torch).

    nice python benchmarks/input_sizes.py          # ~2 minutes on 2 cores; updates docs/benchmarks.md
    python benchmarks/input_sizes.py --nets squeezenet_v1_1 --runtimes onnxruntime

A fully convolutional Caffe net takes any image size, but our ONNX conversion bakes the
sizes in, so these engines convert and load the net again for each new input shape
(runtimes/per_shape.py), and keep `shape_cache` of them. Per net and engine: the net is
loaded (its declared size converted at start), then for each size of SIZES that it has not
seen, the first request (convert in memory + load + run) and the median of REPEATS more of
the same size. A cell is the median over those sizes. Weights are random (our writer's);
speed does not depend on them. Every engine gets 2 threads. Results replace the "A new
input size" section of docs/benchmarks.md (between its markers), nothing else.
"""

from __future__ import annotations

import os

from seldon_caffe.threads import blas_thread_env

THREADS = 2
os.environ.update(blas_thread_env(THREADS))  # before numpy and the engines start their pools

import argparse  # noqa: E402
import datetime  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from _report import cpu_model, write_section  # noqa: E402

from seldon_caffe.caffe import load_caffe_net  # noqa: E402
from seldon_caffe.config import parse_config  # noqa: E402
from seldon_caffe.runtimes import Runtime, load_runtime  # noqa: E402
from seldon_caffe.weights import fill_random_weights  # noqa: E402

ZOO = Path(os.environ.get("SELDON_CAFFE_ZOO", REPO.parent / "shared" / "caffe-zoo"))
MARKERS = ("<!-- input-sizes:start -->", "<!-- input-sizes:end -->")
# Fully convolutional zoo nets, and sizes (square) other than their declared one.
SIZES = {"squeezenet_v1_1": (259, 291, 323, 355, 387), "caffenet_full_conv": (387, 419, 483)}
RUNTIMES = ("onnxruntime", "openvino", "torch")
REPEATS = 5


def load(net: str, runtime: str, work: Path) -> Runtime:
    """The zoo net with random weights (made once) on `runtime`, from its own model directory."""
    prototxt, weights = ZOO / f"{net}.prototxt", work / f"{net}.caffemodel"
    if not weights.exists():
        caffe = load_caffe_net(prototxt)
        fill_random_weights(caffe, seed=0)
        weights.write_bytes(caffe.caffemodel_bytes())
    files = {"prototxt": str(prototxt), "weights": str(weights)}
    directory = work / f"{net}-{runtime}"
    directory.mkdir(exist_ok=True)
    raw = {"format": "caffe", "files": files, "runtime": runtime, "options": {"threads": THREADS}}
    return load_runtime(parse_config(raw, directory))


def measure(model: Runtime, sizes: tuple[int, ...]) -> dict[str, float]:
    """Medians over `sizes` (ms): the first request of the size, a repeat, and their difference."""
    first, repeat = [], []
    for size in sizes:
        x = np.random.default_rng(size).random((1, 3, size, size), np.float32)
        start = time.perf_counter()
        model.run(x)
        first.append(time.perf_counter() - start)
        runs = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            model.run(x)
            runs.append(time.perf_counter() - start)
        repeat.append(statistics.median(runs))
    ms = {"first": first, "repeat": repeat, "cost": [f - r for f, r in zip(first, repeat, strict=True)]}
    return {key: statistics.median(values) * 1000 for key, values in ms.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default=",".join(SIZES), help="comma-separated, from: " + ", ".join(SIZES))
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--no-write", action="store_true", help="print, leave docs/benchmarks.md alone")
    args = parser.parse_args()
    began = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="seldon-caffe-sizes-") as tmp:
        for net in args.nets.split(","):
            for runtime in args.runtimes.split(","):
                with load(net, runtime, Path(tmp)) as model:
                    cells = measure(model, SIZES[net])
                rows.append(
                    f"| {net} | {runtime} | {cells['first']:.0f} | {cells['repeat']:.0f} | {cells['cost']:.0f} |"
                )
                print(rows[-1], flush=True)
    sizes = "; ".join(f"{net} {list(SIZES[net])}" for net in args.nets.split(","))
    command = shlex.join(["python", "benchmarks/input_sizes.py", *sys.argv[1:]])
    section = "\n".join(
        [
            "## A new input size (Caffe nets with free image dims)",
            "",
            f"Measured {datetime.date.today().isoformat()} on {cpu_model()}, with `{command}` "
            f"({(time.monotonic() - began) / 60:.0f} min, load average (5 min) at the end "
            f"{os.getloadavg()[1]:.1f}). 2 threads per engine, batch 1. A fully convolutional net takes any "
            "image size; onnxruntime, openvino and torch run a conversion baked for one size, so the first "
            "request of a size converts the net in memory and loads it (runtimes/per_shape.py), and later "
            f"ones reuse it (`shape_cache` sizes kept, default 8). Medians over the sizes {sizes} (square, "
            f"none the declared one), each repeat the median of {REPEATS} calls:",
            "",
            "| net | runtime | first request (ms) | repeat (ms) | new-size cost (ms) |",
            "| --- | --- | ---: | ---: | ---: |",
            *rows,
            "",
            "The cost grows with the weights, which each conversion copies (squeezenet_v1_1: 5 MB, "
            "caffenet_full_conv: 233 MB): converting caffenet_full_conv measured 1.6-1.8 s of it "
            "(onnx.checker 0.5 s, the initializers 0.5 s, the graph 0.5 s), onnxruntime's session 1.0 s. "
            "A client that keeps changing sizes pays it per size; one that keeps a few sizes pays it once each.",
        ]
    )
    if not args.no_write:
        write_section(section, REPO / "docs" / "benchmarks.md", MARKERS)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
