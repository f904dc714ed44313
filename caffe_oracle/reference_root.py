# ruff: noqa: B905 -- this file runs on Python 3.9, where zip() has no strict=
"""The half of `caffe_oracle.reference` that runs inside the real-Caffe root.

`reference.run_jobs` copies this file and seldon_caffe's `runtimes/pycaffe_worker.py` into a
fresh directory under the root's /tmp and runs it there with the root's Python 3.9 and real pycaffe: it
reads jobs.json and in.npz, runs each job with Caffe's own code, and writes results.json
and out.npz. Only the standard library and numpy are imported at the top, so that our
Python 3.12 can import it too (for `describe_proto`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

CALIBRATION_BATCH = 2


def _root_main(work: str) -> None:
    sys.path.insert(0, work)
    import caffe  # only inside the root

    caffe.set_mode_cpu()
    ops = {
        "weights": _root_weights,
        "forward": _root_forward,
        "params": _root_params,
        "shapes": _root_shapes,
        "time": _root_time,
        "proto": _root_proto,
    }
    with open(os.path.join(work, "jobs.json")) as f:
        jobs = json.load(f)
    with np.load(os.path.join(work, "in.npz")) as npz:
        arrays = {key: npz[key] for key in npz.files}
    results, out_arrays = [], {}
    for i, job in enumerate(jobs):
        feed = {name: arrays[key] for name, key in job["inputs"].items()}
        print(f"job {i}: {job['op']} {job['source']}", file=sys.stderr, flush=True)  # names a crash
        results.append(ops[job["op"]](caffe, job, feed, out_arrays, f"j{i}_"))
    np.savez(os.path.join(work, "out.npz"), **out_arrays)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f)


def _root_net(caffe: Any, job: dict[str, Any], batch: int | None, weights: bool = True) -> Any:
    """The net at input batch `batch`, or exactly as its file declares it (None)."""
    from pycaffe_worker import set_batch

    path = job["prototxt"]
    if batch is not None:
        with open(job["prototxt"]) as f:
            text = set_batch(f.read(), batch)
        path = job["prototxt"] + f".b{batch}.prototxt"
        with open(path, "w") as f:
            f.write(text)
    return caffe.Net(path, job["weights"], caffe.TEST) if weights else caffe.Net(path, caffe.TEST)


def _root_inputs(net: Any, rng: np.random.RandomState) -> dict[str, np.ndarray]:
    """N(0, 1) for every input, except valid indices for an input that feeds an Embed."""
    embeds = {}
    for name, layer in zip(net._layer_names, net.layers):
        if layer.type == "Embed":
            embeds[net.bottom_names[name][0]] = net.params[name][0].data.shape[0]
    feed = {}
    for name in net.inputs:
        shape = net.blobs[name].data.shape
        if name in embeds:
            feed[name] = rng.randint(0, embeds[name], size=shape).astype(np.float32)
        else:
            feed[name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def _set_inputs(net: Any, feed: Mapping[str, np.ndarray]) -> None:
    """Feed the inputs, reshaping the net first where one differs from the declared shape
    (another image size, or the real size of a placeholder input such as OpenPose's
    1x3x1x1), as Caffe's callers do: blob.reshape then net.reshape."""
    resized = [name for name, value in feed.items() if net.blobs[name].data.shape != np.shape(value)]
    for name in resized:
        net.blobs[name].reshape(*np.shape(feed[name]))
    if resized:
        net.reshape()
    for name, value in feed.items():
        net.blobs[name].data[...] = value


def _root_weights(caffe: Any, job: dict, feed: dict, out: dict, prefix: str) -> dict:
    net = _root_net(caffe, job, CALIBRATION_BATCH, weights=False)
    rng = np.random.RandomState(job["seed"])
    _set_inputs(net, _root_inputs(net, rng))
    seen = set()  # shared parameters (siamese branches) are filled once
    for i, (name, layer) in enumerate(zip(net._layer_names, net.layers)):
        blobs = [b for b in layer.blobs if b.data.ctypes.data not in seen]
        seen.update(b.data.ctypes.data for b in blobs)
        if layer.type == "BatchNorm" and blobs:
            _fill_batchnorm(blobs, net.blobs[net.bottom_names[name][0]].data, rng)
        elif blobs:
            _fill_random(layer.type, blobs, rng)
        net._forward(i, i)
        if blobs and layer.type in ("Convolution", "Deconvolution", "InnerProduct"):
            spread = float(net.blobs[net.top_names[name][0]].data.std())
            if spread > 0:  # (Wx + b) / s: the output gets unit spread, exactly
                for blob in blobs:
                    blob.data[...] /= spread
                net._forward(i, i)
    net.save(job["out"])
    return {}


