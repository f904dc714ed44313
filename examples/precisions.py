"""bf16 and int8 on the three trained examples: what each costs in accuracy, and what it gains in speed.

    nice .venv/bin/python examples/precisions.py                  # vision, ranking, qa_match
    .venv/bin/python examples/precisions.py vision --samples 32 --no-evaluate

For each example, in a scratch copy of its directory (examples/ itself is never written):

1. calibration inputs: training data (never held-out data) as a client sends it, through
   the example's own preprocess hook, so they are exactly what requests become;
2. `seldon-caffe quantize`'s code turns the Caffe model (converted to ONNX) into
   weights.int8.onnx beside the weights, which is what `precision: int8` loads;
3. held-out requests, preprocessed the same way, are written as .npz model inputs into a
   scratch samples directory;
4. `seldon-caffe inspect --accuracy`'s report (seldon_caffe.accuracy) on those samples, once
   per runtime: top-1 agreement with fp32, max relative error, ms per sample;
5. with --evaluate (the default), the example's own held-out metric (its evaluate.py) at
   each precision, through the whole service pipeline.

bf16 is fast only on a CPU with bf16 units (avx512_bf16 / amx_bf16) and int8 with VNNI;
the first line printed says which this CPU has.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import yaml

from seldon_caffe import cpu
from seldon_caffe.accuracy import format_report, precision_report
from seldon_caffe.caffe.to_onnx import convert_files
from seldon_caffe.hooks import request_context
from seldon_caffe.pipeline import Pipeline
from seldon_caffe.quantize import quantize_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _train import load_script  # noqa: E402

EXAMPLES = ("vision", "ranking", "qa_match")
RUNTIMES = ("openvino", "onnxruntime")  # the engines that run bf16 / int8 (accuracy.LOWER_PRECISIONS)
PRECISIONS = {"openvino": ("fp32", "bf16", "int8"), "onnxruntime": ("fp32", "int8")}
CALIBRATION = 300  # requests to calibrate int8 with
SAMPLES = 256  # held-out requests to compare precisions on
ROUNDS = 5  # timing passes; the median is reported
BASELINES = ("oracle", "random", "tf-idf")  # evaluate.py lines that no precision changes


# -- each example's requests: (training payloads, held-out payloads) ---------------------


def vision_payloads(evaluate: ModuleType) -> tuple[list[Any], Iterator[Any]]:
    """Training digits as their 8x8 images; held-out digits in both of evaluate.py's forms
    (8x8 grey PNG, larger colour JPEG)."""
    data = evaluate.digits_data
    train_x, _, test_x, _ = data.split()
    held_out = (data.render(d, **style) for i, d in enumerate(test_x) for style in data.eval_styles(i).values())
    return [data.render(d) for d in train_x], held_out


def ranking_payloads(evaluate: ModuleType) -> tuple[list[Any], Iterator[Any]]:
    """Training users' feed sessions; held-out users' sessions (20 candidates each, one batch per request)."""
    simulator = evaluate.simulator
    return [s.request() for s in simulator.train_sessions()], (s.request() for s in simulator.held_out_sessions())


def qa_match_payloads(evaluate: ModuleType) -> tuple[list[Any], Iterator[Any]]:
    """The knowledge base's questions and paraphrases (what train.py reads); the held-out paraphrases."""
    faq = json.loads((HERE / "qa_match" / "faq.json").read_text(encoding="utf-8"))
    train = [text for entry in faq for text in [entry["question"], *entry["paraphrases"]]]
    return train, (query for entry in faq for query in entry["held_out"])


PAYLOADS: dict[str, Callable[[ModuleType], tuple[list[Any], Iterator[Any]]]] = {
    "vision": vision_payloads,
    "ranking": ranking_payloads,
    "qa_match": qa_match_payloads,
}


