# ruff: noqa: UP004, UP031, B905 -- Python 3.6 style on purpose: this file runs in old interpreters
"""The pycaffe worker: one Caffe net served over a pipe to a seldon-caffe process.

Why a separate process: pycaffe exists for old Pythons only (Debian's is 3.9, conda's
often 3.6/3.7), while the service runs on 3.12. The worker runs in any interpreter that
has pycaffe: `CMD... -c <this file's source>`, so the file need not exist where the
interpreter lives (a chroot, a container, a conda env). Hence the rules for this file:
Python 3.6+, the standard library, numpy and caffe only, and nothing from seldon_caffe.

It receives the net's files as bytes, not paths, for the same reason.

The wire format, shared with the client in `pycaffe.py` (which imports this module):
a frame is a 4-byte big-endian length, a JSON header of that length, then the raw bytes
of the arrays the header lists under "arrays" (dtype string and shape each), in order.
Arrays never go through JSON or pickle: a 224x224 image batch is one write and one read.

Requests: {"op": "load", "python_path": [dirs]} + [prototxt bytes, caffemodel bytes] as uint8
arrays (python_path: where the net's Python layers' modules are, as this process sees it);
{"op": "run", "inputs": [names], "outputs": [names]} + input arrays;
{"op": "get_weights", "layer": name}; {"op": "set_weights", "layer": name} + arrays;
{"op": "close"}. Replies: {"ok": true, ...} + arrays, or {"ok": false, "kind":
"bad_request" | "error", "error": message}.
"""

import json
import os
import shutil
import struct
import sys
import tempfile
import types

import numpy

_LENGTH = struct.Struct(">I")
TMP_PREFIX = "seldon-caffe-worker-"


class RequestError(Exception):
    """The request is wrong (unknown layer, wrong weight shape): the caller's fault."""


# -- framing (used on both ends of the pipe) -----------------------------------------------


def write_frame(stream, header, arrays=()):
    """Write one frame: header dict plus arrays, each sent as its raw bytes."""
    arrays = [numpy.asarray(a, order="C") for a in arrays]  # (ascontiguousarray makes 0-d 1-d)
    header = dict(header)
    header["arrays"] = [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays]
    body = json.dumps(header).encode("utf-8")
    stream.write(_LENGTH.pack(len(body)) + body)
    for array in arrays:
        if array.size:
            stream.write(memoryview(array.reshape(-1)).cast("B"))
    stream.flush()


def read_frame(stream):
    """Read one frame; None when the other end closed the pipe between frames."""
    prefix = _read_exact(stream, _LENGTH.size, allow_eof=True)
    if prefix is None:
        return None
    (length,) = _LENGTH.unpack(prefix)
    header = json.loads(_read_exact(stream, length).decode("utf-8"))
    arrays = []
    for spec in header.pop("arrays", []):
        array = numpy.empty(spec["shape"], dtype=numpy.dtype(spec["dtype"]))
        if array.size:
            _read_into(stream, memoryview(array.reshape(-1)).cast("B"))
        arrays.append(array)
    return header, arrays


def _read_exact(stream, size, allow_eof=False):
    buffer = bytearray(size)
    got = _read_into(stream, memoryview(buffer), allow_eof)
    return None if got == 0 and allow_eof else bytes(buffer)


def _read_into(stream, view, allow_eof=False):
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])
        if not n:
            if allow_eof and got == 0:
                return 0
            raise EOFError("pipe closed after %d of %d bytes" % (got, len(view)))
        got += n
    return got


# -- the net -------------------------------------------------------------------------------


def set_batch(prototxt_text, batch):
    """The prototxt with the first dimension of every input set to `batch`.

    Caffe allocates every blob at the declared batch when it builds a net, and never
    shrinks a blob's allocation afterwards: a deploy prototxt declaring batch 10000
    (mnist_siamese) would cost gigabytes however small the requests. All three input
    forms are handled: Input layers, `input_shape`, and the legacy `input_dim` quadruples.
    """
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format

    net = caffe_pb2.NetParameter()
    text_format.Merge(prototxt_text, net)
    shapes = list(net.input_shape)
    for layer in net.layer:
        if layer.type == "Input":
            shapes.extend(layer.input_param.shape)
    for shape in shapes:
        if len(shape.dim):
            shape.dim[0] = batch
    for i in range(0, len(net.input_dim), 4):
        net.input_dim[i] = batch
    return text_format.MessageToString(net)


