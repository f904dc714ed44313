"""The pieces behind the service, in process: model.yaml, hooks, the model class, the command."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from helpers import REPO, copy_model

from seldon_caffe.cli import main
from seldon_caffe.config import load_config
from seldon_caffe.errors import BadRequest, ConfigError, HookError, ModelUnavailable
from seldon_caffe.hooks import Context, Hooks
from seldon_caffe.model import SeldonCaffeModel, SeldonError
from seldon_caffe.runtimes import load_runtime

IMAGES = np.random.default_rng(3).random((3, 1, 28, 28), dtype=np.float32)


# -- model.yaml ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "yaml, fragments",
    [
        ("format: caffe\nfiles: {prototxt: deploy.prototxt, weights: weights.caffemodel}\nthreads: 2\n",
         ["field 'threads'", "unknown field", "options"]),
        ("format: keras\n", ["field 'format'", "'keras'", "caffe, onnx"]),
        ("files: {prototxt: deploy.prototxt}\n", ["field 'files.weights'", "required for format caffe"]),
        ("files: {prototxt: nope.prototxt, weights: weights.caffemodel}\n",
         ["files.prototxt", "nope.prototxt does not exist"]),
        ("files: {prototxt: deploy.prototxt, weights: weights.caffemodel}\nruntime: tensorflow\n",
         ["field 'runtime'", "cannot serve format caffe", "pycaffe, opencv"]),
        ("files: {prototxt: deploy.prototxt, weights: weights.caffemodel}\noptions: {threads: 0}\n",
         ["options.threads", "positive integer"]),
        ("files: {prototxt: deploy.prototxt, weights: weights.caffemodel}\noptions: {device: gpu}\n",
         ["options.device", "cpu, cuda, cuda:N"]),
        ("files: {prototxt: deploy.prototxt, weights: weights.caffemodel}\noptions: {precision: fp8}\n",
         ["options.precision", "fp32, fp16, bf16, int8"]),
        ("files: {prototxt: deploy.prototxt, weights: weights.caffemodel}\noptions: {pycaffe_command: python}\n",
         ["options.pycaffe_command", "list of strings"]),
        ("files: [a, b\n", ["not valid YAML"]),
    ],
    ids=["unknown-field", "format", "missing-file-key", "missing-file", "runtime", "threads", "device", "precision",
         "pycaffe-command", "yaml-syntax"],
)  # fmt: skip
def test_config_errors_name_file_field_and_allowed(tmp_path, lenet_example, yaml, fragments):
    model_dir = copy_model(lenet_example, tmp_path / "m", yaml=yaml)
    with pytest.raises(ConfigError) as caught:
        load_config(model_dir)
    message = str(caught.value)
    assert str(model_dir / "model.yaml") in message
    for fragment in fragments:
        assert fragment in message, message


def test_config_defaults(lenet_example):
    config = load_config(lenet_example)
    assert (config.name, config.format, config.runtime) == ("lenet", "caffe", "auto")
    assert config.options["precision"] == "fp32" and config.options["device"] == "cpu"
    assert config.hooks == lenet_example.resolve() / "hooks.py"
    assert load_config(lenet_example, runtime="opencv").runtime == "opencv"


def test_signature_override(tmp_path, lenet_example):
    yaml = (lenet_example / "model.yaml").read_text() + "inputs: [{name: data, shape: [4, 1, 28, 28]}]\n"
    with load_runtime(load_config(copy_model(lenet_example, tmp_path / "m", yaml=yaml))) as model:
        assert model.inputs[0].shape == (4, 1, 28, 28)
        with pytest.raises(BadRequest, match=r"shape \[3, 1, 28, 28\]"):
            model.run(IMAGES)


# -- hooks -----------------------------------------------------------------------------------


def write_hooks(tmp_path, source):
    path = tmp_path / "hooks.py"
    path.write_text(source)
    return Hooks(path)


def context(tmp_path, lenet_example):
    return Context(model_dir=tmp_path, config=load_config(lenet_example), meta={"tags": {"k": 1}})


def test_hooks_get_ctx_or_kwargs(tmp_path, lenet_example):
    hooks = write_hooks(
        tmp_path,
        "def preprocess(x, ctx):\n    return (x, ctx.tags['k'])\n"
        "def postprocess(x, **kwargs):\n    return (x, sorted(kwargs))\n",
    )
    ctx = context(tmp_path, lenet_example)
    assert hooks.preprocess("p", ctx) == ("p", 1)
    value, keys = hooks.postprocess("o", ctx)
    assert value == "o" and {"meta", "tags", "state", "config", "model_dir", "names", "logger"} <= set(keys)
    assert sorted(hooks.user) == ["postprocess", "preprocess"]


def test_hook_exception_names_the_hook(tmp_path, lenet_example):
    hooks = write_hooks(tmp_path, "def postprocess(x, ctx):\n    return 1 / 0\n")
    with pytest.raises(HookError, match=r"hook postprocess in hooks.py raised ZeroDivisionError"):
        hooks.postprocess({}, context(tmp_path, lenet_example))


def test_broken_hooks_file_fails_load(tmp_path, lenet_example):
    model_dir = copy_model(lenet_example, tmp_path / "m", hooks="import no_such_module_here\n")
    with pytest.raises(Exception, match="importing the hooks failed: ModuleNotFoundError"):
        SeldonCaffeModel(str(model_dir)).load()


def test_default_preprocess_npz_and_rejects(tmp_path, lenet_example):
    hooks = Hooks(None)
    ctx = context(tmp_path, lenet_example)
    buffer = io.BytesIO()
    np.savez(buffer, a=np.ones(2), b=np.zeros(3))
    decoded = hooks.preprocess(buffer.getvalue(), ctx)
    assert set(decoded) == {"a", "b"}
    with pytest.raises(BadRequest, match="got strData"):
        hooks.preprocess("text", ctx)


# -- the model class ---------------------------------------------------------------------------


def test_not_ready_until_loaded(lenet_example):
    served = SeldonCaffeModel(str(lenet_example))
    with pytest.raises(SeldonError) as caught:
        served.health_status()
    assert caught.value.status_code == 503 and "not loaded yet" in caught.value.message
    with pytest.raises(SeldonError) as caught:
        served.predict(IMAGES, [])
    assert isinstance(caught.value.__cause__, ModelUnavailable)
    served.load()
    assert served.health_status()["status"] == "ready"


def test_model_dir_from_environment(monkeypatch, lenet_example):
    monkeypatch.setenv("SELDON_CAFFE_MODEL_DIR", str(lenet_example))
    assert SeldonCaffeModel().model_dir == lenet_example
    monkeypatch.delenv("SELDON_CAFFE_MODEL_DIR")
    assert str(SeldonCaffeModel().model_dir) == "/mnt/models"


def test_concurrent_runs_match_serial(lenet_example):
    with load_runtime(load_config(lenet_example)) as model:
        want = [model.run(IMAGES[i : i + 1])["prob"] for i in range(3)]
        results: dict[int, np.ndarray] = {}

        def work(i):
            for _ in range(20):
                results[i] = model.run(IMAGES[i : i + 1])["prob"]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for i in range(3):
            np.testing.assert_allclose(results[i], want[i], rtol=1e-6)


def test_get_set_weights_round_trip(lenet_example):
    with load_runtime(load_config(lenet_example, runtime="opencv")) as model:
        before = model.run(IMAGES)["prob"]
        weights = model.get_weights("ip2")
        assert [w.shape for w in weights] == [(10, 500), (10,)]
        model.set_weights("ip2", [np.zeros_like(w) for w in weights])
        np.testing.assert_allclose(model.run(IMAGES)["prob"], 0.1, rtol=1e-6)
        model.set_weights("ip2", weights)
        np.testing.assert_allclose(model.run(IMAGES)["prob"], before, rtol=1e-6)


def test_opencv_weights_of_a_layer_it_lacks_are_a_bad_request(tmp_path, lenet_example):
    """As on pycaffe and tensorflow: a layer the net lacks, or arrays of the wrong shape, are
    the caller's mistake (400), not the server's (500)."""
    with load_runtime(load_config(lenet_example, runtime="opencv")) as model:
        with pytest.raises(BadRequest, match="no layer with weights named 'nope'.*ip2") as caught:
            model.get_weights("nope")
        assert caught.value.status == 400
        with pytest.raises(BadRequest, match="no layer with weights named 'relu1'"):
            model.set_weights("relu1", [])
        weights = model.get_weights("ip2")
        with pytest.raises(BadRequest, match=r"array 1 must have shape \[10\], got \[3\]"):
            model.set_weights("ip2", [weights[0], np.zeros(3)])
        np.testing.assert_array_equal(model.get_weights("ip2")[1], weights[1])  # left as it was

    hooks = "def run_model(model, inputs, ctx):\n    return {'w': model.get_weights(ctx.tags['layer'])[0]}\n"
    served = SeldonCaffeModel(str(copy_model(lenet_example, tmp_path / "m", hooks=hooks)), runtime="opencv")
    served.load()
    assert np.shape(served.predict(IMAGES, [], meta={"tags": {"layer": "ip2"}})) == (10, 500)  # the one output
    with pytest.raises(SeldonError) as caught:
        served.predict(IMAGES, [], meta={"tags": {"layer": "nope"}})
    assert caught.value.status_code == 400 and "no layer with weights named 'nope'" in caught.value.message


# -- the command ---------------------------------------------------------------------------------


def test_predict_command(tmp_path, lenet_example, capsys):
    model_dir = copy_model(lenet_example, tmp_path / "m")
    (model_dir / "hooks.py").unlink()
    assert main(["predict", str(model_dir), "--data", json.dumps(IMAGES[:1].tolist())]) == 0
    answer = json.loads(capsys.readouterr().out)
    with load_runtime(load_config(model_dir)) as model:
        want = model.run(IMAGES[:1])["prob"]
    np.testing.assert_allclose(answer["data"]["ndarray"], want, rtol=1e-5)
    npy = tmp_path / "x.npy"
    np.save(npy, IMAGES[:1])
    assert main(["predict", str(model_dir), "--file", str(npy)]) == 0
    assert main(["predict", str(model_dir), "--data", "[[1, 2]]"]) == 1
    assert "expected data: float32[N, 1, 28, 28]" in capsys.readouterr().err


def test_predict_traceback_shows_where_a_hook_failed(tmp_path, lenet_example, capsys):
    hooks = (REPO / "tests" / "data" / "serving_hooks.py").read_text()
    model_dir = copy_model(lenet_example, tmp_path / "m", hooks=hooks)
    request = json.dumps({"data": {"ndarray": IMAGES[:1].tolist()}, "meta": {"tags": {"raise": "RuntimeError"}}})
    assert main(["predict", str(model_dir), "--data", request]) == 1
    plain = capsys.readouterr().err
    assert plain.strip().splitlines() == [
        "seldon-caffe: error: hook preprocess in hooks.py raised RuntimeError: asked to fail"
    ]
    assert main(["predict", str(model_dir), "--data", request, "--traceback"]) == 1
    shown = capsys.readouterr().err
    assert "Traceback (most recent call last)" in shown and 'raise RuntimeError("asked to fail")' in shown
    assert shown.rstrip().endswith(
        "seldon-caffe: error: hook preprocess in hooks.py raised RuntimeError: asked to fail"
    )


@pytest.mark.slow
def test_predict_command_with_image_hooks(lenet_example):
    image = REPO / "examples" / "lenet" / "sample.png"
    result = subprocess.run(
        [sys.executable, "-m", "seldon_caffe.cli", "predict", str(lenet_example), "--file", str(image)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    top3 = json.loads(result.stdout)["jsonData"]["predictions"][0]
    assert len(top3) == 3 and top3[0]["probability"] >= top3[1]["probability"] >= top3[2]["probability"]


def test_inspect_command(lenet_example, capsys):
    assert main(["inspect", str(lenet_example)]) == 0
    out = capsys.readouterr().out
    assert "input     data: float32[N, 1, 28, 28]" in out and "output    prob: float32[N, 10]" in out
    assert "hooks     postprocess, preprocess" in out
    assert main(["inspect", str(lenet_example), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["runtime"] in ("opencv", "pycaffe", "onnxruntime", "openvino")  # auto's choice here
    assert info["inputs"][0]["shape"] == [-1, 1, 28, 28]
