"""`seldon-caffe bench` against the real service: a model directory it serves itself, and a
running service; the Seldon and V2 protocols, errors counted by status, open loop, CSV and plot, Ctrl-C.
Speed is not asserted here (benchmarks/bench_vs_wrk.py checks bench against wrk)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import copy_model
from service import running_service

from seldon_caffe.bench.report import CSV_COLUMNS

SHORT = ["--duration", "1.5", "--warmup", "0.5"]


@pytest.fixture(scope="module")
def plain_lenet(tmp_path_factory: pytest.TempPathFactory, lenet_example: Path) -> Path:
    model_dir = copy_model(lenet_example, tmp_path_factory.mktemp("bench") / "lenet")
    (model_dir / "hooks.py").unlink()  # arrays in, arrays out
    return model_dir


def request_file(path: Path, shape: tuple[int, ...], protocol: str = "seldon-rest") -> Path:
    """A Seldon message, or for a V2 protocol an inference request, of zeros for lenet's input."""
    if protocol.startswith("v2-"):
        tensor = {"name": "data", "datatype": "FP32", "shape": list(shape), "data": [0.0] * int(np.prod(shape))}
        path.write_text(json.dumps({"inputs": [tensor]}))
    else:
        path.write_text(json.dumps({"data": {"ndarray": np.zeros(shape).tolist()}}))
    return path


def bench(*args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "seldon_caffe.cli", "bench", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def rows(stdout: str) -> list[list[str]]:
    """The table's rows, split into columns (the header and the title line dropped)."""
    lines = stdout.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("load "))
    return [line.split() for line in lines[start + 1 :]]


def service_processes(model_dir: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    served = ("seldon_caffe.cli serve", "seldon_caffe.server")  # not bench's own process
    return [line for line in ps.splitlines() if any(s in line for s in served) and str(model_dir) in line]


@pytest.mark.e2e
@pytest.mark.parametrize("protocol", ["seldon-rest", "seldon-grpc", "v2-rest", "v2-grpc"])
def test_bench_serves_a_model_directory_and_reports_each_level(protocol, plain_lenet, tmp_path):
    if protocol.startswith("v2-"):
        pytest.importorskip("mlserver", reason="the V2 protocols need the mlserver extra")
    request = request_file(tmp_path / "request.json", (1, 1, 28, 28), protocol)
    done = bench(plain_lenet, "--request", request, "--protocol", protocol, "--concurrency", "1,3", *SHORT,
                 "--csv", tmp_path / "out.csv", "--plot", tmp_path / "out.png")  # fmt: skip
    assert done.returncode == 0, done.stderr
    over = f"over {protocol} (model lenet)" if protocol.startswith("v2-") else f"over {protocol}"
    assert f"{over}, request request.json" in done.stdout
    table = rows(done.stdout)
    assert [row[0] for row in table] == ["c=1", "c=3"]
    for row in table:
        assert float(row[1]) > 0 and row[7] == "0", done.stdout  # req/s, errors
        assert "(no metrics)" not in " ".join(row), "stage timings come from the service's metrics"
    with open(tmp_path / "out.csv") as handle:
        written = list(csv.reader(handle))
    assert written[0] == CSV_COLUMNS and [r[0] for r in written[1:]] == ["1", "3"]
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert service_processes(plain_lenet) == [], "the service bench started is stopped"


@pytest.mark.e2e
def test_bench_a_running_service_counts_errors_by_status(plain_lenet, tmp_path):
    wrong = request_file(tmp_path / "wrong.json", (1, 3, 28, 28))  # the model takes 1 channel
    with running_service(plain_lenet) as service:
        metrics = f"http://127.0.0.1:{service.metrics_port}/metrics"
        done = bench(f"http://127.0.0.1:{service.http_port}", "--request", wrong, "--concurrency", "2", *SHORT,
                     "--metrics", metrics)  # fmt: skip
        assert done.returncode == 0, done.stderr
        (row,) = rows(done.stdout)
        assert row[0] == "c=2" and float(row[1]) == 0.0 and row[7].endswith("x400"), done.stdout
        grpc = bench(f"127.0.0.1:{service.grpc_port}", "--request", wrong, "--protocol", "seldon-grpc",
                     "--concurrency", "1", *SHORT)  # fmt: skip
        (row,) = rows(grpc.stdout)
        assert row[7].endswith("x400") and "(no metrics)" in grpc.stdout, grpc.stdout  # INVALID_ARGUMENT


@pytest.mark.e2e
def test_bench_a_running_v2_service_finds_the_model_and_counts_errors_by_status(plain_lenet, tmp_path):
    """A file goes as the model's first input (base64 over REST, raw bytes over gRPC); a
    wrong tensor is a 400 over both transports; a model the server lacks is one line."""
    pytest.importorskip("mlserver", reason="the V2 protocols need the mlserver extra")
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((1, 1, 28, 28), np.float32))
    with running_service(plain_lenet, "--protocol", "v2") as service:
        targets = {"v2-rest": f"http://127.0.0.1:{service.http_port}", "v2-grpc": f"127.0.0.1:{service.grpc_port}"}
        metrics = f"http://127.0.0.1:{service.metrics_port}/metrics"
        for protocol, target in targets.items():
            done = bench(target, "--request", npy, "--protocol", protocol, "--concurrency", "2", *SHORT,
                         "--metrics", metrics)  # fmt: skip
            assert done.returncode == 0, done.stderr
            (row,) = rows(done.stdout)
            assert float(row[1]) > 0 and row[7] == "0" and "(no metrics)" not in done.stdout, done.stdout
            wrong = request_file(tmp_path / "wrong.json", (1, 3, 28, 28), protocol)
            done = bench(target, "--request", wrong, "--protocol", protocol, "--model", "lenet", "--concurrency", "1",
                         *SHORT)  # fmt: skip
            (row,) = rows(done.stdout)
            assert float(row[1]) == 0.0 and row[7].endswith("x400"), done.stdout  # gRPC: INVALID_ARGUMENT
            missing = bench(target, "--request", npy, "--protocol", protocol, "--model", "nope", *SHORT)
            assert missing.returncode == 1, missing.stderr
            assert missing.stderr.strip() == f"seldon-caffe: error: {target.split('//')[-1]} serves no model 'nope'"


