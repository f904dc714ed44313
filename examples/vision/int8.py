"""INT8 on the digit classifier: quantize with training digits, measure on held-out ones.

    .venv/bin/python examples/vision/int8.py

Converts the Caffe model to ONNX, quantizes it with ONNX Runtime's static quantization
(`seldon-caffe quantize`'s code) calibrated on 300 training digits as the hooks preprocess
them, writes weights.int8.onnx into a scratch copy of this directory (what `precision: int8`
loads), and then runs the held-out evaluation (evaluate.py) with fp32 and with int8 on the
onnxruntime runtime. The model directory itself is never written.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import digits_data  # noqa: E402
from evaluate import evaluate, report  # noqa: E402

from seldon_caffe.caffe.to_onnx import convert_files  # noqa: E402
from seldon_caffe.model import SeldonCaffeModel  # noqa: E402
from seldon_caffe.quantize import quantize_model  # noqa: E402

CALIBRATION_DIGITS = 300


def calibration_samples() -> list[dict]:
    """Training digits (never the held-out ones), preprocessed exactly as requests are."""
    served = SeldonCaffeModel(str(HERE))
    served.load()
    try:
        train_x, _, _, _ = digits_data.split()
        ctx = served.context
        name = served.model.inputs[0].name
        return [{name: served.hooks.preprocess(digits_data.render(d), ctx)} for d in train_x[:CALIBRATION_DIGITS]]
    finally:
        served.model.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(shutil.copytree(HERE, Path(tmp) / "vision", ignore=shutil.ignore_patterns(".cache")))
        fp32 = Path(tmp) / "weights.onnx"
        convert_files(model_dir / "deploy.prototxt", model_dir / "weights.caffemodel", fp32)
        samples = calibration_samples()
        agreement = quantize_model(fp32, model_dir / "weights.int8.onnx", samples)
        config = yaml.safe_load((model_dir / "model.yaml").read_text())
        for precision in ("fp32", "int8"):
            config["options"] = {**(config.get("options") or {}), "precision": precision}
            (model_dir / "model.yaml").write_text(yaml.safe_dump(config))
            result = evaluate(model_dir, runtime="onnxruntime")
            print(f"{precision}: " + "; ".join(report(result)))
        for output, stats in agreement.items():
            print(
                f"int8 vs fp32 on the calibration digits, {output}: "
                + ", ".join(f"{k} {v:.4g}" for k, v in stats.items())
            )


if __name__ == "__main__":
    main()
