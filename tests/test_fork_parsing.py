"""Parsing never stands in the way of a Caffe model from the field.

The forks' parameters are in our caffe.proto at their published numbers; a field or enum
value no fork we know defines is skipped and recorded (line, layer), never fatal; a layer
type no engine here implements is refused at load with the three ways forward; and
`runtime: pycaffe` hands the user's files to the user's Caffe untouched, so that what
refuses a net there is that Caffe, in its own words (checked with real Caffe 1.0).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, ZOO

from caffe_oracle import reference
from seldon_caffe.caffe import CaffeFormatError, caffe_pb2, format_prototxt, load_caffe_net, parse_prototxt
from seldon_caffe.caffe.fork_proto import FORK_FIELDS, FORK_MESSAGES, fork_of
from seldon_caffe.caffe.tolerant import unknown_fields
from seldon_caffe.cli import main
from seldon_caffe.errors import ModelLoadError
from seldon_caffe.pipeline import Pipeline

WILD = REPO.parent / "shared" / "caffe-wild"
WILD_NETS = sorted(WILD.glob("*.prototxt"))
needs_caffe = pytest.mark.skipif(reference.unavailable_reason() is not None, reason=f"{reference.unavailable_reason()}")

LENET = (ZOO / "lenet.prototxt").read_text()
# An invented field at three depths, an invented enum value, and an invented list.
INVENTED = (
    LENET.replace('name: "conv1"', 'name: "conv1"\n  fork_knob_param { level: 3 inner { deeper: "x" } }', 1)
    .replace("num_output: 50", "num_output: 50\n    engine: MKL2017\n    sparsity: [0.5, 0.25]", 1)
    .replace('name: "LeNet"', 'name: "LeNet"\nquantized: true', 1)
)


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


# -- the forks' parameters ---------------------------------------------------------------


@pytest.mark.parametrize("path", WILD_NETS, ids=lambda p: p.stem)
def test_public_fork_prototxts_parse_with_nothing_skipped(path: Path) -> None:
    text = path.read_text()
    net = parse_prototxt(text, path.name)
    assert len(net.layer) + len(net.layers) == len(re.findall(r"^\s*layers?\s*\{", text, re.MULTILINE))
    assert unknown_fields(text) == []  # every field they use is in our caffe.proto


def test_there_are_eight_public_fork_prototxts() -> None:
    assert len(WILD_NETS) == 8, WILD_NETS


# The numbers binary caffemodels carry: each fork's own where it does not collide with BVLC
# Caffe's (caffe.proto's comments give the sources and the clashes).
PUBLISHED = {
    "permute_param": 202,
    "prior_box_param": 203,
    "detection_output_param": 204,
    "norm_param": 206,
    "roi_pooling_param": 8266711,
    "proposal_param": 201,
    "psroi_pooling_param": 10002,
    "bn_param": 45,
    "upsample_param": 149,
    "interp_param": 163,
    "shuffle_channel_param": 164,
    "relu6_param": 100000,
}


def test_fork_parameters_sit_at_their_published_numbers() -> None:
    fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    assert {name: fields[name].number for name in PUBLISHED} == PUBLISHED
    assert {f for m, f in FORK_FIELDS if m == "caffe.LayerParameter"} == set(PUBLISHED)
    assert caffe_pb2.PoolingParameter.DESCRIPTOR.fields_by_name["round_mode"].number == 13  # BVLC's, kept
    assert caffe_pb2.DropoutParameter.DESCRIPTOR.fields_by_name["scale_train"].number == 2


def test_fork_table_names_what_the_proto_defines() -> None:
    pool = caffe_pb2.DESCRIPTOR.pool
    for name in FORK_MESSAGES:
        try:
            found = pool.FindMessageTypeByName(name)
        except KeyError:
            found = pool.FindEnumTypeByName(name)
        assert found.full_name == name
    for message, field in FORK_FIELDS:
        assert field in pool.FindMessageTypeByName(message).fields_by_name, (message, field)
    assert fork_of("caffe.LayerParameter", "norm_param").startswith("caffe-ssd")
    assert fork_of("caffe.LayerParameter", "convolution_param") is None
    assert fork_of("caffe.ConvolutionParameter") is None


def test_fork_fields_round_trip_by_name(tmp_path: Path) -> None:
    """OpenCV reads the prototxt we re-emit by field name: the names come back as written."""
    text = (WILD / "face_ssd.prototxt").read_text()
    again = format_prototxt(parse_prototxt(text))
    for name in ("norm_param", "permute_param", "prior_box_param", "nms_param", "keep_top_k", "clip: true"):
        assert name in again, name
    assert parse_prototxt(again) == parse_prototxt(text)


# -- fields no fork we know defines -------------------------------------------------------


def test_unknown_fields_are_skipped_and_recorded_with_line_and_layer() -> None:
    found = unknown_fields(INVENTED)
    assert [(f.path, f.line, f.layer, f.layer_type, f.value) for f in found] == [
        ("quantized", _line_of(INVENTED, "quantized"), None, None, None),
        ("layer.fork_knob_param", _line_of(INVENTED, "fork_knob_param"), "conv1", "Convolution", None),
        ("layer.convolution_param.engine", _line_of(INVENTED, "MKL2017"), "conv2", "Convolution", "MKL2017"),
        ("layer.convolution_param.sparsity", _line_of(INVENTED, "sparsity"), "conv2", "Convolution", None),
    ]
    assert found[1].describe() == f"layer.fork_knob_param (line {found[1].line}, layer 'conv1' (Convolution))"
    assert parse_prototxt(INVENTED) == parse_prototxt(LENET)  # the rest reads exactly as without them


def test_skipped_fields_are_logged_once_per_file(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "seldon_caffe.caffe.tolerant")
    for _ in range(3):
        parse_prototxt(INVENTED + "\n# once", "invented.prototxt")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "invented.prototxt: skipped 4 field(s)" in warnings[0] and "layer.fork_knob_param (line" in warnings[0]


def test_syntax_errors_still_point_at_the_users_line() -> None:
    broken = INVENTED.replace('top: "pool1"', 'top "pool1" }}', 1)
    with pytest.raises(CaffeFormatError, match=rf"^x.prototxt:{_line_of(broken, 'top "pool1" }}')}:\d+: "):
        parse_prototxt(broken, "x.prototxt")
    after = INVENTED + "\nlayer { name: 'late' bogus }\n"  # a syntax error after the skipped ones
    with pytest.raises(CaffeFormatError, match=rf"^y.prototxt:{len(after.splitlines())}:\d+: "):
        parse_prototxt(after, "y.prototxt")


def test_a_net_that_then_fails_names_the_fields_it_skipped(tmp_path: Path) -> None:
    text = LENET.replace("kernel_size: 5", "kernle_size: 5", 1)  # a misspelt field, not a fork's
    (tmp_path / "deploy.prototxt").write_text(text)
    with pytest.raises(CaffeFormatError, match=r"layer 'conv1'.*skipped on reading.*convolution_param.kernle_size"):
        load_caffe_net(tmp_path / "deploy.prototxt")


# -- layer types no engine here implements ------------------------------------------------


def test_an_unknown_layer_type_is_refused_with_the_three_ways_forward(tmp_path: Path) -> None:
    (tmp_path / "warp.prototxt").write_text(LENET.replace('type: "ReLU"', 'type: "FancyWarp"', 1))
    with pytest.raises(CaffeFormatError) as info:
        load_caffe_net(tmp_path / "warp.prototxt")
    message = str(info.value)
    assert "warp.prototxt: layer 'relu1' (FancyWarp): unsupported layer type 'FancyWarp'" in message
    for way in (
        "runtime: pycaffe",
        "options.pycaffe_command",
        'type "Python"',
        "python_param",
        "seldon_caffe.runtimes",
    ):
        assert way in message, way
    (tmp_path / "typo.prototxt").write_text(LENET.replace('type: "ReLU"', 'type: "ReLu"', 1))
    with pytest.raises(CaffeFormatError, match=r"'ReLu' \(a typo for 'ReLU'\?\); no engine here implements it"):
        load_caffe_net(tmp_path / "typo.prototxt")
    (tmp_path / "train.prototxt").write_text(LENET.replace('type: "ReLU"', 'type: "SoftmaxWithLoss"', 1))
    with pytest.raises(CaffeFormatError, match="it is a training layer: serve the deploy prototxt"):
        load_caffe_net(tmp_path / "train.prototxt")


# -- runtime pycaffe: the user's Caffe judges the user's files -----------------------------

IM2COL = """name: "im2col"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 6 dim: 6 } } }
layer { name: "cols" type: "Im2col" bottom: "data" top: "cols"
        convolution_param { kernel_size: 2 stride: 2 engine: CAFFE } }
