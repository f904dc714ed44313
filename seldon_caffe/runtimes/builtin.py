"""The built-in runtimes' declarations and options, importing no engine (runtimes/registry.py).

Each options class below is its runtime's declaration: `@register_runtime` says what the
runtime serves, and `target` where its class is, imported only when a model.yaml chooses
it. The order here is the registry's: within a format, the runtimes `auto` may choose come
first, then the others, in this order (config.FORMAT_RUNTIMES, the `--runtime` choices).
What each option does: the runtime module's docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .options import Options, choice, flag, integer, read, seconds, strings, text
from .registry import register_runtime

Problem = Callable[[str, str], ConfigError]
_HERE = __package__
# A Caffe net whose inputs have free dims (any image size) is converted and loaded once per
# input shape on the ONNX engines; `shape_cache` engines are kept, least recently used out
# (runtimes/per_shape.py). Each holds a copy of the weights: 8 x a 100 MB net is 800 MB.
SHAPE_CACHE = 8


@register_runtime(
    "pycaffe",
    target=f"{_HERE}.pycaffe:PycaffeRuntime",
    formats=("caffe",),
    default_for=("caffe",),
    files={"caffe": {"prototxt": "deploy.prototxt", "weights": "weights.caffemodel"}},
    install="caffe (Debian python3-caffe or conda)",
)
@dataclass(frozen=True)
class PycaffeOptions(Options):
    timeout_s: float = seconds(60.0)  # one exchange with the worker (pycaffe_process.DEFAULT_TIMEOUT_S)
    spare_worker: bool = flag(True)


@register_runtime(
    "opencv",
    target=f"{_HERE}.opencv:OpenCVRuntime",
    formats=("caffe",),
    default_for=("caffe",),
    install="opencv-python-headless",
)
@dataclass(frozen=True)
class OpenCVOptions(Options):
    pass


INT8_MODEL = "a file name (the quantized model, relative to the model directory)"
GRAPH_OPTIMIZATIONS = ("all", "extended", "basic", "disable")


@register_runtime(
    "onnxruntime",
    target=f"{_HERE}.onnxruntime:OnnxRuntime",
    formats=("caffe", "onnx", "tensorflow"),
    default_for=("onnx", "caffe"),
    files={"onnx": {"onnx": "model.onnx"}},
    install="seldon-caffe[onnx]",
)
@dataclass(frozen=True)
class OnnxRuntimeOptions(Options):
    providers: tuple[str, ...] | None = strings(None, "a list of execution providers, e.g. [cuda, cpu]")
    graph_optimization: str = choice("all", GRAPH_OPTIMIZATIONS)
    int8_model: str | None = text(None, INT8_MODEL)
    shape_cache: int = integer(SHAPE_CACHE, 1)

    def check(self, problem: Problem) -> None:
        if self.precision == "bf16":
            raise problem("precision", "bf16 is served by the openvino runtime")


PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")


@register_runtime(
    "openvino",
    target=f"{_HERE}.openvino:OpenVinoRuntime",
    formats=("caffe", "onnx", "tensorflow"),
    default_for=("caffe",),
    install="seldon-caffe[openvino]",
)
@dataclass(frozen=True)
class OpenVinoOptions(Options):
    performance_hint: str = choice("LATENCY", PERFORMANCE_HINTS, upper=True)
    cpu_pinning: bool = flag(False)
    int8_model: str | None = text(None, INT8_MODEL)
    shape_cache: int = integer(SHAPE_CACHE, 1)

    def check(self, problem: Problem) -> None:
        if self.device != "cpu":
            raise problem("device", "the openvino runtime runs on cpu")


ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"
DEFAULT_SIGNATURE = "serving_default"
# Each request is one graph run; a single inter-op thread keeps oneDNN's intra-op pool fed
# without two ops fighting for the same cores (docs/benchmarks.md, "TensorFlow on CPU").
DEFAULT_INTER_OP = 1


def _onednn(value: Any, problem: Callable[[str], ConfigError]) -> bool | str:
    # auto leaves TF_ENABLE_ONEDNN_OPTS alone: TensorFlow then turns oneDNN on only on CPUs
    # with AVX-512 VNNI/BF16 or AMX, which is where it measured faster (docs/tensorflow.md).
    if isinstance(value, bool) or value == "auto":
        return value
    raise problem(f"{value!r} is not true, false or auto")


@register_runtime(
    "tensorflow",
    target=f"{_HERE}.tensorflow:TensorFlowRuntime",
    formats=("tensorflow",),
    default_for=("tensorflow",),
    files={"tensorflow": {"saved_model": "saved_model/"}},
    install="seldon-caffe[tensorflow]",
)
@dataclass(frozen=True)
class TensorFlowOptions(Options):
    """The tensorflow runtime's options; `intra_op` defaults to `threads`."""

    signature: str = text(DEFAULT_SIGNATURE, f"a signature name (e.g. {DEFAULT_SIGNATURE})")
    tags: tuple[str, ...] | None = strings(None, "a list of SavedModel tags (e.g. [serve])", one=True)
    intra_op: int | None = integer(None, 0)
    inter_op: int = integer(DEFAULT_INTER_OP, 0)
    onednn: bool | str = read(True, _onednn)  # or "auto": TensorFlow's own choice for the CPU
    omp_num_threads: int | None = integer(None, 1)
    kmp_blocktime: int | None = integer(None, 0)
    kmp_affinity: str | None = text(None, "a KMP_AFFINITY string (e.g. granularity=fine,compact,1,0)")
    kmp_settings: bool | None = flag(None)

    def __post_init__(self) -> None:
        if self.intra_op is None:
            object.__setattr__(self, "intra_op", self.threads)

    def check(self, problem: Problem) -> None:
        if self.precision != "fp32":
            raise problem(
                "precision",
                f"{self.precision!r}: the tensorflow runtime runs the SavedModel's own dtypes; "
                "allowed: fp32 (export a reduced-precision model, or serve its ONNX form with openvino)",
            )

    def environment(self) -> dict[str, str]:
        """The variables that must be in os.environ before TensorFlow (and OpenMP) load."""
        env = {} if self.onednn == "auto" else {ONEDNN_ENV: "1" if self.onednn else "0"}
        if self.omp_num_threads is not None:
            env["OMP_NUM_THREADS"] = str(self.omp_num_threads)
        if self.kmp_blocktime is not None:
            env["KMP_BLOCKTIME"] = str(self.kmp_blocktime)
        if self.kmp_affinity is not None:
            env["KMP_AFFINITY"] = self.kmp_affinity
        if self.kmp_settings is not None:
            env["KMP_SETTINGS"] = "1" if self.kmp_settings else "0"
        return env


