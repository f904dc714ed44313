"""The ONNX file the onnxruntime and openvino runtimes load, whatever the model directory holds.

* `format: onnx` -> the user's file, as is.
* `format: caffe` -> converted on load (seldon_caffe.caffe.to_onnx) at the net's warm-up
  input shapes (runtimes/caffe_model.py) and cached as `MODEL_DIR/.cache/onnx/<key>.onnx`,
  where the key hashes the prototxt and caffemodel bytes, the converter version, those
  shapes and the blobs answered: editing either file or model.yaml's inputs / outputs, or
  upgrading the converter, converts again; restarting a server does not. A read-only model
  directory (a mounted volume, a Seldon storage initializer's output) falls back to the
  user's cache directory. The user's own files are never written. Other input sizes a
  request brings are converted in memory (runtimes/per_shape.py), never written: a client
  choosing sizes must not be able to fill a disk.
* `precision: int8` -> the quantized model `seldon-caffe quantize` wrote, found beside the
  model file under the name `int8_model_path` gives (see there), never made implicitly:
  calibration needs data only the user has.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

from ..caffe.converter_version import CONVERTER_VERSION
from ..config import ModelConfig
from ..errors import ConfigError, ModelLoadError
from ..paths import cache_dir
from .base import TensorSpec
from .caffe_model import CaffeModel

logger = logging.getLogger(__name__)

CACHE_SUBDIR = Path(".cache") / "onnx"
INT8_SUFFIX = ".int8.onnx"


def onnx_model_path(config: ModelConfig, runtime: str) -> Path:
    """The ONNX file `runtime` should load for `config` (converting a Caffe model if needed)."""
    if config.options["precision"] == "int8":
        return int8_model_path(config, must_exist=True)
    if config.format == "onnx":
        return config.files["onnx"]
    if config.format == "caffe":
        return converted_caffe_model(config)
    raise ModelLoadError(
        f"{config.source}: the {runtime} runtime serves format onnx or caffe, not {config.format}; "
        f"convert the model to ONNX first and use format: onnx"
    )


def int8_model_path(config: ModelConfig, must_exist: bool = False) -> Path:
    """Where the INT8 model is expected: options.int8_model (relative to the model directory),
    else the model file's name with `.int8.onnx` (model.onnx -> model.int8.onnx; for Caffe,
    weights.caffemodel -> weights.int8.onnx), which is what the error message tells users
    to produce with `seldon-caffe quantize`."""
    explicit = config.options.get("int8_model")
    if explicit is not None:
        if not isinstance(explicit, str):
            raise ConfigError(f"{config.source}: field 'options.int8_model': expected a file name, got {explicit!r}")
        path = (config.model_dir / explicit).resolve()
    else:
        source = config.files.get("onnx") or config.files.get("weights")
        if source is None:
            raise ModelLoadError(f"{config.source}: precision int8 needs format onnx or caffe")
        path = source.with_name(source.name.rsplit(".", 1)[0] + INT8_SUFFIX)
    if must_exist and not path.is_file():
        if config.format == "caffe":
            files = f"{config.files['prototxt'].name} {config.files['weights'].name}"
            make = (
                f"seldon-caffe convert caffe {files} -o model.onnx"
                f" && seldon-caffe quantize model.onnx --calibration DIR -o {path.name}"
            )
        else:
            make = f"seldon-caffe quantize {config.files['onnx'].name} --calibration DIR -o {path.name}"
        raise ModelLoadError(
            f"{config.source}: precision int8 needs the quantized model {path}, which does not exist; "
            f"make it in the model directory with: {make} (DIR: .npy/.npz inputs like the ones you serve)"
        )
    return path


def converted_caffe_model(config: ModelConfig, model: CaffeModel | None = None) -> Path:
    """The cached ONNX conversion of the config's Caffe files at the warm-up shapes of
    `model` (made from `config` when not given), converting on a miss."""
    model = model or CaffeModel.from_config(config)
    digest = hashlib.sha256(f"seldon-caffe onnx converter {CONVERTER_VERSION}\n".encode())
    for role in ("prototxt", "weights"):
        digest.update(f"{role}\n".encode())
        with open(config.files[role], "rb") as handle:
            for chunk in iter(functools.partial(handle.read, 1 << 20), b""):
                digest.update(chunk)
    served = {"inputs": {name: list(shape) for name, shape in model.warm_shapes.items()}, "outputs": model.output_names}
    digest.update(f"served\n{served}\n".encode())
    name = f"{digest.hexdigest()}.onnx"
    directories = [config.model_dir / CACHE_SUBDIR, cache_dir("onnx")]
    for directory in directories:
        if (directory / name).is_file():
            logger.debug("using the cached ONNX conversion %s", directory / name)
            return directory / name
    for directory in directories:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return _convert(model, directory / name)
        except OSError as exc:  # read-only, not ours, full: try the next place
            logger.warning("cannot cache the ONNX conversion in %s (%s)", directory, exc.strerror or exc)
    raise ModelLoadError(
        f"{config.source}: cannot write the ONNX conversion to any of {', '.join(map(str, directories))}"
    )


def _convert(model: CaffeModel, target: Path) -> Path:
    from ..caffe.to_onnx import write_onnx

    logger.debug("converting %s to ONNX at %s", model.source, target)
    write_onnx(model.to_onnx(), target)
    logger.info(
        "cached the ONNX conversion at %s (reused until the prototxt, caffemodel, model.yaml inputs / outputs "
        "or converter change)",
        target,
    )
    return target


def tensor_spec(name: str, dtype: str, dims: Sequence[object]) -> TensorSpec:
    """A TensorSpec from an engine's description: any dim that is not a number is -1."""
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)
    return TensorSpec(name=name, dtype=dtype, shape=shape)
