"""One request, sent the way a client of each protocol sends it; a sender per client thread.

A sender holds its own connection (HTTP keep-alive, one gRPC channel), as a real client
does, and returns the answer's status: an HTTP status, or for gRPC the HTTP status the
code stands for (so errors of every protocol read alike in the report).

The V2 protocols address a model by name: `v2_model` asks the server which one (its repository
index, or the name given) and for its metadata, so that a file sent as it is (an image, an .npy)
goes as the model's first input. Over V2 gRPC, tensors travel in `raw_input_contents`
(little-endian bytes, as Triton's clients send them) and files as raw bytes; V2 REST is JSON
only (MLServer has no binary tensor extension), so there a file goes base64 in a BYTES tensor.
"""

from __future__ import annotations

import base64
import http.client
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from ..errors import GRPC_CODES, SeldonCaffeError

PROTOCOLS = ("seldon-rest", "seldon-grpc", "v2-rest", "v2-grpc")
SELDON_PATH = "/api/v1.0/predictions"
MAX_MESSAGE_BYTES = 256 * 2**20  # the client never limits what the server allows
# gRPC code name -> the HTTP status with the same meaning: the server's table reversed (where
# two statuses share a code, 400 and 415, the first one listed stands for it)
_HTTP_OF_GRPC = {"OK": 200, **{code: status for status, code in reversed(GRPC_CODES.items())}}
_V2_EXAMPLE = '{"inputs": [{"name": ..., "datatype": ..., "shape": ..., "data": ...}]}'

Sender = Callable[[], int]


@dataclass(frozen=True)
class Request:
    """What every client sends: the message (Seldon's, or a V2 inference request) and its REST
    body already encoded, so the clients spend their time sending, not encoding."""

    message: dict
    body: bytes
    source: str
    binary: bool = False  # the file itself is the payload: binData, or a V2 BYTES input
    model: str = ""  # V2: the model it goes to (set by `for_model`)

    @classmethod
    def from_file(cls, path: Path, protocol: str = "seldon-rest") -> Request:
        """A `.json` file is the message as is (a Seldon message, or for V2 an inference
        request); any other file (an image, an .npy) goes as binData, or over V2 as one BYTES
        input with content_type base64 (named by `for_model`)."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SeldonCaffeError(f"--request {path}: {exc.strerror}") from None
        v2 = protocol.startswith("v2-")
        encoded = base64.b64encode(data).decode()
        if path.suffix == ".json":
            try:
                message = json.loads(data)
            except json.JSONDecodeError as exc:
                raise SeldonCaffeError(f"--request {path}: not valid JSON ({exc})") from None
            if v2 and not (isinstance(message, dict) and isinstance(message.get("inputs"), list)):
                raise SeldonCaffeError(f"--request {path}: expected a V2 inference request, e.g. {_V2_EXAMPLE}")
            if not isinstance(message, dict):
                raise SeldonCaffeError(
                    f'--request {path}: expected a Seldon message, e.g. {{"data": {{"ndarray": ...}}}}'
                )
        elif v2:
            bytes_input = {"name": "", "datatype": "BYTES", "shape": [1], "data": [encoded]}
            message = {"inputs": [{**bytes_input, "parameters": {"content_type": "base64"}}]}
        else:
            message = {"binData": encoded}
        source = f"{path.name} ({_size(len(data))})"
        return cls(message, json.dumps(message).encode(), source, binary=path.suffix != ".json")

    def for_model(self, model: str, first_input: str) -> Request:
        """The V2 request addressed to `model`; a file sent as it is becomes its first input."""
        message = self.message
        if self.binary:
            message = {"inputs": [{**message["inputs"][0], "name": first_input}]}
        return replace(self, message=message, body=json.dumps(message).encode(), model=model)

    @property
    def path(self) -> str:
        """Where REST posts it."""
        return f"/v2/models/{quote(self.model, safe='')}/infer" if self.model else SELDON_PATH


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def host_port(target: str, default_port: int) -> tuple[str, int]:
    """`http://HOST:PORT`, `HOST:PORT` or `HOST` -> (host, port)."""
    parts = urlsplit(target if "//" in target else f"//{target}")
    if not parts.hostname:
        raise SeldonCaffeError(f"{target!r}: expected http://HOST:PORT, HOST:PORT or a model directory")
    return parts.hostname, parts.port or default_port


def make_sender(protocol: str, host: str, port: int, request: Request) -> Sender:
    """A sender for one client thread, with its own connection."""
    if protocol.endswith("-rest"):
        return _rest_sender(host, port, request.path, request.body)
    if protocol == "v2-grpc":
        from mlserver.grpc import dataplane_pb2_grpc

        stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(_channel(host, port))
        return _grpc_sender(stub.ModelInfer, v2_infer_proto(request))
    return _seldon_grpc_sender(host, port, request.message)


def _rest_sender(host: str, port: int, path: str, body: bytes) -> Sender:
    connection = http.client.HTTPConnection(host, port, timeout=300)
    headers = {"Content-Type": "application/json"}

    def send() -> int:
        nonlocal connection
        try:
            connection.request("POST", path, body, headers)
            answer = connection.getresponse()
            answer.read()
            return answer.status
        except (OSError, http.client.HTTPException):
            connection.close()  # the next request reconnects
            connection = http.client.HTTPConnection(host, port, timeout=300)
            return 0  # no answer: a connection error

    return send


def _channel(host: str, port: int) -> Any:
    import grpc

    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    return grpc.insecure_channel(f"{host}:{port}", options=options)


def _seldon_grpc_sender(host: str, port: int, message: dict) -> Sender:
    from google.protobuf import json_format
    from seldon_core.proto import prediction_pb2, prediction_pb2_grpc

    proto = prediction_pb2.SeldonMessage()
    if "binData" in message:  # bytes travel raw over gRPC: no base64
        proto.binData = base64.b64decode(message["binData"])
    else:
        json_format.ParseDict(message, proto)
    return _grpc_sender(prediction_pb2_grpc.ModelStub(_channel(host, port)).Predict, proto)


def _grpc_sender(call: Any, proto: Any) -> Sender:
    import grpc

    def send() -> int:
        try:
            call(proto, timeout=300)
            return 200
        except grpc.RpcError as error:
            return _HTTP_OF_GRPC.get(error.code().name, 500)

    return send


def v2_infer_proto(request: Request) -> Any:
    """The V2 request as a gRPC ModelInferRequest, every input in `raw_input_contents`: numbers
    as little-endian bytes, BYTES elements each after its 4-byte length (Triton's layout, which
    MLServer reads too). A file sent as it is goes as its own bytes, not base64."""
    from mlserver.codecs.numpy import to_dtype
    from mlserver.grpc.converters import ModelInferRequestConverter
    from mlserver.types import InferenceRequest, RequestInput

    inputs, raw = [], []
    try:
        for given in request.message["inputs"]:
            values, tensor = given.get("data", []), {**given, "data": []}  # the values go raw, below
            if tensor["datatype"] == "BYTES":
                elements = [e.encode() if isinstance(e, str) else e for e in _flat(values)]
                if request.binary:
                    elements = [base64.b64decode(e) for e in elements]
                    tensor.pop("parameters", None)  # no content_type: the bytes as they are
                raw.append(b"".join(struct.pack("<I", len(e)) + e for e in elements))
            else:
                dtype = to_dtype(RequestInput(**tensor)).newbyteorder("<")
                raw.append(np.asarray(values, dtype=dtype).tobytes())
            inputs.append(tensor)
        typed = InferenceRequest(**{**request.message, "inputs": inputs})
    except (KeyError, TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise SeldonCaffeError(f"--request {request.source}: not a V2 inference request ({exc})") from None
    proto = ModelInferRequestConverter.from_types(typed, model_name=request.model)
    proto.raw_input_contents.extend(raw)
    return proto


def _flat(data: Any) -> list:
    """A (nested) list's elements in row-major order."""
    if not isinstance(data, list):
        return [data]
    return [element for item in data for element in _flat(item)]


