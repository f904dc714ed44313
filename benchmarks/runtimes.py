"""Caffe runtimes against real Caffe: images/s for every zoo net at batch 1 and 8.

    nice python benchmarks/runtimes.py          # ~12 minutes on 2 cores; updates docs/benchmarks.md
    python benchmarks/runtimes.py --nets lenet,resnet50 --runtimes opencv --rounds 1

Real Caffe is the baseline, timed inside its root (`make caffe-env`) around pycaffe's own
net.forward(), in-process. Every other runtime is timed around `model.run`, what a request
pays. Runtimes are named as in model.yaml (`--runtimes opencv,pycaffe,onnxruntime,...`);
one that cannot load a net gets "n/a" and the reason. Weights are random (made by real
Caffe; speed does not depend on them). Every engine gets 2 threads: OMP/OpenBLAS/
MKL_NUM_THREADS=2 for all, and options.threads=2.

Engines are measured net by net and batch by batch in interleaved rounds (real Caffe, then
each runtime, then again), each round timing at least two calls and about `--seconds` per
engine after a warm-up call; a cell is the median over every call of every round. On a machine that
others share, load comes and goes: interleaving spreads it over all engines alike.

The pycaffe worker's own cost is measured apart, on a net that does next to nothing
(Power, identity) so that moving the arrays through the pipe is all there is: worker
`model.run` minus real Caffe's in-process forward. Results replace the "Caffe runtimes"
section of docs/benchmarks.md (between its markers), nothing else.
"""

from __future__ import annotations

import os

from seldon_caffe.threads import blas_thread_env

THREADS = 2
os.environ.update(blas_thread_env(THREADS))  # before numpy and the engines start their pools

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from _report import caffe_blas, cpu_model, load_sentence, write_section  # noqa: E402

from caffe_oracle import reference  # noqa: E402
from seldon_caffe.config import ModelConfig, parse_config  # noqa: E402
from seldon_caffe.errors import SeldonCaffeError  # noqa: E402
from seldon_caffe.runtimes import Runtime, auto, load_runtime  # noqa: E402

ZOO = Path(os.environ.get("SELDON_CAFFE_ZOO", REPO.parent / "shared" / "caffe-zoo"))
START, END = "<!-- caffe-runtimes:start -->", "<!-- caffe-runtimes:end -->"
BATCHES = (1, 8)
BASELINE = "real Caffe"
IDENTITY = """name: "identity"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 224 dim: 224 } } }
layer { name: "out" type: "Power" bottom: "data" top: "out" }
"""

Key = tuple[str, str, int]  # (engine, net, batch)


@dataclasses.dataclass
class AutoStart:
    """`runtime: auto` on one net and batch: its choice, and its load time beyond the winner's."""

    chosen: str
    first_s: float  # no cached choice: every engine loads and is timed
    second_s: float  # the cached choice: the winner alone


