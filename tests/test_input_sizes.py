"""Inputs of any size, and the blobs a Caffe net answers (issue 25, items 4 and 5).

Caffe reshapes a net per call: a request may carry any size the net takes. The nets here are
our own (tests/data/input_sizes): a placeholder input (1x3x1x1, as OpenPose publishes its
own) whose answer only a Silence layer reads, and a fully convolutional net (crop to the
input's size, a Reshape whose inferred dim follows it). Each is served at two sizes by every
engine and compared with real Caffe (the pycaffe worker, which reshapes per request) by
the conformance measure (max|a - b| / max|b| <= 1e-4); one public net (colorization, whose
answer is Silence's) runs on every engine at a reduced size. Weights are our writer's
random ones (seldon-caffe weights).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers import REPO, run_concurrently
from test_conformance import REL_TOL, relative_error

from caffe_oracle import reference
from seldon_caffe.caffe import load_caffe_net
from seldon_caffe.config import parse_config
from seldon_caffe.errors import BadRequest, ModelLoadError
from seldon_caffe.pipeline import Pipeline, RequestStats, signature_metadata
from seldon_caffe.runtimes import REGISTRY, Runtime, load_caffe_runtime, load_runtime
from seldon_caffe.weights import fill_random_weights

DATA = Path(__file__).parent / "data" / "input_sizes"
WILD = REPO.parent / "shared" / "caffe-wild"
ENGINES = ("opencv", "onnxruntime", "openvino", "torch")
CONVERTED = ("onnxruntime", "openvino", "torch")
SIZES = {"placeholder": [(1, 3, 20, 30), (2, 3, 33, 17)], "fully_conv": [(1, 3, 24, 24), (2, 3, 17, 31)]}
INTERMEDIATE = ["pool1", "conv1", "answer"]  # conv1 as relu1 leaves it in place, as Caffe's net.blobs holds it

needs_caffe = pytest.mark.skipif(reference.unavailable_reason() is not None, reason=f"{reference.unavailable_reason()}")


def needs_engine(runtime: str) -> None:
    pytest.importorskip(runtime if runtime != "opencv" else "cv2", reason=f"install {REGISTRY[runtime].install}")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], Path]:
    """prototxt -> a caffemodel of random weights for it (our writer), made once."""
    made: dict[Path, Path] = {}
    where = tmp_path_factory.mktemp("weights")

    def make(prototxt: Path) -> Path:
        if prototxt not in made:
            net = load_caffe_net(prototxt)
            fill_random_weights(net, seed=0)
            made[prototxt] = where / f"{prototxt.stem}.caffemodel"
            made[prototxt].write_bytes(net.caffemodel_bytes())
        return made[prototxt]

    return make


def write_model(directory: Path, prototxt: Path, caffemodel: Path, **fields: Any) -> Path:
    """A model directory: the prototxt, a link to the caffemodel, model.yaml with `fields`."""
    directory.mkdir(parents=True)
    shutil.copy(prototxt, directory / "deploy.prototxt")
    (directory / "weights.caffemodel").symlink_to(caffemodel)
    files = {"prototxt": "deploy.prototxt", "weights": "weights.caffemodel"}
    (directory / "model.yaml").write_text(yaml.safe_dump({"format": "caffe", "files": files, **fields}))
    return directory


@pytest.fixture
def model_dir(tmp_path: Path, weights: Callable[[Path], Path]) -> Callable[..., Path]:
    """(prototxt, **model.yaml fields) -> a model directory of its own (its own ONNX cache)."""
    return lambda prototxt, **fields: write_model(
        tmp_path / f"{prototxt.stem}-{len(list(tmp_path.iterdir()))}", prototxt, weights(prototxt), **fields
    )


def load(directory: Path, runtime: str, **options: Any) -> Runtime:
    """The model directory on `runtime`, 2 threads (and real Caffe's worker for pycaffe)."""
    raw = yaml.safe_load((directory / "model.yaml").read_text())
    raw["runtime"] = runtime
    raw["options"] = {"threads": 2, **options}
    if runtime == "pycaffe":
        raw["options"]["pycaffe_command"] = reference.python_command()
    return load_runtime(parse_config(raw, directory))


@pytest.fixture(scope="module")
def real_caffe(weights: Callable[[Path], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """answer(prototxt, feed, **model.yaml fields): real Caffe's outputs (the pycaffe worker,
    which reshapes the net per request, as Caffe does)."""
    if reference.unavailable_reason():
        pytest.skip(reference.unavailable_reason() or "")
    loaded: dict[tuple, Runtime] = {}
    where = tmp_path_factory.mktemp("real-caffe")

    def answer(prototxt: Path, feed: np.ndarray, /, **fields: Any) -> dict[str, np.ndarray]:
        key = (prototxt, repr(fields))
        if key not in loaded:
            directory = write_model(where / str(len(loaded)), prototxt, weights(prototxt), **fields)
            loaded[key] = load(directory, "pycaffe")
        return loaded[key].run(feed)

    yield answer
    for runtime in loaded.values():
        runtime.close()


def sample(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, expected in want.items():
        assert got[name].shape == expected.shape, f"{name}: shape {got[name].shape}, real Caffe {expected.shape}"
        error = relative_error(got[name], expected)
        assert error <= REL_TOL, f"{name}: relative error {error:.2e} > {REL_TOL:.0e}"


# -- the signature ------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ENGINES)
def test_free_dims_are_minus_one_in_the_signature_and_the_v2_metadata(runtime: str, model_dir) -> None:
    needs_engine(runtime)
    directory = model_dir(DATA / "placeholder.prototxt")
    with load(directory, runtime) as model:
        assert [s.shape for s in model.inputs] == [(-1, 3, -1, -1)]
        assert [(s.name, s.shape) for s in model.outputs] == [("answer", (-1, 2, -1, -1))]  # Silence's
        assert model.example_shapes == {"image": (1, 3, 224, 224)}  # the placeholder's warm-up size
        metadata = signature_metadata(
            parse_config(yaml.safe_load((directory / "model.yaml").read_text()), directory), model
        )
        assert metadata["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, -1, -1]}]
        assert metadata["outputs"] == [{"name": "answer", "datatype": "FP32", "shape": [-1, 2, -1, -1]}]


def test_model_yaml_inputs_fix_or_free_dims(model_dir) -> None:
    """A number fixes a dim (and is where the net warms up), -1 frees one; a net whose
    weights fix the image size (an InnerProduct over it) keeps it fixed."""
    directory = model_dir(DATA / "fully_conv.prototxt", inputs=[{"name": "data", "shape": [-1, 3, 40, -1]}])
    with load(directory, "onnxruntime") as model:
        assert [s.shape for s in model.inputs] == [(-1, 3, 40, -1)]
        assert model.example_shapes == {"data": (1, 3, 40, 24)}
        assert model.run(sample((1, 3, 40, 17)))["prob"].shape == (1, 2, 40 * 17)
        with pytest.raises(BadRequest, match=r"input 'data' has shape \[1, 3, 24, 24\]; expected"):
            model.run(sample((1, 3, 24, 24)))
    with load(model_dir(REPO / "examples" / "lenet" / "deploy.prototxt"), "onnxruntime") as model:
        assert [s.shape for s in model.inputs] == [(-1, 1, 28, 28)]


# -- any size, every engine, against real Caffe -------------------------------------------------


@needs_caffe
@pytest.mark.parametrize("net", list(SIZES))
@pytest.mark.parametrize("runtime", ENGINES)
def test_net_matches_real_caffe_at_two_sizes(net: str, runtime: str, model_dir, real_caffe) -> None:
    needs_engine(runtime)
    prototxt = DATA / f"{net}.prototxt"
    with load(model_dir(prototxt), runtime) as model:
        for i, shape in enumerate(SIZES[net]):
            assert_close(model.run(sample(shape, i)), real_caffe(prototxt, sample(shape, i)))


@needs_caffe
@pytest.mark.parametrize("runtime", ["pycaffe", *ENGINES])
def test_outputs_can_name_intermediate_blobs(runtime: str, model_dir, real_caffe) -> None:
    """model.yaml `outputs:` selects any blobs the layers write, in its order, on every engine
    (the ONNX conversion exposes them as graph outputs)."""
    if runtime != "pycaffe":
        needs_engine(runtime)
    prototxt, outputs = DATA / "placeholder.prototxt", [{"name": name} for name in INTERMEDIATE]
    with load(model_dir(prototxt, outputs=outputs), runtime) as model:
        assert [s.name for s in model.outputs] == INTERMEDIATE
        got = model.run(sample((1, 3, 20, 30)))
    assert_close(got, real_caffe(prototxt, sample((1, 3, 20, 30)), outputs=outputs))


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        (["nope"], "the net has no blob 'nope'; any of its blobs can be an output: image, conv1"),
        (["image"], "'image' is an input of the net, which no layer changes"),
    ],
)
def test_outputs_naming_no_blob_a_layer_writes_is_refused(outputs: list[str], message: str, model_dir) -> None:
    directory = model_dir(DATA / "placeholder.prototxt", outputs=[{"name": name} for name in outputs])
    with pytest.raises(ModelLoadError, match=message):
        load(directory, "onnxruntime")


@needs_caffe
def test_a_public_net_answers_the_blob_only_silence_reads_on_every_engine(model_dir, real_caffe) -> None:
    """colorization's class8_ab is read only by a Silence layer: every engine answers it, at a
    reduced size fixed in model.yaml (measured at its declared 224x224 in docs/benchmarks.md)."""
    prototxt = WILD / "colorization_v2.prototxt"
    if not prototxt.is_file():
        pytest.skip(f"{prototxt} is not here")
    fields = {"inputs": [{"name": "data_l", "shape": [-1, 1, 64, 64]}]}
    want = real_caffe(prototxt, sample((1, 1, 64, 64)), **fields)
    assert list(want) == ["class8_ab"]
    directory = model_dir(prototxt, **fields)
    for runtime in ENGINES:
        needs_engine(runtime)
        with load(directory, runtime) as model:
            assert_close(model.run(sample((1, 1, 64, 64))), want)


# -- sizes the net cannot take ----------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["pycaffe", *ENGINES])
def test_a_size_the_net_cannot_take_is_a_400_naming_it(runtime: str, model_dir) -> None:
    if runtime == "pycaffe" and reference.unavailable_reason():
        pytest.skip(reference.unavailable_reason() or "")
    if runtime != "pycaffe":
        needs_engine(runtime)
    with load(model_dir(DATA / "fully_conv.prototxt"), runtime) as model:
        with pytest.raises(BadRequest, match=r"cannot take inputs data\[1, 3, 2, 2\]: layer 'pool1' \(Pooling\)"):
            model.run(sample((1, 3, 2, 2)))
        assert model.run(sample((1, 3, 24, 24)))["prob"].shape == (1, 2, 576)  # and it goes on serving


def test_opencv_refuses_a_size_its_pooling_cannot_take_where_caffe_can(model_dir) -> None:
    """A 2x2 max pool over a 1x1 image: Caffe clips the window, OpenCV finds it empty."""
    needs_engine("opencv")
    with load(model_dir(DATA / "placeholder.prototxt"), "opencv") as model:
        with pytest.raises(BadRequest, match=r"OpenCV cannot run .* image\[N, 3, 1, 1\] .*runtime onnxruntime"):
            model.run(sample((1, 3, 1, 1)))
        assert model.run(sample((1, 3, 20, 30)))["answer"].shape == (1, 2, 14, 18)


# -- one engine per shape ---------------------------------------------------------------------


@pytest.mark.parametrize("runtime", CONVERTED)
def test_the_shape_cache_keeps_the_most_recent_shapes(runtime: str, model_dir) -> None:
    needs_engine(runtime)
    with load(model_dir(DATA / "fully_conv.prototxt"), runtime, shape_cache=2) as model:
        plans = model.native.plans if runtime == "torch" else model.plans
        first = model.run(sample((1, 3, 24, 24)))  # the warm-up shape: loaded at start
        model.run(sample((2, 3, 17, 31)))
        model.run(sample((1, 3, 20, 20)))
        assert [dict(key)["data"] for key in plans.shapes] == [(3, 17, 31), (3, 20, 20)]
        again = model.run(sample((1, 3, 24, 24)))  # evicted, so planned again
        assert [dict(key)["data"] for key in plans.shapes] == [(3, 20, 20), (3, 24, 24)]
        np.testing.assert_array_equal(again["prob"], first["prob"])


def test_concurrent_requests_of_a_new_shape_convert_it_once(model_dir, caplog) -> None:
    needs_engine("onnxruntime")
    with load(model_dir(DATA / "fully_conv.prototxt"), "onnxruntime") as model:
        expected = model.run(sample((1, 3, 24, 24)))
        answers: dict[int, dict[str, np.ndarray]] = {}
        with caplog.at_level(logging.INFO, logger="seldon_caffe.runtimes.per_shape"):
            run_concurrently(lambda i: answers.setdefault(i, model.run(sample((1, 3, 30, 26), i))), 4)
        planned = [r for r in caplog.records if "planned for input shapes" in r.getMessage()]
        assert len(planned) == 1, [r.getMessage() for r in planned]
        assert {a["prob"].shape for a in answers.values()} == {(1, 2, 780)}
        assert expected["prob"].shape == (1, 2, 576)


def test_mixed_sizes_through_the_batcher_are_merged_by_size_only(model_dir) -> None:
    """Requests of two sizes at once: each size is its own batch (batching groups by every dim
    but the batch), nothing fails, and each request gets its own answer."""
    needs_engine("onnxruntime")
    batching = {"max_batch_size": 8, "max_queue_delay_ms": 50}
    directory = model_dir(DATA / "fully_conv.prototxt", batching=batching, options={"threads": 2})
    pipeline = Pipeline.load(directory, "onnxruntime")
    try:
        shapes = [(1, 3, 24, 24), (1, 3, 17, 31)] * 3
        inputs = [sample(shape, i) for i, shape in enumerate(shapes)]
        alone = [pipeline.model.run(x)["prob"] for x in inputs]
        got: dict[int, Any] = {}
        rows: dict[int, int] = {}

        def request(i: int) -> None:
            stats = RequestStats()
            got[i] = pipeline.answer(inputs[i], stats=stats, keep_outputs=True)["prob"]
            rows[i] = stats.batch_rows

        run_concurrently(request, len(inputs))
        for i in range(len(inputs)):
            np.testing.assert_allclose(got[i], alone[i], rtol=1e-5, atol=1e-6)
            assert 1 <= rows[i] <= 3  # merged, if at all, with requests of its own size
    finally:
        pipeline.close()


# -- a net made in memory (what a net cut at its Python layers runs on) ------------------------------


@pytest.mark.parametrize("runtime", ENGINES)
def test_load_caffe_runtime_serves_a_net_made_in_memory(runtime: str, model_dir, weights, tmp_path: Path) -> None:
    """The interface a net cut at its Python layers uses: a CaffeNet in memory, its input
    dims fixed or freed, any blob as the answer; it converts in memory, writing nothing."""
    needs_engine(runtime)
    prototxt = DATA / "placeholder.prototxt"
    with load(model_dir(prototxt, outputs=[{"name": "pool1"}]), runtime) as served:
        expected = served.run(sample((1, 3, 20, 30)))
    net = load_caffe_net(prototxt, weights(prototxt))
    config = parse_config({"files": {"prototxt": str(prototxt), "weights": str(weights(prototxt))}}, tmp_path)
    with load_caffe_runtime(runtime, config, net, inputs={"image": [-1, 3, 20, -1]}, outputs=["pool1"]) as part:
        assert [s.shape for s in part.inputs] == [(-1, 3, 20, -1)]
        assert [s.name for s in part.outputs] == ["pool1"]
        assert_close(part.run(sample((1, 3, 20, 30))), expected)
        assert part.run(sample((2, 3, 20, 9)))["pool1"].shape == (2, 4, 10, 5)
        with pytest.raises(BadRequest, match="expected image: float32"):
            part.run(sample((1, 3, 21, 30)))
    assert not (tmp_path / ".cache").exists()


def test_the_batch_is_free_for_all_inputs_together() -> None:
    """A net of two inputs joined by a Concat takes any batch when both change together."""
    from seldon_caffe.caffe import read_prototxt
    from seldon_caffe.runtimes.caffe_model import CaffeModel

    prototxt = REPO / "examples" / "ranking" / "deploy.prototxt"
    model = CaffeModel(read_prototxt(prototxt), source=str(prototxt), weights=None)
    assert [s.shape for s in model.inputs] == [(-1, 4096), (-1, 245)]
    assert [s.shape for s in model.outputs] == [(-1, 1)]
