"""`seldon-caffe weights PROTOTXT -o WEIGHTS.caffemodel [--seed N]`: random weights for a bare net.

A prototxt alone cannot be served (every runtime loads a caffemodel), and someone trying the
project with a net from a paper or the model zoo rarely has the trained weights at hand. Random
weights answer nothing meaningful, but they exercise everything else: serving, hooks, shapes,
speed, and a runtime's agreement with real Caffe.

Random, but not arbitrary: with naive weights a deep net's activations vanish or blow up, its
softmax saturates, and every runtime "agrees" on a one-hot answer. So the net is run layer by
layer on a small random batch, each layer as its own one-layer OpenCV net (OpenCV comes with
every install; one layer at a time, because OpenCV packs a layer's weights when it loads, and
each layer must see its predecessors' final weights):

* Convolution, Deconvolution and InnerProduct: Gaussian weights over the fan-in and small
  biases, then W and b divided by the spread of the layer's output, which then has unit
  spread exactly (the output is linear in W and b);
* BatchNorm: its input's own mean and variance, stored times a moving-average factor other
  than 1, as trained nets store them; Scale, Bias and PReLU: values near their identity;
  Normalize (caffe-ssd's L2 norm): a positive scale near 20, where SSD trains it; the forks'
  BN (SegNet, PSPNet): scale near 1, small shift, and the input's own statistics, folded
  into scale and shift for SegNet's INFERENCE mode as SegNet's compute_bn_statistics.py does.

A fork layer OpenCV lacks (BN, Upsample, ...) runs through our own ONNX conversion in
onnxruntime when that is installed, so a SegNet is measured all the way; ROIPooling's ROIs
are random boxes on the map, with valid batch indices.

This is the fill the conformance tests make inside real Caffe (caffe_oracle/reference_root.py),
done here with our own writer. The same seed gives the same file on one machine; on another CPU
the measured spreads, and so the weights, may differ in the last bits.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .caffe import CaffeNet, caffe_pb2, load_caffe_net
from .caffe.forks import FORK_SHAPE_RULES
from .caffe.net import WeightsError
from .errors import SeldonCaffeError, first_line
from .paths import check_output_path

NORMALISED = ("Convolution", "Deconvolution", "InnerProduct", "ConvolutionDepthwise", "DepthwiseConvolution")
BATCH = 2  # enough for BatchNorm's statistics, small enough for any net


def register(sub: argparse._SubParsersAction) -> None:
    """Add `weights` to the `seldon-caffe` command."""
    parser = sub.add_parser(
        "weights",
        help="random weights for a prototxt (to serve a net whose trained weights you do not have)",
        description="Write a caffemodel of random weights for PROTOTXT, scaled so every layer's output keeps "
        "unit spread on random inputs. The answers mean nothing; serving, hooks and speed work as with "
        "trained weights.",
    )
    parser.add_argument("prototxt", type=Path, help="the net definition (deploy.prototxt)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .caffemodel to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    parser.set_defaults(handler=weights_command)


def weights_command(args: argparse.Namespace) -> int:
    check_output_path(args.output)
    if args.output.exists() and not args.force:
        raise SeldonCaffeError(f"{args.output} exists; pass --force to replace it")
    started = time.perf_counter()
    net = load_caffe_net(args.prototxt)
    unmeasured = fill_random_weights(net, args.seed)
    data = net.caffemodel_bytes()
    partial = args.output.with_name(f".{args.output.name}.{os.getpid()}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, args.output)
    finally:
        partial.unlink(missing_ok=True)
    if unmeasured:
        print(f"seldon-caffe: warning: {unmeasured}", file=sys.stderr)
    print(
        f"wrote {args.output}: random weights (seed {args.seed}) for {args.prototxt.name}, "
        f"{len(data) / 2**20:.1f} MiB ({time.perf_counter() - started:.1f} s); the answers mean nothing"
    )
    return 0


def fill_random_weights(net: CaffeNet, seed: int = 0) -> str | None:
    """Give every learned blob of `net` random values at unit spread (see the module docstring).

    Returns None, or a sentence naming the layer OpenCV could not run, after which layers
    were filled by their fan-in alone.
    """
    rng = np.random.RandomState(seed)
    blobs: dict[str, np.ndarray | None] = {
        name: _random_input(net, name, shape, rng) for name, shape in _measured_shapes(net).items()
    }
    unmeasured = None
    for layer in net.definition.layer:
        if layer.type == "Input":
            continue
        bottoms = [blobs.get(b) for b in layer.bottom]
        known = all(b is not None for b in bottoms)
        arrays = _fill(net, layer, bottoms if known else None, rng)
        tops: list[np.ndarray] | None = None
        if known:
            try:
                tops = _run_layer(net, layer, [b for b in bottoms if b is not None])  # all are, when known
            except Exception as exc:  # OpenCV raises cv2.error for what it cannot run
                why = first_line(exc, 120, last=True)
                unmeasured = unmeasured or (
                    f"OpenCV cannot run layer {layer.name!r} ({layer.type}: {why}); "
                    "the layers after it got weights scaled by their fan-in only"
                )
        if tops is not None and arrays is not None and layer.type in NORMALISED:
            spread = float(tops[0].std())
            if spread > 0:  # (Wx + b) / s: unit spread, exactly
                net.set_weights(layer.name, [a / spread for a in arrays])
                tops = [tops[0] / spread, *tops[1:]]
        values: list[np.ndarray | None] = list((tops or [])[: len(layer.top)])  # OpenCV may add outputs
        blobs.update(zip(layer.top, values + [None] * (len(layer.top) - len(values)), strict=True))
    return unmeasured


def _measured_shapes(net: CaffeNet) -> dict[str, tuple[int, ...]]:
    """The input shapes to measure spreads at: the declared ones, except that a placeholder
    (OpenPose's 1x3x1x1, sized by the caller) takes the size the runtimes warm up at, so
    that pooling and convolutions see real planes."""
    from .runtimes.caffe_model import CaffeModel

    try:
        return dict(CaffeModel.from_net(net).warm_shapes)
    except SeldonCaffeError:  # a net whose shapes we cannot plan: measure as declared
        return dict(net.input_shapes)


def _random_input(net: CaffeNet, name: str, shape: Sequence[int], rng: np.random.RandomState) -> np.ndarray:
    """Standard normal values, or valid indices where an Embed layer reads the input."""
    shape = (BATCH, *shape[1:])
    embeds = [la.embed_param.input_dim for la in net.definition.layer if la.type == "Embed" and name in la.bottom]
    if embeds:
        return rng.randint(0, min(embeds), shape).astype(np.float32)
    pools = [la for la in net.definition.layer if la.type == "ROIPooling" and la.bottom[1:2] == [name]]
    if pools:
        return _random_rois(net, pools[0], shape[0], rng).reshape(shape)
    return rng.standard_normal(shape).astype(np.float32)


def _random_rois(net: CaffeNet, pool: caffe_pb2.LayerParameter, count: int, rng: np.random.RandomState) -> np.ndarray:
    """[count, 5] boxes (batch index, x1, y1, x2, y2) inside the image ROIPooling's map covers."""
    height, width = net.shapes[pool.bottom[0]][2:]
    extent = np.array([width, height, width, height]) / max(pool.roi_pooling_param.spatial_scale, 1e-6)
    corners = np.sort(rng.uniform(0, 1, (count, 2, 2)), axis=1).reshape(count, 4)[:, [0, 2, 1, 3]] * extent
    return np.column_stack([rng.randint(0, BATCH, count), corners]).astype(np.float32)


def _fill(
    net: CaffeNet, layer: caffe_pb2.LayerParameter, bottoms: list | None, rng: np.random.RandomState
) -> list | None:
    """Set the layer's random blobs (before normalisation); None for a layer that learns nothing
    or whose blobs a layer before it already set (shared params)."""
    try:
        shapes = net.weight_shapes(layer.name)
    except WeightsError:
        return None
    try:
        net.get_weights(layer.name)
        return None  # shared with an earlier layer, which filled them
    except ValueError:
        pass
    if layer.type == "BatchNorm":
        arrays = _batchnorm(shapes, bottoms[0] if bottoms else None, rng)
    elif layer.type == "BN":
        arrays = _fork_bn(layer, shapes, bottoms[0] if bottoms else None, rng)
    else:
        arrays = [_blob(layer.type, k, shape, rng) for k, shape in enumerate(shapes)]
    arrays = [np.asarray(a, np.float32) for a in arrays]
    net.set_weights(layer.name, arrays)
    return arrays


def _blob(kind: str, index: int, shape: Sequence[int], rng: np.random.RandomState) -> np.ndarray:
    if kind == "Scale" and index == 0:
        return rng.uniform(0.5, 1.5, shape)
    if kind == "PReLU":
        return rng.uniform(0.05, 0.5, shape)
    if kind == "Normalize":  # SSD starts its L2-norm scale at 20 (conv4_3_norm) and it stays near there
        return rng.uniform(15.0, 25.0, shape)
    if index == 0 and len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        return rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)  # He: unit spread through a ReLU
    return rng.normal(0.0, 0.2 if kind in ("Scale", "Bias") else 0.01, shape)


