"""caffe-ssd's detection layers: Normalize, Permute, PriorBox, DetectionOutput.

The rules restate each layer's Reshape() in caffe-ssd (weiliu89/caffe, ssd branch) and the
checks its LayerSetUp() makes, so a net caffe-ssd would refuse is refused here, at load,
with the layer named.

DetectionOutput's row count depends on the data (how many boxes survive NMS), which no
static shape can state. Its rule gives what caffe-ssd's own Reshape() gives, [1, 1, 1, 7]
(what pycaffe's `net.blobs` shows before a forward), and `DATA_DEPENDENT_DIMS` marks that
axis as data-dependent: the ONNX signature leaves it unnamed (None), and a runtime's
TensorSpec should show -1 there. Shapes stay plain ints everywhere else.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .. import caffe_pb2
from .._geometry import LayerError, Shape, one_bottom

Rule = Callable[[caffe_pb2.LayerParameter, list[Shape]], list[Shape]]

# {layer type: {top index: axes whose size only the data decides}}
DATA_DEPENDENT_DIMS: dict[str, dict[int, tuple[int, ...]]] = {"DetectionOutput": {0: (2,)}}


def data_dependent_axes(net: caffe_pb2.NetParameter) -> dict[str, tuple[int, ...]]:
    """{blob: axes whose size only the data decides} for the net's layers (DATA_DEPENDENT_DIMS)."""
    return {
        layer.top[index]: axes
        for layer in net.layer
        for index, axes in DATA_DEPENDENT_DIMS.get(layer.type, {}).items()
        if index < len(layer.top)
    }


def _normalize(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    shape = one_bottom(bottoms)
    if len(shape) < 2:
        raise LayerError(f"needs an input with a channel axis, got {list(shape)}")
    return [shape]


def _normalize_params(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    """One scale (a 0-axis blob, as caffe-ssd creates it) or one per channel."""
    return [()] if layer.norm_param.channel_shared else [(one_bottom(bottoms)[1],)]


def permute_order(layer: caffe_pb2.LayerParameter, ndim: int) -> list[int]:
    """The full axis order: the listed axes, then the others in their own order."""
    order = list(layer.permute_param.order)
    if any(axis >= ndim for axis in order) or len(set(order)) != len(order):
        raise LayerError(f"order {order} must name distinct axes of the {ndim}-D input")
    return order + [axis for axis in range(ndim) if axis not in order]


def _permute(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    shape = one_bottom(bottoms)
    return [tuple(shape[axis] for axis in permute_order(layer, len(shape)))]


def prior_aspect_ratios(param: caffe_pb2.PriorBoxParameter) -> list[float]:
    """1, then each new aspect ratio (and its inverse with `flip`); near-duplicates dropped."""
    ratios = [1.0]
    for ratio in param.aspect_ratio:
        if all(abs(ratio - known) >= 1e-6 for known in ratios):
            ratios.append(ratio)
            if param.flip:
                ratios.append(1.0 / ratio)
    return ratios


def priors_per_cell(param: caffe_pb2.PriorBoxParameter) -> int:
    """How many boxes each feature-map cell gets (after checking the sizes as caffe-ssd does)."""
    if not param.min_size or any(size <= 0 for size in param.min_size):
        raise LayerError("needs positive min_size values")
    if param.max_size:
        if len(param.max_size) != len(param.min_size):
            raise LayerError(f"has {len(param.max_size)} max_size for {len(param.min_size)} min_size values")
        if any(high <= low for low, high in zip(param.min_size, param.max_size, strict=True)):
            raise LayerError("each max_size must be greater than its min_size")
    if len(param.variance) not in (0, 1, 4) or any(v <= 0 for v in param.variance):
        raise LayerError("takes one positive variance, or four")
    return len(prior_aspect_ratios(param)) * len(param.min_size) + len(param.max_size)


def _prior_box(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    p = layer.prior_box_param
    explicit = p.HasField("img_size") or p.HasField("img_h") or p.HasField("img_w")
    if len(bottoms) not in ((1, 2) if explicit else (2,)) or any(len(b) != 4 for b in bottoms):
        raise LayerError("takes two 4-D bottoms, the feature map and the image (the image may go with img_size)")
    if p.HasField("img_size") and (p.HasField("img_h") or p.HasField("img_w")):
        raise LayerError("set img_size or img_h / img_w, not both")
    if p.HasField("step") and (p.HasField("step_h") or p.HasField("step_w")):
        raise LayerError("set step or step_h / step_w, not both")
    height, width = bottoms[0][2], bottoms[0][3]
    return [(1, 2, height * width * priors_per_cell(p) * 4)]


def detection_counts(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> tuple[int, int]:
    """(priors, location classes) of a DetectionOutput, checked against its three inputs."""
    p = layer.detection_output_param
    if len(bottoms) < 3:
        raise LayerError("takes three bottoms: box offsets, confidences and priors")
    loc, conf, prior = bottoms[:3]
    if not p.HasField("num_classes") or p.num_classes < 1:
        raise LayerError("needs num_classes")
    if not p.nms_param.nms_threshold >= 0 or not 0 < p.nms_param.eta <= 1:
        raise LayerError("needs nms_threshold >= 0 and 0 < eta <= 1")
    if loc[0] != conf[0] or len(prior) < 3:
        raise LayerError(f"offsets {list(loc)} and confidences {list(conf)} differ in batch, or priors are not 3-D")
    priors, loc_classes = prior[2] // 4, 1 if p.share_location else p.num_classes
    if math.prod(loc[1:]) != priors * loc_classes * 4 or math.prod(conf[1:]) != priors * p.num_classes:
        raise LayerError(
            f"{priors} priors with {p.num_classes} classes need {priors * loc_classes * 4} offsets and "
            f"{priors * p.num_classes} confidences per image, got {list(loc)} and {list(conf)}"
        )
    return priors, loc_classes


def _detection_output(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    detection_counts(layer, bottoms)
    return [(1, 1, 1, 7)]  # caffe-ssd's placeholder; the rows are data-dependent (DATA_DEPENDENT_DIMS)


def caffe_ssd_rows(rows: np.ndarray, batch: int) -> np.ndarray:
    """A DetectionOutput answer as caffe-ssd writes it, [1, 1, N, 7]: no all-zero padding
    rows, rows by image, then label, then descending score, and one row of -1s per image
    (its id first) when no image has a detection. OpenCV pads with zeros and sorts by score
    across labels: the opencv runtime passes its answer through this."""
    rows = rows.reshape(-1, 7)
    rows = rows[np.any(rows != 0, axis=1)]
    if not len(rows):
        empty = np.full((batch, 7), -1, np.float32)
        empty[:, 0] = np.arange(batch)
        return empty.reshape(1, 1, batch, 7)
    order = np.lexsort((-rows[:, 2], rows[:, 1], rows[:, 0]))  # stable: ties keep OpenCV's order
    return np.ascontiguousarray(rows[order]).reshape(1, 1, -1, 7)


SHAPE_RULES: dict[str, Rule] = {
    "Normalize": _normalize,
    "Permute": _permute,
    "PriorBox": _prior_box,
    "DetectionOutput": _detection_output,
}
PARAM_RULES: dict[str, Rule] = {"Normalize": _normalize_params}
