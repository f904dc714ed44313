"""The Caffe format, ours: caffe.proto, prototxt / caffemodel IO, upgrades, shape inference.

Nothing here needs Caffe itself (or Seldon): it is plain protobuf plus numpy.
"""
