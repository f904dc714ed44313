"""model.yaml `options`, typed: one frozen dataclass per runtime, one validator.

Every runtime's options class subclasses `Options`, whose fields are the options common to
every runtime (DESIGN.md: threads, device, precision, pycaffe_command, allow_non_finite).
A field says how its value is read with one of the field makers below (`flag`, `integer`,
`seconds`, `choice`, `text`, `strings`, or `read(default, parse)` for anything else);
`Options.from_config` is the validator:

* a key that no field of the runtime has is an error naming the nearest valid one (with
  `runtime: auto`, the keys of every runtime `auto` may pick for the format are valid, so
  a model.yaml stays valid on a machine where `auto` picks another engine);
* each value given is read by its field (a value left out, or null, is the default);
* `check` then applies the rules that span fields (fp16 needs a GPU...).

Every mistake is a ConfigError naming model.yaml and `options.KEY`, in one line. This module
imports no engine: the registry reads the declarations without loading any runtime.
(It also runs on Python 3.9: the in-process pycaffe test imports it there.)
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import ModelConfig

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
_Parse = Callable[[Any, "Callable[[str], ConfigError]"], Any]
_O = TypeVar("_O", bound="Options")


def cuda_index(device: str) -> int | None:
    """The GPU of an options.device: None for cpu, N for cuda:N, 0 for cuda (the one home of
    this parsing; config.py checks the value is one of cpu, cuda, cuda:N first)."""
    kind, _, index = str(device).partition(":")
    if kind != "cuda":
        return None
    return int(index) if index else 0


def is_device(value: Any) -> bool:
    """cpu, cuda or cuda:N."""
    if not isinstance(value, str):
        return False
    kind, colon, index = value.partition(":")
    return value == "cpu" or (kind == "cuda" and (not colon or index.isdigit()))


# -- field makers: a default and how to read a value ---------------------------------------


def read(default: Any, parse: _Parse) -> Any:
    """A field read by `parse(value, problem)`; `problem(message)` makes the ConfigError to raise."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return field(default=default, metadata={"parse": parse})


def flag(default: bool | None) -> Any:
    def parse(value: Any, problem: Callable[[str], ConfigError]) -> bool:
        if not isinstance(value, bool):
            raise problem(f"{value!r} is not true or false")
        return value

    return read(default, parse)


def integer(default: int | None, minimum: int, what: str = "") -> Any:
    def parse(value: Any, problem: Callable[[str], ConfigError]) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise problem(f"{value!r} is not {what or f'an integer >= {minimum}'}")
        return value

    return read(default, parse)


def seconds(default: float) -> Any:
    def parse(value: Any, problem: Callable[[str], ConfigError]) -> float:
        # (int, float), not int | float: this module is imported on Python 3.9 too
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise problem(f"{value!r} is not a positive number of seconds")
        return float(value)

    return read(default, parse)


def choice(default: str, allowed: Iterable[str], upper: bool = False) -> Any:
    """One of `allowed`; `upper`: compared upper-cased (OpenVINO's hints)."""
    allowed = tuple(allowed)

    def parse(value: Any, problem: Callable[[str], ConfigError]) -> str:
        if upper and isinstance(value, str):
            value = value.upper()
        if value not in allowed:
            raise problem(f"{value!r}; allowed: {', '.join(allowed)}")
        return value

    return read(default, parse)


def text(default: str | None, what: str) -> Any:
    """A non-empty string; `what` says what one looks like, for the error."""

    def parse(value: Any, problem: Callable[[str], ConfigError]) -> str:
        if not isinstance(value, str) or not value:
            raise problem(f"{value!r} is not {what}")
        return value

    return read(default, parse)


def strings(default: tuple[str, ...] | None, what: str, one: bool = False) -> Any:
    """A non-empty list of strings, kept as a tuple; `one`: a single string is a list of one."""

    def parse(value: Any, problem: Callable[[str], ConfigError]) -> tuple[str, ...]:
        if one and isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise problem(f"{value!r} is not {what}")
        return tuple(value)

    return read(default, parse)


