"""The learned blobs each layer type owns and the shapes Caffe gives them.

Knowing them lets us refuse, at load time, a caffemodel that does not belong to its
prototxt (Caffe would abort deep inside the runtime instead), and lets `set_weights` say
exactly which shapes it wants.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from . import caffe_pb2
from ._geometry import ConvGeometry, LayerError, Shape, canonical_axis, one_bottom, operand_shape
from .forks import FORK_PARAM_RULES
from .io import CaffeFormatError

_ParamRule = Callable[[caffe_pb2.LayerParameter, list[Shape]], list[Shape]]


def _convolution(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    g = ConvGeometry(layer, bottoms[0])
    if layer.type == "Convolution":
        weight = (g.num_output, g.channels // g.group, *g.kernel)
    else:  # Deconvolution stores the transposed filter bank
        weight = (g.channels, g.num_output // g.group, *g.kernel)
    return [weight, (g.num_output,)] if layer.convolution_param.bias_term else [weight]


def _inner_product(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    p = layer.inner_product_param
    shape = one_bottom(bottoms)
    inputs = math.prod(shape[canonical_axis(p.axis, len(shape)) :])
    weight = (inputs, p.num_output) if p.transpose else (p.num_output, inputs)
    return [weight, (p.num_output,)] if p.bias_term else [weight]


def _embed(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    p = layer.embed_param
    weight = (p.input_dim, p.num_output)
    return [weight, (p.num_output,)] if p.bias_term else [weight]


def _batch_norm(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    shape = one_bottom(bottoms)
    channels = shape[1] if len(shape) > 1 else 1
    return [(channels,), (channels,), (1,)]  # mean, variance, moving-average scale factor


def _scale_or_bias(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    operand = operand_shape(layer, bottoms)
    learned = [operand] if len(bottoms) == 1 else []  # with two bottoms the factor is an input
    if layer.type == "Scale" and layer.scale_param.bias_term:
        learned.append(operand)
    return learned


def _prelu(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    return [()] if layer.prelu_param.channel_shared else [(one_bottom(bottoms)[1],)]


def _parameter(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    return [tuple(layer.parameter_param.shape.dim)]


_PARAMS: dict[str, _ParamRule] = {
    "Convolution": _convolution,
    "Deconvolution": _convolution,
    "InnerProduct": _inner_product,
    "Embed": _embed,
    "BatchNorm": _batch_norm,
    "Scale": _scale_or_bias,
    "Bias": _scale_or_bias,
    "PReLU": _prelu,
    "Parameter": _parameter,
    **FORK_PARAM_RULES,  # the forks' learned layers (seldon_caffe/caffe/forks/)
}

PARAMETRISED_LAYERS: frozenset[str] = frozenset(_PARAMS)


def param_shapes(layer: caffe_pb2.LayerParameter, bottom_shapes: list[Shape]) -> list[Shape]:
    """The shapes of the learned blobs `layer` owns, given its input shapes ([] if none)."""
    rule = _PARAMS.get(layer.type)
    if rule is None:
        return []
    try:
        return rule(layer, bottom_shapes)
    except LayerError as exc:
        raise CaffeFormatError(f"layer {layer.name!r} ({layer.type}): {exc}") from None
