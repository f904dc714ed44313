"""`seldon-caffe inspect --accuracy SAMPLES`: what each lower precision costs on the user's own inputs.

bf16 and int8 are never chosen for the user (`runtime: auto` keeps options.precision):
they trade accuracy for speed, and only the user's data says how much. This module serves
the same model at fp32 and at each lower precision this machine can run (bf16 on OpenVINO;
int8 where `seldon-caffe quantize` has made the INT8 model), runs every sample through each,
and reports per output the top-1 agreement and the largest relative error against fp32,
with the speed of each.

SAMPLES is a directory. `.npy` / `.npz` files are model inputs, as `quantize` reads them;
any other file is a request payload that goes through the model's own preprocess hook
(DESIGN.md's payload kinds: `.json` parsed, `.txt` text, anything else bytes), so a
folder of images or questions works as it is.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelConfig
from .errors import SeldonCaffeError, first_line
from .faithfulness import relative_error
from .hooks import request_context
from .pipeline import Pipeline
from .quantize import read_sample
from .runtimes import Runtime, load_runtime, resolve_runtime

Feed = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
DEFAULT_SAMPLES = 64
LOWER_PRECISIONS = {"bf16": ("openvino",), "int8": ("openvino", "onnxruntime")}  # where each runs


@dataclasses.dataclass
class Variant:
    """One precision on one engine, measured against fp32."""

    precision: str
    runtime: str
    ms_per_sample: float | None = None
    outputs: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # name -> stats
    unavailable: str = ""  # why it could not be measured here


def precision_report(
    model_dir: str | Path, samples_dir: Path, runtime: str | None = None, limit: int = DEFAULT_SAMPLES
) -> dict[str, Any]:
    """{"samples": n, "reference": fp32 Variant, "variants": [Variant...]} for `inspect --accuracy`."""
    pipeline = Pipeline.load(model_dir, runtime)
    try:
        feeds = [_feed(file, pipeline) for file in sample_files(samples_dir, limit)]
        config = pipeline.config
        reference_model = _load(config, "fp32", None) if config.options["precision"] != "fp32" else pipeline.model
        try:
            reference = Variant("fp32", reference_model.name)
            want = _run(reference_model, feeds, reference)
        finally:
            if reference_model is not pipeline.model:
                reference_model.close()
        variants = [_measure(config, precision, engine, feeds, want) for precision, engine in _variants(config)]
    finally:
        pipeline.model.close()
    return {"samples": len(feeds), "reference": reference, "variants": variants}


def sample_files(directory: Path, limit: int) -> list[Path]:
    if not directory.is_dir():
        raise SeldonCaffeError(f"{directory}: not a directory of samples")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))[:limit]
    if not files:
        raise SeldonCaffeError(f"{directory}: no sample files")
    return files


def compare(want: Sequence[Outputs], got: Sequence[Outputs]) -> dict[str, dict[str, float]]:
    """Per output, over every sample: relative error (max|got - want| / max|want|, the
    conformance measure), mean absolute error, and for class scores (more than one value
    per item) top-1 agreement."""
    report = {}
    for name in want[0]:
        a = np.concatenate([np.asarray(w[name], np.float64).reshape(len(w[name]), -1) for w in want])
        b = np.concatenate([np.asarray(g[name], np.float64).reshape(len(g[name]), -1) for g in got])
        stats = {
            "relative_error": relative_error(got=b, want=a),
            "mean_abs_error": float(np.mean(np.abs(b - a))),
        }
        if a.shape[1] > 1:
            stats["top1_agreement"] = float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))
        report[name] = stats
    return report


def _variants(config: ModelConfig) -> list[tuple[str, str | None]]:
    """(precision, engine) pairs to measure: the configured one first, then every lower
    precision on the served engine where it runs there, else on the first engine that runs it."""
    served = resolve_runtime(config)
    pairs: list[tuple[str, str | None]] = []
    if config.options["precision"] != "fp32":
        pairs.append((config.options["precision"], None))  # as model.yaml says
    for precision, engines in LOWER_PRECISIONS.items():
        if precision != config.options["precision"]:
            pairs.append((precision, served if served in engines else engines[0]))
    return pairs


def _measure(
    config: ModelConfig, precision: str, engine: str | None, feeds: list[Feed], want: list[Outputs]
) -> Variant:
    variant = Variant(precision, engine or resolve_runtime(config))
    try:
        model = _load(config, precision, engine)
    except SeldonCaffeError as exc:
        variant.unavailable = first_line(exc)
        return variant
    try:
        variant.runtime = model.name
        variant.outputs = compare(want, _run(model, feeds, variant))
    finally:
        model.close()
    return variant


def _load(config: ModelConfig, precision: str, engine: str | None) -> Runtime:
    options = {**config.options, "precision": precision}
    return load_runtime(dataclasses.replace(config, options=options, runtime=engine or config.runtime))


def _run(model: Runtime, feeds: list[Feed], variant: Variant) -> list[Outputs]:
    """Every feed through `model` (after one warm-up run); the median time goes into `variant`."""
    model.run(feeds[0])
    answers, seconds = [], []
    for feed in feeds:
        start = time.perf_counter()
        answers.append(model.run(feed))
        seconds.append(time.perf_counter() - start)
    variant.ms_per_sample = statistics.median(seconds) * 1000
    return answers


def _feed(file: Path, pipeline: Pipeline) -> Feed:
    """A sample file as the model's inputs: arrays as they are, payloads through preprocess."""
    model = pipeline.model
    try:
        if file.suffix in (".npy", ".npz"):  # read as `quantize` reads its calibration files
            arrays: Any = read_sample(file, {spec.name: spec.shape for spec in model.inputs})
        else:
            payload = _payload(file)
            arrays = pipeline.hooks.preprocess(payload, request_context(pipeline.context, payload, None, None))
        return model.check_inputs(arrays)
    except (SeldonCaffeError, OSError, ValueError) as exc:
        raise SeldonCaffeError(f"sample {file}: {exc}") from None


def _payload(file: Path) -> Any:
    if file.suffix == ".json":
        return json.loads(file.read_text())
    if file.suffix == ".txt":
        return file.read_text()
    return file.read_bytes()


def format_report(report: dict[str, Any]) -> str:
    """The table `inspect --accuracy` prints."""
    reference: Variant = report["reference"]
    lines = [
        f"accuracy against fp32 ({reference.runtime}, {reference.ms_per_sample:.3g} ms/sample) "
        f"on {report['samples']} samples:"
    ]
    for variant in report["variants"]:
        head = f"  {variant.precision:<5} {variant.runtime:<12}"
        if variant.unavailable:
            lines.append(f"{head} not measured: {variant.unavailable}")
            continue
        speed = reference.ms_per_sample / variant.ms_per_sample if variant.ms_per_sample else float("nan")
        for name, stats in variant.outputs.items():
            top1 = f"top-1 {stats['top1_agreement']:.1%}, " if "top1_agreement" in stats else ""
            lines.append(
                f"{head} {name}: {top1}max rel err {stats['relative_error']:.2g}, "
                f"{variant.ms_per_sample:.3g} ms/sample ({speed:.2f}x fp32)"
            )
    return "\n".join(lines)


def report_json(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "samples": report["samples"],
        "reference": dataclasses.asdict(report["reference"]),
        "variants": [dataclasses.asdict(v) for v in report["variants"]],
    }
