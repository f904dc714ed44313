"""The torch runtime on small real models: TorchScript, ExportedProgram, config.txt, the service.

The models are built here with torch (random weights, fixed seed) and saved the way a user
would save them; the oracle is the same nn.Module run eagerly by torch itself.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import run_concurrently

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e .[torch])")

from seldon_caffe.config import load_config  # noqa: E402
from seldon_caffe.errors import BadRequest, ConfigError, ModelLoadError  # noqa: E402
from seldon_caffe.model import SeldonCaffeModel  # noqa: E402
from seldon_caffe.runtimes import load_runtime  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
SHAPE = (3, 16, 16)
IMAGES = np.random.default_rng(3).normal(size=(4, *SHAPE)).astype(np.float32)
CNN_INPUTS = [{"name": "image", "dtype": "float32", "shape": [-1, *SHAPE]}]


class SmallCNN(torch.nn.Module):
    """conv-bn-relu-pool, conv-bn-relu, global pool, linear: a torchvision classifier in miniature."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class Pair(torch.nn.Module):
    """Two inputs of any shape that must match, two outputs: a tuple."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, a * b


class Named(torch.nn.Module):
    """The same, answering with a dict."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": a + b, "prod": a * b}


def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    net = SmallCNN()
    for layer in net.modules():  # running statistics other than 0/1, so BatchNorm matters
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    return net.eval()


def write_dir(where: Path, model: Path, *, config_txt: dict | None = None, **fields: object) -> Path:
    """A model directory serving `model` (an absolute path) with model.yaml `fields`."""
    where.mkdir(parents=True, exist_ok=True)
    config = {"name": where.name, "format": "torch", "files": {"torchscript": str(model)}, "runtime": "torch"}
    config.update({k: v for k, v in fields.items() if v is not None})
    (where / "model.yaml").write_text(yaml.safe_dump(config))
    if config_txt is not None:
        (where / "config.txt").write_text(json.dumps(config_txt))
    return where


def load(model_dir: Path):
    return load_runtime(load_config(model_dir))


@pytest.fixture(scope="module")
def net() -> SmallCNN:
    return small_cnn()


def reference(net: SmallCNN, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, net: SmallCNN) -> Path:
    """model.pt (traced CNN), model.pt2 (exported CNN, any batch), pair.pt, named.pt."""
    out = tmp_path_factory.mktemp("torch_models")
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit.* says it is deprecated (pytest restores filters)
    example = torch.from_numpy(IMAGES[:2])
    torch.jit.save(torch.jit.trace(net, example), out / "model.pt")
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes={"x": {0: batch}}), out / "model.pt2")
    pair = (torch.ones(2, 3), torch.ones(2, 3))
    torch.jit.save(torch.jit.script(Pair()), out / "pair.pt")
    torch.jit.save(torch.jit.trace(Named(), pair, strict=False), out / "named.pt")
    return out


