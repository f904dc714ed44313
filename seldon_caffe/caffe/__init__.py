"""The Caffe format, ours: caffe.proto, prototxt / caffemodel IO, upgrades, shape inference.

Nothing here needs Caffe itself (or Seldon): it is plain protobuf plus numpy.
"""

from . import caffe_pb2
from .io import (
    CaffeFormatError,
    array_to_blob,
    blob_to_array,
    caffemodel_weights,
    format_prototxt,
    parse_caffemodel,
    parse_prototxt,
    read_caffemodel,
    read_prototxt,
    serialize_caffemodel,
    write_caffemodel,
    write_prototxt,
)
from .net import CaffeNet, LayerInfo, load_caffe_net
from .params import PARAMETRISED_LAYERS, param_shapes
from .shapes import SUPPORTED_LAYERS, Shape, infer_shapes
from .upgrade import V1_LAYER_TYPES, upgrade_net

__all__ = [
    "PARAMETRISED_LAYERS",
    "SUPPORTED_LAYERS",
    "V1_LAYER_TYPES",
    "CaffeFormatError",
    "CaffeNet",
    "LayerInfo",
    "Shape",
    "array_to_blob",
    "blob_to_array",
    "caffe_pb2",
    "caffemodel_weights",
    "format_prototxt",
    "infer_shapes",
    "load_caffe_net",
    "param_shapes",
    "parse_caffemodel",
    "parse_prototxt",
    "read_caffemodel",
    "read_prototxt",
    "serialize_caffemodel",
    "upgrade_net",
    "write_caffemodel",
    "write_prototxt",
]
