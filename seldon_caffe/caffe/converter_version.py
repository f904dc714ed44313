"""The version of the ONNX that caffe/to_onnx.py writes, in a module of its own: the caches
keyed by it (runtimes/_onnx_source.py, runtimes/auto.py) read it on every start, and a cached
conversion must not cost the import of onnx and the converter (11 MB of every serving
process, measured in the image).

Bump it whenever the ONNX to_onnx writes for the same Caffe files changes.
"""

CONVERTER_VERSION = "4"
