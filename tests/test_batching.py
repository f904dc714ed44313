"""Adaptive batching (batching.py, pipeline.py): merged runs, answers split back per request.

The semantics are checked in this process, with Pipeline.load(model_dir) and threads: fast, and
deterministic where it matters (a long max_queue_delay_ms and a max_batch_size the requests fill
exactly make a batch go when, and only when, every request is in it). The wire is checked
through the real service (`seldon-caffe serve`) over Seldon v1 and V2, REST and gRPC.

Merging is proven, never assumed: a batch-safe run_model hook notes every run it is given (the
rows of each request in ctx.batch), and with the default hooks the service's batch_size metric
must show runs of more than one row. The main net is the LeNet example with its hooks.py
removed (default hooks) and runtime opencv, which answers a batch bit for bit as it answers
each row alone: so "equal to the unbatched answer" is exact equality.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from string import Template
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import yaml
from helpers import EXAMPLES, copy_model, run_concurrently
from prometheus_client.parser import text_string_to_metric_families
from seldon_core.proto import prediction_pb2, prediction_pb2_grpc
from seldon_core.utils import array_to_grpc_datadef, grpc_datadef_to_array
from service import Service, free_port, running_service

from seldon_caffe.batching import Batcher, BatchingConfig
from seldon_caffe.errors import DeadlineExceeded, ModelUnavailable, SeldonCaffeError
from seldon_caffe.pipeline import Pipeline, RequestStats

RNG = np.random.default_rng(16)
HTTP_OF_GRPC = {grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504}

# A run_model that notes, for every run, the rows the engine was given and the rows each
# merged request brought (ctx.batch: None when the hook is given one request), runs `$before`,
# and returns `$outputs`. setup() makes the notes, and two events for tests that hold a run.
RECORDING_HOOKS = Template("""
import threading

import numpy as np


def setup(ctx):
    return {"runs": [], "running": threading.Event(), "release": threading.Event()}


def run_model(model, inputs, ctx):
    rows = int(np.shape(next(iter(inputs.values())) if isinstance(inputs, dict) else inputs)[0])
    parts = [(part.ctx.tags.get("client"), part.rows) for part in ctx.batch] if ctx.batch is not None else None
    ctx.state["runs"].append({"rows": rows, "parts": parts})
    $before
    return $outputs
""")


def recording_hooks(before: str = "pass", outputs: str = "model.run(inputs)", batch_safe: bool = True) -> str:
    """RECORDING_HOOKS' source; with batch_safe, run_model is declared batch-safe."""
    source = RECORDING_HOOKS.substitute(before=before, outputs=outputs)
    return source + ("\nrun_model.batch_safe = True\n" if batch_safe else "")


def lenet_dir(target: Path, batching: dict[str, Any] | None, hooks: str | None = None, **fields: Any) -> Path:
    """The LeNet example under `target`: default hooks (hooks.py removed) unless `hooks` is
    given, runtime opencv, and model.yaml's `batching:` (None: off)."""
    copy_model(EXAMPLES / "lenet", target)
    if hooks is None:
        (target / "hooks.py").unlink()
    else:
        (target / "hooks.py").write_text(hooks)
    config = {
        "name": "lenet",
        "format": "caffe",
        "files": {"prototxt": "deploy.prototxt", "weights": "weights.caffemodel"},
        "runtime": "opencv",  # answers a batch bit for bit as its rows alone: compared exactly
        **fields,
    }
    if batching is not None:
        config["batching"] = batching
    (target / "model.yaml").write_text(yaml.safe_dump(config))
    return target


def images(rows: int) -> np.ndarray:
    return RNG.random((rows, 1, 28, 28), dtype=np.float32)


@contextlib.contextmanager
def loaded(model_dir: Path) -> Iterator[Pipeline]:
    pipeline = Pipeline.load(model_dir)
    try:
        yield pipeline
    finally:
        pipeline.close()


