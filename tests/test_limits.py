"""Requests that would cost far more than they weigh, or that the model cannot take.

A small file can declare a huge decoded size (a flat PNG or an .npz of zeros compresses
about 1000:1): the header is checked before anything is decoded, and the answer is a 400
naming the size and the limit. NaN/Inf inputs are a 400 naming the input unless model.yaml
opts in, and the examples' hooks answer 400, not 500, for input they cannot take. Every
request goes through the real SeldonCaffeModel (hooks + runtime) in this process.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from helpers import EXAMPLES, copy_model
from PIL import Image

from seldon_caffe import decode_image
from seldon_caffe.config import load_config
from seldon_caffe.errors import BadRequest, ConfigError
from seldon_caffe.limits import MAX_REQUEST_BYTES_ENV, max_request_bytes
from seldon_caffe.model import SeldonCaffeModel, SeldonError

VISION, RANKING = EXAMPLES / "vision", EXAMPLES / "ranking"
# Pillow warns (once) about any header over ~89 million pixels; these tests send such headers on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module")
def models(tmp_path_factory, lenet_example):
    """name -> a loaded SeldonCaffeModel: the examples, and LeNet with the default hooks."""
    root = tmp_path_factory.mktemp("limits")
    bare = copy_model(lenet_example, root / "bare")
    (bare / "hooks.py").unlink()
    permissive = copy_model(lenet_example, root / "permissive", yaml=with_options(lenet_example, allow_non_finite=True))
    (permissive / "hooks.py").unlink()
    dirs = {"bare": bare, "permissive": permissive, "lenet": lenet_example, "vision": VISION, "ranking": RANKING}
    loaded = {}
    for name, model_dir in dirs.items():
        loaded[name] = SeldonCaffeModel(str(model_dir))
        loaded[name].load()
    yield loaded
    for model in loaded.values():
        model.model.close()


def with_options(model_dir: Path, **options: Any) -> str:
    """model_dir's model.yaml text with `options` added."""
    config = yaml.safe_load((model_dir / "model.yaml").read_text())
    config["options"] = {**(config.get("options") or {}), **options}
    return yaml.safe_dump(config)


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """A real 10000x10000 grey PNG of one colour: about 100 KB, 100 MB once decoded."""
    buffer = io.BytesIO()
    Image.new("L", (10000, 10000), 255).save(buffer, "PNG")
    assert len(buffer.getvalue()) < 200_000
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def default_limit(monkeypatch):
    monkeypatch.delenv(MAX_REQUEST_BYTES_ENV, raising=False)


def reject(model: SeldonCaffeModel, payload: Any, *fragments: str, tags: dict | None = None) -> str:
    """predict must answer 400 with every fragment in its message; returns the message."""
    with pytest.raises(SeldonError) as caught:
        model.predict(payload, names=[], meta={"tags": tags} if tags else {})
    message = str(caught.value)
    assert caught.value.status_code == 400, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


def lenet_input(models) -> tuple[str, tuple[int, ...]]:
    spec = models["bare"].model.inputs[0]
    return spec.name, tuple(1 if d == -1 else d for d in spec.shape)


# -- A: decompression bombs ----------------------------------------------------------------


def test_npz_of_zeros_over_the_limit_is_a_400(models):
    zeros = np.zeros((5000, 5000), np.float32)  # 100 MB declared, about 100 KB compressed
    buffer = io.BytesIO()
    np.savez_compressed(buffer, data=zeros)
    assert len(buffer.getvalue()) < 1_000_000
    reject(models["bare"], buffer.getvalue(), f"{zeros.nbytes:,} bytes", f"{max_request_bytes():,} bytes")


def test_npy_limit_follows_the_environment(models, monkeypatch):
    name, shape = lenet_input(models)
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    monkeypatch.setenv(MAX_REQUEST_BYTES_ENV, str(image.nbytes - 1))
    reject(models["bare"], npy(image), f"{image.nbytes:,} bytes", f"the limit is {image.nbytes - 1:,} bytes")
    monkeypatch.setenv(MAX_REQUEST_BYTES_ENV, str(image.nbytes))
    answer = np.load(io.BytesIO(models["bare"].predict(npy(image), names=[], meta={})))
    assert answer.shape[0] == 1 and np.isclose(answer.sum(), 1.0, atol=1e-4)  # one softmax row


def test_npz_sizes_add_up(models, monkeypatch):
    """Two arrays each under the limit, together over it, are refused."""
    monkeypatch.setenv(MAX_REQUEST_BYTES_ENV, "6000")
    buffer = io.BytesIO()
    np.savez(buffer, a=np.zeros(500, np.float64), b=np.zeros(500, np.float64))
    reject(models["bare"], buffer.getvalue(), "8,000 bytes", "6,000 bytes", "a: float64[500]")


def test_object_arrays_and_foreign_members_are_refused(models):
    reject(models["bare"], npy(np.array([{"x": 1}], dtype=object), allow_pickle=True), "Python objects", "object")
    buffer = io.BytesIO()
    np.savez(buffer, data=np.array(["a", 1], dtype=object))
    reject(models["bare"], buffer.getvalue(), "'data' holds Python objects")
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.npy", npy(np.zeros((1, 1, 28, 28), np.float32)))
        archive.writestr("notes.txt", "x" * 100)
    reject(models["bare"], buffer.getvalue(), "'notes.txt'", "not a .npy array")


def test_vision_refuses_a_10000px_png(models, huge_png):
    reject(models["vision"], huge_png, "10000x10000", "4096x4096")
    reject(models["vision"], base64.b64encode(huge_png).decode(), "10000x10000", "4096x4096")
    assert models["vision"].predict((VISION / "sample.png").read_bytes(), names=[], meta={})["predictions"]


