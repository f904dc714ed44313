"""Reading prototxts that carry fields no Caffe we know defines.

Forks keep adding parameters to caffe.proto. caffe.proto here knows the widely used ones;
a field (or an enum value) outside it must not stop a model from loading, because the
engine that serves it may not need it (and `runtime: pycaffe` hands the file to the user's
own Caffe untouched). So the prototxt is scanned against our descriptors: each field the
descriptors lack is recorded (where it is, in which layer) and blanked out of the text,
and the rest is parsed as usual. Protobuf's own allow_unknown_field skips such fields
without saying which, and cannot skip an unknown enum value at all; hence this scanner.

The scanner is deliberately small: it follows the text format's structure (names, `:`,
scalars, lists, `{}`/`<>` blocks) and leaves every syntax error to protobuf's parser.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from . import caffe_pb2

log = logging.getLogger(__name__)

# What to do about a layer type no engine here implements: the end of the load error.
WAYS_FORWARD = (
    "no engine here implements it. Three ways to serve it: "
    "(1) runtime: pycaffe with your own Caffe build that has the layer "
    '(options.pycaffe_command: ["/path/to/python", ...], an interpreter whose `import caffe` is that build); '
    '(2) rewrite it as a Python layer: type "Python" with python_param { module: "..." layer: "..." '
    'param_str: "..." }, a class with Caffe\'s setup/reshape/forward in a module in the model directory, '
    "which runs between the engine's parts; "
    "(3) register a runtime plug-in under the `seldon_caffe.runtimes` entry point "
    "(see seldon_caffe/runtimes/registry.py)"
)

_LAYER_MESSAGES = ("caffe.LayerParameter", "caffe.V1LayerParameter")


class UnknownField(NamedTuple):
    """A field (or enum value) of a prototxt that our caffe.proto does not define.

    `path` is the field's place from the NetParameter, e.g. "layer.pooling_param.foo";
    `layer`, `layer_type` and `layer_index` name the enclosing layer (None at net level);
    `line` / `column` are 1-based; `value` is set when the field is known but its enum
    value is not (e.g. `engine: MKL2017`).
    """

    path: str
    line: int
    column: int
    layer: str | None = None
    layer_type: str | None = None
    layer_index: int | None = None
    value: str | None = None

    def describe(self) -> str:
        """One line for logs and `inspect`: what was skipped, and where."""
        what = f"{self.path}: {self.value}" if self.value is not None else self.path
        where = f"line {self.line}"
        if self.layer is not None or self.layer_type is not None:
            where += f", layer {self.layer!r} ({self.layer_type})"
        return f"{what} ({where})"


class _Token(NamedTuple):
    text: str
    start: int
    end: int


class _ScanError(Exception):
    """The text is not well-formed: protobuf's parser will say where and why."""