def answer_all(pipeline: Pipeline, payloads: list[Any]) -> list[tuple[Any, RequestStats]]:
    """Every payload answered at once, each in its own thread (as a server's would be); each
    request carries meta.tags.client = its index. An exception is returned in its place."""

    def one(index: int) -> tuple[Any, RequestStats]:
        stats = RequestStats()
        try:
            return pipeline.answer(payloads[index], {"tags": {"client": index}}, stats=stats), stats
        except Exception as error:  # the test looks at each request's own error
            return error, stats

    pool = ThreadPoolExecutor(len(payloads))
    try:  # a request never answered fails the test instead of hanging it
        return [future.result(timeout=60) for future in [pool.submit(one, i) for i in range(len(payloads))]]
    finally:
        pool.shutdown(wait=False)


def runs(pipeline: Pipeline) -> list[dict[str, Any]]:
    return pipeline.context.state["runs"]


# -- merging and splitting (in this process) ------------------------------------------


def test_requests_of_1_2_3_rows_merge_into_one_run_and_split_exactly(tmp_path: Path) -> None:
    """Rows count, not requests: 1 + 2 + 3 rows fill max_batch_size 6, and go as one run."""
    payloads = [images(rows) for rows in (1, 2, 3)]
    with loaded(lenet_dir(tmp_path / "lenet", {"max_batch_size": 6, "max_queue_delay_ms": 10_000})) as pipeline:
        answers = answer_all(pipeline, payloads)
        for payload, (answer, stats) in zip(payloads, answers, strict=True):
            assert isinstance(answer, np.ndarray), answer
            np.testing.assert_array_equal(answer, pipeline.model.run(payload)["prob"])  # as unbatched
            assert stats.batch_rows == 6  # the run that answered it held all three requests
            assert {"preprocess", "queue", "run_model", "postprocess"} <= set(stats.stages)


def test_batch_safe_run_model_sees_the_merged_batch_and_each_request(tmp_path: Path) -> None:
    """ctx.batch lists the merged requests with their own ctx (meta.tags here) and rows."""
    model_dir = lenet_dir(tmp_path / "lenet", {"max_batch_size": 6, "max_queue_delay_ms": 10_000}, recording_hooks())
    payloads = [images(rows) for rows in (1, 2, 3)]
    with loaded(model_dir) as pipeline:
        answers = answer_all(pipeline, payloads)
        assert len(runs(pipeline)) == 1, runs(pipeline)
        (run,) = runs(pipeline)
        assert run["rows"] == 6
        assert sorted(run["parts"]) == [(0, 1), (1, 2), (2, 3)]  # client i brought its own i + 1 rows
        for payload, (answer, _) in zip(payloads, answers, strict=True):
            np.testing.assert_array_equal(answer, pipeline.model.run(payload)["prob"])


def test_a_request_over_max_batch_size_runs_alone_and_batches_stop_at_the_limit(tmp_path: Path) -> None:
    """3 + 3 + 3 rows with max_batch_size 6: two requests merge, the third waits for the next
    run; a request of 8 rows (over the limit) still runs, alone."""
    model_dir = lenet_dir(tmp_path / "lenet", {"max_batch_size": 6, "max_queue_delay_ms": 1000}, recording_hooks())
    payloads = [images(3), images(3), images(3)]
    with loaded(model_dir) as pipeline:
        answers = answer_all(pipeline, payloads)
        assert sorted(run["rows"] for run in runs(pipeline)) == [3, 6], runs(pipeline)
        big = images(8)
        np.testing.assert_array_equal(pipeline.answer(big), pipeline.model.run(big)["prob"])
        assert runs(pipeline)[-1]["rows"] == 8
        for payload, (answer, _) in zip(payloads, answers, strict=True):
            np.testing.assert_array_equal(answer, pipeline.model.run(payload)["prob"])


