"""`convert tensorflow` and `convert torch`: SavedModels and PyTorch files with a config.txt become
ONNX models that serve through the onnxruntime runtime, in the real microservice, and answer
like the framework they came from (1e-4 relative, the Caffe conformance measure).

TensorFlow runs only in subprocesses here (the command itself, and a fresh interpreter that
builds the Keras model): the tensorflow runtime's tests need this process free of it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from service import running_service

from seldon_caffe.faithfulness import relative_error

TOLERANCE = 1e-4
# TensorFlow and tf2onnx: a SavedModel built, converted and run in subprocesses, 10-30 s a test.
pytestmark = pytest.mark.slow
HAVE_TF = all(importlib.util.find_spec(m) for m in ("tensorflow", "tf2onnx"))
needs_tf = pytest.mark.skipif(not HAVE_TF, reason="needs tensorflow and tf2onnx (pip install seldon-caffe[tensorflow])")


def seldon_caffe(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "seldon_caffe.cli", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def onnx_model_dir(onnx: Path, where: Path) -> Path:
    where.mkdir()
    (where / "model.onnx").write_bytes(onnx.read_bytes())
    (where / "model.yaml").write_text("format: onnx\nfiles: {onnx: model.onnx}\nruntime: onnxruntime\n")
    return where


def served_answer(model_dir: Path, batch: np.ndarray) -> np.ndarray:
    with running_service(model_dir) as service:
        response = service.post({"data": {"ndarray": batch.tolist()}})
        assert response.status_code == 200, response.text
        return np.asarray(response.json()["data"]["ndarray"], dtype=np.float32)


def write_config(path: Path, batch_size: int, inputs: list, outputs: list) -> Path:
    path.write_text(json.dumps({"batch_size": batch_size, "input": inputs, "output": outputs}, indent=2))
    return path


# -- TensorFlow ------------------------------------------------------------------------------

KERAS_MODEL = """
    import numpy as np, keras, sys
    from pathlib import Path
    out = Path(sys.argv[1])
    keras.utils.set_random_seed(0)
    image = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(image)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    probs = keras.layers.Dense(5, activation="softmax", name="probs")(x)
    model = keras.Model(image, probs)
    model.export(str(out / "saved_model"))
    batch = np.random.default_rng(1).standard_normal((3, 12, 12, 3)).astype("float32")
    np.save(out / "x.npy", batch)
    np.save(out / "y.npy", model.predict(batch, verbose=0))
