"""Python layers (issue 25, item 3): the user's layer class runs between the engine's parts.

The layers here are the tests' own, written as Caffe's contract wants them (subclass
caffe.Layer; setup / reshape / forward on blobs): a proposal-style NMS layer that keeps as
many boxes as the data gives, and a region proposal layer for py-faster-rcnn's published
ZF definition (../shared/caffe-wild/faster_rcnn_zf.prototxt, whose `rpn.proposal_layer` is
the authors' code and not here). The same module files run in real pycaffe (the worker in
the reference root, which imports them from the model directory placed under that root)
and, cut around, on every engine here: the proposal net answers like real Caffe within the
conformance measure (max|a - b| / max|b| <= 1e-4) with the same row count; the ZF net, whose
ROIPooling real BVLC Caffe lacks, gets the same answers from the four engines, and its ROIs
are those the proposal layer gives for the engine's own RPN blobs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers import REPO, run_concurrently
from service import running_service
from test_conformance import REL_TOL, relative_error

from caffe_oracle import reference
from seldon_caffe.caffe import load_caffe_net, read_prototxt
from seldon_caffe.caffe.python_layer import Blob, PythonLayer, PythonLayerError
from seldon_caffe.config import load_config
from seldon_caffe.errors import ModelLoadError
from seldon_caffe.runtimes import REGISTRY, load_runtime
from seldon_caffe.runtimes.pycaffe import seen_by
from seldon_caffe.weights import fill_random_weights

DATA = Path(__file__).parent / "data" / "python_layers"
WILD = REPO.parent / "shared" / "caffe-wild"
ENGINES = ("opencv", "onnxruntime", "openvino", "torch")
ROOT = reference.find_root()
needs_caffe = pytest.mark.skipif(ROOT is None, reason=f"{reference.unavailable_reason()}")

# Python 3.6+ and numpy only: the same file runs in the reference root's Python 3.9.
NMS_LAYER = '''
import ast

import caffe
import numpy as np


class NMSLayer(caffe.Layer):
    """A box around every position (score and offsets from the net), kept by greedy NMS:
    rows [image, probability, x1, y1, x2, y2], as many as survive."""

    def setup(self, bottom, top):
        params = ast.literal_eval(self.param_str)
        self.iou, self.min_score = float(params["iou"]), float(params["min_score"])
        if len(bottom) != 2:
            raise Exception("NMSLayer takes two bottoms: score and box")

    def reshape(self, bottom, top):
        top[0].reshape(1, 6)

    def forward(self, bottom, top):
        if np.abs(bottom[0].data).max() > 1e3:
            raise ValueError("scores out of range")
        rows = [self.keep(b, bottom[0].data[b, 0], bottom[1].data[b]) for b in range(bottom[0].num)]
        kept = np.concatenate(rows).astype(np.float32)
        top[0].reshape(*kept.shape)
        top[0].data[...] = kept

    def keep(self, image, score, offsets):
        ys, xs = np.mgrid[0 : score.shape[0], 0 : score.shape[1]].astype(np.float64)
        d = offsets.astype(np.float64)
        boxes = np.stack([xs - 1.5 + d[0], ys - 1.5 + d[1], xs + 1.5 + d[2], ys + 1.5 + d[3]], -1).reshape(-1, 4)
        prob = (1.0 / (1.0 + np.exp(-score.astype(np.float64)))).ravel()
        area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
        order = np.argsort(-prob, kind="stable")
        order = order[prob[order] >= self.min_score]
        keep = []
        while order.size:
            i, rest = order[0], order[1:]
            keep.append(i)
            iw = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
            ih = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
            iou = iw * ih / np.maximum(area[i] + area[rest] - iw * ih, 1e-9)
            order = rest[iou <= self.iou]
        keep = np.array(keep, dtype=np.int64)
        return np.column_stack([np.full(len(keep), image), prob[keep], boxes[keep]])
'''

# py-faster-rcnn's contract: ROIs [R, 5] (image 0, x1, y1, x2, y2) from the RPN's foreground
# scores and box deltas over 9 anchors per position; param_str is "'feat_stride': 16".
PROPOSAL_LAYER = """
import ast

import caffe
import numpy as np

from rpn.anchors import anchors

PRE_NMS, POST_NMS, NMS_IOU = 300, 16, 0.7