_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|(?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')|(?P<punct>[{}<>:\[\],;])|(?P<word>[^\s{}<>:\[\],;#"']+)"""
)


def _tokens(text: str) -> tuple[list[_Token], bool]:
    """The tokens, and False if they stop short (an unterminated string, say)."""
    out: list[_Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            return out, False
        if match.lastgroup:
            out.append(_Token(match.group(), match.start(), match.end()))
        pos = match.end()
    return out, True


@dataclass
class _Layer:
    index: int
    name: str | None = None
    type: str | None = None
    found: list[tuple[str, int, str | None]] = field(default_factory=list)  # (path, offset, value)


class _Scanner:
    """Walks the tokens with a stack of descriptors; collects the spans of unknown entries."""

    def __init__(self, text: str, tokens: list[_Token]):
        self.text = text
        self.tokens = tokens
        self.pos = 0
        self.spans: list[tuple[int, int]] = []
        self.layers: list[_Layer] = []
        self.net_level: list[tuple[str, int, str | None]] = []
        self.layer_count = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos].text if self.pos < len(self.tokens) else None

    def take(self) -> _Token:
        if self.pos >= len(self.tokens):
            raise _ScanError(len(self.text))
        self.pos += 1
        return self.tokens[self.pos - 1]

    def message(self, descriptor: Descriptor | None, path: str, layer: _Layer | None, close: str | None) -> None:
        """Fields up to `close` (None: end of text) of a message of type `descriptor`."""
        while True:
            head = self.peek()
            if head == close:
                if close is not None:
                    self.take()
                return
            if head is None or head in "{}<>:[]":
                raise _ScanError(self.pos)
            if head in ",;":
                self.take()
                continue
            self.entry(descriptor, path, layer)

    def entry(self, descriptor: Descriptor | None, path: str, layer: _Layer | None) -> None:
        name = self.take()
        if not re.fullmatch(r"[A-Za-z_]\w*", name.text):
            raise _ScanError(name.start)  # extensions and odd names: protobuf's to judge
        known = descriptor.fields_by_name.get(name.text) if descriptor is not None else None
        where = f"{path}.{name.text}" if path else name.text
        if self.peek() == ":":
            self.take()
        if self.peek() in ("{", "<"):
            close = "}" if self.take().text == "{" else ">"
            child = known.message_type if known is not None and known.message_type is not None else None
            if known is not None and child is not None and child.full_name in _LAYER_MESSAGES:
                self.layer_count += 1
                layer = _Layer(self.layer_count - 1)
                self.layers.append(layer)
            self.message(child, where, layer, close)
        else:
            values = self.values()
            in_layer = descriptor is not None and descriptor.full_name in _LAYER_MESSAGES
            if in_layer and layer is not None and name.text in ("name", "type") and values:
                setattr(layer, name.text, _unquote(values[0].text))
            bad = _unknown_enum_value(known, values)
            if bad is not None:
                self.record(layer, where, name.start, self.tokens[self.pos - 1].end, bad)
        if known is None and descriptor is not None:
            self.record(layer, where, name.start, self.tokens[self.pos - 1].end, None)

    def values(self) -> list[_Token]:
        """A scalar, adjacent strings, or a [list]: the tokens of the values."""
        if self.peek() == "[":
            self.take()
            out = []
            while self.peek() != "]":
                token = self.take()
                if token.text != ",":
                    out.append(token)
            self.take()
            return out
        first = self.take()
        if first.text in "{}<>:[],;":
            raise _ScanError(first.start)
        out = [first]
        while first.text[0] in "\"'" and (self.peek() or " ")[0] in "\"'":
            out.append(self.take())
        return out

    def record(self, layer: _Layer | None, path: str, start: int, end: int, value: str | None) -> None:
        self.spans.append((start, end))
        (layer.found if layer is not None else self.net_level).append((path, start, value))

    def results(self) -> list[UnknownField]:
        found: list[tuple[str, int, str | None, _Layer | None]]
        found = [(path, offset, value, None) for path, offset, value in self.net_level]
        for each in self.layers:
            found += [(path, offset, value, each) for path, offset, value in each.found]
        out = []
        for path, offset, value, owner in sorted(found, key=lambda item: item[1]):
            line = self.text.count("\n", 0, offset) + 1
            column = offset - (self.text.rfind("\n", 0, offset) + 1) + 1
            if owner is None:
                out.append(UnknownField(path, line, column, value=value))
            else:
                out.append(UnknownField(path, line, column, owner.name, owner.type, owner.index, value))
        return out


def _unquote(text: str) -> str:
    return text[1:-1] if text[:1] in "\"'" and len(text) >= 2 else text


def _unknown_enum_value(known: FieldDescriptor | None, values: list[_Token]) -> str | None:
    """The first enum value that names no value of the field's enum (numbers are protobuf's to check)."""
    if known is None or known.enum_type is None:
        return None
    for token in values:
        if re.fullmatch(r"[A-Za-z_]\w*", token.text) and token.text not in known.enum_type.values_by_name:
            return token.text
    return None


class Scan(NamedTuple):
    """What the scanner found: the unknown `fields`, the `text` with them blanked out, and
    whether it followed the whole text (`complete`); if not, it stopped at a syntax error,
    and the fields before it are listed and blanked all the same."""

    fields: list[UnknownField]
    text: str
    complete: bool


def scan(text: str) -> Scan:
    """Find the fields (and enum values) our caffe.proto lacks, and blank them out.

    Blanking keeps every other character (and so every line and column) where it was, so a
    later parse error still points at the user's file.
    """
    tokens, complete = _tokens(text)
    scanner = _Scanner(text, tokens)
    try:
        scanner.message(caffe_pb2.NetParameter.DESCRIPTOR, "", None, None)
    except _ScanError:
        complete = False
    chars = list(text)
    for start, end in scanner.spans:
        for i in range(start, end):
            if chars[i] != "\n":
                chars[i] = " "
    return Scan(scanner.results(), "".join(chars), complete)


def unknown_fields(text: str | bytes) -> list[UnknownField]:
    """The fields (and enum values) of prototxt `text` that our caffe.proto does not define.

    Where the text has a syntax error, those before it (the error is the parser's to report).
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return scan(text).fields


_warned: set[tuple[str, int]] = set()


def warn_once(fields: list[UnknownField], source: str, text: str, first: str = "") -> None:
    """Log the skipped fields of `source` once per process (a load parses a file many times).

    `first` is protobuf's complaint about the first of them, said when the scanner could
    not list them (syntax it does not follow) and protobuf skipped them unnamed.
    """
    key = (source, hash(text))
    if key in _warned:
        return
    _warned.add(key)
    if not fields:
        log.warning("%s: skipped fields that no Caffe fork we know defines, the first: %s", source, first)
        return
    listed = "; ".join(f.describe() for f in fields[:10])
    more = f"; and {len(fields) - 10} more" if len(fields) > 10 else ""
    log.warning(
        "%s: skipped %d field(s) that no Caffe fork we know defines: %s%s. Engines other than pycaffe "
        "ignore them; if one changes what a layer computes, serve the model with runtime: pycaffe and "
        "your own Caffe build (options.pycaffe_command)",
        source,
        len(fields),
        listed,
        more,
    )


def unsupported_types(prototxt: str | os.PathLike[str]) -> list[str]:
    """The layer types of a prototxt that no shape rule here covers (a fork we do not know,
    or a BVLC layer no engine here runs), in order of first use. Runtimes that hand the file
    to the user's own Caffe ask this before describing the net themselves."""
    from .io import read_prototxt  # io and shapes import this module
    from .shapes import SUPPORTED_LAYERS
    from .upgrade import upgrade_net

    net = upgrade_net(read_prototxt(prototxt), os.fspath(prototxt))
    return list(dict.fromkeys(layer.type for layer in net.layer if layer.type not in SUPPORTED_LAYERS))
