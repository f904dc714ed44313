"""ONNX converters for caffe-ssd's layers: Normalize, Permute, PriorBox, DetectionOutput.

Semantics are caffe-ssd's (weiliu89/caffe, ssd branch); tests/test_fork_layers.py holds
every engine to a numpy restatement of them (caffe_oracle/numpy_ssd.py) and to OpenCV.

* Normalize: an L2 norm over C (per pixel) or over C, H, W (per image), eps inside the root.
* Permute: one Transpose (the listed axes, then the others in order).
* PriorBox: its output depends only on shapes and settings, so it is a constant, computed
  here the way caffe-ssd computes it (min / max sizes truncated to integers, as its loop
  does). A net converted per input size (runtimes re-plan per shape) gets its priors anew.
* DetectionOutput: decoding, per-class NMS and keep_top_k as fixed-size tensor work over
  each class's top_k candidates, then one NonZero picks the rows: see `_detection_output`.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, numpy_helper

from . import caffe_pb2
from .forks.ssd import detection_counts, permute_order, prior_aspect_ratios, priors_per_cell
from .onnx_graph import LayerView, converts


@converts("Normalize")
def _normalize(v: LayerView) -> None:
    p, shape = v.param.norm_param, v.bottom_shapes[0]
    axes = list(range(1, len(shape))) if p.across_spatial else [1]
    squares = v.g.reduce("ReduceSumSquare", v.inputs[0], axes, keepdims=True, hint=v.name)
    norm = v.tmp("Sqrt", [v.tmp("Add", [squares, v.g.const(p.eps, f"{v.name}/eps")])])
    normed = v.tmp("Div", [v.inputs[0], norm])
    scale_shape = [] if p.channel_shared else [1, shape[1], *[1] * (len(shape) - 2)]
    v.emit("Mul", [normed, v.weight(0, "scale", scale_shape)])


@converts("Permute")
def _permute(v: LayerView) -> None:
    order = permute_order(v.param, len(v.bottom_shapes[0]))
    if order == sorted(order):
        v.emit("Identity", [v.inputs[0]])
    else:
        v.emit("Transpose", [v.inputs[0]], perm=order)


@converts("PriorBox")
def _prior_box(v: LayerView) -> None:
    image = v.bottom_shapes[1][2:] if len(v.bottom_shapes) > 1 else (0, 0)
    priors = prior_boxes(v.param.prior_box_param, v.bottom_shapes[0][2:], image)
    v.emit("Identity", [v.g.const(priors, f"{v.name}/priors")])


def prior_boxes(p, feature: tuple[int, ...], image: tuple[int, ...]) -> np.ndarray:
    """[1, 2, H*W*k*4]: each cell's k boxes (xmin, ymin, xmax, ymax) over the image size,
    cell by cell in rows, then as many variance quadruples."""
    f32 = np.float32
    layer_h, layer_w = feature
    if p.HasField("img_h") or p.HasField("img_w"):
        img_h, img_w = p.img_h, p.img_w
    elif p.HasField("img_size"):
        img_h = img_w = p.img_size
    else:
        img_h, img_w = image
    if p.HasField("step_h") or p.HasField("step_w"):
        step_h, step_w = f32(p.step_h), f32(p.step_w)
    elif p.HasField("step"):
        step_h = step_w = f32(p.step)
    else:
        step_h, step_w = f32(img_h) / f32(layer_h), f32(img_w) / f32(layer_w)
    sizes = _cell_box_sizes(p).astype(f32)  # k x (width, height)
    offset = f32(p.offset)
    center_x = (np.arange(layer_w, dtype=f32) + offset) * step_w
    center_y = (np.arange(layer_h, dtype=f32) + offset) * step_h
    cx = np.broadcast_to(center_x[None, :, None], (layer_h, layer_w, len(sizes))).astype(np.float64)
    cy = np.broadcast_to(center_y[:, None, None], (layer_h, layer_w, len(sizes))).astype(np.float64)
    half_w, half_h = sizes[:, 0].astype(np.float64) / 2, sizes[:, 1].astype(np.float64) / 2
    boxes = np.stack([(cx - half_w) / img_w, (cy - half_h) / img_h, (cx + half_w) / img_w, (cy + half_h) / img_h], -1)
    boxes = boxes.astype(f32).reshape(-1)
    if p.clip:
        boxes = np.clip(boxes, 0, 1)
    variance = np.asarray(list(p.variance) or [0.1], f32)
    variances = np.broadcast_to(variance, (boxes.size // 4, 4) if variance.size == 4 else (boxes.size,)).reshape(-1)
    return np.stack([boxes, variances])[None]


def _cell_box_sizes(p) -> np.ndarray:
    """(width, height) of each of a cell's boxes, in caffe-ssd's order: per min_size, the
    square, the sqrt(min * max) square, then each other aspect ratio."""
    priors_per_cell(p)  # validates the sizes
    ratios = [r for r in prior_aspect_ratios(p) if abs(r - 1.0) >= 1e-6]
    sizes: list[tuple[float, float]] = []
    for i, size in enumerate(p.min_size):
        low = int(size)  # caffe-ssd keeps min_size and max_size in ints inside its loop
        sizes.append((low, low))
        if p.max_size:
            side = float(np.sqrt(low * int(p.max_size[i])))
            sizes.append((side, side))
        sizes += [(low * float(np.sqrt(np.float32(r))), low / float(np.sqrt(np.float32(r)))) for r in ratios]
    return np.asarray(sizes, np.float64)


# -- DetectionOutput ------------------------------------------------------------------------
#
# caffe-ssd, per image: decode every prior's box; per class (but the background), the top_k
# boxes scoring above confidence_threshold go through greedy NMS; if more than keep_top_k
# survive over all classes, the keep_top_k best stay; rows are written label by label
# (ascending), each label's in descending score; if no image has a row, each image gets
# [image, -1, -1, -1, -1, -1, -1]. Here, per image and class, TopK picks the K = top_k
# candidates in descending score, so a flat [N, classes, K] mask of the survivors lists the
# rows in caffe-ssd's order, and NonZero over it picks them: every step before NonZero has a
# fixed shape. NMS is ONNX's, on boxes where an inverted one (xmax < xmin or ymax < ymin) has
# zero area, as caffe-ssd's overlap sees it (ONNX would swap its corners).

_LOC, _BOX = 4, 4  # values per box offset and per box
_CODE = caffe_pb2.PriorBoxParameter  # its CodeType: CORNER, CENTER_SIZE, CORNER_SIZE


@converts("DetectionOutput")
def _detection_output(v: LayerView) -> None:
    p = v.param.detection_output_param
    priors, loc_classes = detection_counts(v.param, v.bottom_shapes)
    labels = [c for c in range(p.num_classes) if c != p.background_label_id]
    top_k = p.nms_param.top_k if p.nms_param.HasField("top_k") else -1
    k = priors if top_k < 0 else min(top_k, priors)
    if p.nms_param.eta < 1:
        raise v.unsupported("adaptive NMS (eta < 1) has no ONNX form; use runtime pycaffe with caffe-ssd")
    if not labels or k == 0 or p.keep_top_k == 0:
        raise v.unsupported("this layer can never output a detection (no class, top_k 0 or keep_top_k 0)")
    boxes = _decoded_boxes(v, priors, loc_classes)  # [N, priors, loc classes, 4]
    scores = v.g.reshape(v.inputs[1], [0, priors, p.num_classes], hint=v.name)
    scores = _classes(v, v.tmp("Transpose", [scores], perm=[0, 2, 1]), labels)  # [N, C', priors]
    boxes = v.tmp("Transpose", [boxes], perm=[0, 2, 1, 3])  # [N, loc classes, priors, 4]
    if p.share_location:
        boxes = v.tmp("Tile", [boxes, v.g.ints([1, len(labels), 1, 1], "repeats")])
    else:
        boxes = _classes(v, boxes, labels)
    values, indices = v.g.node("TopK", [scores, v.g.ints([k], "k")], 2, hint=v.name, axis=2)
    spread = v.tmp("Tile", [v.g.unsqueeze(indices, [3], hint=v.name), v.g.ints([1, 1, 1, _BOX], "repeats")])
    boxes = v.tmp("GatherElements", [boxes, spread], axis=2)  # [N, C', K, 4]
    keep = _nms_mask(v, boxes, values, k)  # [N * C' * K] of 0 / 1
    if p.HasField("confidence_threshold"):
        above = v.tmp("Greater", [values, v.g.const(p.confidence_threshold, f"{v.name}/threshold")])
        keep = v.tmp("Mul", [keep, v.g.reshape(v.tmp("Cast", [above], to=TensorProto.FLOAT), [-1], hint=v.name)])
    if -1 < p.keep_top_k < len(labels) * k:
        keep = _keep_top_k(v, keep, values, p.keep_top_k, len(labels) * k)
    _rows(v, keep, values, boxes, labels, k)


def _decoded_boxes(v: LayerView, priors: int, loc_classes: int) -> str:
    """DecodeBBox for every prior (and location class): [N, priors, loc classes, 4], clipped
    to [0, 1] only with `clip` (OpenCV's extension; caffe-ssd never clips)."""
    p = v.param.detection_output_param
    offsets = _split(v, v.g.reshape(v.inputs[0], [0, priors, loc_classes, _LOC], hint=v.name))
    box, variance = _priors(v, priors, with_variance=not p.variance_encoded_in_target)
    x1, y1, x2, y2 = _split(v, box)  # each [1, priors, 1, 1]
    if variance is not None:
        offsets = [v.tmp("Mul", [var, o]) for var, o in zip(_split(v, variance), offsets, strict=True)]
    dx1, dy1, dx2, dy2 = offsets
    if p.code_type == _CODE.CORNER:
        corners = [v.tmp("Add", [x1, dx1]), v.tmp("Add", [y1, dy1]), v.tmp("Add", [x2, dx2]), v.tmp("Add", [y2, dy2])]
    elif p.code_type in (_CODE.CENTER_SIZE, _CODE.CORNER_SIZE):
        width, height = v.tmp("Sub", [x2, x1]), v.tmp("Sub", [y2, y1])
        if p.code_type == _CODE.CORNER_SIZE:
            scaled = [v.tmp("Mul", [o, s]) for o, s in zip(offsets, (width, height, width, height), strict=True)]
            corners = [v.tmp("Add", [c, s]) for c, s in zip((x1, y1, x2, y2), scaled, strict=True)]
        else:
            half = v.g.const(0.5, "half")
            center_x = v.tmp("Mul", [v.tmp("Add", [x1, x2]), half])
            center_y = v.tmp("Mul", [v.tmp("Add", [y1, y2]), half])
            cx = v.tmp("Add", [v.tmp("Mul", [dx1, width]), center_x])
            cy = v.tmp("Add", [v.tmp("Mul", [dy1, height]), center_y])
            half_w = v.tmp("Mul", [v.tmp("Mul", [v.tmp("Exp", [dx2]), width]), half])
            half_h = v.tmp("Mul", [v.tmp("Mul", [v.tmp("Exp", [dy2]), height]), half])
            corners = [v.tmp("Sub", [cx, half_w]), v.tmp("Sub", [cy, half_h])]
            corners += [v.tmp("Add", [cx, half_w]), v.tmp("Add", [cy, half_h])]
    else:
        raise v.unsupported(f"unknown code_type {p.code_type}")
    boxes = v.tmp("Concat", corners, axis=3)
    if p.clip:  # OpenCV's field (its face detector sets it): boxes clipped to the image before NMS
        boxes = v.tmp("Clip", [boxes, v.g.const(0.0, "zero"), v.g.const(1.0, "one")])
    return boxes


def _priors(v: LayerView, priors: int, with_variance: bool) -> tuple[str, str | None]:
    """The prior boxes and (unless the variance is encoded in the target) their variances,
    each [1, priors, 1, 4], from PriorBox's [1, 2, priors * 4] (only its first item is read)."""
    parts = 2 if with_variance else 1
    flat = v.g.reshape(v.inputs[2], [-1], hint=v.name)
    flat = v.tmp("Slice", [flat, v.g.ints([0], "starts"), v.g.ints([parts * priors * _BOX], "ends")])
    stacked = v.g.reshape(flat, [parts, priors, 1, _BOX], hint=v.name)
    if not with_variance:
        return stacked, None
    box, variance = v.g.node("Split", [stacked, v.g.ints([1, 1], "split")], 2, hint=v.name, axis=0)
    return box, variance


def _split(v: LayerView, x: str) -> list[str]:
    """The four coordinates along the last axis (kept as a size-1 axis)."""
    return v.g.node("Split", [x, v.g.ints([1, 1, 1, 1], "split")], 4, hint=v.name, axis=3)


def _classes(v: LayerView, x: str, labels: list[int]) -> str:
    """x without the background class on axis 1 (labels: the classes kept, ascending)."""
    count = v.param.detection_output_param.num_classes
    if len(labels) == count:
        return x
    bg = v.param.detection_output_param.background_label_id
    parts = [
        v.tmp("Slice", [x, v.g.ints([start], "starts"), v.g.ints([end], "ends"), v.g.ints([1], "axes")])
        for start, end in ((0, bg), (bg + 1, count))
        if end > start
    ]
    return parts[0] if len(parts) == 1 else v.tmp("Concat", parts, axis=1)


def _nms_mask(v: LayerView, boxes: str, values: str, k: int) -> str:
    """1 where greedy NMS keeps a candidate, per image and class: [N * C' * K]."""
    x1, y1, x2, y2 = _split(v, boxes)
    upright = [x1, y1, v.tmp("Max", [x2, x1]), v.tmp("Max", [y2, y1])]  # inverted -> zero area
    nms_boxes = v.g.reshape(v.tmp("Concat", upright, axis=3), [-1, k, _BOX], hint=v.name)
    nms_scores = v.g.reshape(values, [-1, 1, k], hint=v.name)
    threshold = v.g.const([v.param.detection_output_param.nms_param.nms_threshold], f"{v.name}/nms_threshold")
    selected = v.tmp("NonMaxSuppression", [nms_boxes, nms_scores, v.g.ints([k], "max_boxes"), threshold])
    batch_class = v.tmp("Slice", [selected, v.g.ints([0], "starts"), v.g.ints([1], "ends"), v.g.ints([1], "axes")])
    box = v.tmp("Slice", [selected, v.g.ints([2], "starts"), v.g.ints([3], "ends"), v.g.ints([1], "axes")])
    flat = v.g.reshape(v.tmp("Add", [v.tmp("Mul", [batch_class, v.g.ints([k], "k")]), box]), [-1], hint=v.name)
    ones = v.tmp("Cast", [v.tmp("Greater", [flat, v.g.ints([-1], "minus_one")])], to=TensorProto.FLOAT)
    zeros = _zeros_like(v, v.g.reshape(values, [-1], hint=v.name))
    return v.tmp("ScatterElements", [zeros, flat, ones], axis=0)


def _zeros_like(v: LayerView, x: str) -> str:
    return v.tmp("ConstantOfShape", [v.tmp("Shape", [x])], value=_scalar(0.0))


def _scalar(value: float) -> TensorProto:
    """ConstantOfShape's `value` attribute."""
    return numpy_helper.from_array(np.array([value], np.float32))


def _keep_top_k(v: LayerView, keep: str, values: str, keep_top_k: int, per_image: int) -> str:
    """keep, limited to the keep_top_k best-scoring survivors of each image."""
    kept = v.g.reshape(keep, [-1, per_image], hint=v.name)
    scores = v.g.reshape(values, [-1, per_image], hint=v.name)
    masked = v.tmp("Where", [v.tmp("Cast", [kept], to=TensorProto.BOOL), scores, v.g.const(-np.inf, "minus_inf")])
    _, best = v.g.node("TopK", [masked, v.g.ints([keep_top_k], "keep_top_k")], 2, hint=v.name, axis=1)
    chosen = v.tmp("GatherElements", [kept, best], axis=1)  # 0 where fewer than keep_top_k survived
    limited = v.tmp("ScatterElements", [_zeros_like(v, kept), best, chosen], axis=1)
    return v.g.reshape(limited, [-1], hint=v.name)


def _rows(v: LayerView, keep: str, values: str, boxes: str, labels: list[int], k: int) -> None:
    """The kept candidates as rows (image, label, score, box), or caffe-ssd's one row of -1s
    per image when no image kept any: [1, 1, rows, 7]."""
    ones, image = _image_ids(v)  # [N, 1] each
    per_image = np.ones((1, len(labels) * k), np.float32)
    label_row = np.repeat(np.asarray(labels, np.float32), k)[None]
    columns = [
        v.tmp("Mul", [image, v.g.const(per_image, f"{v.name}/ones")]),
        v.tmp("Mul", [ones, v.g.const(label_row, f"{v.name}/labels")]),
        values,
    ]
    table = [v.g.reshape(c, [-1, 1], hint=v.name) for c in columns] + [v.g.reshape(boxes, [-1, _BOX], hint=v.name)]
    minus_ones = v.tmp("Tile", [v.tmp("Mul", [ones, v.g.const(-1.0, "minus_one")]), v.g.ints([1, 6], "repeats")])
    empty_rows = v.tmp("Concat", [image, minus_ones], axis=1)
    total = v.g.reduce("ReduceSum", keep, [0], keepdims=True, hint=v.name)
    none_kept = v.tmp("Cast", [v.tmp("Greater", [v.g.const([0.5], "half"), total])], to=TensorProto.FLOAT)
    empty_flags = v.tmp("Mul", [v.g.reshape(ones, [-1], hint=v.name), none_kept])
    candidates = v.tmp("Concat", [v.tmp("Concat", table, axis=1), empty_rows], axis=0)
    chosen = v.g.reshape(v.tmp("NonZero", [v.tmp("Concat", [keep, empty_flags], axis=0)]), [-1], hint=v.name)
    v.emit("Unsqueeze", [v.tmp("Gather", [candidates, chosen], axis=0), v.g.ints([0, 1], "axes")])


def _image_ids(v: LayerView) -> tuple[str, str]:
    """[N, 1] ones and [N, 1] image indices 0..N-1, for the batch the scores arrive with."""
    first = v.g.reshape(v.inputs[1], [0, -1], hint=v.name)
    first = v.tmp("Slice", [first, v.g.ints([0], "starts"), v.g.ints([1], "ends"), v.g.ints([1], "axes")])
    ones = v.tmp("ConstantOfShape", [v.tmp("Shape", [first])], value=_scalar(1.0))
    return ones, v.tmp("Sub", [v.tmp("CumSum", [ones, v.g.ints([0], "axis")]), v.g.const(1.0, "one")])
