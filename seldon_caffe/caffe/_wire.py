"""Caffe's binary format at the protobuf wire level, for the one thing it is needed for: weights.

Moving a large repeated float field through protobuf's Python objects costs seconds per
million values with upb and about ten times that with the pure-Python runtime (protobuf
3.20 on Python 3.12, the seldon-core 1.17.1 lane): minutes for an ImageNet net. Blob
values are plain little-endian floats on the wire, so we read and write them as numpy
buffers and leave everything else (the small net definition) to protobuf.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from . import caffe_pb2

VARINT, FIXED64, BYTES, FIXED32 = 0, 1, 2, 5

# Field numbers (caffe.proto): NetParameter.layer / .layers; name and blobs in each layer kind.
_NET_LAYER, _NET_V1_LAYERS = 100, 2
_LAYER_FIELDS = {_NET_LAYER: (1, 7), _NET_V1_LAYERS: (4, 6)}
_BLOB_DATA, _BLOB_DOUBLE_DATA, _BLOB_SHAPE, _SHAPE_DIM = 5, 8, 7, 1
_BLOB_LEGACY_DIMS = (1, 2, 3, 4)  # num, channels, height, width
_LAYER_BLOBS = 7


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message (typically: the file is cut short)."""


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise WireError("a number runs past the end of the data")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise WireError("a number is longer than 10 bytes")


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative ints are 10-byte two's complement on the wire
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview, int]]:
    """(field number, wire type, value or payload, offset of the field) for each field in order."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type == VARINT:
            value, pos = _read_varint(data, pos)
            yield number, wire_type, value, start
            continue
        if wire_type == BYTES:
            size, pos = _read_varint(data, pos)
        elif wire_type in (FIXED32, FIXED64):
            size = 4 if wire_type == FIXED32 else 8
        else:
            raise WireError(f"unknown wire type {wire_type}")
        if pos + size > len(data):
            raise WireError("a field runs past the end of the data")
        yield number, wire_type, data[pos : pos + size], start
        pos += size


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field: key, length, payload."""
    return _varint(number << 3 | BYTES) + _varint(len(payload)) + payload


# -- blobs ---------------------------------------------------------------------------


def blob_array(blob: bytes | memoryview, what: str = "blob") -> np.ndarray:
    """The float32 array a serialized BlobProto holds, in its shape.

    Legacy num/channels/height/width win over `shape` when present (as in Caffe); values
    come from `data`, else `double_data`; packed and unpacked encodings are both read.
    """
    dims: list[int] = []
    legacy: dict[int, int] = {}
    chunks: dict[int, list[np.ndarray]] = {_BLOB_DATA: [], _BLOB_DOUBLE_DATA: []}
    for number, wire_type, value, _ in fields(memoryview(blob)):
        if number == _BLOB_SHAPE and isinstance(value, memoryview):
            for dim_number, _, dim, _ in fields(value):
                if dim_number == _SHAPE_DIM:
                    dims.extend(_packed_varints(dim) if isinstance(dim, memoryview) else [_signed(dim)])
        elif number in _BLOB_LEGACY_DIMS and wire_type == VARINT:
            legacy[number] = _signed(int(value))
        elif number in chunks and isinstance(value, memoryview):
            chunks[number].append(np.frombuffer(value, dtype="<f4" if number == _BLOB_DATA else "<f8"))
    shape = tuple(legacy.get(n, 0) for n in _BLOB_LEGACY_DIMS) if legacy else tuple(dims)
    parts = chunks[_BLOB_DATA] or chunks[_BLOB_DOUBLE_DATA]
    values = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    expected = int(np.prod(shape, dtype=np.int64))
    if values.size != expected:
        raise WireError(f"{what} has {values.size} values but its shape {list(shape)} needs {expected}")
    return values.reshape(shape)


def _packed_varints(data: memoryview) -> list[int]:
    out, pos = [], 0
    while pos < len(data):
        value, pos = _read_varint(data, pos)
        out.append(_signed(value))
    return out


def blob_bytes(array: np.ndarray) -> bytes:
    """A serialized BlobProto for `array`: float32 `data` and a `shape`, in protobuf's own order."""
    values = np.asarray(array, dtype="<f4", order="C")  # (ascontiguousarray would make 0-D 1-D)
    dims = b"".join(_varint(int(d)) for d in values.shape)
    data = field(_BLOB_DATA, values.tobytes()) if values.size else b""
    if not dims:
        # A 0-d blob (channel-shared PReLU's slope) has no shape field at all, as Caffe's own
        # Blob::ToProto writes it; OpenCV rejects an empty `shape {}`.
        return data
    return data + field(_BLOB_SHAPE, field(_SHAPE_DIM, dims))


# -- caffemodels ---------------------------------------------------------------------


def caffemodel_arrays(data: bytes) -> dict[str, list[np.ndarray]]:
    """{layer name: its blobs as float32 arrays} from caffemodel bytes, V1 or current format.

    A name that appears twice takes the later blobs, as Caffe's copy of trained layers does.
    Raises WireError for bytes that are not a net with layers.
    """
    arrays: dict[str, list[np.ndarray]] = {}
    layers = 0
    for number, _, payload, _ in fields(memoryview(data)):
        if number not in _LAYER_FIELDS or not isinstance(payload, memoryview):
            continue
        layers += 1
        name_field, blobs_field = _LAYER_FIELDS[number]
        name, blobs = "", []
        for inner, _, value, _ in fields(payload):
            if inner == name_field and isinstance(value, memoryview):
                name = bytes(value).decode("utf-8", "replace")
            elif inner == blobs_field and isinstance(value, memoryview):
                blobs.append(value)
        if blobs:
            arrays[name] = [blob_array(blob, f"layer {name!r} blob {i}") for i, blob in enumerate(blobs)]
    if not layers:
        raise WireError("it holds no layers")
    return arrays


def caffemodel_bytes(definition: caffe_pb2.NetParameter, weights: Mapping[str, Sequence[np.ndarray]]) -> bytes:
    """Caffemodel bytes for `definition` (without blobs) plus `weights` by layer name.

    Byte for byte what protobuf would serialize, without ever holding the values in it.
    """
    head = caffe_pb2.NetParameter()
    head.CopyFrom(definition)
    head.ClearField("layer")  # field 100, the last one: the layers follow the rest
    parts = [head.SerializeToString()]
    for layer in definition.layer:
        body = layer.SerializeToString()
        blobs = b"".join(field(_LAYER_BLOBS, blob_bytes(a)) for a in weights.get(layer.name, ()))
        if blobs:  # blobs go between the fields numbered below and above theirs
            cut = next((at for number, _, _, at in fields(memoryview(body)) if number > _LAYER_BLOBS), len(body))
            body = body[:cut] + blobs + body[cut:]
        parts.append(field(_NET_LAYER, body))
    return b"".join(parts)
