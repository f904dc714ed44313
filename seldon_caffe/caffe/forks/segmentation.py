"""SegNet's and DeepLab / PSPNet's layers: BN, Upsample, Interp."""

from __future__ import annotations

from collections.abc import Callable

from .. import caffe_pb2
from .._geometry import Shape

Rule = Callable[[caffe_pb2.LayerParameter, list[Shape]], list[Shape]]

SHAPE_RULES: dict[str, Rule] = {}
PARAM_RULES: dict[str, Rule] = {}
