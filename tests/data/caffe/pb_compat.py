"""Runs under another protobuf runtime (3.20 for the seldon-core 1.17.1 lane) for the tests.

Usage: python pb_compat.py '{"zoo": [prototxt...], "model": lenet caffemodel, "out": dir}'
Formats every zoo net into OUT (checking its own round trip), loads lenet with the given
weights and writes them back as OUT/written.caffemodel, round-trips a blob; prints one JSON line with the
protobuf version. The calling test checks the files with the main protobuf.
"""

import json
import sys
from pathlib import Path

import google.protobuf
import numpy
from google.protobuf.internal import api_implementation

from seldon_caffe.caffe import (
    array_to_blob,
    blob_to_array,
    caffe_pb2,
    format_prototxt,
    load_caffe_net,
    parse_prototxt,
    read_prototxt,
)


def main() -> None:
    request = json.loads(sys.argv[1])
    out = Path(request["out"])
    for path in map(Path, request["zoo"]):
        net = read_prototxt(path)
        assert parse_prototxt(format_prototxt(net)) == net, path
        (out / path.name).write_text(format_prototxt(net))
    lenet = load_caffe_net(next(p for p in request["zoo"] if p.endswith("/lenet.prototxt")), request["model"])
    (out / "written.caffemodel").write_bytes(lenet.caffemodel_bytes())
    small = numpy.arange(24, dtype=numpy.float32).reshape(2, 3, 4)
    assert (blob_to_array(caffe_pb2.BlobProto.FromString(array_to_blob(small).SerializeToString())) == small).all()
    print(json.dumps({"protobuf": google.protobuf.__version__, "implementation": api_implementation.Type()}))


if __name__ == "__main__":
    main()