def remove_stale_dirs():
    """Remove the temporary folders of workers that died while loading.

    Caffe reads the net from files, and a CHECK failure while it builds the net (say, an
    unknown layer type) aborts the process before it can clean up: up to a caffemodel's
    size left in /tmp each time. A folder is stale when the pid in its name is gone.
    """
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        if not name.startswith(TMP_PREFIX):
            continue
        try:
            os.kill(int(name[len(TMP_PREFIX) :].split("-")[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
        except (ValueError, OSError):
            pass  # not ours, or alive under another user


class NetHandler(object):
    """One loaded Caffe net and the operations of the protocol on it.

    Also used directly (no pipe) by the in-process pycaffe runtime, so both modes run the
    same code. Not thread-safe: callers serialise.
    """

    def __init__(self, caffe, prototxt, weights):
        self.caffe = caffe
        text = prototxt.decode("utf-8")
        remove_stale_dirs()
        with tempfile.TemporaryDirectory(prefix="%s%d-" % (TMP_PREFIX, os.getpid())) as tmp:
            net_path = os.path.join(tmp, "net.prototxt")
            weights_path = os.path.join(tmp, "weights.caffemodel")
            with open(net_path, "w") as f:
                f.write(set_batch(text, 1))
            with open(weights_path, "wb") as f:
                f.write(weights)
            self.net = caffe.Net(net_path, weights_path, caffe.TEST)

    def describe(self):
        net = self.net
        types_ = dict(zip(net._layer_names, [layer.type for layer in net.layers]))
        return {
            "inputs": [{"name": n, "shape": list(net.blobs[n].data.shape)} for n in net.inputs],
            "outputs": [{"name": n, "shape": list(net.blobs[n].data.shape)} for n in self.outputs(types_)],
            "layers": [[name, types_[name]] for name in net._layer_names],
            "blobs": [{"name": n, "shape": list(blob.data.shape)} for n, blob in net.blobs.items()],
        }

    def outputs(self, types_):
        """net.outputs, plus the blobs only a Silence layer reads: Silence marks a blob unused
        on purpose, often the net's very answer (colorization's class8_ab). A blob that other
        layers read too reaches Silence through a Split's top, which is no answer."""
        net = self.net
        split = set()
        silenced = []
        for name in net._layer_names:
            if types_[name] == "Split":
                split.update(net.top_names[name])
            elif types_[name] == "Silence":
                silenced.extend(net.bottom_names[name])
        extra = [b for b in silenced if b not in split and b not in net.outputs]
        return list(net.outputs) + sorted(set(extra))

    def run(self, names, arrays, outputs):
        """Forward the net on `arrays` (any batch size); returns views of the output blobs."""
        net = self.net
        reshaped = False
        for name, array in zip(names, arrays):
            blob = net.blobs[name]
            if blob.data.shape != array.shape:
                blob.reshape(*array.shape)
                reshaped = True
        if reshaped:
            net.reshape()
        for name, array in zip(names, arrays):
            net.blobs[name].data[...] = array
        net.forward()
        return [net.blobs[name].data for name in outputs]

    def _params(self, layer):
        if layer not in self.net.params:
            known = ", ".join(list(self.net.params)[:20])
            raise RequestError("no layer %r with weights; layers with weights: %s" % (layer, known))
        return self.net.params[layer]

    def get_weights(self, layer):
        return [blob.data.copy() for blob in self._params(layer)]

    def set_weights(self, layer, arrays):
        blobs = self._params(layer)
        if len(arrays) != len(blobs):
            raise RequestError("layer %r has %d weight arrays, got %d" % (layer, len(blobs), len(arrays)))
        for i, (blob, array) in enumerate(zip(blobs, arrays)):
            if tuple(blob.data.shape) != tuple(array.shape):
                want, got = list(blob.data.shape), list(array.shape)
                raise RequestError("layer %r weights[%d] has shape %s, expected %s" % (layer, i, got, want))
        for blob, array in zip(blobs, arrays):
            blob.data[...] = array

    def handle(self, header, arrays):
        """Answer one request: returns (reply header, reply arrays)."""
        op = header.get("op")
        if op == "run":
            return {"ok": True}, self.run(header["inputs"], arrays, header["outputs"])
        if op == "get_weights":
            return {"ok": True}, self.get_weights(header["layer"])
        if op == "set_weights":
            self.set_weights(header["layer"], arrays)
            return {"ok": True}, []
        raise RequestError("unknown op %r" % (op,))


# -- the process ---------------------------------------------------------------------------


def import_caffe(light=False):
    """Import pycaffe, CPU mode. `light`: without `caffe.io` (worker processes only).

    caffe.io holds image helpers that import scikit-image and matplotlib: about one
    second of worker start-up (and restart) for code the worker never calls. In a
    process that other code shares, the real module is left alone.
    """
    if light:
        sys.modules.setdefault("caffe.io", types.ModuleType("caffe.io"))
    import caffe

    caffe.set_mode_cpu()
    return caffe


def add_python_path(entries):
    """Put the model directory first on sys.path, where Caffe imports a Python layer's module
    (python_param.module) from. For good: this process serves that one model."""
    for entry in reversed(entries):
        if entry not in sys.path:
            sys.path.insert(0, entry)


def serve(inp, out, caffe):
    """Answer requests until `close` or until the parent closes the pipe."""
    handler = None
    while True:
        frame = read_frame(inp)
        if frame is None:
            return
        header, arrays = frame
        try:
            if header.get("op") == "close":
                write_frame(out, {"ok": True})
                return
            if header.get("op") == "load":
                add_python_path(header.get("python_path") or [])
                handler = NetHandler(caffe, arrays[0].tobytes(), arrays[1].tobytes())
                reply, results = dict(handler.describe(), ok=True), []
            elif handler is None:
                raise RequestError("no net loaded")
            else:
                reply, results = handler.handle(header, arrays)
        except RequestError as exc:
            reply, results = {"ok": False, "kind": "bad_request", "error": str(exc)}, []
        except Exception as exc:  # the worker survives a failed request; the client reports it
            reply, results = {"ok": False, "kind": "error", "error": "%s: %s" % (type(exc).__name__, exc)}, []
        write_frame(out, reply, results)


def main():
    # The protocol gets private copies of fds 0 and 1; fd 1 then points at stderr, so
    # whatever Caffe, glog or a stray print writes to stdout cannot corrupt a frame.
    inp = os.fdopen(os.dup(0), "rb")
    out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("GLOG_logtostderr", "1")
    serve(inp, out, import_caffe(light=True))


if __name__ == "__main__":
    main()
