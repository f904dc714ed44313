"""model.yaml: load it, validate it, fill in the defaults.

Every mistake is a ConfigError naming the file, the field and what is allowed, because the
person reading it is deploying a model and has nothing else to go on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .batching import BatchingConfig, parse_batching
from .errors import ConfigError
from .runtimes import registry
from .runtimes.options import Options

CONFIG_FILE = "model.yaml"
MODEL_DIR_ENV = "SELDON_CAFFE_MODEL_DIR"
PARAMETERS_ENV = "PREDICTIVE_UNIT_PARAMETERS"  # Seldon's: [{"name", "value", "type"}]
DEFAULT_MODEL_DIR = "/mnt/models"  # where Seldon's and KServe's storage initializers put the model

# format -> the keys of `files` it needs; format -> the runtimes that can serve it ("auto" is
# always allowed). Both are derived from the runtimes' declarations (runtimes/registry.py).
FORMAT_FILES = registry.FORMAT_FILES
FORMAT_RUNTIMES = registry.FORMAT_RUNTIMES

# The options every runtime takes (runtimes/options.py): threads, device, precision,
# pycaffe_command, allow_non_finite. A runtime's own options are checked when it loads.
DEFAULT_OPTIONS: dict[str, Any] = Options.defaults()
TOP_LEVEL = ("name", "format", "files", "runtime", "options", "hooks", "inputs", "outputs", "batching")


@dataclass
class ModelConfig:
    """A validated model.yaml. Paths in `files` and `hooks` are absolute."""

    model_dir: Path
    name: str
    format: str
    files: dict[str, Path]
    runtime: str = "auto"
    options: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_OPTIONS))
    hooks: Path | None = None
    inputs: list[dict[str, Any]] | None = None
    outputs: list[dict[str, Any]] | None = None
    batching: BatchingConfig | None = None  # off when model.yaml has no `batching:`

    @property
    def source(self) -> Path:
        return self.model_dir / CONFIG_FILE


def load_config(model_dir: str | Path, runtime: str | None = None) -> ModelConfig:
    """Read MODEL_DIR/model.yaml. `runtime`, when given, overrides the file's choice."""
    model_dir = Path(model_dir).resolve()
    path = model_dir / CONFIG_FILE
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: no such model directory")
    if not path.is_file():
        raise ConfigError(f"{path}: not found (every model directory needs a model.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of fields ({', '.join(TOP_LEVEL)})")
    return parse_config(raw, model_dir, runtime)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: what is wrong, and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def parse_config(raw: dict[str, Any], model_dir: Path, runtime: str | None = None) -> ModelConfig:
    path = model_dir / CONFIG_FILE
    problem = _Reporter(path)
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        problem(unknown[0], f"unknown field; allowed: {', '.join(TOP_LEVEL)}")

    fmt = raw.get("format", "caffe")
    if fmt not in FORMAT_FILES:
        problem("format", f"{fmt!r} is not a format; allowed: {', '.join(FORMAT_FILES)}")
    runtime = runtime or raw.get("runtime") or "auto"
    allowed = ("auto", *FORMAT_RUNTIMES[fmt])
    if runtime not in allowed:
        problem("runtime", f"{runtime!r} cannot serve format {fmt}; allowed: {', '.join(allowed)}")

    return ModelConfig(
        model_dir=model_dir,
        name=str(raw.get("name") or model_dir.name),
        format=fmt,
        files=_files(raw.get("files"), fmt, model_dir, problem),
        runtime=runtime,
        options=_options(raw.get("options"), problem),
        hooks=_hooks(raw, model_dir, problem),
        inputs=_signature(raw.get("inputs"), "inputs", problem),
        outputs=_signature(raw.get("outputs"), "outputs", problem),
        batching=parse_batching(raw.get("batching"), problem),
    )


class _Reporter:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, field_name: str, message: str) -> None:
        raise self.error(field_name, message)

    def error(self, field_name: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: field '{field_name}': {message}")


def _files(files: Any, fmt: str, model_dir: Path, problem: _Reporter) -> dict[str, Path]:
    needed = FORMAT_FILES[fmt]
    example = ", ".join(f"{key}: ..." for key in needed)
    if not isinstance(files, dict):
        problem("files", f"required for format {fmt}: {{{example}}}")
    resolved = {}
    for key in needed:
        if not files.get(key):
            problem(f"files.{key}", f"required for format {fmt}: {{{example}}}")
        file = (model_dir / str(files[key])).resolve()
        if not file.exists():
            problem(f"files.{key}", f"{file} does not exist")
        resolved[key] = file
    extra = sorted(set(files) - set(needed))
    if extra:
        problem(f"files.{extra[0]}", f"not a file of format {fmt}; expected {', '.join(needed)}")
    return resolved


def _options(options: Any, problem: _Reporter) -> dict[str, Any]:
    """The common options checked (the runtime's own are checked when it loads, by its options
    class), defaults filled in."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        problem("options", "expected a mapping, e.g. {threads: 2, device: cpu}")
    Options.read(options, lambda key, message: problem.error(f"options.{key}", message), None, null_is_default=False)
    return {**DEFAULT_OPTIONS, **options}


def _hooks(raw: dict[str, Any], model_dir: Path, problem: _Reporter) -> Path | None:
    if "hooks" in raw and raw["hooks"] is not None:
        hooks = (model_dir / str(raw["hooks"])).resolve()
        if not hooks.is_file():
            problem("hooks", f"{hooks} does not exist")
        return hooks
    default = model_dir / "hooks.py"
    return default if default.is_file() else None


def _signature(specs: Any, key: str, problem: _Reporter) -> list[dict[str, Any]] | None:
    if specs is None:
        return None
    if not isinstance(specs, list):
        problem(key, "expected a list of {name, dtype, shape}")
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "name" not in spec:
            problem(f"{key}[{i}]", "expected {name, dtype, shape} (dtype and shape optional)")
        shape = spec.get("shape")
        if shape is not None and not (isinstance(shape, list) and all(isinstance(d, int) for d in shape)):
            problem(f"{key}[{i}].shape", f"{shape!r} is not a list of integers (-1 = any size)")
        unknown = sorted(set(spec) - {"name", "dtype", "shape"})
        if unknown:
            problem(f"{key}[{i}].{unknown[0]}", "unknown field; allowed: name, dtype, shape")
    return specs


def default_model_dir() -> Path:
    """The model directory when none is given: Seldon's `model_dir` parameter, else
    $SELDON_CAFFE_MODEL_DIR, else /mnt/models."""
    return Path(seldon_parameter("model_dir") or os.environ.get(MODEL_DIR_ENV) or DEFAULT_MODEL_DIR)


def seldon_parameter(name: str) -> str | None:
    """A parameter of the SeldonDeployment's graph ($PREDICTIVE_UNIT_PARAMETERS), or None."""
    try:
        parameters = json.loads(os.environ.get(PARAMETERS_ENV) or "[]")
    except json.JSONDecodeError:
        return None
    values = [p.get("value") for p in parameters if isinstance(p, dict) and p.get("name") == name]
    return str(values[0]) if values else None
