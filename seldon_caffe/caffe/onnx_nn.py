"""ONNX converters for Caffe's learned and windowed layers: convolution, pooling, LRN,
InnerProduct, Embed, BatchNorm, Scale / Bias, PReLU, MVN, Softmax.

Each one restates Caffe 1.0's forward pass exactly, not its nearest ONNX cousin: pooling
gets explicit end pads so ONNX never rounds, and a divisor map where Caffe's average window
is clipped; BatchNorm divides out the moving-average factor; MVN adds eps to the standard
deviation, not to the variance; within-channel LRN is Caffe's own pooling-and-power form.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._geometry import ConvGeometry, canonical_axis, operand_shape
from .onnx_graph import LayerView, converts

_MAX, _AVE, _STOCHASTIC = 0, 1, 2  # PoolingParameter.PoolMethod


@converts("Convolution", "Deconvolution")
def convolution(v: LayerView) -> None:
    g = ConvGeometry(v.param, v.bottom_shapes[0])
    if g.axis != 1:
        raise v.unsupported(f"channel axis {g.axis}; ONNX convolutions take channels on axis 1")
    operands = [v.weight(0, "weight")]
    if v.param.convolution_param.bias_term:
        operands.append(v.weight(1, "bias"))
    op = "Conv" if v.param.type == "Convolution" else "ConvTranspose"
    attrs = dict(kernel_shape=g.kernel, strides=g.stride, pads=g.pad * 2, dilations=g.dilation, group=g.group)
    # Several bottoms share one set of weights: one node per bottom/top pair, as in Caffe.
    for index, x in enumerate(v.inputs):
        v.emit(op, [x, *operands], index, **attrs)


def _pool_geometry(v: LayerView) -> tuple[list[int], list[int], list[int]]:
    """Kernel, stride and pad per spatial axis (shape inference has validated them)."""
    p = v.param.pooling_param
    if p.global_pooling:
        return list(v.bottom_shapes[0][2:]), [1, 1], [0, 0]
    kernel = [p.kernel_size] * 2 if p.HasField("kernel_size") else [p.kernel_h, p.kernel_w]
    stride = [p.stride_h, p.stride_w] if p.HasField("stride_h") else [p.stride] * 2
    pad = [p.pad_h, p.pad_w] if p.HasField("pad_h") else [p.pad] * 2
    return kernel, stride, pad


@converts("Pooling")
def pooling(v: LayerView) -> None:
    """Pooling with Caffe's output size (ceil rounding, the last window dropped when it would
    start in the padding) made explicit: the end pads are exactly what that size needs, so
    ONNX's floor rounding lands on it and no runtime's ceil_mode quirks matter."""
    p = v.param.pooling_param
    x, (_, _, *size) = v.inputs[0], v.bottom_shapes[0]
    out = list(v.top_shapes[0][2:])
    kernel, stride, pad = _pool_geometry(v)
    if p.global_pooling and len(v.outputs) == 1 and p.pool in (_MAX, _AVE):
        v.emit("GlobalMaxPool" if p.pool == _MAX else "GlobalAveragePool", [x])
        return
    end = [max(0, (o - 1) * s + k - n - b) for o, s, k, n, b in zip(out, stride, kernel, size, pad, strict=True)]
    attrs: dict[str, Any] = dict(kernel_shape=kernel, strides=stride, pads=pad + end)
    if p.pool == _MAX:
        if len(v.outputs) == 1:
            v.emit("MaxPool", [x], **attrs)
            return
        values, indices = v.g.node("MaxPool", [x], [v.outputs[0], v.g.name(f"{v.name}/indices")], hint=v.name, **attrs)
        # Caffe's mask top is the argmax within the H x W plane, as float; ONNX's index
        # runs over the whole tensor.
        plane = v.tmp("Mod", [indices, v.g.ints([size[0] * size[1]], "plane")])
        v.emit("Cast", [plane], 1, to=1)
        return
    if p.pool == _STOCHASTIC:  # Caffe's test-time form: sum(x^2) / sum(x), 0 where sum(x) <= 0
        total = v.tmp("AveragePool", [x], count_include_pad=1, **attrs)
        squares = v.tmp("AveragePool", [v.tmp("Mul", [x, x])], count_include_pad=1, **attrs)
        zero = v.g.const(0.0, "zero")
        v.emit("Where", [v.tmp("Greater", [total, zero]), v.tmp("Div", [squares, total]), zero])
        return
    # AVE: ONNX divides every window by k_h * k_w here (all windows lie inside the pads);
    # Caffe divides by the window clipped to the input plus its padding. Rescale where they differ.
    windows = zip(out, stride, kernel, size, pad, strict=True)
    factor = math.prod(kernel) / np.outer(*(_caffe_window_sizes(*window) for window in windows))
    if np.all(factor == 1.0):
        v.emit("AveragePool", [x], count_include_pad=1, **attrs)
    else:
        mean = v.tmp("AveragePool", [x], count_include_pad=1, **attrs)
        v.emit("Mul", [mean, v.g.const(factor.reshape(1, 1, *out), f"{v.name}/window_scale")])


def _caffe_window_sizes(out: int, stride: int, kernel: int, size: int, pad: int) -> np.ndarray:
    """Caffe's divisor along one axis: the window clipped to [-pad, size + pad)."""
    starts = np.arange(out) * stride - pad
    return (np.minimum(starts + kernel, size + pad) - starts).astype(np.float64)


