"""Shape inference against real Caffe: every zoo net and small nets for each tricky parameter.

Real BVLC Caffe builds each net (no forward pass) and reports every blob's shape and every
layer's parameter shapes; ours must agree blob for blob. Caffe's automatically inserted
Split blobs ("*_split_N") are the only blobs it may have that we do not.
"""

from __future__ import annotations

import pytest
from helpers import ZOO

from caffe_oracle import reference
from seldon_caffe.caffe import (
    SUPPORTED_LAYERS,
    CaffeFormatError,
    CaffeNet,
    infer_shapes,
    param_shapes,
    parse_prototxt,
    upgrade_net,
)

ZOO_NETS = sorted(p.stem for p in ZOO.glob("*.prototxt"))
BATCHES = [None, 1, 4]  # None: the batch the net declares


def _inputs(**shapes: tuple[int, ...]) -> str:
    return "".join(
        f'layer {{ name: "{name}" type: "Input" top: "{name}" '
        f"input_param {{ shape {{ {' '.join(f'dim: {d}' for d in shape)} }} }} }}\n"
        for name, shape in shapes.items()
    )


def _layer(name: str, type_: str, bottoms: str, tops: str | None = None, params: str = "") -> str:
    bottom = " ".join(f'bottom: "{b}"' for b in bottoms.split())
    top = " ".join(f'top: "{t}"' for t in (name if tops is None else tops).split())
    return f'layer {{ name: "{name}" type: "{type_}" {bottom} {top} {params} }}\n'


