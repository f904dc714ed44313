"""The serving process (`seldon-caffe serve`, server.py), run for real on free ports.

Lifecycle (SIGTERM/SIGINT drain, every process gone, a dead server takes the service down, a
taken port stops start-up), a slow client, request limits, and the status every kind of bad
request gets over REST and gRPC.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import requests
from helpers import REPO, copy_model
from seldon_core.proto import prediction_pb2, prediction_pb2_grpc
from seldon_core.utils import array_to_grpc_datadef
from service import (
    START_TIMEOUT_S,
    alive,
    free_port,
    process_tree,
    running_service,
    start_service,
    stop,
    strict_json,
    wait_ready,
)

from seldon_caffe.config import load_config
from seldon_caffe.runtimes import resolve_runtime

pytestmark = pytest.mark.e2e  # every test serves a model on real ports, or tries to

HOOKS = (REPO / "tests" / "data" / "serving_hooks.py").read_text()
IMAGE = np.zeros((1, 1, 28, 28), np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, lenet_example):
    return copy_model(lenet_example, tmp_path_factory.mktemp("serving") / "lenet", hooks=HOOKS)


@pytest.fixture(scope="module")
def service(model_dir):
    with running_service(model_dir) as running:
        yield running


def message(array=IMAGE, **tags):
    """A Seldon message (tensor form) as REST JSON and as the gRPC proto."""
    meta = {"tags": tags} if tags else {}
    rest = {"data": {"tensor": {"shape": list(array.shape), "values": array.ravel().tolist()}}, "meta": meta}
    proto = prediction_pb2.SeldonMessage(data=array_to_grpc_datadef("tensor", array))
    for key, value in tags.items():
        proto.meta.tags[key].string_value = str(value)
    return rest, proto


def grpc_predict(service, proto, timeout=60):
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        return prediction_pb2_grpc.ModelStub(channel).Predict(proto, timeout=timeout)


def grpc_error(service, proto) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        grpc_predict(service, proto)
    return caught.value


def post_nan(service, rest):
    """Python's json writes NaN as a bare token, as many clients do; requests refuses to."""
    return service.post(json.dumps(rest), headers={"Content-Type": "application/json"})


def server_pid(service, name: str) -> int:
    found = re.search(rf"the {name} server \(port \d+\): pid (\d+)", service.log())
    assert found, service.log()
    return int(found.group(1))


# -- lifecycle ------------------------------------------------------------------------


def test_the_console_says_what_is_served_when_it_is_ready_and_when_it_stopped(model_dir):
    """Without --verbose: no Flask config dumps, no per-process lines, no TensorFlow notices."""
    service = start_service(model_dir, verbose=False)
    try:
        wait_ready(service, START_TIMEOUT_S)
        deadline = time.monotonic() + 30
        while "ready:" not in service.log() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop(service)
        log = service.log()
        service.log_path.unlink(missing_ok=True)
    # A first start also says, once, what it did that the next start reuses: the ONNX
    # conversion it cached and the engine `runtime: auto` measured as fastest.
    once = ("INFO: cached the ONNX conversion at", "INFO: runtime auto: ")
    lines = [line for line in log.strip().splitlines() if not any(mark in line for mark in once)]
    assert log.count(once[0]) <= 1 and log.count(once[1]) <= 1, log
    assert len(lines) == 3, log
    served = resolve_runtime(load_config(model_dir))
    assert lines[0].startswith(f"serving {model_dir.resolve()} ({served}): REST :{service.http_port} "), log
    assert lines[1].endswith(
        f"seldon_caffe.server INFO: ready: REST :{service.http_port}, gRPC :{service.grpc_port}, "
        f"metrics :{service.metrics_port}"
    ), log
    assert lines[2].endswith("seldon_caffe.server INFO: stopped on SIGTERM"), log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_drains_in_flight_requests_then_every_process_exits(model_dir, signum):
    with running_service(model_dir) as service:
        processes = process_tree(service.process.pid)
        assert len(processes) >= 5, "supervisor, metrics store, REST, gRPC and metrics servers"
        rest, proto = message(sleep=2)
        answers = {}

        def rest_call():
            answers["rest"] = service.post(rest)

        def grpc_call():
            answers["grpc"] = grpc_predict(service, proto)

        calls = [threading.Thread(target=rest_call), threading.Thread(target=grpc_call)]
        for call in calls:
            call.start()
        time.sleep(1.0)  # both are inside their 2 s preprocess now
        os.kill(service.process.pid, signum)
        stopped_at = time.monotonic()
        for call in calls:
            call.join(30)
        assert service.process.wait(timeout=15) == 0, service.log()
        while any(alive(pid) for pid in processes) and time.monotonic() - stopped_at < 10:
            time.sleep(0.1)
        left = [pid for pid in processes if alive(pid)]
        assert not left, f"still running 10 s after {signum.name}: {left}\n{service.log()}"
    assert answers["rest"].status_code == 200, answers["rest"].text
    assert list(answers["grpc"].data.tensor.shape) == [1, 10]