class Samples(dict[Key, list[float]]):
    """Seconds per call by (engine, net, batch); `failed` says why an engine has none;
    `starts` what `runtime: auto` chose per (net, batch) and what its starts cost."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: dict[tuple[str, str], str] = {}
        self.starts: dict[tuple[str, int], AutoStart] = {}

    def add(self, key: Key, times: list[float]) -> None:
        self.setdefault(key, []).extend(times)

    def cell(self, key: Key) -> str:
        """Images/s, or why there is no number."""
        if key[:2] in self.failed:
            return self.failed[key[:2]]
        return f"{key[2] / statistics.median(self[key]):.1f}"

    def median(self, key: Key) -> float:
        return statistics.median(self[key])


def measure(
    nets: dict[str, Path], weights: dict[str, Path], runtimes: list[str], rounds: int, seconds: float
) -> Samples:
    """Per-call seconds for every engine, net and batch, engines interleaved (module docstring)."""
    samples = Samples()
    for name, prototxt in nets.items():
        models = {runtime: _load(runtime, prototxt, weights[name]) for runtime in runtimes if runtime != "auto"}
        try:
            for batch in BATCHES:  # batch outside the rounds: one reshape per runtime and batch
                if "auto" in runtimes:  # auto's choice depends on the batch: loaded per batch
                    previous = models.pop("auto", None)
                    if previous is not None and not isinstance(previous, str):
                        previous.close()
                    models["auto"] = _load_auto(prototxt, weights[name], batch, samples, name)
                for k in range(rounds):
                    samples.add((BASELINE, name, batch), _time_real_caffe(prototxt, weights[name], batch, seconds))
                    for runtime, model in models.items():
                        if isinstance(model, str):
                            samples.failed[(runtime, name)] = model
                        else:
                            samples.add((runtime, name, batch), _time(model, batch, seconds, warm_up=k == 0))
        finally:
            for model in models.values():
                if not isinstance(model, str):
                    model.close()
        print(name, {f"{e} b{b}": samples.cell((e, n, b)) for e, n, b in samples if n == name}, flush=True)
    return samples


def _config(runtime: str, prototxt: Path, weights: Path, batch: int = 1) -> ModelConfig:
    raw = {
        "files": {"prototxt": str(prototxt), "weights": str(weights)},
        "runtime": runtime,
        "options": {
            "threads": THREADS,
            **({"pycaffe_command": reference.python_command()} if runtime == "pycaffe" else {}),
        },
        # auto times the engines at the batch size the service runs: batching's largest
        **({"batching": {"max_batch_size": batch}} if batch > 1 else {}),
    }
    return parse_config(raw, weights.parent)


def _load(runtime: str, prototxt: Path, weights: Path, batch: int = 1) -> Runtime | str:
    try:
        return load_runtime(_config(runtime, prototxt, weights, batch))
    except (SeldonCaffeError, ImportError) as exc:
        return f"n/a ({str(exc).splitlines()[0][:80]})"


def _load_auto(prototxt: Path, weights: Path, batch: int, samples: Samples, net: str) -> Runtime | str:
    """`runtime: auto` as a first start (nothing cached) and a second; both timed against
    loading the engine it chose by name (the ONNX conversion is cached by then for all three)."""
    config = _config("auto", prototxt, weights, batch)
    for directory in auto._cache_dirs(config):
        shutil.rmtree(directory, ignore_errors=True)  # a first start: nothing measured yet
    seconds = {}
    for start in ("first", "second"):
        began = time.perf_counter()
        model = _load("auto", prototxt, weights, batch)
        seconds[start] = time.perf_counter() - began
        if isinstance(model, str) or start == "second":
            break
        model.close()
    choice = auto.cached_choice(config)
    if isinstance(model, str) or choice is None:
        return model if isinstance(model, str) else "n/a (no choice cached)"
    began = time.perf_counter()
    named_model = _load(choice.runtime, prototxt, weights, batch)
    named = time.perf_counter() - began
    if not isinstance(named_model, str):
        named_model.close()
    samples.starts[(net, batch)] = AutoStart(choice.runtime, seconds["first"] - named, seconds["second"] - named)
    return model


def _time_real_caffe(prototxt: Path, weights: Path, batch: int, seconds: float) -> list[float]:
    job = reference.timing_job(prototxt, weights, batch, repeats=2, warmup=1, min_seconds=seconds)
    return reference.run_jobs([job], threads=THREADS)[0]["times"]


def _time(model: Runtime, batch: int, seconds: float, warm_up: bool) -> list[float]:
    """At least two calls, more while they add up to less than `seconds`."""
    rng = np.random.default_rng(batch)
    examples = model.example_shapes or {}  # a fully convolutional net: its image size is free (-1)
    shapes = {s.name: [batch, *examples.get(s.name, s.shape)[1:]] for s in model.inputs}
    feed = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    if warm_up:
        model.run(feed)  # first-call allocations, the reshape to this batch
    times: list[float] = []
    while len(times) < 2 or (sum(times) < seconds and len(times) < 1000):
        start = time.perf_counter()
        model.run(feed)
        times.append(time.perf_counter() - start)
    return times


def worker_overhead(work: Path, rounds: int, seconds: float) -> list[tuple[int, float, float, float]]:
    """(batch, MB each way, real Caffe ms, worker ms) on the identity net: the pipe's cost."""
    prototxt, weights = work / "identity.prototxt", work / "identity.caffemodel"
    prototxt.write_text(IDENTITY)
    reference.make_weights(prototxt, weights)
    model = _load("pycaffe", prototxt, weights)
    assert not isinstance(model, str), model
    samples = Samples()
    with model:
        for batch in BATCHES:
            for k in range(rounds):
                samples.add((BASELINE, "identity", batch), _time_real_caffe(prototxt, weights, batch, seconds))
                samples.add(("pycaffe", "identity", batch), _time(model, batch, seconds, warm_up=k == 0))
    mb = 3 * 224 * 224 * 4 / 1e6
    return [
        (b, b * mb, samples.median((BASELINE, "identity", b)) * 1e3, samples.median(("pycaffe", "identity", b)) * 1e3)
        for b in BATCHES
    ]