@register_runtime(
    "torch",
    target=f"{_HERE}.torch:TorchRuntime",
    formats=("caffe", "torch"),
    default_for=("torch",),
    files={"torch": {"torchscript": ("model.pt", ".pth", ".torchscript")}},
    install="seldon-caffe[torch]",
)
@dataclass(frozen=True)
class TorchOptions(Options):
    channels_last: bool = flag(False)
    cuda_graphs: bool = flag(False)
    cudnn_benchmark: bool = flag(True)
    tf32: bool = flag(False)
    shape_cache: int = integer(SHAPE_CACHE, 1)

    def check(self, problem: Problem) -> None:
        device, precision = self.device, self.precision
        if precision == "int8":
            raise problem(
                "precision",
                "int8: the torch runtime has no int8 path; convert the model to ONNX (`seldon-caffe convert torch`), "
                "then quantize it (`seldon-caffe quantize`) for onnxruntime or openvino, or build an int8 plan "
                "(`seldon-caffe convert tensorrt --precision int8`) for the tensorrt runtime",
            )
        if precision == "fp16" and not self.on_cuda:
            raise problem(
                "precision", "fp16 needs device cuda (CPUs have no fast fp16 kernels); on cpu use fp32 or bf16"
            )
        if self.cuda_graphs and not self.on_cuda:
            raise problem("cuda_graphs", f"CUDA graphs need device cuda or cuda:N; device is {device}")
        if self.tf32 and (not self.on_cuda or precision != "fp32"):
            raise problem("tf32", f"TF32 is a form of fp32 on a GPU; device is {device}, precision {precision}")


@register_runtime(
    "tensorrt",
    target=f"{_HERE}.tensorrt:TensorRTRuntime",
    formats=("caffe", "onnx", "tensorrt"),
    default_for=("tensorrt",),
    files={"tensorrt": {"plan": ("model.plan", ".engine")}},
    install="tensorrt (NVIDIA)",
)
@dataclass(frozen=True)
class TensorRTOptions(Options):
    pass
