"""Advice on settings that would otherwise silently do nothing.

A model.yaml can ask for things the runtime that serves it never reads: `device: cuda` on
a CPU-only engine, `precision: fp16` on one that always runs fp32, or `k8s --gpu` for a
pod whose runtime never touches the GPU. Each loads and serves without complaint, so the
user learns about it from a benchmark or a bill. `inspect`, `init` and `k8s` print these
one-line warnings from here. `init` and `k8s` also print how to build the builder image
the runtime needs: s2i/Dockerfile installs only the [onnx] extra by default.

Everything is decided from the runtime's name, never by probing a GPU: the machine that
runs `k8s` or `init` is rarely the one that serves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import DEFAULT_OPTIONS, FORMAT_FILES, FORMAT_RUNTIMES, ModelConfig
from .runtimes import REGISTRY, resolve_runtime

# Runtimes that never use a GPU, whatever options.device says. pycaffe: Debian's
# python3-caffe is a CPU build, and the worker calls caffe.set_mode_cpu().
CPU_ONLY = ("opencv", "openvino", "pycaffe")
# Runtimes that run fp32 whatever options.precision says (they never read it).
FP32_ONLY = ("opencv", "pycaffe")
# The runtimes that do use a GPU, in the order we suggest them, and what each needs.
GPU_RUNTIMES: dict[str, str] = {
    "torch": "torch (on CUDA)",
    "tensorrt": "tensorrt (a TensorRT plan)",
    "onnxruntime": "onnxruntime with CUDA (s2i/Dockerfile.gpu)",
    "tensorflow": "tensorflow with a CUDA build of TensorFlow",
}
# Runtimes that serve a Caffe net through its ONNX conversion, which imports the onnx package.
THROUGH_ONNX = ("onnxruntime", "openvino", "torch")

DOCKERFILE = "s2i/Dockerfile"
GPU_DOCKERFILE = "s2i/Dockerfile.gpu"
DEFAULT_EXTRAS = ("onnx",)  # s2i/Dockerfile's ARG EXTRAS
BUILDER_TAG = "seldon-caffe-s2i:0.1.0"
_EXTRA = re.compile(r"seldon-caffe\[(\w+)\]")


def model_settings(model_dir: Path, data: dict[str, Any], runtime: str | None = None) -> ModelConfig | None:
    """model.yaml's settings without its files, or None when its format or runtime is not one.

    For `k8s`, whose model files may live in object storage: only format, runtime and
    options matter for the advice, and a model.yaml that names no valid format gets none
    (loading it in the pod says what is wrong).
    """
    fmt = data.get("format", "caffe")
    if fmt not in FORMAT_FILES:
        return None
    name = runtime or data.get("runtime") or "auto"
    if name not in ("auto", *FORMAT_RUNTIMES[fmt]):
        return None
    options = data.get("options")
    if not isinstance(options, dict):
        options = {}
    return ModelConfig(
        model_dir=model_dir,
        name=str(data.get("name") or model_dir.name),
        format=fmt,
        files={},
        runtime=name,
        options={**DEFAULT_OPTIONS, **options},
    )


def image_runtime(config: ModelConfig) -> str:
    """The runtime `config` gets in an s2i image. `auto` for Caffe measures the image's own
    engines when the service starts (runtimes/auto.py), and the image has no pycaffe unless a
    pycaffe_command names one: this is the engine it would most likely pick there. The
    default image has OpenCV and ONNX Runtime's CPU build, so with a CUDA device only OpenCV
    (which ignores it) is left; a precision neither runs needs an engine the image must add."""
    if config.runtime != "auto" or config.format != "caffe" or config.options.get("pycaffe_command"):
        return resolve_runtime(config)
    from .runtimes.auto import likely

    on_cuda = str(config.options.get("device", "cpu")).startswith("cuda")
    return likely(config, ("opencv",) if on_cuda else ("onnxruntime", "opencv"))


def settings_warnings(config: ModelConfig, runtime_name: str, gpus: int | None = None) -> list[str]:
    """One line per setting that `runtime_name` would ignore. `gpus`: the pod's GPUs (k8s);
    None where there is no pod (inspect, init), which skips the pod checks."""
    device = str(config.options.get("device", "cpu"))
    on_cuda = device.startswith("cuda")
    served = _served_by(config, runtime_name)
    warnings = []
    if runtime_name in CPU_ONLY and (on_cuda or gpus):
        asked = [f"{config.source.name} has options.device {device}"] if on_cuda else []
        asked += [f"--gpu {gpus} asks for GPUs"] if gpus else []
        ignores = _cpu_only(runtime_name, on_cuda)
        warnings.append(
            f"{' and '.join(asked)}, but {served} runs on CPU only and {ignores}; {_gpu_choices(config.format)}"
        )
    elif gpus and not on_cuda:
        cuda_image = builder(_with_device(config, "cuda"), runtime_name)
        build = "" if cuda_image == builder(config, runtime_name) else f", and build with: {cuda_image.command()}"
        warnings.append(
            f"--gpu {gpus}, but {config.source.name} has options.device {device}, so the GPU would sit idle; "
            f"set device: cuda{build}"
        )
    elif gpus == 0 and on_cuda:
        warnings.append(
            f"{config.source.name} has options.device {device}, but the pod asks for no GPU, so {served} "
            "has none to run on; pass --gpu 1"
        )
    precision = str(config.options.get("precision", "fp32"))
    if runtime_name in FP32_ONLY and precision != "fp32":
        warnings.append(
            f"{config.source.name} has options.precision {precision}, but {served} ignores it and runs fp32; "
            "onnxruntime, openvino, torch and tensorrt honour it"
        )
    return warnings


@dataclass(frozen=True)
class Builder:
    """The builder image a runtime needs: which Dockerfile, with which --build-arg, tagged how."""

    dockerfile: str = DOCKERFILE
    build_args: tuple[str, ...] = ()
    tag: str = BUILDER_TAG
    note: str = ""  # what no build argument can add (pycaffe)

    @property
    def is_default(self) -> bool:
        return self.dockerfile == DOCKERFILE and not self.build_args and not self.note

    def command(self) -> str:
        """The `docker build` line, run from the seldon-caffe repository."""
        args = "".join(f" --build-arg {arg}" for arg in self.build_args)
        return f"docker build -f {self.dockerfile}{args} -t {self.tag} ."


def builder(config: ModelConfig, runtime_name: str) -> Builder:
    """How to build the s2i builder image that serves `config` with `runtime_name`."""
    on_cuda = str(config.options.get("device", "cpu")).startswith("cuda")
    if runtime_name == "tensorrt":
        return Builder(GPU_DOCKERFILE, ("WITH_TENSORRT=1",), "seldon-caffe-s2i-trt:0.1.0")
    if runtime_name == "onnxruntime" and on_cuda:  # s2i/Dockerfile's onnxruntime is the CPU build
        return Builder(GPU_DOCKERFILE, (), "seldon-caffe-s2i-gpu:0.1.0")
    if runtime_name == "pycaffe":
        return Builder(note="no builder image has pycaffe: build FROM an image with Caffe, or use runtime opencv")
    arg = build_arg(runtime_name, config.format)
    if not arg:
        return Builder()
    extras = arg.partition("=")[2]
    return Builder(build_args=(arg,), tag=f"seldon-caffe-s2i-{extras.replace(',', '-')}:0.1.0")


def build_arg(runtime_name: str, fmt: str = "onnx") -> str:
    """`EXTRAS=...` for s2i/Dockerfile when `runtime_name` needs more than its default, else "".

    The extra comes from the runtime's install hint in runtimes.REGISTRY (seldon-caffe[X]);
    a Caffe net served through its ONNX conversion also keeps `onnx`, which converts it.
    """
    found = _EXTRA.search(REGISTRY[runtime_name].install)
    extras = [found.group(1)] if found else []
    if fmt == "caffe" and runtime_name in THROUGH_ONNX and "onnx" not in extras:
        extras.insert(0, "onnx")
    if not extras or set(extras) <= set(DEFAULT_EXTRAS):
        return ""
    return "EXTRAS=" + ",".join(extras)


def served_file(config: ModelConfig, runtime_name: str) -> Path:
    """The file `runtime_name` actually loads for `config`: the quantized `.int8.onnx` for int8,
    the cached ONNX conversion for a Caffe net on an ONNX engine, else the model's own file.

    For the conversion this finds the cache entry the load wrote (or writes it).
    """
    from .runtimes import _onnx_source

    onnx_engines = ("onnxruntime", "openvino")
    if config.options.get("precision") == "int8" and runtime_name in onnx_engines:
        return _onnx_source.int8_model_path(config)
    if config.format == "caffe" and runtime_name in THROUGH_ONNX:
        return _onnx_source.converted_caffe_model(config)
    key = {"caffe": "weights"}.get(config.format, FORMAT_FILES[config.format][0])
    return config.files[key]


def _served_by(config: ModelConfig, runtime_name: str) -> str:
    if config.runtime == "auto":
        return f"runtime {runtime_name} (what runtime: auto chooses for format {config.format})"
    return f"runtime {runtime_name}"


def _cpu_only(runtime_name: str, on_cuda: bool) -> str:
    if runtime_name == "openvino" and on_cuda:  # not ignored: the openvino runtime refuses it
        return "refuses options.device cuda when it loads"
    return "ignores the GPU"


def _gpu_choices(fmt: str) -> str:
    choices = [text for name, text in GPU_RUNTIMES.items() if name in FORMAT_RUNTIMES[fmt]]
    if not choices:
        return "no runtime for this format uses a GPU"
    return "runtimes that use it: " + ", ".join(choices)


def _with_device(config: ModelConfig, device: str) -> ModelConfig:
    return replace(config, options={**config.options, "device": device})
