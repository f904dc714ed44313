"""TensorFlow on CPU: oneDNN on/off and thread settings, against the same model on ONNX engines.

    python benchmarks/tensorflow.py            # ~5-8 minutes on 2 cores; writes docs/benchmarks.md

A Keras ResNet-50 (random weights: speed does not depend on them) is exported as a
SavedModel and served through our `tensorflow` runtime (`model.run`, what a request pays),
at batch 1 and 8, with oneDNN on and off and across intra_op/inter_op. The same SavedModel,
converted with tf2onnx, runs on onnxruntime and OpenVINO (f32, asked for explicitly: OpenVINO
picks bf16 by itself on CPUs that have it). Every case runs in its own interpreter, because
oneDNN and the thread pools are fixed when TensorFlow is first imported. Timings are medians;
the "2 clients" column is two threads sending batch-1 requests at once, as a threaded server
does. Results replace the "TensorFlow on CPU (oneDNN)" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _report import cpu_model, wait_for_quiet, write_section

from seldon_caffe.faithfulness import relative_error

# This script is named like the package it measures; run as a script, its folder is first on
# sys.path and `import tensorflow` would find this file. Take the folder off the path.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- tensorflow:start -->", "<!-- tensorflow:end -->"
OMP_KNOBS = {"omp_num_threads": 2, "kmp_blocktime": 1, "kmp_affinity": "granularity=fine,compact,1,0"}


def cases() -> list[dict[str, Any]]:
    """What to measure: every TensorFlow setting, then the ONNX engines."""
    out = [
        {"engine": "tensorflow", "onednn": onednn, "intra_op": intra, "inter_op": inter}
        for onednn in (True, False)
        for intra, inter in ((1, 1), (2, 1), (2, 2))
    ]
    out.append({"engine": "tensorflow", "onednn": True, "intra_op": 2, "inter_op": 1, **OMP_KNOBS})
    out += [{"engine": "onnxruntime", "threads": n} for n in (1, 2)]
    out += [{"engine": "openvino", "threads": n} for n in (1, 2)]
    return out


# -- building the model (a subprocess: it imports TensorFlow) ---------------------------------


def build(work: Path) -> None:
    """Export ResNet-50 as a SavedModel model directory, a reference answer, and its ONNX form."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))
    model_dir = work / "resnet50"
    model.export(str(model_dir / "saved_model"), verbose=False)
    (model_dir / "model.yaml").write_text(
        "name: resnet50\nformat: tensorflow\nfiles: {saved_model: saved_model}\nruntime: tensorflow\n"
    )
    x = np.random.default_rng(0).normal(size=(8, 224, 224, 3)).astype(np.float32)
    np.savez(work / "reference.npz", x=x, y=np.asarray(model(x, training=False)))


def convert(work: Path) -> None:
    argv = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(work / "resnet50" / "saved_model")]
    argv += ["--output", str(work / "resnet50.onnx"), "--opset", "17"]
    subprocess.run(argv, check=True, capture_output=True, env=_quiet_env())


# -- measuring one case (a subprocess each) ------------------------------------------------


