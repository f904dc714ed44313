"""ONNX converters for Caffe's element-wise layers, Eltwise, Reduction and ArgMax.

Caffe's parametrised maths (Exp, Log, Power) are written the way Caffe computes them, in
the same order of operations, so float32 rounding matches too; the scale-by-1 and add-0
steps Caffe skips are skipped here as well.
"""

from __future__ import annotations

import math

from onnx import helper

from .onnx_graph import LayerView, converts

_FLOAT, _INT64 = 1, 7  # TensorProto element types

_PLAIN = {"Sigmoid": "Sigmoid", "TanH": "Tanh", "AbsVal": "Abs", "BNLL": "Softplus"}


@converts(*_PLAIN)
def plain(v: LayerView) -> None:
    """One-to-one ops."""
    v.emit(_PLAIN[v.param.type], [v.inputs[0]])


@converts("Dropout")
def dropout(v: LayerView) -> None:
    """The identity at test time, as Caffe 1.0 scales while training; py-faster-rcnn's
    `scale_train: false` leaves training unscaled and scales by 1 - ratio at test time."""
    p = v.param.dropout_param
    if p.scale_train:
        v.emit("Identity", [v.inputs[0]])
    else:
        v.emit("Mul", [v.inputs[0], v.g.const(1.0 - p.dropout_ratio, "keep")])


@converts("ReLU")
def relu(v: LayerView) -> None:
    slope = v.param.relu_param.negative_slope
    if slope:
        v.emit("LeakyRelu", [v.inputs[0]], alpha=slope)
    else:
        v.emit("Relu", [v.inputs[0]])


@converts("ELU")
def elu(v: LayerView) -> None:
    v.emit("Elu", [v.inputs[0]], alpha=v.param.elu_param.alpha)


@converts("Clip")
def clip(v: LayerView) -> None:
    p = v.param.clip_param
    v.emit("Clip", [v.inputs[0], v.g.const(p.min, "min"), v.g.const(p.max, "max")])


@converts("Swish")
def swish(v: LayerView) -> None:
    x = v.inputs[0]
    gate = v.tmp("Sigmoid", [v.g.scaled(x, v.param.swish_param.beta, hint=v.name)])
    v.emit("Mul", [x, gate])


@converts("Threshold")
def threshold(v: LayerView) -> None:
    above = v.tmp("Greater", [v.inputs[0], v.g.const(v.param.threshold_param.threshold, "threshold")])
    v.emit("Cast", [above], to=_FLOAT)


@converts("Exp")
def exp(v: LayerView) -> None:
    """base ^ (shift + scale * x), as Caffe computes it: exp(ln(base) * scale * x) * base ^ shift."""
    p = v.param.exp_param
    log_base = 1.0 if p.base == -1 else math.log(p.base)
    outer = math.exp(log_base * p.shift) if p.shift else 1.0
    powered = v.tmp("Exp", [v.g.scaled(v.inputs[0], log_base * p.scale, hint=v.name)])
    if outer == 1.0:
        v.emit("Identity", [powered])
    else:
        v.emit("Mul", [powered, v.g.const(outer, "scale")])


@converts("Log")
def log(v: LayerView) -> None:
    """log_base(shift + scale * x): Caffe's natural log, then a division by ln(base)."""
    p = v.param.log_param
    natural = v.tmp("Log", [v.g.scaled(v.inputs[0], p.scale, p.shift, hint=v.name)])
    if p.base == -1:
        v.emit("Identity", [natural])
    else:
        v.emit("Mul", [natural, v.g.const(1.0 / math.log(p.base), "scale")])