@pytest.mark.e2e
def test_open_loop_rate(plain_lenet, tmp_path):
    request = request_file(tmp_path / "request.json", (1, 1, 28, 28))
    done = bench(plain_lenet, "--request", request, "--rate", "20", *SHORT)
    assert done.returncode == 0, done.stderr
    (row,) = rows(done.stdout)
    assert row[0] == "20/s" and float(row[1]) > 0


@pytest.mark.e2e
def test_ctrl_c_stops_cleanly_with_the_partial_report(plain_lenet, tmp_path):
    request = request_file(tmp_path / "request.json", (1, 1, 28, 28))
    command = [sys.executable, "-m", "seldon_caffe.cli", "bench", str(plain_lenet), "--request", str(request),
               "--concurrency", "1,2", "--duration", "60", "--warmup", "0"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
    )
    header = process.stdout.readline()  # printed once the service is ready, as the first level starts
    assert header.startswith("seldon-caffe bench: "), header + process.stderr.read()
    time.sleep(5)
    process.send_signal(signal.SIGINT)
    # bench's own bounded waits after Ctrl-C add up to about a minute at worst (a client's last
    # answer 30 s, its process 5 s, the service's stop 15 s, a metrics scrape 5 s): allow them
    rest, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted: the last level is partial" in stderr
    (row,) = rows(header + rest)
    assert row[0] == "c=1" and row[-1] == "(partial)" and float(row[1]) > 0, rest
    time.sleep(1)
    assert service_processes(plain_lenet) == []


def test_bad_arguments_are_one_line(tmp_path):
    missing = bench("localhost:1", "--request", tmp_path / "absent.json", *SHORT)
    assert missing.returncode == 1 and missing.stderr.strip().startswith("seldon-caffe: error: --request")
    levels = bench("localhost:1", "--request", tmp_path / "absent.json", "--concurrency", "2,x")
    assert levels.returncode == 2 and "expected positive integers" in levels.stderr
    seldon = request_file(tmp_path / "seldon.json", (1, 1, 28, 28))
    not_v2 = bench("localhost:1", "--request", seldon, "--protocol", "v2-rest", *SHORT)
    assert not_v2.returncode == 1 and "expected a V2 inference request" in not_v2.stderr, not_v2.stderr
    v2 = request_file(tmp_path / "v2.json", (1, 1, 28, 28), "v2-rest")
    unreachable = bench("127.0.0.1:1", "--request", v2, "--protocol", "v2-rest", *SHORT)
    assert unreachable.returncode == 1 and "cannot ask 127.0.0.1:1 for its V2 models" in unreachable.stderr
    model = bench("localhost:1", "--request", seldon, "--model", "lenet", *SHORT)
    assert model.returncode == 1 and "--model is for the V2 protocols" in model.stderr
