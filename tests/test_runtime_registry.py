"""The runtime registry: declarations, what is derived from them, another package's runtime
(a real entry point, in a fresh interpreter), and options checked against each runtime's own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from seldon_caffe.config import DEFAULT_OPTIONS, FORMAT_FILES, FORMAT_RUNTIMES, load_config
from seldon_caffe.errors import ConfigError
from seldon_caffe.runtimes import REGISTRY, load_runtime, resolve_runtime, runtime_class
from seldon_caffe.runtimes.options import cuda_index

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("cv2", "onnxruntime", "openvino", "tensorflow", "torch", "tensorrt")


def test_derived_tables_are_what_they_were():
    assert dict(FORMAT_RUNTIMES) == {
        "caffe": ("pycaffe", "opencv", "onnxruntime", "openvino", "torch", "tensorrt"),
        "onnx": ("onnxruntime", "openvino", "tensorrt"),
        "tensorflow": ("tensorflow", "onnxruntime", "openvino"),
        "torch": ("torch",),
        "tensorrt": ("tensorrt",),
    }
    assert dict(FORMAT_FILES) == {
        "caffe": ("prototxt", "weights"),
        "onnx": ("onnx",),
        "tensorflow": ("saved_model",),
        "torch": ("torchscript",),
        "tensorrt": ("plan",),
    }
    assert DEFAULT_OPTIONS == {
        "threads": 2,
        "device": "cpu",
        "precision": "fp32",
        "pycaffe_command": None,
        "allow_non_finite": False,
    }
    assert {name: spec.install for name, spec in REGISTRY.items()} == {
        "pycaffe": "caffe (Debian python3-caffe or conda)",
        "opencv": "opencv-python-headless",
        "onnxruntime": "seldon-caffe[onnx]",
        "openvino": "seldon-caffe[openvino]",
        "tensorflow": "seldon-caffe[tensorflow]",
        "torch": "seldon-caffe[torch]",
        "tensorrt": "tensorrt (NVIDIA)",
    }


def test_reading_the_registry_imports_no_engine():
    """Declarations, derived tables and option checks cost no engine import."""
    script = f"""
        import sys
        from seldon_caffe.config import FORMAT_RUNTIMES
        from seldon_caffe.runtimes import REGISTRY
        from seldon_caffe import scaffold, advice
        assert len(FORMAT_RUNTIMES) == 5 and len(REGISTRY) >= 7
        for spec in REGISTRY.values():
            spec.options.option_names()
        print([m for m in {ENGINES!r} if m in sys.modules])
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_cuda_index():
    assert (cuda_index("cpu"), cuda_index("cuda"), cuda_index("cuda:3")) == (None, 0, 3)


@pytest.mark.parametrize(
    "runtime, key, nearest",
    [
        ("onnxruntime", "graph_optimisation", "graph_optimization"),
        ("opencv", "thread", "threads"),
        ("openvino", "performance-hint", "performance_hint"),
        ("pycaffe", "timeout", "timeout_s"),
        ("auto", "alow_non_finite", "allow_non_finite"),
    ],
)
def test_an_unknown_option_stops_the_load_naming_the_nearest(tmp_path, lenet_example, runtime, key, nearest):
    model_dir = _copy(lenet_example, tmp_path / "m", runtime=runtime, options={"threads": 1, key: "x"})
    config = load_config(model_dir)  # the common options are fine: the runtime's are checked at load
    with pytest.raises(ConfigError) as caught:
        load_runtime(config)
    message = str(caught.value)
    assert message.startswith(f"{model_dir / 'model.yaml'}: field 'options.{key}': not an option of runtime {runtime}")
    assert f"did you mean {nearest}?" in message and "\n" not in message


def test_options_valid_for_the_runtime_load(tmp_path, lenet_example):
    model_dir = _copy(lenet_example, tmp_path / "m", runtime="opencv", options={"threads": 1, "allow_non_finite": True})
    with load_runtime(load_config(model_dir)) as model:
        assert model.name == "opencv" and model.allow_non_finite
    # runtime auto takes the options of every runtime auto may choose for the format
    model_dir = _copy(lenet_example, tmp_path / "a", runtime="auto", options={"timeout_s": 30, "cpu_pinning": False})
    config = load_config(model_dir)
    from seldon_caffe.runtimes.registry import check_option_keys

    check_option_keys(config)


