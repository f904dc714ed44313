"""Hooks for the end-to-end tests: every payload kind, a double run, weights from a tag."""

import json
import threading

import numpy as np

from seldon_caffe import BadRequest
from seldon_caffe.hooks import decode_numpy


def setup(ctx):
    # One lock for the "change weights, then run" requests: the weights are process-wide.
    return {"lock": threading.Lock(), "kinds": []}


def preprocess(payload, ctx):
    ctx.state["kinds"].append(type(payload).__name__)
    if isinstance(payload, str):  # strData: a JSON array
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError:
            raise BadRequest("strData must be a JSON array of shape (N, 1, 28, 28)") from None
    elif isinstance(payload, bytes):  # binData: a .npy file
        payload = decode_numpy(payload)
    elif isinstance(payload, dict):  # jsonData: {"image": [...]}
        payload = payload["image"]
    return np.asarray(payload, dtype=np.float32)


def run_model(model, inputs, ctx):
    tags = ctx.tags
    if tags.get("fail"):
        raise RuntimeError("asked to fail")
    if tags.get("twice"):
        # Run the model twice: on the input and on the mirrored input, and average.
        first = model.run(inputs)["prob"]
        second = model.run(inputs[..., ::-1].copy())["prob"]
        return {"prob": (first + second) / 2}
    if "ip2_scale" in tags:
        with ctx.state["lock"]:
            weights = model.get_weights("ip2")
            scale = float(tags["ip2_scale"])
            model.set_weights("ip2", [w * scale for w in weights])
            try:
                return model.run(inputs)
            finally:
                model.set_weights("ip2", weights)
    return model.run(inputs)


def postprocess(outputs, ctx):
    return outputs["prob"]
