"""One request, sent the way a client of each protocol sends it; a sender per client thread.

A sender holds its own connection (HTTP keep-alive, one gRPC channel), as a real client
does, and returns the answer's status: an HTTP status, or for gRPC the HTTP status the
code stands for (so errors of both protocols read alike in the report).
"""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import SeldonCaffeError
from ..server import GRPC_CODES

PROTOCOLS = ("seldon-rest", "seldon-grpc")
SELDON_PATH = "/api/v1.0/predictions"
MAX_MESSAGE_BYTES = 256 * 2**20  # the client never limits what the server allows
# gRPC code name -> the HTTP status with the same meaning: the server's table reversed (where
# two statuses share a code, 400 and 415, the first one listed stands for it)
_HTTP_OF_GRPC = {"OK": 200, **{code: status for status, code in reversed(GRPC_CODES.items())}}

Sender = Callable[[], int]


@dataclass(frozen=True)
class Request:
    """What every client sends: the Seldon JSON message, and its REST body already encoded."""

    message: dict
    body: bytes
    source: str

    @classmethod
    def from_file(cls, path: Path) -> Request:
        """A `.json` file is a Seldon message as is; any other file (an image, an .npy) goes as binData."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SeldonCaffeError(f"--request {path}: {exc.strerror}") from None
        if path.suffix == ".json":
            try:
                message = json.loads(data)
            except json.JSONDecodeError as exc:
                raise SeldonCaffeError(f"--request {path}: not valid JSON ({exc})") from None
            if not isinstance(message, dict):
                raise SeldonCaffeError(
                    f'--request {path}: expected a Seldon message, e.g. {{"data": {{"ndarray": ...}}}}'
                )
        else:
            message = {"binData": base64.b64encode(data).decode()}
        return cls(message, json.dumps(message).encode(), f"{path.name} ({_size(len(data))})")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def host_port(target: str, default_port: int) -> tuple[str, int]:
    """`http://HOST:PORT`, `HOST:PORT` or `HOST` -> (host, port)."""
    parts = urlsplit(target if "//" in target else f"//{target}")
    if not parts.hostname:
        raise SeldonCaffeError(f"{target!r}: expected http://HOST:PORT, HOST:PORT or a model directory")
    return parts.hostname, parts.port or default_port


def make_sender(protocol: str, host: str, port: int, request: Request) -> Sender:
    if protocol == "seldon-rest":
        return _rest_sender(host, port, request.body)
    return _grpc_sender(host, port, request.message)


def _rest_sender(host: str, port: int, body: bytes) -> Sender:
    connection = http.client.HTTPConnection(host, port, timeout=300)
    headers = {"Content-Type": "application/json"}

    def send() -> int:
        nonlocal connection
        try:
            connection.request("POST", SELDON_PATH, body, headers)
            answer = connection.getresponse()
            answer.read()
            return answer.status
        except (OSError, http.client.HTTPException):
            connection.close()  # the next request reconnects
            connection = http.client.HTTPConnection(host, port, timeout=300)
            return 0  # no answer: a connection error

    return send


def _grpc_sender(host: str, port: int, message: dict) -> Sender:
    import grpc
    from google.protobuf import json_format
    from seldon_core.proto import prediction_pb2, prediction_pb2_grpc

    proto = prediction_pb2.SeldonMessage()
    if "binData" in message:  # bytes travel raw over gRPC: no base64
        proto.binData = base64.b64decode(message["binData"])
    else:
        json_format.ParseDict(message, proto)
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    stub = prediction_pb2_grpc.ModelStub(grpc.insecure_channel(f"{host}:{port}", options=options))

    def send() -> int:
        try:
            stub.Predict(proto, timeout=300)
            return 200
        except grpc.RpcError as error:
            return _HTTP_OF_GRPC.get(error.code().name, 500)

    return send
