"""The trained examples (examples/vision, ranking, qa_match), end to end.

Each example is served once per module by the real microservice; what comes back over
REST and gRPC (SeldonClient, and the raw stub where a request tag is needed) must equal
the same request run through the example's hooks and model in this process. Each gets
one bad request that must come back as a clear 400 (an error status over gRPC), and its
accuracy is measured again with the example's own evaluate.py: the figures its README
quotes must be the ones the command prints. Real Caffe, where present, checks the weights.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from helpers import EXAMPLES
from PIL import Image
from seldon_core.proto import prediction_pb2, prediction_pb2_grpc
from service import running_service

from caffe_oracle import reference
from seldon_caffe.hooks import request_context
from seldon_caffe.model import SeldonCaffeModel

sys.path.insert(0, str(EXAMPLES))  # the examples' shared helpers (examples/_train)
from _train import load_script

VISION, RANKING, QA = EXAMPLES / "vision", EXAMPLES / "ranking", EXAMPLES / "qa_match"
DIGITS = {"sample.png": 7, "samples/digit_4.jpg": 4, "samples/digit_0.png": 0, "samples/digit_9.png": 9}
QUESTIONS = {"我忘记密码了，登不进去怎么办": 2, "房东一直不退押金，平台能管吗": 23}


@pytest.fixture(scope="module")
def vision():
    with running_service(VISION) as service:
        yield service


@pytest.fixture(scope="module")
def ranking():
    with running_service(RANKING) as service:
        yield service


@pytest.fixture(scope="module")
def qa():
    with running_service(QA) as service:
        yield service


@pytest.fixture(scope="module")
def local():
    """model dir -> the same SeldonCaffeModel the service runs, loaded in this process."""
    loaded: dict[Path, SeldonCaffeModel] = {}

    def get(model_dir: Path) -> SeldonCaffeModel:
        if model_dir not in loaded:
            loaded[model_dir] = SeldonCaffeModel(str(model_dir))
            loaded[model_dir].load()
        return loaded[model_dir]

    yield get
    for served in loaded.values():
        served.model.close()


def in_process(local, model_dir: Path, payload: Any, tags: dict | None = None) -> Any:
    return local(model_dir).predict(payload, names=[], meta={"tags": tags} if tags else {})


def rest_json(response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()["jsonData"]


def client_json(service, transport: str, **payload: Any) -> Any:
    result = service.client(transport).microservice(method="predict", **payload)
    assert result.success, result.msg
    return json_format.MessageToDict(result.response)["jsonData"]


def grpc_json(service, message: prediction_pb2.SeldonMessage, tags: dict) -> Any:
    for key, value in tags.items():
        message.meta.tags[key].number_value = value
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        reply = prediction_pb2_grpc.ModelStub(channel).Predict(message, timeout=60)
    return json_format.MessageToDict(reply)["jsonData"]


def assert_400(service, body: dict, *fragments: str) -> None:
    response = service.post(body)
    assert response.status_code == 400, response.text
    for fragment in fragments:
        assert fragment in response.json()["status"]["info"]


def assert_grpc_error(service, *fragments: str, **payload: Any) -> None:
    result = service.client("grpc").microservice(method="predict", **payload)
    assert not result.success
    for fragment in fragments:
        assert fragment in result.msg, result.msg


def assert_readme_quotes(model_dir: Path, lines: list[str]) -> None:
    readme = (model_dir / "README.md").read_text(encoding="utf-8")
    for line in lines:
        assert line in readme, f"README.md no longer matches evaluate.py: {line!r} is missing"


# -- vision ----------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("sample", DIGITS)
def test_vision_rest(vision, local, sample):
    image = (VISION / sample).read_bytes()
    want = in_process(local, VISION, image)
    assert want["predictions"][0]["label"] == DIGITS[sample]
    assert len(want["predictions"]) == 3
    encoded = base64.b64encode(image).decode()
    assert rest_json(vision.post({"binData": encoded})) == want
    assert rest_json(vision.post({"strData": encoded})) == want


@pytest.mark.e2e
@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_vision_seldon_client(vision, local, transport):
    image = (VISION / "samples" / "digit_4.jpg").read_bytes()
    want = in_process(local, VISION, image)
    assert client_json(vision, transport, bin_data=image) == want
    assert client_json(vision, transport, str_data=base64.b64encode(image).decode()) == want


@pytest.mark.e2e
def test_vision_top_k_tag(vision, local):
    image = (VISION / "sample.png").read_bytes()
    want = in_process(local, VISION, image, {"k": 5})
    assert len(want["predictions"]) == 5
    body = json.loads((VISION / "samples" / "request.json").read_text())
    body["meta"]["tags"]["k"] = 5
    assert rest_json(vision.post(body)) == want
    assert grpc_json(vision, prediction_pb2.SeldonMessage(binData=image), {"k": 5}) == want
    assert_400(vision, {**body, "meta": {"tags": {"k": 11}}}, "tag k must be a whole number from 1 to 10")


@pytest.mark.e2e
def test_vision_rejects_a_non_image(vision):
    text = (VISION / "samples" / "not_an_image.txt").read_bytes()
    assert_400(vision, {"binData": base64.b64encode(text).decode()}, "not an image", "PNG or JPEG")
    assert_400(vision, {"strData": "not base64!"}, "strData must be a base64-encoded PNG or JPEG")
    assert_grpc_error(vision, "not an image", bin_data=text)
    assert vision.post({"binData": base64.b64encode((VISION / "sample.png").read_bytes()).decode()}).ok


@pytest.mark.e2e
def test_vision_rejects_a_decompression_bomb(vision):
    """A 10000x10000 PNG of one colour is ~100 KB: the header alone gets it a 400, over REST and gRPC."""
    buffer = io.BytesIO()
    Image.new("L", (10000, 10000), 255).save(buffer, "PNG")
    bomb = buffer.getvalue()
    assert_400(vision, {"binData": base64.b64encode(bomb).decode()}, "10000x10000", "4096x4096")
    assert_grpc_error(vision, "10000x10000", "4096x4096", bin_data=bomb)
    assert vision.post({"binData": base64.b64encode((VISION / "sample.png").read_bytes()).decode()}).ok


def test_vision_accuracy():
    evaluate = load_script(VISION / "evaluate.py")
    result = evaluate.evaluate()
    assert result["all"] >= 0.97, result
    assert_readme_quotes(VISION, evaluate.report(result))


# -- ranking ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_ranking_rest_and_grpc(ranking, local):
    body = json.loads((RANKING / "samples" / "request.json").read_text())
    request, tags = body["jsonData"], body["meta"]["tags"]
    want = in_process(local, RANKING, request, tags)
    scores = [r["score"] for r in want["ranked"]]
    assert len(scores) == tags["top_n"] and scores == sorted(scores, reverse=True)
    assert rest_json(ranking.post(body)) == want
    message = json_format.ParseDict({"jsonData": request}, prediction_pb2.SeldonMessage())
    assert grpc_json(ranking, message, tags) == want
    everything = in_process(local, RANKING, request)
    assert [r["index"] for r in everything["ranked"]][: tags["top_n"]] == [r["index"] for r in want["ranked"]]
    for transport in ("rest", "grpc"):
        assert client_json(ranking, transport, json_data=request) == everything


@pytest.mark.e2e
def test_ranking_rejects_a_candidate_missing_a_feature(ranking):
    body = json.loads((RANKING / "samples" / "missing_feature.json").read_text())
    item_id = body["jsonData"]["candidates"][2]["item_id"]
    message = f"candidate 2 (item_id {item_id!r}) is missing feature 'price'"
    assert_400(ranking, body, message)
    assert_grpc_error(ranking, message, json_data=body["jsonData"])
    user_less = {"user": {"age": 30}, "candidates": body["jsonData"]["candidates"]}
    assert_400(ranking, {"jsonData": user_less}, "user is missing feature 'gender'")


def test_ranking_auc():
    evaluate = load_script(RANKING / "evaluate.py")
    result = evaluate.evaluate()
    assert result["model auc"] >= 0.75, result
    assert result["random ndcg@10"] < result["model ndcg@10"] < result["oracle ndcg@10"]
    assert_readme_quotes(RANKING, evaluate.report(result))


# -- qa_match --------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("question", QUESTIONS)
def test_qa_rest_and_grpc(qa, local, question):
    want = in_process(local, QA, question)
    assert [m["id"] for m in want["matches"]][0] == QUESTIONS[question]
    assert len(want["matches"]) == 3
    assert rest_json(qa.post({"strData": question})) == want
    assert rest_json(qa.post({"jsonData": {"question": question}})) == want
    for transport in ("rest", "grpc"):
        assert client_json(qa, transport, str_data=question) == want
        assert client_json(qa, transport, json_data={"question": question}) == want


@pytest.mark.e2e
def test_qa_rejects_an_empty_question(qa):
    assert_400(qa, json.loads((QA / "samples" / "empty_question.json").read_text()), "the question is empty")
    assert_400(qa, {"jsonData": {"question": ""}}, "the question is empty")
    assert_400(qa, {"jsonData": {"text": "忘记密码"}}, 'jsonData {"question": "..."}')
    assert_grpc_error(qa, "the question is empty", str_data="  ")


def test_qa_accuracy():
    evaluate = load_script(QA / "evaluate.py")
    result = evaluate.evaluate()
    assert result["model top-1"] >= 0.85 and result["model top-3"] >= 0.95, result
    assert_readme_quotes(QA, evaluate.report(result))


# -- the committed weights, checked against real Caffe -----------------------------------


@pytest.mark.reference
def test_weights_run_the_same_in_real_caffe(local):
    """What our runtime computes from each committed caffemodel, real Caffe computes too."""
    if reference.unavailable_reason():
        pytest.skip(reference.unavailable_reason())
    requests = {
        VISION: (VISION / "samples" / "digit_4.jpg").read_bytes(),
        RANKING: json.loads((RANKING / "samples" / "request.json").read_text())["jsonData"],
        QA: next(iter(QUESTIONS)),
    }
    jobs, ours = [], []
    for model_dir, payload in requests.items():
        served = local(model_dir)
        inputs = served.hooks.preprocess(payload, request_context(served.context, payload, {}, []))
        feed = served.model.check_inputs(inputs)
        ours.append(served.model.run(feed))
        config = served.context.config
        jobs.append(reference.forward_job(config.files["prototxt"], config.files["weights"], feed))
    for mine, theirs in zip(ours, reference.run_jobs(jobs), strict=True):
        for name, value in mine.items():
            np.testing.assert_allclose(value, theirs["outputs"][name], rtol=1e-4, atol=1e-5)
