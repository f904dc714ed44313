"""`make demo`: serve an example model directory and answer a sample request with it.

Starts `seldon-caffe serve` on free ports, sends the example's sample (an image as binData
over REST, then the same over gRPC with SeldonClient), prints both answers and stops.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

from google.protobuf.json_format import MessageToDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from service import running_service


def main(model_dir: Path) -> int:
    sample = next(model_dir.glob("sample.*"))
    print(f"serving {model_dir} ... (seldon-caffe serve)")
    with running_service(model_dir) as service:
        print(f"REST on {service.url}, gRPC on 127.0.0.1:{service.grpc_port}")
        payload = {"binData": base64.b64encode(sample.read_bytes()).decode()}
        print(
            f"$ curl -s -X POST {service.url}/api/v1.0/predictions -H 'Content-Type: application/json' "
            f'-d \'{{"binData": "<base64 of {sample.name}>"}}\''
        )
        response = service.post(payload)
        print(json.dumps(response.json(), indent=2))
        grpc = service.client("grpc").microservice(method="predict", bin_data=sample.read_bytes())
        answer = MessageToDict(grpc.response.jsonData) if grpc.success else grpc.msg
        print("gRPC (SeldonClient):", json.dumps(answer))
        return 0 if response.status_code == 200 and grpc.success else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/vision")))
