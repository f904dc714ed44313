"""Settings that would silently do nothing: the warnings, the builder image, what inspect shows.

The advice is decided from the runtime's name (seldon_caffe/advice.py), so most of it is
checked on real ModelConfigs without loading anything; `inspect`, the conversion cache and
s2i's assemble then run for real, in subprocesses, on the LeNet example.
"""

from __future__ import annotations

import configparser
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import copy_model

from seldon_caffe import advice
from seldon_caffe.config import DEFAULT_OPTIONS, FORMAT_RUNTIMES, ModelConfig, load_config
from seldon_caffe.runtimes import REGISTRY
from seldon_caffe.runtimes._onnx_source import converted_caffe_model

REPO = Path(__file__).resolve().parents[1]


def settings(fmt: str = "caffe", runtime: str = "auto", **options: object) -> ModelConfig:
    """A model.yaml's settings without files, as `k8s` sees one."""
    return ModelConfig(Path("/m"), "m", fmt, {}, runtime, {**DEFAULT_OPTIONS, **options})


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "seldon_caffe.cli", *args]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# -- warnings ---------------------------------------------------------------------------------


def test_cuda_on_a_cpu_only_runtime_names_it_and_the_runtimes_that_would_use_the_gpu():
    config = settings(device="cuda")
    (warning,) = advice.settings_warnings(config, advice.image_runtime(config))
    assert "runtime opencv (what runtime: auto chooses for format caffe)" in warning
    assert "ignores the GPU" in warning
    for choice in ("torch (on CUDA)", "tensorrt", "onnxruntime with CUDA"):
        assert choice in warning


@pytest.mark.parametrize("runtime", ["opencv", "openvino", "pycaffe"])
def test_every_cpu_only_runtime_warns_about_cuda_and_gpus(runtime):
    assert advice.settings_warnings(settings(runtime=runtime, device="cuda:1"), runtime)
    assert advice.settings_warnings(settings(runtime=runtime), runtime, gpus=1)
    assert not advice.settings_warnings(settings(runtime=runtime), runtime, gpus=0)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "tensorrt"])
def test_gpu_runtimes_warn_only_when_the_pod_and_the_model_disagree(runtime):
    cuda = settings(runtime=runtime, device="cuda")
    assert advice.settings_warnings(cuda, runtime) == []  # inspect: no pod to compare with
    assert advice.settings_warnings(cuda, runtime, gpus=1) == []
    (no_gpu,) = advice.settings_warnings(cuda, runtime, gpus=0)
    assert "asks for no GPU" in no_gpu and "--gpu 1" in no_gpu
    (idle,) = advice.settings_warnings(settings(runtime=runtime), runtime, gpus=2)
    assert "--gpu 2" in idle and "GPU would sit idle" in idle and "device: cuda" in idle


def test_the_gpu_choices_are_only_runtimes_that_serve_the_format():
    (warning,) = advice.settings_warnings(settings("onnx", "openvino", device="cuda"), "openvino")
    assert "refuses options.device cuda" in warning  # openvino stops at load rather than ignore it
    choices = warning.partition("runtimes that use it: ")[2]
    assert "tensorrt" in choices and "onnxruntime" in choices and "torch" not in choices
    assert set(advice.GPU_RUNTIMES) >= {r for r in FORMAT_RUNTIMES["caffe"] if r not in advice.CPU_ONLY}


def test_precision_a_runtime_ignores_is_a_warning():
    (warning,) = advice.settings_warnings(settings(precision="fp16"), "opencv")
    assert "options.precision fp16" in warning and "runs fp32" in warning
    assert advice.settings_warnings(settings(runtime="onnxruntime", precision="int8"), "onnxruntime") == []


def test_auto_in_the_image_is_the_likely_pick_among_its_engines_unless_a_pycaffe_worker_is_set():
    # The default image has OpenCV and ONNX Runtime's CPU build, and no pycaffe.
    assert advice.image_runtime(settings()) == "onnxruntime"
    assert advice.image_runtime(settings(precision="int8")) == "onnxruntime"
    assert advice.image_runtime(settings(device="cuda")) == "opencv"  # the CPU build cannot use it
    assert advice.image_runtime(settings(precision="bf16")) == "openvino"  # which the image must add
    assert advice.builder(settings(precision="bf16"), "openvino").build_args == ("EXTRAS=onnx,openvino",)
    assert advice.image_runtime(settings(pycaffe_command=["python3"])) == "pycaffe"
    assert advice.image_runtime(settings("tensorflow")) == "tensorflow"


# -- the builder image ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, runtime, arg",
    [
        ("caffe", "opencv", ""),
        ("caffe", "onnxruntime", ""),
        ("onnx", "onnxruntime", ""),
        ("caffe", "openvino", "EXTRAS=onnx,openvino"),  # onnx converts the net for openvino
        ("onnx", "openvino", "EXTRAS=openvino"),
        ("tensorflow", "tensorflow", "EXTRAS=tensorflow"),
        ("torch", "torch", "EXTRAS=torch"),
        ("caffe", "torch", "EXTRAS=onnx,torch"),
    ],
)
def test_build_arg_comes_from_the_runtimes_extra(fmt, runtime, arg):
    assert advice.build_arg(runtime, fmt) == arg


