"""The runtimes that serve Caffe through its ONNX conversion against real BVLC Caffe, and
through the real service: onnxruntime and openvino load the ONNX, torch rebuilds it in torch.fx.

Conformance reuses tests/test_conformance.py's machinery unchanged: the same nets (every zoo
net, every layer net), the same weights and inputs made by real Caffe, the same measure
(relative error = max|a - b| / max|b| <= 1e-4), the same gap table. Here the Caffe files
are converted to ONNX on load (the runtimes' own path, cache included) at batch 1 and 4,
so the symbolic batch dimension is exercised too. tests/onnx_layer_nets/ adds nets for the
parameters that trip converters beyond those (InnerProduct axis / transpose, Scale and Bias
operands, ArgMax top_k, the pooling mask, batch-statistics BatchNorm, constants, in-place
inputs...), run through real Caffe the same way.

INT8 is checked on a zoo net with random calibration; the issue wants it checked on the
vision example too: `quantize.quantize_model` / `quantize.accuracy_report` take any
iterable of preprocessed inputs, which is the hook that example's test will use.
"""

from __future__ import annotations

import json
import shutil
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import ZOO, one_net_per_engine
from service import running_service
from test_conformance import (
    BATCHES,
    NETS,
    REL_TOL,
    ReferenceData,
    assert_matches_real_caffe,
    relative_error,
    runtime_cases,
)

from caffe_oracle import reference
from seldon_caffe import extras, quantize
from seldon_caffe.caffe import load_caffe_net
from seldon_caffe.config import load_config, parse_config
from seldon_caffe.errors import ConfigError, ModelLoadError, SeldonCaffeError
from seldon_caffe.runtimes import REGISTRY, load_runtime

RUNTIMES = ("onnxruntime", "openvino")
# The runtimes that serve a Caffe net through its ONNX conversion (torch rebuilds it in torch.fx).
CONVERTED = (*RUNTIMES, "torch")
EXTRA_NETS = {p.stem: p for p in sorted((Path(__file__).parent / "onnx_layer_nets").glob("*.prototxt"))}
ALL_NETS = {**NETS, **EXTRA_NETS}
SERVED_NET = "lenet"
INT8_NET = "squeezenet_v1_1"

needs_caffe = pytest.mark.skipif(reference.unavailable_reason() is not None, reason=f"{reference.unavailable_reason()}")


def needs_engine(runtime: str) -> None:
    """Skip, saying why, where the runtime's engine (an optional extra) is not installed."""
    install = REGISTRY[runtime].install
    pytest.importorskip(runtime, reason=f"the {runtime} runtime's engine is not installed (install {install})")


class ExtraReference:
    """Real Caffe's weights and outputs for tests/onnx_layer_nets, made like ReferenceData's."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._nets: dict[str, dict[str, Any]] = {}

    def weights(self, name: str) -> Path:
        return self.workdir / f"{name}.caffemodel"

    def net(self, name: str) -> dict[str, Any]:
        if not self._nets:
            jobs: list[dict[str, Any]] = []
            for n, prototxt in EXTRA_NETS.items():
                jobs.append(reference.weights_job(prototxt, self.weights(n), seed=zlib.crc32(n.encode())))
                # Our outputs: a blob only Silence reads is one (math_variants' `one`), not in Caffe's net.outputs.
                answers = load_caffe_net(prototxt).outputs
                jobs += [
                    reference.forward_job(prototxt, self.weights(n), batch=b, seed=b, outputs=answers) for b in BATCHES
                ]
            results = iter(reference.run_jobs(jobs, timeout=1800))
            for n in EXTRA_NETS:
                next(results)
                self._nets[n] = {"forward": {b: next(results) for b in BATCHES}}
        return self._nets[name]


@pytest.fixture(scope="session")
def onnx_reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """name -> real Caffe's weights and outputs; each kind of net made in one real-Caffe run."""
    wanted = [SERVED_NET, INT8_NET]
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if item.module.__name__ == __name__ and callspec and callspec.params.get("name") in NETS:
            wanted.append(callspec.params["name"])
    shared = ReferenceData(tmp_path_factory.mktemp("real-caffe-onnx"), list(dict.fromkeys(wanted)))
    extra = ExtraReference(tmp_path_factory.mktemp("real-caffe-onnx-extra"))
    return lambda name: extra if name in EXTRA_NETS else shared


@pytest.fixture(scope="session")
def onnx_runtimes(onnx_reference: Any) -> Iterator[Any]:
    """load(name, runtime): the net converted on load; one net per runtime alive at a time."""

    def raw(name: str, runtime: str) -> tuple[dict, Path]:
        data = onnx_reference(name)
        data.net(name)  # real Caffe writes the weights first
        files = {"prototxt": str(ALL_NETS[name]), "weights": str(data.weights(name))}
        return {"files": files, "runtime": runtime}, data.weights(name).parent

    with one_net_per_engine(raw) as load:
        yield load


