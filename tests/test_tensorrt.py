"""`seldon-caffe convert tensorrt` and the `tensorrt` runtime.

TensorRT cannot be installed where these tests are written, so they come in two kinds. Most
run everywhere: the logic that needs no TensorRT (optimization profiles, calibration batching,
every check of the flags, the runtime's refusals) on real ONNX files and real .npy/.npz
directories, and the command and the runtime failing with the how-to-get-TensorRT message.
The rest build real plans and serve them against ONNX Runtime; they skip with "needs TensorRT
and an NVIDIA GPU" unless both are there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import run_concurrently
from onnx import TensorProto, helper, numpy_helper

from seldon_caffe.config import load_config
from seldon_caffe.convert.tensorrt import (
    BatchRange,
    calibration_batch_size,
    calibration_batches,
    optimization_profiles,
    resolve_batches,
)
from seldon_caffe.errors import BadRequest, ConfigError, ModelLoadError, SeldonCaffeError
from seldon_caffe.faithfulness import relative_error
from seldon_caffe.quantize import load_samples, model_inputs
from seldon_caffe.runtimes import load_runtime
from seldon_caffe.runtimes.tensorrt import numpy_dtype, profile_problem

NEEDS_GPU = "needs TensorRT and an NVIDIA GPU"


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


without_tensorrt = pytest.mark.skipif(
    _tensorrt_importable(), reason="tensorrt is installed here, so the missing-TensorRT message cannot show"
)


# -- ONNX files ------------------------------------------------------------------------


def relu_model(path: Path, inputs: dict[str, list[int | str]], *, qdq: bool = False) -> Path:
    """Each input through Relu to `<name>_out` (dims: ints, or names for dynamic ones)."""
    nodes, inits = [], []
    for name in inputs:
        source = name
        if qdq:  # explicit int8, as `seldon-caffe quantize` writes it
            inits += [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.uint8(128), "z")]
            nodes += [
                helper.make_node("QuantizeLinear", [name, "s", "z"], [f"{name}_q"]),
                helper.make_node("DequantizeLinear", [f"{name}_q", "s", "z"], [f"{name}_dq"]),
            ]
            source = f"{name}_dq"
        nodes.append(helper.make_node("Relu", [source], [f"{name}_out"]))
    graph = helper.make_graph(
        nodes,
        "relu",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in inputs.items()],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, dims) for name, dims in inputs.items()],
        inits,
    )
    return _save(graph, path)


def mlp_model(path: Path, batch: int | str = "N", two_inputs: bool = False) -> Path:
    """x[batch, 8] -> MatMul -> Add -> Relu -> MatMul (-> Add y[batch, 4]) -> out: enough
    arithmetic for fp16 and int8 to differ from fp32, small enough to build in seconds."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.normal(0, 0.5, (8, 16)),
        "b1": rng.normal(0, 0.1, 16),
        "w2": rng.normal(0, 0.5, (16, 4)),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["o" if two_inputs else "out"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8])]
    if two_inputs:
        nodes.append(helper.make_node("Add", ["o", "y"], ["out"]))
        inputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        inputs,
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 4])],
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()],
    )
    return _save(graph, path)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "seldon_caffe.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The command failed the way users should see it: exit 1, one line, no traceback."""
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("seldon-caffe: note:")]
    assert len(lines) == 1 and lines[0].startswith("seldon-caffe: error: "), done.stderr
    return lines[0]


# -- optimization profiles ----------------------------------------------------------------


def test_dynamic_batch_defaults(tmp_path: Path) -> None:
    inputs = model_inputs(relu_model(tmp_path / "m.onnx", {"x": ["N", 8]}))
    assert inputs == {"x": (-1, 8)}
    assert optimization_profiles(inputs) == {"x": ((1, 8), (32, 8), (32, 8))}
    assert resolve_batches(inputs, None, None, None) == BatchRange(1, 32, 32)


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        ((2, 4, 16), (2, 4, 16)),
        ((None, None, 8), (1, 8, 8)),  # opt follows max
        ((None, 64, None), (1, 64, 64)),  # max grows to a larger opt rather than failing
        ((40, None, None), (40, 40, 40)),
        ((1, 1, 1), (1, 1, 1)),
    ],
)
def test_batch_flags(tmp_path: Path, flags: tuple, want: tuple) -> None:
    inputs = model_inputs(relu_model(tmp_path / "m.onnx", {"x": ["batch", 3, 4, 4]}))
    profiles = optimization_profiles(inputs, *flags)
    assert profiles == {"x": tuple((size, 3, 4, 4) for size in want)}


