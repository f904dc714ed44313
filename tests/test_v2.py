"""The V2 route: the same model directories over V2 REST and gRPC on real MLServer.

Every V2 service here runs with `seldon_core` made unimportable (a package of that name that
raises on import comes first on PYTHONPATH): the V2 route must need no BSL-licensed package.
Answers are compared with the Seldon v1 service's for the same input, from a real v1 service.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from helpers import EXAMPLES, copy_model
from service import Service, alive, process_tree, running_service, start_service, stop, wait_ready

pytest.importorskip("mlserver", reason="the V2 route needs the mlserver extra")

import grpc
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import dataplane_pb2_grpc
from mlserver.grpc.converters import ModelInferRequestConverter, ModelInferResponseConverter
from mlserver.types import InferenceRequest

from seldon_caffe.pipeline import Pipeline

pytestmark = pytest.mark.e2e  # every test serves a model over V2 (MLServer)

VISION_PNG = (EXAMPLES / "vision" / "sample.png").read_bytes()
QUESTION = "忘记密码了怎么办"


@pytest.fixture(scope="session")
def no_seldon_core(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment in which `import seldon_core` fails."""
    blocker = tmp_path_factory.mktemp("blocker")
    (blocker / "seldon_core").mkdir()
    (blocker / "seldon_core" / "__init__.py").write_text(
        'raise ImportError("seldon_core is blocked on the V2 route")\n'
    )
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))}
    probe = subprocess.run([sys.executable, "-c", "import seldon_core"], env={**os.environ, **env}, capture_output=True)
    assert b"seldon_core is blocked" in probe.stderr, probe.stderr  # the block works, so the tests prove something
    return env


def v2_service(model_dir: Path, env: dict[str, str], *args: str) -> Any:
    return running_service(model_dir, "--protocol", "v2", *args, env=env)


# -- clients --------------------------------------------------------------------------


def infer_rest(service: Service, model: str, request: dict[str, Any]) -> requests.Response:
    return requests.post(f"{service.url}/v2/models/{model}/infer", json=request, timeout=120)


def grpc_stub(service: Service) -> Any:
    return dataplane_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}"))


def infer_grpc(service: Service, model: str, request: dict[str, Any] | Any) -> dict[str, Any]:
    """The same V2 request over gRPC (MLServer's own stubs); the answer in REST's JSON form."""
    if isinstance(request, dict):  # gRPC's BYTES are bytes: JSON's strings go as their UTF-8
        inputs = [
            {**t, "data": [d.encode() for d in t["data"]]} if t["datatype"] == "BYTES" else t for t in request["inputs"]
        ]
        request = ModelInferRequestConverter.from_types(
            InferenceRequest(**{**request, "inputs": inputs}), model_name=model
        )
    answer = grpc_stub(service).ModelInfer(request, timeout=120)
    return json.loads(ModelInferResponseConverter.to_types(answer).model_dump_json())


def output_value(answer: dict[str, Any], name: str | None = None) -> Any:
    """An output of a V2 answer as Python: JSON parsed, text decoded, a tensor as an array."""
    outputs = {output["name"]: output for output in answer["outputs"]}
    output = outputs[name] if name else next(iter(outputs.values()))
    content_type = (output.get("parameters") or {}).get("content_type")
    if output["datatype"] == "BYTES":
        value = output["data"][0]
        value = value if isinstance(value, str) else base64.b64decode(value).decode()
        return json.loads(value) if content_type == "json" else value
    return np.asarray(output["data"], dtype=np.float64).reshape(output["shape"])


def v1_answer(service: Service, message: dict[str, Any]) -> Any:
    response = service.post(message)
    assert response.status_code == 200, response.text
    body = response.json()
    if "jsonData" in body:
        return body["jsonData"]
    return np.asarray(body["data"]["ndarray"], dtype=np.float64)


def bytes_input(name: str, value: str, content_type: str) -> dict[str, Any]:
    return {
        "name": name,
        "datatype": "BYTES",
        "shape": [1],
        "data": [value],
        "parameters": {"content_type": content_type},
    }


def tensor_input(name: str, array: np.ndarray, datatype: str = "FP32") -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": array.ravel().tolist()}


def ranking_request() -> dict[str, Any]:
    return json.loads((EXAMPLES / "ranking" / "samples" / "request.json").read_text())