@pytest.mark.reference
@needs_caffe
@pytest.mark.parametrize(("name", "runtime", "batch"), list(runtime_cases(ALL_NETS, CONVERTED)))
def test_converted_net_matches_real_caffe(
    name: str, runtime: str, batch: int, onnx_reference: Any, onnx_runtimes: Any
) -> None:
    needs_engine(runtime)
    expected = onnx_reference(name).net(name)["forward"][batch]
    model = onnx_runtimes(name, runtime)
    assert [s.name for s in model.inputs] == list(expected["inputs"])
    assert sorted(s.name for s in model.outputs) == sorted(expected["outputs"])
    assert_matches_real_caffe(model, expected)


def _model_dir(target: Path, name: str, weights: Path, runtime: str, **options: Any) -> Path:
    target.mkdir()
    shutil.copy(NETS[name], target / "deploy.prototxt")
    shutil.copy(weights, target / "weights.caffemodel")
    config = {
        "name": name,
        "format": "caffe",
        "files": {"prototxt": "deploy.prototxt", "weights": "weights.caffemodel"},
        "runtime": runtime,
        "options": {"threads": 1, **options},
    }
    (target / "model.yaml").write_text(json.dumps(config))  # JSON is YAML
    return target


@pytest.mark.reference
@needs_caffe
@pytest.mark.e2e
@pytest.mark.parametrize("runtime", CONVERTED)
def test_service_answers_like_real_caffe(runtime: str, onnx_reference: Any, tmp_path: Path) -> None:
    """A zoo net converted on load, served by the real microservice over REST and gRPC."""
    needs_engine(runtime)
    data_of = onnx_reference(SERVED_NET)
    reference_run = data_of.net(SERVED_NET)["forward"][4]
    (data,) = reference_run["inputs"].values()
    (want,) = reference_run["outputs"].values()
    model_dir = _model_dir(tmp_path / SERVED_NET, SERVED_NET, data_of.weights(SERVED_NET), runtime)
    with running_service(model_dir) as service:
        response = service.post({"data": {"ndarray": data.tolist()}})
        assert response.status_code == 200, response.text
        rest = np.asarray(response.json()["data"]["ndarray"])
        grpc = service.client("grpc").microservice(data=data, method="predict")
        assert grpc.success, grpc.msg
        answer = np.asarray(grpc.response.data.tensor.values).reshape(grpc.response.data.tensor.shape)
        assert (model_dir / ".cache" / "onnx").is_dir(), "the conversion is cached next to the model"
    for got in (rest, answer):
        assert got.shape == want.shape
        assert relative_error(got, want) <= REL_TOL


@pytest.mark.reference
@needs_caffe
def test_int8_quantized_zoo_net(onnx_reference: Any, tmp_path: Path) -> None:
    """Quantize a converted zoo net with calibration data, serve it at precision int8 on both runtimes."""
    from seldon_caffe.caffe.to_onnx import convert_files

    name = INT8_NET
    expected = onnx_reference(name).net(name)["forward"][1]  # real Caffe makes the weights too
    fp32 = tmp_path / "model.onnx"
    convert_files(NETS[name], onnx_reference(name).weights(name), fp32)
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        np.save(calibration / f"{i}.npy", rng.standard_normal((1, 3, 227, 227)).astype(np.float32))
    int8 = tmp_path / "model.int8.onnx"
    report = quantize.quantize_model(fp32, int8, quantize.load_samples(calibration, quantize.model_inputs(fp32)))
    assert int8.is_file() and report["prob"]["relative_error"] < 0.1, report

    for runtime in RUNTIMES:
        raw = {"format": "onnx", "files": {"onnx": "model.onnx"}, "runtime": runtime, "options": {"precision": "int8"}}
        with load_runtime(parse_config(raw, tmp_path)) as model:
            got = model.run(expected["inputs"])["prob"]
            assert relative_error(got, expected["outputs"]["prob"]) < 0.1, runtime


# -- runtime behaviour that needs no Caffe ----------------------------------------------


def _lenet_dir(tmp_path: Path, runtime: str, **options: Any) -> Path:
    from test_onnx_convert import random_net, write_caffe_files

    prototxt, weights = write_caffe_files(random_net(ZOO / "lenet.prototxt"), tmp_path / "lenet")
    return _model_dir(tmp_path / f"lenet-{runtime}", "lenet", weights, runtime, **options)