def _fill_random(kind: str, blobs: list, rng: np.random.RandomState) -> None:
    for k, blob in enumerate(blobs):
        shape = blob.data.shape
        if kind == "Scale" and k == 0:
            value = rng.uniform(0.5, 1.5, shape)
        elif kind == "PReLU":
            value = rng.uniform(0.05, 0.5, shape)
        elif k == 0 and len(shape) >= 2:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        else:
            value = rng.normal(0.0, 0.2, shape)
        blob.data[...] = value


def _fill_batchnorm(blobs: list, bottom: np.ndarray, rng: np.random.RandomState) -> None:
    # Caffe stores mean * f, var * f and f (the moving-average factor), and divides by f.
    channels = bottom.shape[1]
    x = np.moveaxis(bottom, 1, 0).reshape(channels, -1)
    var = x.var(axis=1) * rng.uniform(0.8, 1.25, channels) + 1e-2
    mean = x.mean(axis=1) + rng.normal(0.0, 0.1, channels) * np.sqrt(var)
    factor = rng.uniform(0.5, 2.0)
    blobs[0].data[...] = mean * factor
    blobs[1].data[...] = var * factor
    blobs[2].data[...] = factor


def _root_forward(caffe: Any, job: dict, feed: dict, out: dict, prefix: str) -> dict:
    batch = next(iter(feed.values())).shape[0] if feed else job["batch"]
    net = _root_net(caffe, job, batch)
    feed = feed or _root_inputs(net, np.random.RandomState(job["seed"]))
    _set_inputs(net, feed)
    net.forward()
    result: dict[str, Any] = {"kind": "arrays", "inputs": {}, "outputs": {}}
    for part, names in (("inputs", list(feed)), ("outputs", job["outputs"] or net.outputs)):
        for k, name in enumerate(names):
            key = f"{prefix}{part}{k}"
            out[key] = feed[name] if part == "inputs" else net.blobs[name].data.copy()
            result[part][name] = key
    return result


def _root_params(caffe: Any, job: dict, feed: dict, out: dict, prefix: str) -> dict:
    net = _root_net(caffe, job, 1)
    result: dict[str, Any] = {"kind": "arrays", "params": {}}
    for i, (layer, blobs) in enumerate(net.params.items()):
        result["params"][layer] = []
        for k, blob in enumerate(blobs):
            out[f"{prefix}p{i}_{k}"] = blob.data.copy()
            result["params"][layer].append(f"{prefix}p{i}_{k}")
    return result


def _root_shapes(caffe: Any, job: dict, feed: dict, out: dict, prefix: str) -> dict:
    net = _root_net(caffe, job, job["batch"], weights=False)
    return {
        "blobs": {name: list(blob.data.shape) for name, blob in net.blobs.items()},
        "inputs": list(net.inputs),
        "outputs": list(net.outputs),
        "layers": [[name, layer.type] for name, layer in zip(net._layer_names, net.layers)],
        "params": {name: [list(b.data.shape) for b in blobs] for name, blobs in net.params.items()},
    }


def _root_time(caffe: Any, job: dict, feed: dict, out: dict, prefix: str) -> dict:
    net = _root_net(caffe, job, job["batch"])
    _set_inputs(net, _root_inputs(net, np.random.RandomState(0)))
    for _ in range(job["warmup"]):
        net.forward()
    times: list[float] = []
    while len(times) < job["repeats"] or (sum(times) < job["min"] and len(times) < 1000):
        start = time.perf_counter()
        net.forward()
        times.append(time.perf_counter() - start)
    return {"times": times}


def _root_proto(caffe: Any, job: dict, feed: dict, out: dict, prefix: str) -> dict:
    from caffe.proto import caffe_pb2

    return describe_proto(caffe_pb2.DESCRIPTOR)


def describe_proto(file_descriptor: Any) -> dict[str, Any]:
    """{message: {"fields": {name: [number, type, label, packed, type name, default]}}, enum: {"values": ...}}.

    Plain data, so that Caffe's compiled caffe.proto (inside the root) and ours can be compared.
    """
    out: dict[str, Any] = {}

    def enum(descriptor: Any) -> None:
        out[descriptor.full_name] = {"values": {v.name: v.number for v in descriptor.values}}

    def message(descriptor: Any) -> None:
        fields = {}
        for f in descriptor.fields:
            type_name = (f.message_type or f.enum_type).full_name if (f.message_type or f.enum_type) else ""
            default = f.default_value if f.has_default_value else None
            fields[f.name] = [f.number, f.type, f.label, f.GetOptions().packed, type_name, default]
        out[descriptor.full_name] = {"fields": fields}
        for nested in descriptor.nested_types:
            message(nested)
        for nested in descriptor.enum_types:
            enum(nested)

    for descriptor in file_descriptor.message_types_by_name.values():
        message(descriptor)
    for descriptor in file_descriptor.enum_types_by_name.values():
        enum(descriptor)
    return out


if __name__ == "__main__":
    _root_main(sys.argv[1])