# -- the examples, over both transports, as v1 answers ----------------------------------


def _cases() -> dict[str, tuple[dict[str, Any], dict[str, Any], Any]]:
    """example -> (v1 message, V2 request, V2 gRPC request or None to send the V2 one)."""
    ranking = ranking_request()
    jobs = ranking.get("jsonData", ranking)
    lenet_x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    vision_grpc = pb.ModelInferRequest(model_name="vision")
    image = vision_grpc.inputs.add(name="image", datatype="BYTES", shape=[1])
    image.contents.bytes_contents.append(VISION_PNG)  # raw bytes over gRPC, no base64
    qa_grpc = pb.ModelInferRequest(model_name="qa_match")
    text = qa_grpc.inputs.add(name="question", datatype="BYTES", shape=[1])
    text.parameters["content_type"].string_param = "str"
    text.contents.bytes_contents.append(QUESTION.encode())
    return {
        "vision": (
            {"binData": base64.b64encode(VISION_PNG).decode()},
            {"inputs": [bytes_input("image", base64.b64encode(VISION_PNG).decode(), "base64")]},
            vision_grpc,
        ),
        "ranking": (
            {"jsonData": jobs, "meta": {"tags": {"top_n": 3}}},
            {"inputs": [bytes_input("request", json.dumps(jobs), "json")], "parameters": {"top_n": 3}},
            None,
        ),
        "qa_match": ({"strData": QUESTION}, {"inputs": [bytes_input("question", QUESTION, "str")]}, qa_grpc),
        "lenet": (
            {"data": {"ndarray": lenet_x.tolist()}},
            {"inputs": [tensor_input("data", lenet_x)]},
            None,
        ),
    }


CASES = _cases()


@pytest.mark.parametrize("example", CASES)
def test_the_examples_answer_over_v2_rest_and_grpc_as_over_v1(
    example: str, no_seldon_core: dict[str, str], tmp_path: Path
) -> None:
    v1_message, v2_request, grpc_request = CASES[example]
    model_dir = copy_model(EXAMPLES / example, tmp_path / example)
    with running_service(model_dir, verbose=False) as v1:
        want = v1_answer(v1, v1_message)
    with v2_service(model_dir, no_seldon_core) as v2:
        response = infer_rest(v2, example, v2_request)
        assert response.status_code == 200, response.text
        over_rest = output_value(response.json())
        over_grpc = output_value(infer_grpc(v2, example, grpc_request or v2_request))
    for got in (over_rest, over_grpc):
        if isinstance(want, np.ndarray):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        else:
            assert got == want


