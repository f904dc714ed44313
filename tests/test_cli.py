"""The `seldon-caffe` command as a new user meets it: one line per error, no half-done work,
quiet consoles, answers a person can read. Each case runs the real command."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ZOO, copy_model

LENET_PROTOTXT = ZOO / "lenet.prototxt"


def cli(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "seldon_caffe.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def one_line_error(done: subprocess.CompletedProcess, *parts: str) -> None:
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seldon-caffe: error: "), done.stderr
    for part in parts:
        assert part in lines[0], lines[0]


@pytest.fixture
def plain_lenet(tmp_path: Path, lenet_example: Path) -> Path:
    """The lenet example without its hooks: arrays in, arrays out."""
    model_dir = copy_model(lenet_example, tmp_path / "lenet")
    (model_dir / "hooks.py").unlink()
    return model_dir


def test_version_and_runtime_choices(plain_lenet: Path) -> None:
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("seldon-caffe ")
    wrong = cli("predict", plain_lenet, "--runtime", "foo", "--data", "[1]")
    assert (
        wrong.returncode == 2
        and "argument --runtime: invalid choice: 'foo' (choose from 'auto', 'pycaffe', 'opencv'" in wrong.stderr
    )
    assert "model.yaml" not in wrong.stderr


def test_model_yaml_that_is_not_yaml_is_one_line(plain_lenet: Path) -> None:
    (plain_lenet / "model.yaml").write_text("name: x\nfiles: {prototxt: [\n")
    one_line_error(cli("inspect", plain_lenet), "model.yaml: not valid YAML: ", "(line 3, column 1)")


@pytest.mark.slow
def test_outputs_are_checked_before_any_work(tmp_path: Path, plain_lenet: Path) -> None:
    missing = tmp_path / "nowhere"
    weights = plain_lenet / "weights.caffemodel"
    cases = [
        ("convert", "caffe", LENET_PROTOTXT, weights, "-o", missing / "x.onnx"),
        ("convert", "caffe", LENET_PROTOTXT, weights, "-o", missing / "x.pt2"),
        ("quantize", tmp_path / "absent.onnx", "--calibration", "random", "-o", missing / "q.onnx"),
        ("k8s", plain_lenet, "--image", "lenet:1", "-o", missing / "deploy.yaml"),
        ("init", missing / "model"),
        ("weights", LENET_PROTOTXT, "-o", missing / "w.caffemodel"),
    ]
    for args in cases:
        one_line_error(cli(*args), f"the folder {missing} does not exist")
    assert not missing.exists()
    one_line_error(cli("convert", "caffe", LENET_PROTOTXT, weights, "-o", tmp_path), "is a directory")


@pytest.mark.slow
def test_predict_summarises_a_binary_answer_and_out_keeps_it(tmp_path: Path, plain_lenet: Path) -> None:
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    done = cli("predict", plain_lenet, "--file", tmp_path / "x.npy", "--out", tmp_path / "answer.npy")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "answer: float32[2, 10]" and len(lines) == 3, done.stdout
    saved = np.load(tmp_path / "answer.npy")
    best = np.argsort(saved[1])[::-1][:5]
    assert lines[2] == "  row 1: " + ", ".join(f"{k}={saved[1][k]:.4g}" for k in best)
    assert "oneDNN" not in done.stderr and "cpu_feature_guard" not in done.stderr, done.stderr  # TensorFlow's notices
    assert len(done.stdout) < 300  # not kilobytes of base64


@pytest.mark.slow
def test_predict_reports_a_failed_request_once(tmp_path: Path, plain_lenet: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"\x00" * 100)
    done = cli("predict", plain_lenet, "--file", tmp_path / "x.bin")
    one_line_error(done, "binData is not a .npy or .npz file")


def test_summary_of_an_npz_names_each_array() -> None:
    from seldon_caffe.cli import summarize_arrays

    buffer = io.BytesIO()
    np.savez(buffer, prob=np.eye(3, dtype=np.float32), ids=np.arange(4))
    text = summarize_arrays(buffer.getvalue())
    assert text.splitlines()[0] == "prob: float32[3, 3]" and "ids: int64[4]" in text
    assert "  row 2: 2=1, " in text
