"""ShuffleNet's and MobileNet ports' layers: ShuffleChannel, ReLU6, ConvolutionDepthwise,
DepthwiseConvolution.

The MobileNet ports name their depthwise convolution two ways, with two meanings:

* "ConvolutionDepthwise" (BVLC PR #5665, as in farmingyard/caffe-mobilenet and the
  MobileNet-SSD / ShuffleNet ports): one kh x kw filter per input channel; `num_output`
  and `group` are ignored, the output has the input's channels, the filter bank is
  [C, 1, kh, kw] and the bias [C]. It is exactly BVLC's Convolution with
  num_output = group = C, which `as_depthwise_convolution` spells out.
* "DepthwiseConvolution" (yonghenglh6/DepthwiseConvolution): a faster kernel behind BVLC's
  own Convolution, settings and blobs unchanged (the definitions set group themselves).
"""

from __future__ import annotations

from collections.abc import Callable

from .. import caffe_pb2
from .._geometry import ConvGeometry, LayerError, Shape, c_div, one_bottom

Rule = Callable[[caffe_pb2.LayerParameter, list[Shape]], list[Shape]]


def as_convolution(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> caffe_pb2.LayerParameter:
    """The BVLC Convolution layer computing the same as this depthwise layer (a copy)."""
    plain = caffe_pb2.LayerParameter()
    plain.CopyFrom(layer)
    plain.type = "Convolution"
    if layer.type == "ConvolutionDepthwise":
        shape = one_bottom(bottoms)
        if len(shape) != 4:
            raise LayerError(f"needs a 4-D input (N, C, H, W), got {list(shape)}")
        plain.convolution_param.num_output = plain.convolution_param.group = shape[1]
        if plain.convolution_param.axis != 1:
            raise LayerError("the channel axis must be 1")
    return plain


def _convolution(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    shape = one_bottom(bottoms)
    g = ConvGeometry(as_convolution(layer, bottoms), shape)
    spatial = []
    for size, k, s, p, d in zip(shape[g.axis + 1 :], g.kernel, g.stride, g.pad, g.dilation, strict=True):
        out = c_div(size + 2 * p - (d * (k - 1) + 1), s) + 1
        if out <= 0:
            raise LayerError(f"input {list(shape)} is too small for kernel {g.kernel}, stride {g.stride}, pad {g.pad}")
        spatial.append(out)
    return [(*shape[: g.axis], g.num_output, *spatial)]


def _convolution_params(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    g = ConvGeometry(as_convolution(layer, bottoms), one_bottom(bottoms))
    weight = (g.num_output, g.channels // g.group, *g.kernel)
    return [weight, (g.num_output,)] if layer.convolution_param.bias_term else [weight]


def _shuffle_channel(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    shape = one_bottom(bottoms)
    group = layer.shuffle_channel_param.group
    if len(shape) < 2 or group <= 0 or shape[1] % group:
        raise LayerError(f"group {group} must be positive and divide the channels of {list(shape)}")
    return [shape]


def _same_shape(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    return [one_bottom(bottoms)]


def relu6_slope(layer: caffe_pb2.LayerParameter) -> float:
    """ReLU6's negative_slope (the MobileNetV2 ports' relu6_param, default 0)."""
    return layer.relu6_param.negative_slope


SHAPE_RULES: dict[str, Rule] = {
    "ShuffleChannel": _shuffle_channel,
    "ReLU6": _same_shape,
    "ConvolutionDepthwise": _convolution,
    "DepthwiseConvolution": _convolution,
}
PARAM_RULES: dict[str, Rule] = {
    "ConvolutionDepthwise": _convolution_params,
    "DepthwiseConvolution": _convolution_params,
}
