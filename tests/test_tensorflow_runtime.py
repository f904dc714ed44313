"""The tensorflow runtime on real SavedModels that these tests build with Keras and tf.Module.

The SavedModels are built in a subprocess (this file run as a script), and so are the checks
that need a fresh interpreter: whether oneDNN is on is decided once, when TensorFlow is first
imported, so the pytest process must not import TensorFlow before the runtime does. The
expected answers are the Keras model's own, computed by the builder.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers import run_concurrently

from seldon_caffe.config import load_config
from seldon_caffe.errors import BadRequest, ConfigError, ModelLoadError

if importlib.util.find_spec("tensorflow") is None:  # find_spec, not importorskip: no import
    pytest.skip("tensorflow is not installed (pip install -e .[tensorflow])", allow_module_level=True)

# Every test uses the SavedModels the session fixture builds (20 s), and most start subprocesses.
pytestmark = pytest.mark.slow

RTOL, ATOL = 1e-5, 1e-6
HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# -- the models -------------------------------------------------------------------------


def build_models(out: Path) -> None:
    """Write out/vision (Keras, model.export) and out/multi (tf.Module, three signatures)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(7)
    image = keras.Input((8, 8, 3), name="image")
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv")(image)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(h))
    logits = keras.layers.Dense(3, name="logits")(h)
    model = keras.Model(image, {"logits": logits, "probs": keras.layers.Softmax(name="probs")(logits)})
    bn = model.get_layer("bn")
    rng = np.random.default_rng(7)
    bn.set_weights([rng.uniform(0.5, 1.5, 4), rng.normal(0, 0.1, 4), rng.normal(0, 0.1, 4), rng.uniform(0.5, 2, 4)])
    vision = out / "vision"
    model.export(str(vision / "saved_model"), verbose=False)
    _write_yaml(vision, "tf-vision", {"threads": 2})
    x = rng.normal(size=(5, 8, 8, 3)).astype(np.float32)
    answer = model(x, training=False)
    np.savez(
        vision / "expected.npz",
        x=x,
        logits=answer["logits"].numpy(),
        probs=answer["probs"].numpy(),
        **{f"logits_{i}": w for i, w in enumerate(model.get_layer("logits").get_weights())},
        **{f"bn_{i}": w for i, w in enumerate(bn.get_weights())},
    )

    class Multi(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable([1.0, 2.0, 3.0, 4.0], name="scale/w")

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None], tf.int32)])
        def serve(self, x: tf.Tensor, k: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": x * self.w + tf.cast(k, tf.float32)[:, None]}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def greet(self, s: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"greeting": tf.strings.join(["hello ", s])}

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
        def reshape(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"z": tf.reshape(x, [-1, 3])}  # only even batches fit

        @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)])
        def anyrank(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"double": x * 2}

    module = Multi()
    signatures = {name: getattr(module, name) for name in ("greet", "reshape", "anyrank")}
    signatures["serving_default"] = module.serve
    multi = out / "multi"
    tf.saved_model.save(module, str(multi / "saved_model"), signatures=signatures)
    _write_yaml(multi, "tf-multi", {"threads": 2})


def _write_yaml(model_dir: Path, name: str, options: dict) -> None:
    config = {"name": name, "format": "tensorflow", "files": {"saved_model": "saved_model"}, "options": options}
    (model_dir / "model.yaml").write_text(yaml.safe_dump(config))


def run_python(code: str, timeout: float = 300) -> str:
    """Run `code` in a fresh interpreter (TensorFlow not yet imported); return its stdout."""
    path = os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="session")
def tf_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tf_models")
    run_python(
        f"from pathlib import Path; from test_tensorflow_runtime import build_models; build_models(Path({str(out)!r}))"
    )
    return out


def variant(model_dir: Path, where: Path, **options: object) -> Path:
    """A model directory at `where` serving model_dir's SavedModel with other options."""
    config = yaml.safe_load((model_dir / "model.yaml").read_text())
    config["files"] = {"saved_model": str(model_dir / "saved_model")}
    config["options"].update(options)
    where.mkdir(parents=True, exist_ok=True)
    (where / "model.yaml").write_text(yaml.safe_dump(config))
    return where


def load(model_dir: Path):
    from seldon_caffe.runtimes import load_runtime

    return load_runtime(load_config(model_dir))