def test_build_args_name_real_extras_and_the_dockerfiles_default():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    extras = set(setup["options.extras_require"])
    for runtime in REGISTRY:
        for fmt in ("caffe", "onnx", "tensorflow", "torch"):
            arg = advice.build_arg(runtime, fmt)
            assert set(filter(None, arg.removeprefix("EXTRAS=").split(","))) <= extras, (runtime, arg)
    dockerfile = (REPO / advice.DOCKERFILE).read_text()
    assert f"ARG EXTRAS={','.join(advice.DEFAULT_EXTRAS)}\n" in dockerfile
    assert "ARG WITH_TENSORRT" in (REPO / advice.GPU_DOCKERFILE).read_text()


def test_builder_picks_the_dockerfile_and_tag():
    assert advice.builder(settings(), "opencv").is_default
    tensorflow = advice.builder(settings("tensorflow"), "tensorflow")
    assert tensorflow.command() == (
        "docker build -f s2i/Dockerfile --build-arg EXTRAS=tensorflow -t seldon-caffe-s2i-tensorflow:0.1.0 ."
    )
    assert advice.builder(settings(runtime="onnxruntime", device="cuda"), "onnxruntime").dockerfile == (
        "s2i/Dockerfile.gpu"
    )
    assert "WITH_TENSORRT=1" in advice.builder(settings("onnx", "tensorrt", device="cuda"), "tensorrt").command()
    assert "pycaffe" in advice.builder(settings(runtime="pycaffe"), "pycaffe").note


def test_init_prints_the_builder_a_tensorflow_model_needs(tmp_path):
    saved_model = tmp_path / "exported"
    saved_model.mkdir()
    (saved_model / "saved_model.pb").write_bytes(b"")
    done = cli("init", "tf-model", "--from", str(saved_model), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--build-arg EXTRAS=tensorflow" in done.stdout
    assert "s2i build tf-model seldon-caffe-s2i-tensorflow:0.1.0 tf-model:0.1.0" in done.stdout


# -- inspect: the file loaded, the precision, the warnings ------------------------------------


@pytest.fixture
def lenet(tmp_path: Path, lenet_example: Path) -> Path:
    model_yaml = (lenet_example / "model.yaml").read_text() + "  device: cuda\n"
    return copy_model(lenet_example, tmp_path / "lenet", yaml=model_yaml)


def test_inspect_warns_and_shows_the_file_and_precision(lenet):
    done = cli("inspect", str(lenet), "--runtime", "opencv")
    assert done.returncode == 0, done.stderr
    assert re.search(
        r"^seldon-caffe: warning: .*runtime opencv runs on CPU only and ignores the GPU", done.stderr, re.M
    )
    assert "precision fp32\n" in done.stdout
    assert f"file      loaded: {lenet / 'weights.caffemodel'}\n" in done.stdout


def test_inspect_shows_the_cached_conversion_and_the_int8_model(lenet):
    (lenet / "model.yaml").write_text((lenet / "model.yaml").read_text().replace("cuda", "cpu"))
    done = cli("inspect", str(lenet), "--runtime", "onnxruntime", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["warnings"] == [] and info["precision"] == "fp32"
    converted = Path(info["loaded_file"])
    assert converted.parent == lenet / ".cache/onnx" and converted.suffix == ".onnx"

    # int8 loads the quantized model beside the weights; any valid ONNX of the net stands in for it
    shutil.copy(converted, lenet / "weights.int8.onnx")
    (lenet / "model.yaml").write_text((lenet / "model.yaml").read_text() + "  precision: int8\n")
    done = cli("inspect", str(lenet), "--runtime", "onnxruntime")
    assert done.returncode == 0, done.stderr
    assert "precision int8\n" in done.stdout
    assert f"file      loaded: {lenet / 'weights.int8.onnx'}\n" in done.stdout


def test_the_conversion_cache_logs_its_write_and_its_hits(lenet, caplog):
    config = load_config(lenet)
    with caplog.at_level(logging.DEBUG, logger="seldon_caffe.runtimes._onnx_source"):  # hits: DEBUG
        path = converted_caffe_model(config)
        assert f"cached the ONNX conversion at {path}" in caplog.text
        (written,) = [r for r in caplog.records if r.levelno == logging.INFO]  # a write shows by default
        assert "cached the ONNX conversion" in written.getMessage()
        caplog.clear()
        assert converted_caffe_model(config) == path
        assert f"using the cached ONNX conversion {path}" in caplog.text


# -- s2i: the image does not carry the local conversion cache ---------------------------------


def test_assemble_leaves_the_conversion_cache_out_of_the_image(lenet, tmp_path):
    cache = lenet / ".cache/onnx"
    cache.mkdir(parents=True)
    (cache / "stale.onnx").write_bytes(b"from an old local run")
    (lenet / ".s2i").mkdir()
    (lenet / ".s2i/environment").write_text("GUNICORN_WORKERS=2\n")  # other dot entries still go in
    app = tmp_path / "microservice"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "S2I_SOURCE_DIR": str(lenet),
        "SELDON_CAFFE_APP_DIR": str(app),
        "SELDON_CAFFE_PYTHON": sys.executable,
        "SELDON_CAFFE_BUILD_CHECK": "0",
    }
    done = subprocess.run(
        [str(REPO / "s2i/bin/assemble")], env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stderr
    assert (app / "model.yaml").is_file() and (app / "weights.caffemodel").is_file()
    assert (app / ".s2i/environment").is_file() and not (app / ".cache").exists()
    assert not (lenet / ".cache").exists()  # s2i commits its source copy into the image too