def test_lenet_refuses_a_10000px_png(models, huge_png):
    reject(models["lenet"], huge_png, "10000x10000", f"{4096 * 4096:,} pixels")
    assert models["lenet"].predict((EXAMPLES / "lenet" / "sample.png").read_bytes(), names=[], meta={})


def test_decode_image_limits(monkeypatch):
    image = png((np.arange(60 * 40) % 256).astype(np.uint8).reshape(60, 40))
    assert decode_image(image).shape == (60, 40)
    assert decode_image(image, cv2.IMREAD_COLOR, max_pixels=2400, max_side=60).shape == (60, 40, 3)
    with pytest.raises(BadRequest, match=r"40x60 \(2,400 pixels\).*at most 2,399 pixels"):
        decode_image(image, max_pixels=2399)
    with pytest.raises(BadRequest, match="40x60; this service takes at most 59 pixels a side"):
        decode_image(image, max_side=59)
    monkeypatch.setenv(MAX_REQUEST_BYTES_ENV, str(4 * 2399))  # the default: 4 bytes a pixel within the limit
    with pytest.raises(BadRequest, match=f"at most 2,399 pixels.*{MAX_REQUEST_BYTES_ENV}"):
        decode_image(image)
    for garbage in (b"", b"not an image at all", image[:20]):  # empty, no header, header cut short
        with pytest.raises(BadRequest, match="not an image"):
            decode_image(garbage)


def test_vision_answers_400_over_opencvs_own_pixel_limit():
    """OpenCV reads its limit once per process, so this runs the vision hooks in a child."""
    script = textwrap.dedent(
        f"""
        import cv2, numpy as np
        from seldon_caffe.config import load_config
        from seldon_caffe.errors import BadRequest
        from seldon_caffe.hooks import Context, Hooks
        config = load_config({str(VISION)!r})
        hooks = Hooks(config.hooks)
        image = cv2.imencode(".png", np.full((100, 100), 255, np.uint8))[1].tobytes()
        try:
            hooks.preprocess(image, Context(model_dir=config.model_dir, config=config))
        except BadRequest as exc:
            print("400", exc)
        """
    )
    env = {**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": "1000"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("400 OpenCV cannot decode the 100x100 image"), done.stdout + done.stderr
    assert "CV_IO_MAX_IMAGE_PIXELS" in done.stdout


# -- B: NaN and Inf ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_input_is_a_400_naming_it(models, bad):
    name, shape = lenet_input(models)
    image = np.zeros(shape, np.float32)
    index = tuple(d - 1 for d in shape)
    image[index] = bad
    kind = "NaN" if np.isnan(bad) else "Inf"
    reject(models["bare"], image, f"input {name!r}", kind, str(list(index)), "allow_non_finite")
    reject(models["bare"], npy(image), f"input {name!r}", kind)
    # float64 JSON-style numbers are cast first and checked as well
    reject(models["bare"], image.astype(np.float64).tolist(), f"input {name!r}", kind)


def test_allow_non_finite_lets_it_through(models):
    _, shape = lenet_input(models)
    image = np.zeros(shape, np.float32)
    image[(0,) * len(shape)] = np.nan
    answer = np.load(io.BytesIO(models["permissive"].predict(npy(image), names=[], meta={})))
    assert answer.shape[0] == 1
    assert models["permissive"].model.allow_non_finite and not models["bare"].model.allow_non_finite


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_allow_non_finite_must_be_a_bool(tmp_path, lenet_example, value):
    model_dir = copy_model(lenet_example, tmp_path / "m", yaml=with_options(lenet_example, allow_non_finite=value))
    with pytest.raises(ConfigError, match=r"options\.allow_non_finite.*not true or false"):
        load_config(model_dir)
    assert load_config(lenet_example).options["allow_non_finite"] is False


# -- C: the hooks answer 400, not 500 ----------------------------------------------------------


def test_default_hooks_refuse_a_ragged_json_array(models):
    name, _ = lenet_input(models)
    reject(models["bare"], {name: [[1.0, 2.0], [3.0]]}, f"jsonData {name!r} is not a rectangular array")


def test_lenet_refuses_strings_in_its_ndarray(models):
    reject(models["lenet"], np.array([[["a", "b"]]]), "could not convert string to float")
    reject(models["lenet"], [[1, [2, 3]]], "expected numbers shaped (N, 1, 28, 28)")


def test_ranking_refuses_numbers_a_float_cannot_hold(models):
    body = json.loads((RANKING / "samples" / "request.json").read_text())
    request = body["jsonData"]
    huge = json.loads(json.dumps({**request, "user": {**request["user"], "age": 10**400}}))
    reject(models["ranking"], huge, "user: feature 'age' must be a number")
    candidates = [dict(c) for c in request["candidates"]]
    candidates[1]["rating"] = 1e39
    reject(models["ranking"], {**request, "candidates": candidates}, "candidate 1", "'rating' is out of range")
    for top_n in (float("inf"), float("nan"), 10**400):
        reject(models["ranking"], request, "tag top_n must be a positive whole number", tags={"top_n": top_n})
    assert models["ranking"].predict(request, names=[], meta={"tags": {"top_n": 2}})["ranked"]


def test_vision_refuses_a_k_too_large_for_a_float(models):
    image = (VISION / "sample.png").read_bytes()
    reject(models["vision"], image, "tag k must be a whole number from 1 to 10", tags={"k": 10**400})
