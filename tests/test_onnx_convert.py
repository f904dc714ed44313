"""The Caffe -> ONNX converter on its own: coverage, names, batch, errors, the CLI. No Caffe needed.

Numbers against real Caffe are tests/test_onnx_runtimes.py's job; here the nets get random
weights of our own (scaled so activations stay near unit size) and the checks are about
the graph: onnx.checker with full shape inference, Caffe names on inputs and outputs, a
symbolic batch that really takes any batch size, and Caffe semantics that are easy to get
subtly wrong (average pooling's clipped windows, the max-pooling mask, in-place blobs).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import ZOO
from test_fork_layers import make_inputs

from seldon_caffe.caffe import CaffeFormatError, CaffeNet, infer_shapes, load_caffe_net, parse_prototxt
from seldon_caffe.caffe.forks import FORK_SHAPE_RULES
from seldon_caffe.caffe.forks.ssd import data_dependent_axes
from seldon_caffe.caffe.to_onnx import BATCH_DIM, UnsupportedLayer, caffe_to_onnx, unconvertible_layers
from seldon_caffe.runtimes.gaps import find_gaps
from seldon_caffe.weights import fill_random_weights

LAYER_NETS = sorted((Path(__file__).parent / "layer_nets").glob("*.prototxt"))
SMALL_ZOO = ("lenet", "mnist_siamese", "squeezenet_v1_1", "bvlc_googlenet")


def random_weights(net: CaffeNet, seed: int = 0) -> CaffeNet:
    """Give every learned blob random values that keep activations near unit size."""
    rng = np.random.default_rng(seed)
    for layer in net.definition.layer:
        try:
            shapes = net.weight_shapes(layer.name)
        except ValueError:
            continue  # learns nothing
        if layer.type == "BatchNorm":  # stored times the moving-average factor (2 here)
            c = shapes[0]
            arrays = [2 * rng.normal(0, 0.1, c), 2 * rng.uniform(0.5, 1.5, c), np.full(shapes[2], 2.0)]
        else:
            arrays = []
            for k, shape in enumerate(shapes):
                if layer.type in ("Scale", "PReLU") and k == 0:
                    arrays.append(rng.uniform(0.5, 1.5, shape))
                elif len(shape) >= 2:
                    arrays.append(rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:])))
                else:
                    arrays.append(rng.normal(0, 0.1, shape))
        net.set_weights(layer.name, [np.asarray(a, np.float32) for a in arrays])
    return net


def random_net(prototxt: Path | str, seed: int = 0) -> CaffeNet:
    """A CaffeNet from a prototxt path or text, with random weights."""
    if isinstance(prototxt, Path):
        return random_weights(load_caffe_net(prototxt), seed)
    return random_weights(CaffeNet(parse_prototxt(prototxt)), seed)


def write_caffe_files(net: CaffeNet, directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    prototxt, weights = directory / "deploy.prototxt", directory / "weights.caffemodel"
    prototxt.write_bytes(net.prototxt_bytes())
    weights.write_bytes(net.caffemodel_bytes())
    return prototxt, weights


def run_onnx(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def random_inputs(net: CaffeNet, batch: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    embeds = {la.bottom[0]: la.embed_param.input_dim for la in net.definition.layer if la.type == "Embed"}
    feed = {}
    for name, shape in net.input_shapes.items():
        size = (batch, *shape[1:])
        feed[name] = (rng.integers(0, embeds[name], size) if name in embeds else rng.standard_normal(size)).astype(
            np.float32
        )
    return feed


def test_every_supported_layer_type_has_a_converter() -> None:
    assert unconvertible_layers() == []


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("path", LAYER_NETS + [ZOO / f"{n}.prototxt" for n in SMALL_ZOO], ids=lambda p: p.stem)
def test_converts_checker_clean_with_caffe_names_and_any_batch(path: Path, opset: int) -> None:
    if not path.exists():
        pytest.skip(f"{path} not found")
    forks = any(layer.type in FORK_SHAPE_RULES for layer in load_caffe_net(path).definition.layer)
    if forks:  # their weights and inputs must be valid (BN variances, ROI boxes): made as test_fork_layers makes them
        net = load_caffe_net(path)
        fill_random_weights(net)
    else:
        net = random_net(path)
    refused = find_gaps("onnxruntime", net.definition.layer)  # what the converter cannot express
    if refused:
        with pytest.raises(UnsupportedLayer, match=refused[0][0]):
            caffe_to_onnx(net, opset=opset)
        return
    model = caffe_to_onnx(net, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    graph = model.graph
    assert [i.name for i in graph.input] == list(net.input_shapes)
    assert [o.name for o in graph.output] == net.outputs
    for value in graph.input:
        assert value.type.tensor_type.shape.dim[0].dim_param == BATCH_DIM
    batch = 3  # not the declared batch: the graph must really take any batch size
    feed = make_inputs(net, batch, seed=1) if forks else random_inputs(net, batch)
    got = run_onnx(model, feed)
    shapes = infer_shapes(net.definition, {name: value.shape for name, value in feed.items()})  # ROIs: their own count
    free = data_dependent_axes(net.definition)
    for name in net.outputs:  # DetectionOutput's rows: as many as the data gives
        fixed = [d for i, d in enumerate(shapes[name]) if i not in free.get(name, ())]
        assert [d for i, d in enumerate(got[name].shape) if i not in free.get(name, ())] == fixed, name
        assert np.isfinite(got[name]).all(), name


def test_fixed_batch() -> None:
    model = caffe_to_onnx(random_net(ZOO / "lenet.prototxt"), batch=5)
    dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [5, 10]


def _net(*layers: str, shape: str = "dim: 2 dim: 3 dim: 8 dim: 8") -> str:
    head = f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {shape} }} }} }}\n'
    return head + "\n".join(layers)


def test_in_place_blobs_end_with_their_caffe_name() -> None:
    """conv -> relu (in place) -> bn (in place): the value named "conv" is the BatchNorm's output,
    and an output overwritten in place is served after the overwrite."""
    text = _net(
        'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
        "convolution_param { num_output: 4 kernel_size: 3 } }",
        'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }',
        'layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }',
        'layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { num_output: 5 } }',
        'layer { name: "relu2" type: "ReLU" bottom: "ip" top: "ip" }',
    )
    model = caffe_to_onnx(random_net(text))
    writers = {out: node.op_type for node in model.graph.node for out in node.output}
    assert writers["conv"] == "BatchNormalization"
    assert writers["ip"] == "Relu"
    assert writers["conv@conv"] == "Conv" and writers["conv@relu"] == "Relu"
    assert [o.name for o in model.graph.output] == ["ip"]
    (ip,) = run_onnx(model, {"data": np.random.default_rng(0).standard_normal((2, 3, 8, 8), np.float32)}).values()
    assert (ip >= 0).all() and (ip > 0).any()


def test_an_input_overwritten_in_place_keeps_its_name_as_input() -> None:
    text = _net('layer { name: "pow" type: "Power" bottom: "data" top: "data" power_param { scale: 2 } }')
    model = caffe_to_onnx(random_net(text))
    assert [i.name for i in model.graph.input] == ["data"]
    x = np.ones((2, 3, 8, 8), np.float32)
    (out,) = run_onnx(model, {"data": x}).values()
    assert np.array_equal(out, 2 * x)


def _caffe_pool(x: np.ndarray, kernel: int, stride: int, pad: int, out: int, average: bool) -> np.ndarray:
    """Caffe 1.0's pooling loop, for square windows (pooling_layer.cpp, Forward_cpu)."""
    n, c, h, w = x.shape
    y = np.zeros((n, c, out, out), np.float64)
    for i in range(out):
        for j in range(out):
            hs, ws = i * stride - pad, j * stride - pad
            he, we = min(hs + kernel, h + pad), min(ws + kernel, w + pad)
            size = (he - hs) * (we - ws)
            window = x[:, :, max(hs, 0) : min(he, h), max(ws, 0) : min(we, w)]
            y[:, :, i, j] = window.sum(axis=(2, 3)) / size if average else window.max(axis=(2, 3))
    return y


