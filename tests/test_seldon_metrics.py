"""The v1 metrics store (seldon_caffe/seldon_metrics.py) against seldon-core's own SeldonMetrics:
the same updates give the same shared entry and the same Prometheus text; threads lose nothing."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

pytest.importorskip("seldon_core", reason="the v1 metrics store extends seldon-core's")

from seldon_core.metrics import SeldonMetrics

from seldon_caffe.seldon_metrics import metrics_store


def _request(rng: np.random.Generator) -> list[dict]:
    """What one request reports: stage timers (ms), batch rows, queue depth, a counter."""
    metrics: list[dict] = [
        {"type": "TIMER", "key": f"seldon_caffe_{stage}_seconds", "value": float(rng.exponential(20))}
        for stage in ("preprocess", "run_model", "postprocess")
    ]
    metrics += [
        {"type": "TIMER", "key": "seldon_caffe_batch_size", "value": 1000.0 * int(rng.integers(1, 17))},
        {"type": "TIMER", "key": "edge", "value": float(rng.choice([0.0, 1.0, 30_000.0, 1e9]))},  # bin edges, inf
        {"type": "GAUGE", "key": "seldon_caffe_queue_depth", "value": int(rng.integers(0, 5))},
        {"type": "COUNTER", "key": "requests", "value": 1, "tags": {"model": "m"}},
    ]
    return metrics


def _exposed(store: SeldonMetrics) -> str:
    return store.generate_metrics()[0].replace(f'"{os.getpid()}"', '"PID"')


def test_the_same_updates_give_seldon_cores_entry_and_exposition() -> None:
    ours, theirs = metrics_store(), SeldonMetrics(worker_id_func=os.getpid)
    for store in (ours, theirs):
        rng = np.random.default_rng(7)
        for _ in range(200):
            store.update(_request(rng), "predict")
        store.update([{"type": "COUNTER", "key": "requests", "value": 2, "tags": {"model": "m"}}], "feedback")
    mine, want = dict(ours.data)[os.getpid()], dict(theirs.data)[os.getpid()]
    assert mine.keys() == want.keys()
    for key, item in want.items():
        assert mine[key]["tags"] == item["tags"]
        if key[0] == "TIMER":
            np.testing.assert_array_equal(mine[key]["value"][0], item["value"][0])
            assert mine[key]["value"][1] == pytest.approx(item["value"][1], rel=1e-12)
        else:
            assert mine[key]["value"] == item["value"]
    assert _exposed(ours) == _exposed(theirs)


def test_threads_updating_at_once_lose_nothing() -> None:
    store = metrics_store()
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(50):
            store.update([{"type": "COUNTER", "key": "n", "value": 1}, {"type": "TIMER", "key": "t", "value": 5}], "p")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entry = dict(store.data)[os.getpid()]
    (counter,) = [item for key, item in entry.items() if key[0] == "COUNTER"]
    (timer,) = [item for key, item in entry.items() if key[0] == "TIMER"]
    assert counter["value"] == 400 and sum(timer["value"][0]) == 400


def test_clear_starts_the_entry_again_and_a_forked_server_keeps_its_own() -> None:
    store = metrics_store()
    store.update([{"type": "COUNTER", "key": "n", "value": 3}], "p")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a forked server: its entry is its own pid's, starting empty
        try:
            store.update([{"type": "COUNTER", "key": "n", "value": 1}], "p")
            value = next(item["value"] for item in dict(store.data)[os.getpid()].values())
            os.write(write, str(value).encode())
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    assert os.read(read, 16) == b"1"
    assert next(item["value"] for item in dict(store.data)[os.getpid()].values()) == 3
    store.clear()
    assert os.getpid() not in dict(store.data)
    store.update([{"type": "COUNTER", "key": "n", "value": 1}], "p")
    assert next(item["value"] for item in dict(store.data)[os.getpid()].values()) == 1
