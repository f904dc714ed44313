"""py-faster-rcnn's layers: ROIPooling (and the Python layer's shapes, which its class computes)."""

from __future__ import annotations

import math
from collections.abc import Callable

from .. import caffe_pb2
from .._geometry import LayerError, Shape
from ..python_layer import top_shapes as _python_layer

Rule = Callable[[caffe_pb2.LayerParameter, list[Shape]], list[Shape]]


def _roi_pooling(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    """[R, C, pooled_h, pooled_w] from the feature map [N, C, H, W] and R ROIs of five
    numbers each (batch index, x1, y1, x2, y2 in input-image pixels)."""
    p = layer.roi_pooling_param
    if len(bottoms) != 2:
        raise LayerError(f"takes two bottoms, the feature map and the ROIs, got {len(bottoms)}")
    features, rois = bottoms
    if len(features) != 4:
        raise LayerError(f"needs a 4-D feature map, got {list(features)}")
    if not rois or math.prod(rois[1:]) != 5:
        raise LayerError(f"needs ROIs of five numbers each ([R, 5]: batch, x1, y1, x2, y2), got {list(rois)}")
    if p.pooled_h <= 0 or p.pooled_w <= 0:
        raise LayerError("roi_pooling_param needs pooled_h and pooled_w above 0")
    return [(rois[0], features[1], p.pooled_h, p.pooled_w)]


# A Python layer's tops are what its class's setup + reshape give (caffe/python_layer.py).
SHAPE_RULES: dict[str, Rule] = {"ROIPooling": _roi_pooling, "Python": _python_layer}
PARAM_RULES: dict[str, Rule] = {}