def test_a_preferred_batch_size_goes_without_waiting_for_the_delay(tmp_path: Path) -> None:
    """Four 1-row requests reach preferred_batch_size 4 and go at once, not after the 20 s
    max_queue_delay_ms (max_batch_size 16 is never reached)."""
    batching = {"max_batch_size": 16, "preferred_batch_size": [4], "max_queue_delay_ms": 20_000}
    with loaded(lenet_dir(tmp_path / "lenet", batching, recording_hooks())) as pipeline:
        start = time.monotonic()
        answers = answer_all(pipeline, [images(1) for _ in range(4)])
        assert time.monotonic() - start < 10, "the batch waited for max_queue_delay_ms"
        assert [run["rows"] for run in runs(pipeline)] == [4]
        assert all(isinstance(answer, np.ndarray) for answer, _ in answers)


def test_an_idle_model_runs_a_request_in_its_own_thread_and_one_run_at_a_time(tmp_path: Path) -> None:
    """max_queue_delay_ms 0: a request finding the model idle runs at once in its own thread
    (no hand-over to the runner). While that run holds the model, requests queue and no other
    run starts; when it ends they go together, on the runner."""
    hold = (
        'ctx.state["runs"][-1]["thread"] = threading.current_thread().name; '
        'ctx.state["running"].set(); ctx.state["release"].wait()'
    )
    batching = {"max_batch_size": 8, "max_queue_delay_ms": 0}
    with loaded(lenet_dir(tmp_path / "lenet", batching, recording_hooks(hold))) as pipeline:
        state = pipeline.context.state
        with ThreadPoolExecutor(4, thread_name_prefix="client") as pool:
            try:
                first = pool.submit(pipeline.answer, images(1))
                assert state["running"].wait(30)
                others = [pool.submit(pipeline.answer, images(1)) for _ in range(3)]
                wait_for(lambda: pipeline.batcher.depth == 3, "three requests to queue")
                time.sleep(0.2)  # time for a wrong second run to start
                assert len(runs(pipeline)) == 1, runs(pipeline)
            finally:
                state["release"].set()
            assert all(isinstance(f.result(timeout=30), np.ndarray) for f in [first, *others])
        held, merged = runs(pipeline)
        assert held["rows"] == 1 and held["thread"].startswith("client")
        assert merged["rows"] == 3 and merged["thread"].startswith("batcher")
        pipeline.answer(images(2))
        assert runs(pipeline)[-1]["thread"] == threading.current_thread().name


# -- mismatched keys -------------------------------------------------------------------


def pooling_dir(target: Path, batching: dict[str, Any]) -> Path:
    """An ONNX net with dynamic spatial dims (x: float32[N, 3, H, W] -> global average pool),
    so requests of two image sizes are both valid and must never be concatenated; with the
    recording batch-safe run_model (it notes the input's shape too)."""
    from onnx import TensorProto, helper, save

    target.mkdir()
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["y"])],
        "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what every onnxruntime here reads
    save(model, target / "model.onnx")
    hooks = recording_hooks('ctx.state["runs"][-1]["shape"] = inputs["x"].shape')
    (target / "hooks.py").write_text(hooks)
    config = {"name": "pool", "format": "onnx", "files": {"onnx": "model.onnx"}, "runtime": "onnxruntime"}
    (target / "model.yaml").write_text(yaml.safe_dump({**config, "batching": batching}))
    return target


def test_requests_of_two_shapes_are_never_merged(tmp_path: Path) -> None:
    model_dir = pooling_dir(tmp_path / "pool", {"max_batch_size": 4, "max_queue_delay_ms": 1000})
    payloads = [RNG.random((1, 3, side, side), dtype=np.float32) for side in (8, 16, 8, 16)]
    with loaded(model_dir) as pipeline:
        answers = answer_all(pipeline, payloads)
        shapes = sorted(run["shape"] for run in runs(pipeline))
        assert shapes == [(2, 3, 8, 8), (2, 3, 16, 16)], runs(pipeline)  # merged by shape, never across
        for payload, (answer, _) in zip(payloads, answers, strict=True):
            np.testing.assert_allclose(answer, payload.mean(axis=(2, 3), keepdims=True), rtol=1e-6)


