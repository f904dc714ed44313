"""Fuzz the V2 REST endpoints with requests generated from MLServer's own OpenAPI document.

schemathesis turns `mlserver/rest/openapi/dataplane.json` (shipped inside mlserver, read
where it is installed) into requests, schema-conforming and schema-violating alike, and
sends them to real `seldon-caffe serve --protocol v2` services: LeNet with the default hooks
(the runtime's own decoding and checks answer) and the vision example (its hooks). Whatever
a client sends, the service must answer without a 5xx and with valid JSON; V2's health
answers are empty, as the document says (tests/fuzzing.py has the loop and the checks, shared
with test_fuzz.py, which does the same over Seldon v1).

Most cases go to `POST /v2/models/{model_name}/infer`. On the inference endpoints the path is
pinned to the served model and version, so every case gets past MLServer's routing into our
decoding (seldon_caffe/v2/codec.py), and some cases carry a valid input with everything else
generated, so they also reach the model, the hooks and the encoding of the answer. The health
and metadata endpoints get generated model names and versions (a 404 but for the served one),
and the served one. The document is adjusted in memory (the installed file stays as it is):
see `adjusted`.
"""

from __future__ import annotations

import base64
import copy
import importlib.resources
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from fuzzing import cases, fuzz
from helpers import EXAMPLES, copy_model
from hypothesis import strategies as st
from service import Service, running_service

pytest.importorskip("mlserver", reason="the V2 route needs the mlserver extra")

import grpc
import schemathesis
from mlserver.grpc import dataplane_pb2_grpc
from mlserver.grpc.converters import ModelInferRequestConverter
from mlserver.types import InferenceRequest
from schemathesis import GenerationMode

pytestmark = pytest.mark.e2e  # the fuzzed requests go to served models (tests/service.py)

VERSION = "1"  # each served directory gets a model-settings.json with this version: see `served_dir`
INFER = ("POST", "/v2/models/{model_name}/infer")
# Cases per operation: the infer endpoint is what clients use, so most go there. A service
# gets 200 + 40 + 2 x 25 (generate) + 4 x 15 (streams) + 4 x 10 (model ready and metadata)
# + 3 (health and server metadata: nothing to vary) = 393, each operation the valid request too.
EXAMPLES_PER_OPERATION = {
    INFER: 200,
    ("POST", "/v2/models/{model_name}/versions/{model_version}/infer"): 40,
    ("POST", "/v2/models/{model_name}/generate"): 25,
    ("POST", "/v2/models/{model_name}/versions/{model_version}/generate"): 25,
}
STREAM_EXAMPLES = 15
OTHER_EXAMPLES = 10


@dataclass(frozen=True)
class Served:
    """A model directory to serve and what a valid request to it looks like."""

    example: str  # the directory under examples/
    name: str  # model.yaml's name: the model_name in URLs
    default_hooks: bool  # serve it without its hooks.py
    input: dict[str, Any]  # a valid input tensor, in V2 JSON
    tags: dict[str, Any] = field(default_factory=dict)  # request parameters its hooks read, valid values

    def valid_request(self) -> dict[str, Any]:
        return {"inputs": [self.input], "parameters": self.tags}

    def with_valid_input(self, case: Any) -> Any:
        """`case` with its inputs replaced by the valid one (keeping a generated input's
        parameters: the content_type decides how BYTES decode); all else as generated."""
        if isinstance(case.body, dict):
            tensor = dict(self.input)
            generated = case.body.get("inputs")
            if isinstance(generated, list) and generated and isinstance(generated[0], dict):
                if isinstance(generated[0].get("parameters"), dict):
                    tensor["parameters"] = generated[0]["parameters"]
            case.body = {**case.body, "inputs": [tensor]}
        return case


LENET = Served(
    example="lenet",
    name="lenet",
    default_hooks=True,
    input={
        "name": "data",
        "datatype": "FP32",
        "shape": [1, 1, 28, 28],
        "data": np.random.default_rng(0).random(28 * 28).round(3).tolist(),
    },
)
VISION = Served(
    example="vision",
    name="vision",
    default_hooks=False,
    input={
        "name": "image",
        "datatype": "BYTES",
        "shape": [1],
        "data": [base64.b64encode((EXAMPLES / "vision" / "samples" / "digit_4.jpg").read_bytes()).decode()],
        "parameters": {"content_type": "base64"},
    },
    tags={"k": 2},
)
SERVED = {"lenet-default-hooks": LENET, "vision": VISION}


