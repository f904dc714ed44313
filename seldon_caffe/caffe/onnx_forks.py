"""ONNX converters for the other forks' layers: ROIPooling, BN, Upsample, Interp,
ShuffleChannel, ReLU6, ConvolutionDepthwise, DepthwiseConvolution.

Each restates the fork's forward pass (caffe_oracle/numpy_forks.py is the oracle) with ops
every engine runs alike:

* ROIPooling is ONNX's MaxRoiPool, whose definition is Caffe's own (corners rounded half
  away from zero, a ROI at least 1 x 1, floor / ceil bin edges, 0 for an empty bin);
  onnxruntime and OpenVINO match the fork bit for bit.
* Upsample scatters each value to the position its mask names (ScatterElements into zeros);
  of two values naming one position the later wins, as in SegNet's loop.
* Interp multiplies by two small interpolation matrices whose weights are the fork's own
  float32 ones: no engine's Resize rounding (nor its align-corners corner cases) can differ.
"""

from __future__ import annotations

import numpy as np

from . import onnx_nn
from .forks.mobile import as_convolution, relu6_slope
from .forks.segmentation import bn_flavour, interp_crop, upsample_scale, upsample_size
from .onnx_graph import LayerView, converts

F32 = np.float32


@converts("ROIPooling")
def roi_pooling(v: LayerView) -> None:
    p = v.param.roi_pooling_param
    rois = v.inputs[1]
    if len(v.bottom_shapes[1]) != 2:  # [R, 5, 1, 1] and the like
        rois = v.g.reshape(rois, [-1, 5], hint=v.name)
    v.emit("MaxRoiPool", [v.inputs[0], rois], pooled_shape=[p.pooled_h, p.pooled_w], spatial_scale=p.spatial_scale)


@converts("BN")
def bn(v: LayerView) -> None:
    """SegNet's BN (x * scale + shift in INFERENCE mode, batch statistics in LEARN mode) or
    PSPNet's (stored statistics folded into one scale and shift, or the batch's own)."""
    x, channels = v.inputs[0], v.bottom_shapes[0][1]
    scale, shift = (b.reshape(1, channels, 1, 1).astype(np.float64) for b in v.blobs[:2])
    p = v.param.bn_param
    if bn_flavour(v.param) == "pspnet":
        if p.moving_average:
            mean, var = (b.reshape(1, channels, 1, 1).astype(np.float64) for b in v.blobs[2:])
            factor = scale / np.sqrt(var + float(F32(p.var_eps)))
            _affine(v, x, factor, shift - mean * factor)
        else:
            _batch_normalised(v, x, scale, shift, float(F32(p.var_eps)), two_pass=True)
    elif p.bn_mode == p.INFERENCE:
        _affine(v, x, scale, shift)
    else:
        _batch_normalised(v, x, scale, shift, 1e-9, two_pass=False)


def _affine(v: LayerView, x: str, scale: np.ndarray, shift: np.ndarray) -> None:
    product = v.tmp("Mul", [x, v.g.const(scale, f"{v.name}/scale")])
    v.emit("Add", [product, v.g.const(shift, f"{v.name}/shift")])


def _batch_normalised(v: LayerView, x: str, scale, shift, eps: float, *, two_pass: bool) -> None:
    """(x - mean) / sqrt(var + eps) * scale + shift over the batch's own N, H, W statistics;
    SegNet takes var as E[x^2] - E[x]^2 (and may answer mean and var as more tops)."""
    axes = [0, 2, 3]
    mean = v.g.reduce("ReduceMean", x, axes, keepdims=True, hint=v.name)
    centered = v.tmp("Sub", [x, mean])
    if two_pass:
        var = v.g.reduce("ReduceMean", v.tmp("Mul", [centered, centered]), axes, keepdims=True, hint=v.name)
    else:
        squares = v.g.reduce("ReduceMean", v.tmp("Mul", [x, x]), axes, keepdims=True, hint=v.name)
        var = v.tmp("Sub", [squares, v.tmp("Mul", [mean, mean])])
    std = v.tmp("Sqrt", [v.g.scaled(var, 1.0, eps, hint=v.name)])
    normalised = v.tmp("Mul", [v.tmp("Div", [centered, std]), v.g.const(scale, f"{v.name}/scale")])
    v.emit("Add", [normalised, v.g.const(shift, f"{v.name}/shift")])
    for index, statistic in enumerate((mean, var), start=1):
        if index < len(v.outputs):
            v.emit("Identity", [statistic], index)


@converts("Upsample")
def upsample(v: LayerView) -> None:
    if len(v.inputs) == 1:
        _nearest_upsample(v)
        return
    n_c_h_w = v.bottom_shapes[0]
    out_h, out_w = upsample_size(v.param.upsample_param, n_c_h_w[2], n_c_h_w[3])
    plane, out_plane = n_c_h_w[2] * n_c_h_w[3], out_h * out_w
    values = v.g.reshape(v.inputs[0], [0, 0, plane], hint=v.name)
    index = v.g.reshape(v.tmp("Cast", [v.inputs[1]], to=7), [0, 0, plane], hint=v.name)  # int64, truncated
    # Zeros [N, C, out_plane]: the batch is symbolic, so the shape comes from the values' own.
    shape = v.tmp("Add", [v.tmp("Shape", [values]), v.g.ints([0, 0, out_plane - plane], "grow")])
    zeros = v.tmp("Expand", [v.g.const(np.zeros((1, 1, out_plane)), f"{v.name}/zeros"), shape])
    scattered = v.tmp("ScatterElements", [zeros, index, values], axis=2)
    v.g.reshape(scattered, [0, 0, out_h, out_w], v.outputs[0], hint=v.name)


