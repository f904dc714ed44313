"""V2 tensors <-> what hooks see, apart from any transport (MLServer hands both REST and gRPC
requests over as the same InferenceRequest).

A hook written for Seldon v1 runs unchanged: a numeric tensor arrives as a numpy array (one
input: the array; several: {name: array}), a BYTES tensor as `bytes` (what v1's binData
gives), `str` (v1's strData) or parsed JSON (v1's jsonData), chosen by the input's
`content_type` parameter:

    "str"            text: UTF-8 decoded, a JSON string as it is
    "json"           JSON text, parsed: a dict or list
    "base64"         base64 text, decoded to bytes (images over V2 REST's JSON)
    "bytes"          bytes as they arrived (a JSON string is UTF-8 encoded)
    absent, other    as they arrived: bytes over gRPC, str from JSON

A BYTES tensor of one element is that element; of several, a list. The request's
`parameters` become ctx.tags, where v1's meta.tags travel.

Answers go back as tensors: each array its own (named after the model's output for a
single-output model, else "output"), `str` a BYTES tensor "text" (content_type str), `bytes`
one "data" (content_type base64, so it survives REST's JSON), anything else JSON in a BYTES
tensor "json" (content_type json).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

import numpy as np
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, Parameters, RequestInput, ResponseOutput

from ..errors import BadRequest, HookError
from ..pipeline import check_finite, jsonable

# A request id MLServer can echo in a header (CloudEvents' Ce-Id) and in gRPC metadata: anything
# else fails there after the model answered (a text 500, a dropped connection, "Invalid metadata").
_ECHOABLE_ID = re.compile(r"(?:[!-~](?:[ -~]{0,1022}[!-~])?)?")
# Request parameters MLServer sets itself: not the client's tags
_SERVER_PARAMETERS = {"content_type", "headers"}


def decode_request(request: InferenceRequest, by_name: bool) -> tuple[Any, list[str], dict[str, Any]]:
    """The payload preprocess gets, the input names (ctx.names) and the meta (ctx.meta).

    by_name: a single numeric input also goes as {name: array}, so the default preprocess
    hands it to the model by name and a name the model does not have is a 400.
    """
    if request.id is not None and not _ECHOABLE_ID.fullmatch(request.id):
        raise BadRequest(
            "the request id must be printable ASCII, at most 1024 characters, with no spaces at either end: "
            "it is sent back in the answer's headers"
        )
    if not request.inputs:
        raise BadRequest('the request has no inputs; expected {"inputs": [{"name", "datatype", "shape", "data"}]}')
    values: dict[str, Any] = {}
    for tensor in request.inputs:
        if tensor.name in values:
            raise BadRequest(f"input {tensor.name!r} is given twice")
        values[tensor.name] = decode_input(tensor)
    payload: Any = values
    if len(values) == 1:
        ((name, value),) = values.items()
        payload = {name: value} if by_name and isinstance(value, np.ndarray) else value
    return payload, list(values), {"tags": request_tags(request)}


def decode_input(tensor: RequestInput) -> Any:
    """One input tensor -> a numpy array, or bytes / str (a list of them for several)."""
    if any(d < 0 for d in tensor.shape):
        raise BadRequest(f"input {tensor.name!r}: shape {tensor.shape} has a negative dimension")
    if tensor.datatype == "BYTES":
        return _decode_bytes(tensor)
    try:
        return NumpyCodec.decode_input(tensor)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(
            f"input {tensor.name!r}: its data does not make a {tensor.datatype} tensor of shape {tensor.shape} ({exc})"
        ) from None


def request_tags(request: InferenceRequest) -> dict[str, Any]:
    if request.parameters is None:
        return {}
    return request.parameters.model_dump(exclude=_SERVER_PARAMETERS, exclude_none=True)


def _decode_bytes(tensor: RequestInput) -> Any:
    data = getattr(tensor.data, "root", tensor.data)
    elements = data if isinstance(data, list) else [data]
    content_type = tensor.parameters.content_type if tensor.parameters else None
    decoded = [_decode_element(tensor.name, element, content_type) for element in elements]
    return decoded[0] if len(decoded) == 1 else decoded


def _decode_element(name: str, element: Any, content_type: str | None) -> Any:
    if not isinstance(element, (bytes, str)):
        raise BadRequest(f"input {name!r} is BYTES but holds a {type(element).__name__}; expected strings")
    try:
        if content_type == "str":
            return element.decode() if isinstance(element, bytes) else element
        if content_type == "json":
            return json.loads(element)
        if content_type == "base64":  # as bytes: a str with non-ASCII characters is then not base64 either
            return base64.b64decode(element.encode() if isinstance(element, str) else element, validate=True)
    except UnicodeDecodeError:
        raise BadRequest(f"input {name!r} has content_type {content_type}, but is not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise BadRequest(f"input {name!r} has content_type json, but is not JSON ({exc})") from None
    except binascii.Error as exc:
        raise BadRequest(f"input {name!r} has content_type base64, but is not base64 ({exc})") from None
    if content_type == "bytes" and isinstance(element, str):
        return element.encode()
    return element


def encode_outputs(result: Any, single_output: str, requested: list[str] | None = None) -> list[ResponseOutput]:
    """What postprocess returned (or run_model's {name: array}) -> the answer's tensors,
    only those `requested` when the request names some."""
    outputs = _encode(result, single_output)
    if not requested:
        return outputs
    by_name = {output.name: output for output in outputs}
    unknown = [name for name in requested if name not in by_name]
    if unknown:
        raise BadRequest(f"output {unknown[0]!r} was requested, but the answer has only: {', '.join(by_name)}")
    return [by_name[name] for name in requested]


def _encode(result: Any, single_output: str) -> list[ResponseOutput]:
    if isinstance(result, dict) and result and all(isinstance(v, (np.ndarray, np.generic)) for v in result.values()):
        return [_tensor(str(name), np.asarray(value)) for name, value in result.items()]
    if isinstance(result, (np.ndarray, np.generic)):
        return [_tensor(single_output, np.asarray(result))]
    if isinstance(result, str):
        return [_bytes_tensor("text", result.encode(), "str")]
    if isinstance(result, bytes):
        return [_bytes_tensor("data", base64.b64encode(result), "base64")]
    text = json.dumps(jsonable(result), ensure_ascii=False, allow_nan=False)
    return [_bytes_tensor("json", text.encode(), "json")]


def _bytes_tensor(name: str, value: bytes, content_type: str) -> ResponseOutput:
    """One BYTES element; REST's JSON shows it as text, gRPC sends it as it is."""
    return ResponseOutput(
        name=name, datatype="BYTES", shape=[1], data=[value], parameters=Parameters(content_type=content_type)
    )


def _tensor(name: str, array: np.ndarray) -> ResponseOutput:
    if array.dtype.hasobject:
        raise HookError(f"output {name!r} is an array of Python objects, which no V2 datatype can carry")
    check_finite(array)
    return NumpyCodec.encode_output(name, array)