def dataplane_document() -> dict[str, Any]:
    """MLServer's V2 OpenAPI document, as installed."""
    source = importlib.resources.files("mlserver") / "rest" / "openapi" / "dataplane.json"
    return json.loads(source.read_text())


def adjusted(document: dict[str, Any], served: Served) -> dict[str, Any]:
    """The document steered at `served` (a copy; the input is left alone).

    OpenAPI 3.0 schemas are JSON Schema draft 4: no `const` (it would be ignored), hence the
    one-value enums."""
    document = copy.deepcopy(document)
    schemas = document["components"]["schemas"]
    number = {"type": "number"}
    string = {"type": "string", "maxLength": 200}
    # TensorData is {"oneOf": [{"type": "array"}, {"type": "bytes"}]}: "bytes" is no JSON
    # Schema type (schemathesis refuses every operation that uses it), and an array of
    # anything is almost never numbers or strings. What V2 REST really carries: a flat or
    # nested array of numbers, of strings (BYTES) or of booleans, or a lone string.
    schemas["TensorData"] = {
        "anyOf": [
            {"type": "array", "items": number, "maxItems": 64},
            {"type": "array", "items": {"type": "array", "items": number, "maxItems": 8}, "maxItems": 8},
            {"type": "array", "items": string, "maxItems": 8},
            {"type": "array", "items": {"type": "boolean"}, "maxItems": 64},
            string,
        ]
    }
    # The served models take one input, and positive cases name it (below): a second input
    # would only be the same name again, a 400 before any decoding. Negative cases still send
    # several.
    schemas["InferenceRequest"]["properties"]["inputs"]["maxItems"] = 1
    tensor = schemas["RequestInput"]["properties"]
    # Positive cases name the model's input (another name is a 400 before any decoding, which
    # negative cases still try); its datatype and a valid shape come up often, every other
    # datatype and shape too.
    tensor["name"] = {"type": "string", "enum": [served.input["name"]]}
    tensor["datatype"] = {"anyOf": [{"enum": [served.input["datatype"]]}, {"$ref": "#/components/enums/Datatype"}]}
    tensor["shape"] = {"anyOf": [{"enum": [served.input["shape"]]}, {"type": "array", "items": {"type": "integer"}}]}
    # An input's content_type picks how BYTES decode (codec.py): the ones it knows, and in
    # negative cases others.
    tensor["parameters"] = {
        "type": "object",
        "additionalProperties": True,
        "properties": {"content_type": {"type": "string", "enum": ["str", "json", "base64", "bytes"]}},
    }
    # Request parameters become the hooks' ctx.tags: those the hooks read, of any JSON type.
    schemas["Parameters"]["properties"].update({tag: {} for tag in served.tags})
    return document


def served_dir(served: Served, root: Path) -> Path:
    """A copy of the example; with a version, so the /versions/{model_version}/ routes reach it too."""
    target = copy_model(EXAMPLES / served.example, root / served.example)
    if served.default_hooks:
        (target / "hooks.py").unlink()
    (target / "model-settings.json").write_text(json.dumps({"parameters": {"version": VERSION}}))
    return target


@pytest.fixture(scope="module", params=list(SERVED))
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    served = SERVED[request.param]
    schema = schemathesis.openapi.from_dict(adjusted(dataplane_document(), served))
    operations = {(op.method.upper(), op.path): op for op in (result.ok() for result in schema.get_all_operations())}
    model_dir = served_dir(served, tmp_path_factory.mktemp("v2-fuzz"))
    with running_service(model_dir, "--protocol", "v2", verbose=False) as running:
        yield served, operations, running


def _operation_keys() -> list[Any]:
    keys = []
    for path, operations in dataplane_document()["paths"].items():
        for method in (m.upper() for m in operations if m != "parameters"):
            keys.append(pytest.param((method, path), id=f"{method} {path}"))
    return keys


def _examples(key: tuple[str, str]) -> int:
    return EXAMPLES_PER_OPERATION.get(key, STREAM_EXAMPLES if key[1].endswith("_stream") else OTHER_EXAMPLES)