def report(nets: list[str], runtimes: list[str], samples: Samples, overhead: list, command: str, took: float) -> str:
    """The Markdown section: machine, command, images/s with ratios to real Caffe, overhead."""
    engines = [BASELINE, *runtimes]
    lines = [
        "## Caffe runtimes",
        "",
        f"Measured {datetime.date.today().isoformat()} on {cpu_model()}, in one run of "
        f"`{command}` ({took / 60:.0f} min). {THREADS} threads for every engine (OMP/OpenBLAS/MKL_NUM_THREADS="
        f"{THREADS}, options.threads={THREADS}). Images/s = batch / median time per call (engines interleaved "
        "net by net and batch by batch); in brackets the ratio to real Caffe (higher is faster). Real Caffe: "
        f"BVLC Caffe 1.0 (Debian bullseye python3-caffe, {caffe_blas()}), timed in-process inside its root; the others "
        "around "
        f"`model.run` (pycaffe: the worker in that root, through its pipe). OpenCV {_opencv_version()}. "
        f"{load_sentence()}",
        "",
        "| net | batch | " + " | ".join(engines) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in engines) + " |",
    ]
    for net in nets:
        for batch in BATCHES:
            base = samples.median((BASELINE, net, batch))
            cells = [samples.cell((BASELINE, net, batch))]
            for runtime in runtimes:
                key = (runtime, net, batch)
                ratio = "" if (runtime, net) in samples.failed else f" ({base / samples.median(key):.2f}x)"
                cells.append(samples.cell(key) + ratio)
            lines.append(f"| {net} | {batch} | " + " | ".join(cells) + " |")
    if samples.starts:
        lines += ["", *auto_report(nets, runtimes, samples)]
    if overhead:
        lines += [
            "",
            "pycaffe worker overhead per call, on a Power (identity) net where moving the arrays is all "
            "there is: worker `model.run` minus real Caffe's in-process forward, same root, same threads.",
            "",
            "| batch | MB each way | real Caffe ms | worker ms | overhead ms |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [f"| {b} | {mb:.1f} | {base:.2f} | {w:.2f} | {w - base:+.2f} |" for b, mb, base, w in overhead]
    return "\n".join(lines)


def auto_report(nets: list[str], runtimes: list[str], samples: Samples) -> list[str]:
    """`runtime: auto` against the best engine of the same run, and what its starts add."""
    engines = [r for r in runtimes if r in auto.CANDIDATES]
    lines = [
        f"`runtime: auto` picks among {', '.join(engines)} (runtimes/auto.py): its images/s against the best "
        "of them in the table above, and its load time beyond loading the engine it chose by name: the first "
        "start (every engine loaded and timed; the ONNX conversion already cached) and the second (the cached "
        "choice). auto / best times auto's own instance; chosen / best is the chosen engine's cell in the table "
        "above against the best one's, the quality of the choice without the spread between two instances of "
        "one engine.",
        "",
        "| net | batch | chosen | auto img/s | best engine | best img/s | auto / best | chosen / best "
        "| first start | second start |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for net in nets:
        for batch in BATCHES:
            start = samples.starts.get((net, batch))
            timed = {e: batch / samples.median((e, net, batch)) for e in engines if (e, net, batch) in samples}
            if start is None or not timed or ("auto", net, batch) not in samples:
                continue
            best = max(timed, key=timed.__getitem__)
            mine = batch / samples.median(("auto", net, batch))
            chosen = timed.get(start.chosen, math.nan)
            lines.append(
                f"| {net} | {batch} | {start.chosen} | {mine:.1f} | {best} | {timed[best]:.1f} | "
                f"{mine / timed[best]:.2f} | {chosen / timed[best]:.2f} | {start.first_s:+.1f} s | "
                f"{start.second_s:+.2f} s |"
            )
    return lines


def _opencv_version() -> str:
    import cv2

    return cv2.__version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", help="comma-separated zoo nets (default: all)")
    parser.add_argument("--runtimes", default="opencv,pycaffe,onnxruntime,openvino,auto", help="as in model.yaml")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per net and batch")
    parser.add_argument("--seconds", type=float, default=0.7, help="timed seconds per engine, batch and round")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    if reference.unavailable_reason():
        sys.exit(f"benchmarks/runtimes.py: {reference.unavailable_reason()}")
    nets = {p.stem: p for p in sorted(ZOO.glob("*.prototxt"))}
    if args.nets:
        nets = {name: nets[name] for name in args.nets.split(",")}
    runtimes = [name for name in args.runtimes.split(",") if name]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-caffe-") as tmp:
        weights = {name: Path(tmp) / f"{name}.caffemodel" for name in nets}
        print(f"weights for {len(nets)} nets (real Caffe)...", flush=True)
        reference.run_jobs([reference.weights_job(nets[n], weights[n], seed=1) for n in nets])
        samples = measure(nets, weights, runtimes, args.rounds, args.seconds)
        overhead = worker_overhead(Path(tmp), args.rounds, args.seconds) if "pycaffe" in runtimes else []
    command = "nice python " + " ".join(shlex.quote(a) for a in ["benchmarks/runtimes.py", *(argv or sys.argv[1:])])
    section = report(list(nets), runtimes, samples, overhead, command, time.perf_counter() - began)
    print(section)
    write_section(section, args.out, (START, END))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