@pytest.mark.parametrize("flags", [(8, None, 4), (None, 16, 8), (4, 2, None), (2, 8, 4)])
def test_batch_order_is_checked(tmp_path: Path, flags: tuple) -> None:
    inputs = model_inputs(relu_model(tmp_path / "m.onnx", {"x": ["N", 8]}))
    with pytest.raises(SeldonCaffeError, match=r"1 <= --min-batch <= --opt-batch <= --max-batch"):
        optimization_profiles(inputs, *flags)


def test_fixed_batch_model(tmp_path: Path) -> None:
    inputs = model_inputs(relu_model(tmp_path / "m.onnx", {"x": [2, 8]}))
    assert optimization_profiles(inputs) == {"x": ((2, 8), (2, 8), (2, 8))}
    assert optimization_profiles(inputs, 2, 2, 2) == {"x": ((2, 8), (2, 8), (2, 8))}  # agreeing flags are fine
    assert resolve_batches(inputs, None, None, None) == BatchRange(2, 2, 2)
    with pytest.raises(SeldonCaffeError, match=r"no dynamic batch axis \(x\[2, 8\]\): --max-batch 8") as error:
        optimization_profiles(inputs, None, None, 8)
    assert "--batch dynamic" in str(error.value)


def test_several_inputs(tmp_path: Path) -> None:
    path = relu_model(tmp_path / "m.onnx", {"x": ["N", 8], "y": ["N", 3], "table": [5, 2]})
    profiles = optimization_profiles(model_inputs(path), 1, 4, 8)
    assert profiles == {
        "x": ((1, 8), (4, 8), (8, 8)),
        "y": ((1, 3), (4, 3), (8, 3)),
        "table": ((5, 2), (5, 2), (5, 2)),  # a fixed first dimension is not a batch axis
    }


def test_dynamic_dimension_besides_batch(tmp_path: Path) -> None:
    inputs = model_inputs(relu_model(tmp_path / "m.onnx", {"image": ["N", 3, "H", "W"]}))
    with pytest.raises(SeldonCaffeError, match=r"input 'image' \[N, 3, \?, \?\] has a dynamic dimension 2") as error:
        optimization_profiles(inputs)
    assert "make_dynamic_shape_fixed" in str(error.value)


# -- calibration batching ---------------------------------------------------------------


def _npy_dir(directory: Path, arrays: list[np.ndarray]) -> Path:
    directory.mkdir()
    for index, array in enumerate(arrays):
        np.save(directory / f"sample{index:03d}.npy", array)
    return directory