@pytest.mark.parametrize("key", _operation_keys())
def test_no_request_gets_a_5xx_or_invalid_json(service: tuple[Served, dict, Service], key: tuple[str, str]) -> None:
    served, operations, running = service
    operation = operations[key]
    names = re.findall(r"{(\w+)}", operation.path)
    served_path = {"model_name": served.name, "model_version": VERSION}
    pinned = {"path_parameters": {name: served_path[name] for name in names}} if names else {}
    if operation.method.upper() == "POST":
        valid = operation.Case(body=served.valid_request(), media_type="application/json", **pinned)
        positive = operation.as_strategy(GenerationMode.POSITIVE, **pinned)
        strategy = st.one_of(cases(operation, **pinned), positive.map(served.with_valid_input))
        examples = _examples(key)
    else:
        valid = operation.Case(**pinned)
        strategy = cases(operation)
        # With no path parameter (health, server metadata) there is one request to make.
        examples = _examples(key) if names else 1
    # The served model answers the valid request: else the pins are wrong and the cases prove little.
    answer = requests.request(**valid.as_transport_kwargs(base_url=running.url), timeout=60)
    assert answer.status_code == 200, answer.text
    fuzz(running, strategy, examples, explicit=[valid])


# What the fuzzer found, cut down by hand. MLServer puts the request's id into the answer's
# CloudEvents headers (REST) or metadata (gRPC), after the runtime answered: an id that is
# not printable ASCII, has surrounding spaces or is too long for a header makes a request the
# model answered a plain-text 500 or a dropped connection over REST, and INTERNAL or
# RESOURCE_EXHAUSTED over gRPC. The runtime can refuse such an id before it runs the model
# (a 400 and INVALID_ARGUMENT that say what an id may hold); until it does, these fail.
# Each transport gets the ids that break it today: REST's headers take Latin-1, tabs and
# long values, gRPC's metadata none of these but surrounding spaces. (gRPC refuses metadata
# past 8 KiB at random and past 16 KiB always: the id goes out twice, Ce-Id and Ce-Requestid.)
REST_IDS = {
    "cjk": "字",
    "newline": "a\nb",
    "nul": "a\x00b",
    "surrounding-spaces": " x ",
    "longer-than-a-header-line": "x" * 70000,
}
GRPC_IDS = {
    "cjk": "字",
    "latin-1": "é",
    "newline": "a\nb",
    "nul": "a\x00b",
    "tab": "a\tb",
    "longer-than-grpc-metadata": "x" * 20000,
}


@pytest.mark.parametrize("name", REST_IDS)
def test_an_id_mlserver_cannot_echo_is_refused_over_rest(service: tuple[Served, dict, Service], name: str) -> None:
    served, _, running = service
    request = {**served.valid_request(), "id": REST_IDS[name]}
    try:
        response = requests.post(f"{running.url}/v2/models/{served.name}/infer", json=request, timeout=60)
    except requests.ConnectionError as exc:
        pytest.fail(f"the connection dropped: {exc}")
    assert response.status_code == 400, (response.status_code, response.text[:300])
    assert "id" in response.json()["error"]


@pytest.mark.parametrize("name", GRPC_IDS)
def test_an_id_mlserver_cannot_echo_is_refused_over_grpc(service: tuple[Served, dict, Service], name: str) -> None:
    served, _, running = service
    tensor = dict(served.input)
    if tensor["datatype"] == "BYTES":  # gRPC's BYTES are bytes
        tensor["data"] = [value.encode() for value in tensor["data"]]
    request = InferenceRequest(**{**served.valid_request(), "inputs": [tensor], "id": GRPC_IDS[name]})
    with grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
        stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(ModelInferRequestConverter.from_types(request, model_name=served.name), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.value.code(), error.value.details())


# What the fuzzer found in our decoding, cut down by hand so it stays covered whatever the
# generator draws: base64 text with a non-ASCII character is the client's mistake (a 400 that
# says it is not base64, as over gRPC), not an internal error.
@pytest.mark.parametrize("text", ["é", "aGVsbG8=字"])
def test_base64_text_with_non_ascii_characters_is_a_400(service: tuple[Served, dict, Service], text: str) -> None:
    served, _, running = service
    tensor = {"name": served.input["name"], "datatype": "BYTES", "shape": [1], "data": [text]}
    request = {"inputs": [{**tensor, "parameters": {"content_type": "base64"}}]}
    response = requests.post(f"{running.url}/v2/models/{served.name}/infer", json=request, timeout=60)
    assert response.status_code == 400, (response.status_code, response.text[:300])
    assert "not base64" in response.json()["error"]
