"""The ONNX runtimes by precision: fp32, bf16 and int8 beside real Caffe and OpenCV, with errors.

    nice python benchmarks/onnx_precisions.py        # the four nets of the speed goal; updates docs/benchmarks.md
    python benchmarks/onnx_precisions.py --nets squeezenet_v1_1 --rounds 1

benchmarks/runtimes.py compares every runtime at fp32 on every zoo net; this one looks at
the nets of issue 4's speed goal (GoogLeNet, ResNet-50, MobileNet v2, SqueezeNet 1.1) and
adds what only the ONNX runtimes offer: OpenVINO's bf16 and INT8 on both. Its timing is
runtimes.py's own (same helpers: engines interleaved round by round, real Caffe timed inside
its root, 2 threads each); the INT8 models come from `seldon_caffe.quantize` calibrated on
16 random inputs. Error = max|a - b| / max|b| against real Caffe on 8 random inputs (the
conformance measure), and top-1 agreement with real Caffe. Random weights and inputs make
the INT8 error an upper bound on what a trained net with real calibration images shows.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import runtimes as bench  # benchmarks/runtimes.py (this directory is on sys.path when run as a script)
from _report import caffe_blas, cpu_model, write_section

from caffe_oracle import reference
from seldon_caffe import cpu, quantize
from seldon_caffe.caffe.to_onnx import convert_files
from seldon_caffe.config import parse_config
from seldon_caffe.faithfulness import relative_error
from seldon_caffe.runtimes import Runtime, load_runtime

NETS = ("bvlc_googlenet", "resnet50", "mobilenet_v2", "squeezenet_v1_1")
# column -> (runtime, precision); None = the real-Caffe baseline, timed by runtimes.py's helper
ENGINES: dict[str, tuple[str, str] | None] = {
    bench.BASELINE: None,
    "opencv": ("opencv", "fp32"),
    "onnxruntime fp32": ("onnxruntime", "fp32"),
    "openvino fp32": ("openvino", "fp32"),
    "openvino bf16": ("openvino", "bf16"),
    "onnxruntime int8": ("onnxruntime", "int8"),
    "openvino int8": ("openvino", "int8"),
}
MARKERS = ("<!-- onnx-precisions:start -->", "<!-- onnx-precisions:end -->")
CALIBRATION = 16


def load(runtime: str, precision: str, prototxt: Path, weights: Path) -> Runtime:
    raw = {
        "files": {"prototxt": str(prototxt), "weights": str(weights)},
        "runtime": runtime,
        "options": {"threads": bench.THREADS, "precision": precision},
    }
    return load_runtime(parse_config(raw, weights.parent))


def prepare(name: str, prototxt: Path, weights: Path) -> None:
    """The INT8 model the runtimes look for beside the weights (NAME.int8.onnx)."""
    fp32 = weights.with_suffix(".fp32.onnx")
    convert_files(prototxt, weights, fp32)
    inputs = quantize.model_inputs(fp32)
    quantize.quantize_model(fp32, weights.with_suffix(".int8.onnx"), quantize.random_samples(inputs, CALIBRATION))


def measure(name: str, prototxt: Path, weights: Path, rounds: int, seconds: float) -> tuple[bench.Samples, dict]:
    """Interleaved timings (runtimes.py's method) and, per engine, its error against real Caffe."""
    check = reference.run_jobs([reference.forward_job(prototxt, weights, batch=8, seed=2)])[0]
    samples, errors = bench.Samples(), {}
    models: dict[str, Any] = {}
    for engine, spec in ENGINES.items():
        if spec is not None:
            try:
                models[engine] = load(*spec, prototxt, weights)
            except Exception as exc:  # report any engine failure in the table, keep measuring the rest
                models[engine] = f"n/a ({str(exc).splitlines()[0][:60]})"
    try:
        for engine, model in models.items():
            if isinstance(model, str):
                samples.failed[(engine, name)] = model
            else:
                errors[engine] = _error(model, check)
        for batch in bench.BATCHES:
            for k in range(rounds):
                samples.add((bench.BASELINE, name, batch), bench._time_real_caffe(prototxt, weights, batch, seconds))
                for engine, model in models.items():
                    if not isinstance(model, str):
                        samples.add((engine, name, batch), bench._time(model, batch, seconds, warm_up=k == 0))
    finally:
        for model in models.values():
            if not isinstance(model, str):
                model.close()
    return samples, errors


def _error(model: Runtime, check: dict) -> tuple[float, float]:
    got = model.run(check["inputs"])
    (output, want), *_ = check["outputs"].items()
    have = got[output].reshape(len(want), -1)
    want = want.reshape(len(want), -1)
    relative = relative_error(have, want)
    return relative, float(np.mean(have.argmax(1) == want.argmax(1)))


def report(nets: list[str], samples: bench.Samples, errors: dict, command: str, took: float, cpu: str) -> str:
    engines = list(ENGINES)
    lines = [
        "## ONNX runtimes by precision",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {cpu_model()}, {cpu}, in one run of `{command}` "
        f"({took / 60:.0f} min); method as in the table above. Cells: images/s (ratio to real Caffe). "
        "Error rows: relative error against real Caffe at batch 8 / top-1 agreement with it.",
        "",
        "| net | batch | " + " | ".join(engines) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in engines) + " |",
    ]
    for net in nets:
        for batch in bench.BATCHES:
            base = samples.median((bench.BASELINE, net, batch))
            cells = []
            for engine in engines:
                key = (engine, net, batch)
                if key[:2] in samples.failed or engine == bench.BASELINE:
                    cells.append(samples.cell(key))
                else:
                    cells.append(f"{samples.cell(key)} ({base / samples.median(key):.2f}x)")
            lines.append(f"| {net} | {batch} | " + " | ".join(cells) + " |")
        cells = [f"{errors[net][e][0]:.1e} / {errors[net][e][1]:.0%}" if e in errors[net] else "" for e in engines]
        lines.append(f"| {net} | error | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *cpu_notes()])


def cpu_notes() -> list[str]:
    """What this CPU's flags mean for the table, read from the CPU (never written by hand)."""
    bf16 = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in cpu.flags()]
    vnni = [flag for flag in ("avx512_vnni", "avx_vnni", "amx_int8") if flag in cpu.flags()]
    return [
        f"* Real Caffe ran with {caffe_blas()}.",
        (
            f"* bf16: this CPU has {' and '.join(bf16)}, so OpenVINO runs `precision: bf16` in bf16 kernels."
            if bf16
            else "* bf16: this CPU has neither AVX512_BF16 nor AMX, so OpenVINO compiles `precision: bf16` as f32 "
            "(the runtime logs a warning; its error row equals fp32's)."
        ),
        (
            f"* int8: this CPU has {' and '.join(vnni)} (int8 dot products without saturation): weights are "
            "quantized to 8 bits."
            if vnni
            else "* int8: this CPU has no VNNI; AVX2's VPMADDUBSW can saturate, so weights are quantized to 7 bits "
            "(`reduce_range`)."
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default=",".join(NETS), help="comma-separated zoo nets")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per net and batch")
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per engine, batch and round")
    parser.add_argument("--out", type=Path, default=bench.REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    if reference.unavailable_reason():
        sys.exit(f"benchmarks/onnx_precisions.py: {reference.unavailable_reason()}")
    nets = {name: bench.ZOO / f"{name}.prototxt" for name in args.nets.split(",")}
    began = time.perf_counter()
    samples, errors = bench.Samples(), {}
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        weights = {name: Path(tmp) / f"{name}.caffemodel" for name in nets}
        reference.run_jobs([reference.weights_job(nets[n], weights[n], seed=1) for n in nets])
        for name, prototxt in nets.items():
            prepare(name, prototxt, weights[name])
            found, errors[name] = measure(name, prototxt, weights[name], args.rounds, args.seconds)
            samples.update(found)
            samples.failed.update(found.failed)
            print(name, {f"{e} b{b}": samples.cell((e, n, b)) for e, n, b in found}, errors[name], flush=True)
    command = "nice python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/onnx_precisions.py", *(argv or sys.argv[1:])]
    )
    section = report(list(nets), samples, errors, command, time.perf_counter() - began, f"{bench.THREADS} threads")
    print(section)
    write_section(section, args.out, MARKERS)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
