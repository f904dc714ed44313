"""Caffe nets on the torch runtime: `convert caffe -o X.pt2 / X.pt`, what the torch graph
folds, the runtime's options for Caffe, and the GPU.

Conformance against real Caffe (every zoo and layer net at batch 1 and 4), the real
microservice, the conversion cache and concurrent requests are in tests/test_onnx_runtimes.py,
which runs them for every runtime that serves Caffe through its ONNX conversion, torch included.
The GPU test skips, saying so, where torch sees no CUDA device.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from test_onnx_convert import random_net, run_onnx

from seldon_caffe.caffe.to_onnx import caffe_to_onnx
from seldon_caffe.config import load_config
from seldon_caffe.errors import BadRequest, ConfigError
from seldon_caffe.runtimes import load_runtime

torch = pytest.importorskip("torch", reason="the torch runtime needs torch (pip install -e .[torch])")
from seldon_caffe.caffe.to_torch import UnsupportedOp, onnx_to_torch  # noqa: E402
from seldon_caffe.faithfulness import relative_error  # noqa: E402

LENET_INPUTS = [np.random.default_rng(b).standard_normal((b, 1, 28, 28)).astype(np.float32) for b in (1, 3)]

CONV_BN_SCALE = """
name: "folded"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 dim: 9 dim: 9 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 4 kernel_size: 3 stride: 2 group: 2 bias_term: false } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" }
layer { name: "scale2" type: "Scale" bottom: "conv2" top: "conv2" scale_param { bias_term: false } }
"""


def lenet_dir(tmp_path: Path, lenet_example: Path, name: str = "lenet", **options: Any) -> Path:
    """The lenet example (trained weights) served by the torch runtime from its Caffe files."""
    target = tmp_path / name
    shutil.copytree(lenet_example, target, ignore=shutil.ignore_patterns("__pycache__", ".cache", "hooks.py"))
    config = {
        "format": "caffe",
        "files": {"prototxt": "deploy.prototxt", "weights": "weights.caffemodel"},
        "runtime": "torch",
        "options": options,
    }
    (target / "model.yaml").write_text(json.dumps(config))
    return target


def answers(model_dir: Path) -> list[np.ndarray]:
    with load_runtime(load_config(model_dir)) as model:
        return [model.run({"data": x})["prob"] for x in LENET_INPUTS]


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pt2", ".pt"])
def test_convert_caffe_to_torch_files_the_torch_runtime_serves(
    suffix: str, tmp_path: Path, lenet_example: Path
) -> None:
    """`seldon-caffe convert caffe -o model.pt2` (or .pt): any batch, Caffe's names, same answers."""
    caffe_dir = lenet_dir(tmp_path, lenet_example)
    target = tmp_path / "served"
    target.mkdir()
    command = [sys.executable, "-m", "seldon_caffe.cli", "convert", "caffe"]
    command += [
        str(caffe_dir / "deploy.prototxt"),
        str(caffe_dir / "weights.caffemodel"),
        "-o",
        str(target / f"model{suffix}"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    kind = "ExportedProgram" if suffix == ".pt2" else "TorchScript archive"
    assert f"model{suffix}: {kind}, inputs data[N, 1, 28, 28], outputs prob[N, 10]" in done.stdout
    config: dict[str, Any] = {"format": "torch", "files": {"torchscript": f"model{suffix}"}, "runtime": "torch"}
    if suffix == ".pt":  # TorchScript records no input names or shapes
        config["inputs"] = [{"name": "data", "shape": [-1, 1, 28, 28]}]
    (target / "model.yaml").write_text(json.dumps(config))
    with load_runtime(load_config(target)) as model:
        assert model.signature() == "inputs data: float32[N, 1, 28, 28]"
        assert [(s.name, s.shape) for s in model.outputs] == [("prob", (-1, 10))]
    for got, want in zip(answers(target), answers(caffe_dir), strict=True):
        assert relative_error(got, want) <= 1e-6


def test_batchnorm_and_scale_fold_into_the_convolution(tmp_path: Path) -> None:
    """Conv -> BatchNorm -> Scale is one convolution in the torch graph, with ONNX's answers."""
    net = random_net(CONV_BN_SCALE)
    model = caffe_to_onnx(net)
    module = onnx_to_torch(model)
    calls = [getattr(n.target, "__name__", n.target) for n in module.graph.nodes if n.op.startswith("call_")]
    assert calls == ["conv2d", "relu", "conv2d"], module.code
    x = np.random.default_rng(0).standard_normal((3, 4, 9, 9)).astype(np.float32)
    with torch.inference_mode():
        got = module(torch.from_numpy(x))["conv2"].numpy()
    assert relative_error(got, run_onnx(model, {"data": x})["conv2"]) <= 1e-5


def test_an_op_the_builder_lacks_is_named() -> None:
    node = onnx.helper.make_node("Hardmax", ["x"], ["y"], name="odd/Hardmax")
    value = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    out = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [value], [out]))
    with pytest.raises(UnsupportedOp, match=r"'odd/Hardmax': op Hardmax has no torch form"):
        onnx_to_torch(model)


def test_cpu_options_for_a_caffe_net(tmp_path: Path, lenet_example: Path) -> None:
    plain = answers(lenet_dir(tmp_path, lenet_example))
    for got, want in zip(answers(lenet_dir(tmp_path, lenet_example, "nhwc", channels_last=True)), plain, strict=True):
        assert relative_error(got, want) <= 1e-5
    for got, want in zip(answers(lenet_dir(tmp_path, lenet_example, "bf16", precision="bf16")), plain, strict=True):
        assert got.dtype == np.float32 and relative_error(got, want) <= 3e-2  # bf16: 8 bits of mantissa
    for name, options, message in [
        ("fp16", {"precision": "fp16"}, "fp16 needs device cuda"),
        ("tf32", {"tf32": True}, "TF32 is a form of fp32 on a GPU; device is cpu"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_runtime(load_config(lenet_dir(tmp_path, lenet_example, name, **options)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch here (runs where one is)")
def test_caffe_net_on_the_gpu(tmp_path: Path, lenet_example: Path) -> None:
    """fp32 on the GPU (TF32 off) as on the CPU; fp16 with channels_last and CUDA graphs close, same top-1."""
    on_cpu = answers(lenet_dir(tmp_path, lenet_example))
    strict = answers(lenet_dir(tmp_path, lenet_example, "cuda", device="cuda"))
    fast = lenet_dir(
        tmp_path, lenet_example, "fast", device="cuda", precision="fp16", channels_last=True, cuda_graphs=True
    )
    with load_runtime(load_config(fast)) as model:
        replays = [[model.run({"data": x})["prob"] for x in LENET_INPUTS] for _ in range(3)]  # capture, then replay
        bad = LENET_INPUTS[1].copy()
        bad[2, 0, 5, 7] = np.nan
        for _ in range(2):  # NaN is checked on the GPU, before a capture and before a replay
            with pytest.raises(BadRequest, match=r"input 'data' holds 1 non-finite value\(s\) \(NaN\).*\[2, 0, 5, 7\]"):
                model.run({"data": bad})
    for i, want in enumerate(on_cpu):
        assert relative_error(strict[i], want) <= 1e-4
        for replay in replays:
            assert replay[i].dtype == np.float32 and relative_error(replay[i], want) <= 1e-2
            assert np.array_equal(replay[i].argmax(1), want.argmax(1))