L = _layer
LAYER_NETS = {
    "pooling": _inputs(x=(2, 3, 13, 13), y=(1, 2, 4, 4))
    + L("ceil", "Pooling", "x", params="pooling_param { pool: MAX kernel_size: 3 stride: 2 }")
    + L("pad", "Pooling", "x", params="pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }")
    + L("clip", "Pooling", "y", params="pooling_param { pool: MAX kernel_size: 2 stride: 3 pad: 1 }")
    + L(
        "rect",
        "Pooling",
        "x",
        params="pooling_param { kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0 }",
    )
    + L("global", "Pooling", "x", params="pooling_param { pool: AVE global_pooling: true }")
    + L("floor", "Pooling", "x", params="pooling_param { kernel_size: 3 stride: 2 round_mode: FLOOR }")
    + L("mask", "Pooling", "x", "mask mask_idx", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }"),
    "convolution": _inputs(x=(1, 4, 11, 13), v=(1, 2, 5, 6, 7))
    + L(
        "dilated",
        "Convolution",
        "x",
        params="convolution_param { num_output: 6 kernel_size: 3 dilation: 2 pad: 1 stride: 2 group: 2 }",
    )
    + L(
        "rect",
        "Convolution",
        "x",
        params="convolution_param { num_output: 4 kernel_h: 3 kernel_w: 5 stride_h: 2 stride_w: 1 pad_h: 0 pad_w: 2 "
        "bias_term: false }",
    )
    + L("depthwise", "Convolution", "x", params="convolution_param { num_output: 4 group: 4 kernel_size: 3 pad: 1 }")
    + L(
        "per_axis",
        "Convolution",
        "x",
        params="convolution_param { num_output: 2 kernel_size: 3 kernel_size: 1 stride: 1 stride: 2 pad: 0 pad: 1 "
        "dilation: 1 dilation: 3 }",
    )
    + L("volume", "Convolution", "v", params="convolution_param { num_output: 3 kernel_size: 3 pad: 1 stride: 2 }")
    + L("up", "Deconvolution", "x", params="convolution_param { num_output: 2 kernel_size: 4 stride: 2 pad: 1 }")
    + L(
        "up_group",
        "Deconvolution",
        "x",
        params="convolution_param { num_output: 6 group: 2 kernel_size: 3 dilation: 2 }",
    )
    + L(
        "up_rect",
        "Deconvolution",
        "x",
        params="convolution_param { num_output: 3 kernel_h: 2 kernel_w: 3 stride_h: 3 stride_w: 1 bias_term: false }",
    ),
    "crop": _inputs(a=(1, 3, 10, 12), b=(1, 3, 6, 7), c=(1, 2, 5, 5))
    + L("spatial", "Crop", "a b", params="crop_param { axis: 2 offset: 1 offset: 2 }")
    + L("default", "Crop", "a b")
    + L("channels", "Crop", "a c", params="crop_param { axis: 1 offset: 1 }"),
    "reshape": _inputs(x=(2, 3, 4, 5))
    + L("copy_infer", "Reshape", "x", params="reshape_param { shape { dim: 0 dim: -1 } }")
    + L("middle", "Reshape", "x", params="reshape_param { shape { dim: -1 } axis: 1 num_axes: 2 }")
    + L("append", "Reshape", "x", params="reshape_param { shape { dim: 1 } axis: -1 num_axes: 0 }")
    + L("mixed", "Reshape", "x", params="reshape_param { shape { dim: 0 dim: 0 dim: 2 dim: -1 } }")
    + L("head", "Reshape", "x", params="reshape_param { shape { dim: 6 } axis: 0 num_axes: 2 }"),
    "slice_concat": _inputs(x=(2, 5, 4, 6))
    + L("points", "Slice", "x", "s1 s2 s3", "slice_param { axis: 1 slice_point: 1 slice_point: 3 }")
    + L("even", "Slice", "x", "e1 e2 e3", "slice_param { slice_dim: 3 }")
    + L("last", "Slice", "x", "l1 l2", "slice_param { axis: -1 slice_point: 4 }")
    + L("join", "Concat", "s1 s2 s3")
    + L("join_dim", "Concat", "e1 e2 e3", params="concat_param { concat_dim: 3 }")
    + L("join_neg", "Concat", "x x", params="concat_param { axis: -2 }"),
    "flatten": _inputs(x=(2, 3, 4, 5))
    + L("all", "Flatten", "x")
    + L("tail", "Flatten", "x", params="flatten_param { axis: 2 end_axis: 3 }")
    + L("mid", "Flatten", "x", params="flatten_param { axis: 1 end_axis: -2 }")
    + L("whole", "Flatten", "x", params="flatten_param { axis: 0 }"),
    "reduce_argmax": _inputs(x=(2, 3, 4), y=(3, 7))
    + L("mean1", "Reduction", "x", params="reduction_param { operation: MEAN axis: 1 }")
    + L("sum0", "Reduction", "x")
    + L("last", "Reduction", "x", params="reduction_param { operation: SUMSQ axis: -1 }")
    + L("am", "ArgMax", "x")
    + L("am_val", "ArgMax", "x", params="argmax_param { top_k: 2 out_max_val: true }")
    + L("am_axis", "ArgMax", "x", params="argmax_param { axis: 1 top_k: 2 }")
    + L("am_2d", "ArgMax", "y")
    + L("am_neg", "ArgMax", "y", params="argmax_param { axis: -1 out_max_val: true }"),
    "embed_tile_ip": _inputs(ids=(4, 5), x=(2, 3, 4, 5))
    + L("embed", "Embed", "ids", params="embed_param { num_output: 8 input_dim: 10 }")
    + L("tile", "Tile", "x", params="tile_param { axis: 1 tiles: 3 }")
    + L("tile_last", "Tile", "x", params="tile_param { axis: -1 tiles: 2 }")
    + L("ip", "InnerProduct", "x", params="inner_product_param { num_output: 7 }")
    + L("ip_axis", "InnerProduct", "x", params="inner_product_param { num_output: 6 axis: 2 bias_term: false }")
    + L("ip_t", "InnerProduct", "x", params="inner_product_param { num_output: 5 transpose: true }"),
    "elementwise": _inputs(x=(2, 3, 4, 5), s=(3, 4))
    + "".join(L(t.lower(), t, "x") for t in "AbsVal BNLL BatchNorm Dropout ELU Exp Log MVN PReLU Power ReLU".split())
    + "".join(L(t.lower(), t, "x") for t in "Sigmoid Swish TanH Threshold LRN".split())
    + L("clip", "Clip", "x", params="clip_param { min: -1 max: 1 }")
    + L("lrn_within", "LRN", "x", params="lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 }")
    + L("prelu_shared", "PReLU", "x", params="prelu_param { channel_shared: true }")
    + L("softmax", "Softmax", "x", params="softmax_param { axis: 2 }")
    + L("sum", "Eltwise", "x x", params="eltwise_param { coeff: 1 coeff: -1 }")
    + L("prod", "Eltwise", "x x x", params="eltwise_param { operation: PROD }")
    + L("split", "Split", "x", "x1 x2")
    + L("scale", "Scale", "x")
    + L("scale_bias", "Scale", "x", params="scale_param { num_axes: 2 bias_term: true }")
    + L("scale_by", "Scale", "x s")
    + L("scale_by_bias", "Scale", "x s", params="scale_param { bias_term: true }")
    + L("bias", "Bias", "x", params="bias_param { num_axes: -1 }")
    + L("bias_by", "Bias", "x s"),
    "data_layers": L("dummy", "DummyData", "", "d1 d2", "dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 4 } }")
    + L("legacy", "DummyData", "", "d3", "dummy_data_param { num: 2 channels: 3 height: 4 width: 5 }")
    + L("memory", "MemoryData", "", "m lbl", "memory_data_param { batch_size: 3 channels: 2 height: 4 width: 5 }")
    + L("param", "Parameter", "", "w", "parameter_param { shape { dim: 3 dim: 4 } }")
    + L("silence", "Silence", "d1 d2 d3", "")
    + L("mul", "Eltwise", "w w"),
}


