"""The detection example (examples/detection): a trained SSD, served like one from the field.

Its mAP@0.5 on held-out scenes must be the one README.md quotes; every engine must give
caffe-ssd's detections (the numpy oracle, caffe_oracle/numpy_ssd.py, run over the whole net):
the same rows in the same order, scores and boxes within 1e-4 (the opencv runtime undoes
OpenCV's own padding and order); the committed caffemodel must compute what the torch net it came
from computes; and the served answers over Seldon v1 (REST, gRPC) and V2 (REST, gRPC) must
be the answer of the same request run in process.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from google.protobuf import json_format
from helpers import EXAMPLES
from service import running_service

from caffe_oracle import fork_reference
from seldon_caffe.caffe import load_caffe_net
from seldon_caffe.config import load_config
from seldon_caffe.model import SeldonCaffeModel
from seldon_caffe.runtimes import load_runtime
from seldon_caffe.runtimes.gaps import find_gaps

DETECTION = EXAMPLES / "detection"
sys.path[:0] = [str(EXAMPLES), str(DETECTION)]  # examples/_train, and the example's own modules
import shapes_data  # noqa: E402
from _train import load_script  # noqa: E402

ENGINES = ("opencv", "onnxruntime", "openvino", "torch")
TOLERANCE = 1e-4  # scores and normalised box corners, engine against the oracle
MAP_TOLERANCE = 0.002  # evaluate.py's figures against README.md's (3 decimals)
HOOKS = load_script(DETECTION / "hooks.py")


def raw_engines() -> list:
    """The engines, a known gap (runtimes/gaps.py) in this net a strict xfail."""
    layers = load_caffe_net(DETECTION / "deploy.prototxt").definition.layer
    params = []
    for engine in ENGINES:
        why = "; ".join(f"{kind} ({layer}): {reason}" for layer, kind, reason in find_gaps(engine, layers))
        params.append(pytest.param(engine, marks=[pytest.mark.xfail(strict=True, reason=why)] if why else []))
    return params


def scenes_batch(first: int, count: int) -> np.ndarray:
    """Held-out scenes first..first+count-1 as the net's input, prepared by the hooks."""
    return np.stack([HOOKS.prepare(shapes_data.scene("held-out", i).image) for i in range(first, first + count)])


def png(index: int) -> bytes:
    return shapes_data.png(shapes_data.scene("held-out", index).image)


@pytest.fixture(scope="module")
def oracle_net():
    return load_caffe_net(DETECTION / "deploy.prototxt", DETECTION / "weights.caffemodel")


@pytest.fixture(scope="module")
def local():
    """The SeldonCaffeModel the service runs (model.yaml: opencv), loaded in this process."""
    served = SeldonCaffeModel(str(DETECTION))
    served.load()
    yield served
    served.model.close()


def ask(served: SeldonCaffeModel, payload, tags: dict | None = None):
    return served.predict(payload, names=[], meta={"tags": tags} if tags else {})


# -- what the net computes -------------------------------------------------------------


def test_map_on_held_out_scenes_is_what_the_readme_says():
    evaluate = load_script(DETECTION / "evaluate.py")
    result = evaluate.evaluate()
    assert result["runtime"] == "opencv" and result["count"] == evaluate.HELD_OUT
    assert result["mAP"] >= 0.95, result
    readme = (DETECTION / "README.md").read_text(encoding="utf-8")
    for line in evaluate.report(result):
        name, value = line.rsplit(" ", 1)
        quoted = re.search(rf"^{re.escape(name)} (\d\.\d+)$", readme, re.MULTILINE)
        assert quoted, f"README.md no longer quotes {name!r} (evaluate.py prints {line!r})"
        assert abs(float(quoted.group(1)) - float(value)) <= MAP_TOLERANCE, (line, quoted.group(0))