def test_a_full_batch_goes_while_a_request_of_another_shape_waits(tmp_path: Path) -> None:
    """A batch goes when it holds max_batch_size rows, even when the oldest waiting request
    has another shape and its max_queue_delay_ms is far off."""
    model_dir = pooling_dir(tmp_path / "pool", {"max_batch_size": 4, "max_queue_delay_ms": 3000})
    with loaded(model_dir) as pipeline, ThreadPoolExecutor(2) as pool:
        lone = pool.submit(pipeline.answer, RNG.random((1, 3, 8, 8), dtype=np.float32))
        time.sleep(0.2)  # the 8x8 request is queued first: the oldest
        full = pool.submit(pipeline.answer, RNG.random((4, 3, 16, 16), dtype=np.float32))
        full.result(), lone.result()
        assert [run["shape"] for run in runs(pipeline)] == [(4, 3, 16, 16), (1, 3, 8, 8)]


def test_two_dtypes_are_never_merged() -> None:
    """The key holds each input's dtype. Through a Pipeline a request is cast to the signature's
    dtype before it is queued (check_inputs), so the Batcher itself is given two dtypes here,
    with a run function that notes what it was given."""
    seen: list[tuple[str, int]] = []

    def run(inputs: dict[str, np.ndarray], parts: list[Any]) -> dict[str, np.ndarray]:
        seen.append((inputs["x"].dtype.name, len(parts)))
        return {"y": inputs["x"] * 2}

    batcher = Batcher(BatchingConfig(max_batch_size=2, max_queue_delay_ms=5000), run)
    payloads = [np.arange(3, dtype=dtype)[None] + i for i, dtype in enumerate(["float32", "int64"] * 2)]
    try:
        with ThreadPoolExecutor(4) as pool:
            served = list(pool.map(lambda x: batcher.submit({"x": x}, None), payloads))
    finally:
        batcher.close()
    assert sorted(seen) == [("float32", 2), ("int64", 2)]
    for payload, answer in zip(payloads, served, strict=True):
        assert answer.outputs["y"].dtype == payload.dtype
        np.testing.assert_array_equal(answer.outputs["y"], payload * 2)


# -- failures ----------------------------------------------------------------------------


def test_a_failing_request_fails_alone(tmp_path: Path) -> None:
    """The merged run fails because of one request's rows; the batch is re-run one request at
    a time, so only that request gets the error (500 naming the hook) and the others their answers."""
    poison = 'if (inputs["data"][:, 0, 0, 0] < 0).any(): raise ValueError("a poisoned row")'
    model_dir = lenet_dir(
        tmp_path / "lenet", {"max_batch_size": 4, "max_queue_delay_ms": 10_000}, recording_hooks(poison)
    )
    payloads = [images(1) for _ in range(4)]
    payloads[2][0, 0, 0, 0] = -1.0
    with loaded(model_dir) as pipeline:
        answers = answer_all(pipeline, payloads)
        assert runs(pipeline)[0]["rows"] == 4  # merged first...
        assert sorted(run["rows"] for run in runs(pipeline)[1:]) == [1, 1, 1, 1]  # ...then one by one
        for index, (payload, (answer, _)) in enumerate(zip(payloads, answers, strict=True)):
            if index == 2:
                assert isinstance(answer, SeldonCaffeError) and answer.status == 500
                assert "hook run_model in hooks.py raised ValueError: a poisoned row" in str(answer)
            else:
                np.testing.assert_array_equal(answer, pipeline.model.run(payload)["prob"])


def test_outputs_without_one_row_per_input_row_fail_every_request_of_the_run(tmp_path: Path) -> None:
    """A batch-safe run_model that returns one row for a merged batch of three: each of the
    three requests gets 500 saying so, and the run is not retried one by one (the hook is
    wrong for every batch, not one request)."""
    hooks = recording_hooks(outputs='{"prob": model.run(inputs)["prob"][:1]}')
    model_dir = lenet_dir(tmp_path / "lenet", {"max_batch_size": 3, "max_queue_delay_ms": 10_000}, hooks)
    with loaded(model_dir) as pipeline:
        answers = answer_all(pipeline, [images(1) for _ in range(3)])
        assert [run["rows"] for run in runs(pipeline)] == [3]
        for answer, _ in answers:
            assert isinstance(answer, SeldonCaffeError) and answer.status == 500, answer
            assert "output 'prob' has first dimension 1 for a merged batch of 3 rows" in str(answer)


