"""Fuzz the real microservice with requests generated from Seldon's own OpenAPI document.

schemathesis turns `seldon_core/openapi/seldon.json` (shipped inside seldon-core) into
requests, schema-conforming and schema-violating alike, and sends them to three real
services: the vision and ranking examples (their hooks) and LeNet with the default hooks.
Whatever a client sends, the service must answer without a 5xx and with valid JSON: a 4xx
that says what was wrong is fine, a 500 or a NaN token in the body is a bug. The send loop
and these checks are shared with test_v2_fuzz.py (the same over V2): tests/fuzzing.py.

Seldon's document describes the internal form endpoints (`/predict` and friends, a `json`
form field) but not the JSON API every client uses, `POST /api/v1.0/predictions`, and it
misspells `ndarray`. The document is extended in memory (the installed file stays as it
is) so the generated requests reach the decoding paths real clients use.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fuzzing import cases, fuzz
from helpers import EXAMPLES, copy_model
from service import Service, running_service, strict_json

pytestmark = pytest.mark.e2e  # the fuzzed requests go to served models (tests/service.py)

PREDICTIONS = "/api/v1.0/predictions"
# Cases per operation: the JSON predictions endpoint is what clients use, so most go there;
# with the document's 12 operations a service gets 200 + 12 x 20 = 440 cases.
EXAMPLES_PER_OPERATION = {("POST", PREDICTIONS): 200}
OTHER_EXAMPLES = 20
SERVICES = ("vision", "ranking", "default-hooks")


def seldon_document() -> dict[str, Any]:
    """seldon-core's OpenAPI document, as installed."""
    source = importlib.resources.files("seldon_core") / "openapi" / "seldon.json"
    return json.loads(source.read_text())


def extended(document: dict[str, Any]) -> dict[str, Any]:
    """The document plus what Seldon's server really takes (a copy; the input is left alone)."""
    document = copy.deepcopy(document)
    schemas = document["components"]["schemas"]
    # The document spells it "ndarry"; Seldon's decoder reads "ndarray". Keep both: an
    # unknown field is a request the server must also survive.
    schemas["DefaultData"]["properties"]["ndarray"] = {
        "type": "array",
        "items": {"$ref": "#/components/schemas/AnyValue"},
    }
    schemas["SeldonMessage"]["properties"]["jsonData"] = {"$ref": "#/components/schemas/AnyValue"}
    message = {"$ref": "#/components/schemas/SeldonMessage"}
    ok = {"200": {"description": "the prediction", "content": {"application/json": {"schema": message}}}}
    paths = document["paths"]
    paths.setdefault(PREDICTIONS, {}).setdefault(
        "post",
        {
            "operationId": "PredictionsJSON",
            "requestBody": {"required": True, "content": {"application/json": {"schema": message}}},
            "responses": ok,
        },
    )
    for operations in paths.values():
        for operation in operations.values():
            for content in operation.get("requestBody", {}).get("content", {}).values():
                if "json" in content["schema"].get("properties", {}):
                    # The form's one field is the message: without it (the document leaves
                    # it optional) every case would test only the empty form.
                    content["schema"]["required"] = ["json"]
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "query" and "schema" in parameter:
                    # Seldon reads ?json=<the message as JSON text>; the document's object
                    # schema would be sent as exploded key=value pairs that never reach the
                    # decoder. (/aggregate's "body" is likewise read as "json".)
                    parameter["name"] = "json"
                    parameter["content"] = {"application/json": {"schema": parameter.pop("schema")}}
                    parameter.pop("example", None)
    return document


SCHEMA = schemathesis.openapi.from_dict(extended(seldon_document()))
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


def model_dir(name: str, root: Path) -> Path:
    if name == "default-hooks":
        target = copy_model(EXAMPLES / "lenet", root / "lenet")
        (target / "hooks.py").unlink()
        return target
    return copy_model(EXAMPLES / name, root / name)


@pytest.fixture(scope="module", params=SERVICES)
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(model_dir(request.param, tmp_path_factory.mktemp("fuzz"))) as running:
        yield running


def request_for(case: Any, base_url: str) -> dict[str, Any]:
    """`requests.request` arguments for `case`.

    The document's forms carry the message in a `json` field as JSON text (SeldonClient
    sends `data={"json": json.dumps(message)}`); schemathesis would flatten the object into
    `json[data][names][0]=...` fields, which no client sends and Seldon never reads.
    """
    kwargs = case.as_transport_kwargs(base_url=base_url)
    body = case.body
    if case.media_type == "application/x-www-form-urlencoded" and isinstance(body, dict) and "json" in body:
        message = body["json"] if isinstance(body["json"], str) else json.dumps(body["json"])
        kwargs["data"] = {**(kwargs.get("data") or {}), "json": message}
    return kwargs


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: f"{op.method.upper()} {op.path}")
def test_no_request_gets_a_5xx_or_invalid_json(service: Service, operation: Any) -> None:
    examples = EXAMPLES_PER_OPERATION.get((operation.method.upper(), operation.path), OTHER_EXAMPLES)
    fuzz(service, cases(operation), examples, request_for=request_for)


# Requests gunicorn itself refuses before Seldon's app sees them: the answer a client gets
# must be JSON like every other error, not gunicorn's HTML page.
MALFORMED = {
    "request-line-too-long": b"GET /api/v1.0/metadata?json=" + b"x" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "header-too-large": b"GET /health/ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 9000 + b"\r\n\r\n",
    "too-many-headers": b"GET /health/ping HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-H%d: 1\r\n" % i for i in range(150))
    + b"\r\n",
    "garbage-request-line": b"NOT HTTP AT ALL\r\n\r\n",
    "bad-header-name": b"GET /health/ping HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
}


def raw_exchange(port: int, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (no client would fix them up) and read the answer to its end."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("name", MALFORMED)
def test_requests_the_http_server_refuses_get_a_4xx_with_a_json_body(service: Service, name: str) -> None:
    status, body = raw_exchange(service.http_port, MALFORMED[name])
    assert 400 <= status < 500, (status, body[:500])
    try:
        strict_json(body)
    except ValueError as exc:
        pytest.fail(f"HTTP {status}: the body is not JSON ({exc}): {body[:500]!r}")


# What the fuzzer found, cut down by hand to the field that matters, so these stay covered
# whatever the generator's seed: a message whose meta, tags or names have the wrong JSON
# type is the client's mistake (4xx), not the service's (500).
WRONG_SHAPES = {
    "meta-is-a-string": ("/api/v1.0/predictions", {"meta": "ab", "data": {"ndarray": [[0.0]]}}),
    "names-is-a-number": ("/api/v1.0/predictions", {"data": {"names": 1, "ndarray": [[0.0]]}}),
    "transform-input-meta-is-a-number": ("/transform-input", {"meta": 1, "strData": "x"}),
    "transform-output-meta-is-a-list": ("/transform-output", {"meta": [1], "strData": "x"}),
    "transform-input-tags-is-a-list": ("/transform-input", {"meta": {"tags": []}, "strData": "x"}),
}


@pytest.mark.parametrize("name", WRONG_SHAPES)
def test_a_message_with_meta_or_names_of_the_wrong_type_gets_a_4xx(service: Service, name: str) -> None:
    path, message = WRONG_SHAPES[name]
    response = service.post(message, path=path)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    assert strict_json(response.content)["status"]["info"]