@pytest.fixture(scope="module")
def vision(tf_models: Path):
    model = load(tf_models / "vision")
    yield model
    model.close()


@pytest.fixture(scope="module")
def expected(tf_models: Path) -> dict[str, np.ndarray]:
    return dict(np.load(tf_models / "vision" / "expected.npz"))


# -- the runtime, in this process (oneDNN on: the default) --------------------------------


def test_signature_and_answers_equal_keras(vision, expected):
    from seldon_caffe.runtimes.tensorflow import onednn_enabled

    assert vision.name == "tensorflow"
    assert onednn_enabled() is True
    assert [s.to_dict() for s in vision.inputs] == [{"name": "image", "dtype": "float32", "shape": [-1, 8, 8, 3]}]
    assert {s.name: s.shape for s in vision.outputs} == {"logits": (-1, 3), "probs": (-1, 3)}
    out = vision.run(expected["x"])
    for name in ("logits", "probs"):
        np.testing.assert_allclose(out[name], expected[name], rtol=RTOL, atol=ATOL)
    only = vision.run({"image": expected["x"][:1]}, outputs=["probs"])
    assert list(only) == ["probs"]
    np.testing.assert_allclose(only["probs"], expected["probs"][:1], rtol=RTOL, atol=ATOL)


def test_concurrent_runs_from_threads(vision, expected):

    def client(i: int) -> None:
        for _ in range(10):
            got = vision.run(expected["x"][i : i + 1])["logits"]
            np.testing.assert_allclose(got, expected["logits"][i : i + 1], rtol=RTOL, atol=ATOL)

    run_concurrently(client, 5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((1, 8, 8), np.float32), "shape [1, 8, 8]; expected image: float32[N, 8, 8, 3]"),
        (np.zeros((1, 7, 8, 3), np.float32), "shape [1, 7, 8, 3]"),
        (np.array([["a"]]), "dtype <U1"),
        ({"img": np.zeros((1, 8, 8, 3), np.float32)}, "unknown input 'img'"),
    ],
)
def test_bad_inputs_are_bad_requests(vision, bad, message):
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        vision.run(bad)


def test_signatures_multiple_inputs_ints_and_strings(tf_models, tmp_path):
    multi = load(tf_models / "multi")
    assert [(s.name, s.dtype) for s in multi.inputs] == [("k", "int32"), ("x", "float32")]
    y = multi.run({"x": [[1.0, 1.0, 1.0, 1.0], [0.5, 0, 0, 2]], "k": [1, 2]})["y"]
    np.testing.assert_array_equal(y, [[2, 3, 4, 5], [2.5, 2, 2, 10]])
    with pytest.raises(BadRequest, match="input 'k' has dtype float64; expected k: int32"):
        multi.run({"x": [[1.0, 1, 1, 1]], "k": [1.5]})

    greet = load(variant(tf_models / "multi", tmp_path / "greet", signature="greet"))
    assert [s.to_dict() for s in greet.inputs] == [{"name": "s", "dtype": "object", "shape": [-1]}]
    assert greet.run(np.array(["ann", "bo"]))["greeting"].tolist() == [b"hello ann", b"hello bo"]

    reshape = load(variant(tf_models / "multi", tmp_path / "reshape", signature="reshape"))
    np.testing.assert_array_equal(reshape.run(np.ones((3, 2), np.float32))["z"], np.ones((2, 3)))
    with pytest.raises(BadRequest, match="the model rejected the input"):
        reshape.run(np.ones((1, 2), np.float32))  # passes the signature, fails inside the graph

    with pytest.raises(ModelLoadError, match="signature input 'x' has no known rank; give its shape in model.yaml"):
        load(variant(tf_models / "multi", tmp_path / "anyrank", signature="anyrank"))
    config = yaml.safe_load((tmp_path / "anyrank" / "model.yaml").read_text())
    config["inputs"] = [{"name": "x", "shape": [-1, 2]}]
    (tmp_path / "anyrank" / "model.yaml").write_text(yaml.safe_dump(config))
    anyrank = load(tmp_path / "anyrank")
    assert [s.shape for s in anyrank.inputs + anyrank.outputs] == [(-1, 2), ()]
    np.testing.assert_array_equal(anyrank.run([[1.0, 2.0]])["double"], [[2.0, 4.0]])

    with pytest.raises(ConfigError, match="options.signature': .* has no signature 'nope'; it has .*greet"):
        load(variant(tf_models / "multi", tmp_path / "nope", signature="nope"))


