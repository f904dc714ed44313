"""caffe-ssd's box arithmetic for training: prior boxes, CENTER_SIZE encoding, matching.

The deploy net decodes with caffe-ssd's own PriorBox and DetectionOutput layers, so the
targets the torch net learns must be made exactly as caffe-ssd makes them, or the exported
net would decode something else than what was learnt. Written from the definitions in
weiliu89/caffe (ssd branch): prior_box_layer.cpp (prior order and sizes), bbox_util.cpp
(EncodeBBox with CENTER_SIZE and the variance in the prior blob, JaccardOverlap on
normalised boxes, MatchBBox: bipartite, then per prediction), multibox_loss_layer.cpp
(MAX_NEGATIVE hard-negative mining at neg_pos_ratio 3, normalised by the matches).

All boxes here are normalised [xmin, ymin, xmax, ymax] (0..1 of the input's width/height).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OVERLAP_THRESHOLD = 0.5  # a prior matches a ground-truth box at IoU >= this (PER_PREDICTION)
NEG_OVERLAP = 0.5  # a prior may be mined as a negative when its best IoU is below this
NEG_POS_RATIO = 3.0


@dataclass(frozen=True)
class PriorSpec:
    """One PriorBox layer's prior_box_param (the fields this example sets)."""

    min_size: float
    max_size: float
    aspect_ratio: tuple[float, ...] = (2.0,)
    flip: bool = True
    clip: bool = False
    step: float = 0.0  # 0: image size / feature map size, as caffe-ssd does when step is unset
    offset: float = 0.5
    variance: tuple[float, ...] = field(default=(0.1, 0.1, 0.2, 0.2))

    def ratios(self) -> list[float]:
        """Aspect ratios in caffe-ssd's order: 1, then each new one followed by its inverse when flipped."""
        found = [1.0]
        for ratio in self.aspect_ratio:
            if all(abs(ratio - seen) >= 1e-6 for seen in found):
                found += [ratio, float(np.float32(1.0 / ratio))] if self.flip else [ratio]
        return found

    def per_location(self) -> int:
        """Priors per feature-map cell: one per ratio, one more for max_size."""
        return len(self.ratios()) + (1 if self.max_size else 0)


def prior_boxes(spec: PriorSpec, layer_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """The PriorBox layer's first channel as (H * W * per_location, 4) float32 boxes.

    Order: cell by cell (row-major), per cell the min_size box, the sqrt(min * max) box,
    then the other ratios. caffe-ssd reads min_size and max_size into ints: so do we.
    """
    (layer_h, layer_w), (image_h, image_w) = layer_hw, image_hw
    step_w = spec.step or image_w / layer_w
    step_h = spec.step or image_h / layer_h
    min_size, max_size = int(spec.min_size), int(spec.max_size)
    sizes = [(min_size, min_size)]
    if max_size:
        sizes.append((np.sqrt(min_size * max_size),) * 2)
    for ratio in spec.ratios():
        if abs(ratio - 1.0) >= 1e-6:
            root = np.sqrt(np.float32(ratio))
            sizes.append((min_size * root, min_size / root))
    half = np.asarray(sizes, np.float32).astype(np.float64)[None, :, :] / 2  # sizes are floats in Caffe
    cx = (np.arange(layer_w, dtype=np.float32) + np.float32(spec.offset)) * np.float32(step_w)
    cy = (np.arange(layer_h, dtype=np.float32) + np.float32(spec.offset)) * np.float32(step_h)
    centre = np.stack(np.meshgrid(cx, cy), axis=-1).reshape(-1, 1, 2).astype(np.float64)
    scale = np.asarray([image_w, image_h], np.float64)
    boxes = np.concatenate([(centre - half) / scale, (centre + half) / scale], axis=-1).reshape(-1, 4)
    return np.clip(boxes, 0, 1).astype(np.float32) if spec.clip else boxes.astype(np.float32)


def prior_variances(spec: PriorSpec, count: int) -> np.ndarray:
    """The PriorBox layer's second channel as (count, 4): one variance for all, or four."""
    values = spec.variance if len(spec.variance) == 4 else spec.variance * 4
    return np.tile(np.asarray(values, np.float32), (count, 1))


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (N, 4) with every box in b (M, 4), normalised boxes (no +1)."""
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = high - low
    inter = np.where((wh > 0).all(axis=-1), wh[..., 0] * wh[..., 1], 0.0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def match(priors: np.ndarray, truths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MatchBBox: (the ground-truth index per prior, -1 for none; each prior's best IoU).

    First bipartite: repeatedly the highest remaining IoU pairs a prior and a box (ties go
    to the lower prior, then the lower box index, as Caffe scans them), until every box has
    its prior; then each unmatched prior takes its best box with IoU >= OVERLAP_THRESHOLD.
    """
    overlaps = jaccard(priors.astype(np.float64), truths.astype(np.float64)).astype(np.float32)
    overlaps = np.where(overlaps > 1e-6, overlaps, 0.0)
    matched = np.full(len(priors), -1, np.int64)
    best = overlaps.max(axis=1, initial=0.0)
    pool = overlaps.copy()
    for _ in range(len(truths)):
        prior, truth = np.unravel_index(int(np.argmax(pool)), pool.shape)
        if pool[prior, truth] <= 0:
            break
        matched[prior], best[prior] = truth, pool[prior, truth]
        pool[prior, :], pool[:, truth] = 0.0, 0.0
    free = matched == -1
    eligible = np.where(overlaps >= OVERLAP_THRESHOLD, overlaps, -1.0)
    choice = np.argmax(eligible, axis=1)
    take = free & (eligible.max(axis=1, initial=-1.0) >= OVERLAP_THRESHOLD)
    matched[take] = choice[take]
    return matched, best


def encode(truths: np.ndarray, priors: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """EncodeBBox, CENTER_SIZE with the variance in the prior blob: the loc target per pair."""
    prior_wh = priors[:, 2:] - priors[:, :2]
    prior_centre = (priors[:, :2] + priors[:, 2:]) / 2
    wh = truths[:, 2:] - truths[:, :2]
    centre = (truths[:, :2] + truths[:, 2:]) / 2
    offset = (centre - prior_centre) / prior_wh / variances[:, :2]
    scale = np.log(wh / prior_wh) / variances[:, 2:]
    return np.concatenate([offset, scale], axis=1).astype(np.float32)


def targets(
    priors: np.ndarray, variances: np.ndarray, boxes: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's training targets: (label per prior, 0 = background; loc target per
    prior (zeros where unmatched); True where the prior may be mined as a negative)."""
    matched, best = match(priors, boxes)
    positive = matched >= 0
    classes = np.where(positive, labels[np.maximum(matched, 0)], 0)
    loc = np.zeros_like(priors)
    loc[positive] = encode(boxes[matched[positive]], priors[positive], variances[positive])
    return classes.astype(np.int64), loc, ~positive & (best < NEG_OVERLAP)
