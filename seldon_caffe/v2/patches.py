"""Where MLServer 1.7 falls short of the service's error policy, and what changes at import.

The changes are made when the runtime module is imported, in the process that serves it
(MLServer imports the model class before it loads the model), each checked to fit what it
replaces (seldon_caffe/patching.py); each keeps what MLServer does and fixes where it falls
short:

- gRPC status codes: MLServer maps only HTTP 400, 404, 422 and 500 to gRPC codes; anything
  else becomes UNKNOWN. The service's 413, 503 and 504 get the codes they have over Seldon v1.
- gRPC's raw_input_contents: MLServer unpacks each numeric tensor with `struct` into a Python
  list, which the codec then turns back into an array: 14 ms for one 224x224x3 float image, on
  the event loop (measured; v1's gRPC tensor takes 0.4 ms). Here numpy reads the bytes as they
  are, and a tensor whose bytes do not match its shape is a 400 instead of an INTERNAL error.
- Streaming endpoints (`/v2/models/{name}/infer_stream`, `generate_stream`): MLServer starts
  the event-stream response before the model has run, so a model error (any 400) can no longer
  change the status, and Starlette answers a plain-text 500. The response here pulls the first
  event before it starts, so an error raised by then reaches MLServer's error handler: the
  client gets its JSON 4xx, as on the other endpoints.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from fastapi.responses import StreamingResponse
from mlserver import raw
from mlserver.errors import MLServerError
from mlserver.grpc import converters
from mlserver.grpc import utils as grpc_utils
from mlserver.rest import endpoints
from mlserver.types import TensorData

from ..errors import GRPC_CODES
from ..patching import replace

# V2 datatype -> the little-endian numpy dtype of its raw bytes (the protocol's byte order)
RAW_DTYPES = {
    "BOOL": "?",
    "UINT8": "u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}


class FirstEventFirstResponse(StreamingResponse):
    """An event stream whose first event is computed before the response starts."""

    async def stream_response(self, send: Any) -> None:
        events = aiter(self.body_iterator)
        try:
            first = await anext(events)
        except StopAsyncIteration:
            first = None

        async def replay() -> AsyncIterator[Any]:
            if first is not None:
                yield first
            async for event in events:
                yield event

        self.body_iterator = replay()
        await super().stream_response(send)


def inject_raw_arrays(tensors: list[Any], contents: list[bytes]) -> list[Any]:
    """raw_input_contents into the tensors that carry no data, in order: numeric ones as
    numpy arrays over the bytes (no copy, no Python list), BYTES as MLServer unpacks them."""
    empty = [tensor for tensor in tensors if not tensor.data]
    if len(contents) != len(empty):
        raise MLServerError(f"raw_input_contents has {len(contents)} entries for {len(empty)} inputs without contents")
    for tensor, content in zip(empty, contents, strict=True):
        if tensor.datatype == "BYTES":
            tensor.data = TensorData(raw.unpack(tensor, content))
            continue
        dtype = np.dtype(RAW_DTYPES[tensor.datatype])
        count = math.prod(tensor.shape)
        if count < 0 or len(content) != count * dtype.itemsize:
            raise MLServerError(
                f"input {tensor.name!r}: raw_input_contents holds {len(content)} bytes; "
                f"{tensor.datatype} of shape {list(tensor.shape)} needs {max(count, 0) * dtype.itemsize}"
            )
        tensor.data = TensorData.model_construct(root=np.frombuffer(content, dtype))
    return tensors


def apply() -> None:
    """Make the changes (module docstring), each checked to fit what it replaces
    (seldon_caffe/patching.py): a mismatch stops this process with one line naming MLServer's
    version, rather than leaving a change silently undone."""
    codes = {status: getattr(grpc.StatusCode, code) for status, code in GRPC_CODES.items()}
    mapping = {**codes, **grpc_utils.STATUS_CODE_MAPPING}  # MLServer's own codes stay
    replace(grpc_utils, "STATUS_CODE_MAPPING", mapping, library="mlserver")
    replace(converters, "inject_raw", inject_raw_arrays, library="mlserver")  # looked up on each call
    replace(endpoints, "StreamingResponse", FirstEventFirstResponse, library="mlserver")
