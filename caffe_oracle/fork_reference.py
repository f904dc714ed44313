"""A numpy interpreter of whole Caffe nets: the oracle for the forks' layers, which no BVLC
Caffe (the real-Caffe oracle of tests/test_conformance.py) has.

`forward(net, inputs)` runs a `seldon_caffe.caffe.CaffeNet` layer by layer through `LAYERS`
({type: fn(layer, bottoms, blobs) -> tops}): the BVLC layers fork nets are built from, written
plainly from Caffe 1.0's definitions here, and the forks' own layers from
`caffe_oracle.numpy_ssd` (caffe-ssd) and `caffe_oracle.numpy_forks` (the other forks), each
written from that fork's sources. Arithmetic is float64 where it is free to be, so the oracle's
own rounding stays far below the 1e-4 the engines are held to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from caffe_oracle import numpy_ssd
from seldon_caffe.caffe import CaffeNet
from seldon_caffe.caffe.net import WeightsError

Layer = Callable[..., list[np.ndarray]]


def forward(
    net: CaffeNet, inputs: Mapping[str, np.ndarray], outputs: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """Every blob's final value (or just `outputs`) after running `net` on `inputs`."""
    blobs: dict[str, np.ndarray] = {}
    for layer in net.definition.layer:
        if layer.type == "Input":
            missing = [top for top in layer.top if top not in inputs]
            if missing:
                raise KeyError(
                    f"no value given for input {missing[0]!r}; the net's inputs are {list(net.input_shapes)}"
                )
            blobs.update((top, np.asarray(inputs[top], np.float32)) for top in layer.top)
            continue
        fn = LAYERS.get(layer.type)
        if fn is None:
            raise NotImplementedError(f"layer {layer.name!r}: no numpy reference for type {layer.type!r}")
        tops = fn(layer, [blobs[b] for b in layer.bottom], _weights(net, layer.name))
        blobs.update(zip(layer.top, (np.asarray(t, np.float32) for t in tops), strict=True))
    return blobs if outputs is None else {name: blobs[name] for name in outputs}


def _weights(net: CaffeNet, name: str) -> list[np.ndarray]:
    try:
        return net.get_weights(name)
    except WeightsError:  # a layer that learns nothing
        return []


# -- BVLC layers ------------------------------------------------------------------------


def _conv_pair(p, repeated: str, pair: str | None, default: int) -> tuple[int, int]:
    """A 2-D convolution setting: `pair`_h / `pair`_w when set, else the repeated field
    (none -> default, one value -> both axes, two -> height and width)."""
    if pair and (p.HasField(f"{pair}_h") or p.HasField(f"{pair}_w")):
        return getattr(p, f"{pair}_h"), getattr(p, f"{pair}_w")
    values = list(getattr(p, repeated)) or [default]
    return values[0], values[-1]


