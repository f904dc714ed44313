"""What a payload encoding costs: one 224x224x3 float image through the real service.

Serves a net that does almost nothing (global average pooling), so the time measured is
Seldon's decoding and encoding of the request: JSON ndarray, JSON tensor, binData (.npy)
over REST, and a tensor over gRPC. Prints a Markdown table of medians.

    .venv/bin/python benchmarks/payloads.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import base64
import io
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from seldon_core.proto import prediction_pb2, prediction_pb2_grpc
from seldon_core.utils import array_to_grpc_datadef

from seldon_caffe.caffe import load_caffe_net

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from service import running_service

PROTOTXT = """name: "pool"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 224 dim: 224 } } }
layer { name: "gap" type: "Pooling" bottom: "data" top: "gap" pooling_param { pool: AVE global_pooling: true } }
"""


def make_model(root: Path) -> Path:
    (root / "deploy.prototxt").write_text(PROTOTXT)
    (root / "weights.caffemodel").write_bytes(load_caffe_net(root / "deploy.prototxt").caffemodel_bytes())
    (root / "model.yaml").write_text("files: {prototxt: deploy.prototxt, weights: weights.caffemodel}\n")
    return root


def timed(call, repeats: int) -> float:
    call()  # warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    image = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    npy = io.BytesIO()
    np.save(npy, image)
    bin_payload = {"binData": base64.b64encode(npy.getvalue()).decode()}
    ndarray_payload = {"data": {"ndarray": image.tolist()}}
    tensor_payload = {"data": {"tensor": {"shape": list(image.shape), "values": image.ravel().tolist()}}}
    grpc_message = prediction_pb2.SeldonMessage(data=array_to_grpc_datadef("tensor", image))
    with tempfile.TemporaryDirectory() as tmp, running_service(make_model(Path(tmp))) as service:

        def post(payload):
            response = service.post(payload)
            assert response.status_code == 200, response.text

        with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            stub = prediction_pb2_grpc.ModelStub(channel)
            rows = [
                ("REST, JSON ndarray", timed(lambda: post(ndarray_payload), args.repeats)),
                ("REST, JSON tensor", timed(lambda: post(tensor_payload), args.repeats)),
                ("REST, binData (.npy)", timed(lambda: post(bin_payload), args.repeats)),
                ("gRPC, tensor", timed(lambda: stub.Predict(grpc_message, timeout=60), args.repeats)),
            ]
    fastest = min(ms for _, ms in rows)
    print(f"One 1x3x224x224 float32 image, median of {args.repeats} requests, {platform.processor() or 'cpu'}:\n")
    print("| encoding | ms per request | vs fastest |")
    print("| --- | ---: | ---: |")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {ms / fastest:.1f}x |")


if __name__ == "__main__":
    main()
