"""The pycaffe runtime through its worker (real Caffe in the reference root, via chroot).

Unit-level: the wire format, the worker file's Python 3.6 compatibility, the environment
rule and options.timeout_s's checks (no Caffe needed). With real Caffe: answers,
concurrency, weights, a killed worker (one 503-class error, then normal answers with the
weights set before), a hung worker (a 504 past options.timeout_s, then a new worker), a
worker that cannot start (back-off), load errors, no orphans, and the real microservice
serving a `runtime: pycaffe` model directory.

Real Caffe runs in a separate process from the oracle's, so answers are compared with a
tolerance: OpenBLAS may pick other kernels there (OPENBLAS_CORETYPE...) and differ in the
last bits. Answers of one worker process are compared exactly.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import ZOO
from service import Service, alive, is_pycaffe_worker, process_tree, running_service

from caffe_oracle import reference
from seldon_caffe.config import load_config
from seldon_caffe.errors import BadRequest, ConfigError, DeadlineExceeded, ModelLoadError, ModelUnavailable
from seldon_caffe.runtimes import load_runtime, pycaffe_process
from seldon_caffe.runtimes import pycaffe_worker as wire

needs_caffe = pytest.mark.skipif(reference.unavailable_reason() is not None, reason=f"{reference.unavailable_reason()}")
WORKER_FILE = Path(wire.__file__)


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    """Two processes running real Caffe: equal up to float32 rounding, not bit for bit."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_worker_file_runs_on_python36_with_numpy_and_caffe_only() -> None:
    tree = ast.parse(WORKER_FILE.read_text(), feature_version=(3, 6))  # SyntaxError beyond 3.6
    allowed = {"json", "os", "shutil", "struct", "sys", "tempfile", "types", "numpy", "caffe", "caffe.proto"}
    allowed.add("google.protobuf")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module in allowed, node.module
        elif isinstance(node, ast.Import):
            assert {alias.name for alias in node.names} <= allowed
        assert not isinstance(node, ast.AnnAssign), "variable annotations need 3.6+ care; keep the worker plain"


def test_frames_carry_arrays_bit_exactly() -> None:
    arrays = [
        np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32),
        np.arange(7, dtype=np.int64),
        np.zeros((0, 4), np.float32),
        np.float32(2.5).reshape(()),
        np.frombuffer(b"prototxt bytes", np.uint8),
    ]
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as inp, os.fdopen(write_end, "wb") as out:
        writer = threading.Thread(target=wire.write_frame, args=(out, {"op": "run", "x": [1]}, arrays))
        writer.start()  # a pipe holds 64 KiB: read while writing
        header, got = wire.read_frame(inp)
        writer.join()
        out.close()
        assert wire.read_frame(inp) is None  # a clean EOF between frames
    assert header == {"op": "run", "x": [1]}
    for a, b in zip(arrays, got, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_without_caffe_or_command_the_error_says_what_to_set(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, command=None, weights=None)
    with pytest.raises(ModelLoadError, match="pycaffe_command"):
        load_runtime(load_config(model_dir))


@pytest.mark.parametrize("value", ["'60'", "0", "-1", "true", ".inf", "[1]"])
def test_timeout_s_must_be_a_positive_number(tmp_path: Path, value: str) -> None:
    model_dir = _model_dir(tmp_path, command=None, weights=None, timeout_s=value)
    with pytest.raises(ConfigError, match=r"model.yaml: field 'options.timeout_s': .* not a positive number"):
        load_runtime(load_config(model_dir))


def test_oracle_and_worker_run_caffe_in_the_same_blas_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """What picks OpenBLAS's kernels reaches both real Caffes, or they compute differently."""
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("OPENBLAS_L2_SIZE", "524288")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "7")  # options.threads wins over this one
    monkeypatch.setenv("VIRTUAL_ENV", "/our/venv")
    monkeypatch.delenv("GLOG_minloglevel", raising=False)
    oracle, worker = reference.chroot_env(threads=2), pycaffe_process.caffe_env(2)
    for env in (oracle, worker):
        assert env["OPENBLAS_CORETYPE"] == "Haswell" and env["OPENBLAS_L2_SIZE"] == "524288"
        assert env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == "2"
        assert env["GLOG_minloglevel"] == "2"
    assert "VIRTUAL_ENV" not in oracle and worker["VIRTUAL_ENV"] == "/our/venv"  # the oracle's stays clean


# -- with real Caffe ------------------------------------------------------------------


