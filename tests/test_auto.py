"""`runtime: auto` for Caffe: the fastest faithful engine, measured at load and cached
(seldon_caffe/runtimes/auto.py), and `inspect --accuracy` (seldon_caffe/accuracy.py).

Real engines throughout: the example nets are served by OpenCV, ONNX Runtime and OpenVINO
as installed; the one test that needs real Caffe compares auto's answer with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import EXAMPLES, ZOO, copy_model

from caffe_oracle import reference
from seldon_caffe.config import load_config
from seldon_caffe.faithfulness import worst_relative_error
from seldon_caffe.runtimes import auto as auto_module
from seldon_caffe.runtimes import load_runtime, resolve_runtime
from seldon_caffe.runtimes.auto import cached_choice, load_fastest

ENGINES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "opencv": "cv2"}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's cache is this test's own: a choice made elsewhere must not leak in. (Real
    Caffe's root, which lives in the user's cache by default, stays where it is.)"""
    monkeypatch.setenv("SELDON_CAFFE_REFERENCE_ROOT", str(reference.default_root()))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _needs_all_engines() -> None:
    for module in ENGINES.values():
        pytest.importorskip(module, reason="auto's choice among three engines needs all three installed")


def _example(tmp_path: Path, name: str = "vision", **options: object) -> Path:
    model_dir = copy_model(EXAMPLES / name, tmp_path / name)
    if options:
        config = yaml.safe_load((model_dir / "model.yaml").read_text())
        config["options"] = {**(config.get("options") or {}), **options}
        (model_dir / "model.yaml").write_text(yaml.safe_dump(config))
    return model_dir


def _counting_loader(loaded: list[str]):
    from seldon_caffe.runtimes import _load_named

    def load(config, name):
        loaded.append(name)
        return _load_named(config, name)

    return load


def test_auto_measures_every_engine_serves_the_fastest_and_caches_the_choice(tmp_path: Path) -> None:
    _needs_all_engines()
    model_dir = _example(tmp_path)
    config = load_config(model_dir)
    assert cached_choice(config) is None
    loaded: list[str] = []
    runtime = load_fastest(config, _counting_loader(loaded))
    try:
        choice = cached_choice(config)
        assert choice is not None and choice.cached
        assert sorted(loaded) == sorted(ENGINES) and sorted(choice.timings_ms) == sorted(ENGINES)
        assert runtime.name == choice.runtime == min(choice.timings_ms, key=choice.timings_ms.get)
        assert all(ms > 0 for ms in choice.timings_ms.values()) and choice.batch == 1
        assert choice.excluded == {}
        x = np.random.default_rng(1).random((2, 1, 8, 8), dtype=np.float32)
        with load_runtime(dataclasses.replace(config, runtime="onnxruntime")) as other:
            np.testing.assert_allclose(runtime.run(x)["prob"], other.run(x)["prob"], rtol=1e-4, atol=1e-6)
    finally:
        runtime.close()
    (cache_file,) = (model_dir / ".cache" / "auto").glob("*.json")
    assert json.loads(cache_file.read_text())["runtime"] == choice.runtime

    # The second start: the winner alone, nothing measured.
    loaded.clear()
    load_fastest(load_config(model_dir), _counting_loader(loaded)).close()
    assert loaded == [choice.runtime]
    assert resolve_runtime(load_config(model_dir)) == choice.runtime


class _Paced:
    """A stand-in engine for the timing rule alone (real engines are too noisy to order on
    purpose): `warm_ms` per call back to back, `cold_ms` for a call after another engine ran."""

    def __init__(self, warm_ms: float, cold_ms: float) -> None:
        self.warm_s, self.cold_s, self.calls, self._last = warm_ms / 1000, cold_ms / 1000, 0, 0.0

    def run(self, feed: dict) -> None:
        back_to_back = time.perf_counter() - self._last < 0.001
        time.sleep(self.warm_s if back_to_back else self.cold_s)
        self.calls, self._last = self.calls + 1, time.perf_counter()


