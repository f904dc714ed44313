"""Reading and writing Caffe's two files: the prototxt (text) and the caffemodel (binary).

Everything here is raw: a file becomes the NetParameter it spells, with no upgrade, so that
prototxt -> NetParameter -> prototxt is lossless. `upgrade.py` and `net.py` build on it.
Failures are `CaffeFormatError`s that name the file (and, for text, the line and column),
because they surface as the one line that stops a model server's start-up.
"""

from __future__ import annotations

import os

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from ..errors import ModelLoadError
from . import _wire, caffe_pb2, tolerant

PathLike = str | os.PathLike[str]


class CaffeFormatError(ModelLoadError):
    """A Caffe file cannot be read or makes no sense: the message names the file and the place."""


# -- prototxt ------------------------------------------------------------------------


def parse_prototxt(text: str | bytes, source: str = "<prototxt>") -> caffe_pb2.NetParameter:
    """Parse prototxt text into a NetParameter, exactly as written (no upgrade).

    Fields (and enum values) that our caffe.proto lacks - a fork we do not know - are
    skipped with a warning logged once per file (`tolerant.unknown_fields` lists them), so
    that they do not stop a model whose engine can do without them. A syntax error becomes
    "SOURCE:LINE:COLUMN: what protobuf says", the form editors and terminals turn into a
    link to the offending spot.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CaffeFormatError(f"{source}: not UTF-8 text at byte {exc.start}; is it a caffemodel?") from None
    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(text, net)
        return net
    except text_format.ParseError as exc:
        first = exc
    scanned = tolerant.scan(text)
    if scanned.complete and not scanned.fields:  # nothing unknown: a plain error
        raise CaffeFormatError(_describe_parse_error(first, source))
    # Where the scanner stopped (a syntax error, or syntax it does not follow), protobuf's
    # own skipping gets past any unknown field after that point and finds the real error.
    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(scanned.text, net, allow_unknown_field=not scanned.complete)
    except text_format.ParseError as exc:
        raise CaffeFormatError(_describe_parse_error(exc, source)) from None
    tolerant.warn_once(scanned.fields, source, text, first=_describe_parse_error(first, source))
    return net


def _describe_parse_error(exc: text_format.ParseError, source: str) -> str:
    message = str(exc)
    line, column = exc.GetLine(), exc.GetColumn()
    if line is None:
        return f"{source}: {message}"
    prefix = f"{line}:{column} : "
    if message.startswith(prefix):
        message = message[len(prefix) :]
    return f"{source}:{line}:{column}: {message}"


def read_prototxt(path: PathLike) -> caffe_pb2.NetParameter:
    """Read a prototxt file (raw, no upgrade)."""
    return parse_prototxt(read_bytes(path, "prototxt"), source=os.fspath(path))


def format_prototxt(net: caffe_pb2.NetParameter) -> str:
    """The prototxt text of `net`: protobuf's canonical text form, fields in number order.

    Formatting a re-parsed result gives the same text again, so diffs stay meaningful.
    """
    return text_format.MessageToString(net)


def write_prototxt(net: caffe_pb2.NetParameter, path: PathLike) -> None:
    """Write `net` as prototxt text."""
    _write_bytes(path, format_prototxt(net).encode("utf-8"))


# -- caffemodel ----------------------------------------------------------------------


def parse_caffemodel(data: bytes, source: str = "<caffemodel>") -> caffe_pb2.NetParameter:
    """Parse caffemodel bytes (raw, no upgrade).

    Protobuf happily decodes many byte strings into an empty or partial message, so a file
    that decodes to no layers at all is rejected here too, rather than becoming a net with
    no weights that fails much later and far less clearly.
    """
    _require_data(data, source)
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(data if isinstance(data, bytes) else bytes(data))
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise _not_a_caffemodel(source, exc) from None
    if not net.layer and not net.layers:
        raise _not_a_caffemodel(source, "it holds no layers")
    return net


def _require_data(data: bytes, source: str) -> None:
    if not data:
        raise CaffeFormatError(f"{source}: the caffemodel is empty")


def _not_a_caffemodel(source: str, why: object) -> CaffeFormatError:
    return CaffeFormatError(f"{source}: the caffemodel is truncated or not a caffemodel ({why})")


def read_caffemodel(path: PathLike) -> caffe_pb2.NetParameter:
    """Read a caffemodel file (raw, no upgrade)."""
    return parse_caffemodel(read_bytes(path, "caffemodel"), source=os.fspath(path))


def serialize_caffemodel(net: caffe_pb2.NetParameter) -> bytes:
    """The caffemodel bytes of `net` (Caffe's binary NetParameter)."""
    return net.SerializeToString()


def write_caffemodel(net: caffe_pb2.NetParameter, path: PathLike) -> None:
    """Write `net` as a caffemodel file."""
    _write_bytes(path, serialize_caffemodel(net))


def read_bytes(path: PathLike, kind: str) -> bytes:
    """A file's bytes; a missing or unreadable file is a CaffeFormatError naming it."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise CaffeFormatError(f"{os.fspath(path)}: {kind} file not found") from None
    except OSError as exc:
        raise CaffeFormatError(f"{os.fspath(path)}: cannot read the {kind} file ({exc.strerror})") from None


def _write_bytes(path: PathLike, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


# -- blobs and weights --------------------------------------------------------------


def blob_to_array(blob: caffe_pb2.BlobProto, what: str = "blob") -> np.ndarray:
    """The values of a BlobProto as a float32 array of its shape.

    The legacy num/channels/height/width fields win over `shape` when present, as in Caffe,
    and `double_data` is used when `data` is empty. A value count that disagrees with the
    shape is a CaffeFormatError naming `what`.
    """
    try:
        return _wire.blob_array(blob.SerializeToString(), what)
    except _wire.WireError as exc:
        raise CaffeFormatError(str(exc)) from None


def array_to_blob(array: np.ndarray) -> caffe_pb2.BlobProto:
    """A BlobProto holding `array` as float32 with a `shape` (Caffe's current blob form)."""
    return caffe_pb2.BlobProto.FromString(_wire.blob_bytes(array))


def caffemodel_weights(data: bytes, source: str = "<caffemodel>") -> dict[str, list[np.ndarray]]:
    """{layer name: float32 arrays} straight from caffemodel bytes (V1 or current format).

    This is how weights should be loaded: it reads the values as numpy buffers instead of
    through protobuf objects, which is what makes large models load in seconds (and at all
    on the pure-Python protobuf runtime).
    """
    _require_data(data, source)
    try:
        return _wire.caffemodel_arrays(data)
    except _wire.WireError as exc:
        raise _not_a_caffemodel(source, exc) from None
