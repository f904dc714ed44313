"""Hooks for {{name}}: the code between a Seldon request and the model.

A request flows preprocess -> run_model -> postprocess; setup runs once per worker process.
Every function here is optional: delete one and seldon-caffe's default takes its place. As
written, each one just calls that default, so this file changes nothing until you edit it.

`ctx`, the last argument of every hook, carries:
  ctx.model_dir  this directory (a Path): read label files, vocabularies... from here
  ctx.config     the parsed model.yaml
  ctx.state      whatever setup() returned, shared by all requests of this process
  ctx.meta       the request's Seldon meta; ctx.tags is meta["tags"], where per-request
                 parameters travel ({"meta": {"tags": {"top_k": 5}}, "data": ...})
  ctx.names      the request's feature names (data.names), often []
  ctx.logger     a logger whose lines end up in the pod's log

Raise seldon_caffe.BadRequest("what was expected") to answer HTTP 400 with that message;
any other exception answers 500 naming the hook. The service keeps serving either way.
Try it without a server: `seldon-caffe predict . --data '[[...]]'`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from seldon_caffe.hooks import Context, default_postprocess, default_preprocess, default_run_model
from seldon_caffe.runtimes import Runtime


def setup(ctx: Context) -> Any:
    """Once per worker process, after the model loaded; the return value becomes ctx.state.

    Load what every request needs here (labels, a tokenizer, a lookup table), not per request.
    """
    return None


def preprocess(payload: Any, ctx: Context) -> np.ndarray | dict[str, np.ndarray]:
    """The request's data, as Seldon delivers it, -> the model's inputs.

    payload is an ndarray (data.ndarray / tensor / tftensor), str (strData), bytes (binData)
    or dict (jsonData). Return one array for a single-input model, else {input name: array}.
    The default takes arrays, and binData holding a .npy/.npz file. Binary payloads are much
    cheaper than JSON lists for images: decode them here with seldon_caffe.decode_image, which
    checks the image's declared size before decoding it.
    """
    return default_preprocess(payload, ctx)


def run_model(model: Runtime, inputs: Any, ctx: Context) -> dict[str, np.ndarray]:
    """Run the model; the default is model.run(inputs) -> {output name: array}.

    Override to call model.run several times (tiling, ensembles), to ask for particular
    outputs (model.run(inputs, outputs=["prob"])) or to change weights first with
    model.set_weights(layer, arrays) where the runtime allows (pycaffe, opencv).
    model.inputs / model.outputs list the signature; model.run is thread-safe.
    """
    return default_run_model(model, inputs, ctx)


def postprocess(outputs: dict[str, np.ndarray], ctx: Context) -> Any:
    """{output name: array} -> the answer: an array, a str, bytes, or a JSON-able dict/list.

    The default returns the array of a single-output model, else {name: nested list}.
    """
    return default_postprocess(outputs, ctx)