def test_timing_runs_calls_back_to_back_and_stops_timing_a_clear_loser() -> None:
    # slow_to_wake is the fastest under load but the slowest on a call after a pause, as
    # OpenVINO measured on AlexNet: one call per engine per round would not pick it.
    engines = {"steady": _Paced(2.6, 2.6), "slow_to_wake": _Paced(2, 12), "clear_loser": _Paced(12, 12)}
    timings = auto_module._time(engines, {})  # type: ignore[arg-type]
    assert min(timings, key=timings.__getitem__) == "slow_to_wake"
    assert timings["slow_to_wake"] < 2.5 < timings["steady"] < 4
    block_s = auto_module.TIMING_BUDGET_S / (auto_module.MAX_ROUNDS * len(engines))
    # the loser ran one block; the close contender at least MIN_ROUNDS
    assert engines["clear_loser"].calls <= auto_module.WARMUP_RUNS + block_s / 0.012 + 1
    assert engines["steady"].calls > auto_module.WARMUP_RUNS + 1.5 * block_s / 0.0026


def test_other_options_or_batch_size_measure_again(tmp_path: Path) -> None:
    _needs_all_engines()
    model_dir = _example(tmp_path)
    load_runtime(load_config(model_dir)).close()
    first = cached_choice(load_config(model_dir))
    config = yaml.safe_load((model_dir / "model.yaml").read_text())
    config["batching"] = {"max_batch_size": 8}
    (model_dir / "model.yaml").write_text(yaml.safe_dump(config))
    assert cached_choice(load_config(model_dir)) is None  # batch 8 is another measurement
    load_runtime(load_config(model_dir)).close()
    second = cached_choice(load_config(model_dir))
    assert first is not None and second is not None and (first.batch, second.batch) == (1, 8)
    assert len(list((model_dir / ".cache" / "auto").glob("*.json"))) == 2


def test_auto_never_serves_a_lower_precision_and_skips_engines_that_cannot_run_it(tmp_path: Path) -> None:
    _needs_all_engines()
    model_dir = _example(tmp_path, precision="bf16")
    config = load_config(model_dir)
    runtime = load_runtime(config)
    try:
        assert runtime.name == "openvino"
        choice = cached_choice(config)
        assert choice is not None and "precision bf16" in choice.excluded["opencv"]
        assert "onnxruntime" in choice.excluded  # bf16 is OpenVINO's alone
    finally:
        runtime.close()


def _excluded_without_timing(model_dir: Path, prototxt: str) -> str:
    """Serve `prototxt` (random weights) with runtime auto; opencv must not even be loaded.
    Returns why auto left opencv out, after checking that a faster engine was chosen."""
    from seldon_caffe.caffe import load_caffe_net
    from seldon_caffe.weights import fill_random_weights

    model_dir.mkdir()
    (model_dir / "deploy.prototxt").write_text(prototxt)
    net = load_caffe_net(model_dir / "deploy.prototxt")
    fill_random_weights(net)
    (model_dir / "weights.caffemodel").write_bytes(net.caffemodel_bytes())
    (model_dir / "model.yaml").write_text(
        "format: caffe\nruntime: auto\nfiles: {prototxt: deploy.prototxt, weights: weights.caffemodel}\n"
    )
    config = load_config(model_dir)
    loaded: list[str] = []
    load_fastest(config, _counting_loader(loaded)).close()
    choice = cached_choice(config)
    assert "opencv" not in loaded and choice is not None
    assert choice.runtime in ("onnxruntime", "openvino")
    return choice.excluded["opencv"]


