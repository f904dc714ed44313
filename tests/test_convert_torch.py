"""`convert torch`: every way a PyTorch model is shipped becomes ONNX that answers like PyTorch;
a torchvision model serves through the onnxruntime runtime in the real microservice."""

from __future__ import annotations

import numpy as np
import pytest
from test_convert_frameworks import TOLERANCE, onnx_model_dir, relative_error, seldon_caffe, served_answer, write_config

torch = pytest.importorskip("torch", reason="needs torch (pip install seldon-caffe[torch])")

from seldon_caffe.convert.check import ConversionMismatch, check_conversion  # noqa: E402
from seldon_caffe.convert.torch import load_torch_model, torch_to_onnx  # noqa: E402
from seldon_caffe.engines.description import load_description  # noqa: E402
from seldon_caffe.errors import SeldonCaffeError  # noqa: E402

IMAGE = [{"name": "image", "data_type": "float32", "dims": [-1, 3, 32, 32]}]


class TwoHeads(torch.nn.Module):
    """Two outputs, returned as a tuple: config.txt names them in that order."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)
        )
        self.head = torch.nn.Linear(6, 4)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(image).flatten(1)
        return torch.softmax(self.head(features), dim=1), features


@pytest.fixture
def two_heads(tmp_path):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    outputs = [
        {"name": "probs", "data_type": "float32", "dims": [-1, 4]},
        {"name": "features", "data_type": "float32", "dims": [-1, 6]},
    ]
    return model, load_description(write_config(tmp_path / "config.txt", 16, IMAGE, outputs))


def _check_onnx(onnx, model, batch: int = 5) -> None:
    import onnxruntime as ort

    x = np.random.default_rng(3).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x})
    with torch.inference_mode():
        want = model(torch.from_numpy(x))
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w.numpy()) < TOLERANCE


def test_torchscript_exports_with_dynamic_batch(two_heads, tmp_path):
    model, description = two_heads
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, 32, 32)), str(path))
    loaded = load_torch_model(path)
    assert isinstance(loaded, torch.jit.ScriptModule)
    errors = torch_to_onnx(loaded, description, tmp_path / "m.onnx")
    assert [e.name for e in errors] == ["probs", "features"] and max(e.relative for e in errors) < TOLERANCE
    _check_onnx(tmp_path / "m.onnx", model, batch=5)  # a batch size the export never saw


@pytest.mark.slow
def test_exported_program_and_whole_pickle(two_heads, tmp_path, capsys):
    model, description = two_heads
    program = torch.export.export(model, (torch.zeros(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    torch_to_onnx(load_torch_model(tmp_path / "model.pt2"), description, tmp_path / "ep.onnx")
    _check_onnx(tmp_path / "ep.onnx", model)

    torch.save(model, str(tmp_path / "whole.pt"))  # a pickled module: loads, with a warning
    whole = load_torch_model(tmp_path / "whole.pt")
    assert "is a pickled module: loading it runs code stored in the file" in capsys.readouterr().err
    torch_to_onnx(whole, description, tmp_path / "p.onnx")
    _check_onnx(tmp_path / "p.onnx", model)


@pytest.mark.slow
def test_torchvision_state_dict_converts_and_serves_like_torch(tmp_path):
    torchvision = pytest.importorskip("torchvision", reason="needs torchvision (pip install seldon-caffe[torchvision])")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1000).eval()
    torch.save(model.state_dict(), str(tmp_path / "resnet18.pth"))
    config = write_config(
        tmp_path / "config.txt",
        32,
        [{"name": "i", "data_type": "float32", "dims": [-1, 3, 64, 64]}],
        [{"name": "o", "data_type": "float32", "dims": [-1, 1000]}],
    )
    onnx = tmp_path / "resnet18.onnx"
    result = seldon_caffe(
        "convert",
        "torch",
        tmp_path / "resnet18.pth",
        "--class",
        "torchvision.models:resnet18",
        "--config",
        config,
        "-o",
        onnx,
    )
    assert "max error against PyTorch on random inputs, relative: o" in result.stdout

    batch = np.random.default_rng(7).standard_normal((3, 3, 64, 64)).astype(np.float32)
    with torch.inference_mode():
        want = model(torch.from_numpy(batch)).numpy()
    served = served_answer(onnx_model_dir(onnx, tmp_path / "served"), batch)
    assert relative_error(served, want) < TOLERANCE


def test_loading_mistakes_say_what_to_do(two_heads, tmp_path):
    model, description = two_heads
    torch.save(model.state_dict(), str(tmp_path / "weights.pth"))
    with pytest.raises(SeldonCaffeError, match="holds a state_dict .*pass --class MODULE:NAME"):
        load_torch_model(tmp_path / "weights.pth")
    with pytest.raises(SeldonCaffeError, match="does not fit torch.nn:Identity"):
        load_torch_model(tmp_path / "weights.pth", "torch.nn:Identity")
    with pytest.raises(SeldonCaffeError, match="expected MODULE:NAME"):
        load_torch_model(tmp_path / "weights.pth", "torchvision.models.resnet18")
    with pytest.raises(SeldonCaffeError, match="cannot import no_such_module"):
        load_torch_model(tmp_path / "weights.pth", "no_such_module:Net")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(SeldonCaffeError, match="not a PyTorch file"):
        load_torch_model(tmp_path / "notes.txt")


def test_outputs_config_does_not_describe_are_an_error(two_heads, tmp_path):
    model, _ = two_heads
    one_output = load_description(
        write_config(tmp_path / "one.txt", 16, IMAGE, [{"name": "probs", "data_type": "float32", "dims": [-1, 4]}])
    )
    with pytest.raises(SeldonCaffeError):
        torch_to_onnx(torch.jit.trace(model, torch.zeros(1, 3, 32, 32)), one_output, tmp_path / "m.onnx")


def test_a_conversion_that_answers_differently_is_caught(two_heads, tmp_path):
    model, description = two_heads
    torch_to_onnx(torch.jit.trace(model, torch.zeros(1, 3, 32, 32)), description, tmp_path / "m.onnx")
    torch.manual_seed(1)
    other = TwoHeads().eval()  # same architecture, other weights: what a wrong conversion looks like

    def other_answers(arrays: dict) -> dict:
        with torch.inference_mode():
            probs, features = other(torch.from_numpy(arrays["image"]))
        return {"probs": probs.numpy(), "features": features.numpy()}

    with pytest.raises(ConversionMismatch, match="differs from PyTorch by .* > tolerance 0.0001"):
        check_conversion(tmp_path / "m.onnx", description, other_answers, "PyTorch")


@pytest.mark.slow
def test_torchvision_torchscript_serves_alike_through_onnx_and_the_torch_runtime(tmp_path):
    """One TorchScript file, two ways to serve it: converted for onnxruntime, and as it is
    through the torch runtime (its config.txt giving the signature); both answer like torch."""
    torchvision = pytest.importorskip("torchvision", reason="needs torchvision (pip install seldon-caffe[torchvision])")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small().eval()
    batch = np.random.default_rng(8).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(batch)).numpy()
    direct = tmp_path / "direct"
    direct.mkdir()
    torch.jit.save(torch.jit.trace(model, torch.from_numpy(batch)), str(direct / "model.pt"))
    config = write_config(
        direct / "config.txt",
        16,
        [{"name": "i", "data_type": "float32", "dims": [-1, 3, 64, 64]}],
        [{"name": "o", "data_type": "float32", "dims": [-1, 1000]}],
    )
    (direct / "model.yaml").write_text("format: torch\nfiles: {torchscript: model.pt}\nruntime: torch\n")
    onnx = tmp_path / "model.onnx"
    seldon_caffe("convert", "torch", direct / "model.pt", "--config", config, "-o", onnx)

    assert relative_error(served_answer(onnx_model_dir(onnx, tmp_path / "via_onnx"), batch), want) < TOLERANCE
    assert relative_error(served_answer(direct, batch), want) < TOLERANCE
