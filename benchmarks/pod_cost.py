"""What a pod costs: image sizes, start-to-ready time and memory, per protocol, in podman.

    .venv/bin/python benchmarks/pod_cost.py BUILDER [GPU_BUILDER]      # as root; ~4 min

`make image-test` runs it after the container tests. examples/vision and GoogLeNet (the zoo
prototxt with `seldon-caffe weights`, on `auto`) are built into model images from BUILDER as
`s2i build` builds them; each runs once per protocol: seconds from `podman run` to ready,
memory idle and after N requests (vision: 1,000 PNGs; GoogLeNet: 100 tensors). Memory is the
sum of the PSS of the container's processes (shared pages split among them: what the pod
holds) and the cgroup's working set (usage less inactive page cache; on cgroup v1 a page is
charged to the cgroup that first read it, so image files read before are missing from it).
The result replaces the `pod-cost` section of docs/deploy.md.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from _report import cpu_model, load_sentence, write_section  # noqa: E402
from containers import build_model_image, image_size_mb, measure_pod, podman  # noqa: E402

MARKERS = ("<!-- pod-cost:start -->", "<!-- pod-cost:end -->")
ZOO = REPO.parent / "shared" / "caffe-zoo"
PNG = (REPO / "examples" / "vision" / "sample.png").read_bytes()
GOALS = "goals: vision <= 300 MB over Seldon v1, <= 200 MB over V2, ready <= 2 s; GoogLeNet <= weights + 300 MB"


def vision_sender(protocol: str) -> Any:
    encoded = base64.b64encode(PNG).decode()
    if protocol == "seldon":
        body: dict[str, Any] = {"binData": encoded}
        path = "/api/v1.0/predictions"
    else:
        image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [encoded]}
        body = {"inputs": [{**image, "parameters": {"content_type": "base64"}}]}
        path = "/v2/models/vision/infer"
    return _sender(path, body)


def tensor_sender(protocol: str, name: str, x: np.ndarray) -> Any:
    if protocol == "seldon":
        return _sender("/api/v1.0/predictions", {"data": {"ndarray": x.tolist()}})
    tensor = {"name": "data", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return _sender(f"/v2/models/{name}/infer", {"inputs": [tensor]})


def _sender(path: str, body: dict[str, Any]) -> Any:
    session = requests.Session()

    def send(container: Any) -> None:
        response = session.post(container.url + path, json=body, timeout=60)
        response.raise_for_status()

    return send


def googlenet_dir(root: Path) -> Path:
    model_dir = root / "googlenet"
    model_dir.mkdir()
    shutil.copy(ZOO / "bvlc_googlenet.prototxt", model_dir / "deploy.prototxt")
    command = [sys.executable, "-m", "seldon_caffe.cli", "weights", str(model_dir / "deploy.prototxt")]
    subprocess.run([*command, "-o", str(model_dir / "weights.caffemodel")], check=True, capture_output=True)
    model = "name: googlenet\nformat: caffe\nfiles: {prototxt: deploy.prototxt, weights: weights.caffemodel}\n"
    (model_dir / "model.yaml").write_text(model + "runtime: auto\n")
    return model_dir


def rows_for(label: str, image: str, senders: dict[str, Any], requests_n: int) -> list[str]:
    rows = []
    for protocol, send in senders.items():
        figure = measure_pod(image, protocol, send, requests_n)
        name = "Seldon v1" if protocol == "seldon" else "V2 (MLServer)"
        rows.append(
            f"| {label} | {name} | {figure['processes']} | {figure['ready_s']:.1f} | "
            f"{figure['idle']['pss']:.0f} / {figure['idle']['working_set']:.0f} | "
            f"{figure['after']['pss']:.0f} / {figure['after']['working_set']:.0f} | {requests_n} "
            f"({figure['errors']} errors) |"
        )
    return rows


def main(argv: list[str]) -> int:
    builder = argv[0]
    gpu_builder = argv[1] if len(argv) > 1 else None
    began = time.time()
    suffix = uuid.uuid4().hex[:8]
    images = {"vision": f"localhost/pod-cost-vision:{suffix}", "googlenet": f"localhost/pod-cost-googlenet:{suffix}"}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        vision = shutil.copytree(REPO / "examples" / "vision", root / "vision", ignore=shutil.ignore_patterns(".cache"))
        googlenet = googlenet_dir(root)
        weights_mb = (googlenet / "weights.caffemodel").stat().st_size / 2**20
        try:
            for name, model_dir in (("vision", vision), ("googlenet", googlenet)):
                built = build_model_image(Path(model_dir), builder, images[name])
                if built.returncode != 0:
                    raise SystemExit(f"building {name} failed:\n{built.stdout[-3000:]}{built.stderr[-3000:]}")
            x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
            rows = rows_for("vision", images["vision"], {p: vision_sender(p) for p in ("seldon", "v2")}, 1000)
            senders = {p: tensor_sender(p, "googlenet", x) for p in ("seldon", "v2")}
            rows += rows_for(f"GoogLeNet ({weights_mb:.0f} MB of weights)", images["googlenet"], senders, 100)
            sizes = {name: image_size_mb(image) for name, image in images.items()}
        finally:
            for image in images.values():
                podman("rmi", "-f", image, check=False)
    sizes["builder"] = image_size_mb(builder)
    if gpu_builder:
        sizes["GPU builder"] = image_size_mb(gpu_builder)
    lines = [
        f"Measured by `benchmarks/pod_cost.py` (`make image-test`) on {cpu_model()}, podman with runc; "
        f"{time.strftime('%Y-%m-%d', time.localtime(began))}. {GOALS}.",
        "",
        "| model | protocol | processes | ready (s) | memory idle, MB (PSS / working set) "
        "| after the requests | requests |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Image sizes (uncompressed, as `podman images` counts): "
        + ", ".join(f"{name} {size:.0f} MB" for name, size in sizes.items())
        + ".",
        "",
        load_sentence(),
    ]
    write_section("\n".join(lines), REPO / "docs" / "deploy.md", MARKERS)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