def test_get_and_set_weights_by_layer(tf_models, expected):
    model = load(tf_models / "vision")
    for layer, count in (("logits", 2), ("bn", 4)):
        got = model.get_weights(layer)
        assert len(got) == count
        for i, array in enumerate(got):
            np.testing.assert_array_equal(array, expected[f"{layer}_{i}"])
    kernel, bias = model.get_weights("logits")
    model.set_weights("logits", [kernel, bias + 1.0])
    np.testing.assert_allclose(model.run(expected["x"])["logits"], expected["logits"] + 1.0, rtol=RTOL, atol=ATOL)
    with pytest.raises(BadRequest, match="no layer 'nope'.*layers: bn, conv, logits"):
        model.get_weights("nope")
    with pytest.raises(BadRequest, match=r"got an array of shape \[2\]; expected \[4, 3\] float32, \[3\] float32"):
        model.set_weights("logits", [kernel, bias[:2]])
    with pytest.raises(BadRequest, match="has 2 arrays"):
        model.set_weights("logits", [kernel])
    model.close()


def test_thread_pools_are_per_process(tf_models, tmp_path, vision):
    # `vision` started TensorFlow's pools with threads: 2 (intra_op 2, inter_op 1).
    with pytest.raises(ModelLoadError, match="intra_op=1, inter_op=1: TensorFlow's thread pools are already"):
        load(variant(tf_models / "vision", tmp_path, intra_op=1))
    same = load(variant(tf_models / "vision", tmp_path / "same", intra_op=2, inter_op=1))
    assert same.run(np.zeros((1, 8, 8, 3), np.float32))["probs"].shape == (1, 3)


@pytest.mark.parametrize(
    "options, field, message",
    [
        ({"intra_op": -1}, "intra_op", "-1 is not an integer >= 0"),
        ({"inter_op": "two"}, "inter_op", "'two' is not an integer"),
        ({"onednn": "yes"}, "onednn", "'yes' is not true, false or auto"),
        ({"omp_num_threads": 0}, "omp_num_threads", "0 is not an integer >= 1"),
        ({"kmp_blocktime": 1.5}, "kmp_blocktime", "1.5 is not an integer"),
        ({"kmp_affinity": 3}, "kmp_affinity", "not a KMP_AFFINITY string"),
        ({"kmp_settings": "on"}, "kmp_settings", "not true or false"),
        ({"signature": 5}, "signature", "not a signature name"),
        ({"tags": [1]}, "tags", "not a list of SavedModel tags"),
        ({"precision": "bf16"}, "precision", "allowed: fp32"),
    ],
)
def test_options_are_validated(tf_models, tmp_path, options, field, message):
    from seldon_caffe.runtimes.tensorflow import TensorFlowOptions

    config = load_config(variant(tf_models / "vision", tmp_path, **options))
    with pytest.raises(ConfigError, match=rf"model.yaml: field 'options.{field}': .*{message}"):
        TensorFlowOptions.from_config(config)


def test_defaults_and_environment(tf_models, tmp_path):
    from seldon_caffe.runtimes.tensorflow import TensorFlowOptions

    config = load_config(variant(tf_models / "vision", tmp_path, threads=3, omp_num_threads=3))
    options = TensorFlowOptions.from_config(config)
    assert (options.signature, options.intra_op, options.inter_op, options.onednn) == ("serving_default", 3, 1, True)
    assert options.environment() == {"TF_ENABLE_ONEDNN_OPTS": "1", "OMP_NUM_THREADS": "3"}
    typo = load_config(variant(tf_models / "vision", tmp_path / "typo", intra_ops=2))
    with pytest.raises(
        ConfigError, match="field 'options.intra_ops': not an option of runtime tensorflow; did you mean intra_op"
    ):
        TensorFlowOptions.from_config(typo)
    auto = TensorFlowOptions.from_config(load_config(variant(tf_models / "vision", tmp_path / "auto", onednn="auto")))
    assert auto.environment() == {}  # TensorFlow's own choice for this CPU


# -- a fresh interpreter: oneDNN off, the OpenMP knobs, and the import-order error ----------