def test_an_engine_with_a_known_gap_is_not_a_candidate(tmp_path: Path) -> None:
    """LRN with k != 1 is a gap of OpenCV's (gaps.py): auto must not even time it."""
    _needs_all_engines()
    prototxt = (
        'name: "lrn"\ninput: "data"\ninput_shape { dim: 1 dim: 4 dim: 5 dim: 5 }\n'
        'layer { name: "norm" type: "LRN" bottom: "data" top: "norm" lrn_param { local_size: 3 k: 2 } }\n'
    )
    assert "LRN" in _excluded_without_timing(tmp_path / "lrn", prototxt)


def test_only_engines_that_run_every_layer_are_candidates(tmp_path: Path) -> None:
    """A fork layer OpenCV's importer lacks (SegNet's BN): auto never loads opencv for the net."""
    _needs_all_engines()
    prototxt = (
        'name: "bn"\n'
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 6 dim: 6 } } }\n'
        'layer { name: "bn" type: "BN" bottom: "data" top: "bn" bn_param { bn_mode: INFERENCE } }\n'
    )
    assert "BN" in _excluded_without_timing(tmp_path / "bn", prototxt)


def test_hooks_that_change_weights_keep_an_engine_that_can(tmp_path: Path) -> None:
    """dl_inference's "change weights from a request parameter, then run": auto must not
    serve such hooks with an engine whose set_weights raises."""
    _needs_all_engines()
    hooks = "def run_model(model, inputs, ctx):\n    model.set_weights('ip1', model.get_weights('ip1'))\n"
    model_dir = copy_model(EXAMPLES / "vision", tmp_path / "vision", hooks=hooks)
    config = load_config(model_dir)
    with load_runtime(config) as runtime:
        assert runtime.name == "opencv"
        runtime.set_weights("ip1", runtime.get_weights("ip1"))
    choice = cached_choice(config)
    assert choice is not None
    for engine in ("onnxruntime", "openvino"):
        assert "calls get_weights / set_weights" in choice.excluded[engine]


def test_an_engine_that_answers_differently_is_dropped(tmp_path: Path) -> None:
    """Two real engines, one of them given other weights: the one that disagrees with the
    most trusted engine is closed and not served."""
    _needs_all_engines()
    config = load_config(_example(tmp_path, "vision"))
    trusted = load_runtime(dataclasses.replace(config, runtime="onnxruntime"))
    wrong = load_runtime(dataclasses.replace(config, runtime="opencv"))
    weight, bias = wrong.get_weights("conv1")
    wrong.set_weights("conv1", [weight * 1.01, bias])  # a slightly different net, same shapes
    loaded = {"onnxruntime": trusted, "opencv": wrong}
    excluded: dict[str, str] = {}
    feed = {"data": np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)}
    try:
        auto_module._drop_unfaithful(config, loaded, feed, excluded)
        assert list(loaded) == ["onnxruntime"]
        assert excluded["opencv"].startswith("differs from onnxruntime by")
    finally:
        trusted.close()
        wrong.close()


def test_a_model_directory_we_cannot_write_caches_in_the_users_cache(tmp_path: Path) -> None:
    """As a read-only volume would, a `.cache` that is a file stops every write there (and,
    unlike chmod, it stops root too)."""
    _needs_all_engines()
    model_dir = _example(tmp_path)
    (model_dir / ".cache").write_text("not a directory")
    load_runtime(load_config(model_dir)).close()
    (stored,) = (tmp_path / "xdg" / "seldon-caffe" / "auto").glob("*.json")
    assert cached_choice(load_config(model_dir)).runtime == json.loads(stored.read_text())["runtime"]
    assert (model_dir / ".cache").read_text() == "not a directory"


def test_inspect_shows_the_choice_and_its_timings(tmp_path: Path) -> None:
    _needs_all_engines()
    model_dir = _example(tmp_path)
    out = _cli("inspect", str(model_dir))
    choice = cached_choice(load_config(model_dir))
    assert choice is not None
    assert f"runtime   {choice.runtime} (model.yaml: auto)" in out
    assert f"fastest at batch 1: {choice.runtime}" in out
    info = json.loads(_cli("inspect", str(model_dir), "--json"))
    assert info["auto"]["runtime"] == choice.runtime and set(info["auto"]["timings_ms"]) == set(ENGINES)


