"""The layers of the widely used Caffe forks, beside BVLC Caffe 1.0's own.

Most Caffe models in production come from forks: caffe-ssd (detectors), py-faster-rcnn,
SegNet, DeepLab / PSPNet, ShuffleNet and MobileNet ports. Each module here states one
family's layers the way `shapes.py` and `params.py` state BVLC's: the output-shape rule of
each layer type (what its Reshape() does in that fork) and the learned blobs it owns. The
ONNX converters of the same layers are in `onnx_ssd.py` and `onnx_forks.py`.

A module exports `SHAPE_RULES` and `PARAM_RULES` ({layer type: rule}); nothing here
imports shapes.py or params.py, which read these tables.
"""

from __future__ import annotations

from . import mobile, rcnn, segmentation, ssd

FORK_SHAPE_RULES = {**ssd.SHAPE_RULES, **rcnn.SHAPE_RULES, **segmentation.SHAPE_RULES, **mobile.SHAPE_RULES}
FORK_PARAM_RULES = {**ssd.PARAM_RULES, **rcnn.PARAM_RULES, **segmentation.PARAM_RULES, **mobile.PARAM_RULES}