def test_onednn_off_import_order_and_fork(tf_models, tmp_path):
    off = variant(
        tf_models / "vision",
        tmp_path / "off",
        onednn=False,
        omp_num_threads=1,
        kmp_blocktime=0,
        kmp_affinity="granularity=fine,compact,1,0",
        kmp_settings=True,
    )
    out = run_python(f"""
        import json, os
        import numpy as np
        from seldon_caffe.config import load_config
        from seldon_caffe.errors import ModelLoadError
        from seldon_caffe.runtimes import load_runtime
        from seldon_caffe.runtimes.tensorflow import onednn_enabled

        model = load_runtime(load_config({str(off)!r}))
        expected = np.load({str(tf_models / "vision" / "expected.npz")!r})
        diff = float(np.max(np.abs(model.run(expected["x"])["logits"] - expected["logits"])))
        env = {{k: os.environ.get(k) for k in
               ("TF_ENABLE_ONEDNN_OPTS", "OMP_NUM_THREADS", "KMP_BLOCKTIME", "KMP_AFFINITY", "KMP_SETTINGS")}}
        try:
            load_runtime(load_config({str(tf_models / "vision")!r}))  # default: oneDNN on
            error = None
        except ModelLoadError as exc:
            error = str(exc)
        read, write = os.pipe()
        child = os.fork()  # a forked worker must refuse TensorFlow, not hang on its first run
        if child == 0:
            try:
                load_runtime(load_config({str(off)!r}))
                message = "loaded"
            except ModelLoadError as exc:
                message = str(exc)
            os.write(write, message.encode())
            os._exit(0)
        os.waitpid(child, 0)
        forked = os.read(read, 4096).decode()
        print(json.dumps({{"onednn": onednn_enabled(), "diff": diff, "env": env, "error": error, "forked": forked}}))
    """)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["onednn"] is False
    assert result["diff"] <= ATOL + RTOL * 10
    assert result["env"] == {
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "OMP_NUM_THREADS": "1",
        "KMP_BLOCKTIME": "0",
        "KMP_AFFINITY": "granularity=fine,compact,1,0",
        "KMP_SETTINGS": "1",
    }
    assert "options.onednn asks for oneDNN on, but TensorFlow was already imported" in result["error"]
    assert "set options.onednn: false" in result["error"]
    assert "was forked from it: TensorFlow's thread pools do not survive fork()" in result["forked"]


# -- through the real microservice ------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tf_models: Path):
    from service import running_service

    with running_service(tf_models / "vision") as service:
        yield service


def _json_data(response: Any) -> dict[str, np.ndarray]:
    if not isinstance(response, dict):  # gRPC: a SeldonMessage whose jsonData is a protobuf Struct
        from google.protobuf.json_format import MessageToDict

        response = MessageToDict(response)
    return {name: np.asarray(value, dtype=np.float32) for name, value in response["jsonData"].items()}


@pytest.mark.e2e
@pytest.mark.parametrize("transport", ["rest", "grpc"])
@pytest.mark.parametrize("payload_type", ["ndarray", "tensor"])
def test_service_answers_equal_keras(served, expected, transport, payload_type):
    result = served.client(transport).microservice(data=expected["x"], method="predict", payload_type=payload_type)
    assert result.success, result.msg
    got = _json_data(result.response)
    for name in ("logits", "probs"):
        np.testing.assert_allclose(got[name], expected[name], rtol=RTOL, atol=ATOL)


@pytest.mark.e2e
def test_service_bindata_npy_and_runtime_tag(served, expected):
    buffer = io.BytesIO()
    np.save(buffer, expected["x"][:2])
    response = served.post({"binData": base64.b64encode(buffer.getvalue()).decode()})
    assert response.status_code == 200, response.text
    with np.load(io.BytesIO(base64.b64decode(response.json()["binData"]))) as answer:  # binary in, .npz out
        np.testing.assert_allclose(answer["probs"], expected["probs"][:2], rtol=RTOL, atol=ATOL)
    assert response.json()["meta"]["tags"]["runtime"] == "tensorflow"


@pytest.mark.e2e
@pytest.mark.parametrize(
    "data, fragment",
    [
        (np.zeros((1, 8, 8)).tolist(), "shape [1, 8, 8]; expected image: float32[N, 8, 8, 3]"),
        ([[[["a", "b", "c"]] * 8] * 8], "expected image: float32[N, 8, 8, 3]"),
    ],
    ids=["shape", "dtype"],
)
def test_service_bad_request_is_400(served, expected, data, fragment):
    response = served.post({"data": {"ndarray": data}})
    assert response.status_code == 400, response.text
    assert fragment in response.json()["status"]["info"]
    assert served.post({"data": {"ndarray": expected["x"][:1].tolist()}}).status_code == 200


