"""SegNet's and DeepLab / PSPNet's layers: BN, Upsample, Interp.

Two forks call their batch normalisation "BN" with one `bn_param`: SegNet's (2 blobs, scale
and shift, `bn_mode`) and PSPNet's (4 blobs: scale, shift, moving mean and variance).
`bn_flavour` tells them apart by the settings only PSPNet's has, or by the 4 `param` specs
its definitions declare; a BN that sets neither is SegNet's.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import caffe_pb2
from .._geometry import LayerError, Shape, one_bottom

Rule = Callable[[caffe_pb2.LayerParameter, list[Shape]], list[Shape]]

_PSPNET_BN_FIELDS = ("moving_average", "decay", "axis", "momentum", "eps", "frozen", "engine", "var_eps")


def bn_flavour(layer: caffe_pb2.LayerParameter) -> str:
    """'segnet' or 'pspnet': which fork's BN this layer is (see the module docstring)."""
    p = layer.bn_param
    if p.HasField("bn_mode"):
        return "segnet"
    if any(p.HasField(name) for name in _PSPNET_BN_FIELDS) or len(layer.param) == 4:
        return "pspnet"
    return "segnet"


def _four_d(shape: Shape) -> Shape:
    if len(shape) != 4:
        raise LayerError(f"needs a 4-D input (N, C, H, W), got {list(shape)}")
    return shape