"""


def _model_dir(path: Path, prototxt: str, weights: Path, runtime: str = "pycaffe") -> Path:
    path.mkdir()
    (path / "deploy.prototxt").write_text(prototxt)
    (path / "w.caffemodel").write_bytes(weights.read_bytes())
    command = ", ".join(f'"{part}"' for part in reference.python_command())
    (path / "model.yaml").write_text(
        f"files: {{prototxt: deploy.prototxt, weights: w.caffemodel}}\nruntime: {runtime}\n"
        f"options: {{pycaffe_command: [{command}], threads: 1}}\n"
    )
    return path


@pytest.fixture(scope="module")
def caffe_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Caffe-written caffemodels for lenet and for the Im2col net (Caffe's own writer)."""
    tmp = tmp_path_factory.mktemp("weights")
    (tmp / "im2col.prototxt").write_text(IM2COL)
    paths = {"lenet": tmp / "lenet.caffemodel", "im2col": tmp / "im2col.caffemodel"}
    jobs = [reference.weights_job(ZOO / "lenet.prototxt", paths["lenet"])]
    jobs.append(reference.weights_job(tmp / "im2col.prototxt", paths["im2col"]))
    reference.run_jobs(jobs, timeout=300)
    return paths


def _im2col(x: np.ndarray, k: int, s: int) -> np.ndarray:
    """Caffe's Im2col without padding: channel c*k*k + i*k + j holds x[c, h*s + i, w*s + j]."""
    n, c, h, w = x.shape
    out = np.empty((n, c * k * k, (h - k) // s + 1, (w - k) // s + 1), np.float32)
    for ch in range(c):
        for i in range(k):
            for j in range(k):
                out[:, ch * k * k + i * k + j] = x[:, ch, i : i + s * out.shape[2] : s, j : j + s * out.shape[3] : s]
    return out


@needs_caffe
def test_pycaffe_serves_a_layer_type_no_engine_here_implements(tmp_path: Path, caffe_weights) -> None:
    """Im2col is in real Caffe, not in our shape rules: pycaffe serves it, opencv refuses it."""
    model = _model_dir(tmp_path / "m", IM2COL, caffe_weights["im2col"])
    pipeline = Pipeline.load(model)
    try:
        assert [(s.name, s.shape) for s in pipeline.model.outputs] == [("cols", (-1, 8, 3, 3))]
        x = np.random.default_rng(0).random((3, 2, 6, 6), np.float32)
        np.testing.assert_array_equal(pipeline.model.run(x)["cols"], _im2col(x, 2, 2))
    finally:
        pipeline.close()
    with pytest.raises(ModelLoadError, match=r"layer 'cols' \(Im2col\): unsupported layer type.*runtime: pycaffe"):
        Pipeline.load(model, "opencv")


@needs_caffe
def test_pycaffe_gets_the_users_bytes_and_caffe_judges_them(tmp_path: Path, caffe_weights) -> None:
    """Fields and types our parser does not know reach Caffe as written; Caffe 1.0 itself
    refuses both, and the error the user sees is Caffe's, not ours."""
    field = LENET.replace('name: "conv1"', 'name: "conv1"\n  fork_knob_param { level: 3 }', 1)
    model = _model_dir(tmp_path / "field", field, caffe_weights["lenet"])
    with pytest.raises(ModelLoadError) as info:
        Pipeline.load(model)
    message = str(info.value)
    caffe_says = f'{_line_of(field, "fork_knob_param")}:3 : Message type "caffe.LayerParameter" has no field named'
    assert f'{caffe_says} "fork_knob_param"' in message
    assert "pycaffe" in message and "skipped" not in message
    kind = LENET.replace('type: "ReLU"', 'type: "FancyReLU"', 1)
    model = _model_dir(tmp_path / "type", kind, caffe_weights["lenet"])
    with pytest.raises(ModelLoadError, match=r"Unknown layer type: FancyReLU") as info:
        Pipeline.load(model)
    assert "Three ways" not in str(info.value)  # Caffe's verdict, not our shape rules'


@needs_caffe
def test_other_runtimes_serve_a_net_with_skipped_fields(tmp_path: Path, caffe_weights) -> None:
    """The same unknown field, on opencv: skipped, and the answers are lenet's."""
    field = LENET.replace('name: "conv1"', 'name: "conv1"\n  fork_knob_param { level: 3 }', 1)
    plain = Pipeline.load(_model_dir(tmp_path / "plain", LENET, caffe_weights["lenet"], "opencv"))
    skipped = Pipeline.load(_model_dir(tmp_path / "field", field, caffe_weights["lenet"], "opencv"))
    try:
        x = np.random.default_rng(1).random((2, 1, 28, 28), np.float32)
        np.testing.assert_array_equal(skipped.model.run(x)["prob"], plain.model.run(x)["prob"])
    finally:
        plain.close()
        skipped.close()


# -- inspect -------------------------------------------------------------------------------


def test_inspect_lists_skipped_fields(tmp_path: Path, capsys) -> None:
    field = LENET.replace('name: "conv1"', 'name: "conv1"\n  fork_knob_param { level: 3 }', 1)
    model = tmp_path / "m"
    model.mkdir()
    (model / "deploy.prototxt").write_text(field)
    assert main(["weights", str(model / "deploy.prototxt"), "-o", str(model / "w.caffemodel")]) == 0
    (model / "model.yaml").write_text("files: {prototxt: deploy.prototxt, weights: w.caffemodel}\nruntime: opencv\n")
    capsys.readouterr()
    assert main(["inspect", str(model)]) == 0
    line = _line_of(field, "fork_knob_param")
    want = f"unknown   field layer.fork_knob_param (line {line}, layer 'conv1' (Convolution)): skipped"
    assert want in capsys.readouterr().out
    assert main(["inspect", str(model), "--json"]) == 0
    unknown = json.loads(capsys.readouterr().out)["unknown"]
    assert unknown["layer_types"] == []
    assert [(f["path"], f["line"], f["layer"]) for f in unknown["fields"]] == [("layer.fork_knob_param", line, "conv1")]


@needs_caffe
def test_inspect_lists_unknown_layer_types(tmp_path: Path, caffe_weights, capsys) -> None:
    model = _model_dir(tmp_path / "m", IM2COL, caffe_weights["im2col"])
    assert main(["inspect", str(model)]) == 0
    assert "unknown   layer type Im2col: no engine here implements it" in capsys.readouterr().out
    assert main(["inspect", str(model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["unknown"] == {"fields": [], "layer_types": ["Im2col"]}


def test_inspect_says_which_engines_run_each_layer_type(capsys) -> None:
    """The detection example: every engine runs its caffe-ssd layers; real BVLC Caffe does not."""
    assert main(["inspect", str(REPO / "examples" / "detection"), "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert layers["DetectionOutput"]["count"] == 1
    assert layers["DetectionOutput"]["engines"] == ["opencv", "onnxruntime", "openvino", "torch"]
    assert "not in BVLC Caffe 1.0" in layers["PriorBox"]["not"]["pycaffe"]
    assert layers["Convolution"]["engines"] == ["pycaffe", "opencv", "onnxruntime", "openvino", "torch"]
    assert main(["inspect", str(REPO / "examples" / "detection")]) == 0
    text = capsys.readouterr().out
    assert "DetectionOutput x1: opencv onnxruntime openvino torch" in text
    assert "not pycaffe: not in BVLC Caffe 1.0" in text