@pytest.mark.e2e
def test_service_grpc_bad_shape_is_an_error_status(served):
    result = served.client("grpc").microservice(data=np.zeros((1, 8, 8, 4)), method="predict", payload_type="tensor")
    assert not result.success
    assert "shape [1, 8, 8, 4]; expected image: float32[N, 8, 8, 3]" in result.msg


# -- config.txt beside model.yaml: the same names in every runtime -----------------------------


def described_dirs(tf_models: Path, where: Path) -> tuple[Path, Path]:
    """The vision SavedModel with a config.txt, served by tensorflow, and (converted) by onnxruntime."""
    from test_convert_frameworks import saved_model_cli_names

    saved_model = tf_models / "vision" / "saved_model"
    printed = saved_model_cli_names(saved_model)  # the spellings a user copies into config.txt
    description = {
        "batch_size": 8,
        "input": [{"name": "pixels", "data_type": "float32", "dims": [-1, 8, 8, 3], "node_name": printed["image"]}],
        "output": [
            {"name": "scores", "data_type": "float32", "dims": [-1, 3], "node_name": printed["logits"]},
            {"name": "p", "data_type": "float32", "dims": [-1, 3], "node_name": "probs"},
        ],
    }
    tf_dir = variant(tf_models / "vision", where / "tensorflow")
    (tf_dir / "config.txt").write_text(json.dumps(description))
    onnx_dir = where / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "config.txt").write_text(json.dumps(description))
    convert = [sys.executable, "-m", "seldon_caffe.cli", "convert", "tensorflow", str(saved_model)]
    convert += ["--config", str(onnx_dir / "config.txt"), "-o", str(onnx_dir / "model.onnx")]
    done = subprocess.run(convert, capture_output=True, text=True, timeout=600)  # TensorFlow stays out of here
    assert done.returncode == 0, done.stderr[-4000:]
    (onnx_dir / "model.yaml").write_text("format: onnx\nfiles: {onnx: model.onnx}\nruntime: onnxruntime\n")
    return tf_dir, onnx_dir


@pytest.mark.e2e
def test_config_txt_names_are_the_same_in_tensorflow_and_onnxruntime(tf_models, tmp_path, expected):
    from service import running_service

    tf_dir, onnx_dir = described_dirs(tf_models, tmp_path)
    answers = {}
    for model_dir in (tf_dir, onnx_dir):
        with running_service(model_dir) as service:
            response = service.post({"data": {"ndarray": expected["x"].tolist()}})
            assert response.status_code == 200, response.text
            answers[model_dir.name] = _json_data(response.json())
    assert sorted(answers["tensorflow"]) == sorted(answers["onnx"]) == ["p", "scores"]  # Seldon sorts JSON keys
    for name, source in (("scores", "logits"), ("p", "probs")):
        for answer in answers.values():
            np.testing.assert_allclose(answer[name], expected[source], rtol=1e-4, atol=1e-5)

    model = load(tf_dir)  # in this process: the model object a hook sees has the same names
    assert [s.name for s in model.inputs] == ["pixels"] and [s.name for s in model.outputs] == ["scores", "p"]
    np.testing.assert_allclose(model.run({"pixels": expected["x"]}, outputs=["p"])["p"], expected["probs"], RTOL, ATOL)


def test_config_txt_node_name_the_signature_lacks(tf_models, tmp_path):
    model_dir = variant(tf_models / "vision", tmp_path)
    description = {
        "input": [{"name": "pixels", "data_type": "float32", "dims": [-1, 8, 8, 3], "node_name": "input_1:0"}],
        "output": [{"name": "p", "data_type": "float32", "dims": [-1, 3], "node_name": "probs"}],
    }
    (model_dir / "config.txt").write_text(json.dumps(description))
    with pytest.raises(ModelLoadError) as error:
        load(model_dir)
    assert str(error.value).startswith(f"{model_dir / 'config.txt'}: input 'pixels': node_name 'input_1:0' is not")
    assert "its inputs are image (serving_default_image:0)" in str(error.value)