@pytest.fixture(scope="module")
def lenet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if reference.unavailable_reason():
        pytest.skip(reference.unavailable_reason())
    weights = tmp_path_factory.mktemp("lenet") / "weights.caffemodel"
    reference.make_weights(ZOO / "lenet.prototxt", weights, seed=3)
    return weights


@pytest.fixture
def model_dir(tmp_path: Path, lenet_weights: Path) -> Path:
    return _model_dir(tmp_path, command=reference.python_command(), weights=lenet_weights)


def _model_dir(where: Path, command: list[str] | None, weights: Path | None, **more: str) -> Path:
    """A LeNet model directory; `more` are further options, as YAML text."""
    model_dir = where / "lenet-pycaffe"
    model_dir.mkdir()
    shutil.copy(ZOO / "lenet.prototxt", model_dir / "deploy.prototxt")
    (model_dir / "weights.caffemodel").write_bytes(weights.read_bytes() if weights else b"")
    options = {"pycaffe_command": str(command), "threads": "2"} if command else {}  # threads as the reference
    options.update(more)
    flow = "{" + ", ".join(f"{key}: {value}" for key, value in options.items()) + "}"
    (model_dir / "model.yaml").write_text(
        "name: lenet-pycaffe\nformat: caffe\nruntime: pycaffe\n"
        "files: {prototxt: deploy.prototxt, weights: weights.caffemodel}\n"
        f"options: {flow}\n"
    )
    return model_dir


def _images(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 1, 28, 28)).astype(np.float32)


