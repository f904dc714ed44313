"""The detector, defined once: its torch form (trained) and its Caffe form (served).

A small SSD: five 3x3 conv + ReLU layers with 2x2 max pooling between them (96 -> 48 ->
24 -> 12 -> 6), and SSD heads (a 3x3 conv for box offsets, one for class scores) on conv4
(12x12, step 8) and conv5 (6x6, step 16). The Caffe net is the deploy net caffe-ssd's
scripts write: each head is Permuted to NHWC and Flattened, the heads are Concatenated,
the scores go through Reshape / Softmax / Flatten, each feature map gets a PriorBox, and
DetectionOutput decodes (CENTER_SIZE) and runs per-class NMS.

The torch module produces exactly the deploy net's `mbox_loc` and (before the softmax)
`mbox_conf` layouts: per cell, per prior, 4 offsets / NUM_CLASSES scores. Layer names are
shared, which is how the trained tensors find their Caffe layers.
"""

from __future__ import annotations

import numpy as np
import torch
from multibox import PriorSpec, prior_boxes, prior_variances
from torch import nn

from seldon_caffe.caffe import CaffeNet, caffe_pb2

INPUT = 96  # the net takes 1 x 3 x 96 x 96, BGR scaled to -1..1
NUM_CLASSES = 4  # background + square, circle, triangle
BODY = (
    ("conv1", 16),
    ("conv2", 32),
    ("conv3", 48),
    ("conv4", 64),
    ("conv5", 64),
)  # a 2x2 pool before each but the first
HEADS = {"conv4": PriorSpec(14, 28, step=8), "conv5": PriorSpec(28, 52, step=16)}
DETECTION = {"nms_threshold": 0.45, "top_k": 100, "keep_top_k": 20, "confidence_threshold": 0.01}


def feature_size(layer: str) -> int:
    """The side of a body layer's output: INPUT halved once per pool before it."""
    return INPUT >> [name for name, _ in BODY].index(layer)


def all_priors() -> tuple[np.ndarray, np.ndarray]:
    """(boxes, variances), (P, 4) each, in mbox_priorbox order: conv4's priors, then conv5's."""
    boxes, variances = [], []
    for layer, spec in HEADS.items():
        side = feature_size(layer)
        found = prior_boxes(spec, (side, side), (INPUT, INPUT))
        boxes.append(found)
        variances.append(prior_variances(spec, len(found)))
    return np.concatenate(boxes), np.concatenate(variances)