"""


@pytest.fixture(scope="module")
def keras_saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_TF:
        pytest.skip("needs tensorflow and tf2onnx (pip install seldon-caffe[tensorflow])")
    out = tmp_path_factory.mktemp("keras")
    script = textwrap.dedent(KERAS_MODEL)
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, capture_output=True, timeout=600)
    return out


def convert_keras(
    keras_saved_model: Path,
    tmp_path: Path,
    inputs: list,
    outputs: list,
    *,
    batch_size: int = 8,
    output: Path | None = None,
    check: bool = True,
    config_name: str = "config.txt",
) -> subprocess.CompletedProcess:
    """`seldon-caffe convert tensorflow` on the Keras SavedModel, with a config.txt of `inputs` and `outputs`."""
    config = write_config(tmp_path / config_name, batch_size, inputs, outputs)
    saved_model, output = keras_saved_model / "saved_model", output or tmp_path / "m.onnx"
    return seldon_caffe("convert", "tensorflow", saved_model, "--config", config, "-o", output, check=check)


@pytest.mark.e2e
@needs_tf
def test_keras_saved_model_converts_and_serves_like_keras(keras_saved_model, tmp_path):
    onnx = tmp_path / "model.onnx"
    result = convert_keras(
        keras_saved_model,
        tmp_path,
        [{"name": "pixels", "data_type": "float", "dims": [-1, 12, 12, 3], "node_name": "image:0"}],
        [{"name": "scores", "data_type": "float", "dims": [-1, 5], "node_name": "output_0"}],
        output=onnx,
    )
    assert f"wrote {onnx}" in result.stdout
    assert "max error against TensorFlow on random inputs, relative: scores" in result.stdout

    import onnx as onnx_lib

    graph = onnx_lib.load(str(onnx)).graph
    assert [i.name for i in graph.input] == ["pixels"] and [o.name for o in graph.output] == ["scores"]
    assert not graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")  # the batch stays dynamic

    batch, keras_answer = np.load(keras_saved_model / "x.npy"), np.load(keras_saved_model / "y.npy")
    served = served_answer(onnx_model_dir(onnx, tmp_path / "served"), batch)
    assert relative_error(served, keras_answer) < TOLERANCE


@needs_tf
def test_an_output_inside_the_graph_cuts_the_model_there(keras_saved_model, tmp_path):
    # dl_inference's config.txt named graph tensors; any tensor of the frozen signature works.
    onnx = tmp_path / "cut.onnx"
    result = convert_keras(
        keras_saved_model,
        tmp_path,
        [{"name": "pixels", "data_type": "float32", "dims": [2, 12, 12, 3], "node_name": "image"}],
        [{"name": "features", "data_type": "float32", "dims": [2, 8], "node_name": _gap_tensor(keras_saved_model)}],
        batch_size=0,
        output=onnx,
    )
    assert "features" in result.stdout

    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["features"] and session.get_inputs()[0].shape == [2, 12, 12, 3]


def _gap_tensor(keras_saved_model: Path) -> str:
    """The global-average-pooling tensor's name in the frozen graph (Keras versions name scopes differently)."""
    code = textwrap.dedent(
        """
        import sys
        from tf2onnx import tf_loader
        graph_def = tf_loader.from_saved_model(sys.argv[1], None, None, "serve", ["serving_default"])[0]
        print(next(n.name for n in graph_def.node if "gap" in n.name and n.op == "Mean") + ":0")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(keras_saved_model / "saved_model")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def saved_model_cli_names(saved_model: Path) -> dict[str, str]:
    """{signature key: tensor name} as `saved_model_cli show --all` prints them: what users copy."""
    cli = Path(sys.executable).with_name("saved_model_cli")
    shown = subprocess.run(
        [cli, "show", "--dir", saved_model, "--all"], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    signature = shown[shown.index("signature_def['serving_default']") :]
    keys = re.findall(r"(?:inputs|outputs)\['([^']+)'\] tensor_info:", signature)
    names = re.findall(r"^\s+name: (\S+)$", signature, re.MULTILINE)
    return dict(zip(keys, names, strict=False))


@needs_tf
@pytest.mark.parametrize("with_index", [True, False], ids=["as-printed", "without-:0"])
def test_the_names_saved_model_cli_prints_convert(keras_saved_model, tmp_path, with_index):
    # docs/convert.md sends users to saved_model_cli; Keras 3 prints serving_default_image:0
    # for the input and StatefulPartitionedCall_1:0 for the output.
    printed = saved_model_cli_names(keras_saved_model / "saved_model")
    assert printed["image"] == "serving_default_image:0" and printed["output_0"].startswith("StatefulPartitionedCall")
    spell = (lambda name: name) if with_index else (lambda name: name.removesuffix(":0"))
    onnx = tmp_path / "model.onnx"
    convert_keras(
        keras_saved_model,
        tmp_path,
        [{"name": "pixels", "data_type": "float32", "dims": [-1, 12, 12, 3], "node_name": spell(printed["image"])}],
        [{"name": "scores", "data_type": "float32", "dims": [-1, 5], "node_name": spell(printed["output_0"])}],
        output=onnx,
    )
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    batch, keras_answer = np.load(keras_saved_model / "x.npy"), np.load(keras_saved_model / "y.npy")
    (scores,) = session.run(["scores"], {"pixels": batch})
    assert relative_error(scores, keras_answer) < TOLERANCE


@needs_tf
def test_unknown_node_name_lists_the_signature_and_names_the_file(keras_saved_model, tmp_path):
    # input_1:0 was Keras 2's name, and the old docs' example: a Keras 3 export has no such tensor.
    result = convert_keras(
        keras_saved_model,
        tmp_path,
        [{"name": "x", "data_type": "float32", "dims": [-1, 12, 12, 3], "node_name": "input_1:0"}],
        [{"name": "y", "data_type": "float32", "dims": [-1, 5], "node_name": "output_0"}],
        check=False,
        config_name="resnet.json",
    )
    assert result.returncode == 1
    assert f"{tmp_path / 'resnet.json'}: input 'x': node_name 'input_1:0' is not in signature 'serving_default'" in (
        result.stderr
    )
    assert "its inputs are image (serving_default_image:0)" in result.stderr


@needs_tf
def test_wrong_data_type_in_config_is_named(keras_saved_model, tmp_path):
    result = convert_keras(
        keras_saved_model,
        tmp_path,
        [{"name": "x", "data_type": "int64", "dims": [-1, 12, 12, 3], "node_name": "image"}],
        [{"name": "y", "data_type": "float32", "dims": [-1, 5], "node_name": "output_0"}],
        check=False,
        config_name="description.json",
    )
    assert result.returncode == 1
    assert "description.json: input 'x' is int64, but the model's is float32; fix its data_type" in result.stderr


def test_not_a_saved_model(tmp_path):
    config = write_config(
        tmp_path / "config.txt",
        0,
        [{"name": "x", "data_type": "float32", "dims": [1]}],
        [{"name": "y", "data_type": "float32", "dims": [1]}],
    )
    result = seldon_caffe("convert", "tensorflow", tmp_path, "--config", config, "-o", tmp_path / "m.onnx", check=False)
    assert result.returncode == 1 and "not a SavedModel directory (no saved_model.pb in it)" in result.stderr