@converts("Power")
def power(v: LayerView) -> None:
    """(shift + scale * x) ^ power; a constant when power or scale is 0, as in Caffe."""
    p = v.param.power_param
    x = v.inputs[0]
    if p.power * p.scale == 0:
        value = 1.0 if p.power == 0 else p.shift**p.power
        v.emit("ConstantOfShape", [v.tmp("Shape", [x])], value=helper.make_tensor("value", _FLOAT, [1], [value]))
        return
    base = v.g.scaled(x, p.scale, p.shift, hint=v.name)
    if p.power == 1:
        v.emit("Identity", [base])
    else:
        v.emit("Pow", [base, v.g.const(p.power, "power")])


@converts("Eltwise")
def eltwise(v: LayerView) -> None:
    p = v.param.eltwise_param
    operands = list(v.inputs)
    if p.operation == p.MAX:
        v.emit("Max", operands)
        return
    if p.operation == p.SUM and p.coeff:
        operands = [
            x if c == 1 else v.tmp("Mul", [x, v.g.const(c, "coeff")]) for x, c in zip(operands, p.coeff, strict=True)
        ]
    op = "Mul" if p.operation == p.PROD else "Add"
    # A chain of binary ops (not Sum/Mul of many): runtimes fuse Conv + Add + Relu on it.
    acc = operands[0]
    for x in operands[1:-1]:
        acc = v.tmp(op, [acc, x])
    v.emit(op, [acc, operands[-1]])


# ASUM is ReduceSum of Abs, not ReduceL1: OpenVINO (2026.4) ignores ReduceL1's axes attribute
# (opsets 13-17) and reduces over every axis.
_REDUCE = {1: "ReduceSum", 2: "ReduceSum", 3: "ReduceSumSquare", 4: "ReduceMean"}
_ASUM = 2


@converts("Reduction")
def reduction(v: LayerView) -> None:
    """SUM / ASUM / SUMSQ / MEAN over every axis from `axis` on, times coeff."""
    p = v.param.reduction_param
    ndim = len(v.bottom_shapes[0])
    axes = list(range(p.axis % ndim, ndim))
    x = v.tmp("Abs", v.inputs) if p.operation == _ASUM else v.inputs[0]
    if p.coeff == 1:
        v.g.reduce(_REDUCE[p.operation], x, axes, v.outputs[0], keepdims=False, hint=v.name)
        return
    reduced = v.g.reduce(_REDUCE[p.operation], x, axes, keepdims=False, hint=v.name)
    v.emit("Mul", [reduced, v.g.const(p.coeff, "coeff")])


@converts("ArgMax")
def argmax(v: LayerView) -> None:
    """Caffe's ArgMax, floats out. With an axis: indices (or values with out_max_val) along it.
    Without: per item over all its values, shaped (N, 1 or 2, top_k, 1...), indices first."""
    p = v.param.argmax_param
    shape, x = v.bottom_shapes[0], v.inputs[0]
    if p.HasField("axis"):
        axis = p.axis % len(shape)
        if p.top_k == 1 and not p.out_max_val:
            # Caffe sorts (value, index) pairs descending: on a tie the larger index wins.
            v.emit("Cast", [v.tmp("ArgMax", [x], axis=axis, keepdims=1, select_last_index=1)], to=_FLOAT)
            return
        values, indices = v.g.node("TopK", [x, v.g.ints([p.top_k], "k")], 2, hint=v.name, axis=axis)
        if p.out_max_val:
            v.emit("Identity", [values])
        else:
            v.emit("Cast", [indices], to=_FLOAT)
        return
    flat = v.tmp("Flatten", [x], axis=1)
    values, indices = v.g.node("TopK", [flat, v.g.ints([p.top_k], "k")], 2, hint=v.name, axis=1)
    parts = [v.tmp("Cast", [indices], to=_FLOAT)]
    if p.out_max_val:
        parts.append(values)
    parts = [v.g.unsqueeze(part, [1], hint=v.name) for part in parts]
    joined = parts[0] if len(parts) == 1 else v.tmp("Concat", parts, axis=1)
    top = v.top_shapes[0]
    v.g.reshape(joined, [0, *top[1:]], v.outputs[0], hint=v.name)
