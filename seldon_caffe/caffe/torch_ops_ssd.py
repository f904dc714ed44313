"""torch forms of the ONNX ops that only the caffe-ssd converters write (see torch_ops.py).

Most are one torch call. NonMaxSuppression is not a torch op (torchvision has one, and
this package does not depend on torchvision): it is `non_max_suppression` below, recorded in
the fx graph as a call of that plain function, written in TorchScript's subset of Python so
a module that contains it can still be scripted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..engines.torch import import_torch
from .torch_ops import Node, TorchBuilder, UnsupportedOp, op

if TYPE_CHECKING:  # mypy reads torch's own types
    import torch
else:
    torch = import_torch()  # only the torch runtime and converter import this module


@op("Transpose")
def _transpose(b: TorchBuilder, n: Node) -> Any:
    perm = n.attrs.get("perm") or list(reversed(range(b.rank(n.inputs[0], n))))
    return b.tensor(n.inputs[0]).permute(*perm)


def _axis(b: TorchBuilder, n: Node, axis: int) -> int:
    return axis + b.rank(n.inputs[0], n) if axis < 0 else axis


@op("GatherElements")
def _gather_elements(b: TorchBuilder, n: Node) -> Any:
    axis = _axis(b, n, n.attrs.get("axis", 0))
    return b.torch.gather(b.tensor(n.inputs[0]), axis, b.tensor(n.inputs[1]))


@op("ScatterElements")
def _scatter_elements(b: TorchBuilder, n: Node) -> Any:
    if n.attrs.get("reduction", b"none") not in (b"none", "none"):
        raise UnsupportedOp(f"ONNX node {n.name!r}: ScatterElements with a reduction")
    axis = _axis(b, n, n.attrs.get("axis", 0))
    return b.torch.scatter(b.tensor(n.inputs[0]), axis, b.tensor(n.inputs[1]), b.tensor(n.inputs[2]))


@op("CumSum")
def _cumsum(b: TorchBuilder, n: Node) -> Any:
    if n.attrs.get("exclusive", 0) or n.attrs.get("reverse", 0):
        raise UnsupportedOp(f"ONNX node {n.name!r}: CumSum exclusive or reverse")
    (axis,) = b.ints(n.inputs[1])
    return b.torch.cumsum(b.tensor(n.inputs[0]), _axis(b, n, axis))


@op("NonZero")
def _nonzero(b: TorchBuilder, n: Node) -> Any:
    return b.torch.nonzero(b.tensor(n.inputs[0])).t()  # ONNX: one row per axis


@op("NonMaxSuppression")
def _non_max_suppression(b: TorchBuilder, n: Node) -> Any:
    inputs = [*n.inputs, "", "", ""]
    limit = b.ints(inputs[2])[0] if inputs[2] else 0
    iou = float(b.values[inputs[3]].reshape(-1)[0]) if inputs[3] else 0.0
    score = float(b.values[inputs[4]].reshape(-1)[0]) if inputs[4] else None
    args = (b.tensor(n.inputs[0]), b.tensor(n.inputs[1]), limit, iou, score, bool(n.attrs.get("center_point_box", 0)))
    return b.tracer.create_proxy("call_function", non_max_suppression, args, {})


def non_max_suppression(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    max_per_class: int,
    iou_threshold: float,
    score_threshold: float | None,
    center_point_box: bool,
) -> torch.Tensor:
    """ONNX NonMaxSuppression: boxes [B, K, 4], scores [B, C, K] -> [selected, 3] rows of
    (batch, class, box), per batch and class in selection order (descending score; equal
    scores: the lower index first). A box is dropped when its IoU with a box already
    selected exceeds the threshold; a box of zero area overlaps nothing."""
    if center_point_box:
        centre, half = boxes[..., :2], boxes[..., 2:] / 2
        low, high = centre - half, centre + half
    else:
        low, high = torch.minimum(boxes[..., :2], boxes[..., 2:]), torch.maximum(boxes[..., :2], boxes[..., 2:])
    area = (high - low).prod(-1)  # [B, K]
    overlap = (torch.minimum(high[:, :, None], high[:, None]) - torch.maximum(low[:, :, None], low[:, None])).clamp(
        min=0
    )
    inter = overlap.prod(-1)  # [B, K, K]
    union = area[:, :, None] + area[:, None] - inter
    positive = (inter > 0) & (area[:, :, None] > 0) & (area[:, None] > 0)
    iou = torch.where(positive, inter / torch.where(positive, union, torch.ones_like(union)), torch.zeros_like(inter))
    batches, classes, count = scores.shape
    order = torch.argsort(scores, dim=2, descending=True, stable=True)  # [B, C, K]
    ranked = torch.gather(scores, 2, order)
    rows = torch.gather(
        iou[:, None].expand(batches, classes, count, count), 2, order[..., None].expand(-1, -1, -1, count)
    )
    ranked_iou = torch.gather(rows, 3, order[:, :, None, :].expand(-1, -1, count, -1))  # [B, C, K, K]
    candidate = ranked > score_threshold if score_threshold is not None else torch.ones_like(ranked, dtype=torch.bool)
    # Greedy NMS keeps box i when no kept box ranked above it clashes with it. Each box depends
    # only on those above it, so iterating "keep = candidate and no kept box above clashes" from
    # keep = candidate reaches that one answer within `count` rounds, in a few in practice: a
    # few passes over [B, C, K, K] instead of K small steps.
    above = torch.ones(count, count, dtype=torch.bool, device=boxes.device).tril(-1)
    clashes = (ranked_iou > iou_threshold) & above  # [B, C, i, j]: j above i and clashing
    keep = candidate
    for _ in range(count):
        settled = candidate & ~(clashes & keep[:, :, None, :]).any(-1)
        if torch.equal(settled, keep):
            break
        keep = settled
    keep = keep & (torch.cumsum(keep.to(torch.int64), 2) <= max_per_class)
    chosen = torch.nonzero(keep)  # (batch, class, rank), in ONNX's output order
    box = order[chosen[:, 0], chosen[:, 1], chosen[:, 2]]
    return torch.stack([chosen[:, 0], chosen[:, 1], box], 1)
