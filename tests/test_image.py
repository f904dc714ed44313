"""The images, built and run for real (`make image-test`, part of `make test`).

The builders come from `make image` / `make image-gpu` (SELDON_CAFFE_TEST_BUILDER and
SELDON_CAFFE_TEST_GPU_BUILDER name them); the model images are built here from them as
`s2i build` builds them (scripts/image/build.sh model). Every container runs with podman on
free host ports and is stopped and removed after.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import yaml
from containers import (
    REPO,
    Container,
    build_model_image,
    measure_pod,
    podman,
    podman_env,
    running_container,
    start_container,
    stop_container,
    unavailable_reason,
)
from google.protobuf import json_format
from helpers import EXAMPLES, copy_model
from seldon_core.proto import prediction_pb2, prediction_pb2_grpc
from service import free_port, running_service, wait_ready

from seldon_caffe import cli

pytestmark = [pytest.mark.image, pytest.mark.e2e]

BUILDER = os.environ.get("SELDON_CAFFE_TEST_BUILDER")
GPU_BUILDER = os.environ.get("SELDON_CAFFE_TEST_GPU_BUILDER")
PNG = (EXAMPLES / "vision" / "sample.png").read_bytes()
# A hook that sleeps when asked (tag/parameter `sleep`): a request kept in flight on purpose.
SLEEPING_HOOK = """

_original_postprocess = postprocess


def postprocess(outputs, ctx):
    if ctx.tags.get("sleep"):
        import time

        time.sleep(float(ctx.tags["sleep"]))
    return _original_postprocess(outputs, ctx)
"""


@pytest.fixture(scope="module")
def builder() -> str:
    reason = unavailable_reason(BUILDER)
    if reason:
        pytest.skip(reason)
    assert BUILDER is not None
    return BUILDER


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/vision with a hook that can hold a request in flight (SLEEPING_HOOK)."""
    model_dir = copy_model(EXAMPLES / "vision", tmp_path_factory.mktemp("vision") / "vision")
    shutil.rmtree(model_dir / ".cache", ignore_errors=True)
    (model_dir / "hooks.py").write_text((model_dir / "hooks.py").read_text() + SLEEPING_HOOK)
    # s2i puts a source's .s2i/environment into the image's environment: run reads this one
    (model_dir / ".s2i").mkdir()
    (model_dir / ".s2i" / "environment").write_text("# the model's own\nGUNICORN_THREADS=3\n")
    return model_dir


@pytest.fixture(scope="module")
def vision_image(builder: str, vision_dir: Path) -> Iterator[str]:
    image = f"localhost/seldon-caffe-test-vision:{uuid.uuid4().hex[:8]}"
    built = build_model_image(vision_dir, builder, image)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    yield image
    podman("rmi", "-f", image, check=False)


# -- what a client sends, per protocol and transport ----------------------------------------


