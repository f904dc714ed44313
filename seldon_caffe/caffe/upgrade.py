"""Bring any Caffe net to the one form the rest of the package reads: `layer` list, Input layer.

Caffe itself upgrades old files on load; we do the same steps so that a model saved years
ago (V1 `layers`, legacy `input`/`input_dim`/`input_shape`) is served like a new one, and
we apply deploy semantics (phase TEST) so that train-only layers never reach a runtime.
"""

from __future__ import annotations

from collections.abc import Iterable

from . import caffe_pb2
from .io import CaffeFormatError

# V1 type enum -> the type string the layer registry uses (Caffe's own mapping).
V1_LAYER_TYPES: dict[str, str] = {
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DATA": "Data",
    "DECONVOLUTION": "Deconvolution",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}

# V1 fields that map one-to-one onto LayerParameter fields of the same name.
_V1_SAME_NAME = ("name", "bottom", "top", "include", "exclude", "blobs", "loss_weight")


def upgrade_net(net: caffe_pb2.NetParameter, source: str = "<net>") -> caffe_pb2.NetParameter:
    """A new NetParameter in today's form, with deploy (phase TEST) semantics; `net` is untouched.

    V1 `layers` become `layer` (type enum -> type string, blobs_lr / weight_decay / shared
    names -> `param`, every *_param and the blobs kept); legacy inputs become one Input layer
    named "input" at the front; layers that phase TEST excludes are dropped.
    """
    if net.layer and net.layers:
        raise CaffeFormatError(f"{source}: the net has both 'layer' and the old 'layers'; use one")
    upgraded = caffe_pb2.NetParameter()
    upgraded.CopyFrom(net)
    if net.layers:
        del upgraded.layers[:]
        for v1 in net.layers:
            upgraded.layer.append(_upgrade_v1_layer(v1, source))
    _upgrade_inputs(upgraded, source)
    state = upgraded.state if upgraded.HasField("state") else caffe_pb2.NetState()
    kept = [layer for layer in upgraded.layer if _included(layer, state.stage, source)]
    del upgraded.layer[:]
    upgraded.layer.extend(kept)
    return upgraded


def _upgrade_v1_layer(v1: caffe_pb2.V1LayerParameter, source: str) -> caffe_pb2.LayerParameter:
    layer = caffe_pb2.LayerParameter()
    type_name = caffe_pb2.V1LayerParameter.LayerType.Name(v1.type)
    if type_name not in V1_LAYER_TYPES:
        raise CaffeFormatError(f"{source}: V1 layer {v1.name!r} has no type")
    layer.type = V1_LAYER_TYPES[type_name]
    for field, value in v1.ListFields():
        if field.name in _V1_SAME_NAME or field.name.endswith("_param"):
            target = getattr(layer, field.name)
            if field.label == field.LABEL_REPEATED:
                target.extend(value)
            elif field.message_type is not None:
                target.CopyFrom(value)
            else:
                setattr(layer, field.name, value)
    # Per-blob training settings lived in four parallel lists; ParamSpec holds them together.
    count = max(len(v1.param), len(v1.blob_share_mode), len(v1.blobs_lr), len(v1.weight_decay))
    for i in range(count):
        spec = layer.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blob_share_mode):
            spec.share_mode = v1.blob_share_mode[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    return layer


def _upgrade_inputs(net: caffe_pb2.NetParameter, source: str) -> None:
    """Turn net-level input declarations into an Input layer placed first.

    Inputs without any shape (old caffemodels repeat `input:` alone) are simply dropped,
    as Caffe does: the prototxt is what declares them.
    """
    names = list(net.input)
    if net.input_shape or net.input_dim:
        if net.input_shape:
            shapes = [list(shape.dim) for shape in net.input_shape]
        else:
            dims = list(net.input_dim)
            if len(dims) != 4 * len(names):
                raise CaffeFormatError(
                    f"{source}: {len(names)} input(s) need {4 * len(names)} input_dim values, found {len(dims)}"
                )
            shapes = [dims[i : i + 4] for i in range(0, len(dims), 4)]
        if len(shapes) != len(names):
            raise CaffeFormatError(f"{source}: {len(names)} input(s) but {len(shapes)} input_shape entries")
        layer = caffe_pb2.LayerParameter(name="input", type="Input", top=names)
        for shape in shapes:
            layer.input_param.shape.add(dim=shape)
        existing = list(net.layer)
        del net.layer[:]
        net.layer.append(layer)
        net.layer.extend(existing)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")


def _included(layer: caffe_pb2.LayerParameter, stages: Iterable[str], source: str) -> bool:
    """Caffe's include/exclude filter for the state (phase TEST, level 0, the net's stages)."""
    if layer.include and layer.exclude:
        raise CaffeFormatError(f"{source}: layer {layer.name!r} has both include and exclude rules; use one")
    state = caffe_pb2.NetState(phase=caffe_pb2.TEST, level=0, stage=list(stages))
    if layer.include:
        return any(_meets(state, rule) for rule in layer.include)
    return not any(_meets(state, rule) for rule in layer.exclude)


def _meets(state: caffe_pb2.NetState, rule: caffe_pb2.NetStateRule) -> bool:
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    have = set(state.stage)
    return all(stage in have for stage in rule.stage) and not any(stage in have for stage in rule.not_stage)
