"""Bad requests get 400 saying what was expected, a failing hook 500 naming it, and a model
that cannot load stops start-up with one clear line. The service keeps serving throughout."""

from __future__ import annotations

import base64
import subprocess
import sys

import grpc
import numpy as np
import pytest
from helpers import REPO, copy_model
from seldon_core.proto import prediction_pb2, prediction_pb2_grpc
from seldon_core.utils import array_to_grpc_datadef
from service import running_service

pytestmark = pytest.mark.e2e  # every test serves a model, or tries to (tests/service.py)

HOOKS = (REPO / "tests" / "data" / "e2e_hooks.py").read_text()
GOOD = {"data": {"ndarray": np.zeros((1, 1, 28, 28)).tolist()}}


@pytest.fixture(scope="module")
def plain(tmp_path_factory, lenet_example):
    target = copy_model(lenet_example, tmp_path_factory.mktemp("errors") / "plain")
    (target / "hooks.py").unlink()
    with running_service(target) as service:
        yield service


@pytest.fixture(scope="module")
def hooked(tmp_path_factory, lenet_example):
    target = copy_model(lenet_example, tmp_path_factory.mktemp("errors") / "hooked", hooks=HOOKS)
    with running_service(target) as service:
        yield service


def assert_rejected(service, payload, status, *fragments):
    response = service.post(payload, headers={"Content-Type": "application/json"} if isinstance(payload, str) else {})
    assert response.status_code == status, response.text
    info = response.json()["status"]["info"]
    for fragment in fragments:
        assert fragment in info, info
    # ...and the next good request is answered
    assert service.post(GOOD).status_code == 200


@pytest.mark.parametrize(
    "payload, fragments",
    [
        ({"data": {"ndarray": np.zeros((1, 3, 28, 28)).tolist()}}, ["shape [1, 3, 28, 28]", "float32[N, 1, 28, 28]"]),
        ({"data": {"ndarray": [[["a"] * 28] * 28]}}, ["dtype", "expected data: float32[N, 1, 28, 28]"]),
        ({"jsonData": {"pixels": [[1.0]]}}, ["unknown input 'pixels'", "data: float32"]),
        ({"binData": base64.b64encode(b"not a numpy file").decode()}, ["not a .npy or .npz file"]),
        ({"strData": "hello"}, ["got strData", "ndarray"]),
        ({"data": {"ndarray": [[1, 2], [3]]}}, ["could not be decoded", "rectangular array"]),
    ],
    ids=["shape", "dtype", "unknown-input", "undecodable-bytes", "strdata-without-hook", "ragged"],
)
def test_bad_requests_get_400(plain, payload, fragments):
    assert_rejected(plain, payload, 400, *fragments)


def test_malformed_json_gets_400(plain):
    assert_rejected(plain, '{"data": {"ndarray": [1, 2', 400, "JSON")


def test_hook_error_gets_500_naming_the_hook(hooked):
    assert_rejected(hooked, {**GOOD, "meta": {"tags": {"fail": True}}}, 500, "hook run_model", "RuntimeError")


def test_hook_bad_request_gets_400(hooked):
    assert_rejected(hooked, {"strData": "[not json"}, 400, "strData must be a JSON array")


def test_grpc_error_status_carries_the_message(plain):
    message = prediction_pb2.SeldonMessage(data=array_to_grpc_datadef("tensor", np.zeros((1, 2, 28, 28))))
    with grpc.insecure_channel(f"127.0.0.1:{plain.grpc_port}") as channel:
        stub = prediction_pb2_grpc.ModelStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(message, timeout=60)
        assert caught.value.code() != grpc.StatusCode.OK
        assert "expected data: float32[N, 1, 28, 28]" in caught.value.details()
        good = prediction_pb2.SeldonMessage(data=array_to_grpc_datadef("tensor", np.zeros((1, 1, 28, 28))))
        assert stub.Predict(good, timeout=60).data.tensor.shape == [1, 10]


# -- start-up failures ----------------------------------------------------------------------


def serve_fails(model_dir):
    """`seldon-caffe serve` must exit non-zero at once with one clear line on stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "seldon_caffe.cli", "serve", str(model_dir), "--http-port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seldon-caffe: error: "), result.stderr
    return lines[0]


def test_missing_weights(tmp_path, lenet_example):
    model_dir = copy_model(lenet_example, tmp_path / "m")
    (model_dir / "weights.caffemodel").unlink()
    line = serve_fails(model_dir)
    assert "files.weights" in line and "weights.caffemodel does not exist" in line


def test_truncated_caffemodel(tmp_path, lenet_example):
    model_dir = copy_model(lenet_example, tmp_path / "m")
    weights = model_dir / "weights.caffemodel"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = serve_fails(model_dir)
    assert "weights.caffemodel" in line and "truncated" in line


def test_prototxt_syntax_error_names_the_line(tmp_path, lenet_example):
    model_dir = copy_model(lenet_example, tmp_path / "m")
    prototxt = model_dir / "deploy.prototxt"
    lines = prototxt.read_text().splitlines()
    lines[12] = lines[12].replace("top:", "top")  # line 13: `top "conv1"`
    prototxt.write_text("\n".join(lines))
    line = serve_fails(model_dir)
    assert "deploy.prototxt:13" in line


def test_unknown_layer_type(tmp_path, lenet_example):
    model_dir = copy_model(lenet_example, tmp_path / "m")
    prototxt = model_dir / "deploy.prototxt"
    prototxt.write_text(prototxt.read_text().replace('type: "ReLU"', 'type: "FancyReLU"'))
    line = serve_fails(model_dir)
    assert "relu1" in line and "FancyReLU" in line


def test_bad_model_yaml(tmp_path, lenet_example):
    model_dir = copy_model(lenet_example, tmp_path / "m", yaml="format: caffe\nruntime: tensorrtx\nfiles: {}\n")
    line = serve_fails(model_dir)
    assert "model.yaml" in line and "runtime" in line and "allowed" in line