def test_calibration_batches_from_npy_files(tmp_path: Path) -> None:
    inputs = model_inputs(relu_model(tmp_path / "m.onnx", {"x": ["N", 8]}))
    # ten files of one item each, without the batch axis; item i is all i
    data = _npy_dir(tmp_path / "calib", [np.full(8, i, np.float32) for i in range(10)])
    batches, dropped = calibration_batches(load_samples(data, inputs), 4)
    assert dropped == 2  # items 8 and 9 make no full batch
    assert [b["x"].shape for b in batches] == [(4, 8), (4, 8)]
    assert [b["x"][:, 0].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # file order kept


def test_calibration_files_holding_batches(tmp_path: Path) -> None:
    inputs = model_inputs(relu_model(tmp_path / "m.onnx", {"x": ["N", 8]}))
    files = [np.arange(3 * i, 3 * i + 3, dtype=np.float64)[:, None].repeat(8, axis=1) for i in range(3)]
    data = _npy_dir(tmp_path / "calib", files)  # 3 files x 3 items; float64 arrives as float32
    batches, dropped = calibration_batches(load_samples(data, inputs), 2)
    assert (len(batches), dropped) == (4, 1)
    assert [b["x"][:, 0].tolist() for b in batches] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # across file borders
    assert batches[0]["x"].dtype == np.float32


def test_calibration_npz_for_several_inputs(tmp_path: Path) -> None:
    inputs = model_inputs(relu_model(tmp_path / "m.onnx", {"x": ["N", 8], "y": ["N", 3]}))
    (tmp_path / "calib").mkdir()
    for i in range(3):
        items = np.arange(2 * i, 2 * i + 2, dtype=np.float32)[:, None]
        np.savez(tmp_path / "calib" / f"{i}.npz", x=items.repeat(8, axis=1), y=items.repeat(3, axis=1))
    batches, dropped = calibration_batches(load_samples(tmp_path / "calib", inputs), 3)
    assert dropped == 0 and len(batches) == 2
    for batch in batches:  # the inputs of one item stay together
        assert batch["x"].shape == (3, 8) and batch["y"].shape == (3, 3)
        assert batch["x"][:, 0].tolist() == batch["y"][:, 0].tolist()


def test_calibration_file_of_the_wrong_shape(tmp_path: Path) -> None:
    inputs = model_inputs(relu_model(tmp_path / "m.onnx", {"x": ["N", 8]}))
    data = _npy_dir(tmp_path / "calib", [np.zeros(8, np.float32), np.zeros(7, np.float32)])
    with pytest.raises(SeldonCaffeError, match=r"sample001\.npy: shape \[1, 7\] does not fit the input \[-1, 8\]"):
        load_samples(data, inputs)


def test_calibration_npz_inputs_disagree(tmp_path: Path) -> None:
    inputs = model_inputs(relu_model(tmp_path / "m.onnx", {"x": ["N", 8], "y": ["N", 3]}))
    (tmp_path / "calib").mkdir()
    np.savez(tmp_path / "calib" / "a.npz", x=np.zeros((2, 8)), y=np.zeros((3, 3)))
    with pytest.raises(SeldonCaffeError, match=r"calibration file 1 .*different numbers of items .*x: 2, y: 3"):
        calibration_batches(load_samples(tmp_path / "calib", inputs), 2)


def test_too_few_calibration_items(tmp_path: Path) -> None:
    inputs = model_inputs(relu_model(tmp_path / "m.onnx", {"x": ["N", 8]}))
    data = _npy_dir(tmp_path / "calib", [np.zeros(8, np.float32)] * 3)
    with pytest.raises(SeldonCaffeError, match=r"3 calibration items make no full batch of 4: .*--calibration-batch"):
        calibration_batches(load_samples(data, inputs), 4)


def test_calibration_batch_size(tmp_path: Path) -> None:
    dynamic = {"x": (-1, 8)}
    assert calibration_batch_size(dynamic, BatchRange(1, 16, 32), None) == 16  # the opt batch
    assert calibration_batch_size(dynamic, BatchRange(1, 16, 32), 8) == 8
    with pytest.raises(SeldonCaffeError, match=r"--calibration-batch 64 is outside .* 1\.\.32 \(opt 16\)"):
        calibration_batch_size(dynamic, BatchRange(1, 16, 32), 64)
    assert calibration_batch_size({"x": (2, 8)}, BatchRange(2, 2, 2), None) == 2  # a fixed batch
    mixed = {"x": (-1, 8), "table": (5, 2)}
    with pytest.raises(SeldonCaffeError, match=r"batch axis shared by every input; input 'table' has none"):
        calibration_batch_size(mixed, BatchRange(1, 4, 8), None)


# -- the command, without TensorRT ------------------------------------------------------


def test_command_is_registered() -> None:
    done = cli("convert", "tensorrt", "--help")
    assert done.returncode == 0, done.stderr
    assert "--max-batch" in done.stdout and "--calibration" in done.stdout


def test_int8_needs_calibration(tmp_path: Path) -> None:
    model = mlp_model(tmp_path / "m.onnx")
    line = one_line_error(cli("convert", "tensorrt", model, "-o", tmp_path / "m.plan", "--precision", "int8"))
    assert "--precision int8 needs --calibration DIR" in line and ".npz" in line


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min-batch", "8", "--max-batch", "4"], "1 <= --min-batch <= --opt-batch <= --max-batch; got 8 <= 4 <= 4"),
        (["--opt-batch", "64", "--max-batch", "16"], "got 1 <= 64 <= 16"),
        (["--calibration", "calib"], "--calibration is for --precision int8 (this build is fp32)"),
        (["--precision", "fp16", "--calibration-batch", "4"], "--calibration-batch is for --precision int8"),
    ],
)
def test_flag_errors(tmp_path: Path, flags: list[str], message: str) -> None:
    model = mlp_model(tmp_path / "m.onnx")
    line = one_line_error(cli("convert", "tensorrt", model, "-o", tmp_path / "m.plan", *flags))
    assert message in line