def _batchnorm(shapes: Sequence[Sequence[int]], bottom: np.ndarray | None, rng: np.random.RandomState) -> list:
    """mean * f, variance * f and f: Caffe divides the moving-average factor f out."""
    channels = shapes[0][0]
    mean, var = _channel_statistics(bottom, channels)
    factor = rng.uniform(0.5, 2.0)
    return [mean * factor, var * factor, np.full(shapes[2], factor)]


def _channel_statistics(bottom: np.ndarray | None, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance (+ 1e-2) of a normalisation layer's input, as training
    would have stored them; 0 and 1 where the input could not be computed."""
    if bottom is None:
        return np.zeros(channels), np.ones(channels)
    x = np.moveaxis(bottom, 1, 0).reshape(channels, -1)
    return x.mean(axis=1), x.var(axis=1) + 1e-2


def _fork_bn(
    layer: caffe_pb2.LayerParameter,
    shapes: Sequence[Sequence[int]],
    bottom: np.ndarray | None,
    rng: np.random.RandomState,
) -> list:
    """SegNet's [scale, shift] or PSPNet's [scale, shift, mean, variance], each (1, C, 1, 1)."""
    channels = shapes[0][1]
    scale, shift = rng.uniform(0.5, 1.5, channels), rng.normal(0.0, 0.2, channels)
    mean, var = _channel_statistics(bottom, channels)
    if len(shapes) == 4:
        arrays = [scale, shift, mean, var]
    elif layer.bn_param.bn_mode == caffe_pb2.BNParameter.INFERENCE:  # statistics folded in
        arrays = [scale / np.sqrt(var), shift - mean * scale / np.sqrt(var)]
    else:
        arrays = [scale, shift]
    return [a.reshape(1, channels, 1, 1) for a in arrays]


def _run_layer(net: CaffeNet, layer: caffe_pb2.LayerParameter, bottoms: list[np.ndarray]) -> list[np.ndarray]:
    """The layer's tops, computed by a one-layer OpenCV net fed with `bottoms` (or, for a
    fork layer OpenCV lacks, by its ONNX conversion in onnxruntime, when installed; a Python
    layer by its own class, from the prototxt's directory, as serving runs it)."""
    if layer.type == "Python":
        from .caffe.python_layer import PythonLayer

        code = PythonLayer(layer, [b.shape for b in bottoms], Path(net.source).parent)
        return code.run(bottoms)
    single, values = _single_layer_net(net, layer, bottoms)
    try:
        return _run_in_opencv(single, layer, values)
    except Exception:
        if layer.type not in FORK_SHAPE_RULES or importlib.util.find_spec("onnxruntime") is None:
            raise
        return _run_in_onnxruntime(single, values)


def _single_layer_net(
    net: CaffeNet, layer: caffe_pb2.LayerParameter, bottoms: list[np.ndarray]
) -> tuple[CaffeNet, dict[str, np.ndarray]]:
    """The layer alone, its bottoms as inputs, with its weights; and the values to feed."""

    definition = caffe_pb2.NetParameter(name=layer.name)
    values = dict(zip(layer.bottom, bottoms, strict=True))  # a blob read twice is fed once
    if values:
        feed = definition.layer.add(name="__input", type="Input")
        for name, value in values.items():
            feed.top.append(name)
            feed.input_param.shape.add(dim=list(value.shape))
    definition.layer.add().CopyFrom(layer)
    single = CaffeNet(definition, source=f"<layer {layer.name}>")
    try:
        single.set_weights(layer.name, net.get_weights(layer.name))
    except WeightsError:
        pass  # learns nothing
    return single, values


def _run_in_opencv(single: CaffeNet, layer: caffe_pb2.LayerParameter, values: dict) -> list[np.ndarray]:
    import cv2

    model = bytearray(single.caffemodel_bytes())
    cv_net = cv2.dnn.readNetFromCaffe(bytearray(single.prototxt_bytes()), model)  # type: ignore[call-overload]  # buffers: cv2 stubs know only str and arrays
    for name, value in values.items():
        cv_net.setInput(np.ascontiguousarray(value, np.float32), name)
    # OpenCV may rename the one layer (after its top, e.g. hed's score-dsn1 -> score-dsn1-up):
    # it is the last one the net lists, whatever its name.
    outputs = cv_net.forwardAndRetrieve([cv_net.getLayerNames()[-1]])[0]
    return [np.asarray(o, np.float32) for o in outputs]


def _run_in_onnxruntime(single: CaffeNet, values: dict) -> list[np.ndarray]:
    import onnxruntime

    from .caffe.to_onnx import caffe_to_onnx

    model = caffe_to_onnx(single)  # at the values' own shapes: the single net declares them
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(o, np.float32) for o in session.run(None, values)]