@pytest.fixture(scope="module")
def caffe_answers(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Real Caffe's shapes for every zoo net (at each batch) and layer net, from one Caffe process."""
    reason = reference.unavailable_reason()
    if reason:
        pytest.skip(reason)
    keys = [(f"zoo/{name}", ZOO / f"{name}.prototxt", batch) for name in ZOO_NETS for batch in BATCHES]
    layers = tmp_path_factory.mktemp("layer_nets")
    for name, text in LAYER_NETS.items():
        (layers / f"{name}.prototxt").write_text(text)
        keys.append((f"layers/{name}", layers / f"{name}.prototxt", None))
    answers = reference.run_jobs([reference.shapes_job(path, batch) for _, path, batch in keys], timeout=600)
    return {(key, batch): answer for (key, _, batch), answer in zip(keys, answers, strict=True)}


def _check_against_caffe(net_text: str, answer: dict, batch: int | None) -> None:
    net = upgrade_net(parse_prototxt(net_text))
    declared = infer_shapes(net)
    overrides = None if batch is None else {name: (batch, *declared[name][1:]) for name in answer["inputs"]}
    ours = infer_shapes(net, overrides)
    theirs = answer["blobs"]
    assert {name: list(shape) for name, shape in ours.items()} == {
        name: shape for name, shape in theirs.items() if name in ours
    }
    assert all("_split_" in name for name in set(theirs) - set(ours)), set(theirs) - set(ours)
    if batch is None:  # parameter shapes do not depend on the batch
        our_params = {layer.name: param_shapes(layer, [ours[b] for b in layer.bottom]) for layer in net.layer}
        assert {name: [list(s) for s in shapes] for name, shapes in our_params.items() if shapes} == answer["params"]


@pytest.mark.reference
@pytest.mark.parametrize("name", ZOO_NETS)
@pytest.mark.parametrize("batch", BATCHES)
def test_zoo_shapes_match_real_caffe(caffe_answers: dict, name: str, batch: int | None) -> None:
    _check_against_caffe((ZOO / f"{name}.prototxt").read_text(), caffe_answers[f"zoo/{name}", batch], batch)


@pytest.mark.reference
@pytest.mark.parametrize("name", sorted(LAYER_NETS))
def test_layer_shapes_match_real_caffe(caffe_answers: dict, name: str) -> None:
    _check_against_caffe(LAYER_NETS[name], caffe_answers[f"layers/{name}", None], None)


def test_zoo_is_present() -> None:
    assert ZOO_NETS, f"no reference nets in {ZOO} (set SELDON_CAFFE_ZOO)"


# -- without Caffe: the formulas by hand, the API and the errors ----------------------


def test_known_shapes_without_caffe() -> None:
    shapes = infer_shapes(parse_prototxt(LAYER_NETS["pooling"]))
    assert shapes["ceil"] == (2, 3, 6, 6)  # ceil((13 - 3) / 2) + 1
    assert shapes["pad"] == (2, 3, 7, 7)
    assert shapes["clip"] == (1, 2, 2, 2)  # ceil(4/3)+1 = 3, but the 3rd window starts in the padding
    assert shapes["floor"] == (2, 3, 6, 6)
    assert shapes["global"] == (2, 3, 1, 1)
    conv = infer_shapes(parse_prototxt(LAYER_NETS["convolution"]))
    assert conv["dilated"] == (1, 6, 5, 6)  # (11 + 2 - 5) // 2 + 1, (13 + 2 - 5) // 2 + 1
    assert conv["up"] == (1, 2, 22, 26)
    reshaped = infer_shapes(parse_prototxt(LAYER_NETS["reshape"]))
    assert reshaped["copy_infer"] == (2, 60) and reshaped["append"] == (2, 3, 4, 5, 1)
    reduced = infer_shapes(parse_prototxt(LAYER_NETS["reduce_argmax"]))
    assert reduced["sum0"] == () and reduced["am"] == (2, 1, 1) and reduced["am_val"] == (2, 2, 2)


def test_input_shapes_override_and_net_api() -> None:
    net = CaffeNet(parse_prototxt((ZOO / "lenet.prototxt").read_text()))
    assert net.input_shapes == {"data": (64, 1, 28, 28)}
    assert net.outputs == ["prob"]
    assert net.shapes["ip2"] == (64, 10)
    assert infer_shapes(net.definition, {"data": (3, 1, 28, 28)})["prob"] == (3, 10)
    assert [layer.name for layer in net.layers][:2] == ["data", "conv1"]
    assert net.weight_shapes("conv1") == [(20, 1, 5, 5), (20,)]
    with pytest.raises(CaffeFormatError, match="no input named 'image'.*inputs are data"):
        infer_shapes(net.definition, {"image": (1, 1, 28, 28)})


def test_supported_layers_cover_the_common_set() -> None:
    wanted = set(
        "Input Convolution Pooling LRN ReLU Concat Eltwise BatchNorm Scale InnerProduct Dropout Softmax "
        "Deconvolution PReLU ELU Sigmoid TanH AbsVal Power Flatten Reshape Slice Split Crop Embed "
        "Reduction ArgMax Bias Threshold Exp Log MVN Tile Clip Swish".split()
    )
    assert wanted <= SUPPORTED_LAYERS


BAD_NETS = {
    "unknown type": (
        _inputs(x=(1, 3, 8, 8)) + L("warp", "SpatialTransformer", "x"),
        r"layer 'warp' \(SpatialTransformer\): unsupported layer type 'SpatialTransformer'",
    ),
    "training layer": (
        L("data", "Data", "", "x label", 'data_param { source: "lmdb" batch_size: 2 }'),
        r"layer 'data' \(Data\): unsupported layer type 'Data'; it is a training layer: serve the deploy prototxt",
    ),
    "missing bottom": (
        _inputs(x=(1, 3, 8, 8)) + L("r", "ReLU", "y"),
        r"layer 'r' \(ReLU\) reads blob 'y', which no earlier layer produces",
    ),
    "too small": (
        _inputs(x=(1, 3, 2, 2))
        + L("c", "Convolution", "x", params="convolution_param { num_output: 1 kernel_size: 5 }"),
        "too small",
    ),
    "pad >= kernel": (
        _inputs(x=(1, 3, 8, 8)) + L("p", "Pooling", "x", params="pooling_param { kernel_size: 2 pad: 2 }"),
        "pad smaller than the kernel",
    ),
    "group": (
        _inputs(x=(1, 3, 8, 8))
        + L("c", "Convolution", "x", params="convolution_param { num_output: 4 kernel_size: 1 group: 2 }"),
        "group 2 must divide",
    ),
    "two -1": (
        _inputs(x=(2, 6)) + L("r", "Reshape", "x", params="reshape_param { shape { dim: -1 dim: -1 } }"),
        "one -1",
    ),
    "reshape count": (
        _inputs(x=(2, 6)) + L("r", "Reshape", "x", params="reshape_param { shape { dim: 5 } }"),
        "holds 5 values",
    ),
    "slice points": (_inputs(x=(2, 6)) + L("s", "Slice", "x", "a b", "slice_param { slice_point: 7 }"), "slice points"),
    "crop": (
        _inputs(a=(1, 3, 5, 5), b=(1, 3, 4, 4)) + L("c", "Crop", "a b", params="crop_param { offset: 2 }"),
        "offset 2",
    ),
    "twice": (
        _inputs(x=(1, 3, 8, 8)) + L("r", "ReLU", "x", "y") + L("s", "Sigmoid", "x", "y"),
        "'y' is produced twice",
    ),
    "axis": (
        _inputs(x=(1, 3)) + L("s", "Softmax", "x", params="softmax_param { axis: 2 }"),
        "axis 2 is out of range for a 2-D input",
    ),
    "eltwise": (_inputs(x=(1, 3), y=(1, 4)) + L("e", "Eltwise", "x y"), "one shape"),
    "no input shape": ('layer { name: "in" type: "Input" top: "x" }', "no shape for input 'x'"),
}


@pytest.mark.parametrize("case", sorted(BAD_NETS))
def test_bad_nets_are_clear_errors(case: str) -> None:
    text, message = BAD_NETS[case]
    with pytest.raises(CaffeFormatError, match=message):
        infer_shapes(parse_prototxt(text))