def v2_model(protocol: str, host: str, port: int, model: str | None) -> tuple[str, str]:
    """(the model to load, the name of its first input), asked of the V2 server over the
    protocol's own transport: the model given, else the one model its repository index lists
    as ready. Fails with one line when the server is unreachable or the choice is unclear."""
    ask = _v2_rest if protocol == "v2-rest" else _v2_grpc
    where = f"{host}:{port}"
    try:
        if model is None:
            ready = ask(host, port, "index", "")
            if len(ready) != 1:
                found = f"{len(ready)} ready models ({', '.join(ready)})" if ready else "no ready model"
                raise SeldonCaffeError(f"{where} serves {found}: name the one to load with --model")
            (model,) = ready
        inputs = ask(host, port, "metadata", model)
    except LookupError:
        raise SeldonCaffeError(f"{where} serves no model {model!r}") from None
    except OSError as exc:
        raise SeldonCaffeError(f"cannot ask {where} for its V2 models over {protocol}: {exc}") from None
    return model, inputs[0] if inputs else "input"


def _v2_rest(host: str, port: int, what: str, model: str) -> list[str]:
    """`index`: the ready models' names; `metadata`: the model's input names."""
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        if what == "index":
            connection.request("POST", "/v2/repository/index", b'{"ready": true}', {"Content-Type": "application/json"})
        else:
            connection.request("GET", f"/v2/models/{quote(model, safe='')}")
        answer = connection.getresponse()
        body = answer.read()
    except http.client.HTTPException as exc:
        raise OSError(str(exc)) from None
    finally:
        connection.close()
    if answer.status == 404:
        raise LookupError(model)
    if answer.status != 200:
        raise OSError(f"HTTP {answer.status} from {what}: {body[:200].decode(errors='replace')}")
    if what == "index":
        return [entry["name"] for entry in json.loads(body) if entry.get("state", "READY") == "READY"]
    return [tensor["name"] for tensor in json.loads(body).get("inputs") or []]


def _v2_grpc(host: str, port: int, what: str, model: str) -> list[str]:
    import grpc

    try:
        from mlserver.grpc import dataplane_pb2, dataplane_pb2_grpc
    except ImportError:
        raise SeldonCaffeError("v2-grpc needs MLServer's gRPC stubs: pip install 'seldon-caffe[mlserver]'") from None
    with _channel(host, port) as channel:
        stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            if what == "index":
                index = stub.RepositoryIndex(dataplane_pb2.RepositoryIndexRequest(ready=True), timeout=30)
                # MLServer 1.7 writes the state as "State.READY" over gRPC
                return [entry.name for entry in index.models if entry.state.rsplit(".", 1)[-1] in ("", "READY")]
            metadata = stub.ModelMetadata(dataplane_pb2.ModelMetadataRequest(name=model), timeout=30)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise LookupError(model) from None
            raise OSError(f"{error.code().name}: {error.details()}") from None
    return [tensor.name for tensor in metadata.inputs]