class ProposalLayer(caffe.Layer):
    def setup(self, bottom, top):
        self.stride = int(ast.literal_eval("{%s}" % self.param_str)["feat_stride"])
        self.anchors = anchors(self.stride)
        top[0].reshape(1, 5)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        count = self.anchors.shape[0]
        scores = bottom[0].data[0, count:].transpose(1, 2, 0).reshape(-1)
        deltas = bottom[1].data[0].transpose(1, 2, 0).reshape(-1, 4).astype(np.float64)
        height, width, scale = bottom[2].data[0]
        ys, xs = np.mgrid[0 : bottom[0].height, 0 : bottom[0].width] * self.stride
        shifts = np.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4)
        boxes = decode((shifts + self.anchors[None]).reshape(-1, 4), deltas)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width - 1)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height - 1)
        sides = boxes[:, 2:] - boxes[:, :2] + 1
        order = np.argsort(-scores, kind="stable")
        order = order[(sides[order] >= 16 * scale).all(axis=1)][:PRE_NMS]
        keep = nms(boxes, order)[:POST_NMS]
        rois = np.column_stack([np.zeros(len(keep)), boxes[keep]])
        top[0].reshape(*rois.shape)
        top[0].data[...] = rois


def decode(boxes, deltas):
    size = boxes[:, 2:] - boxes[:, :2] + 1.0
    center = boxes[:, :2] + 0.5 * size + deltas[:, :2] * size
    half = 0.5 * np.exp(deltas[:, 2:]) * size
    return np.concatenate([center - half, center + half], axis=1)


def nms(boxes, order):
    areas = np.prod(boxes[:, 2:] - boxes[:, :2] + 1, axis=1)
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        low = np.maximum(boxes[i, :2], boxes[rest, :2])
        high = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(high - low + 1, 0, None), axis=1)
        order = rest[inter / (areas[i] + areas[rest] - inter) <= NMS_IOU]
    return np.array(keep, dtype=np.int64)