def _nearest_upsample(v: LayerView) -> None:
    """The YOLO ports' Upsample: each value repeated scale_h x scale_w times (a Tile of a
    6-D view, exact on every engine)."""
    *lead, height, width = v.bottom_shapes[0]
    scale_h, scale_w = upsample_scale(v.param.upsample_param)
    keep = [0] * len(lead)
    view = v.g.reshape(v.inputs[0], [*keep, height, 1, width, 1], hint=v.name)
    tiled = v.tmp("Tile", [view, v.g.ints([1] * len(lead) + [1, scale_h, 1, scale_w], "repeats")])
    v.g.reshape(tiled, [*keep, height * scale_h, width * scale_w], v.outputs[0], hint=v.name)


@converts("Interp")
def interp(v: LayerView) -> None:
    """Crop by pad_beg / pad_end, then resize each spatial axis by a matrix product."""
    p = v.param.interp_param
    x, (_, _, height, width) = v.inputs[0], v.bottom_shapes[0]
    crop_h, crop_w = interp_crop(p, height, width)
    out_h, out_w = v.top_shapes[0][2:]
    if (crop_h, crop_w) != (height, width):
        begin = -p.pad_beg
        starts, ends = v.g.ints([begin, begin], "starts"), v.g.ints([begin + crop_h, begin + crop_w], "ends")
        x = v.tmp("Slice", [x, starts, ends, v.g.ints([2, 3], "axes")])
    if (crop_h, crop_w) == (out_h, out_w):  # the fork copies
        v.emit("Identity", [x])
        return
    nearest = p.interp_type == "nearest_neighbor"
    if crop_w != out_w:  # [.., W] @ [W, out_w]
        columns = v.g.const(interpolation_matrix(crop_w, out_w, nearest).T, f"{v.name}/columns")
        x = v.emit("MatMul", [x, columns]) if crop_h == out_h else v.tmp("MatMul", [x, columns])
    if crop_h != out_h:  # [out_h, H] @ [.., H, out_w]
        v.emit("MatMul", [v.g.const(interpolation_matrix(crop_h, out_h, nearest), f"{v.name}/rows"), x])


def interpolation_matrix(size: int, out: int, nearest: bool) -> np.ndarray:
    """[out, size]: row i weighs the source positions output i reads, as the fork computes
    them in float32 (corners aligned; DeepLab's nearest rounds the position half up)."""
    ratio = F32(size - 1) / F32(out - 1) if out > 1 else F32(0)
    position = (ratio * np.arange(out, dtype=F32)).astype(F32)
    matrix = np.zeros((out, size), F32)
    rows = np.arange(out)
    if nearest:
        matrix[rows, np.floor(position.astype(np.float64) + 0.5).astype(np.int64)] = 1
        return matrix
    first = position.astype(np.int64)
    weight = position - first.astype(F32)
    second = first + (first < size - 1)
    np.add.at(matrix, (rows, first), F32(1) - weight)
    np.add.at(matrix, (rows, second), weight)
    return matrix


@converts("ShuffleChannel")
def shuffle_channel(v: LayerView) -> None:
    """[N, group, C / group, rest] transposed to [N, C / group, group, rest]."""
    shape, group = v.bottom_shapes[0], v.param.shuffle_channel_param.group
    grouped = v.g.reshape(v.inputs[0], [0, group, shape[1] // group, -1], hint=v.name)
    swapped = v.tmp("Transpose", [grouped], perm=[0, 2, 1, 3])
    v.g.reshape(swapped, [0, *shape[1:]], v.outputs[0], hint=v.name)


@converts("ReLU6")
def relu6(v: LayerView) -> None:
    """min(max(x, 0) + negative_slope * min(x, 0), 6)."""
    six = v.g.const(6.0, "six")
    slope = relu6_slope(v.param)
    if slope == 0:
        v.emit("Clip", [v.inputs[0], v.g.const(0.0, "zero"), six])
    else:
        v.emit("Clip", [v.tmp("LeakyRelu", [v.inputs[0]], alpha=slope), "", six])


@converts("ConvolutionDepthwise", "DepthwiseConvolution")
def depthwise_convolution(v: LayerView) -> None:
    """BVLC's convolution with the settings the fork means (see forks/mobile.py)."""
    plain = LayerView(
        param=as_convolution(v.param, v.bottom_shapes),
        g=v.g,
        inputs=v.inputs,
        outputs=v.outputs,
        bottom_shapes=v.bottom_shapes,
        top_shapes=v.top_shapes,
        blobs=v.blobs,
    )
    onnx_nn.convolution(plain)