def _bn(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    """The input's shape; SegNet's LEARN mode may add the batch mean and variance as tops."""
    shape = _four_d(one_bottom(bottoms))
    statistics = (1, shape[1], 1, 1)
    if bn_flavour(layer) == "pspnet":
        if layer.bn_param.axis != 1:
            raise LayerError(f"bn_param.axis {layer.bn_param.axis} is not supported; the channel axis is 1")
        if len(layer.top) != 1:
            raise LayerError("PSPNet's BN has one top")
        return [shape]
    if not 1 <= len(layer.top) <= 3:
        raise LayerError("SegNet's BN has one top (plus the batch mean and variance in LEARN mode)")
    if len(layer.top) > 1 and layer.bn_param.bn_mode == caffe_pb2.BNParameter.INFERENCE:
        raise LayerError("in INFERENCE mode SegNet's BN has one top (no batch statistics)")
    return [shape, statistics, statistics][: len(layer.top)]


def _bn_params(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    """Scale and shift (and PSPNet's moving mean and variance), each (1, C, 1, 1)."""
    shape = _four_d(one_bottom(bottoms))
    return [(1, shape[1], 1, 1)] * (4 if bn_flavour(layer) == "pspnet" else 2)


def upsample_scale(p: caffe_pb2.UpsampleParameter) -> tuple[int, int]:
    """(scale_h, scale_w): scale_h / scale_w when set, else scale (default 2)."""
    return (p.scale_h, p.scale_w) if p.HasField("scale_h") or p.HasField("scale_w") else (p.scale, p.scale)


def upsample_size(p: caffe_pb2.UpsampleParameter, height: int, width: int) -> tuple[int, int]:
    """SegNet's output plane: upsample_h x upsample_w, else the input times the scale, less
    one row / column for pad_out_h / pad_out_w. Checks what SegNet's LayerSetUp checks."""
    if p.HasField("upsample_h") and p.HasField("upsample_w"):
        if p.upsample_h <= 1 or p.upsample_w <= 1:
            raise LayerError("upsample_h and upsample_w must be above 1")
        return p.upsample_h, p.upsample_w
    if p.HasField("scale") and (p.HasField("scale_h") or p.HasField("scale_w")):
        raise LayerError("set upsample_h and upsample_w, scale, or scale_h and scale_w: not a mix")
    if p.HasField("scale_h") != p.HasField("scale_w"):
        raise LayerError("set both scale_h and scale_w")
    scale_h, scale_w = upsample_scale(p)
    if scale_h <= 1 or scale_w <= 1:
        raise LayerError(f"the upsampling scale must be above 1, got {scale_h} x {scale_w}")
    if (p.pad_out_h and scale_h != 2) or (p.pad_out_w and scale_w != 2):
        raise LayerError("pad_out_h / pad_out_w need a scale of 2 on that axis; set upsample_h and upsample_w")
    return height * scale_h - int(p.pad_out_h), width * scale_w - int(p.pad_out_w)


def _upsample(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    """With a mask bottom (SegNet): [N, C, upsample_h, upsample_w]; with none (the YOLO
    ports' nearest-neighbour Upsample): the last two axes times `scale`."""
    p = layer.upsample_param
    if len(bottoms) == 1:
        shape = bottoms[0]
        scale_h, scale_w = upsample_scale(p)
        if len(shape) < 2 or scale_h < 1 or scale_w < 1:
            raise LayerError(f"needs an input with two spatial axes and a positive scale, got {list(shape)}")
        return [(*shape[:-2], shape[-2] * scale_h, shape[-1] * scale_w)]
    if len(bottoms) != 2:
        raise LayerError(f"takes the input and its pooling mask (or the input alone), got {len(bottoms)} bottoms")
    shape, mask = (_four_d(b) for b in bottoms)
    if shape != mask:
        raise LayerError(f"the mask {list(mask)} must have the input's shape {list(shape)}")
    return [(shape[0], shape[1], *upsample_size(p, shape[2], shape[3]))]


def interp_size(p: caffe_pb2.InterpParameter, height: int, width: int, reference: Shape | None) -> tuple[int, int]:
    """Interp's output size from the cropped input's, in the fork's order of precedence:
    shrink_factor, zoom_factor, height and width, shrink then zoom, the second bottom."""
    shrink, zoom = p.HasField("shrink_factor"), p.HasField("zoom_factor")
    if (shrink and p.shrink_factor < 1) or (zoom and p.zoom_factor < 1):
        raise LayerError("shrink_factor and zoom_factor must be at least 1")

    def shrunk(size: int) -> int:
        return (size - 1) // p.shrink_factor + 1

    def zoomed(size: int) -> int:
        return size + (size - 1) * (p.zoom_factor - 1)

    if shrink and not zoom:
        return shrunk(height), shrunk(width)
    if zoom and not shrink:
        return zoomed(height), zoomed(width)
    if p.HasField("height") and p.HasField("width"):
        return p.height, p.width
    if shrink and zoom:
        return zoomed(shrunk(height)), zoomed(shrunk(width))
    if reference is not None:
        if len(reference) != 4:
            raise LayerError(f"the second bottom must be 4-D to give the output size, got {list(reference)}")
        return reference[2], reference[3]
    raise LayerError("interp_param needs zoom_factor, shrink_factor, height and width, or a second bottom")


def interp_crop(p: caffe_pb2.InterpParameter, height: int, width: int) -> tuple[int, int]:
    """The input's size after pad_beg / pad_end, which may only crop (be <= 0)."""
    if p.pad_beg > 0 or p.pad_end > 0:
        raise LayerError("pad_beg and pad_end may only crop (be 0 or negative)")
    height, width = height + p.pad_beg + p.pad_end, width + p.pad_beg + p.pad_end
    if height <= 0 or width <= 0:
        raise LayerError(f"pad_beg {p.pad_beg} and pad_end {p.pad_end} crop the whole input")
    return height, width


def _interp(layer: caffe_pb2.LayerParameter, bottoms: list[Shape]) -> list[Shape]:
    p = layer.interp_param
    if len(bottoms) not in (1, 2):
        raise LayerError(f"takes one bottom (or two: the second gives the size), got {len(bottoms)}")
    shape = _four_d(bottoms[0])
    if p.interp_type not in ("bilinear", "nearest_neighbor"):
        raise LayerError(f"interp_type {p.interp_type!r} is not one of 'bilinear', 'nearest_neighbor'")
    height, width = interp_size(p, *interp_crop(p, shape[2], shape[3]), bottoms[1] if len(bottoms) == 2 else None)
    if height <= 0 or width <= 0:
        raise LayerError(f"the output would be {height} x {width}")
    return [(shape[0], shape[1], height, width)]


SHAPE_RULES: dict[str, Rule] = {"BN": _bn, "Upsample": _upsample, "Interp": _interp}
PARAM_RULES: dict[str, Rule] = {"BN": _bn_params}