@converts("LRN")
def lrn(v: LayerView) -> None:
    p = v.param.lrn_param
    x = v.inputs[0]
    if p.norm_region == p.ACROSS_CHANNELS:  # ONNX LRN is Caffe's across-channel form exactly
        v.emit("LRN", [x], size=p.local_size, alpha=p.alpha, beta=p.beta, bias=p.k)
        return
    # WITHIN_CHANNEL, as Caffe builds it: x * (1 + alpha * avgpool(x^2))^-beta, where the
    # pool has pad (size - 1) / 2 and counts the padding; Caffe ignores k here.
    pad = (p.local_size - 1) // 2
    squares = v.tmp("Mul", [x, x])
    mean = v.tmp("AveragePool", [squares], kernel_shape=[p.local_size] * 2, pads=[pad] * 4, count_include_pad=1)
    base = v.g.scaled(mean, p.alpha, 1.0, hint=v.name)
    v.emit("Mul", [x, v.tmp("Pow", [base, v.g.const(-p.beta, "power")])])


@converts("InnerProduct")
def inner_product(v: LayerView) -> None:
    p = v.param.inner_product_param
    shape = v.bottom_shapes[0]
    axis = canonical_axis(p.axis, len(shape))
    bias = [v.weight(1, "bias")] if p.bias_term else []
    x = v.inputs[0]
    if axis == 1:  # the usual case: Gemm, which every runtime fuses and tunes
        if len(shape) != 2:
            x = v.tmp("Flatten", [x], axis=1)
        v.emit("Gemm", [x, v.weight(0, "weight"), *bias], transB=0 if p.transpose else 1)
        return
    # Any other axis: keep the leading axes, flatten the rest, multiply by W^T.
    weight = v.blobs[0] if p.transpose else v.blobs[0].T
    flat = v.g.reshape(x, [0] * axis + [-1], hint=v.name)
    product = v.tmp("MatMul", [flat, v.g.const(weight, f"{v.name}/weight")])
    if bias:
        v.emit("Add", [product, *bias])
    else:
        v.emit("Identity", [product])


@converts("Embed")
def embed(v: LayerView) -> None:
    """Rows of the table picked by the input's values, which Caffe reads as float and truncates."""
    index = v.tmp("Cast", [v.inputs[0]], to=7)  # int64
    if v.param.embed_param.bias_term:
        rows = v.tmp("Gather", [v.weight(0, "weight"), index], axis=0)
        v.emit("Add", [rows, v.weight(1, "bias")])
    else:
        v.emit("Gather", [v.weight(0, "weight"), index], axis=0)


