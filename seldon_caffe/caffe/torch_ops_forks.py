"""torch forms of the ONNX ops that only the other forks' converters write (see torch_ops.py):
MaxRoiPool (ROIPooling) and Expand (Upsample by a mask). Transpose (ShuffleChannel) and
ScatterElements (Upsample) are caffe-ssd's too: torch_ops_ssd.py has them.

They use plain torch only (no torchvision, which is an optional extra), with static shapes
read at build time, so the graphs export and run on any device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .torch_ops import Node, ShapeOf, TorchBuilder, UnsupportedOp, op


@op("Expand")
def _expand(b: TorchBuilder, n: Node) -> Any:
    """ONNX's broadcast to a shape: constant (a 1 keeps the input's size) or Shape(y) (+ c)."""
    x, shape = b.tensor(n.inputs[0]), b.values[n.inputs[1]]
    if isinstance(shape, ShapeOf):
        (count,) = b.shapes[n.inputs[1]]
        if count is None:
            raise UnsupportedOp(f"ONNX node {n.name!r}: Expand needs a shape of known length")
        sizes = [shape.item(i) for i in range(count)]
    else:
        sizes = [-1 if d == 1 else d for d in b.ints(n.inputs[1])]
    value = b.values[n.inputs[0]]
    rank = value.ndim if isinstance(value, np.ndarray) else b.rank(n.inputs[0], n)
    return x.expand(*([-1] * (rank - len(sizes)) + sizes))


@op("MaxRoiPool")
def _max_roi_pool(b: TorchBuilder, n: Node) -> Any:
    """Caffe's ROI max pooling (see onnx_forks.py), exact, in memory that does not grow with
    the ROIs' extent: each bin is the max of four lookups in a table of maxima over every
    power-of-two window (a sparse table), built once per feature map."""
    dims = b.shapes.get(n.inputs[0], [])
    height, width = dims[2:] if len(dims) == 4 else (None, None)
    if height is None or width is None:
        raise UnsupportedOp(f"ONNX node {n.name!r}: MaxRoiPool needs a 4-D input of known height and width")
    torch, (pooled_h, pooled_w) = b.torch, n.attrs["pooled_shape"]
    x, rois = b.tensor(n.inputs[0]), b.tensor(n.inputs[1])
    edges = _RoiEdges(b, n.name, rois, float(n.attrs.get("spatial_scale", 1.0)))
    top, bottom = edges.bins(2, 4, pooled_h, height)
    left, right = edges.bins(1, 3, pooled_w, width)
    levels = (_levels(height), _levels(width))
    k_h, k_w = _log2(torch, bottom - top, levels[0]), _log2(torch, right - left, levels[1])
    level = (k_h[:, :, None] * levels[1] + k_w[:, None, :]) * x.size(0) + edges.batch[:, None, None]
    rows = [top.clamp(max=height - 1), (bottom - torch.pow(2, k_h)).clamp(min=0)]
    cols = [left.clamp(max=width - 1), (right - torch.pow(2, k_w)).clamp(min=0)]
    flat = torch.stack([(level * height + r[:, :, None]) * width + c[:, None, :] for r in rows for c in cols], -1)
    table = _sparse_table(torch, x, *levels)  # [C, levels * N * H * W]
    looked_up = table[:, flat.reshape(-1)].reshape(table.size(0), flat.size(0), pooled_h, pooled_w, 4)
    best = looked_up.amax(dim=-1).permute(1, 0, 2, 3)  # [R, C, PH, PW]
    empty = (bottom <= top)[:, :, None] | (right <= left)[:, None, :]
    return torch.where(empty[:, None], 0.0, best)


class _RoiEdges:
    """The ROIs' batch indices and the bin edges the fork computes from their corners."""

    def __init__(self, b: TorchBuilder, name: str, rois: Any, scale: float) -> None:
        torch = b.torch
        self.torch, self.b, self.name = torch, b, name
        self.batch = rois[:, 0].to(torch.int64)  # C's int(): toward zero
        scaled = (rois[:, 1:5] * scale).double()  # a float32 product: scale is a float32 value
        self.corners = (scaled.sign() * (scaled.abs() + 0.5).floor()).to(torch.int64)  # C's round()

    def bins(self, start: int, end: int, pooled: int, size: int) -> tuple[Any, Any]:
        """[begin, end) of each of `pooled` bins along the axis whose corners are columns
        `start` and `end` of the ROI (1-based, after the batch index), clipped to [0, size]."""
        torch = self.torch
        first, last = self.corners[:, start - 1], self.corners[:, end - 1]
        extent = (last - first + 1).clamp(min=1).to(torch.float32)
        bin_size = extent / float(pooled)  # float32, as the fork
        steps = self.b.tensor(self._steps(pooled)).to(torch.float32)  # 0..pooled, exact
        begin = (steps[:-1][None] * bin_size[:, None]).floor().to(torch.int64) + first[:, None]
        stop = (steps[1:][None] * bin_size[:, None]).ceil().to(torch.int64) + first[:, None]
        return begin.clamp(0, size), stop.clamp(0, size)

    def _steps(self, pooled: int) -> str:
        name = f"{self.name}/steps{pooled}"
        self.b.values[name] = np.arange(pooled + 1, dtype=np.int64)  # int: survives .half()
        return name


def _levels(size: int) -> int:
    """How many power-of-two window sizes fit in `size`: 1, 2, 4, ... <= size."""
    return size.bit_length()


def _log2(torch: Any, length: Any, levels: int) -> Any:
    """floor(log2(length)) for lengths up to 2**levels - 1 (0 for an empty bin), in integers."""
    result = torch.zeros_like(length)
    for level in range(1, levels):
        result = result + (length >= (1 << level)).to(length.dtype)
    return result


def _sparse_table(torch: Any, x: Any, levels_h: int, levels_w: int) -> Any:
    """Max of x over every [h, h + 2**a) x [w, w + 2**c) window, stacked as
    [C, (a * levels_w + c) * N * H * W + ...]; windows past the edge are never looked up."""
    rows = [x]
    for a in range(1, levels_h):
        rows.append(torch.maximum(rows[-1], _shifted(torch, rows[-1], 1 << (a - 1), dim=2)))
    table = []
    for row in rows:
        table.append(row)
        for c in range(1, levels_w):
            table.append(torch.maximum(table[-1], _shifted(torch, table[-1], 1 << (c - 1), dim=3)))
    stacked = torch.stack(table)  # [levels, N, C, H, W]
    return stacked.permute(2, 0, 1, 3, 4).reshape(stacked.size(2), -1)


def _shifted(torch: Any, x: Any, by: int, dim: int) -> Any:
    """x moved `by` places toward the start along `dim`, the end filled with -inf."""
    pad = [0, by, 0, 0] if dim == 3 else [0, 0, 0, by]
    padded = torch.nn.functional.pad(x, pad, value=float("-inf"))
    return padded.narrow(dim, by, x.size(dim))