@pytest.mark.reference
@needs_caffe
def test_concurrent_runs_each_get_their_own_answer(model_dir: Path) -> None:
    inputs = [_images(1 + i % 3, seed=i) for i in range(8)]
    net = (model_dir / "deploy.prototxt", model_dir / "weights.caffemodel")
    expected = [
        result["outputs"] for result in reference.run_jobs([reference.forward_job(*net, {"data": x}) for x in inputs])
    ]
    with load_runtime(load_config(model_dir)) as model:
        assert [s.shape for s in model.inputs] == [(-1, 1, 28, 28)]
        results: dict[int, list[np.ndarray]] = {i: [] for i in range(len(inputs))}

        def client(i: int) -> None:
            for _ in range(10):
                results[i].append(model.run(inputs[i])["prob"])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(inputs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for i, answers in results.items():
        assert len(answers) == 10
        _assert_close(answers[0], expected[i]["prob"])
        for answer in answers[1:]:  # one worker: the same input gives the same bits
            np.testing.assert_array_equal(answer, answers[0])


@pytest.mark.reference
@needs_caffe
def test_killed_worker_costs_one_request_and_keeps_set_weights(model_dir: Path) -> None:
    x = _images(2, seed=1)
    with load_runtime(load_config(model_dir)) as model:
        weights = model.get_weights("conv1")
        assert [w.shape for w in weights] == [(20, 1, 5, 5), (20,)]
        model.set_weights("conv1", [weights[0] * -2.0, weights[1] + 0.5])
        changed = model.run(x)["prob"]
        first, spare = model.native.pid, model.native.spare_pid
        assert spare is not None and spare != first, "a spare worker waits in reserve"
        os.kill(first, signal.SIGKILL)
        with pytest.raises(ModelUnavailable, match="killed by SIGKILL.*restart"):
            model.run(x)
        _assert_close(model.run(x)["prob"], changed)  # restarted, set_weights re-applied
        assert model.native.pid == spare, "the spare took over"
        assert model.native.spare_pid not in (None, first, spare), "and a new spare waits"
        np.testing.assert_array_equal(model.get_weights("conv1")[1], weights[1] + 0.5)

        with pytest.raises(BadRequest, match=r"shape \[20\], expected \[20, 1, 5, 5\]"):
            model.set_weights("conv1", [weights[1], weights[1]])
        with pytest.raises(BadRequest, match="no layer 'nope'"):
            model.get_weights("nope")
        model.run(x)  # errors leave the worker serving


@pytest.mark.reference
@needs_caffe
def test_a_hung_worker_costs_one_504_then_a_new_worker_answers(tmp_path: Path, lenet_weights: Path) -> None:
    model_dir = _model_dir(tmp_path, command=reference.python_command(), weights=lenet_weights, timeout_s="2")
    x = _images(2, seed=6)
    with load_runtime(load_config(model_dir)) as model:
        before = model.run(x)["prob"]
        hung = model.native.pid
        os.kill(hung, signal.SIGSTOP)  # alive, holding its pipes, answering nothing
        started = time.monotonic()
        failed: list[BaseException] = []

        def request() -> None:
            try:
                model.run(x)
            except Exception as exc:
                failed.append(exc)

        caller = threading.Thread(target=request, daemon=True)
        caller.start()
        caller.join(60)
        if caller.is_alive():  # fail rather than hang the suite: end the worker, then report
            os.kill(hung, signal.SIGKILL)
            caller.join()
            pytest.fail("a request to a stopped worker hung past options.timeout_s")
        waited = time.monotonic() - started
        assert len(failed) == 1 and isinstance(failed[0], DeadlineExceeded), failed
        assert re.search(r"did not answer run within 2 s.*restarted", str(failed[0])), failed[0]
        assert failed[0].status == 504 and failed[0].reason == "MODEL_TIMEOUT"
        assert 2 <= waited < 30, waited  # the deadline, not forever (generous: 2 cores are shared)
        assert not alive(hung), "the hung worker was killed"
        _assert_close(model.run(x)["prob"], before)
        assert model.native.pid not in (None, hung) and model.native.restarts == 1


@pytest.mark.reference
@needs_caffe
def test_a_worker_that_dies_at_start_up_is_retried_with_back_off(tmp_path: Path, lenet_weights: Path) -> None:
    """The first start works; then every start dies until the flag file goes. Each attempt
    appends its time to a file: attempts must be spaced out by the growing back-off, while
    requests get an immediate 503 saying when the next attempt is, never a start of their
    own (that would show as attempts closer together than the back-off)."""
    flag, attempts = tmp_path / "refuse", tmp_path / "attempts"
    wrapper = tmp_path / "python-or-die.sh"
    wrapper.write_text(
        f'if [ -e "{flag}" ]; then date +%s.%N >> "{attempts}"; echo "refusing to start" >&2; exit 3; fi\n'
        f'exec {" ".join(reference.python_command())} "$@"\n'
    )
    model_dir = _model_dir(tmp_path, command=["sh", str(wrapper)], weights=lenet_weights)
    x = _images(1, seed=7)

    def times() -> list[float]:
        return [float(t) for t in attempts.read_text().split()] if attempts.exists() else []

    with load_runtime(load_config(model_dir)) as model:
        before = model.run(x)["prob"]
        first = model.native.pid
        flag.touch()
        os.kill(model.native.spare_pid, signal.SIGKILL)  # no spare to fall back on: every start is new
        os.kill(first, signal.SIGKILL)
        with pytest.raises(ModelUnavailable, match="killed by SIGKILL"):
            model.run(x)
        deadline = time.monotonic() + 60
        replies: list[tuple[float, str]] = []
        while len(times()) < 4:  # the attempts after waits of 0.5, 1 and 2 s
            assert time.monotonic() < deadline, f"only {len(times())} start attempts in 60 s"
            started = time.monotonic()
            with pytest.raises(ModelUnavailable) as caught:
                model.run(x)
            replies.append((time.monotonic() - started, str(caught.value)))
            time.sleep(0.02)
        gaps = np.diff(times())
        assert all(gap >= 0.9 * 0.5 * 2**k for k, gap in enumerate(gaps)), gaps
        assert len(replies) > 20, "requests kept coming while it backed off"
        assert any("next attempt in" in text and "refusing to start" in text for _, text in replies), replies
        slowest = max(seconds for seconds, _ in replies)
        assert slowest < 1.0, f"a request waited {slowest:.2f} s: it should get its 503 at once"
        # the 4th attempt logged its time before it died; it counts once its death is seen
        counted = time.monotonic() + 10
        while model.native.start_failures < 4 and time.monotonic() < counted:
            time.sleep(0.05)
        assert model.native.start_failures >= 4

        flag.unlink()
        deadline = time.monotonic() + 60  # the back-off is at 8 s by now
        while True:
            try:
                answer = model.run(x)["prob"]
                break
            except ModelUnavailable:
                assert time.monotonic() < deadline, "no worker after the cause went away"
                time.sleep(0.1)
        _assert_close(answer, before)
        assert model.native.pid != first and model.native.start_failures == 0

        # A successful start resets the back-off: the next failures wait 0.5 s again, not 16 s.
        flag.touch()
        seen = len(times())
        os.kill(model.native.spare_pid, signal.SIGKILL)
        os.kill(model.native.pid, signal.SIGKILL)
        with pytest.raises(ModelUnavailable, match="killed by SIGKILL"):
            model.run(x)
        deadline = time.monotonic() + 10
        while len(times()) < seen + 2:
            assert time.monotonic() < deadline, "the back-off was not reset by the successful start"
            time.sleep(0.05)


@pytest.mark.reference
@needs_caffe
def test_glog_chatter_goes_to_our_log_not_into_the_protocol(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("GLOG_minloglevel", "0")  # Caffe's INFO lines: a screenful per load
    with caplog.at_level(logging.INFO), load_runtime(load_config(model_dir)) as model:
        assert model.run(_images(3, seed=2))["prob"].shape == (3, 10)
    assert any("pycaffe worker" in r.message and "net.cpp" in r.message for r in caplog.records)


@pytest.mark.reference
@needs_caffe
def test_a_net_caffe_rejects_fails_to_load_with_caffes_reason(model_dir: Path) -> None:
    prototxt = model_dir / "deploy.prototxt"
    prototxt.write_text(prototxt.read_text().replace('type: "ReLU"', 'type: "NoSuchLayer"'))
    with pytest.raises(ModelLoadError, match="Unknown layer type: NoSuchLayer"):
        load_runtime(load_config(model_dir))
    root_tmp = Path(reference.python_command()[1]) / "tmp"
    aborted = {p.name for p in root_tmp.glob(wire.TMP_PREFIX + "*")}
    assert aborted, "Caffe aborted mid-load, so its temporary folder is still there"

    prototxt.write_text("layer { name: 'x' type: \n")
    with pytest.raises(ModelLoadError, match=r"ParseError.*2:1"):
        load_runtime(load_config(model_dir))
    assert not aborted & {p.name for p in root_tmp.glob(wire.TMP_PREFIX + "*")}, "the next worker clears it"


@pytest.mark.reference
@needs_caffe
@pytest.mark.parametrize("ending", ["close", "exit", "SIGKILL"])
def test_no_worker_outlives_its_runtime(model_dir: Path, ending: str) -> None:
    script = f"""
        import os, signal, sys
        from seldon_caffe.config import load_config
        from seldon_caffe.runtimes import load_runtime
        model = load_runtime(load_config({str(model_dir)!r}))
        print(model.native.pid, model.native.spare_pid, flush=True)
        if {ending!r} == "close":
            model.close()
        elif {ending!r} == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120)
    pids = [int(pid) for pid in done.stdout.split()[:2]]  # the worker and its spare
    deadline = time.monotonic() + 10  # after SIGKILL the workers leave on EOF, asynchronously
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids), f"workers {pids} outlived their runtime ({ending})"


@pytest.mark.reference
@needs_caffe
def test_in_process_mode_where_import_caffe_works(model_dir: Path) -> None:
    """Where `import caffe` works the runtime uses it directly. Our Python has no pycaffe,
    so this runs our modules (a copy) in the reference root's Python 3.9, which has it.
    The package itself needs 3.10+, so the script calls the runtime's own `_run` (not
    the shared input validation) and skips if our imports stop working on 3.9."""
    root = reference.find_root()
    assert root is not None
    inside = Path(tempfile.mkdtemp(prefix="seldon-caffe-test-", dir=root / "tmp"))
    try:
        package = Path(wire.__file__).parents[1]
        shutil.copytree(package, inside / "seldon_caffe", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(model_dir, inside / "model")
        x = _images(3, seed=4)
        np.save(inside / "x.npy", x)
        script = """
            import sys, numpy as np
            try:
                from seldon_caffe.config import load_config
                from seldon_caffe.errors import BadRequest
                from seldon_caffe.runtimes import load_runtime
            except SyntaxError as exc:
                sys.exit("SKIP %s" % exc)
            model = load_runtime(load_config("model"))
            assert type(model.native).__name__ == "Net", type(model.native)
            assert [s.shape for s in model.inputs] == [(-1, 1, 28, 28)]
            x = np.load("x.npy")
            first = model._run({"data": x}, ["prob"])["prob"]
            w = model.get_weights("conv1")
            model.set_weights("conv1", [w[0] * 0.5, w[1]])
            again = model._run({"data": x}, ["prob"])["prob"]
            try:
                model.get_weights("nope")
                sys.exit("no BadRequest")
            except BadRequest:
                pass
            np.savez("out.npz", first=first, again=again, w=model.get_weights("conv1")[0], w0=w[0])
        """
        rel = "/" + str(inside.relative_to(root))
        shell = f'cd {rel} && PYTHONPATH={rel} exec python3 -c "$0"'
        argv = ["chroot", str(root), "sh", "-c", shell, textwrap.dedent(script)]
        done = subprocess.run(argv, env=reference.chroot_env(), capture_output=True, text=True, timeout=120)
        if done.stderr.startswith("SKIP"):
            pytest.skip(f"our modules no longer import on the root's Python 3.9: {done.stderr.strip()}")
        assert done.returncode == 0, done.stderr[-2000:]
        with np.load(inside / "out.npz") as out:
            expected = reference.forward(model_dir / "deploy.prototxt", model_dir / "weights.caffemodel", {"data": x})
            _assert_close(out["first"], expected["prob"])
            np.testing.assert_array_equal(out["w"], out["w0"] * 0.5)
            assert not np.array_equal(out["again"], out["first"])
    finally:
        shutil.rmtree(inside, ignore_errors=True)


# -- the real microservice -----------------------------------------------------------


@pytest.mark.reference
@needs_caffe
@pytest.mark.e2e
def test_service_answers_like_real_caffe_and_survives_a_killed_worker(model_dir: Path) -> None:
    x = _images(2, seed=5)
    expected = reference.forward(model_dir / "deploy.prototxt", model_dir / "weights.caffemodel", {"data": x})["prob"]
    payload = {"data": {"ndarray": x.tolist()}}
    with running_service(model_dir) as service:

        def over_rest() -> tuple[str, object]:
            reply = service.post(payload)
            if reply.status_code == 200:
                return "OK", np.float32(reply.json()["data"]["ndarray"])
            return str(reply.status_code), reply.text

        _kill_workers_while_asking(service, over_rest, expected, "503")


@pytest.mark.reference
@needs_caffe
@pytest.mark.e2e
def test_v2_service_answers_like_real_caffe_and_a_dead_worker_is_503_and_unavailable(model_dir: Path) -> None:
    """The same over V2 on MLServer: killing the workers costs one request, a 503 over REST
    and UNAVAILABLE over gRPC (each transport in turn), then answers come as before."""
    pytest.importorskip("mlserver", reason="the V2 route needs the mlserver extra")
    import grpc
    import requests
    from mlserver.grpc import dataplane_pb2, dataplane_pb2_grpc
    from mlserver.grpc.converters import ModelInferResponseConverter

    x = _images(2, seed=5)
    expected = reference.forward(model_dir / "deploy.prototxt", model_dir / "weights.caffemodel", {"data": x})["prob"]
    tensor = {"name": "data", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    grpc_request = dataplane_pb2.ModelInferRequest(model_name="lenet-pycaffe")
    grpc_request.inputs.add(name="data", datatype="FP32", shape=list(x.shape)).contents.fp32_contents.extend(
        tensor["data"]
    )

    def prob(answer: dict) -> np.ndarray:
        (output,) = answer["outputs"]
        return np.float32(output["data"]).reshape(output["shape"])

    with running_service(model_dir, "--protocol", "v2") as service:
        url = f"{service.url}/v2/models/lenet-pycaffe/infer"
        stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}"))

        def over_rest() -> tuple[str, object]:
            reply = requests.post(url, json={"inputs": [tensor]}, timeout=120)
            return ("OK", prob(reply.json())) if reply.status_code == 200 else (str(reply.status_code), reply.text)

        def over_grpc() -> tuple[str, object]:
            try:
                answer = stub.ModelInfer(grpc_request, timeout=120)
            except grpc.RpcError as error:
                return error.code().name, error.details()
            return "OK", prob(ModelInferResponseConverter.to_types(answer).model_dump())

        _kill_workers_while_asking(service, over_rest, expected, "503")
        _kill_workers_while_asking(service, over_grpc, expected, "UNAVAILABLE")


def _kill_workers_while_asking(
    service: Service, ask: Callable[[], tuple[str, object]], expected: np.ndarray, dead: str
) -> None:
    """Ask once, SIGKILL the service's pycaffe workers (the spare too) while asking on: exactly
    one request gets `dead` (the status or code `ask` returns) naming the signal, every other
    answer equals `expected`, and five in a row come back after it."""
    status, answer = ask()
    assert status == "OK", answer
    _assert_close(answer, expected)
    workers = [pid for pid in process_tree(service.process.pid) if is_pycaffe_worker(pid)]
    assert workers, "no pycaffe worker below the service"
    statuses: list[str] = []
    killed = threading.Event()

    def kill_soon() -> None:
        time.sleep(0.3)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        killed.set()

    threading.Thread(target=kill_soon).start()
    while not (killed.is_set() and dead in statuses and statuses[-5:] == ["OK"] * 5):
        status, answer = ask()
        statuses.append(status)
        if status == "OK":
            _assert_close(answer, expected)
        else:
            assert status == dead and "killed by SIGKILL" in answer, (status, answer)
        assert len(statuses) < 5000, f"no {dead} seen"
    assert statuses.count(dead) == 1, statuses
    assert not [pid for pid in workers if alive(pid)], "a killed worker is still there"