@converts("BatchNorm")
def batch_norm(v: LayerView) -> None:
    """Caffe stores mean * f, variance * f and f (the moving-average factor): divide f out."""
    p = v.param.batch_norm_param
    shape = v.bottom_shapes[0]
    if len(shape) < 2:
        raise v.unsupported(f"input {list(shape)} has no channel axis")
    global_stats = p.use_global_stats if p.HasField("use_global_stats") else True  # deploy = TEST phase
    if global_stats:
        factor = float(v.blobs[2].reshape(-1)[0])
        scale = 0.0 if factor == 0 else 1.0 / factor
        channels = shape[1]
        mean = v.g.const(v.blobs[0] * scale, f"{v.name}/mean")
        var = v.g.const(v.blobs[1] * scale, f"{v.name}/var")
        ones, zeros = v.g.const(np.ones(channels), "ones"), v.g.const(np.zeros(channels), "zeros")
        v.emit("BatchNormalization", [v.inputs[0], ones, zeros, mean, var], epsilon=p.eps)
        return
    # use_global_stats: false at test time: Caffe normalises with the batch's own statistics.
    axes = [0, *range(2, len(shape))]
    centered = v.tmp("Sub", [v.inputs[0], v.g.reduce("ReduceMean", v.inputs[0], axes, keepdims=True, hint=v.name)])
    var = v.g.reduce("ReduceMean", v.tmp("Mul", [centered, centered]), axes, keepdims=True, hint=v.name)
    v.emit("Div", [centered, v.tmp("Sqrt", [v.g.scaled(var, 1.0, p.eps, hint=v.name)])])


@converts("Scale", "Bias")
def scale_or_bias(v: LayerView) -> None:
    """x * gamma (+ beta) or x + beta, the operand spanning axes [axis, axis + its rank).

    A learned operand is stored with trailing 1s so it broadcasts; a second bottom gets
    them with Unsqueeze. Leading axes broadcast by ONNX's (numpy's) rules.
    """
    shape, operand = v.bottom_shapes[0], operand_shape(v.param, v.bottom_shapes)
    p = v.param.scale_param if v.param.type == "Scale" else v.param.bias_param
    axis = 0 if len(v.inputs) == 2 and not operand else canonical_axis(p.axis, len(shape))
    trailing = len(shape) - axis - len(operand)
    broadcast = (*operand, *[1] * trailing)
    if len(v.inputs) == 2:
        factor = v.inputs[1]
        if trailing and operand:
            factor = v.g.unsqueeze(factor, list(range(len(operand), len(broadcast))), hint=v.name)
    else:
        factor = v.weight(0, "scale" if v.param.type == "Scale" else "bias", broadcast)
    if v.param.type == "Bias":
        v.emit("Add", [v.inputs[0], factor])
    elif p.bias_term:
        v.emit("Add", [v.tmp("Mul", [v.inputs[0], factor]), v.weight(len(v.blobs) - 1, "bias", broadcast)])
    else:
        v.emit("Mul", [v.inputs[0], factor])


@converts("PReLU")
def prelu(v: LayerView) -> None:
    shape = v.bottom_shapes[0]
    if v.param.prelu_param.channel_shared:
        slope = v.weight(0, "slope", [1])
    else:
        slope = v.weight(0, "slope", [shape[1], *[1] * (len(shape) - 2)])
    v.emit("PRelu", [v.inputs[0], slope])


@converts("MVN")
def mvn(v: LayerView) -> None:
    """(x - mean) / (std + eps) per item (across_channels) or per item and channel."""
    p = v.param.mvn_param
    ndim = len(v.bottom_shapes[0])
    axes = list(range(1 if p.across_channels else 2, ndim))
    if not axes:  # one value per group: Caffe's mean is the value itself
        v.emit("Sub", [v.inputs[0], v.inputs[0]])
        return
    x = v.inputs[0]
    centered = v.tmp("Sub", [x, v.g.reduce("ReduceMean", x, axes, keepdims=True, hint=v.name)])
    if not p.normalize_variance:
        v.emit("Identity", [centered])
        return
    var = v.g.reduce("ReduceMean", v.tmp("Mul", [centered, centered]), axes, keepdims=True, hint=v.name)
    std = v.g.scaled(v.tmp("Sqrt", [var]), 1.0, p.eps, hint=v.name)
    v.emit("Div", [centered, std])


@converts("Softmax")
def softmax(v: LayerView) -> None:
    axis = canonical_axis(v.param.softmax_param.axis, len(v.bottom_shapes[0]))
    v.emit("Softmax", [v.inputs[0]], axis=axis)
