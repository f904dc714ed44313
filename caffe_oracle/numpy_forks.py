"""The other forks' layers in plain numpy, written from each fork's own forward pass.

No BVLC Caffe has these layers, so their oracle is this file (with OpenCV DNN where it
implements them): ROIPooling (py-faster-rcnn), BN (SegNet's and PSPNet's), Upsample (SegNet's
by a pooling mask; without a mask, the YOLO ports' nearest-neighbour form), Interp (DeepLab /
PSPNet), ShuffleChannel (ShuffleNet), ReLU6, ConvolutionDepthwise and DepthwiseConvolution
(MobileNet ports), and Pooling with the forks' `ceil_mode` (DenseNet ports).

Each function restates the fork's arithmetic, including where it rounds in float32 (ROI
bin edges, Interp's interpolation weights), and accumulates in float64: slow, obvious, and
independent of every converter. The depthwise convolutions and ceil_mode pooling are BVLC
layers with other settings, so they call fork_reference.py's BVLC convolution and pooling.
`LAYERS` is what fork_reference.py merges: {type: fn(layer, bottoms, blobs) -> tops}.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from seldon_caffe.caffe import caffe_pb2
from seldon_caffe.caffe.forks.mobile import relu6_slope

Layer = Callable[[caffe_pb2.LayerParameter, list[np.ndarray], list[np.ndarray]], list[np.ndarray]]
F32 = np.float32


def _round_half_away(value: np.float32) -> int:
    """C's round() of a float: halves go away from zero (numpy's round goes to even)."""
    exact = float(value)  # a float32 is exact in a double, and so is adding 0.5 to it
    return int(math.copysign(math.floor(abs(exact) + 0.5), exact))


# -- py-faster-rcnn ------------------------------------------------------------------------


def roi_pooling(layer: caffe_pb2.LayerParameter, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list:
    """Max over each of pooled_h x pooled_w bins of every ROI [batch, x1, y1, x2, y2].

    Corners are scaled in float32 and rounded half away from zero; a ROI is at least 1x1;
    bin edges are floor / ceil of float32 products, shifted by the ROI's corner and clipped
    to the map; an empty bin is 0.
    """
    p = layer.roi_pooling_param
    x, rois = bottoms[0], bottoms[1].reshape(-1, 5)
    n, channels, height, width = x.shape
    scale = F32(p.spatial_scale)
    out = np.zeros((len(rois), channels, p.pooled_h, p.pooled_w), F32)
    for r, roi in enumerate(rois.astype(F32)):
        batch = int(roi[0])
        if not 0 <= batch < n:
            raise ValueError(f"ROI {r} has batch index {roi[0]}, outside 0..{n - 1}")
        x1, y1, x2, y2 = (_round_half_away(F32(v * scale)) for v in roi[1:])
        rows = _roi_bins(y1, y2, p.pooled_h, height)
        cols = _roi_bins(x1, x2, p.pooled_w, width)
        for i, (top, bottom) in enumerate(rows):
            for j, (left, right) in enumerate(cols):
                if bottom > top and right > left:
                    out[r, :, i, j] = x[batch, :, top:bottom, left:right].max(axis=(1, 2))
    return [out]


def _roi_bins(start: int, end: int, pooled: int, size: int) -> list[tuple[int, int]]:
    """[begin, end) of each bin along one axis, as the fork computes them in float32."""
    extent = max(end - start + 1, 1)
    bin_size = F32(extent) / F32(pooled)
    bins = []
    for i in range(pooled):
        begin = int(math.floor(F32(i) * bin_size)) + start
        stop = int(math.ceil(F32(i + 1) * bin_size)) + start
        bins.append((min(max(begin, 0), size), min(max(stop, 0), size)))
    return bins


# -- SegNet --------------------------------------------------------------------------------


def bn(layer: caffe_pb2.LayerParameter, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list:
    """SegNet's BN (two blobs) or PSPNet's (four), at test time; see `_segnet_bn`, `_pspnet_bn`."""
    x = bottoms[0].astype(np.float64)
    stats = [b.reshape(1, x.shape[1], 1, 1).astype(np.float64) for b in blobs]
    if len(blobs) == 4:
        return [_pspnet_bn(layer.bn_param, x, *stats)]
    return _segnet_bn(layer, x, *stats)


def _segnet_bn(layer: caffe_pb2.LayerParameter, x: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> list:
    """x * scale + shift (INFERENCE, whose blobs already hold the statistics SegNet's
    compute_bn_statistics.py folded in), or the batch's own normalisation (LEARN, the
    default: var = E[x^2] - E[x]^2 over N, H, W, eps 1e-9), with the batch mean and
    variance as optional second and third tops."""
    if layer.bn_param.bn_mode == caffe_pb2.BNParameter.INFERENCE:
        return [(x * scale + shift).astype(F32)]
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = (x * x).mean(axis=(0, 2, 3), keepdims=True) - mean * mean
    y = (x - mean) / np.sqrt(var + 1e-9) * scale + shift
    return [y.astype(F32), mean.astype(F32), var.astype(F32)][: len(layer.top)]


def _pspnet_bn(p: caffe_pb2.BNParameter, x: np.ndarray, scale, shift, mean, var) -> np.ndarray:
    """PSPNet's BN in the TEST phase: the stored moving mean and variance with
    moving_average, else the batch's own (var = E[(x - E[x])^2]), plus var_eps."""
    if not p.moving_average:
        mean = x.mean(axis=(0, 2, 3), keepdims=True)
        var = ((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    return ((x - mean) / np.sqrt(var + np.float64(F32(p.var_eps))) * scale + shift).astype(F32)


def upsample(layer: caffe_pb2.LayerParameter, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list:
    """With a mask (SegNet): each value goes to the position its mask names within its
    channel's upsampled plane, the rest is 0, and of two values naming one position the
    later (in row-major order) wins. Without (the YOLO ports): nearest neighbour by `scale`."""
    p = layer.upsample_param
    x = bottoms[0]
    scale_h, scale_w = (p.scale_h, p.scale_w) if p.HasField("scale_h") else (p.scale, p.scale)
    if len(bottoms) == 1:
        return [x.repeat(scale_h, axis=-2).repeat(scale_w, axis=-1)]
    if p.HasField("upsample_h") and p.HasField("upsample_w"):
        out_h, out_w = p.upsample_h, p.upsample_w
    else:
        out_h, out_w = x.shape[2] * scale_h - int(p.pad_out_h), x.shape[3] * scale_w - int(p.pad_out_w)
    n, channels = x.shape[:2]
    planes = x.reshape(n * channels, -1)
    masks = np.trunc(bottoms[1]).astype(np.int64).reshape(n * channels, -1)  # static_cast<int>
    if masks.size and (masks.min() < 0 or masks.max() >= out_h * out_w):
        raise ValueError(f"mask index outside the {out_h}x{out_w} output plane")
    out = np.zeros((n * channels, out_h * out_w), F32)
    for plane, (values, mask) in enumerate(zip(planes, masks, strict=True)):
        targets, last = np.unique(mask[::-1], return_index=True)  # first in reverse = last writer
        out[plane, targets] = values[::-1][last]
    return [out.reshape(n, channels, out_h, out_w)]


# -- DeepLab / PSPNet ----------------------------------------------------------------------


def interp_output_size(p: caffe_pb2.InterpParameter, height: int, width: int, reference: tuple | None) -> tuple:
    """(height, width) of Interp's output from the cropped input size, in the fork's order
    of precedence: shrink, zoom, explicit size, shrink then zoom, the second bottom's size."""
    shrink, zoom = p.HasField("shrink_factor"), p.HasField("zoom_factor")

    def shrunk(size: int) -> int:
        return (size - 1) // p.shrink_factor + 1

    def zoomed(size: int) -> int:
        return size + (size - 1) * (p.zoom_factor - 1)

    if shrink and not zoom:
        return shrunk(height), shrunk(width)
    if zoom and not shrink:
        return zoomed(height), zoomed(width)
    if p.HasField("height") and p.HasField("width"):
        return p.height, p.width
    if shrink and zoom:
        return zoomed(shrunk(height)), zoomed(shrunk(width))
    if reference is not None:
        return reference
    raise ValueError("Interp needs zoom_factor, shrink_factor, height and width, or a second bottom")


def interp(layer: caffe_pb2.LayerParameter, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list:
    """Bilinear with aligned corners over the input cropped by -pad_beg / -pad_end (the fork
    applies pad_beg to both axes' start and pad_end to both ends), weights in float32."""
    p = layer.interp_param
    x = bottoms[0]
    begin = -p.pad_beg
    crop = x[:, :, begin : x.shape[2] + p.pad_end, begin : x.shape[3] + p.pad_end]
    reference = tuple(bottoms[1].shape[2:4]) if len(bottoms) == 2 else None
    out_h, out_w = interp_output_size(p, crop.shape[2], crop.shape[3], reference)
    if (out_h, out_w) == crop.shape[2:]:
        return [crop.copy()]
    if p.interp_type == "nearest_neighbor":
        rows, cols = _nearest(crop.shape[2], out_h), _nearest(crop.shape[3], out_w)
        return [np.ascontiguousarray(crop[:, :, rows][..., cols])]
    rows, row_weight = _align_corners(crop.shape[2], out_h)
    cols, col_weight = _align_corners(crop.shape[3], out_w)
    top = crop[:, :, rows[0]][..., cols[0]] * (1 - col_weight) + crop[:, :, rows[0]][..., cols[1]] * col_weight
    low = crop[:, :, rows[1]][..., cols[0]] * (1 - col_weight) + crop[:, :, rows[1]][..., cols[1]] * col_weight
    weight = row_weight[:, None]
    return [((1 - weight) * top + weight * low).astype(F32)]


def _ratio(size: int, out: int) -> np.ndarray:
    """The fork's float32 source position of each output index (corners aligned)."""
    ratio = F32(size - 1) / F32(out - 1) if out > 1 else F32(0)
    return (ratio * np.arange(out, dtype=F32)).astype(F32)


def _align_corners(size: int, out: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """Source index pairs and the weight of the second, per output index (the second index
    stays put on the last source row)."""
    position = _ratio(size, out)
    first = position.astype(np.int64)
    second = first + (first < size - 1)
    return (first, second), (position - first.astype(F32)).astype(np.float64)


def _nearest(size: int, out: int) -> np.ndarray:
    """DeepLab's nearest-neighbour interpolation (caffe_cpu_nninterp2): floor(position + 0.5)."""
    return np.floor(_ratio(size, out).astype(np.float64) + 0.5).astype(np.int64)


# -- ShuffleNet / MobileNet ports --------------------------------------------------------------


def shuffle_channel(layer: caffe_pb2.LayerParameter, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list:
    """Channel g * (C / group) + j moves to j * group + g: a (group, C / group) transpose."""
    x, group = bottoms[0], layer.shuffle_channel_param.group
    n, channels = x.shape[:2]
    grouped = x.reshape(n, group, channels // group, -1)
    return [np.ascontiguousarray(grouped.transpose(0, 2, 1, 3)).reshape(x.shape)]


def relu6(layer: caffe_pb2.LayerParameter, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list:
    """min(max(x, 0) + negative_slope * min(x, 0), 6)."""
    x, slope = bottoms[0], F32(relu6_slope(layer))
    return [np.minimum(np.maximum(x, 0) + slope * np.minimum(x, 0), F32(6)).astype(F32)]


def convolution_depthwise(layer: caffe_pb2.LayerParameter, bottoms: list[np.ndarray], blobs: list) -> list:
    """ConvolutionDepthwise: one kh x kw filter per input channel (num_output and group are
    ignored; see forks/mobile.py), i.e. BVLC's convolution with num_output = group = C."""
    plain = _copy(layer)
    plain.convolution_param.num_output = plain.convolution_param.group = bottoms[0].shape[1]
    return _bvlc("convolution")(plain, bottoms, blobs)


def depthwise_convolution(layer: caffe_pb2.LayerParameter, bottoms: list[np.ndarray], blobs: list) -> list:
    """DepthwiseConvolution: a faster kernel for BVLC's convolution, same settings and blobs."""
    return _bvlc("convolution")(layer, bottoms, blobs)


def pooling(layer: caffe_pb2.LayerParameter, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list:
    """Pooling with the forks' ceil_mode (BVLC PR #3057): BVLC's pooling with the round_mode
    it stands for (false = FLOOR), so a DenseNet port's pooled size and windows come out."""
    plain = _copy(layer)
    p = plain.pooling_param
    if p.HasField("ceil_mode"):
        p.round_mode = p.CEIL if p.ceil_mode else p.FLOOR
        p.ClearField("ceil_mode")
    return _bvlc("pooling")(plain, bottoms, blobs)


def _copy(layer: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
    plain = caffe_pb2.LayerParameter()
    plain.CopyFrom(layer)
    return plain


def _bvlc(name: str) -> Layer:
    """fork_reference's plain BVLC layer `name` (imported late: that module merges this one)."""
    from caffe_oracle import fork_reference

    return getattr(fork_reference, name)


LAYERS: dict[str, Layer] = {
    "ROIPooling": roi_pooling,
    "BN": bn,
    "Upsample": upsample,
    "Interp": interp,
    "ShuffleChannel": shuffle_channel,
    "ReLU6": relu6,
    "ConvolutionDepthwise": convolution_depthwise,
    "DepthwiseConvolution": depthwise_convolution,
    "Pooling": pooling,
}