@pytest.fixture(scope="module")
def cnn_dir(files: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dir(tmp_path_factory.mktemp("served") / "cnn", files / "model.pt", inputs=CNN_INPUTS)


@pytest.fixture(scope="module")
def cnn(cnn_dir: Path):
    with load(cnn_dir) as model:
        yield model


# -- in this process ------------------------------------------------------------------


def test_torchscript_answers_equal_torch(cnn, net):
    assert cnn.name == "torch"
    assert [s.to_dict() for s in cnn.inputs] == CNN_INPUTS
    assert [s.to_dict() for s in cnn.outputs] == [{"name": "o", "dtype": "float32", "shape": [-1, 5]}]
    for batch in (1, 4):
        got = cnn.run(IMAGES[:batch])
        assert list(got) == ["o"] and got["o"].dtype == np.float32
        np.testing.assert_allclose(got["o"], reference(net, IMAGES[:batch]), rtol=RTOL, atol=ATOL)


def test_signature_from_config_txt(files, net, tmp_path):
    description = {
        "batch_size": 4,
        "input": [{"name": "pixels", "data_type": "TYPE_FP32", "dims": [-1, *SHAPE]}],
        "output": [{"name": "scores", "data_type": "FP32", "dims": [-1, 5]}],
    }
    model_dir = write_dir(tmp_path / "described", files / "model.pt", config_txt=description)
    model = load(model_dir)
    assert [s.to_dict() for s in model.inputs] == [{"name": "pixels", "dtype": "float32", "shape": [-1, *SHAPE]}]
    assert [s.to_dict() for s in model.outputs] == [{"name": "scores", "dtype": "float32", "shape": [-1, 5]}]
    np.testing.assert_allclose(model.run({"pixels": IMAGES})["scores"], reference(net, IMAGES), rtol=RTOL, atol=ATOL)
    with pytest.raises(BadRequest, match=r"input 'pixels' has batch 5; \S*config.txt allows up to 4"):
        model.run(np.concatenate([IMAGES, IMAGES[:1]]))
    served = SeldonCaffeModel(str(model_dir))  # the Seldon user-model object: hooks, then the runtime
    served.load()
    np.testing.assert_allclose(served.predict(IMAGES[:2]), reference(net, IMAGES[:2]), rtol=RTOL, atol=ATOL)
    assert served.init_metadata()["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, *SHAPE]}]


def test_exported_program_with_any_batch(files, net, tmp_path):
    model = load(write_dir(tmp_path / "exported", files / "model.pt2"))  # the signature is the program's
    assert [s.to_dict() for s in model.inputs] == [{"name": "x", "dtype": "float32", "shape": [-1, *SHAPE]}]
    assert [s.to_dict() for s in model.outputs] == [{"name": "o", "dtype": "float32", "shape": [-1, 5]}]
    for batch in (1, 3):
        np.testing.assert_allclose(model.run(IMAGES[:batch])["o"], reference(net, IMAGES[:batch]), rtol=RTOL, atol=ATOL)
    with pytest.raises(BadRequest, match=r"the model rejected the input: Guard failed: x.size\(\)\[0\] <= 64"):
        model.run(np.zeros((65, *SHAPE), np.float32))  # within the signature, beyond the exported range
    renamed = load(write_dir(tmp_path / "renamed", files / "model.pt2", inputs=CNN_INPUTS))
    assert renamed.inputs[0].name == "image"
    np.testing.assert_allclose(renamed.run({"image": IMAGES})["o"], reference(net, IMAGES), rtol=RTOL, atol=ATOL)


def test_tuple_and_dict_outputs(files, tmp_path):
    inputs = [{"name": "a", "shape": [-1, -1]}, {"name": "b", "shape": [-1, -1]}]
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.full((2, 3), 2, np.float32)
    pair = load(write_dir(tmp_path / "pair", files / "pair.pt", inputs=inputs))
    assert [s.to_dict() for s in pair.outputs] == [
        {"name": "o0", "dtype": "float32", "shape": [-1, -1]},
        {"name": "o1", "dtype": "float32", "shape": [-1, -1]},
    ]
    got = pair.run({"a": a, "b": b})
    np.testing.assert_array_equal(got["o0"], a + b)
    np.testing.assert_array_equal(got["o1"], a * b)
    assert list(pair.run({"a": a, "b": b}, outputs=["o1"])) == ["o1"]

    named = load(write_dir(tmp_path / "named", files / "named.pt", inputs=inputs))
    assert [s.name for s in named.outputs] == ["sum", "prod"]
    np.testing.assert_array_equal(named.run({"a": a, "b": b})["prod"], a * b)

    described = {  # config.txt picks a dict's entries by node_name
        "input": [{"name": n, "data_type": "float32", "dims": [-1, 3]} for n in ("a", "b")],
        "output": [{"name": "product", "data_type": "float32", "dims": [-1, 3], "node_name": "prod"}],
    }
    product = load(write_dir(tmp_path / "described", files / "named.pt", config_txt=described))
    assert [s.name for s in product.outputs] == ["product"]
    np.testing.assert_array_equal(product.run({"a": a, "b": b})["product"], a * b)

    renamed = [{"name": "total"}, {"name": "product", "dtype": "float64"}]  # in order, one dtype changed
    pair = load(write_dir(tmp_path / "renamed", files / "pair.pt", inputs=inputs, outputs=renamed))
    got = pair.run({"a": a, "b": b})
    assert got["product"].dtype == np.float64
    np.testing.assert_array_equal(got["total"], a + b)
    with pytest.raises(ModelLoadError, match="field 'outputs': 1 entries, but the model has 2 .o0, o1."):
        load(write_dir(tmp_path / "short", files / "pair.pt", inputs=inputs, outputs=[{"name": "only"}]))


def test_forward_error_on_a_valid_signature_is_a_bad_request(files, tmp_path):
    inputs = [{"name": "a", "shape": [-1, -1]}, {"name": "b", "shape": [-1, -1]}]
    pair = load(write_dir(tmp_path / "pair", files / "pair.pt", inputs=inputs))
    with pytest.raises(BadRequest, match=r"the model rejected the input: The size of tensor a \(3\) must match"):
        pair.run({"a": np.ones((1, 3), np.float32), "b": np.ones((1, 2), np.float32)})


def test_channels_last_and_bf16_on_cpu(files, net, tmp_path):
    model = load(write_dir(tmp_path / "cl", files / "model.pt", inputs=CNN_INPUTS, options={"channels_last": True}))
    np.testing.assert_allclose(model.run(IMAGES)["o"], reference(net, IMAGES), rtol=RTOL, atol=ATOL)
    bf16 = load(write_dir(tmp_path / "bf16", files / "model.pt", inputs=CNN_INPUTS, options={"precision": "bf16"}))
    assert bf16.outputs[0].dtype == "float32"
    got = bf16.run(IMAGES)["o"]
    assert got.dtype == np.float32  # the client never sees bf16
    np.testing.assert_allclose(got, reference(net, IMAGES), rtol=0.1, atol=0.05)


def test_concurrent_runs_from_threads(cnn, net):
    want = reference(net, IMAGES)

    def client(i: int) -> None:
        for _ in range(10):
            np.testing.assert_allclose(cnn.run(IMAGES[i : i + 1])["o"], want[i : i + 1], rtol=RTOL, atol=ATOL)

    run_concurrently(client, 4)


# -- what stops start-up --------------------------------------------------------------


@pytest.mark.parametrize(
    "options, field, message",
    [
        ({"precision": "fp16"}, "precision", "fp16 needs device cuda"),
        ({"precision": "int8"}, "precision", "int8: .*no int8 path; .*onnxruntime or openvino"),
        ({"cuda_graphs": True}, "cuda_graphs", "CUDA graphs need device cuda"),
        ({"channels_last": "yes"}, "channels_last", "'yes' is not true or false"),
    ],
)
def test_options_are_validated(files, tmp_path, options, field, message):
    model_dir = write_dir(tmp_path / "m", files / "model.pt", inputs=CNN_INPUTS, options=options)
    with pytest.raises(ConfigError, match=rf"model.yaml: field 'options.{field}': {message}"):
        load(model_dir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: device cuda loads")
def test_cuda_without_a_gpu_is_a_clear_load_error(files, tmp_path):
    model_dir = write_dir(tmp_path / "m", files / "model.pt", inputs=CNN_INPUTS, options={"device": "cuda"})
    with pytest.raises(ModelLoadError, match=r"options.device 'cuda': torch.cuda.is_available\(\) is false"):
        load(model_dir)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (torch.cuda.is_available() is false)")
@pytest.mark.parametrize("fmt", ["model.pt", "model.pt2"])
def test_cuda_fp16_channels_last_graphs(files, net, tmp_path, fmt):
    options = {"device": "cuda", "precision": "fp16", "channels_last": True, "cuda_graphs": True}
    model = load(write_dir(tmp_path / "gpu", files / fmt, inputs=CNN_INPUTS, options=options))
    assert model.outputs[0].dtype == "float32"
    want = reference(net, IMAGES)
    for _ in range(2):  # the first call per shape captures its graph, the second replays it
        for batch in (1, 4):
            got = model.run(IMAGES[:batch])["o"]
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want[:batch], rtol=2e-2, atol=2e-2)

    def client(i: int) -> None:
        for _ in range(20):  # threads share a graph's static buffers: each must still get its own answer
            np.testing.assert_allclose(model.run(IMAGES[i : i + 1])["o"], want[i : i + 1], rtol=2e-2, atol=2e-2)

    run_concurrently(client, 4)
    model.close()


def test_files_that_are_not_models(files, net, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match=r"junk.pt: not a TorchScript archive .* or an ExportedProgram"):
        load(write_dir(tmp_path / "junk", tmp_path / "junk.pt", inputs=CNN_INPUTS))
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ModelLoadError, match=r"weights.pt: a torch.save\(\) checkpoint .*torch.export.save"):
        load(write_dir(tmp_path / "weights", tmp_path / "weights.pt", inputs=CNN_INPUTS))


def test_signature_missing_or_wrong(files, tmp_path):
    with pytest.raises(
        ModelLoadError, match=r"records no input names or shapes; add them to .*model.yaml .*inputs: \["
    ):
        load(write_dir(tmp_path / "bare", files / "model.pt"))
    with pytest.raises(ModelLoadError, match=r"field 'inputs\[0\].shape': required"):
        load(write_dir(tmp_path / "noshape", files / "model.pt", inputs=[{"name": "image"}]))
    wrong = [{"name": "image", "shape": [-1, 4, 16, 16]}]  # 4 channels: the first conv wants 3
    with pytest.raises(ModelLoadError, match=r"warm-up run on zeros \(image\[1, 4, 16, 16\]\) failed on cpu"):
        load(write_dir(tmp_path / "wrong", files / "model.pt", inputs=wrong))


# -- through the real microservice ----------------------------------------------------


@pytest.fixture(scope="module")
def served(cnn_dir: Path):
    from service import running_service

    with running_service(cnn_dir) as service:
        yield service


@pytest.mark.e2e
@pytest.mark.parametrize("batch", [1, 4])
def test_service_rest_answers_equal_torch(served, net, batch):
    response = served.post({"data": {"ndarray": IMAGES[:batch].tolist()}})
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["data"]["ndarray"], dtype=np.float32)
    np.testing.assert_allclose(got, reference(net, IMAGES[:batch]), rtol=RTOL, atol=ATOL)
    assert response.json()["meta"]["tags"]["runtime"] == "torch"