def test_inspect_accuracy_compares_bf16_and_int8_with_fp32_on_the_users_samples(tmp_path: Path) -> None:
    _needs_all_engines()
    model_dir = _example(tmp_path)
    samples = tmp_path / "samples"
    samples.mkdir()
    for image in (EXAMPLES / "vision" / "samples").glob("digit_*"):
        (samples / image.name).write_bytes(image.read_bytes())  # payloads: through the preprocess hook
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(samples / f"input_{i}.npy", rng.random((1, 8, 8), dtype=np.float32))  # model inputs
    out = _cli("inspect", str(model_dir), "--accuracy", str(samples))
    assert "on 6 samples" in out
    (bf16,) = [line for line in out.splitlines() if line.strip().startswith("bf16")]
    assert "openvino" in bf16 and "prob: top-1" in bf16 and "max rel err" in bf16
    (int8,) = [line for line in out.splitlines() if line.strip().startswith("int8")]
    assert "not measured" in int8 and "seldon-caffe quantize" in int8  # how to make the INT8 model

    # With the INT8 model made, int8 is measured too.
    from seldon_caffe.caffe.to_onnx import convert_files
    from seldon_caffe.quantize import quantize_model

    fp32 = tmp_path / "model.onnx"
    convert_files(model_dir / "deploy.prototxt", model_dir / "weights.caffemodel", fp32, progress=False)
    calibration = [{"data": rng.random((1, 1, 8, 8), dtype=np.float32)} for _ in range(8)]
    quantize_model(fp32, model_dir / "weights.int8.onnx", calibration)
    report = json.loads(_cli("inspect", str(model_dir), "--accuracy", str(samples), "--json"))["accuracy"]
    variants = {v["precision"]: v for v in report["variants"]}
    assert report["samples"] == 6 and report["reference"]["precision"] == "fp32"
    assert not variants["int8"]["unavailable"]
    assert 0 <= variants["int8"]["outputs"]["prob"]["top1_agreement"] <= 1
    assert variants["int8"]["outputs"]["prob"]["relative_error"] > 0  # int8 is not fp32


def test_inspect_accuracy_names_a_sample_the_model_cannot_take(tmp_path: Path) -> None:
    model_dir = _example(tmp_path)
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "note.txt").write_text("not an image")
    result = subprocess.run(
        [sys.executable, "-m", "seldon_caffe.cli", "inspect", str(model_dir), "--accuracy", str(samples)],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_CACHE_HOME": os.environ["XDG_CACHE_HOME"]},
    )
    assert result.returncode != 0
    assert "note.txt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.reference
def test_auto_answers_like_real_caffe_on_a_zoo_net(tmp_path: Path) -> None:
    _needs_all_engines()
    if reference.unavailable_reason():
        pytest.skip(reference.unavailable_reason())
    model_dir = tmp_path / "squeezenet"
    model_dir.mkdir()
    (model_dir / "deploy.prototxt").write_bytes((ZOO / "squeezenet_v1_1.prototxt").read_bytes())
    reference.make_weights(model_dir / "deploy.prototxt", model_dir / "weights.caffemodel", seed=4)
    (model_dir / "model.yaml").write_text(
        "name: squeezenet\nformat: caffe\nruntime: auto\n"
        "files: {prototxt: deploy.prototxt, weights: weights.caffemodel}\n"
    )
    x = np.random.default_rng(2).random((2, 3, 227, 227), dtype=np.float32)
    want = reference.forward(model_dir / "deploy.prototxt", model_dir / "weights.caffemodel", {"data": x})
    with load_runtime(load_config(model_dir)) as runtime:
        got = runtime.run(x)
    assert worst_relative_error(got, want) <= 1e-4


def _cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "seldon_caffe.cli", *args], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
