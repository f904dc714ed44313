"""Runs inside the real-Caffe root (Python 3.9, BVLC Caffe 1.0): the tests' reference answers.

Usage: python3 caffe_oracle.py JOBS.json  ->  prints one JSON object {job id: result}.

Job kinds (all paths are inside the root):
  shapes   {prototxt, batches}            -> {batch: {blob: shape}} plus "params": {layer: [shapes]}
  save     {prototxt, caffemodel, params} -> writes Caffe's own caffemodel and an .npz of its params
  descriptor {}                           -> Caffe's caffe.proto as describe_proto() sees it
  forward  {prototxt, caffemodel, inputs, outputs} -> loads the files, runs forward on inputs (.npz),
                                             writes outputs and the params Caffe holds to an .npz
A job that raises reports {"error": message}; a Caffe CHECK failure aborts the whole run.
"""

import json
import sys

import numpy as np

caffe = None  # imported in main(): the tests import describe_proto() without Caffe


def blob_shapes(net):
    return {name: list(blob.shape) for name, blob in net.blobs.items()}


def param_shapes(net):
    return {name: [list(b.shape) for b in blobs] for name, blobs in net.params.items()}


def params_npz(net, path):
    arrays = {}
    for name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            arrays[f"{name}/{i}"] = blob.data
    np.savez(path, **arrays)


def shapes(job):
    net = caffe.Net(job["prototxt"], caffe.TEST)
    result = {"declared": blob_shapes(net), "params": param_shapes(net), "inputs": list(net.inputs)}
    for batch in job.get("batches", []):
        for name in net.inputs:
            net.blobs[name].reshape(batch, *net.blobs[name].shape[1:])
        net.reshape()
        result[str(batch)] = blob_shapes(net)
    return result


def save(job):
    net = caffe.Net(job["prototxt"], caffe.TEST)
    net.save(job["caffemodel"])
    params_npz(net, job["params"])
    return {"saved": job["caffemodel"]}


def forward(job):
    net = caffe.Net(job["prototxt"], job["caffemodel"], caffe.TEST)
    feed = dict(np.load(job["inputs"]))
    for name, value in feed.items():
        net.blobs[name].reshape(*value.shape)
    net.reshape()
    for name, value in feed.items():
        net.blobs[name].data[...] = value
    net.forward()
    arrays = {"out/" + name: net.blobs[name].data.copy() for name in job["outputs"]}
    for name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            arrays[f"param/{name}/{i}"] = blob.data
    np.savez(job["result"], **arrays)
    return {"outputs": list(net.outputs)}


def describe_proto(file_descriptor):
    """{message: {"fields": {name: [number, type, label, packed, type name, default]}}, enum: {...}}."""
    out = {}

    def enum(descriptor):
        out[descriptor.full_name] = {"values": {v.name: v.number for v in descriptor.values}}

    def message(descriptor):
        fields = {}
        for f in descriptor.fields:
            type_name = (f.message_type or f.enum_type).full_name if (f.message_type or f.enum_type) else ""
            default = f.default_value if f.has_default_value else None
            fields[f.name] = [f.number, f.type, f.label, f.GetOptions().packed, type_name, default]
        out[descriptor.full_name] = {"fields": fields}
        for nested in descriptor.nested_types:
            message(nested)
        for nested in descriptor.enum_types:
            enum(nested)

    for descriptor in file_descriptor.message_types_by_name.values():
        message(descriptor)
    for descriptor in file_descriptor.enum_types_by_name.values():
        enum(descriptor)
    return out


def descriptor(job):
    from caffe.proto import caffe_pb2

    return describe_proto(caffe_pb2.DESCRIPTOR)


KINDS = {"shapes": shapes, "save": save, "forward": forward, "descriptor": descriptor}


def main():
    global caffe
    import caffe

    with open(sys.argv[1]) as handle:
        jobs = json.load(handle)
    results = {}
    for job_id, job in jobs.items():
        try:
            results[job_id] = KINDS[job["kind"]](job)
        except Exception as exc:  # reported per job, so one bad net does not hide the others
            results[job_id] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