@pytest.mark.parametrize("engine", raw_engines())
@pytest.mark.parametrize("first,count", [(0, 1), (1, 1), (2, 1), (3, 1), (4, 4)], ids=lambda v: str(v))
def test_every_engine_gives_caffe_ssd_detections(engine, first, count, oracle_net):
    """Batch 1 (four scenes) and batch 4: rows, order and labels exact; scores and boxes within 1e-4."""
    x = scenes_batch(first, count)
    want = fork_reference.forward(oracle_net, {"data": x}, ["detection_out"])["detection_out"]
    with load_runtime(load_config(DETECTION, engine)) as model:
        got = model.run({"data": x})["detection_out"]
    assert got.shape == want.shape, f"{engine}: {got.shape[2]} detections, caffe-ssd gives {want.shape[2]}"
    np.testing.assert_array_equal(got[..., :2], want[..., :2], err_msg=f"{engine}: image/label columns")
    np.testing.assert_allclose(got[..., 2:], want[..., 2:], rtol=0, atol=TOLERANCE, err_msg=f"{engine}: scores/boxes")


def test_the_caffe_net_computes_what_the_torch_net_learnt(oracle_net):
    """The committed weights in the torch module that trained them: OpenCV's run of the Caffe
    files gives its box offsets and class probabilities; the priors training encoded against
    (multibox.py) are the ones caffe-ssd's PriorBox makes (the numpy oracle's)."""
    pytest.importorskip("torch")
    import ssd_net

    train = load_script(DETECTION / "train.py")
    assert train.check_with_opencv(ssd_net.TinySSD.from_caffe(oracle_net)) <= TOLERANCE
    priors = fork_reference.forward(oracle_net, {"data": scenes_batch(0, 1)}, ["mbox_priorbox"])["mbox_priorbox"]
    boxes, variances = ssd_net.all_priors()
    np.testing.assert_allclose(priors[0, 0], boxes.ravel(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(priors[0, 1], variances.ravel())


def test_opencv_serves_caffe_ssd_detections(local, oracle_net):
    """Through the hooks, which drop OpenCV's padding rows and order by score, OpenCV's
    answers are caffe-ssd's. Held-out scenes give 1-11 rows; noise gives many weak candidates,
    so keep_top_k cuts them to 20, and OpenCV's choice of the 20 is held to caffe-ssd's too."""
    noise = np.random.default_rng(0).integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    images = [shapes_data.scene("held-out", i).image for i in range(6)] + list(noise)
    counts = []
    for index, image in enumerate(images):
        rows = fork_reference.forward(oracle_net, {"data": HOOKS.prepare(image)[None]}, ["detection_out"])
        want = HOOKS.postprocess(rows, SimpleNamespace(tags={"threshold": 0}, image_size=(96, 96)))
        assert_same_detections(ask(local, shapes_data.png(image), {"threshold": 0}), want, index)
        counts.append(len(want["detections"]))
    (layer,) = [la for la in oracle_net.definition.layer if la.type == "DetectionOutput"]
    assert max(counts) == layer.detection_output_param.keep_top_k, counts


@pytest.mark.parametrize("engine", ENGINES[1:])
def test_every_engine_answers_requests_as_opencv_does(engine, local):
    other = SeldonCaffeModel(str(DETECTION), engine)
    other.load()
    try:
        for index in range(12):
            assert_same_detections(
                ask(other, png(index), {"threshold": 0}), ask(local, png(index), {"threshold": 0}), index
            )
    finally:
        other.model.close()


def test_boxes_are_in_the_pixels_of_the_image_sent(local):
    """A scene sent at twice the size is the same scene to the net: the same detections, boxes doubled."""
    image = shapes_data.scene("held-out", 7).image
    double = cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    small, large = ask(local, image), ask(local, shapes_data.png(double))
    assert small["detections"] and [d["label"] for d in small["detections"]] == [
        d["label"] for d in large["detections"]
    ]
    for one, two in zip(small["detections"], large["detections"], strict=True):
        np.testing.assert_allclose(np.asarray(two["box"]), 2 * np.asarray(one["box"]), atol=0.02)
    truth = shapes_data.scene("held-out", 7)
    assert len(small["detections"]) == len(truth.labels)


# -- served ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v1():
    with running_service(DETECTION) as service:
        yield service


@pytest.mark.e2e
def test_seldon_v1_rest_and_grpc_answer_as_in_process(v1, local):
    image = png(3)
    want = ask(local, image)
    assert want["detections"], want
    encoded = base64.b64encode(image).decode()
    assert rest_json(v1.post({"binData": encoded})) == want
    assert rest_json(v1.post({"strData": encoded})) == want
    array = shapes_data.scene("held-out", 3).image
    assert rest_json(v1.post({"data": {"ndarray": array.tolist()}})) == ask(local, array)
    for transport in ("rest", "grpc"):  # no integers in the answer: gRPC's Struct changes nothing
        result = v1.client(transport).microservice(method="predict", bin_data=image)
        assert result.success, result.msg
        assert json_format.MessageToDict(result.response)["jsonData"] == want
    strict = ask(local, image, {"threshold": 0.999})
    assert all(d["score"] >= 0.999 for d in strict["detections"])
    assert rest_json(v1.post({"binData": encoded, "meta": {"tags": {"threshold": 0.999}}})) == strict


@pytest.mark.e2e
def test_seldon_v1_bad_requests_are_400_saying_what_was_expected(v1):
    text = base64.b64encode(b"these bytes are not an image").decode()
    for body, fragment in (
        ({"binData": text}, "not an image"),
        ({"binData": base64.b64encode(png(0)).decode(), "meta": {"tags": {"threshold": 2}}}, "from 0 to 1"),
        ({"data": {"ndarray": [[[1, 2], [3, 4]]]}}, "H x W x 3"),  # two channels
    ):
        response = v1.post(body)
        assert response.status_code == 400, response.text
        assert fragment in response.json()["status"]["info"]


@pytest.mark.e2e
def test_v2_rest_and_grpc_answer_as_in_process(local):
    pytest.importorskip("mlserver", reason="the V2 route needs the mlserver extra")
    import grpc
    import requests
    from mlserver.grpc import dataplane_pb2 as pb
    from mlserver.grpc import dataplane_pb2_grpc
    from mlserver.grpc.converters import ModelInferResponseConverter

    image = png(5)
    want = ask(local, image)
    request = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(image).decode()],
                "parameters": {"content_type": "base64"},
            }
        ]
    }
    over_grpc = pb.ModelInferRequest(model_name="detection")
    tensor = over_grpc.inputs.add(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(image)  # raw bytes over gRPC
    with running_service(DETECTION, "--protocol", "v2") as v2:
        response = requests.post(f"{v2.url}/v2/models/detection/infer", json=request, timeout=120)
        assert response.status_code == 200, response.text
        assert v2_json(response.json()) == want
        with grpc.insecure_channel(f"127.0.0.1:{v2.grpc_port}") as channel:
            answer = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(over_grpc, timeout=120)
        assert v2_json(json.loads(ModelInferResponseConverter.to_types(answer).model_dump_json())) == want


def assert_same_detections(got: dict, want: dict, index: int) -> None:
    """The same labels in the same order, scores within 1e-4, boxes within 1e-4 of 96 px plus rounding."""
    assert [d["label"] for d in got["detections"]] == [d["label"] for d in want["detections"]], index
    for mine, theirs in zip(got["detections"], want["detections"], strict=True):
        assert abs(mine["score"] - theirs["score"]) <= TOLERANCE, (index, mine, theirs)
        np.testing.assert_allclose(mine["box"], theirs["box"], rtol=0, atol=0.02, err_msg=f"scene {index}")


def rest_json(response):
    assert response.status_code == 200, response.text
    return response.json()["jsonData"]


def v2_json(answer: dict) -> dict:
    """The hooks' answer from a V2 response (REST's JSON form): one BYTES output holding JSON."""
    (output,) = answer["outputs"]
    assert output["datatype"] == "BYTES" and (output.get("parameters") or {}).get("content_type") == "json", output
    value = output["data"][0]
    return json.loads(value if isinstance(value, str) else base64.b64decode(value))