@pytest.fixture(scope="module")
def siamese(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-input, two-output net with the default hooks; weights from `seldon-caffe weights`."""
    model_dir = tmp_path_factory.mktemp("siamese")
    prototxt = model_dir / "deploy.prototxt"
    prototxt.write_text((Path(__file__).parent / "data" / "caffe" / "siamese.prototxt").read_text())
    command = [
        sys.executable,
        "-m",
        "seldon_caffe.cli",
        "weights",
        str(prototxt),
        "-o",
        str(model_dir / "w.caffemodel"),
    ]
    subprocess.run(command, check=True, capture_output=True)
    (model_dir / "model.yaml").write_text(
        "name: siamese\nformat: caffe\nfiles: {prototxt: deploy.prototxt, weights: w.caffemodel}\nruntime: opencv\n"
    )
    return model_dir


def test_a_two_input_net_takes_named_tensors_and_answers_each_output(
    siamese: Path, no_seldon_core: dict[str, str]
) -> None:
    rng = np.random.default_rng(1)
    a, b = rng.random((3, 4), dtype=np.float32), rng.random((3, 4), dtype=np.float32)
    request = {"inputs": [tensor_input("a", a), tensor_input("b", b)]}
    with running_service(siamese, verbose=False) as v1:  # v1 answers several outputs as jsonData
        want = v1_answer(v1, {"jsonData": {"a": a.tolist(), "b": b.tolist()}})
    with v2_service(siamese, no_seldon_core) as v2:
        response = infer_rest(v2, "siamese", request)
        assert response.status_code == 200, response.text
        for answer in (response.json(), infer_grpc(v2, "siamese", request)):
            assert {o["name"] for o in answer["outputs"]} == set(want)
            for name, array in want.items():
                np.testing.assert_allclose(output_value(answer, name), array, rtol=1e-5, atol=1e-7)
        only = infer_rest(v2, "siamese", {**request, "outputs": [{"name": "fb"}]}).json()
        assert [o["name"] for o in only["outputs"]] == ["fb"]
        unknown = infer_rest(v2, "siamese", {**request, "outputs": [{"name": "nope"}]})
        assert unknown.status_code == 400 and "'nope' was requested" in unknown.json()["error"]


# -- errors ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_lenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = copy_model(EXAMPLES / "lenet", tmp_path_factory.mktemp("lenet") / "lenet")
    (model_dir / "hooks.py").unlink()  # the default hooks: the runtime's own checks answer
    return model_dir


@pytest.fixture(scope="module")
def lenet_v1_v2(no_seldon_core: dict[str, str], plain_lenet: Path) -> Iterator[tuple]:
    # One after the other: the second reads the engine `runtime: auto` chose for the first.
    with running_service(plain_lenet, verbose=False) as v1, v2_service(plain_lenet, no_seldon_core) as v2:
        yield v1, v2


LENET_BAD = {
    "wrong-shape": (np.zeros((1, 1, 28, 27), np.float32), "FP32", "data"),
    "wrong-datatype": (np.zeros((1, 1, 28, 28), bool), "BOOL", "data"),
    "wrong-name": (np.zeros((1, 1, 28, 28), np.float32), "FP32", "pixels"),
}


@pytest.mark.parametrize("case", LENET_BAD)
def test_a_bad_tensor_is_a_400_and_invalid_argument_with_the_v1_message(lenet_v1_v2: tuple, case: str) -> None:
    v1, v2 = lenet_v1_v2
    array, datatype, name = LENET_BAD[case]
    npz = _npz(**{name: array})
    v1_response = v1.post({"binData": base64.b64encode(npz).decode()})
    assert v1_response.status_code == 400
    message = v1_response.json()["status"]["info"]
    request = {"inputs": [tensor_input(name, array, datatype)]}
    response = infer_rest(v2, "lenet", request)
    assert (response.status_code, response.json()) == (400, {"error": message})
    with pytest.raises(grpc.RpcError) as error:
        infer_grpc(v2, "lenet", request)
    assert (error.value.code(), error.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    good = {"inputs": [tensor_input("data", np.zeros((1, 1, 28, 28), np.float32))]}
    assert infer_rest(v2, "lenet", good).status_code == 200  # still serving


def _npz(**arrays: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_raw_input_contents_are_read_as_the_tensor_they_describe(lenet_v1_v2: tuple) -> None:
    v1, v2 = lenet_v1_v2
    x = np.random.default_rng(3).random((2, 1, 28, 28), dtype=np.float32)
    want = v1_answer(v1, {"data": {"ndarray": x.tolist()}})
    request = pb.ModelInferRequest(model_name="lenet")
    request.inputs.add(name="data", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    answer = grpc_stub(v2).ModelInfer(request, timeout=60)
    # a raw request gets a raw answer (MLServer's rule)
    got = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(list(answer.outputs[0].shape))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]  # one float short
    with pytest.raises(grpc.RpcError) as error:
        grpc_stub(v2).ModelInfer(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "holds 6268 bytes; FP32 of shape [2, 1, 28, 28] needs 6272" in error.value.details()


MALFORMED = {
    "data-does-not-fill-the-shape": (
        {"name": "data", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [1.0]},
        "shape",
    ),
    "negative-dimension": ({"name": "data", "datatype": "FP32", "shape": [-1], "data": [1.0]}, "negative"),
    "text-in-a-number-tensor": ({"name": "data", "datatype": "FP32", "shape": [1], "data": ["x"]}, "FP32"),
    "not-base64": (bytes_input("data", "%%%", "base64"), "not base64"),
    "not-json": (bytes_input("data", "{not json", "json"), "not JSON"),
    "not-a-npy": (bytes_input("data", base64.b64encode(b"hello").decode(), "base64"), ".npy"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_inputs_are_400_and_invalid_argument_with_what_was_expected(lenet_v1_v2: tuple, case: str) -> None:
    _, v2 = lenet_v1_v2
    tensor, expected = MALFORMED[case]
    response = infer_rest(v2, "lenet", {"inputs": [tensor]})
    assert response.status_code == 400, response.text
    assert expected in response.json()["error"]
    if case == "text-in-a-number-tensor":
        return  # gRPC's typed contents (fp32_contents) cannot carry it
    with pytest.raises(grpc.RpcError) as error:
        infer_grpc(v2, "lenet", {"inputs": [tensor]})
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in error.value.details()


def test_a_body_that_is_not_a_v2_request_is_a_4xx_with_json(lenet_v1_v2: tuple) -> None:
    _, v2 = lenet_v1_v2
    for body in (b"{", b"[]", b'{"inputs": 3}'):
        response = requests.post(f"{v2.url}/v2/models/lenet/infer", data=body, timeout=30)
        assert 400 <= response.status_code < 500, response.text
        response.json()


@pytest.fixture(scope="module")
def vision_v2(no_seldon_core: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    model_dir = copy_model(EXAMPLES / "vision", tmp_path_factory.mktemp("vision") / "vision")
    hooks = (model_dir / "hooks.py").read_text()
    hooks += (
        "\n\n_original_postprocess = postprocess\n\n\n"
        "def postprocess(outputs, ctx):\n"
        "    if ctx.tags.get('boom'):\n"
        "        raise ValueError('boom asked for')\n"
        "    if ctx.tags.get('sleep'):\n"
        "        import time\n"
        "        time.sleep(float(ctx.tags['sleep']))\n"
        "    return _original_postprocess(outputs, ctx)\n"
    )
    (model_dir / "hooks.py").write_text(hooks)
    with v2_service(model_dir, no_seldon_core) as service:
        yield service


def vision_request(**parameters: Any) -> dict[str, Any]:
    image = bytes_input("image", base64.b64encode(VISION_PNG).decode(), "base64")
    return {"inputs": [image], "parameters": parameters}


def test_an_undecodable_image_is_a_400_over_both_transports(vision_v2: Service) -> None:
    request = {"inputs": [bytes_input("image", base64.b64encode(b"not an image").decode(), "base64")]}
    response = infer_rest(vision_v2, "vision", request)
    assert response.status_code == 400 and "not an image" in response.json()["error"]
    with pytest.raises(grpc.RpcError) as error:
        infer_grpc(vision_v2, "vision", request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not an image" in error.value.details()


def test_a_hook_that_raises_is_a_500_naming_it_with_the_traceback_logged(vision_v2: Service) -> None:
    response = infer_rest(vision_v2, "vision", vision_request(boom=True))
    assert response.status_code == 500
    assert "hook postprocess in hooks.py raised ValueError: boom asked for" in response.json()["error"]
    with pytest.raises(grpc.RpcError) as error:
        infer_grpc(vision_v2, "vision", vision_request(boom=True))
    assert error.value.code() == grpc.StatusCode.INTERNAL and "boom asked for" in error.value.details()
    log = vision_v2.log()
    assert "Traceback (most recent call last)" in log and "ValueError: boom asked for" in log
    assert infer_rest(vision_v2, "vision", vision_request()).status_code == 200


def test_one_slow_request_does_not_stall_the_others(vision_v2: Service) -> None:
    slow = threading.Thread(target=infer_rest, args=(vision_v2, "vision", vision_request(sleep=3)))
    slow.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert infer_rest(vision_v2, "vision", vision_request()).status_code == 200
    quick = time.monotonic() - started
    slow.join()
    assert quick < 2.0, f"a quick request waited {quick:.1f} s behind a slow one"


def test_metadata_matches_the_signature_and_stage_metrics_are_exported(lenet_v1_v2: tuple, plain_lenet: Path) -> None:
    _, v2 = lenet_v1_v2
    pipeline = Pipeline.load(plain_lenet)  # the served directory, where `runtime: auto`'s choice is cached
    want = pipeline.metadata()
    pipeline.close()
    got = requests.get(f"{v2.url}/v2/models/lenet", timeout=30).json()
    assert (got["inputs"], got["outputs"], got["platform"]) == (want["inputs"], want["outputs"], want["platform"])
    assert got["inputs"] == [{"name": "data", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    good = {"inputs": [tensor_input("data", np.zeros((1, 1, 28, 28), np.float32))]}
    assert infer_rest(v2, "lenet", good).status_code == 200
    metrics = requests.get(f"http://127.0.0.1:{v2.metrics_port}/metrics", timeout=30).text
    for stage in ("preprocess", "run_model"):
        assert f'seldon_caffe_{stage}_seconds_count{{model_name="lenet"' in metrics


# -- the process ----------------------------------------------------------------------


READY_PATHS = ("health/ready", "models/lenet/ready")


def test_ready_only_once_setup_finished(no_seldon_core: dict[str, str], tmp_path: Path) -> None:
    hooks = "import time\n\n\ndef setup(ctx):\n    time.sleep(4)\n"
    model_dir = copy_model(EXAMPLES / "lenet", tmp_path / "lenet", hooks=hooks)
    service = start_service(model_dir, "--protocol", "v2", env=no_seldon_core)
    try:
        seen: list[tuple[int, int]] = []  # (server ready, model ready)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (200, 200) not in seen:
            try:
                seen.append(
                    tuple(requests.get(f"{service.url}/v2/{path}", timeout=5).status_code for path in READY_PATHS)
                )
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        assert seen and seen[-1] == (200, 200), service.log()
        # Each endpoint on its own: not ready at first, then ready for good. (The two GETs of a
        # poll are not one instant: load() may finish between them.)
        for path, statuses in zip(READY_PATHS, zip(*seen, strict=True), strict=True):
            turned = statuses.index(200)  # the first 200
            assert turned > 0, f"{path} ready before setup() finished: {seen}"
            assert set(statuses[turned:]) == {200}, f"{path} not ready again after it was: {seen}"
    finally:
        stop(service)


def test_sigterm_drains_in_flight_requests_and_stops_every_process(
    no_seldon_core: dict[str, str], tmp_path: Path
) -> None:
    source = copy_model(EXAMPLES / "vision", tmp_path / "vision")
    (source / "hooks.py").write_text(
        (source / "hooks.py").read_text() + "\n\n_pp = postprocess\n\n\ndef postprocess(outputs, ctx):\n"
        "    import time\n    time.sleep(float(ctx.tags.get('sleep', 0)))\n    return _pp(outputs, ctx)\n"
    )
    service = start_service(source, "--protocol", "v2", env=no_seldon_core)
    try:
        wait_ready(service, 120)
        tree = process_tree(service.process.pid)
        results: list[int] = []
        slow = threading.Thread(
            target=lambda: results.append(infer_rest(service, "vision", vision_request(sleep=2)).status_code)
        )
        slow.start()
        time.sleep(0.5)
        started = time.monotonic()
        os.kill(service.process.pid, signal.SIGTERM)
        code = service.process.wait(timeout=15)
        slow.join()
        assert (code, results) == (0, [200]), service.log()
        assert time.monotonic() - started < 10
        assert not [pid for pid in tree if alive(pid)], service.log()
        assert "stopped on SIGTERM" in service.log()
    finally:
        stop(service)


def test_start_up_errors_are_one_line(no_seldon_core: dict[str, str], tmp_path: Path) -> None:
    broken = copy_model(EXAMPLES / "lenet", tmp_path / "broken")
    (broken / "weights.caffemodel").write_bytes(b"not a caffemodel")
    serve = [sys.executable, "-m", "seldon_caffe.cli", "serve", "--protocol", "v2"]
    env = {**os.environ, **no_seldon_core}
    result = subprocess.run([*serve, str(broken)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "seldon-caffe: error:" in result.stderr, result.stderr
    with running_service(EXAMPLES / "lenet", "--protocol", "v2", env=no_seldon_core) as running:
        taken = [*serve, str(EXAMPLES / "lenet"), "--http-port", str(running.http_port)]
        result = subprocess.run(taken, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert f"cannot serve REST on port {running.http_port}: it is in use" in result.stderr


def test_the_model_directory_is_left_as_it_was(no_seldon_core: dict[str, str], tmp_path: Path) -> None:
    model_dir = copy_model(EXAMPLES / "lenet", tmp_path / "lenet")
    (model_dir / "model-settings.json").write_text(json.dumps({"name": "digits", "parameters": {"version": "7"}}))
    before = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file() and ".cache" not in p.parts}
    with v2_service(model_dir, no_seldon_core) as v2:
        # the directory's own model-settings.json is the starting point: its name and version
        metadata = requests.get(f"{v2.url}/v2/models/digits/versions/7", timeout=30)
        assert metadata.status_code == 200, metadata.text
    after = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file() and ".cache" not in p.parts}
    assert after == before
