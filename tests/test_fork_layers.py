"""The forks' layers on every engine, against their numpy reference and against OpenCV.

No BVLC Caffe has these layers (caffe-ssd's Normalize, Permute, PriorBox, DetectionOutput;
py-faster-rcnn's ROIPooling; SegNet's BN and Upsample; ...), so tests/test_conformance.py
leaves their layer nets out and this module holds them to a twofold oracle:

* the numpy reference (caffe_oracle/fork_reference.py), written from each fork's sources;
* OpenCV DNN 4.x, which implements caffe-ssd's and py-faster-rcnn's layers and is tested
  against them upstream, wherever it implements the layer as the fork defines it.

Nets: every tests/layer_nets net real Caffe cannot run (test_conformance.runs_on_real_caffe).
Weights: our own `fill_random_weights`. Inputs: random, made for the layer that reads them
(`INPUT_MAKERS`: softmaxed scores, box offsets and priors for DetectionOutput, ROIs inside
the image for ROIPooling), the same for every engine, at batch 1 and 4. Engines are loaded
through the runtimes, as a served model's are.

Agreement: test_conformance's relative error <= 1e-4 for every output; DetectionOutput's
rows must be the same rows in the same order (image and label equal, scores and boxes within
1e-4). OpenCV orders and pads DetectionOutput's rows its own way (runtimes/gaps.py), so the
other engines are compared with its rows put in caffe-ssd's order; a net where OpenCV differs
in substance (a gap beyond that) is not compared with OpenCV. A gap is a strict xfail.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import one_net_per_engine
from test_conformance import BATCHES, LAYER_NETS, REL_TOL, relative_error, runs_on_real_caffe

from caffe_oracle import fork_reference, reference
from seldon_caffe.caffe import (
    CaffeFormatError,
    CaffeNet,
    caffe_pb2,
    load_caffe_net,
    parse_prototxt,
    read_prototxt,
    upgrade_net,
)
from seldon_caffe.caffe.to_onnx import caffe_to_onnx
from seldon_caffe.runtimes import REGISTRY, Runtime
from seldon_caffe.runtimes.gaps import find_gaps
from seldon_caffe.weights import fill_random_weights

ENGINES = ("opencv", "onnxruntime", "openvino", "torch")
CONVERTED = ("onnxruntime", "openvino", "torch")  # the engines that run our ONNX conversion
FORK_NETS = {p.stem: p for p in sorted(LAYER_NETS.glob("*.prototxt")) if not runs_on_real_caffe(p)}


# -- inputs made for the layer that reads them -----------------------------------------------

Maker = Callable[[CaffeNet, caffe_pb2.LayerParameter, tuple[int, ...], int, np.random.Generator], np.ndarray]


def _box_offsets(net: CaffeNet, layer: Any, shape: tuple[int, ...], batch: int, rng: np.random.Generator) -> np.ndarray:
    """DetectionOutput's offsets: a prior's variance times these moves it by about a tenth."""
    return rng.standard_normal((batch, *shape[1:]))


def _class_scores(
    net: CaffeNet, layer: Any, shape: tuple[int, ...], batch: int, rng: np.random.Generator
) -> np.ndarray:
    """Softmaxed scores per prior, as SSD's conf_flat holds them (confident enough to pass thresholds)."""
    classes = layer.detection_output_param.num_classes
    logits = 2 * rng.standard_normal((batch * int(np.prod(shape[1:])) // classes, classes))
    scores = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (scores / scores.sum(axis=1, keepdims=True)).reshape(batch, *shape[1:])


def _priors(net: CaffeNet, layer: Any, shape: tuple[int, ...], batch: int, rng: np.random.Generator) -> np.ndarray:
    """PriorBox's [1, 2, priors * 4]: boxes inside the image, overlapping enough for NMS to act,
    then SSD's variances. One set for the whole batch, as PriorBox makes it."""
    count = shape[2] // 4
    centre, size = rng.uniform(0.15, 0.85, (count, 2)), rng.uniform(0.1, 0.5, (count, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    variances = np.tile([0.1, 0.1, 0.2, 0.2], (count, 1))
    return np.stack([boxes.reshape(-1), variances.reshape(-1)])[None]


def _rois(net: CaffeNet, layer: Any, shape: tuple[int, ...], batch: int, rng: np.random.Generator) -> np.ndarray:
    """ROIPooling's [R, 5] rows (image index, x1, y1, x2, y2 in image pixels), partly outside
    the image the feature map was computed from; R stays as declared at any batch."""
    height, width = net.shapes[layer.bottom[0]][2:]
    scale = layer.roi_pooling_param.spatial_scale
    extent = np.array([width, height]) / scale
    corner = rng.uniform(-0.1, 0.9, (shape[0], 2)) * extent
    other = corner + rng.uniform(0.05, 0.6, (shape[0], 2)) * extent
    index = rng.integers(0, batch, (shape[0], 1))
    return np.concatenate([index, corner, other], axis=1)


INPUT_MAKERS: dict[tuple[str, int], Maker] = {
    ("DetectionOutput", 0): _box_offsets,
    ("DetectionOutput", 1): _class_scores,
    ("DetectionOutput", 2): _priors,
    ("ROIPooling", 1): _rois,
}


def make_inputs(net: CaffeNet, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Every input at `batch`: standard normal, unless the layer reading it needs more (INPUT_MAKERS)."""
    rng = np.random.default_rng(seed)
    readers = {b: (layer, i) for layer in net.definition.layer for i, b in enumerate(layer.bottom)}
    feed = {}
    for name, shape in net.input_shapes.items():
        layer, index = readers.get(name, (None, -1))
        maker = INPUT_MAKERS.get((layer.type, index)) if layer is not None else None
        if maker is not None:
            value = maker(net, layer, shape, batch, rng)
        else:
            value = rng.standard_normal((batch, *shape[1:]))
        feed[name] = np.ascontiguousarray(value, np.float32)
    return feed


# -- what is compared --------------------------------------------------------------------------


def detection_outputs(net: CaffeNet) -> set[str]:
    return {top for layer in net.definition.layer if layer.type == "DetectionOutput" for top in layer.top}


def assert_same(name: str, got: np.ndarray, want: np.ndarray, detections: bool) -> None:
    """Within REL_TOL; DetectionOutput rows: the same rows in the same order."""
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    if not detections:
        error = relative_error(got, want)
        assert error <= REL_TOL, f"{name}: relative error {error:.2e} > {REL_TOL:.0e}"
        return
    rows, expected = got.reshape(-1, 7), want.reshape(-1, 7)
    assert np.array_equal(rows[:, :2], expected[:, :2]), f"{name}: (image, label) per row differ"
    for what, columns in (("scores", slice(2, 3)), ("boxes", slice(3, 7))):
        error = relative_error(rows[:, columns], expected[:, columns])
        assert error <= REL_TOL, f"{name}: {what} differ, relative error {error:.2e} > {REL_TOL:.0e}"


def layers(path: Path) -> list[caffe_pb2.LayerParameter]:
    return list(upgrade_net(read_prototxt(path)).layer)


def opencv_is_an_oracle(net_layers: list[caffe_pb2.LayerParameter]) -> bool:
    """Whether OpenCV computes this net as its forks define it (the opencv runtime gives
    DetectionOutput's rows caffe-ssd's order; gaps.py lists what it cannot do)."""
    return not find_gaps("opencv", net_layers)


# -- nets, weights, references, engines ----------------------------------------------------------


class ForkNet:
    """One layer net: random weights written as a caffemodel, inputs and reference per batch."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name, self.prototxt = name, FORK_NETS[name]
        self.net = load_caffe_net(self.prototxt)
        fill_random_weights(self.net, seed=zlib.crc32(name.encode()))
        self.weights = workdir / f"{name}.caffemodel"
        self.weights.write_bytes(self.net.caffemodel_bytes())
        self.inputs = {batch: make_inputs(self.net, batch, seed=batch) for batch in BATCHES}
        self._expected: dict[int, dict[str, np.ndarray]] = {}

    def expected(self, batch: int) -> dict[str, np.ndarray]:
        if batch not in self._expected:
            self._expected[batch] = fork_reference.forward(self.net, self.inputs[batch], self.net.outputs)
        return self._expected[batch]


@pytest.fixture(scope="session")
def fork_nets(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], ForkNet]:
    workdir, made = tmp_path_factory.mktemp("fork-nets"), {}

    def get(name: str) -> ForkNet:
        if name not in made:
            made[name] = ForkNet(name, workdir)
        return made[name]

    return get


@pytest.fixture(scope="session")
def engines(fork_nets: Callable[[str], ForkNet]) -> Iterator[Callable[[str, str], Runtime]]:
    """load(net, engine): one loaded net per engine at a time (helpers.one_net_per_engine)."""

    def raw(name: str, engine: str) -> tuple[dict, Path]:
        data = fork_nets(name)
        files = {"prototxt": str(data.prototxt), "weights": str(data.weights)}
        return {"files": files, "runtime": engine, "options": {"threads": 1}}, data.weights.parent

    with one_net_per_engine(raw) as load:
        yield load


def needs_engine(engine: str) -> None:
    install = REGISTRY[engine].install
    pytest.importorskip("cv2" if engine == "opencv" else engine, reason=f"{engine} is not installed ({install})")


def engine_cases(engines: tuple[str, ...], opencv_oracle: bool = False) -> Iterator[Any]:
    """(net, engine, batch), net by net; a known gap (gaps.py) is a strict xfail."""
    for name, path in FORK_NETS.items():
        net_layers = layers(path)
        if opencv_oracle and not opencv_is_an_oracle(net_layers):
            continue
        for engine in engines:
            gaps = find_gaps(engine, net_layers)
            why = "; ".join(f"{kind} ({layer}): {reason}" for layer, kind, reason in gaps)
            marks = [pytest.mark.xfail(strict=True, reason=why)] if gaps else []
            for batch in BATCHES:
                yield pytest.param(name, engine, batch, marks=marks, id=f"{name}-{engine}-b{batch}")


# -- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "engine", "batch"), list(engine_cases(ENGINES)))
def test_engine_matches_numpy_reference(name: str, engine: str, batch: int, fork_nets: Any, engines: Any) -> None:
    needs_engine(engine)
    data = fork_nets(name)
    model = engines(name, engine)
    got = model.run(data.inputs[batch])
    detections = detection_outputs(data.net)
    for output, want in data.expected(batch).items():
        assert np.isfinite(want).all(), f"the reference's {output} is not finite: the net's inputs are wrong"
        assert_same(output, got[output], want, output in detections)


@pytest.mark.parametrize(("name", "engine", "batch"), list(engine_cases(CONVERTED, opencv_oracle=True)))
def test_engine_matches_opencv(name: str, engine: str, batch: int, fork_nets: Any, engines: Any) -> None:
    needs_engine(engine)
    needs_engine("opencv")
    data = fork_nets(name)
    feed = data.inputs[batch]
    answers = engines(name, "opencv").run(feed)
    got = engines(name, engine).run(feed)
    detections = detection_outputs(data.net)
    for output in data.net.outputs:
        assert_same(output, got[output], answers[output], output in detections)


def test_detection_rows_are_unnamed_in_the_onnx_signature(fork_nets: Any) -> None:
    """DetectionOutput's row count depends on the data: the converted graph leaves it free
    (None), whatever placeholder the shape rule gives (caffe-ssd's [1, 1, 1, 7])."""
    data = fork_nets("ssd_head")
    assert data.net.shapes["detection"] == (1, 1, 1, 7)
    model = caffe_to_onnx(data.net)
    (output,) = model.graph.output
    dims = output.type.tensor_type.shape.dim
    assert [d.dim_value if d.HasField("dim_value") else None for d in dims] == [1, 1, None, 7]


def test_random_weights_give_normalize_an_ssd_like_scale(fork_nets: Any) -> None:
    """Normalize's scale is filled positive and near 20, where SSD trains conv4_3_norm's."""
    for name in ("normalize_per_pixel", "ssd_head"):
        net = fork_nets(name).net
        for layer in (la for la in net.definition.layer if la.type == "Normalize"):
            (scale,) = net.get_weights(layer.name)
            assert scale.shape == (() if layer.norm_param.channel_shared else (net.shapes[layer.bottom[0]][1],))
            assert np.all((scale >= 15) & (scale <= 25)), (name, layer.name)


# The numpy interpreter's BVLC layers, held to real Caffe on the layer nets that use only them.
BVLC_NETS = [
    name
    for name, path in ((p.stem, p) for p in sorted(LAYER_NETS.glob("*.prototxt")))
    if runs_on_real_caffe(path)
    and all(layer.type in fork_reference.BVLC_LAYERS or layer.type == "Input" for layer in layers(path))
]


# MAX pooling's mask top (SegNet's Upsample reads it), which no BVLC layer net answers.
POOLING_MASK_NET = """
name: "pooling_mask"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 9 dim: 8 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" top: "mask"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pool_rect" type: "Pooling" bottom: "data" top: "pool_rect" top: "mask_rect"
  pooling_param { pool: MAX kernel_h: 2 kernel_w: 3 stride: 2 } }
"""


@pytest.mark.reference
@pytest.mark.skipif(reference.unavailable_reason() is not None, reason=f"{reference.unavailable_reason()}")
def test_numpy_interpreter_matches_real_caffe_on_bvlc_layers(tmp_path: Path) -> None:
    assert len(BVLC_NETS) >= 8, BVLC_NETS  # convolution, pooling, softmax, flatten, reshape, concat...
    (tmp_path / "pooling_mask.prototxt").write_text(POOLING_MASK_NET)
    nets = {name: LAYER_NETS / f"{name}.prototxt" for name in BVLC_NETS}
    nets["pooling_mask"] = tmp_path / "pooling_mask.prototxt"
    jobs = []
    for name, prototxt in nets.items():
        weights = tmp_path / f"{name}.caffemodel"
        jobs += [
            reference.weights_job(prototxt, weights, seed=1),
            reference.forward_job(prototxt, weights, batch=2, seed=2),
        ]
    results = iter(reference.run_jobs(jobs, timeout=600))
    for name, prototxt in nets.items():
        next(results)
        caffe = next(results)
        ours = fork_reference.forward(load_caffe_net(prototxt, tmp_path / f"{name}.caffemodel"), caffe["inputs"])
        for output, want in caffe["outputs"].items():
            error = relative_error(ours[output], want)
            assert error <= REL_TOL, f"{name} {output}: relative error {error:.2e}"


REFUSED = {
    "max_size below min_size": (
        'layer { name: "p" type: "PriorBox" bottom: "data" bottom: "data" top: "p"'
        " prior_box_param { min_size: 8 max_size: 4 } }",
        "max_size must be greater",
    ),
    "permute order repeats an axis": (
        'layer { name: "p" type: "Permute" bottom: "data" top: "p" permute_param { order: 0 order: 2 order: 2 } }',
        "distinct axes",
    ),
    "confidences for another class count": (
        'layer { name: "p" type: "PriorBox" bottom: "data" bottom: "data" top: "priors"'
        " prior_box_param { min_size: 2 } }\n"
        'layer { name: "d" type: "DetectionOutput" bottom: "data" bottom: "data" bottom: "priors" top: "d"'
        " detection_output_param { num_classes: 5 } }",
        "confidences per image",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_settings_caffe_ssd_refuses_are_refused_at_load_naming_the_layer(case: str) -> None:
    text, why = REFUSED[case]
    head = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 dim: 2 dim: 2 } } }\n'
    with pytest.raises(CaffeFormatError, match=rf"layer '(p|d)' \(\w+\): .*{why}"):
        CaffeNet(parse_prototxt(head + text))


@pytest.mark.parametrize("center_point_box", [0, 1])
def test_torch_non_max_suppression_is_onnx_s(center_point_box: int) -> None:
    """The torch form of ONNX NonMaxSuppression (no torchvision) selects what onnxruntime
    selects, in the same order: thresholds, a per-class limit, boxes given either way round."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from seldon_caffe.caffe.to_torch import onnx_to_torch

    rng = np.random.default_rng(center_point_box)
    boxes = rng.uniform(0, 1, (2, 30, 4)).astype(np.float32)  # corners in any order
    scores = rng.uniform(0, 1, (2, 3, 30)).astype(np.float32)
    node = helper.make_node(
        "NonMaxSuppression",
        ["boxes", "scores", "limit", "iou", "score"],
        ["selected"],
        center_point_box=center_point_box,
    )
    graph = helper.make_graph(
        [node],
        "nms",
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape)
            for n, a in (("boxes", boxes), ("scores", scores))
        ],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3])],
        initializer=[
            helper.make_tensor("limit", TensorProto.INT64, [1], [7]),
            helper.make_tensor("iou", TensorProto.FLOAT, [1], [0.3]),
            helper.make_tensor("score", TensorProto.FLOAT, [1], [0.2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (want,) = session.run(None, {"boxes": boxes, "scores": scores})
    got = onnx_to_torch(model)(torch.from_numpy(boxes), torch.from_numpy(scores))["selected"].numpy()
    assert len(want) > 10 and np.array_equal(got, want)


def test_exported_program_keeps_each_inputs_own_rows(fork_nets: Any, tmp_path: Path) -> None:
    """`.pt2` (torch.export) of a net whose inputs' leading dims differ (ROIPooling: the
    feature map's batch, the ROI count) answers any ROI count, as the reference does."""
    torch = pytest.importorskip("torch")
    from seldon_caffe.caffe.to_torch import save_torch

    data = fork_nets("roi_pooling")
    save_torch(caffe_to_onnx(data.net), tmp_path / "net.pt2")
    program = torch.export.load(str(tmp_path / "net.pt2")).module()
    feed = data.inputs[1]
    assert len({array.shape[0] for array in feed.values()}) > 1, "the ROI count must differ from the batch"
    got = program(*(torch.from_numpy(feed[name]) for name in data.net.input_shapes))
    for output, want in data.expected(1).items():
        assert relative_error(got[output].numpy(), want) <= REL_TOL, output