def test_option_values_are_checked_by_the_runtimes_class(tmp_path, lenet_example):
    model_dir = _copy(lenet_example, tmp_path / "m", runtime="onnxruntime", options={"graph_optimization": "most"})
    with pytest.raises(ConfigError, match=r"'options.graph_optimization': 'most'; allowed: all, extended, basic"):
        load_runtime(load_config(model_dir))
    model_dir = _copy(lenet_example, tmp_path / "o", runtime="openvino", options={"cpu_pinning": "yes"})
    with pytest.raises(ConfigError, match=r"'options.cpu_pinning': 'yes' is not true or false"):
        load_runtime(load_config(model_dir))


PLUGIN = '''
"""A third party's runtime: serves format `npy` (an array), multiplying the input by it."""
import numpy as np

from seldon_caffe.runtimes import Runtime, TensorSpec, register_runtime
from seldon_caffe.runtimes.options import Options, seconds
from dataclasses import dataclass


@dataclass(frozen=True)
class ScaleOptions(Options):
    gain: float = seconds(1.0)  # any positive number


@register_runtime("scale", formats=("npy",), default_for=("npy",), files={"npy": {"array": "weights.npy"}},
                  install="pip install seldon-scale")
class ScaleRuntime(Runtime):
    Options = ScaleOptions

    def __init__(self, config):
        self.options = ScaleOptions.from_config(config)
        self.native = np.load(config.files["array"])
        self.inputs = [TensorSpec("x", "float32", (-1, *self.native.shape))]
        self.outputs = [TensorSpec("y", "float32", (-1, *self.native.shape))]

    def _run(self, feed, outputs):
        return {"y": (feed["x"] * self.native * self.options.gain).astype(np.float32)}
'''

CHECK = """
import json, sys
import numpy as np
from seldon_caffe.config import FORMAT_FILES, FORMAT_RUNTIMES, load_config
from seldon_caffe.errors import ConfigError
from seldon_caffe.runtimes import load_runtime, resolve_runtime, runtime_class

config = load_config(sys.argv[1])
model = load_runtime(config)
y = model.run(np.ones((2, 3), np.float32))["y"]
typo = load_config(sys.argv[2])
try:
    load_runtime(typo)
    error = None
except ConfigError as exc:
    error = str(exc)
print(json.dumps({
    "runtime": resolve_runtime(config), "class": runtime_class("scale").__name__, "y": y.tolist(),
    "files": FORMAT_FILES["npy"], "runtimes": FORMAT_RUNTIMES["npy"], "error": error,
}))
"""


def test_a_runtime_from_another_package_is_served(tmp_path):
    """A real distribution on sys.path with a `seldon_caffe.runtimes` entry point, in a fresh interpreter."""
    site = tmp_path / "site"
    (site / "seldon_scale").mkdir(parents=True)
    (site / "seldon_scale" / "__init__.py").write_text(PLUGIN)
    info = site / "seldon_scale-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: seldon-scale\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[seldon_caffe.runtimes]\nscale = seldon_scale\n")
    import numpy as np

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    np.save(model_dir / "weights.npy", np.arange(3, dtype=np.float32))
    (model_dir / "model.yaml").write_text("format: npy\nfiles: {array: weights.npy}\noptions: {gain: 2}\n")
    typo = tmp_path / "typo"
    shutil.copytree(model_dir, typo)
    (typo / "model.yaml").write_text("format: npy\nfiles: {array: weights.npy}\noptions: {gian: 2}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-c", CHECK, str(model_dir), str(typo)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["runtime"], result["class"]) == ("scale", "ScaleRuntime")
    assert result["y"] == [[0.0, 2.0, 4.0], [0.0, 2.0, 4.0]]
    assert (result["files"], result["runtimes"]) == (["array"], ["scale"])
    assert "field 'options.gian': not an option of runtime auto (scale); did you mean gain?" in result["error"]


def test_the_builtins_resolve_as_before(lenet_example):
    config = load_config(lenet_example, runtime="opencv")
    assert resolve_runtime(config) == "opencv"
    assert runtime_class("opencv").__name__ == "OpenCVRuntime"


def _copy(source: Path, target: Path, **fields: object) -> Path:
    shutil.copytree(source, target)
    raw = yaml.safe_load((target / "model.yaml").read_text()) or {}
    raw.update(fields)
    (target / "model.yaml").write_text(yaml.safe_dump(raw))
    return target
