"""The runtime registry: which runtimes exist, what each serves, how to load one.

A runtime is declared once, by a light `RuntimeSpec`: its name, the formats it serves, the
formats for which `runtime: auto` may choose it (`default_for`), the file keys of any format
it introduces (`files`), the install hint for its engine and its options class
(runtimes/options.py). Everything else is derived from the declarations: config.py's
FORMAT_RUNTIMES and FORMAT_FILES, what `auto` means for a format with one default, the
`--runtime` choices, the install hints, the option names `auto` accepts.

Declaring is the `@register_runtime(...)` decorator, on either

* an `Options` subclass, with `target="package.module:Class"`: the declaration imports no
  engine, and the runtime's module (with its engine) is imported only when a model.yaml
  chooses it, so a missing optional engine costs nothing until then. The built-in runtimes
  are declared this way, in runtimes/builtin.py; or
* a `Runtime` subclass itself (its `Options` attribute, default `Options`, is its options
  class): simplest for a runtime whose module imports its engine inside methods.

Another package adds runtimes without forking: an entry point in the group
`seldon_caffe.runtimes` names the module that declares them (the entry point's name is the
runtime's), e.g. in its setup.cfg:

    [options.entry_points]
    seldon_caffe.runtimes =
        tflite = my_package.seldon_runtime

The registry loads the built-ins, then the entry points, the first time it is read (not at
import: `import seldon_caffe.config` stays cheap, and a plugin may import us freely). An entry
point that fails to load is a warning naming it, not a service that cannot start.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConfigError, ModelLoadError
from .options import Options, unknown_option

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .base import Runtime

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "seldon_caffe.runtimes"
_T = TypeVar("_T", bound=type)


@dataclass(frozen=True)
class RuntimeSpec:
    """What the registry knows of a runtime without importing it."""

    name: str
    target: Any  # "package.module:Class", imported on use, or the Runtime class itself
    formats: tuple[str, ...]  # the model.yaml formats it serves
    default_for: tuple[str, ...] = ()  # formats for which `runtime: auto` may choose it
    install: str = ""  # how to install its engine, e.g. seldon-caffe[onnx]
    options: type[Options] = Options
    # the formats it introduces: {format: {key of model.yaml `files`: (placeholder name, other extensions...)}},
    # e.g. {"torch": {"torchscript": ("model.pt", ".pth")}}; a name ending in / is a directory
    files: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    gaps: Mapping[str, str] = field(default_factory=dict)  # Caffe layer type -> why it differs (runtimes/gaps.py)

    def load_class(self) -> type[Runtime]:
        """The Runtime class (importing its module, and so its engine). ImportError when it is missing."""
        if not isinstance(self.target, str):
            return self.target
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)


_SPECS: dict[str, RuntimeSpec] = {}
_version = 0  # bumped by register: the derived views rebuild
_loaded = False


def register(spec: RuntimeSpec) -> RuntimeSpec:
    """Add `spec` to the registry. ValueError for a name taken or a declaration that contradicts itself."""
    global _version
    _load_builtins()
    if spec.name in _SPECS or spec.name == "auto":
        raise ValueError(f"runtime {spec.name!r} is already registered")
    odd = [f for f in (*spec.default_for, *spec.files) if f not in spec.formats]
    if odd:
        raise ValueError(f"runtime {spec.name!r}: format {odd[0]!r} is not among its formats {spec.formats}")
    if not (isinstance(spec.options, type) and issubclass(spec.options, Options)):
        raise ValueError(f"runtime {spec.name!r}: its options class must subclass runtimes.options.Options")
    files = {fmt: {key: (names,) if isinstance(names, str) else tuple(names) for key, names in keys.items()}
             for fmt, keys in spec.files.items()}  # fmt: skip
    spec = replace(spec, files=files)
    bound = spec.options.__dict__.get("runtime")
    if spec.options is Options or (bound and bound != spec.name):
        # each runtime's options class names its runtime in errors: a shared one gets a subclass
        spec = replace(spec, options=type(f"{spec.name}_options", (spec.options,), {}))
    spec.options.runtime = spec.name
    _SPECS[spec.name] = spec
    _version += 1
    return spec


def register_runtime(
    name: str,
    *,
    formats: tuple[str, ...],
    default_for: tuple[str, ...] = (),
    install: str = "",
    files: Mapping[str, Mapping[str, Any]] | None = None,
    gaps: Mapping[str, str] | None = None,
    target: str | None = None,
) -> Callable[[_T], _T]:
    """Declare a runtime: decorate its `Options` subclass (with `target`) or its `Runtime` subclass."""

    def declare(cls: _T) -> _T:
        from .base import Runtime

        options: type[Options]
        if issubclass(cls, Options):
            if not target:
                raise TypeError(f"runtime {name!r}: an options class declares its runtime with target='module:Class'")
            options = cls
        elif issubclass(cls, Runtime):
            options = getattr(cls, "Options", Options)
            if cls.name == Runtime.name:
                cls.name = name
        else:
            raise TypeError(f"@register_runtime decorates an Options or a Runtime subclass, not {cls!r}")
        where = cls if target is None else target
        declared = (tuple(formats), tuple(default_for), install, options, dict(files or {}), dict(gaps or {}))
        register(RuntimeSpec(name, where, *declared))
        return cls

    return declare


# -- loading: the built-ins, then the entry points, once ------------------------------------


def _load_builtins() -> None:
    importlib.import_module(f"{__package__}.builtin")  # registers through the decorator (once)


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True  # first: a plugin that reads the registry while it loads sees what is there
    _load_builtins()
    load_entry_points()


def load_entry_points() -> None:
    """Import the modules that the `seldon_caffe.runtimes` entry points name (they register)."""
    from importlib.metadata import entry_points

    found = entry_points()
    # Python < 3.10 returns a dict of groups: in-process pycaffe imports this package on a caffe
    # root's Python 3.9. mypy checks against 3.12, where there is no .get.
    group = found.select(group=ENTRY_POINT_GROUP) if hasattr(found, "select") else found.get(ENTRY_POINT_GROUP, ())  # type: ignore[attr-defined]
    for entry in group:
        if entry.name in _SPECS:
            continue  # the same distribution seen twice on sys.path, or a name already taken
        try:
            loaded = entry.load()
            if isinstance(loaded, RuntimeSpec) and loaded.name not in _SPECS:
                register(loaded)
        except Exception as exc:  # someone else's package: say so, serve the rest
            logger.warning(
                "the %s entry point %s = %s does not load (%s: %s); runtime %s is unavailable",
                ENTRY_POINT_GROUP,
                entry.name,
                entry.value,
                type(exc).__name__,
                exc,
                entry.name,
            )
            continue
        if entry.name not in _SPECS:
            logger.warning(
                "the %s entry point %s = %s declared no runtime named %s (use @register_runtime(%r, ...))",
                ENTRY_POINT_GROUP,
                entry.name,
                entry.value,
                entry.name,
                entry.name,
            )


# -- what is derived from the declarations ---------------------------------------------------


class _Derived(Mapping):
    """A read-only mapping computed from the registry when first read (and again after a register)."""

    def __init__(self, build: Callable[[], dict[str, Any]]):
        self._build = build
        self._data: dict[str, Any] = {}
        self._built = -1

    def _current(self) -> dict[str, Any]:
        _ensure_loaded()
        if self._built != _version:
            self._data, self._built = self._build(), _version
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._current()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())

    def __repr__(self) -> str:
        return repr(self._current())


def _format_declarations() -> dict[str, Mapping[str, tuple[str, ...]]]:
    found: dict[str, Mapping[str, tuple[str, ...]]] = {}
    for spec in _SPECS.values():
        for fmt, keys in spec.files.items():
            found.setdefault(fmt, keys)  # the first runtime to introduce a format defines it
    return found


def _format_files() -> dict[str, tuple[str, ...]]:
    return {fmt: tuple(keys) for fmt, keys in _format_declarations().items()}


def _placeholder_files() -> dict[str, dict[str, str]]:
    return {fmt: {key: names[0] for key, names in keys.items()} for fmt, keys in _format_declarations().items()}


def _file_extensions() -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    for fmt, keys in _format_declarations().items():
        for key, (placeholder, *others) in keys.items():
            suffix = "" if placeholder.endswith("/") else PurePosixPath(placeholder).suffix
            for extension in (suffix, *others):
                if extension:
                    found.setdefault(extension.lower(), (fmt, key))
    return found


def _format_runtimes() -> dict[str, tuple[str, ...]]:
    """format -> the runtimes that serve it: those `auto` may choose first, then the others,
    each in the order they were registered."""
    result = {}
    for fmt in _format_files():
        defaults = [s.name for s in _SPECS.values() if fmt in s.default_for]
        others = [s.name for s in _SPECS.values() if fmt in s.formats and s.name not in defaults]
        result[fmt] = (*defaults, *others)
    return result


REGISTRY: Mapping[str, RuntimeSpec] = _Derived(lambda: dict(_SPECS))
FORMAT_FILES: Mapping[str, tuple[str, ...]] = _Derived(_format_files)
FORMAT_RUNTIMES: Mapping[str, tuple[str, ...]] = _Derived(_format_runtimes)
PLACEHOLDER_FILES: Mapping[str, dict[str, str]] = _Derived(_placeholder_files)  # what `init` writes first
FILE_EXTENSIONS: Mapping[str, tuple[str, str]] = _Derived(_file_extensions)  # extension -> (format, files key)


def auto_candidates(fmt: str) -> tuple[str, ...]:
    """The runtimes `runtime: auto` may choose for format `fmt`."""
    return tuple(name for name, spec in REGISTRY.items() if fmt in spec.default_for)


def default_runtime(fmt: str) -> str:
    """What `runtime: auto` means for `fmt` when nothing decides between candidates: the first."""
    candidates = auto_candidates(fmt)
    if not candidates:
        served = ", ".join(FORMAT_RUNTIMES.get(fmt, ())) or "none"
        raise ModelLoadError(f"no runtime is the default for format {fmt}; set runtime: to one of {served}")
    return candidates[0]


def auto_option_names(fmt: str) -> set[str]:
    """The options valid with `runtime: auto` for `fmt`: those of every runtime it may choose."""
    return {name for runtime in auto_candidates(fmt) for name in REGISTRY[runtime].options.option_names()}


def declaration(name: str) -> RuntimeSpec:
    """The declaration of runtime `name`, or a ModelLoadError listing the ones there are."""
    found = REGISTRY.get(name)
    if found is None:
        raise ModelLoadError(f"unknown runtime {name!r}; the runtimes: {', '.join(REGISTRY)}")
    return found


def check_option_keys(config: ModelConfig) -> None:
    """A key of `config.options` that its runtime (or, for `auto`, every runtime `auto` may
    choose) does not take: a ConfigError naming the nearest valid key. Imports no engine."""
    if config.runtime == "auto":
        names, who = auto_option_names(config.format), f"runtime auto ({', '.join(auto_candidates(config.format))})"
    else:
        options = declaration(config.runtime).options
        names, who = set(options.option_names()), f"runtime {config.runtime}"
    for key in config.options:
        if key not in names:
            raise ConfigError(f"{config.source}: field 'options.{key}': {unknown_option(str(key), names, who)}")