def test_fixed_batch_model_refuses_batch_flags(tmp_path: Path) -> None:
    model = mlp_model(tmp_path / "m.onnx", batch=1)
    line = one_line_error(cli("convert", "tensorrt", model, "-o", tmp_path / "m.plan", "--max-batch", "8"))
    assert "no dynamic batch axis (x[1, 8]): --max-batch 8 cannot change that" in line


def test_unreadable_onnx(tmp_path: Path) -> None:
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07not a model at all")
    line = one_line_error(cli("convert", "tensorrt", tmp_path / "broken.onnx", "-o", tmp_path / "m.plan"))
    assert "cannot read the ONNX model" in line
    line = one_line_error(cli("convert", "tensorrt", tmp_path / "missing.onnx", "-o", tmp_path / "m.plan"))
    assert "missing.onnx" in line


def test_bad_calibration_data_fails_before_tensorrt(tmp_path: Path) -> None:
    model = mlp_model(tmp_path / "m.onnx")
    data = _npy_dir(tmp_path / "calib", [np.zeros((2, 5), np.float32)])
    done = cli("convert", "tensorrt", model, "-o", tmp_path / "m.plan", "--precision", "int8", "--calibration", data)
    assert "shape [2, 5] does not fit the input [-1, 8]" in one_line_error(done)


@without_tensorrt
def test_valid_command_says_how_to_get_tensorrt(tmp_path: Path) -> None:
    model = mlp_model(tmp_path / "m.onnx")
    line = one_line_error(cli("convert", "tensorrt", model, "-o", tmp_path / "m.plan", "--precision", "fp16"))
    assert line.startswith("seldon-caffe: error: TensorRT is not installed")
    for hint in ("NVIDIA GPU", "pip install tensorrt", "tensorrt-cu12", "nvcr.io/nvidia/tensorrt", "onnxruntime"):
        assert hint in line
    assert not (tmp_path / "m.plan").exists()


@without_tensorrt
def test_int8_calibration_is_checked_before_tensorrt(tmp_path: Path) -> None:
    model = mlp_model(tmp_path / "m.onnx")
    data = _npy_dir(tmp_path / "calib", [np.zeros(8, np.float32)] * 10)
    done = cli(
        "convert", "tensorrt", model, "-o", tmp_path / "m.plan", "--precision", "int8", "--calibration", data,
        "--max-batch", "8", "--calibration-batch", "4",
    )  # fmt: skip
    assert "TensorRT is not installed" in one_line_error(done)
    assert "note: 2 calibration item(s) after the last full batch of 4 are not used" in done.stderr


@without_tensorrt
def test_quantized_model_needs_no_calibration(tmp_path: Path) -> None:
    model = relu_model(tmp_path / "q.onnx", {"x": ["N", 8]}, qdq=True)
    done = cli("convert", "tensorrt", model, "-o", tmp_path / "q.plan", "--precision", "int8")
    assert "TensorRT is not installed" in one_line_error(done)


# -- the runtime, without TensorRT ------------------------------------------------------


def plan_dir(directory: Path, options: str = "{device: cuda}", plan: bytes = b"not a plan") -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "model.plan").write_bytes(plan)
    (directory / "model.yaml").write_text(f"format: tensorrt\nfiles: {{plan: model.plan}}\noptions: {options}\n")
    return directory


@without_tensorrt
def test_runtime_says_how_to_get_tensorrt(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"TensorRT is not installed .*pip install tensorrt.*nvcr\.io"):
        load_runtime(load_config(plan_dir(tmp_path / "model")))
    done = subprocess.run(
        [sys.executable, "-m", "seldon_caffe.cli", "inspect", str(tmp_path / "model")], capture_output=True, text=True
    )
    assert "TensorRT is not installed" in one_line_error(done)


def test_runtime_refuses_cpu(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"field 'options.device': cpu; TensorRT runs on NVIDIA GPUs only"):
        load_runtime(load_config(plan_dir(tmp_path / "model", options="{threads: 2}")))