@pytest.mark.parametrize("pool", ["AVE", "MAX"])
@pytest.mark.parametrize(
    ("size", "kernel", "stride", "pad"), [(10, 3, 2, 1), (7, 3, 2, 0), (6, 2, 3, 1), (13, 3, 2, 0)]
)
def test_pooling_rounds_and_divides_like_caffe(pool: str, size: int, kernel: int, stride: int, pad: int) -> None:
    params = f"pool: {pool} kernel_size: {kernel} stride: {stride} pad: {pad}"
    text = _net(
        f'layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param {{ {params} }} }}',
        shape=f"dim: 2 dim: 3 dim: {size} dim: {size}",
    )
    net = random_net(text)
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    (got,) = run_onnx(caffe_to_onnx(net), {"data": x}).values()
    out = net.shapes["pool"][2]
    want = _caffe_pool(x.astype(np.float64), kernel, stride, pad, out, pool == "AVE")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_max_pooling_mask_top_is_the_index_in_the_plane() -> None:
    text = _net(
        'layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" top: "mask" '
        "pooling_param { pool: MAX kernel_size: 2 stride: 2 } }",
    )
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    got = run_onnx(caffe_to_onnx(random_net(text)), {"data": x})
    planes = x.reshape(2, 3, 8 * 8)
    picked = np.take_along_axis(planes, got["mask"].astype(np.int64).reshape(2, 3, -1), axis=2)
    assert np.array_equal(picked.reshape(got["pool"].shape), got["pool"])


