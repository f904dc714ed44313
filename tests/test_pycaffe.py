"""The pycaffe runtime through its worker (real Caffe in the reference root, via chroot).

Unit-level: the wire format and the worker file's Python 3.6 compatibility (no Caffe
needed). With real Caffe: answers, concurrency, weights, a killed worker (one 503-class
error, then normal answers with the weights set before), load errors, no orphans, and the
real microservice serving a `runtime: pycaffe` model directory.
"""

from __future__ import annotations

import ast
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ZOO
from service import running_service

from seldon_caffe import reference
from seldon_caffe.config import load_config
from seldon_caffe.errors import BadRequest, ModelLoadError, ModelUnavailable
from seldon_caffe.runtimes import load_runtime
from seldon_caffe.runtimes import pycaffe_worker as wire

needs_caffe = pytest.mark.skipif(reference.unavailable_reason() is not None, reason=f"{reference.unavailable_reason()}")
WORKER_FILE = Path(wire.__file__)


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


def _model_dir(where: Path, command: list[str] | None, weights: Path | None) -> Path:
    model_dir = where / "lenet-pycaffe"
    model_dir.mkdir()
    shutil.copy(ZOO / "lenet.prototxt", model_dir / "deploy.prototxt")
    (model_dir / "weights.caffemodel").write_bytes(weights.read_bytes() if weights else b"")
    options = f"{{pycaffe_command: {command}, threads: 2}}" if command else "{}"  # threads as the reference
    (model_dir / "model.yaml").write_text(
        "name: lenet-pycaffe\nformat: caffe\nruntime: pycaffe\n"
        "files: {prototxt: deploy.prototxt, weights: weights.caffemodel}\n"
        f"options: {options}\n"
    )
    return model_dir


def _images(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 1, 28, 28)).astype(np.float32)


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
        for answer in answers:
            np.testing.assert_array_equal(answer, expected[i]["prob"])


@needs_caffe
def test_killed_worker_costs_one_request_and_keeps_set_weights(model_dir: Path) -> None:
    x = _images(2, seed=1)
    with load_runtime(load_config(model_dir)) as model:
        weights = model.get_weights("conv1")
        assert [w.shape for w in weights] == [(20, 1, 5, 5), (20,)]
        model.set_weights("conv1", [weights[0] * -2.0, weights[1] + 0.5])
        changed = model.run(x)["prob"]
        first = model.native.pid
        os.kill(first, signal.SIGKILL)
        with pytest.raises(ModelUnavailable, match="killed by SIGKILL.*restart"):
            model.run(x)
        np.testing.assert_array_equal(model.run(x)["prob"], changed)  # restarted, set_weights re-applied
        assert model.native.pid != first
        np.testing.assert_array_equal(model.get_weights("conv1")[1], weights[1] + 0.5)

        with pytest.raises(BadRequest, match=r"shape \[20\], expected \[20, 1, 5, 5\]"):
            model.set_weights("conv1", [weights[1], weights[1]])
        with pytest.raises(BadRequest, match="no layer 'nope'"):
            model.get_weights("nope")
        model.run(x)  # errors leave the worker serving


@needs_caffe
def test_glog_chatter_goes_to_our_log_not_into_the_protocol(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("GLOG_minloglevel", "0")  # Caffe's INFO lines: a screenful per load
    with caplog.at_level(logging.INFO), load_runtime(load_config(model_dir)) as model:
        assert model.run(_images(3, seed=2))["prob"].shape == (3, 10)
    assert any("pycaffe worker" in r.message and "net.cpp" in r.message for r in caplog.records)


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


@needs_caffe
@pytest.mark.parametrize("ending", ["close", "exit", "SIGKILL"])
def test_no_worker_outlives_its_runtime(model_dir: Path, ending: str) -> None:
    script = f"""
        import os, signal, sys
        from seldon_caffe.config import load_config
        from seldon_caffe.runtimes import load_runtime
        model = load_runtime(load_config({str(model_dir)!r}))
        print(model.native.pid, flush=True)
        if {ending!r} == "close":
            model.close()
        elif {ending!r} == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120)
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10  # after SIGKILL the worker leaves on EOF, asynchronously
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), f"worker {pid} outlived its runtime ({ending})"


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
            np.testing.assert_array_equal(out["first"], expected["prob"])
            np.testing.assert_array_equal(out["w"], out["w0"] * 0.5)
            assert not np.array_equal(out["again"], out["first"])
    finally:
        shutil.rmtree(inside, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


# -- the real microservice -----------------------------------------------------------


def _workers_of(ancestor: int) -> list[int]:
    """pycaffe worker processes below `ancestor` (they run `python3 -c <worker source>`)."""
    parents, found = {}, []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().split(") ")[-1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if len(argv) > 2 and argv[1] == b"-c" and b"The pycaffe worker" in argv[2]:
                found.append(int(entry))
    result = []
    for pid in found:
        p = pid
        while p > 1 and p != ancestor:
            p = parents.get(p, 1)
        if p == ancestor:
            result.append(pid)
    return result


@needs_caffe
def test_service_answers_like_real_caffe_and_survives_a_killed_worker(model_dir: Path) -> None:
    x = _images(2, seed=5)
    expected = reference.forward(model_dir / "deploy.prototxt", model_dir / "weights.caffemodel", {"data": x})["prob"]
    payload = {"data": {"ndarray": x.tolist()}}
    with running_service(model_dir) as service:
        answer = service.post(payload)
        assert answer.status_code == 200, answer.text
        np.testing.assert_array_equal(np.float32(answer.json()["data"]["ndarray"]), expected)

        workers = _workers_of(service.process.pid)
        assert workers, "no pycaffe worker below the service"
        statuses: list[int] = []
        killed = threading.Event()

        def kill_soon() -> None:
            time.sleep(0.3)
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            killed.set()

        threading.Thread(target=kill_soon).start()
        while not (killed.is_set() and 503 in statuses and statuses[-5:] == [200] * 5):
            reply = service.post(payload)
            statuses.append(reply.status_code)
            if reply.status_code == 200:
                np.testing.assert_array_equal(np.float32(reply.json()["data"]["ndarray"]), expected)
            else:
                assert reply.status_code == 503 and "killed by SIGKILL" in reply.text, reply.text
            assert len(statuses) < 5000, "no 503 seen"
        assert statuses.count(503) == 1, statuses
        assert statuses[-5:] == [200] * 5