def convolution(layer, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """Cross-correlation with pad, stride, dilation and groups; 2-D only (all fork nets need)."""
    p = layer.convolution_param
    kh, kw = _conv_pair(p, "kernel_size", "kernel", 0)
    sh, sw = _conv_pair(p, "stride", "stride", 1)
    ph, pw = _conv_pair(p, "pad", "pad", 0)
    dh, dw = _conv_pair(p, "dilation", None, 1)
    weight = blobs[0].astype(np.float64)
    bias = blobs[1].astype(np.float64) if p.bias_term else np.zeros(p.num_output)
    tops = []
    for x in bottoms:
        n, c, h, w = x.shape
        padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw))
        padded[:, :, ph : ph + h, pw : pw + w] = x
        oh, ow = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1, (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
        out = np.zeros((n, p.num_output, oh, ow))
        cin, cout = c // p.group, p.num_output // p.group
        for g in range(p.group):
            part = padded[:, g * cin : (g + 1) * cin]
            for i in range(kh):
                for j in range(kw):
                    window = part[:, :, i * dh : i * dh + sh * oh : sh, j * dw : j * dw + sw * ow : sw]
                    out[:, g * cout : (g + 1) * cout] += np.einsum(
                        "nchw,oc->nohw", window, weight[g * cout : (g + 1) * cout, :, i, j]
                    )
        tops.append(out + bias[None, :, None, None])
    return tops


def relu(layer, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    x = bottoms[0].astype(np.float64)
    return [np.where(x > 0, x, x * layer.relu_param.negative_slope)]


def pooling(layer, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """MAX (with its argmax mask, h * W + w of the input plane) or AVE over Caffe's windows:
    ceil rounding unless round_mode says FLOOR, a last window starting in the padding dropped,
    AVE dividing by the window clipped to the padded input."""
    p = layer.pooling_param
    x = bottoms[0].astype(np.float64)
    n, c, h, w = x.shape
    if p.global_pooling:
        (kh, kw), (sh, sw), (ph, pw) = (h, w), (1, 1), (0, 0)
    else:
        kh, kw = (p.kernel_h, p.kernel_w) if p.HasField("kernel_h") else (p.kernel_size, p.kernel_size)
        sh, sw = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride, p.stride)
        ph, pw = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad, p.pad)
    rounding = math.floor if p.round_mode == p.FLOOR else math.ceil
    oh, ow = (_pooled(size, k, s, pad, rounding) for size, k, s, pad in ((h, kh, sh, ph), (w, kw, sw, pw)))
    out, mask = np.zeros((n, c, oh, ow)), np.full((n, c, oh, ow), -1.0)
    for i in range(oh):
        for j in range(ow):
            y0, x0 = i * sh - ph, j * sw - pw
            y1, x1 = min(y0 + kh, h + ph), min(x0 + kw, w + pw)
            area = (y1 - y0) * (x1 - x0)
            y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
            window = x[:, :, y0:y1, x0:x1].reshape(n, c, -1)
            if p.pool == p.MAX:
                best = np.argmax(window, axis=2)  # the first of equal maxima, as Caffe's strict >
                out[:, :, i, j] = np.take_along_axis(window, best[..., None], 2)[..., 0]
                mask[:, :, i, j] = (y0 + best // (x1 - x0)) * w + x0 + best % (x1 - x0)
            else:
                out[:, :, i, j] = window.sum(axis=2) / area
    return [out, mask][: len(layer.top)]


def _pooled(size: int, kernel: int, stride: int, pad: int, rounding: Callable[[float], float]) -> int:
    out = int(rounding((size + 2 * pad - kernel) / stride)) + 1
    return out - 1 if pad and (out - 1) * stride >= size + pad else out


def softmax(layer, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    x = bottoms[0].astype(np.float64)
    axis = layer.softmax_param.axis % x.ndim
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return [e / e.sum(axis=axis, keepdims=True)]


def flatten(layer, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    x = bottoms[0]
    start, end = layer.flatten_param.axis % x.ndim, layer.flatten_param.end_axis % x.ndim
    return [x.reshape(*x.shape[:start], -1, *x.shape[end + 1 :])]


def reshape(layer, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """reshape_param.shape over axes [axis, axis + num_axes): 0 copies, one -1 is inferred."""
    p, x = layer.reshape_param, bottoms[0]
    start = p.axis if p.axis >= 0 else x.ndim + p.axis + 1
    end = x.ndim if p.num_axes == -1 else start + p.num_axes
    dims = [x.shape[start + i] if d == 0 else d for i, d in enumerate(p.shape.dim)]
    return [x.reshape(*x.shape[:start], *dims, *x.shape[end:])]


def concat(layer, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    p = layer.concat_param
    axis = p.concat_dim if p.HasField("concat_dim") else p.axis
    return [np.concatenate(bottoms, axis=axis % bottoms[0].ndim)]


def split(layer, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    return [bottoms[0]] * len(layer.top)


def power(layer, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """(shift + scale * x) ^ power."""
    p = layer.power_param
    return [(p.shift + p.scale * bottoms[0].astype(np.float64)) ** p.power]


def dropout(layer, bottoms: list[np.ndarray], blobs: list[np.ndarray]) -> list[np.ndarray]:
    """Test time: the input itself; py-faster-rcnn's scale_train: false scales by 1 - ratio."""
    p = layer.dropout_param
    return [bottoms[0] if p.scale_train else bottoms[0] * np.float32(1.0 - p.dropout_ratio)]


BVLC_LAYERS: dict[str, Layer] = {
    "Power": power,
    "Dropout": dropout,
    "Convolution": convolution,
    "ReLU": relu,
    "Pooling": pooling,
    "Softmax": softmax,
    "Flatten": flatten,
    "Reshape": reshape,
    "Concat": concat,
    "Split": split,
}


def _fork_layers() -> dict[str, Layer]:
    """The other forks' references, when that module exists (it is written alongside this one)."""
    try:
        from caffe_oracle import numpy_forks
    except ImportError:
        return {}
    return dict(numpy_forks.LAYERS)


LAYERS: dict[str, Layer] = {**BVLC_LAYERS, **numpy_ssd.LAYERS, **_fork_layers()}