def measure(case: dict[str, Any], work: Path, repeats: int) -> dict[str, Any]:
    reference = np.load(work / "reference.npz")
    run = _runner(case, work)
    result: dict[str, Any] = {}
    for batch, warm, n in ((1, 2, repeats), (8, 1, max(3, repeats // 3))):
        x = reference["x"][:batch]
        for _ in range(warm):
            run(x)  # warm-up: graph optimisation, oneDNN primitive creation
        times, cpu = [], time.process_time()
        for _ in range(n):
            start = time.perf_counter()
            y = run(x)
            times.append(time.perf_counter() - start)
        result[f"b{batch}_ms"] = 1000 * float(np.median(times))
        # CPU time of all our threads per call: the work done, which other jobs on a shared
        # machine inflate far less than wall time (spinning threads count, waiting ones not).
        result[f"b{batch}_cpu_ms"] = 1000 * (time.process_time() - cpu) / n
    result["max_rel_diff"] = relative_error(y, reference["y"])
    result["clients2_rps"] = _two_clients(run, reference["x"][:1], repeats)
    result["openmp_loaded"] = _openmp_libraries()
    return result


def best_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine a case's rounds: the least disturbed median of each (others share the machine)."""
    done = [r for r in rounds if "error" not in r]
    if not done:
        return rounds[0]
    return {
        "b1_ms": min(r["b1_ms"] for r in done),
        "b8_ms": min(r["b8_ms"] for r in done),
        "b1_cpu_ms": min(r["b1_cpu_ms"] for r in done),
        "b8_cpu_ms": min(r["b8_cpu_ms"] for r in done),
        "clients2_rps": max(r["clients2_rps"] for r in done),
        "max_rel_diff": max(r["max_rel_diff"] for r in done),
        "openmp_loaded": sorted({lib for r in done for lib in r["openmp_loaded"]}),
    }


def _runner(case: dict[str, Any], work: Path):
    engine = case["engine"]
    if engine == "tensorflow":
        import yaml

        from seldon_caffe.config import load_config
        from seldon_caffe.runtimes import load_runtime

        options = {k: v for k, v in case.items() if k != "engine"}
        model_dir = work / f"resnet50-{abs(hash(json.dumps(case, sort_keys=True)))}"
        model_dir.mkdir(exist_ok=True)
        config = yaml.safe_load((work / "resnet50" / "model.yaml").read_text())
        config["files"]["saved_model"] = str(work / "resnet50" / "saved_model")
        config["options"] = options
        (model_dir / "model.yaml").write_text(yaml.safe_dump(config))
        model = load_runtime(load_config(model_dir))
        output = model.outputs[0].name
        return lambda x: model.run(x)[output]
    if engine == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = case["threads"]
        so.inter_op_num_threads = 1
        session = ort.InferenceSession(str(work / "resnet50.onnx"), so, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    import openvino as ov

    core = ov.Core()
    compiled: dict[int, Any] = {}
    config = {
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": case["threads"],
        "PERFORMANCE_HINT": "LATENCY",
    }

    def run(x: np.ndarray) -> np.ndarray:
        if x.shape[0] not in compiled:  # a static batch per compiled model, as one would deploy
            model = core.read_model(str(work / "resnet50.onnx"))
            model.reshape([x.shape[0], 224, 224, 3])
            compiled[x.shape[0]] = core.compile_model(model, "CPU", config)
        net = compiled[x.shape[0]]
        return net(x)[net.output(0)]

    return run


def _two_clients(run, x: np.ndarray, repeats: int) -> float:
    per_client = max(4, repeats // 2)

    def client() -> None:
        for _ in range(per_client):
            run(x)

    threads = [threading.Thread(target=client) for _ in range(2)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 2 * per_client / (time.perf_counter() - start)


def _openmp_libraries() -> list[str]:
    # Which OpenMP runtime (if any) the process mapped: only then do OMP_*/KMP_* mean anything.
    # Named with their folder, which says which package brought them (e.g. scikit_learn.libs).
    paths = {Path(line.split()[-1]) for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}
    return sorted(f"{p.parent.name}/{p.name}" for p in paths if re.match(r"lib[gi]?omp[0-9]*[.-]", p.name))


# -- the report --------------------------------------------------------------------------


def describe(case: dict[str, Any]) -> tuple[str, str, str]:
    if case["engine"] == "tensorflow":
        knobs = f"intra_op={case['intra_op']}, inter_op={case['inter_op']}"
        extra = ", ".join(f"{k}={case[k]}" for k in OMP_KNOBS if k in case)
        return "tensorflow", "on" if case["onednn"] else "off", knobs + (f", {extra}" if extra else "")
    precision = ", f32" if case["engine"] == "openvino" else ""
    return f"{case['engine']} (tf2onnx)", "-", f"threads={case['threads']}{precision}"


def _tensorflow_turns_onednn_on() -> bool:
    """TensorFlow's own rule for `onednn: auto`: on where the CPU has AVX-512 VNNI/BF16 or AMX."""
    from seldon_caffe import cpu

    return cpu.has("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def report(
    results: list[tuple[dict[str, Any], dict[str, Any]]],
    command: str,
    seconds: float,
    rounds: int,
    load: tuple[float, float],
) -> str:
    cpu = cpu_model()
    lines = [
        "## TensorFlow on CPU (oneDNN)",
        "",
        f"Measured {datetime.date.today().isoformat()} on {cpu}, "
        f"Python {platform.python_version()}, {_versions()}; the whole run took {seconds / 60:.1f} min, "
        f"1-minute load average {load[0]:.1f} at the start and {load[1]:.1f} at the end (the machine is shared).",
        "",
        f"    {command}",
        "",
        "Keras ResNet-50 (random weights, 224x224x3, float32) through the `tensorflow` runtime's `model.run`, "
        f"and the same SavedModel converted with tf2onnx. Each case ran {rounds} times in a fresh process, in "
        "alternating order; the table keeps its best median (ms per call). `2 clients` is requests "
        "per second with two threads sending batch-1 requests at once; `CPU` is the CPU time of all the process's "
        "threads per call, which other jobs on the machine disturb far less than wall time; `max rel diff` compares "
        "the batch-8 "
        "answer with Keras' own (oneDNN off), relative to its largest value.",
        "",
        "| runtime | oneDNN | settings | batch 1 (ms) | batch 8 (ms) | batch 8 (img/s) | batch 1 CPU (ms) "
        "| batch 8 CPU (ms) | 2 clients (req/s) | max rel diff |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, r in results:
        runtime, onednn, settings = describe(case)
        if "error" in r:
            lines.append(f"| {runtime} | {onednn} | {settings} | failed: {r['error']} |{' |' * 6}")
            continue
        lines.append(
            f"| {runtime} | {onednn} | {settings} | {r['b1_ms']:.1f} | {r['b8_ms']:.1f} | {8000 / r['b8_ms']:.1f} "
            f"| {r['b1_cpu_ms']:.1f} | {r['b8_cpu_ms']:.1f} | {r['clients2_rps']:.1f} | {r['max_rel_diff']:.1e} |"
        )
    lines += ["", *_findings(results), ""]
    return "\n".join(lines)


def _findings(results: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    ok = [(c, r) for c, r in results if "error" not in r]
    tf = [(c, r) for c, r in ok if c["engine"] == "tensorflow" and not any(k in c for k in OMP_KNOBS)]
    out = []
    if tf:
        best1 = min(tf, key=lambda cr: cr[1]["b1_ms"])
        best8 = min(tf, key=lambda cr: cr[1]["b8_ms"])
        out.append(
            f"- Fastest TensorFlow setting at batch 1: oneDNN {describe(best1[0])[1]}, {describe(best1[0])[2]}; "
            f"at batch 8: oneDNN {describe(best8[0])[1]}, {describe(best8[0])[2]}."
        )
        pairs = {(c["intra_op"], c["inter_op"], c["onednn"]): r for c, r in tf}
        for (intra, inter, onednn), r in sorted(pairs.items()):
            off = pairs.get((intra, inter, False))
            if onednn and off:
                out.append(
                    f"- oneDNN on vs off at intra_op={intra}, inter_op={inter}: batch 1 "
                    f"{off['b1_ms'] / r['b1_ms']:.2f}x, batch 8 {off['b8_ms'] / r['b8_ms']:.2f}x faster; CPU time "
                    f"per call {off['b1_cpu_ms'] / r['b1_cpu_ms']:.2f}x, {off['b8_cpu_ms'] / r['b8_cpu_ms']:.2f}x less."
                )
        on_b8 = [r["b8_ms"] for c, r in tf if c["onednn"]]
        off_b8 = [r["b8_ms"] for c, r in tf if not c["onednn"]]
        if on_b8 and off_b8:
            pick = "true" if min(on_b8) < min(off_b8) else "false"
            if pick == "false" and not _tensorflow_turns_onednn_on():
                pick += "` (or `auto`, which leaves it off on this CPU)"
            out.append(
                f"- Settings to use on this machine: `threads` (so `intra_op`) = its cores, `inter_op: 1`, "
                f"`onednn: {pick}`, no OpenMP knobs; why, and for other CPUs: "
                "[tensorflow.md](tensorflow.md#what-the-benchmark-showed)."
            )
    knobs = [(c, r) for c, r in ok if any(k in c for k in OMP_KNOBS)]
    for c, r in knobs:
        plain = pairs.get((c["intra_op"], c["inter_op"], c["onednn"])) if tf else None
        versus = f" ({plain['b1_ms']:.1f} / {plain['b8_ms']:.1f} ms without them)" if plain else ""
        libs = ", ".join(r["openmp_loaded"]) or "none"
        out.append(
            f"- With the OpenMP knobs set ({describe(c)[2]}): batch 1 / 8 {r['b1_ms']:.1f} / {r['b8_ms']:.1f} ms"
            f"{versus}. OpenMP runtimes mapped in the TensorFlow process: {libs}."
        )
    if ok:
        best = min(ok, key=lambda cr: cr[1]["b8_ms"])
        out.append(
            f"- Fastest of all at batch 8: {describe(best[0])[0]} {describe(best[0])[2]} ({best[1]['b8_ms']:.1f} ms)."
        )
    return out


def _versions() -> str:
    from importlib.metadata import version

    names = ("tensorflow-cpu", "tf2onnx", "onnxruntime", "openvino")
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except Exception:
            continue
    return ", ".join(found)


def _quiet_env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": path}


def _child(*args: str, timeout: float = 600) -> str:
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=_quiet_env(), timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return done.stdout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=8, help="timed batch-1 calls per case (batch 8: a third)")
    parser.add_argument("--rounds", type=int, default=2, help="passes over all cases, alternating order")
    parser.add_argument("--work", type=Path, help="keep the model files here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--only", help="measure only engines whose name contains this (debugging)")
    parser.add_argument("--wait-quiet", type=float, default=120, help="seconds to wait for a load average < 1")
    args = parser.parse_args(argv)
    wait_for_quiet(args.wait_quiet, 1.0)
    began, load_before = time.perf_counter(), os.getloadavg()[0]
    todo = [case for case in cases() if not args.only or args.only in case["engine"]]
    rounds: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(todo))}
    with tempfile.TemporaryDirectory(prefix="bench-tf-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "resnet50.onnx").exists():
            print("building ResNet-50 SavedModel and its ONNX form...", flush=True)
            _child("_build", str(work))
            convert(work)
        for n in range(args.rounds):
            order = list(enumerate(todo)) if n % 2 == 0 else list(reversed(list(enumerate(todo))))
            for i, case in order:
                try:
                    result = json.loads(_child("_measure", json.dumps(case), str(work), str(args.repeats)))
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    result = {"error": str(exc)[:120]}
                print(f"round {n + 1}", describe(case), result, flush=True)
                rounds[i].append(result)
    results = [(case, best_of(rounds[i])) for i, case in enumerate(todo)]
    command = "nice python " + " ".join(shlex.quote(a) for a in ["benchmarks/tensorflow.py", *(argv or sys.argv[1:])])
    load = (load_before, os.getloadavg()[0])
    section = report(results, command, time.perf_counter() - began, args.rounds, load)
    print(section)
    if not args.only:
        write_section(section, args.out, (START, END))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_build":
        build(Path(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_measure":
        print(json.dumps(measure(json.loads(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))))
    else:
        main()