def test_queue_full_is_503_and_a_request_past_timeout_ms_is_504_before_it_runs(tmp_path: Path) -> None:
    """While a run holds the model: max_queue_size requests wait, the next is refused (503)
    at once, and a waiting one is answered 504 when timeout_ms passes, without waiting for the
    run in progress to end."""
    hooks = recording_hooks('ctx.state["running"].set(); ctx.state["release"].wait()')
    batching = {"max_batch_size": 1, "max_queue_size": 1, "timeout_ms": 1000}
    with loaded(lenet_dir(tmp_path / "lenet", batching, hooks)) as pipeline, ThreadPoolExecutor(2) as pool:
        state = pipeline.context.state
        try:
            first = pool.submit(pipeline.answer, images(1))
            assert state["running"].wait(30)
            waiting = pool.submit(pipeline.answer, images(1))
            wait_for(lambda: pipeline.batcher.depth == 1, "the second request to queue")
            with pytest.raises(ModelUnavailable, match="max_queue_size 1") as full:
                pipeline.answer(images(1))
            assert full.value.status == 503
            with pytest.raises(DeadlineExceeded, match="timeout_ms 1000") as late:
                waiting.result(timeout=20)  # the run in progress still holds the model
            assert late.value.status == 504
            assert not first.done()
        finally:
            state["release"].set()
        assert isinstance(first.result(timeout=30), np.ndarray)
        assert [run["rows"] for run in runs(pipeline)] == [1]  # the 504 request never ran
        assert pipeline.batcher.depth == 0


# -- hooks not declared batch-safe -----------------------------------------------------


@pytest.mark.parametrize("declared", ["no", "attribute", "model.yaml"])
def test_only_a_run_model_declared_batch_safe_sees_merged_batches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, declared: str
) -> None:
    batching = {"max_batch_size": 6, "max_queue_delay_ms": 1000}
    if declared == "model.yaml":
        batching["hooks_batch_safe"] = True
    model_dir = lenet_dir(tmp_path / "lenet", batching, recording_hooks(batch_safe=declared == "attribute"))
    payloads = [images(rows) for rows in (1, 2, 3)]
    with caplog.at_level("WARNING", logger="seldon_caffe"), loaded(model_dir) as pipeline:
        answers = answer_all(pipeline, payloads)
        seen = sorted(run["rows"] for run in runs(pipeline))
        warned = [r.getMessage() for r in caplog.records if "not declared batch-safe" in r.getMessage()]
        if declared == "no":
            assert seen == [1, 2, 3]  # each request ran alone: no merged batch reached the hook
            assert pipeline.batcher is None
            assert len(warned) == 1 and "each request runs alone" in warned[0], caplog.text
        else:
            assert seen == [6]
            assert not warned
        for payload, (answer, _) in zip(payloads, answers, strict=True):
            np.testing.assert_array_equal(answer, pipeline.model.run(payload)["prob"])


# -- model.yaml errors: one line from `serve` and `inspect` -----------------------------


