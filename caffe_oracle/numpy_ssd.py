"""caffe-ssd's four detection layers in plain numpy: the oracle the fast engines are held to.

Written from caffe-ssd's own definitions (weiliu89/caffe, ssd branch: normalize_layer.cpp,
permute_layer.cpp, prior_box_layer.cpp, detection_output_layer.cpp, util/bbox_util.cpp),
deliberately as loops that read like those sources rather than like our converters, so the
two are independent statements of the same layer. Quirks kept on purpose:

* PriorBox truncates min_size / max_size to integers before using them (`int min_size_ =`);
* DetectionOutput decodes and measures overlaps in float32, as caffe-ssd does, so that
  NMS decisions fall where caffe-ssd's fall; it clips decoded boxes only with `clip`, the
  field OpenCV adds (caffe-ssd never clips; OpenCV's face detector sets it);
* DetectionOutput writes, per image, its detections label by label (ascending), each
  label's in descending score; when no image has any detection it writes one row per
  image, [image, -1, -1, -1, -1, -1, -1].

Every function has the fork_reference signature: (layer, bottoms, blobs) -> tops.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Layer = Callable[..., list[np.ndarray]]
CORNER, CENTER_SIZE, CORNER_SIZE = 1, 2, 3  # PriorBoxParameter.CodeType


def normalize(layer, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """x / sqrt(sum of squares + eps) * scale: the sum over C,H,W per image (across_spatial)
    or over C per pixel; scale is one value (channel_shared) or one per channel."""
    p = layer.norm_param
    x = bottoms[0].astype(np.float64)
    out = np.empty_like(x)
    scale = blobs[0].astype(np.float64).reshape(-1)
    for n in range(x.shape[0]):
        image = x[n].reshape(x.shape[1], -1)  # C x spatial
        if p.across_spatial:
            norm = math.sqrt(float(np.sum(image * image)) + p.eps)
            normed = image / norm
        else:
            norm_per_pixel = np.sqrt(np.sum(image * image, axis=0) + p.eps)
            normed = image / norm_per_pixel[None, :]
        factor = scale[0] if p.channel_shared else scale[:, None]
        out[n] = (normed * factor).reshape(x.shape[1:])
    return [out.astype(np.float32)]


def permute(layer, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """The listed axes first, in that order, then the unlisted ones in their own order."""
    x = bottoms[0]
    order = list(layer.permute_param.order)
    order += [axis for axis in range(x.ndim) if axis not in order]
    return [np.ascontiguousarray(np.transpose(x, order))]


def prior_box(layer, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """[1, 2, H*W*priors*4]: every prior's (xmin, ymin, xmax, ymax) / image size, then its variances."""
    p = layer.prior_box_param
    layer_h, layer_w = bottoms[0].shape[2], bottoms[0].shape[3]
    ratios = [1.0]
    for ar in p.aspect_ratio:
        if all(abs(ar - known) >= 1e-6 for known in ratios):
            ratios.append(ar)
            if p.flip:
                ratios.append(1.0 / ar)
    if p.HasField("img_h") or p.HasField("img_w"):
        img_h, img_w = p.img_h, p.img_w
    elif p.HasField("img_size"):
        img_h = img_w = p.img_size
    else:
        img_h, img_w = bottoms[1].shape[2], bottoms[1].shape[3]
    if p.HasField("step_h") or p.HasField("step_w"):
        step_h, step_w = p.step_h, p.step_w
    elif p.HasField("step"):
        step_h = step_w = p.step
    else:
        step_h, step_w = np.float32(img_h) / np.float32(layer_h), np.float32(img_w) / np.float32(layer_w)
    step_h, step_w, offset = np.float32(step_h), np.float32(step_w), np.float32(p.offset)
    boxes = []
    for h in range(layer_h):
        for w in range(layer_w):
            center_x = np.float32((w + offset) * step_w)
            center_y = np.float32((h + offset) * step_h)
            for s, size in enumerate(p.min_size):
                min_size = int(size)
                sizes = [(min_size, min_size)]
                if p.max_size:
                    side = math.sqrt(min_size * int(p.max_size[s]))
                    sizes.append((side, side))
                for ar in ratios:
                    if abs(ar - 1.0) >= 1e-6:
                        sizes.append((min_size * math.sqrt(ar), min_size / math.sqrt(ar)))
                for box_w, box_h in sizes:
                    box_w, box_h = float(np.float32(box_w)), float(np.float32(box_h))
                    boxes.append(
                        [
                            (center_x - box_w / 2.0) / img_w,
                            (center_y - box_h / 2.0) / img_h,
                            (center_x + box_w / 2.0) / img_w,
                            (center_y + box_h / 2.0) / img_h,
                        ]
                    )
    coords = np.array(boxes, np.float64).astype(np.float32)
    if p.clip:
        coords = np.clip(coords, 0.0, 1.0)
    variance = list(p.variance) or [0.1]
    variances = np.tile(np.array(variance * (4 // len(variance)), np.float32), (len(boxes), 1))
    return [np.stack([coords.reshape(-1), variances.reshape(-1)])[None]]


def detection_output(layer, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """Decode every prior's box, NMS per class, keep_top_k per image: rows of
    (image, label, score, xmin, ymin, xmax, ymax) as a [1, 1, rows, 7] blob."""
    p = layer.detection_output_param
    loc, conf, prior = bottoms
    num, classes = loc.shape[0], p.num_classes
    loc_classes = 1 if p.share_location else classes
    priors = prior.shape[2] // 4
    prior_flat = prior.reshape(-1).astype(np.float32)
    prior_boxes = prior_flat[: priors * 4].reshape(priors, 4)
    prior_vars = prior_flat[priors * 4 : priors * 8].reshape(priors, 4)
    threshold = p.confidence_threshold if p.HasField("confidence_threshold") else -np.finfo(np.float32).max
    top_k = p.nms_param.top_k if p.nms_param.HasField("top_k") else -1
    rows: list[list[float]] = []
    for i in range(num):
        locs = loc[i].reshape(priors, loc_classes, 4).astype(np.float32)
        scores = conf[i].reshape(priors, classes).astype(np.float32)
        kept: dict[int, list[int]] = {}
        decoded: dict[int, np.ndarray] = {}
        for c in range(classes):
            if c == p.background_label_id:
                continue
            loc_label = 0 if p.share_location else c
            if loc_label not in decoded:
                decoded[loc_label] = _decode(prior_boxes, prior_vars, locs[:, loc_label], p)
            kept[c] = _nms(decoded[loc_label], scores[:, c], threshold, p.nms_param, top_k)
        if p.keep_top_k > -1 and sum(len(v) for v in kept.values()) > p.keep_top_k:
            pairs = [(float(scores[idx, c]), c, idx) for c in kept for idx in kept[c]]
            pairs.sort(key=lambda pair: -pair[0])  # stable: equal scores keep label, then NMS order
            kept = {}
            for _, c, idx in pairs[: p.keep_top_k]:
                kept.setdefault(c, []).append(idx)
        for c in sorted(kept):
            boxes = decoded[0 if p.share_location else c]
            for idx in kept[c]:
                rows.append([i, c, float(scores[idx, c]), *(float(v) for v in boxes[idx])])
    if not rows:
        rows = [[i, -1, -1, -1, -1, -1, -1] for i in range(num)]
    return [np.array(rows, np.float32).reshape(1, 1, len(rows), 7)]


def _decode(prior: np.ndarray, var: np.ndarray, loc: np.ndarray, p) -> np.ndarray:
    """DecodeBBox for every prior, in float32 like caffe-ssd; clipped to [0, 1] only with
    `clip`, OpenCV's extension (its face detector sets it; caffe-ssd never clips)."""
    out = np.empty_like(loc)
    half = np.float32(0.5)
    for i in range(len(loc)):
        px1, py1, px2, py2 = prior[i]
        v = np.ones(4, np.float32) if p.variance_encoded_in_target else var[i]
        lx1, ly1, lx2, ly2 = loc[i]
        if p.code_type == CORNER:
            out[i] = [px1 + v[0] * lx1, py1 + v[1] * ly1, px2 + v[2] * lx2, py2 + v[3] * ly2]
        elif p.code_type == CENTER_SIZE:
            pw, ph = px2 - px1, py2 - py1
            pcx, pcy = (px1 + px2) * half, (py1 + py2) * half
            cx, cy = v[0] * lx1 * pw + pcx, v[1] * ly1 * ph + pcy
            w, h = np.exp(v[2] * lx2) * pw, np.exp(v[3] * ly2) * ph
            out[i] = [cx - w * half, cy - h * half, cx + w * half, cy + h * half]
        elif p.code_type == CORNER_SIZE:
            pw, ph = px2 - px1, py2 - py1
            out[i] = [px1 + v[0] * lx1 * pw, py1 + v[1] * ly1 * ph, px2 + v[2] * lx2 * pw, py2 + v[3] * ly2 * ph]
        else:
            raise ValueError(f"unknown code_type {p.code_type}")
    return np.clip(out, 0, 1) if p.clip else out


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, nms, top_k: int) -> list[int]:
    """ApplyNMSFast: candidates above the threshold by descending score (ties: lower index
    first), the first top_k of them, each kept unless it overlaps a kept one by more than the
    (adaptive) NMS threshold."""
    candidates = [i for i in np.argsort(-scores, kind="stable") if scores[i] > threshold]
    if top_k > -1:
        candidates = candidates[:top_k]
    limit, kept = nms.nms_threshold, []
    for idx in candidates:
        if all(_iou(boxes[idx], boxes[k]) <= limit for k in kept):
            kept.append(int(idx))
            if nms.eta < 1 and limit > 0.5:
                limit *= nms.eta
    return kept


def _size(box: np.ndarray) -> np.float32:
    """BBoxSize of a normalised box: 0 for an inverted one."""
    if box[2] < box[0] or box[3] < box[1]:
        return np.float32(0)
    return np.float32((box[2] - box[0]) * (box[3] - box[1]))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """JaccardOverlap of normalised boxes, in float32."""
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return 0.0
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = np.float32(width * height)
    return float(inter / (_size(a) + _size(b) - inter))


LAYERS: dict[str, Layer] = {
    "Normalize": normalize,
    "Permute": permute,
    "PriorBox": prior_box,
    "DetectionOutput": detection_output,
}
