"""The `torch` runtime: a TorchScript archive or an ExportedProgram (.pt2), on CPU or a GPU.

dl_inference served PyTorch through Triton's libtorch backend, with a config.txt saying what
goes in and out. This runtime serves the same files in this process, behind the same hooks
as every other runtime, so a PyTorch model needs neither Triton nor a conversion. How to
save a model for it, and what each option costs: docs/torch.md.

Why it looks the way it does:

* The signature. A TorchScript file names no inputs and records no shapes, so they come
  from model.yaml `inputs:`, else dl_inference's config.txt beside it, else (ExportedProgram
  only) the program's own input metadata; with none of them, loading stops with an example
  to add. Outputs named nowhere are found by running the model: `o`, `o0, o1...`, dict keys
  (runtimes/torch_signature.py).
* A Caffe net runs as its ONNX conversion rebuilt in torch.fx, one module per input shape
  where its inputs have free dims (runtimes/caffe_torch.py, per_shape.py); `shape_cache`
  bounds how many are kept (default 8).
* A warm-up run at load, on zeros, so a model that cannot run on its declared inputs, on the
  chosen device or in the chosen precision stops start-up instead of failing a request.
* Precision is converted once for the model and per request on the device for float inputs;
  outputs come back in their declared dtype (float32 unless a signature says otherwise), so
  a client never sees fp16 it did not ask for.
* CUDA graphs replay one captured graph per input shape: all kernels launch as one, which is
  what keeps small batches fast on a GPU. The graph reads and writes fixed buffers, so the
  requests that use graphs take turns (a lock); everything else runs concurrently, as a
  TorchScript module (or a GraphModule) may be called from several threads at once.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ModelConfig
from ..engines.description import FILE_NAME as DESCRIPTION_FILE
from ..engines.description import load_description
from ..engines.torch import import_torch, load_saved, torch_file_kind
from ..errors import BadRequest, ModelLoadError, SeldonCaffeError
from .base import Arrays, Runtime, TensorSpec, check_finite
from .builtin import TorchOptions
from .caffe_model import CaffeModel
from .caffe_torch import load_caffe
from .options import cuda_index
from .torch_signature import described_entries, input_specs, numpy_dtype, output_entries, program_inputs

logger = logging.getLogger(__name__)
if TYPE_CHECKING:  # mypy reads torch's own types; at run time, import_torch decides how it loads
    import torch
else:
    torch = import_torch()  # before anything imports triton: see import_torch

REDUCED = {"fp16": torch.float16, "bf16": torch.bfloat16}
KINDS = {"torchscript": "TorchScript archive", "exported_program": "ExportedProgram", "caffe": "Caffe net"}
MAX_GRAPHS = 16  # distinct input shapes captured; later ones run without a graph (each costs GPU memory)
GRAPH_WARMUP = 3  # runs on a side stream before a capture: TorchScript optimises during its first runs
# An error the model raises on an input that passed the signature (a size a layer cannot take,
# an ExportedProgram's shape guard) is the client's: a 400 saying what was expected.
_INPUT_ERROR = re.compile(r"shape|size|dimension|channels|Guard failed", re.IGNORECASE)


class TorchRuntime(Runtime):
    """A TorchScript module or an ExportedProgram's module. `native` is that module."""

    name = "torch"

    def __init__(self, config: ModelConfig, caffe: CaffeModel | None = None):
        """`caffe`: serve this Caffe net (e.g. one made in memory) instead of the config's files."""
        self.options = TorchOptions.from_config(config)
        self.device = torch_device(self.options.device)
        self.checks_finite_on_device = self.device.type == "cuda"
        torch.set_num_threads(self.options.threads)  # per process: the last model loaded sets it
        if self.device.type == "cuda":
            set_cuda_precision(self.options)
        if config.format == "caffe" or caffe is not None:  # one module per input shape (caffe_torch.py)
            found: list[dict[str, Any]] | None
            self.kind, program = "caffe", None
            path, module, found = load_caffe(config, self.device, self.options.shape_cache, caffe)
            self.path = path or Path(module.model.source)
            self.example_shapes = dict(module.model.warm_shapes)
        else:
            self.path = Path(config.files["torchscript"])
            self.kind = archive_kind(self.path)
            module, program = load_module(self.path, self.kind, self.device)
            found = program_inputs(program) if program is not None else None
        self._dtype = REDUCED.get(self.options.precision)
        if self._dtype is not None:
            module = module.to(self._dtype)
        if self.options.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.native = module
        described = config.model_dir / DESCRIPTION_FILE
        description = load_description(described) if described.is_file() else None
        self.max_batch = description.batch_size if description else 0
        self.described_in = description.where if description else DESCRIPTION_FILE
        if description is not None:
            found = described_entries(description.inputs)
        self.inputs = input_specs(config, found, self.path)
        self._graphs: dict[tuple, tuple[list, list, Any]] | None = {} if self.options.cuda_graphs else None
        self._graph_lock = threading.Lock()
        self._picks: list[tuple[Any, torch.dtype]] = []
        self.outputs = self._warm_up(config, description)
        if self.kind == "caffe":  # the net's shape rules know which dims follow a free input dim
            shapes = {spec.name: spec.shape for spec in module.model.outputs}
            self.outputs = [replace(spec, shape=shapes.get(spec.name, spec.shape)) for spec in self.outputs]
        extras = "".join(f", {k}" for k in ("channels_last", "cuda_graphs", "tf32") if getattr(self.options, k))
        served = config.files.get("weights", self.path).name  # a Caffe net: its caffemodel, not the cache
        how = f"{KINDS[self.kind]} {served} on {self.device}, {self.options.precision}{extras}"
        logger.info("torch %s: %s; %s", torch.__version__, how, self.signature())

    # -- requests ---------------------------------------------------------------------

    def check_inputs(self, inputs: np.ndarray | Mapping[str, Any]) -> Arrays:
        feed = super().check_inputs(inputs)
        for name, array in feed.items():  # config.txt's batch_size is the largest batch served
            if self.max_batch and array.ndim and array.shape[0] > self.max_batch:
                raise BadRequest(
                    f"input {name!r} has batch {array.shape[0]}; {self.described_in} allows up to {self.max_batch}"
                )
        return feed

    def _run(self, feed: Arrays, outputs: list[str]) -> Arrays:
        arrays = [feed[spec.name] for spec in self.inputs]
        try:
            with torch.inference_mode():
                results = self._replay(arrays) if self._graphs is not None else self._eager(arrays)
        except (torch.cuda.OutOfMemoryError, BadRequest):
            raise
        except (RuntimeError, ValueError, IndexError, AssertionError) as exc:
            message = engine_message(exc)
            if not _INPUT_ERROR.search(message) or message.startswith("CUDA error"):
                raise  # not the request's fault: a 500 naming the exception
            raise BadRequest(f"the model rejected the input: {message}; expected {self.signature()}") from None
        index = {spec.name: i for i, spec in enumerate(self.outputs)}
        return {name: results[index[name]].numpy() for name in outputs}

    def _eager(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        tensors = [torch.from_numpy(array).to(self.device) for array in arrays]
        self._check_uploaded(tensors, arrays)
        return [t.cpu() for t in self._compute(tensors)]

    def _check_uploaded(self, tensors: list[torch.Tensor], arrays: list[np.ndarray]) -> None:
        """NaN/Inf, checked on the GPU (base.check_inputs leaves it to us there)."""
        if not self.checks_finite_on_device or self.allow_non_finite:
            return
        for spec, tensor, array in zip(self.inputs, tensors, arrays, strict=True):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                check_finite(spec.name, array)  # the host pass, only to say where

    def _compute(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Device tensors in the signature's dtypes -> the outputs, cast to their declared dtypes."""
        result = self.native(*[self._convert(t) for t in tensors])
        return [(result if key is None else result[key]).to(dtype) for key, dtype in self._picks]

    def _convert(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self._dtype)
        if self.options.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    # -- CUDA graphs --------------------------------------------------------------------

    def _replay(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Run through the graph captured for these shapes (capturing it the first time)."""
        key = tuple(array.shape for array in arrays)
        with self._graph_lock, torch.cuda.device(self.device):
            graphs = self._graphs
            assert graphs is not None  # _run replays only when cuda_graphs is on; close() keeps it a dict
            graph = graphs.get(key)
            if graph is None:
                if len(graphs) >= MAX_GRAPHS:
                    logger.warning("%d input shapes have CUDA graphs already; %s runs without one", MAX_GRAPHS, key)
                    return self._eager(arrays)
                graph = graphs[key] = self._capture(arrays)
            static_in, static_out, cuda_graph = graph
            for buffer, array in zip(static_in, arrays, strict=True):
                buffer.copy_(torch.from_numpy(array))
            self._check_uploaded(static_in, arrays)
            cuda_graph.replay()
            return [t.cpu() for t in static_out]  # copied out before the next request may replay

    def _capture(self, arrays: list[np.ndarray]) -> tuple[list, list, Any]:
        static_in = [torch.from_numpy(array).to(self.device) for array in arrays]
        self._check_uploaded(static_in, arrays)  # a capture on NaN would still be a good graph; the request is not
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # a capture must not be the first run: allocations, cuDNN choices
            for _ in range(GRAPH_WARMUP):
                self._compute(static_in)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use the GPU
            static_out = self._compute(static_in)
        logger.info("captured a CUDA graph for input shapes %s", [list(a.shape) for a in arrays])
        return static_in, static_out, graph

    # -- load -------------------------------------------------------------------------

    def _warm_up(self, config: ModelConfig, description: Any) -> list[TensorSpec]:
        """Run on zeros, any-size dims 1 and then 2: fail now, and learn the outputs' dims."""
        sizes = (1, 2) if any(-1 in s.shape for s in self.inputs) else (1,)
        runs = []
        for size in sizes:
            zeros = [np.zeros(self._example(s, size), s.dtype) for s in self.inputs]
            try:
                with torch.inference_mode():
                    runs.append(self.native(*[self._convert(torch.from_numpy(z).to(self.device)) for z in zeros]))
                if self.device.type == "cuda":  # a kernel's error shows only when the GPU gets to it
                    torch.cuda.synchronize(self.device)
            except Exception as exc:  # whatever the model raises: start-up stops with it
                shapes = ", ".join(f"{s.name}{list(z.shape)}" for s, z in zip(self.inputs, zeros, strict=True))
                raise ModelLoadError(
                    f"{self.path}: the warm-up run on zeros ({shapes}) failed on {self.device}, "
                    f"{self.options.precision}: {engine_message(exc)}; check the inputs' names, dtypes and shapes "
                    "(model.yaml inputs or config.txt), in forward()'s argument order"
                ) from None
        specs = []
        for i, (entry, key, value) in enumerate(output_entries(runs[0], description, config, self.path)):
            shape = tuple(value.shape)
            other = runs[-1] if key is None else runs[-1][key]
            if other.dim() == len(shape):  # a dim that followed the inputs' from 1 to 2 is any size
                shape = tuple(-1 if a != b else a for a, b in zip(shape, other.shape, strict=True))
            # An fp16/bf16 output of a model this runtime converted is float32 to the client.
            reduced = value.dtype in (self._dtype, torch.bfloat16)
            found = "float32" if reduced else str(value.dtype).removeprefix("torch.")
            dtype = numpy_dtype(entry.get("dtype") or found, f"outputs[{i}].dtype", config)
            specs.append(TensorSpec(entry["name"], dtype, tuple(entry.get("shape") or shape)))
            self._picks.append((key, getattr(torch, dtype)))
        return specs

    def _example(self, spec: TensorSpec, size: int) -> list[int]:
        """A warm-up shape: any-size dims at `size`, or the example shape's (a Caffe net's free
        image dims, where 1 or 2 would be no image at all), with the batch at `size`."""
        dims = [size if d == -1 else d for d in spec.shape]
        example = (self.example_shapes or {}).get(spec.name)
        return dims if example is None else [dims[0], *example[1:]]

    def close(self) -> None:
        with self._graph_lock:
            self._graphs = {} if self._graphs is not None else None
        self.native = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# -- the file -------------------------------------------------------------------------------


def torch_device(device: str) -> torch.device:
    """options.device as a torch.device, or a ModelLoadError saying why this machine lacks it."""
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ModelLoadError(
            f"options.device {device!r}: torch.cuda.is_available() is false on this machine (torch "
            f"{torch.__version__}, {build}): no GPU or driver is visible. Use device: cpu, or run where a GPU is"
        )
    index, count = cuda_index(device) or 0, torch.cuda.device_count()
    if index >= count:
        raise ModelLoadError(f"options.device {device!r}: torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def archive_kind(path: Path) -> str:
    """`torchscript` or `exported_program`, told by what is inside the file (as `convert torch` does)."""
    try:
        kind = torch_file_kind(path)
    except SeldonCaffeError:
        kind = None  # not a zip, or not one torch wrote
    how = (
        "save one with torch.export.save(torch.export.export(model.eval(), example_inputs), 'model.pt2') "
        "or torch.jit.save(torch.jit.script(model.eval()), 'model.pt')"
    )
    if kind == "pickle":
        raise ModelLoadError(
            f"{path}: a torch.save() checkpoint (a state_dict or a pickled module), which holds weights but no "
            f"code to run; the torch runtime serves a TorchScript archive or an ExportedProgram: {how}"
        )
    if kind is None:
        raise ModelLoadError(f"{path}: not a TorchScript archive (torch.jit.save) or an ExportedProgram (.pt2): {how}")
    return kind


def load_module(path: Path, kind: str, device: torch.device) -> tuple[Any, Any]:
    """(module to call, its ExportedProgram or None), on `device`, in eval mode where it has one."""
    try:
        saved = load_saved(path, kind, map_location=device)
    except Exception as exc:  # torch raises RuntimeError, pickle and zip errors... for a bad file
        raise ModelLoadError(f"{path}: cannot load this {KINDS[kind]}: {engine_message(exc)}") from None
    if kind == "torchscript":
        return saved, None
    program = saved
    if device.type != "cpu":
        try:
            from torch.export.passes import move_to_device_pass
        except ImportError:  # older torch: move the parameters and buffers only
            return program.module().to(device), program
        program = move_to_device_pass(program, device)
    # An ExportedProgram keeps the train/eval mode it was exported in (export in eval mode).
    return program.module(), program


def set_cuda_precision(options: TorchOptions) -> None:
    """Process-wide CUDA settings. fp32 means fp32: TF32 (a 10-bit mantissa), which torch lets
    cuDNN use for convolutions by default, is used only when `options.tf32` asks for it."""
    torch.backends.cudnn.benchmark = options.cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = options.tf32
    torch.backends.cuda.matmul.allow_tf32 = options.tf32


def engine_message(exc: BaseException) -> str:
    """The line of a torch error that says what went wrong (TorchScript puts its traceback first)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    for line in reversed(lines):
        match = re.match(r"^\w*(?:Error|Exception): (.+)", line)
        if match:
            return match.group(1)[:500]
    return (lines[0] if lines else type(exc).__name__)[:500]
