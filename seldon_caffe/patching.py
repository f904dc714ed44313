"""Replacing a third-party library's attribute, checked: the one way the package patches.

Where a library falls short of the service's error policy, seldon-caffe swaps one of its
attributes (v2/patches.py for MLServer, server.py for gunicorn). A swap onto a name that an
upgrade renamed would silently do nothing, and one onto a function whose parameters changed
would fail on some request much later. So every swap goes through `replace`, which checks
first that the attribute exists and that the replacement fits it (a function: the same
positional parameters; a class: a subclass of it; anything else: the same type), and
otherwise stops the start with one line naming the library and its installed version.
"""

from __future__ import annotations

import inspect
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import Any

from .errors import SeldonCaffeError

_MISSING = object()


class PatchError(SeldonCaffeError):
    """A library no longer has what seldon-caffe replaces in it, in the form expected."""


def replace(owner: ModuleType | type, name: str, replacement: Any, *, library: str) -> None:
    """Set owner.name to `replacement` once it is checked to fit (module docstring)."""
    original = getattr(owner, name, _MISSING)
    where = f"{owner.__name__}.{name}"
    if original is _MISSING:
        raise PatchError(f"{_installed(library)} has no {where}, which seldon-caffe replaces; {_advice(library)}")
    problem = _misfit(original, replacement)
    if problem:
        raise PatchError(f"{_installed(library)}: {where} {problem}; {_advice(library)}")
    setattr(owner, name, replacement)


def _misfit(original: Any, replacement: Any) -> str:
    """Why `replacement` cannot stand in for `original` ("" when it can)."""
    if inspect.isclass(original):
        ok = inspect.isclass(replacement) and issubclass(replacement, original)
        return "" if ok else f"is the class {original.__qualname__}, and the replacement does not derive from it"
    if inspect.isroutine(original):
        want, have = _positional(original), _positional(replacement)
        return "" if want == have else f"takes {want} positional parameters, the replacement {have}"
    ok = type(original) is type(replacement)
    return "" if ok else f"is a {type(original).__name__}, the replacement a {type(replacement).__name__}"


def _positional(function: Any) -> int:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: nothing to compare
        return -1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(parameter.kind in kinds for parameter in parameters)


def _installed(library: str) -> str:
    try:
        return f"{library} {version(library)}"
    except PackageNotFoundError:
        return f"{library} (version unknown)"


def _advice(library: str) -> str:
    return f"install the {library} release setup.cfg pins (pip install -e . in a fresh venv), or report it"
