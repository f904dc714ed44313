"""Nets and models the format tests build: random weights, the V1 form, comparable descriptors.

Kept out of the test module so that it reads as the checks it makes.
"""

from __future__ import annotations

import numpy as np
from google.protobuf import descriptor_pb2

from seldon_caffe.caffe import PARAMETRISED_LAYERS, V1_LAYER_TYPES, CaffeNet, blob_to_array, caffe_pb2


def randomise(net: CaffeNet, seed: int) -> None:
    """Give every layer with weights random values (BatchNorm: positive variance, factor 1)."""
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        if layer.type in PARAMETRISED_LAYERS:
            arrays = [rng.standard_normal(s).astype(np.float32) * 0.2 for s in net.weight_shapes(layer.name)]
            if layer.type == "BatchNorm":
                arrays[1], arrays[2] = np.abs(arrays[1]) + 0.5, np.ones(1, np.float32)
            net.set_weights(layer.name, arrays)


def to_v1(model: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """The same model in the V1 format with legacy 4-D blob dims (ip2's bias as double_data)."""
    v1_type = {name: key for key, name in V1_LAYER_TYPES.items()}
    v1 = caffe_pb2.NetParameter(name=model.name)
    for layer in model.layer:
        if layer.type == "Input":
            v1.input.extend(layer.top)
            v1.input_dim.extend(layer.input_param.shape[0].dim)
            continue
        old = v1.layers.add(name=layer.name, bottom=layer.bottom, top=layer.top)
        old.type = caffe_pb2.V1LayerParameter.LayerType.Value(v1_type[layer.type])
        old.blobs_lr.extend(spec.lr_mult for spec in layer.param)
        for field, value in layer.ListFields():
            if field.name.endswith("_param") and field.name in old.DESCRIPTOR.fields_by_name:
                getattr(old, field.name).CopyFrom(value)
        for i, blob in enumerate(layer.blobs):
            array = blob_to_array(blob)
            legacy = old.blobs.add()
            legacy.num, legacy.channels, legacy.height, legacy.width = (1,) * (4 - array.ndim) + array.shape
            values = legacy.double_data if (layer.name, i) == ("ip2", 1) else legacy.data
            values.extend(array.ravel().tolist())
    return v1


def comparable(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """Drop what differs between protoc's outputs only: json_name, float default spelling."""
    messages = list(file.message_type)
    for message in messages:
        messages.extend(message.nested_type)
        for item in message.field:
            item.ClearField("json_name")
            if item.type == item.TYPE_FLOAT and item.HasField("default_value"):
                item.default_value = str(np.float32(item.default_value))
    return file