class TinySSD(nn.Module):
    """The torch form: forward(x) -> (loc (N, P*4), conf logits (N, P*NUM_CLASSES))."""

    def __init__(self) -> None:
        super().__init__()
        widths = dict(BODY)
        inputs = [3] + [width for _, width in BODY[:-1]]
        self.body = nn.ModuleDict(
            {name: nn.Conv2d(c, w, 3, padding=1) for (name, w), c in zip(BODY, inputs, strict=True)}
        )
        self.heads = nn.ModuleDict()
        for layer, spec in HEADS.items():
            per_cell = spec.per_location()
            self.heads[f"{layer}_mbox_loc"] = nn.Conv2d(widths[layer], per_cell * 4, 3, padding=1)
            self.heads[f"{layer}_mbox_conf"] = nn.Conv2d(widths[layer], per_cell * NUM_CLASSES, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = {}
        for index, (name, _) in enumerate(BODY):
            if index:
                x = nn.functional.max_pool2d(x, 2)
            x = features[name] = torch.relu(self.body[name](x))
        outputs = []
        for kind in ("loc", "conf"):
            heads = [self.heads[f"{layer}_mbox_{kind}"](features[layer]) for layer in HEADS]
            outputs.append(torch.cat([head.permute(0, 2, 3, 1).flatten(1) for head in heads], dim=1))
        return outputs[0], outputs[1]

    def caffe_weights(self) -> dict[str, list[np.ndarray]]:
        """Every conv's [weight, bias] by Caffe layer name (the same (out, in, kh, kw) layout)."""
        convs = {**self.body, **self.heads}
        return {
            name: [p.detach().cpu().numpy().astype(np.float32) for p in (c.weight, c.bias)] for name, c in convs.items()
        }

    @classmethod
    def from_caffe(cls, net: CaffeNet) -> TinySSD:
        """The torch form holding a Caffe net's weights (e.g. the committed caffemodel's)."""
        model = cls()
        with torch.no_grad():
            for name, conv in {**model.body, **model.heads}.items():
                weight, bias = net.get_weights(name)
                conv.weight.copy_(torch.from_numpy(weight))
                conv.bias.copy_(torch.from_numpy(bias))
        return model.eval()


# -- the Caffe deploy net ------------------------------------------------------------


def deploy_net(model: TinySSD | None = None) -> CaffeNet:
    """The deploy net as a CaffeNet, with the model's weights when one is given."""
    net = caffe_pb2.NetParameter(name="shapes_ssd")
    _add(net, "data", "Input", [], ["data"]).input_param.shape.add(dim=[1, 3, INPUT, INPUT])
    _body(net)
    for kind in ("loc", "conf"):
        for layer in HEADS:
            _head(net, layer, kind)
    for layer, spec in HEADS.items():
        _prior_box(net, layer, spec)
    _merge(net)
    _detection_output(net)
    caffe = CaffeNet(net, source="examples/detection/ssd_net.py")
    for name, arrays in (model.caffe_weights() if model else {}).items():
        caffe.set_weights(name, arrays)
    return caffe


def _add(
    net: caffe_pb2.NetParameter, name: str, kind: str, bottom: list[str], top: list[str]
) -> caffe_pb2.LayerParameter:
    return net.layer.add(name=name, type=kind, bottom=bottom, top=top)


def _conv(net: caffe_pb2.NetParameter, name: str, bottom: str, outputs: int) -> None:
    conv = _add(net, name, "Convolution", [bottom], [name]).convolution_param
    conv.num_output, conv.pad[:], conv.kernel_size[:], conv.stride[:] = outputs, [1], [3], [1]


def _body(net: caffe_pb2.NetParameter) -> None:
    previous = "data"
    for index, (name, width) in enumerate(BODY, start=1):
        if index > 1:
            pool = _add(net, f"pool{index - 1}", "Pooling", [previous], [f"pool{index - 1}"]).pooling_param
            pool.pool, pool.kernel_size, pool.stride = caffe_pb2.PoolingParameter.MAX, 2, 2
            previous = f"pool{index - 1}"
        _conv(net, name, previous, width)
        _add(net, f"relu{index}", "ReLU", [name], [name])
        previous = name


def _head(net: caffe_pb2.NetParameter, layer: str, kind: str) -> None:
    """conv -> Permute to (N, H, W, C) -> Flatten: per cell, per prior, its values."""
    name = f"{layer}_mbox_{kind}"
    _conv(net, name, layer, HEADS[layer].per_location() * (4 if kind == "loc" else NUM_CLASSES))
    _add(net, f"{name}_perm", "Permute", [name], [f"{name}_perm"]).permute_param.order[:] = [0, 2, 3, 1]
    _add(net, f"{name}_flat", "Flatten", [f"{name}_perm"], [f"{name}_flat"]).flatten_param.axis = 1


def _prior_box(net: caffe_pb2.NetParameter, layer: str, spec: PriorSpec) -> None:
    param = _add(net, f"{layer}_mbox_priorbox", "PriorBox", [layer, "data"], [f"{layer}_mbox_priorbox"]).prior_box_param
    param.min_size[:], param.max_size[:], param.aspect_ratio[:] = [spec.min_size], [spec.max_size], spec.aspect_ratio
    param.flip, param.clip, param.variance[:] = spec.flip, spec.clip, spec.variance
    param.step, param.offset = spec.step, spec.offset


def _merge(net: caffe_pb2.NetParameter) -> None:
    """The heads' Concats, and the class scores' softmax over classes (Reshape / Softmax / Flatten)."""
    for kind, axis in (("loc", 1), ("conf", 1), ("priorbox", 2)):
        if kind == "priorbox":
            bottoms = [f"{layer}_mbox_priorbox" for layer in HEADS]
        else:
            bottoms = [f"{layer}_mbox_{kind}_flat" for layer in HEADS]
        _add(net, f"mbox_{kind}", "Concat", bottoms, [f"mbox_{kind}"]).concat_param.axis = axis
    _add(net, "mbox_conf_reshape", "Reshape", ["mbox_conf"], ["mbox_conf_reshape"]).reshape_param.shape.dim[:] = [
        0,
        -1,
        NUM_CLASSES,
    ]
    _add(net, "mbox_conf_softmax", "Softmax", ["mbox_conf_reshape"], ["mbox_conf_softmax"]).softmax_param.axis = 2
    flat = _add(net, "mbox_conf_flatten", "Flatten", ["mbox_conf_softmax"], ["mbox_conf_flatten"])
    flat.flatten_param.axis = 1


def _detection_output(net: caffe_pb2.NetParameter) -> None:
    bottoms = ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"]
    param = _add(net, "detection_out", "DetectionOutput", bottoms, ["detection_out"]).detection_output_param
    param.num_classes, param.share_location, param.background_label_id = NUM_CLASSES, True, 0
    param.nms_param.nms_threshold, param.nms_param.top_k = DETECTION["nms_threshold"], DETECTION["top_k"]
    param.code_type = caffe_pb2.PriorBoxParameter.CENTER_SIZE
    param.keep_top_k, param.confidence_threshold = DETECTION["keep_top_k"], DETECTION["confidence_threshold"]