"""

ANCHORS = '''
import numpy as np


def anchors(base=16, ratios=(0.5, 1.0, 2.0), scales=(8, 16, 32)):
    """9 boxes centred on the first cell: 3 aspect ratios times 3 scales."""
    center = (base - 1) / 2.0
    boxes = []
    for ratio in ratios:
        w = np.round(np.sqrt(base * base / ratio))
        h = np.round(w * ratio)
        for scale in scales:
            half_w, half_h = (w * scale - 1) / 2.0, (h * scale - 1) / 2.0
            boxes.append([center - half_w, center - half_h, center + half_w, center + half_h])
    return np.array(boxes)
'''


def needs_engine(runtime: str) -> None:
    pytest.importorskip(runtime if runtime != "opencv" else "cv2", reason=f"install {REGISTRY[runtime].install}")


def write_model(
    directory: Path, prototxt: str, modules: dict[str, str], weights: bool | Path = True, **fields: Any
) -> Path:
    """A model directory: deploy.prototxt, the layer modules, random weights (our writer,
    which imports the layer from the prototxt's directory; or a copy of `weights`), model.yaml
    with `fields`."""
    directory.mkdir(parents=True)
    for name, source in modules.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(source)
    (directory / "deploy.prototxt").write_text(prototxt)
    if isinstance(weights, Path):
        shutil.copy(weights, directory / "weights.caffemodel")
    elif weights:
        net = load_caffe_net(directory / "deploy.prototxt")
        fill_random_weights(net, seed=0)
        (directory / "weights.caffemodel").write_bytes(net.caffemodel_bytes())
    files = {"prototxt": "deploy.prototxt", "weights": "weights.caffemodel"}
    if ROOT is not None:  # the real-Caffe oracle: runtime pycaffe through the reference root
        fields.setdefault("options", {"pycaffe_command": reference.python_command(ROOT)})
    (directory / "model.yaml").write_text(yaml.safe_dump({"format": "caffe", "files": files, **fields}))
    return directory


@pytest.fixture(scope="module")
def under_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory the pycaffe worker sees too: under the reference root where there is one."""
    if ROOT is None:
        yield tmp_path_factory.mktemp("python_layers")
        return
    base = Path(tempfile.mkdtemp(prefix="seldon-caffe-python-layers-", dir=ROOT / "tmp"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


PROPOSALS = (DATA / "proposals.prototxt").read_text()
FEEDS = {
    "image": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32),
    "other image": np.random.default_rng(6).standard_normal((1, 3, 8, 8)).astype(np.float32),
    "batch of 2": np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32),
    "another size": np.random.default_rng(4).standard_normal((1, 3, 10, 12)).astype(np.float32),
}


@pytest.fixture(scope="module")
def proposals(under_root: Path) -> Path:
    return write_model(
        under_root / "proposals", PROPOSALS, {"nms_layer.py": NMS_LAYER}, outputs=[{"name": "kept"}, {"name": "prob"}]
    )


@pytest.fixture(scope="module")
def pycaffe_answers(proposals: Path) -> dict[str, dict[str, np.ndarray]]:
    """Real Caffe's answers: the pycaffe worker runs the whole net, the NMS layer included."""
    if ROOT is None:
        pytest.skip(f"{reference.unavailable_reason()}")
    with load_runtime(load_config(proposals, runtime="pycaffe")) as caffe:
        return {name: caffe.run(feed) for name, feed in FEEDS.items()}


def test_a_python_layers_tops_are_what_its_reshape_gives(proposals: Path) -> None:
    net = load_caffe_net(proposals / "deploy.prototxt")
    assert net.shapes["kept"] == (1, 6)  # NMSLayer.reshape: top[0].reshape(1, 6)
    assert net.weight_shapes("fc") == [(6, 6), (6,)]  # the InnerProduct after it is sized from it
    assert "nms_layer" not in sys.modules and "caffe" not in sys.modules  # imported for the net only
    assert not any("proposals" in entry for entry in sys.path)


@needs_caffe
@pytest.mark.reference
@pytest.mark.parametrize("runtime", ENGINES)
def test_the_proposal_net_answers_like_pycaffe(runtime: str, proposals: Path, pycaffe_answers: dict) -> None:
    needs_engine(runtime)
    rows = {name: answer["kept"].shape[0] for name, answer in pycaffe_answers.items()}
    assert rows["image"] != rows["other image"], rows  # the row count follows the data
    with load_runtime(load_config(proposals, runtime=runtime)) as served:
        assert served.name == runtime
        assert [s.describe() for s in served.outputs] == ["kept: float32[N, N]", "prob: float32[N, 3]"]
        for name, feed in FEEDS.items():
            got, want = served.run(feed), pycaffe_answers[name]
            for blob in ("kept", "prob"):
                assert got[blob].shape == want[blob].shape, (name, blob)
                assert relative_error(got[blob], want[blob]) <= REL_TOL, (name, blob)


@pytest.mark.parametrize("runtime", ENGINES)
def test_no_kept_rows_is_an_empty_answer(runtime: str, under_root: Path) -> None:
    """Caffe gives 0-row blobs when the layer keeps nothing; the engines are not run on them."""
    needs_engine(runtime)
    strict = PROPOSALS.replace("'min_score': 0.5", "'min_score': 1.5")  # no probability reaches it
    directory = under_root / f"empty-{runtime}"
    with load_runtime(load_config(write_model(directory, strict, {"nms_layer.py": NMS_LAYER}), runtime=runtime)) as rt:
        assert rt.run(FEEDS["image"])["prob"].shape == (0, 3)


def test_concurrent_requests_get_their_own_rows(proposals: Path) -> None:
    """The engine parts run side by side, the Python layer one call at a time: no request
    gets another's rows."""
    with load_runtime(load_config(proposals, runtime="onnxruntime")) as served:
        feeds = list(FEEDS.values()) * 3
        alone = [served.run(feed)["kept"] for feed in feeds]
        got: dict[int, np.ndarray] = {}
        run_concurrently(lambda i: got.__setitem__(i, served.run(feeds[i])["kept"]), len(feeds))
        for i, want in enumerate(alone):
            np.testing.assert_array_equal(got[i], want)


def test_the_pycaffe_worker_imports_the_layer_from_the_model_directory_as_it_sees_it(tmp_path: Path) -> None:
    inside = tmp_path / "root" / "tmp" / "model"
    inside.mkdir(parents=True)
    assert seen_by(["chroot", str(tmp_path / "root"), "python3"], inside) == "/tmp/model"
    assert seen_by(["chroot", "--userspec=1:1", str(tmp_path / "root"), "python3"], inside) == "/tmp/model"
    assert seen_by(["/opt/conda/bin/python"], inside) == str(inside)


# -- the module, scoped to its model directory --------------------------------------------------


def test_each_model_directory_has_its_own_layer_module(tmp_path: Path) -> None:
    """Two models whose layer modules share a name each get their own; nothing of them stays
    in sys.modules or on sys.path (a helper module of the same name elsewhere is untouched)."""
    sys.modules["nms_layer"] = marker = type(sys)("nms_layer")
    try:
        halved = NMS_LAYER.replace("top[0].data[...] = kept", "top[0].data[...] = kept / 2")
        first = write_model(tmp_path / "first", PROPOSALS, {"nms_layer.py": NMS_LAYER}, outputs=[{"name": "kept"}])
        second = write_model(tmp_path / "second", PROPOSALS, {"nms_layer.py": halved}, outputs=[{"name": "kept"}])
        with (
            load_runtime(load_config(first, runtime="onnxruntime")) as a,
            load_runtime(load_config(second, runtime="onnxruntime")) as b,
        ):
            np.testing.assert_allclose(b.run(FEEDS["image"])["kept"] * 2, a.run(FEEDS["image"])["kept"], rtol=1e-6)
        assert sys.modules["nms_layer"] is marker
        assert "caffe" not in sys.modules
        assert not any(str(tmp_path) in entry for entry in sys.path)
    finally:
        del sys.modules["nms_layer"]


def test_blobs_behave_as_pycaffe_blobs() -> None:
    blob = Blob(np.arange(10, dtype=np.float32).reshape(2, 5))
    assert (blob.num, blob.channels, blob.height, blob.width, blob.count, blob.shape) == (2, 5, 1, 1, 10, (2, 5))
    blob.reshape(2, 5)
    assert blob.data[1, 4] == 9  # same shape: the values stay
    blob.reshape(3, 1, 2, 2)
    assert blob.data.shape == (3, 1, 2, 2) and blob.data.dtype == np.float32
    with pytest.raises(AttributeError):
        blob.data = np.zeros(3)  # pycaffe's data is written in place, not replaced
    with pytest.raises(ValueError, match="at most 4 axes"):
        _ = Blob(np.zeros((1, 1, 1, 1, 1), np.float32)).num


# -- errors -------------------------------------------------------------------------------------


def _refused(directory: Path) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_runtime(load_config(directory, runtime="onnxruntime"))
    return str(info.value)


def test_a_missing_module_or_class_says_where_it_looked_and_what_caffe_expects(tmp_path: Path, proposals: Path) -> None:
    elsewhere = PROPOSALS.replace('module: "nms_layer"', 'module: "layers.nms"')
    message = _refused(write_model(tmp_path / "module", elsewhere, {}, weights=proposals / "weights.caffemodel"))
    assert "layer 'nms' (Python)" in message and "cannot find module 'layers.nms'" in message
    assert f"in the model directory {tmp_path / 'module'} (layers/nms.py" in message
    assert "subclasses caffe.Layer" in message and "forward(self, bottom, top)" in message

    renamed = PROPOSALS.replace('layer: "NMSLayer"', 'layer: "NmsLayer"')
    message = _refused(
        write_model(tmp_path / "class", renamed, {"nms_layer.py": NMS_LAYER}, weights=proposals / "weights.caffemodel")
    )
    assert "has no class 'NmsLayer' (its classes: NMSLayer)" in message
    assert str(tmp_path / "class" / "nms_layer.py") in message and "subclasses caffe.Layer" in message

    plain = NMS_LAYER.replace("class NMSLayer(caffe.Layer):", "class NMSLayer:")
    message = _refused(
        write_model(tmp_path / "plain", PROPOSALS, {"nms_layer.py": plain}, weights=proposals / "weights.caffemodel")
    )
    assert "class 'NMSLayer'" in message and "does not subclass caffe.Layer" in message


def test_a_layer_that_fails_to_set_up_stops_the_load_naming_its_line(tmp_path: Path, proposals: Path) -> None:
    broken = PROPOSALS.replace("{'iou': 0.3, 'min_score': 0.5}", "{'iou': 0.3}")
    message = _refused(
        write_model(tmp_path / "setup", broken, {"nms_layer.py": NMS_LAYER}, weights=proposals / "weights.caffemodel")
    )
    assert "layer 'nms' (Python): setup() raised KeyError: 'min_score'" in message
    line = (
        NMS_LAYER.splitlines().index(
            '        self.iou, self.min_score = float(params["iou"]), float(params["min_score"])'
        )
        + 1
    )
    assert f"(at {tmp_path / 'setup' / 'nms_layer.py'}:{line})" in message

    needs_pycaffe_io = "import caffe.io\n" + NMS_LAYER
    message = _refused(
        write_model(
            tmp_path / "io", PROPOSALS, {"nms_layer.py": needs_pycaffe_io}, weights=proposals / "weights.caffemodel"
        )
    )
    assert "importing module 'nms_layer'" in message and "stand-in that has only Layer" in message


def test_an_exception_in_forward_is_a_500_naming_the_layer(proposals: Path) -> None:
    with load_runtime(load_config(proposals, runtime="onnxruntime")) as served:
        with pytest.raises(PythonLayerError) as info:
            served.run(FEEDS["image"] * 1e6)  # NMSLayer.forward refuses such scores
        assert info.value.status == 500
        assert "Python layer 'nms' (nms_layer.NMSLayer): forward() raised ValueError: scores out of range" in str(
            info.value
        )
        assert served.run(FEEDS["image"])["prob"].shape[1] == 3  # and the next request is answered


@pytest.mark.e2e
def test_the_service_answers_500_for_a_failing_python_layer(proposals: Path, tmp_path: Path) -> None:
    served = shutil.copytree(proposals, tmp_path / "served")
    config = yaml.safe_load((served / "model.yaml").read_text())
    (served / "model.yaml").write_text(yaml.safe_dump({**config, "runtime": "onnxruntime"}))
    with running_service(served) as service:
        bad = service.post({"data": {"ndarray": (FEEDS["image"] * 1e6).tolist()}})
        assert bad.status_code == 500, bad.text
        assert "Python layer 'nms'" in bad.json()["status"]["info"]
        assert service.post({"data": {"ndarray": FEEDS["image"].tolist()}}).status_code == 200


# -- py-faster-rcnn's ZF net --------------------------------------------------------------------

RPN = {"rpn/__init__.py": "", "rpn/proposal_layer.py": PROPOSAL_LAYER, "rpn/anchors.py": ANCHORS}
ZF_OUTPUTS = ["rois", "cls_prob", "bbox_pred", "rpn_cls_prob_reshape", "rpn_bbox_pred"]
ZF_SIZES = [(224, 224), (160, 208)]  # the published input size, and another image size


@pytest.fixture(scope="module")
def faster_rcnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The published ZF definition, our rpn package, weights from `seldon-caffe weights`."""
    directory = write_model(
        tmp_path_factory.mktemp("faster_rcnn") / "zf",
        (WILD / "faster_rcnn_zf.prototxt").read_text(),
        RPN,
        weights=False,
        outputs=[{"name": name} for name in ZF_OUTPUTS],
    )
    done = subprocess.run(
        [sys.executable, "-m", "seldon_caffe.cli", "weights", str(directory / "deploy.prototxt"), "-o",
         str(directory / "weights.caffemodel")],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return directory


def _zf_feed(height: int, width: int) -> dict[str, np.ndarray]:
    image = np.random.default_rng(height).standard_normal((1, 3, height, width)).astype(np.float32)
    return {"data": image, "im_info": np.array([[height, width, 1.0]], np.float32)}


@pytest.fixture(scope="module")
def zf_answers(faster_rcnn: Path) -> dict[str, list[dict[str, np.ndarray]]]:
    """Each engine's answers at each size, one engine loaded at a time (the net is 226 MiB)."""
    answers = {}
    for runtime in ENGINES:
        needs_engine(runtime)
        with load_runtime(load_config(faster_rcnn, runtime=runtime)) as served:
            answers[runtime] = [served.run(_zf_feed(*size)) for size in ZF_SIZES]
    return answers


@pytest.mark.slow
def test_faster_rcnn_zf_is_served_by_every_engine_alike(zf_answers: dict[str, list[dict[str, np.ndarray]]]) -> None:
    reference_answers = zf_answers["opencv"]
    for runtime, answers in zf_answers.items():
        for size, got, want in zip(ZF_SIZES, answers, reference_answers, strict=True):
            rois = want["rois"].shape[0]
            assert 1 < rois <= 16 and got["cls_prob"].shape == (rois, 21) and got["bbox_pred"].shape == (rois, 84)
            for name in ZF_OUTPUTS:
                assert got[name].shape == want[name].shape, (runtime, size, name)
                assert relative_error(got[name], want[name]) <= REL_TOL, (runtime, size, name)


@pytest.mark.slow
def test_faster_rcnn_zf_rois_are_the_proposal_layers_rows(faster_rcnn: Path, zf_answers: dict) -> None:
    """What each engine answers as `rois` is what the proposal layer makes of that engine's RPN."""
    param = next(layer for layer in read_prototxt(faster_rcnn / "deploy.prototxt").layer if layer.type == "Python")
    for answers in zf_answers.values():
        for size, got in zip(ZF_SIZES, answers, strict=True):
            bottoms = [got["rpn_cls_prob_reshape"], got["rpn_bbox_pred"], _zf_feed(*size)["im_info"]]
            layer = PythonLayer(param, [b.shape for b in bottoms], faster_rcnn)
            np.testing.assert_array_equal(layer.run(bottoms)[0], got["rois"])