@pytest.mark.parametrize("runtime", CONVERTED)
def test_conversion_is_cached_and_never_touches_user_files(runtime: str, tmp_path: Path) -> None:
    needs_engine(runtime)
    model_dir = _lenet_dir(tmp_path, runtime)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    with load_runtime(load_config(model_dir)) as first:
        cached = first.path
    assert cached.parent == model_dir / ".cache" / "onnx"
    stamp = cached.stat().st_mtime_ns
    with load_runtime(load_config(model_dir)) as again:
        assert again.path == cached and cached.stat().st_mtime_ns == stamp  # a hit: not converted again
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()} == before
    weights = model_dir / "weights.caffemodel"
    weights.write_bytes(weights.read_bytes() + b"")  # same bytes: same key
    with load_runtime(load_config(model_dir)) as same:
        assert same.path == cached


def test_unwritable_model_dir_falls_back_to_the_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = _lenet_dir(tmp_path, "onnxruntime")
    (model_dir / ".cache").write_text("not a directory")  # the cache cannot be made here
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    with load_runtime(load_config(model_dir)) as model:
        assert model.path.parent == tmp_path / "user-cache" / "seldon-caffe" / "onnx"


@pytest.mark.parametrize("runtime", CONVERTED)
def test_concurrent_runs_give_sequential_answers(runtime: str, tmp_path: Path) -> None:
    needs_engine(runtime)
    from concurrent.futures import ThreadPoolExecutor

    inputs = [np.random.default_rng(i).standard_normal((i % 3 + 1, 1, 28, 28)).astype(np.float32) for i in range(24)]
    with load_runtime(load_config(_lenet_dir(tmp_path, runtime))) as model:
        sequential = [model.run(x)["prob"] for x in inputs]
        with ThreadPoolExecutor(8) as pool:
            concurrent = list(pool.map(lambda x: model.run(x)["prob"], inputs))
    for a, b in zip(sequential, concurrent, strict=True):
        assert np.array_equal(a, b)


def test_onnxruntime_providers_and_precision(tmp_path: Path) -> None:
    from seldon_caffe.runtimes.onnxruntime import choose_providers

    model_dir = _lenet_dir(tmp_path, "onnxruntime")
    config = load_config(model_dir)
    assert [name for name, _ in choose_providers(config)][-1] == "CPUExecutionProvider"
    config.options["providers"] = ["cpu"]
    with load_runtime(config) as model:
        assert model.providers == ["CPUExecutionProvider"]
    config.options["providers"] = ["made-up"]
    with pytest.raises(ConfigError, match="options.providers.*made-up.*CPUExecutionProvider"):
        load_runtime(config)
    config.options.update(providers=["cpu"], precision="fp16")
    with pytest.raises(ConfigError, match="fp16 runs on onnxruntime's TensorRT provider"):
        load_runtime(config)


def test_openvino_precision_is_always_explicit(tmp_path: Path) -> None:
    config = load_config(_lenet_dir(tmp_path, "openvino"))
    with load_runtime(config) as model:
        assert model.properties["INFERENCE_PRECISION_HINT"] == "f32" and model.inference_precision == "f32"
    config.options["precision"] = "bf16"
    with load_runtime(config) as model:  # runs in bf16 only where the CPU has bf16 units
        assert model.properties["INFERENCE_PRECISION_HINT"] == "bf16"
        assert model.inference_precision in ("bf16", "f32")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_int8_without_a_quantized_model_says_how_to_make_one(runtime: str, tmp_path: Path) -> None:
    config = load_config(_lenet_dir(tmp_path, runtime, precision="int8"))
    with pytest.raises(ModelLoadError, match=r"weights\.int8\.onnx.*seldon-caffe quantize model\.onnx"):
        load_runtime(config)


@pytest.mark.parametrize(
    "missing, hint",
    [
        (("onnx", "onnxruntime"), "pip install 'seldon-caffe[onnx]'"),
        (("tensorflow", "tf2onnx"), "pip install 'seldon-caffe[tensorflow]'"),
        (("torch",), "pip install 'seldon-caffe[torch]'"),
        (("torch", "onnx"), "pip install 'seldon-caffe[torch,onnx]'"),
    ],
)
def test_a_missing_engine_names_the_extra_that_brings_it(
    monkeypatch: pytest.MonkeyPatch, missing: tuple[str, ...], hint: str
) -> None:
    """The convert and quantize commands share `extras.require_modules`; its hint must not send a
    user who lacks TensorFlow or torch to the [onnx] extra."""
    for module in missing:
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: import and find_spec fail
    with pytest.raises(SeldonCaffeError) as caught:
        extras.require_modules("numpy", *missing)
    assert str(caught.value) == f"this command needs {', '.join(missing)}: {hint}"