def test_a_stop_signal_during_start_up_is_not_lost(model_dir):
    service = start_service(model_dir)
    try:
        deadline = time.monotonic() + 120
        while "the metrics server (port" not in service.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(service.process.pid, signal.SIGTERM)  # the servers are still importing, loading
        assert service.process.wait(timeout=15) == 0, service.log()
        assert "did not stop within" not in service.log()  # none had to be killed at the deadline
    finally:
        stop(service)
        service.log_path.unlink(missing_ok=True)


def test_a_dying_server_takes_the_whole_service_down_naming_it(model_dir):
    with running_service(model_dir) as service:
        processes = process_tree(service.process.pid)[1:]
        os.kill(server_pid(service, "gRPC"), signal.SIGKILL)
        assert service.process.wait(timeout=15) == 1
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in processes if alive(pid)]
        error = f"seldon-caffe: error: the gRPC server (port {service.grpc_port}) was killed by SIGKILL"
        assert error in service.log()


def test_a_taken_port_stops_start_up_with_one_line_naming_it(model_dir):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [sys.executable, "-m", "seldon_caffe.cli", "serve", str(model_dir), "--http-port", str(port)]
        argv += ["--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == f"seldon-caffe: error: cannot serve REST on port {port}: it is in use", done.stderr


# -- one slow client --------------------------------------------------------------------


def test_a_client_trickling_its_body_does_not_block_the_others(service):
    with socket.create_connection(("127.0.0.1", service.http_port)) as slow:
        head = "POST /api/v1.0/predictions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        slow.sendall(f"{head}Content-Length: 100000\r\n\r\n{{".encode())
        time.sleep(0.5)  # the server has read the headers and waits for the body
        for _ in range(3):
            slow.sendall(b" ")
            # Before gthread, one sync worker thread: these waited for the slow body forever.
            assert requests.get(service.url + "/health/status", timeout=10).status_code == 200
            assert requests.post(service.url + "/api/v1.0/predictions", json=message()[0], timeout=10).ok


# -- limits -----------------------------------------------------------------------------


def test_requests_over_the_size_limit_get_413_and_resource_exhausted(model_dir):
    with running_service(model_dir, "--max-request-mb", "1") as service:
        big = np.random.default_rng(0).random((200, 1, 28, 28), dtype=np.float32)  # 3 MB JSON, 1.3 MB gRPC
        rest, proto = message(big)
        response = service.post(rest)
        assert response.status_code == 413, response.text[:500]
        assert "Request Entity Too Large" in strict_json(response.text)["status"]["info"]
        assert grpc_error(service, proto).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert service.post(message()[0]).status_code == 200


def test_grpc_takes_messages_past_its_own_4_mb_default(service):
    batch = np.random.default_rng(0).random((1400, 1, 28, 28), dtype=np.float32)  # 8.8 MB as doubles
    reply = grpc_predict(service, message(batch)[1])
    assert list(reply.data.tensor.shape) == [1400, 10]


# -- status codes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, status, code",
    [
        ("BadRequest", 400, grpc.StatusCode.INVALID_ARGUMENT),
        ("ModelUnavailable", 503, grpc.StatusCode.UNAVAILABLE),
        ("DeadlineExceeded", 504, grpc.StatusCode.DEADLINE_EXCEEDED),
        ("RuntimeError", 500, grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_has_its_status_and_grpc_code_with_the_same_message(service, kind, status, code):
    rest, proto = message(**{"raise": kind})
    response = service.post(rest)
    assert response.status_code == status, response.text[:500]
    info = strict_json(response.text)["status"]["info"]
    assert "asked" in info
    error = grpc_error(service, proto)
    assert (error.code(), error.details()) == (code, info)


def test_a_500_logs_its_traceback(service):
    service.post(message(**{"raise": "RuntimeError"})[0])
    log = service.log()
    assert "Traceback (most recent call last)" in log
    assert 'raise RuntimeError("asked to fail")' in log


def test_an_empty_grpc_message_is_invalid_argument_with_a_message(service):
    error = grpc_error(service, prediction_pb2.SeldonMessage())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details(), "an empty message needs a message saying what was expected"


@pytest.mark.parametrize(
    "method, path, body, headers, status",
    [
        ("POST", "/api/v1.0/predictions", "x", {"Content-Type": "text/plain"}, 415),
        ("POST", "/api/v1.0/predictions", '{"data": {"ndarray": ' + "[" * 100000, {}, 400),
        ("POST", "/api/v1.0/predictions", '{"data": {"tftensor": {"dtype": "DT_NOPE"}}}', {}, 400),
        ("GET", "/no/such/path", None, {}, 404),
        ("GET", "/api/v1.0/predictions", None, {}, 405),
        ("PUT", "/api/v1.0/predictions", "{}", {}, 405),
    ],
    ids=["not-json", "nested-too-deep", "bad-tftensor", "unknown-path", "get-predictions", "put-predictions"],
)
def test_client_mistakes_over_rest_are_4xx_with_a_json_message(service, method, path, body, headers, status):
    headers = {"Content-Type": "application/json", **headers} if body is not None else headers
    response = requests.request(method, service.url + path, data=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text[:500]
    assert strict_json(response.text)["status"]["info"]
    assert service.post(message()[0]).status_code == 200


def test_nan_in_is_400_naming_the_input(service):
    nan = IMAGE.copy()
    nan[0, 0, 3, 3] = np.nan
    rest, proto = message(nan)
    response = post_nan(service, rest)
    assert response.status_code == 400, response.text[:500]
    assert "'data'" in strict_json(response.text)["status"]["info"]
    assert grpc_error(service, proto).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_non_finite_answer_is_refused_not_sent_as_invalid_json(tmp_path, lenet_example):
    yaml = (lenet_example / "model.yaml").read_text().replace("options:", "options:\n  allow_non_finite: true")
    model_dir = copy_model(lenet_example, tmp_path / "nan", hooks=HOOKS, yaml=yaml)
    nan = np.full((1, 1, 28, 28), np.nan, np.float32)
    with running_service(model_dir) as service:
        rest, proto = message(nan)
        response = post_nan(service, rest)
        assert response.status_code == 500, response.text[:500]
        assert "NaN or Inf" in strict_json(response.text)["status"]["info"]
        assert grpc_error(service, proto).code() == grpc.StatusCode.INTERNAL


# -- metrics ----------------------------------------------------------------------------


def test_stage_timings_are_in_seconds(service):
    def preprocess_seconds() -> tuple[float, float]:
        text = requests.get(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10).text
        values = {}
        for suffix in ("sum", "count"):
            found = re.findall(rf"^seldon_caffe_preprocess_seconds_{suffix}{{[^}}]*}} (\S+)$", text, re.M)
            values[suffix] = sum(float(v) for v in found)
        return values["sum"], values["count"]

    before_sum, before_count = preprocess_seconds()
    for _ in range(3):
        assert service.post(message(sleep=0.2)[0]).status_code == 200
    after_sum, after_count = preprocess_seconds()
    assert after_count - before_count == 3
    assert 0.6 <= after_sum - before_sum < 3.0  # seconds; in milliseconds this would be ~600
