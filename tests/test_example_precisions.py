"""examples/precisions.py: bf16 and int8 against fp32 on a trained example, in a scratch copy.

The full run (three examples, 256 samples, the held-out metric) is what the examples'
READMEs quote; here one example with a few samples checks that the script still runs end
to end and never writes into examples/.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
from helpers import EXAMPLES

SCRIPT = EXAMPLES / "precisions.py"


@pytest.mark.slow
def test_precisions_compares_bf16_and_int8_with_fp32_on_the_vision_example(capsys) -> None:
    for module in ("onnx", "onnxruntime", "openvino"):
        pytest.importorskip(module, reason="bf16 runs on openvino, the int8 model is made with onnxruntime")
    before = listing()
    spec = importlib.util.spec_from_file_location("example_precisions", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)

    script.main(["vision", "--samples", "12", "--calibration", "24", "--rounds", "1", "--no-evaluate"])

    out = capsys.readouterr().out
    assert out.startswith("CPU: ")
    assert "on 12 samples:" in out
    lines = [line.strip() for line in out.splitlines()]
    assert any(line.startswith("bf16  openvino") and "prob: top-1" in line for line in lines), out
    for engine in ("openvino", "onnxruntime"):
        (int8,) = [line for line in lines if line.startswith(f"int8  {engine}")]
        assert "prob: top-1" in int8 and "max rel err" in int8 and "x fp32" in int8, out
    assert listing() == before  # nothing written there


def listing() -> list[str]:
    """examples/vision's files (Python's own __pycache__ aside)."""
    return sorted(p.name for p in (EXAMPLES / "vision").iterdir() if p.name != "__pycache__")