def v1_rest(container: Any, sleep: float = 0) -> Any:
    body: dict[str, Any] = {"binData": base64.b64encode(PNG).decode()}
    if sleep:
        body["meta"] = {"tags": {"sleep": sleep}}
    response = requests.post(f"{container.url}/api/v1.0/predictions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["jsonData"]


def v1_grpc(container: Any) -> Any:
    with grpc.insecure_channel(f"127.0.0.1:{container.grpc_port}") as channel:
        reply = prediction_pb2_grpc.ModelStub(channel).Predict(prediction_pb2.SeldonMessage(binData=PNG), timeout=60)
    return json_format.MessageToDict(reply)["jsonData"]


def v2_rest(container: Any, sleep: float = 0) -> Any:
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(PNG).decode()]}
    image["parameters"] = {"content_type": "base64"}
    body: dict[str, Any] = {"inputs": [image], "parameters": {"sleep": sleep} if sleep else {}}
    response = requests.post(f"{container.url}/v2/models/vision/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return {o["name"]: o["data"] for o in response.json()["outputs"]}


def v2_grpc(container: Any) -> Any:
    from mlserver.grpc import dataplane_pb2 as pb
    from mlserver.grpc import dataplane_pb2_grpc

    request = pb.ModelInferRequest(model_name="vision")
    request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(PNG)
    with grpc.insecure_channel(f"127.0.0.1:{container.grpc_port}") as channel:
        reply = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    return {o.name: _contents(o) for o in reply.outputs}


def _contents(output: Any) -> list[Any]:
    contents = json_format.MessageToDict(output.contents)
    values = next(iter(contents.values()), [])
    return [base64.b64decode(v).decode() if output.datatype == "BYTES" else v for v in values]


CLIENTS = {"seldon": (v1_rest, v1_grpc), "v2": (v2_rest, v2_grpc)}


def assert_same_answers(got: Any, want: Any) -> None:
    """Labels and order equal, numbers within 1e-4: the image may run another engine than the
    venv (auto picks among what each has installed)."""
    flat_got, flat_want = _flatten(got), _flatten(want)
    assert [type(v) for v in flat_got] == [type(v) for v in flat_want], (got, want)
    numbers = [(g, w) for g, w in zip(flat_got, flat_want, strict=True) if isinstance(g, float)]
    assert [g for g in flat_got if not isinstance(g, float)] == [w for w in flat_want if not isinstance(w, float)]
    if numbers:
        np.testing.assert_allclose(*zip(*numbers, strict=True), rtol=0, atol=1e-4)


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except ValueError:
            return [value]
        return _flatten(decoded) if not isinstance(decoded, str) else [decoded]
    if isinstance(value, dict):
        return [item for key in sorted(value) for item in [key, *_flatten(value[key])]]
    if isinstance(value, list):
        return [item for element in value for item in _flatten(element)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else [value]


# -- the builders ------------------------------------------------------------------------------


def test_the_builder_carries_no_engine_it_does_not_serve(builder: str) -> None:
    """The default extras: OpenCV and ONNX Runtime; no TensorFlow (seldon-core would import
    it into every process), no torch, no OpenVINO."""
    probe = "import importlib.util as u; print([m for m in ('tensorflow', 'torch', 'openvino') if u.find_spec(m)])"
    done = podman("run", "--rm", "--entrypoint", "python", builder, "-c", probe)
    assert done.stdout.strip() == "[]"


def test_the_gpu_builder_brings_cuda_torch_and_onnxruntime_gpu() -> None:
    reason = unavailable_reason(GPU_BUILDER)
    if reason:
        pytest.skip(reason)
    assert GPU_BUILDER is not None
    probe = (
        "import torch, onnxruntime; "
        "print(torch.version.cuda is not None, 'CUDAExecutionProvider' in onnxruntime.get_available_providers())"
    )
    done = podman("run", "--rm", "--entrypoint", "python", GPU_BUILDER, "-c", probe, timeout=300)
    assert done.stdout.split() == ["True", "True"], done.stdout + done.stderr


# -- the model image, as a pod runs it ---------------------------------------------------------


@pytest.mark.parametrize("protocol", ["seldon", "v2"])
def test_the_image_answers_as_the_venv_service_does(vision_image: str, vision_dir: Path, protocol: str) -> None:
    rest, grpc_call = CLIENTS[protocol]
    args = ("--protocol", "v2") if protocol == "v2" else ()
    with running_service(vision_dir, *args, verbose=False) as venv:
        want = rest(venv), grpc_call(venv)
    with running_container(vision_image, protocol) as container:
        got = rest(container), grpc_call(container)
        pid1 = container.exec("cat", "/proc/1/cmdline").stdout.replace("\0", " ")
        log = container.log()
    assert_same_answers(got[0], want[0])
    assert_same_answers(got[1], want[1])
    assert "-m seldon_caffe.server" in pid1  # s2i/bin/entrypoint: the supervisor is PID 1
    if protocol == "seldon":
        assert "(1 x 3 threads)" in log, log  # the model's .s2i/environment


@pytest.mark.parametrize("protocol", ["seldon", "v2"])
def test_the_image_runs_as_openshift_runs_it(vision_image: str, protocol: str) -> None:
    """An arbitrary UID in group 0, a read-only root filesystem (a tmpfs on /tmp), no
    capabilities, no privilege escalation."""
    restricted = ["--user", "123456:0", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "all"]
    restricted += ["--security-opt", "no-new-privileges"]
    rest, grpc_call = CLIENTS[protocol]
    with running_container(vision_image, protocol, run_args=restricted) as container:
        assert rest(container) and grpc_call(container)
        assert container.exec("id", "-u").stdout.strip() == "123456"
        log = container.log()
    assert "Traceback" not in log, log


@pytest.mark.parametrize("protocol", ["seldon", "v2"])
def test_podman_stop_drains_and_exits_0_within_10_s(vision_image: str, protocol: str) -> None:
    rest, _ = CLIENTS[protocol]
    container = start_container(vision_image, protocol)
    answers: list[Any] = []
    try:
        wait_ready(container, 180)
        in_flight = threading.Thread(target=lambda: answers.append(rest(container, sleep=2)))
        in_flight.start()
        time.sleep(0.5)  # the request is in the hook's sleep
        began = time.monotonic()
        code = stop_container(container)
        took = time.monotonic() - began
        in_flight.join(30)
    finally:
        if container.process.poll() is None:
            stop_container(container)
        log = container.log()
        container.log_path.unlink(missing_ok=True)
    assert answers, f"the request in flight was lost:\n{log}"
    assert code == 0, log
    assert took < 10, f"podman stop took {took:.1f} s"


def _k8s_container(vision_dir: Path, target: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """The serving container `seldon-caffe k8s --target TARGET` writes for this image."""
    assert cli.main(["k8s", str(vision_dir), "--image", "vision:1", "--target", target]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    containers = [c for d in documents for c in _find_containers(d)]
    assert len(containers) == 1, containers
    return containers[0]


def _find_containers(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        found = [c for c in node.get("containers", []) if isinstance(c, dict) and "image" in c]
        return found + [c for value in node.values() for c in _find_containers(value)]
    if isinstance(node, list):
        return [c for value in node for c in _find_containers(value)]
    return []


@pytest.mark.parametrize("target", ["seldon-v1", "kserve"])
def test_the_probes_the_manifests_write_answer_once_the_model_is_loaded(
    vision_image: str, vision_dir: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The container's spec from `seldon-caffe k8s`: its command and env run in the image, and
    its readiness/liveness probes answer 200 once the model answers, never before. (Seldon Core
    v2 runs models in its own server pods: no container of ours to probe.)"""
    spec = _k8s_container(vision_dir, target, capsys)
    probes = {kind: spec[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    env = {item["name"]: str(item["value"]) for item in spec.get("env", []) if "value" in item}
    env = {key: value.replace("{{.Name}}", "vision") for key, value in env.items()}
    run_args = ["--entrypoint", spec["command"][0]] if spec.get("command") else []
    protocol = "v2" if target == "kserve" else "seldon"
    container = start_container(vision_image, protocol, env=env, run_args=run_args, command=spec.get("command", [])[1:])
    seen_ready_before_answering = False
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            statuses = {kind: _get(container, probe["path"]) for kind, probe in probes.items()}
            if statuses["readinessProbe"] == 200:
                break
            assert container.process.poll() is None, container.log()
            time.sleep(0.1)
        else:
            raise AssertionError(f"readiness never 200:\n{container.log()}")
        try:
            CLIENTS[protocol][0](container)
        except (AssertionError, requests.RequestException):
            seen_ready_before_answering = True
        assert _get(container, probes["livenessProbe"]["path"]) == 200
    finally:
        stop_container(container)
        log = container.log()
        container.log_path.unlink(missing_ok=True)
    assert not seen_ready_before_answering, log


def _get(container: Container, path: str) -> int:
    try:
        return requests.get(container.url + path, timeout=2).status_code
    except requests.RequestException:
        return 0


def test_a_model_needing_an_engine_the_image_lacks_fails_the_build_naming_the_extras(
    builder: str, vision_dir: Path, tmp_path: Path
) -> None:
    model_dir = copy_model(vision_dir, tmp_path / "vision-openvino")
    config = yaml.safe_load((model_dir / "model.yaml").read_text())
    (model_dir / "model.yaml").write_text(yaml.safe_dump({**config, "runtime": "openvino"}))
    image = f"localhost/seldon-caffe-test-openvino:{uuid.uuid4().hex[:8]}"
    built = build_model_image(model_dir, builder, image)
    podman("rmi", "-f", image, check=False)
    assert built.returncode != 0
    output = built.stdout + built.stderr
    lines = [line for line in output.splitlines() if "EXTRAS=" in line and "openvino" in line]
    assert lines, output[-3000:]
    assert "--build-arg EXTRAS=onnx,openvino" in lines[0], lines


# The goals of a pod's memory (PSS of all its processes, MB) for this example, per protocol.
MEMORY_GOALS_MB = {"seldon": 300, "v2": 200}


def test_the_pod_cost_figures_are_measured(vision_image: str) -> None:
    """What docs/deploy.md records (benchmarks/pod_cost.py), measured on this image: both
    protocols answer 1,000 requests without an error, and Seldon's stays within its goal."""
    figures = {protocol: measure_pod(vision_image, protocol, CLIENTS[protocol][0]) for protocol in CLIENTS}
    for figure in figures.values():
        assert figure["errors"] == 0, figure
        assert 0 < figure["idle"]["pss"] and 0 < figure["after"]["pss"], figure
    assert figures["seldon"]["after"]["pss"] <= MEMORY_GOALS_MB["seldon"], figures["seldon"]


WALKTHROUGH = re.compile(r"<!-- walkthrough:start -->\s*```sh\n(.*?)```", re.DOTALL)


def test_the_deploy_walkthrough_runs(builder: str, tmp_path: Path) -> None:
    """docs/deploy.md's walk-through, command by command as a user types it, from the
    repository's root; its host port moved to a free one, its image names made unique."""
    text = (REPO / "docs" / "deploy.md").read_text()
    match = WALKTHROUGH.search(text)
    assert match, "docs/deploy.md has no walk-through block"
    port, suffix = str(free_port()), uuid.uuid4().hex[:8]
    script = match.group(1).replace("9000:9000", f"{port}:9000").replace("localhost:9000", f"localhost:{port}")
    script = script.replace("my-vision", f"my-vision-{suffix}")
    env = {**podman_env(), "BUILDER": builder}
    try:
        done = subprocess.run(
            ["bash", "-euxo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
        )
    finally:
        podman("rm", "-f", f"my-vision-{suffix}", check=False)
        podman("rmi", "-f", f"localhost/my-vision-{suffix}:1", check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert '"jsonData"' in done.stdout, done.stdout[-3000:]