def test_runtime_serves_plans_only(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    mlp_model(model_dir / "model.onnx")
    (model_dir / "model.yaml").write_text(
        "format: onnx\nfiles: {onnx: model.onnx}\nruntime: tensorrt\noptions: {device: cuda}\n"
    )
    with pytest.raises(ModelLoadError, match=r"serves TensorRT plans .*seldon-caffe convert tensorrt model\.onnx"):
        load_runtime(load_config(model_dir))


def test_profile_problem() -> None:
    assert profile_problem("x", (4, 8), (1, 8), (32, 8)) is None
    assert profile_problem("x", (33, 8), (1, 8), (32, 8)) == (
        "input 'x' has batch 33; this TensorRT plan takes 1 to 32 "
        "(split the request, or rebuild the plan with a larger --max-batch)"
    )
    assert profile_problem("x", (1, 3, 640), (1, 3, 224), (8, 3, 512)) == (
        "input 'x' has dimension 2 640; this TensorRT plan takes 224 to 512"
    )


def test_numpy_dtype() -> None:
    assert numpy_dtype("FLOAT", "x") == "float32" and numpy_dtype("HALF", "x") == "float16"
    with pytest.raises(ModelLoadError, match=r"tensor 'x' of the plan has TensorRT type BF16"):
        numpy_dtype("BF16", "x")


# -- real plans: only with TensorRT and a GPU ---------------------------------------------


@pytest.fixture(scope="module")
def gpu() -> None:
    if not _tensorrt_importable():
        pytest.skip(NEEDS_GPU)
    torch = pytest.importorskip("torch", reason=NEEDS_GPU)
    if not torch.cuda.is_available():
        pytest.skip(NEEDS_GPU)


def build_and_load(tmp_path: Path, model: Path, *flags: object):  # -> a TensorRTRuntime
    model_dir = plan_dir(tmp_path / "served")
    done = cli("convert", "tensorrt", model, "-o", model_dir / "model.plan", *flags)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {model_dir / 'model.plan'}: TensorRT ")
    return load_runtime(load_config(model_dir)), done


def onnxruntime_outputs(model: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(["out"], feed)[0]


@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-3), ("fp16", 1e-2)])
def test_plan_matches_onnxruntime(gpu: None, tmp_path: Path, precision: str, tolerance: float) -> None:
    model = mlp_model(tmp_path / "m.onnx")
    runtime, _ = build_and_load(tmp_path, model, "--precision", precision, "--max-batch", "32", "--opt-batch", "8")
    with runtime:
        assert [s.shape for s in runtime.inputs] == [(-1, 8)] and runtime.batch_range == (1, 32)
        rng = np.random.default_rng(1)
        for batch in (1, 7, 32):
            x = rng.standard_normal((batch, 8)).astype(np.float32)
            got = runtime.run(x)["out"]
            assert got.dtype == np.float32 and got.shape == (batch, 4)
            assert relative_error(got, onnxruntime_outputs(model, {"x": x})) < tolerance
        with pytest.raises(BadRequest, match=r"has batch 33; this TensorRT plan takes 1 to 32"):
            runtime.run(np.zeros((33, 8), np.float32))


@pytest.mark.gpu
def test_int8_plan_with_calibration_cache(gpu: None, tmp_path: Path) -> None:
    model = mlp_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(2)
    data = _npy_dir(tmp_path / "calib", [rng.standard_normal((4, 8)).astype(np.float32) for _ in range(32)])
    flags = ("--precision", "int8", "--calibration", data, "--max-batch", "16")
    runtime, _ = build_and_load(tmp_path, model, *flags)
    assert (tmp_path / "served" / "model.calib").is_file()
    x = rng.standard_normal((16, 8)).astype(np.float32)
    with runtime:
        assert relative_error(runtime.run(x)["out"], onnxruntime_outputs(model, {"x": x})) < 0.1
    runtime, done = build_and_load(tmp_path, model, *flags)  # again: the cache spares calibrating
    assert "reusing the calibration cache" in done.stderr
    runtime.close()


@pytest.mark.gpu
def test_two_inputs_and_threads(gpu: None, tmp_path: Path) -> None:
    model = mlp_model(tmp_path / "m.onnx", two_inputs=True)
    runtime, _ = build_and_load(tmp_path, model, "--max-batch", "8")
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((b, 8)), "y": rng.standard_normal((b, 4))} for b in (1, 2, 5, 8) * 4]
    want = [onnxruntime_outputs(model, {k: v.astype(np.float32) for k, v in f.items()}) for f in feeds]
    got: list[np.ndarray | None] = [None] * len(feeds)

    def work(index: int) -> None:
        got[index] = runtime.run(feeds[index])["out"]  # float64 requests are cast to the plan's float32

    with runtime:
        run_concurrently(work, len(feeds))
    assert all(relative_error(g, w) < 1e-3 for g, w in zip(got, want, strict=True))