def _device(value: Any, problem: Callable[[str], ConfigError]) -> str:
    if not is_device(value):
        raise problem(f"{value!r}; allowed: cpu, cuda, cuda:N")
    return value


def _command(value: Any, problem: Callable[[str], ConfigError]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise problem('expected a list of strings, e.g. ["chroot", "/srv/caffe", "python3"]')
    return tuple(value)


# -- the options every runtime takes, and the validator ------------------------------------


@dataclass(frozen=True)
class Options:
    """The options common to every runtime (DESIGN.md, model.yaml). Subclass it, adding fields
    made with the makers above, for a runtime's own options."""

    runtime: ClassVar[str] = ""  # set by registry.register_runtime

    threads: int = integer(2, 1, "a positive integer")
    device: str = read("cpu", _device)
    precision: str = choice("fp32", PRECISIONS)
    pycaffe_command: tuple[str, ...] | None = read(None, _command)  # an interpreter with pycaffe (`auto`)
    allow_non_finite: bool = flag(False)  # NaN/Inf in a float input: 400 unless true

    @property
    def on_cuda(self) -> bool:
        return cuda_index(self.device) is not None

    @classmethod
    def from_config(cls: type[_O], config: ModelConfig) -> _O:
        """This runtime's options of `config`, validated (see the module docstring)."""
        from .registry import auto_option_names

        problem = _problem_maker(config)
        known = auto_option_names(config.format) if config.runtime == "auto" else ()
        options = cls.read(config.options, problem, also_allowed=known)
        options.check(problem)
        return options

    @classmethod
    def read(
        cls: type[_O],
        values: Mapping[str, Any],
        problem: Callable[[str, str], ConfigError],
        also_allowed: Iterable[str] | None = (),
        null_is_default: bool = True,
    ) -> _O:
        """Read `values` into this class. A key that is no field is an error unless in `also_allowed`
        (None: any key is allowed, as config.py does for the common options alone). Without
        `null_is_default`, null is read like any value where the default is not null."""
        own = {f.name: f for f in fields(cls)}
        if also_allowed is not None:
            allowed = set(own) | set(also_allowed)
            for key in values:
                if key not in allowed:
                    raise problem(key, cls.unknown(str(key)))
        given = {}
        for name, spec in own.items():
            value = values.get(name)
            if value is not None or (name in values and not null_is_default and spec.default is not None):
                given[name] = _parser(spec)(value, functools.partial(problem, name))
        return cls(**given)

    @classmethod
    def unknown(cls, key: str) -> str:
        """What to say about `key`, no option of this runtime."""
        return unknown_option(key, cls.option_names(), f"runtime {cls.runtime}" if cls.runtime else "this runtime")

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls)}

    def check(self, problem: Callable[[str, str], ConfigError]) -> None:
        """Rules that span fields; raise `problem(key, message)`. Subclasses extend it."""


def unknown_option(key: str, names: Iterable[str], who: str) -> str:
    """The message for an options key `who` does not take: the nearest valid name, and the valid ones."""
    names = sorted(names)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    guess = f"did you mean {close[0]}? " if close else ""
    return f"not an option of {who}; {guess}valid: {', '.join(names)}"


def _parser(spec: Field) -> _Parse:
    parse = spec.metadata.get("parse")
    if parse is None:  # a plain field (a third party's): any value, as given
        if spec.default is MISSING and spec.default_factory is MISSING:
            raise TypeError(f"option {spec.name!r} needs a default")
        return lambda value, problem: value
    return parse


def _problem_maker(config: ModelConfig) -> Callable[[str, str], ConfigError]:
    def problem(key: str, message: str) -> ConfigError:
        return ConfigError(f"{config.source}: field 'options.{key}': {message}")

    return problem