def test_unsupported_layer_names_the_layer_and_its_type() -> None:
    text = _net(
        'layer { name: "noise" type: "DummyData" top: "noise" '
        'dummy_data_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } data_filler { type: "gaussian" } } }',
        'layer { name: "scaled" type: "Power" bottom: "noise" top: "scaled" power_param { scale: 2 } }',
    )
    with pytest.raises(UnsupportedLayer, match=r"layer 'noise' \(DummyData\).*gaussian"):
        caffe_to_onnx(random_net(text))


def test_a_net_that_fixes_its_batch_asks_for_a_fixed_batch() -> None:
    text = _net(
        'layer { name: "r" type: "Reshape" bottom: "data" top: "r" reshape_param { shape { dim: 2 dim: 192 } } }'
    )
    net = random_net(text)
    with pytest.raises(CaffeFormatError, match="--batch N"):
        caffe_to_onnx(net)
    (got,) = run_onnx(caffe_to_onnx(net, batch=2), {"data": np.ones((2, 3, 8, 8), np.float32)}).values()
    assert got.shape == (2, 192)


# -- the command ------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seldon_caffe.cli", *args], capture_output=True, text=True)


def test_cli_convert_and_quantize(tmp_path: Path) -> None:
    prototxt, weights = write_caffe_files(random_net(ZOO / "lenet.prototxt"), tmp_path)
    out = tmp_path / "model.onnx"
    done = _cli("convert", "caffe", str(prototxt), str(weights), "-o", str(out), "--batch", "4", "--opset", "13")
    assert done.returncode == 0, done.stderr
    assert "prob[4, 10]" in done.stdout and done.stderr == ""  # no bar when stderr is not a terminal
    assert onnx.load(str(out)).opset_import[0].version == 13

    done = _cli("convert", "caffe", str(prototxt), str(weights), "-o", str(out), "--progress")
    assert done.returncode == 0 and "converting deploy.prototxt [" in done.stderr and "9/9" in done.stderr

    int8 = tmp_path / "model.int8.onnx"
    done = _cli("quantize", str(out), "--calibration", "random", "-o", str(int8))
    assert done.returncode == 0, done.stderr
    assert int8.is_file() and "prob: relative_error" in done.stdout
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(str(int8)).graph.node)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    text = _net('layer { name: "py" type: "Python" bottom: "data" top: "py" }')
    (tmp_path / "bad.prototxt").write_text(text)
    _, weights = write_caffe_files(random_net(ZOO / "lenet.prototxt"), tmp_path)  # a valid caffemodel
    done = _cli("convert", "caffe", str(tmp_path / "bad.prototxt"), str(weights), "-o", str(tmp_path / "x"))
    assert done.returncode == 1
    assert done.stderr.startswith("seldon-caffe: error:") and "'py' (Python)" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