@pytest.mark.e2e
def test_service_metadata(served):
    import requests

    meta = requests.get(served.url + "/api/v1.0/metadata", timeout=30).json()
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, *SHAPE]}]
    assert meta["outputs"] == [{"name": "o", "datatype": "FP32", "shape": [-1, 5]}]


@pytest.mark.e2e
def test_service_grpc_answers_equal_torch(served, net):
    from seldon_core.utils import grpc_datadef_to_array

    result = served.client("grpc").microservice(data=IMAGES, method="predict", payload_type="tensor")
    assert result.success, result.msg
    got = np.asarray(grpc_datadef_to_array(result.response.data), dtype=np.float32)
    np.testing.assert_allclose(got, reference(net, IMAGES), rtol=RTOL, atol=ATOL)


@pytest.mark.e2e
def test_service_bad_shape_is_400(served):
    response = served.post({"data": {"ndarray": np.zeros((1, 3, 8, 8)).tolist()}})
    assert response.status_code == 400, response.text
    assert "shape [1, 3, 8, 8]; expected image: float32[N, 3, 16, 16]" in response.json()["status"]["info"]
    assert served.post({"data": {"ndarray": IMAGES[:1].tolist()}}).status_code == 200


@pytest.mark.e2e
def test_service_serves_an_exported_program(files, net, tmp_path):
    # The server's process has TensorFlow loaded (seldon_core imports it when installed), in
    # which running an ExportedProgram would load OpenAI Triton and crash, were it not kept out.
    from service import running_service

    model_dir = write_dir(tmp_path / "pt2", files / "model.pt2", inputs=CNN_INPUTS)
    with running_service(model_dir) as service:
        response = service.post({"data": {"ndarray": IMAGES[:3].tolist()}})
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["data"]["ndarray"], dtype=np.float32)
    np.testing.assert_allclose(got, reference(net, IMAGES[:3]), rtol=RTOL, atol=ATOL)
