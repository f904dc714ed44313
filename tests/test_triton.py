"""`convert triton`: the repository layout, and config.pbtxt parsed with Triton's own ModelConfig
schema (tritonclient's model_config_pb2), so a field Triton would reject fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format
from test_convert_frameworks import TOLERANCE, relative_error, seldon_caffe, write_config


def _model_config_pb2() -> Any:
    """tritonclient's model_config_pb2 alone. Imported the usual way, through the
    `tritonclient.grpc` package, it brings Triton's service protos too, whose `inference.*`
    messages collide with MLServer's in protobuf's one descriptor pool, which the V2 tests
    load in this same process."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        pytest.skip("needs tritonclient (pip install seldon-caffe[triton])")
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


model_config_pb2 = _model_config_pb2()

FEATURES = [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 4]}]
RELU = [{"name": "y", "data_type": "float32", "dims": [-1, 4]}]


def parse(model_dir):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.fixture
def relu_onnx(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnx_on_gpu_with_the_tensorrt_accelerator(relu_onnx, tmp_path):
    config = write_config(tmp_path / "config.txt", 16, FEATURES, RELU)
    repo = tmp_path / "repo"
    result = seldon_caffe(
        "convert", "triton", relu_onnx, "--config", config, "--name", "relu", "-o", repo, "--precision", "fp16"
    )
    assert "wrote" in result.stdout
    assert (repo / "relu" / "1" / "model.onnx").read_bytes() == relu_onnx.read_bytes()
    parsed = parse(repo / "relu")
    assert (parsed.name, parsed.platform, parsed.max_batch_size) == ("relu", "onnxruntime_onnx", 16)
    assert [(t.name, t.data_type, list(t.dims)) for t in parsed.input] == [("x", model_config_pb2.TYPE_FP32, [4])]
    assert [(t.name, list(t.dims)) for t in parsed.output] == [("y", [4])]
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 100
    assert [(g.count, g.kind) for g in parsed.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_GPU)]
    (accelerator,) = parsed.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"


def test_unbatched_model_on_cpu(relu_onnx, tmp_path):
    fixed = [{**FEATURES[0], "dims": [2, 4]}]
    config = write_config(tmp_path / "config.txt", 0, fixed, [{**RELU[0], "dims": [2, 4]}])
    seldon_caffe(
        "convert", "triton", relu_onnx, "--config", config, "--name", "r", "-o", tmp_path / "repo", "--device", "cpu"
    )
    parsed = parse(tmp_path / "repo" / "r")
    assert parsed.max_batch_size == 0 and list(parsed.input[0].dims) == [2, 4]
    assert not parsed.HasField("dynamic_batching") and not parsed.HasField("optimization")
    assert parsed.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_tensorrt_plan(tmp_path):
    # The repository writer copies a plan's bytes as they are; building one needs TensorRT.
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"serialized engine")
    config = write_config(tmp_path / "config.txt", 8, FEATURES, RELU)
    seldon_caffe("convert", "triton", plan, "--config", config, "--name", "p", "-o", tmp_path / "repo")
    parsed = parse(tmp_path / "repo" / "p")
    assert parsed.platform == "tensorrt_plan" and not parsed.HasField("optimization")
    assert (tmp_path / "repo" / "p" / "1" / "model.plan").read_bytes() == b"serialized engine"
    refused = seldon_caffe(
        "convert",
        "triton",
        plan,
        "--config",
        config,
        "--name",
        "q",
        "-o",
        tmp_path / "repo",
        "--precision",
        "fp16",
        check=False,
    )
    assert refused.returncode == 1 and "fixed when it was built (convert tensorrt)" in refused.stderr


@pytest.mark.slow
def test_pytorch_source_is_converted_into_the_version(tmp_path):
    torch = pytest.importorskip("torch", reason="needs torch (pip install seldon-caffe[torch])")
    import onnxruntime as ort

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh()).eval()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "model.pt"))
    config = write_config(
        tmp_path / "config.txt", 8, FEATURES, [{"name": "y", "data_type": "float32", "dims": [-1, 3]}]
    )
    seldon_caffe("convert", "triton", tmp_path / "model.pt", "--config", config, "--name", "t", "-o", tmp_path / "repo")
    onnx = tmp_path / "repo" / "t" / "1" / "model.onnx"
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    got = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.inference_mode():
        assert relative_error(got, model(torch.from_numpy(x)).numpy()) < TOLERANCE
    assert list(parse(tmp_path / "repo" / "t").output[0].dims) == [3]


@pytest.mark.slow
def test_nothing_of_the_users_is_replaced_without_force(relu_onnx, tmp_path):
    config = write_config(tmp_path / "config.txt", 16, FEATURES, RELU)
    repo = tmp_path / "repo"
    args = ("convert", "triton", relu_onnx, "--config", config, "--name", "relu", "-o", repo)
    seldon_caffe(*args)
    before = (repo / "relu" / "config.pbtxt").read_text()

    again = seldon_caffe(*args, check=False)
    assert again.returncode == 1 and "relu/1 exists; pass --force" in again.stderr
    other = seldon_caffe(*args, "--version", "2", "--precision", "fp16", check=False)
    assert other.returncode == 1 and "config.pbtxt exists with other settings" in other.stderr
    assert not (repo / "relu" / "2").exists() and (repo / "relu" / "config.pbtxt").read_text() == before

    seldon_caffe(*args, "--version", "2")  # same settings: a new version beside the old one
    assert (repo / "relu" / "2" / "model.onnx").is_file()
    seldon_caffe(*args, "--precision", "fp16", "--force")
    assert 'value: "FP16"' in (repo / "relu" / "config.pbtxt").read_text()


def test_a_failed_conversion_leaves_nothing(relu_onnx, tmp_path):
    wrong = write_config(tmp_path / "config.txt", 16, [{**FEATURES[0], "data_type": "int32"}], RELU)
    result = seldon_caffe(
        "convert", "triton", relu_onnx, "--config", wrong, "--name", "relu", "-o", tmp_path / "repo", check=False
    )
    assert result.returncode == 1 and "input 'x' is int32, but the model's is float32" in result.stderr
    assert [p.name for p in (tmp_path / "repo" / "relu").iterdir()] == []