def run_command(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`seldon-caffe ARGS` in its own process group; a `serve` that wrongly starts is stopped."""
    process = subprocess.Popen(
        [sys.executable, "-m", "seldon_caffe.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"seldon-caffe {' '.join(args)} did not stop with an error")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize(
    ("batching", "fields", "message"),
    [
        (
            {"max_batch_sise": 8},
            {},
            "model.yaml: field 'batching.max_batch_sise': unknown field; allowed: max_batch_size,",
        ),
        (
            {"max_batch_size": 0},
            {},
            "model.yaml: field 'batching.max_batch_size': 0 is not a positive integer",
        ),
        (
            {"max_batch_size": 8},
            {"inputs": [{"name": "data", "shape": [1, 1, 28, 28]}]},
            "model.yaml: field 'batching': every input's first dimension must be dynamic (N) to merge "
            "requests; fixed: data: float32[1, 1, 28, 28]",
        ),
    ],
    ids=["unknown-field", "bad-value", "fixed-first-dim"],
)
def test_a_bad_batching_setting_stops_serve_and_inspect_with_one_line(
    tmp_path: Path, batching: dict[str, Any], fields: dict[str, Any], message: str
) -> None:
    model_dir = lenet_dir(tmp_path / "lenet", batching, **fields)
    ports = [str(free_port()) for _ in range(3)]
    serve = ["serve", str(model_dir), "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]]
    for args in (serve, ["inspect", str(model_dir)]):
        result = run_command(*args)
        assert result.returncode == 1, (args, result)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("seldon-caffe: error: "), (args, result.stderr)
        assert message in lines[0]


# -- through the real service: Seldon v1 and V2, REST and gRPC -------------------------


def ask(service: Service, transport: str, x: np.ndarray) -> tuple[int, Any]:
    """One request for `x` over `transport` (rest | grpc) in the service's protocol:
    (HTTP status, the answer as float32 rows, or the error's message). A gRPC status code
    is given as the HTTP status it stands for."""
    if service.protocol == "v2":
        from test_v2 import infer_grpc, infer_rest, output_value, tensor_input

        request = {"inputs": [tensor_input("data", x)]}
        if transport == "rest":
            response = infer_rest(service, "lenet", request)
            if response.status_code != 200:
                return response.status_code, response.text
            answer = response.json()
        else:
            try:
                answer = infer_grpc(service, "lenet", request)
            except grpc.RpcError as error:
                return HTTP_OF_GRPC.get(error.code(), 500), f"{error.code()}: {error.details()}"
        return 200, output_value(answer, "prob").astype(np.float32)
    if transport == "rest":
        response = service.post({"data": {"ndarray": x.tolist()}})
        if response.status_code != 200:
            return response.status_code, response.text
        return 200, np.asarray(response.json()["data"]["ndarray"], dtype=np.float32)
    message = prediction_pb2.SeldonMessage(data=array_to_grpc_datadef("tensor", x))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            reply = prediction_pb2_grpc.ModelStub(channel).Predict(message, timeout=120)
    except grpc.RpcError as error:
        return HTTP_OF_GRPC.get(error.code(), 500), f"{error.code()}: {error.details()}"
    return 200, np.asarray(grpc_datadef_to_array(reply.data), dtype=np.float32)


def batch_size_totals(service: Service) -> tuple[float, float]:
    """(sum, count) of seldon_caffe_batch_size over every process: the rows of the runs that
    answered the requests so far, and how many requests."""
    text = requests.get(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=30).text
    totals = {"seldon_caffe_batch_size_sum": 0.0, "seldon_caffe_batch_size_count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["seldon_caffe_batch_size_sum"], totals["seldon_caffe_batch_size_count"]


CLIENTS = 32


@pytest.mark.e2e
@pytest.mark.parametrize("protocol", ["seldon", "v2"])
def test_32_clients_over_rest_and_grpc_each_get_their_own_unbatched_answer(tmp_path: Path, protocol: str) -> None:
    """32 clients at once, each sending 2 requests of 1-3 rows of its own: every answer equals
    the unbatched one for that client's rows, and the batch_size metric proves runs merged."""
    model_dir = lenet_dir(tmp_path / "lenet", {"max_batch_size": 16, "max_queue_delay_ms": 50})
    payloads = [[images(1 + (client + turn) % 3) for turn in range(2)] for client in range(CLIENTS)]
    with loaded(lenet_dir(tmp_path / "unbatched", None)) as unbatched:
        expected = [[unbatched.answer(x) for x in mine] for mine in payloads]
    args = ("--protocol", "v2") if protocol == "v2" else ()
    with running_service(model_dir, *args, verbose=False) as service:
        if protocol == "v2":  # `serve` raised the threads to max_batch_size: a full batch can gather
            assert f"gRPC :{service.grpc_port}, metrics :{service.metrics_port} (16 threads)" in service.log()
        else:
            assert (
                f"REST :{service.http_port} (1x16 threads), gRPC :{service.grpc_port} (1x16 threads)" in service.log()
            )
        for transport in ("rest", "grpc"):
            rows_before, requests_before = batch_size_totals(service)

            def client(index: int, transport: str = transport) -> None:
                for x, want in zip(payloads[index], expected[index], strict=True):
                    status, answer = ask(service, transport, x)
                    assert status == 200, answer
                    np.testing.assert_array_equal(answer, want)

            run_concurrently(client, CLIENTS)
            rows_after, requests_after = batch_size_totals(service)
            sent_rows = sum(len(x) for mine in payloads for x in mine)
            assert requests_after - requests_before == 2 * CLIENTS
            # Unmerged, each request's run holds its own rows only: the sum is exactly sent_rows.
            assert rows_after - rows_before > sent_rows, f"no merged run over {protocol} {transport}"
        text = requests.get(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=30).text
        for name in ("seldon_caffe_batch_size", "seldon_caffe_queue_depth", "seldon_caffe_queue_seconds"):
            assert name in text, name


# A batch-safe run_model that holds the model until the test creates `release` (each
# process notes that its run began), so requests queue behind it deterministically.
HOLDING_HOOKS = """
import os
import time


def run_model(model, inputs, ctx):
    (ctx.model_dir / f"running-{os.getpid()}").touch()
    while not (ctx.model_dir / "release").exists():
        time.sleep(0.01)
    return model.run(inputs)


run_model.batch_safe = True
"""


@pytest.mark.e2e
@pytest.mark.parametrize("protocol", ["seldon", "v2"])
def test_queue_full_is_503_and_timeout_is_504_over_rest_and_grpc(tmp_path: Path, protocol: str) -> None:
    """A run holds the model; one request waits (max_queue_size 1); the next is refused, 503
    (gRPC UNAVAILABLE); the waiting one gets 504 (DEADLINE_EXCEEDED) after timeout_ms, while the
    run still holds the model. Seldon v1 serves REST and gRPC from separate processes, each with
    its own queue; V2 serves both from one, so there one transport waits and the other is refused."""
    batching = {"max_batch_size": 1, "max_queue_size": 1, "timeout_ms": 2000}
    model_dir = lenet_dir(tmp_path / "lenet", batching, HOLDING_HOOKS)
    if protocol == "v2":
        args, holders, phases = ("--protocol", "v2"), ["rest"], [("rest", "grpc"), ("grpc", "rest")]
    else:
        args, holders, phases = (), ["rest", "grpc"], [("rest", "rest"), ("grpc", "grpc")]
    with running_service(model_dir, *args, verbose=False) as service, ThreadPoolExecutor(4) as pool:
        try:
            held = [pool.submit(ask, service, transport, images(1)) for transport in holders]
            wait_for(lambda: len(list(model_dir.glob("running-*"))) == len(holders), "the held runs to start")
            for waits, refused in phases:
                waiting = pool.submit(ask, service, waits, images(1))
                time.sleep(1.0)  # queued by now (it is answered only after 2 s)
                status, message = ask(service, refused, images(1))
                assert status == 503 and "max_queue_size 1" in message, (refused, status, message)
                status, message = waiting.result(timeout=30)
                assert status == 504 and "timeout_ms 2000" in message, (waits, status, message)
            assert not any(future.done() for future in held)  # every 504 came while the model was held
        finally:
            (model_dir / "release").touch()
        for future in held:
            status, answer = future.result(timeout=60)
            assert status == 200, answer
        for transport in ("rest", "grpc"):  # and the service goes on serving
            assert ask(service, transport, images(2))[0] == 200


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)