def preprocessor(pipeline: Pipeline) -> Callable[[Any], dict[str, np.ndarray]]:
    """payload -> {input name: array}, through the example's preprocess hook as a request is."""
    names = [spec.name for spec in pipeline.model.inputs]

    def preprocess(payload: Any) -> dict[str, np.ndarray]:
        arrays = pipeline.hooks.preprocess(payload, request_context(pipeline.context, payload, None, None))
        if not isinstance(arrays, dict):
            arrays = {names[0]: arrays}
        return {name: np.asarray(arrays[name], np.float32) for name in names}

    return preprocess


# -- one example -----------------------------------------------------------------------


def set_precision(model_dir: Path, precision: str) -> None:
    config = yaml.safe_load((model_dir / "model.yaml").read_text(encoding="utf-8"))
    config["options"] = {**(config.get("options") or {}), "precision": precision}
    (model_dir / "model.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")


def median_times(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The first report with each variant's ms/sample the median over every report's: one pass on a
    shared machine is noisy; the errors are the same every time."""
    first = reports[0]
    for index, variant in enumerate([first["reference"], *first["variants"]]):
        times = [([r["reference"], *r["variants"]][index]).ms_per_sample for r in reports]
        if None not in times:
            variant.ms_per_sample = statistics.median(times)
    return first


def measure(name: str, samples: int, calibration: int, runtimes: list[str], rounds: int, with_metric: bool) -> None:
    evaluate = load_script(HERE / name / "evaluate.py")
    with tempfile.TemporaryDirectory(prefix=f"seldon-caffe-{name}-") as tmp:
        ignore = shutil.ignore_patterns(".cache", "__pycache__")
        model_dir = Path(shutil.copytree(HERE / name, Path(tmp) / name, ignore=ignore))
        train, held_out = PAYLOADS[name](evaluate)
        pipeline = Pipeline.load(model_dir, runtimes[0])
        try:
            preprocess = preprocessor(pipeline)
            calibration_inputs = [preprocess(payload) for payload in train[:calibration]]
            samples_dir = Path(tmp) / "samples"
            samples_dir.mkdir()
            written = 0
            for written, payload in enumerate(held_out, 1):
                np.savez(samples_dir / f"{written:05d}.npz", **preprocess(payload))
                if written == samples:
                    break
        finally:
            pipeline.model.close()

        fp32 = Path(tmp) / "weights.onnx"
        convert_files(model_dir / "deploy.prototxt", model_dir / "weights.caffemodel", fp32, progress=False)
        quantize_model(fp32, model_dir / "weights.int8.onnx", calibration_inputs)
        print(
            f"\n== {name}: int8 calibrated on {len(calibration_inputs)} training requests, {written} held-out samples"
        )
        for runtime in runtimes:
            reports = [precision_report(model_dir, samples_dir, runtime=runtime, limit=samples) for _ in range(rounds)]
            print(f"-- runtime {runtime}, median of {rounds} rounds")
            print(format_report(median_times(reports)))
        if with_metric:
            print("-- held-out metric (evaluate.py, every held-out request through the service pipeline)")
            for runtime in runtimes:
                for precision in PRECISIONS.get(runtime, ("fp32",)):
                    set_precision(model_dir, precision)
                    lines = evaluate.report(evaluate.evaluate(model_dir, runtime=runtime))
                    figures = "; ".join(line for line in lines if not line.startswith(BASELINES))
                    print(f"  {precision:<5} {runtime:<12} {figures}")
            set_precision(model_dir, "fp32")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("examples", nargs="*", metavar="EXAMPLE", help=f"any of {', '.join(EXAMPLES)} (default: all)")
    parser.add_argument("--samples", type=int, default=SAMPLES, help="held-out requests to compare on")
    parser.add_argument("--calibration", type=int, default=CALIBRATION, help="training requests to calibrate with")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="time each precision this many times")
    parser.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True, help="held-out metric too")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.examples) - set(EXAMPLES))
    if unknown:
        parser.error(f"no example {unknown[0]!r}; choose from {', '.join(EXAMPLES)}")
    print(f"CPU: {cpu.describe()}")
    for name in args.examples or EXAMPLES:
        measure(name, args.samples, args.calibration, args.runtimes, args.rounds, args.evaluate)


if __name__ == "__main__":
    main()
