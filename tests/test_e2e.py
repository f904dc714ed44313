"""End to end: the real microservice on free ports, called over REST and gRPC.

What comes back must equal `model.run` on the same input in this process. Runs in both
Seldon lanes (1.19 and 1.17.1, see the Makefile).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json

import grpc
import numpy as np
import pytest
from helpers import REPO, copy_model
from seldon_core.proto import prediction_pb2, prediction_pb2_grpc
from seldon_core.utils import array_to_grpc_datadef, grpc_datadef_to_array
from service import running_service

from seldon_caffe.config import load_config
from seldon_caffe.runtimes import load_runtime, resolve_runtime

pytestmark = pytest.mark.e2e  # every test talks to `seldon-caffe serve` (tests/service.py)

HOOKS = (REPO / "tests" / "data" / "e2e_hooks.py").read_text()
RNG = np.random.default_rng(7)
IMAGES = RNG.random((2, 1, 28, 28), dtype=np.float32)


@pytest.fixture(scope="module")
def hooked_dir(tmp_path_factory, lenet_example):
    return copy_model(lenet_example, tmp_path_factory.mktemp("e2e") / "lenet", hooks=HOOKS)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory, lenet_example):
    target = copy_model(lenet_example, tmp_path_factory.mktemp("e2e") / "plain")
    (target / "hooks.py").unlink()
    return target


@pytest.fixture(scope="module")
def model(hooked_dir):
    with load_runtime(load_config(hooked_dir)) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def hooked(hooked_dir):
    with running_service(hooked_dir) as service:
        yield service


@pytest.fixture(scope="module")
def plain(plain_dir):
    with running_service(plain_dir) as service:
        yield service


def expected(model, images=IMAGES):
    return model.run(images)["prob"]


def ndarray_of(response):
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["data"]["ndarray"], dtype=np.float32)


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def rest_array(body):
    """The array in a REST answer, whichever form Seldon chose for it."""
    if "jsonData" in body:
        return body["jsonData"]
    data = body["data"]
    if "ndarray" in data:
        return data["ndarray"]
    return np.reshape(data["tensor"]["values"], data["tensor"]["shape"])


def grpc_predict(service, message):
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        return prediction_pb2_grpc.ModelStub(channel).Predict(message, timeout=60)


# -- every payload kind reaches the hooks and answers like model.run ------------------


@pytest.mark.parametrize("kind", ["ndarray", "tensor"])
def test_rest_arrays(hooked, model, kind):
    if kind == "ndarray":
        data = {"ndarray": IMAGES.tolist()}
    else:
        data = {"tensor": {"shape": list(IMAGES.shape), "values": IMAGES.ravel().tolist()}}
    response = hooked.post({"data": data})
    assert response.status_code == 200, response.text
    body = response.json()["data"]
    got = body["ndarray"] if kind == "ndarray" else np.reshape(body["tensor"]["values"], body["tensor"]["shape"])
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), expected(model), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "message",
    [
        {"binData": base64.b64encode(npy_bytes(IMAGES)).decode()},
        {"strData": json.dumps(IMAGES.tolist())},
        {"jsonData": {"image": IMAGES.tolist()}},
    ],
    ids=["binData", "strData", "jsonData"],
)
def test_rest_other_payloads(hooked, model, message):
    response = hooked.post(message)
    assert response.status_code == 200, response.text
    result = rest_array(response.json())
    np.testing.assert_allclose(np.asarray(result, dtype=np.float32), expected(model), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("transport", ["rest", "grpc"])
@pytest.mark.parametrize("payload_type", ["ndarray", "tensor", "tftensor"])
def test_seldon_client(hooked, model, transport, payload_type):
    if payload_type == "tftensor" and importlib.util.find_spec("tensorflow") is None:
        # Seldon encodes tftensor with TensorFlow; TF needs protobuf>=5, seldon-core 1.17.1 pins <4.
        pytest.skip("tftensor needs tensorflow, which cannot be installed beside seldon-core 1.17.1")
    client = hooked.client(transport)
    result = client.microservice(data=IMAGES, method="predict", payload_type=payload_type)
    assert result.success, result.msg
    got = grpc_datadef_to_array(result.response.data)  # both transports answer with the proto
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), expected(model), rtol=1e-5, atol=1e-7)


def test_grpc_bindata(hooked, model):
    reply = grpc_predict(hooked, prediction_pb2.SeldonMessage(binData=npy_bytes(IMAGES)))
    np.testing.assert_allclose(grpc_datadef_to_array(reply.data), expected(model), rtol=1e-5, atol=1e-7)


# -- the custom-invoke part of the contract --------------------------------------------


def test_run_model_twice(hooked, model):
    response = hooked.post({"data": {"ndarray": IMAGES.tolist()}, "meta": {"tags": {"twice": True}}})
    mirrored = model.run(IMAGES[..., ::-1].copy())["prob"]
    want = (expected(model) + mirrored) / 2
    np.testing.assert_allclose(ndarray_of(response), want, rtol=1e-5, atol=1e-7)
    assert not np.allclose(want, expected(model), atol=1e-4), "the second run must change the answer"


def scaled_reference(model, scale):
    weights = model.get_weights("ip2")
    model.set_weights("ip2", [w * scale for w in weights])
    try:
        return expected(model)
    finally:
        model.set_weights("ip2", weights)


def test_weights_from_request_tag_rest(hooked, model):
    response = hooked.post({"data": {"ndarray": IMAGES.tolist()}, "meta": {"tags": {"ip2_scale": 3.0}}})
    want = scaled_reference(model, 3.0)
    np.testing.assert_allclose(ndarray_of(response), want, rtol=1e-5, atol=1e-7)
    assert not np.allclose(want, expected(model), atol=1e-4), "scaling ip2 must change the answer"
    # the hook restores the weights: the next plain request answers as before
    plain = hooked.post({"data": {"ndarray": IMAGES.tolist()}})
    np.testing.assert_allclose(ndarray_of(plain), expected(model), rtol=1e-5, atol=1e-7)


def test_weights_from_request_tag_grpc(hooked, model):
    message = prediction_pb2.SeldonMessage(data=array_to_grpc_datadef("tensor", IMAGES))
    message.meta.tags["ip2_scale"].number_value = 0.5
    reply = grpc_predict(hooked, message)
    np.testing.assert_allclose(grpc_datadef_to_array(reply.data), scaled_reference(model, 0.5), rtol=1e-5, atol=1e-7)


def test_dl_inference_style_hooks(tmp_path, lenet_example, model):
    hooks = (REPO / "tests" / "data" / "dl_inference_hooks.py").read_text()
    model_dir = copy_model(lenet_example, tmp_path / "legacy", hooks=hooks)
    pixels = (IMAGES * 255).round()
    with running_service(model_dir) as service:
        response = service.post({"data": {"ndarray": pixels.tolist()}})
    assert response.status_code == 200, response.text
    answer = response.json()["jsonData"]
    assert answer["argmax"] == np.argmax(model.run(pixels / 255.0)["prob"], axis=1).tolist()
    assert answer["runtime"] == "auto"


# -- the service around the model ------------------------------------------------------


def test_metadata_tags_and_metrics(plain, plain_dir, model):
    meta = requests_get(plain, "/api/v1.0/metadata")
    assert meta["inputs"] == [{"name": "data", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"][0]["name"] == "prob"
    response = plain.post({"data": {"ndarray": IMAGES.tolist()}})
    np.testing.assert_allclose(ndarray_of(response), expected(model), rtol=1e-5, atol=1e-7)
    assert response.json()["meta"]["tags"]["runtime"] == resolve_runtime(load_config(plain_dir))  # auto's choice
    import requests

    prometheus = requests.get(f"http://127.0.0.1:{plain.metrics_port}/metrics", timeout=10).text
    for stage in ("preprocess", "run_model", "postprocess"):
        assert f"seldon_caffe_{stage}_seconds" in prometheus


def requests_get(service, path):
    import requests

    response = requests.get(service.url + path, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_default_hooks_take_npz_for_named_inputs(plain, model):
    buffer = io.BytesIO()
    np.savez(buffer, data=IMAGES)
    response = plain.post({"binData": base64.b64encode(buffer.getvalue()).decode()})
    assert response.status_code == 200, response.text
    got = np.load(io.BytesIO(base64.b64decode(response.json()["binData"])))
    np.testing.assert_allclose(got, expected(model), rtol=1e-5, atol=1e-7)
