"""Which optional engines a command needs, and how to install them.

The commands (`convert`, `quantize`) are in every install; the engines they use come with
setup.cfg's extras. `require_modules` fails with one line naming the extras that bring the
missing modules (torch's, not onnx's, for torch).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import SeldonCaffeError
from .runtimes import REGISTRY

# Modules the commands need that are no runtime's engine but come with a runtime's extra
# (setup.cfg); every other module's install hint is its runtime's, in runtimes.REGISTRY.
_COMES_WITH_RUNTIME = {"onnx": "onnxruntime", "tf2onnx": "tensorflow", "onnxscript": "torch"}


def require_modules(*modules: str) -> None:
    """Raise SeldonCaffeError naming the missing `modules` and how to install them, if any is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SeldonCaffeError(f"this command needs {', '.join(missing)}: {install_hint(missing)}")


def install_hint(modules: Sequence[str]) -> str:
    """How to install `modules`: one pip command for our extras, then any other hints."""
    extras: dict[str, None] = {}
    others: dict[str, None] = {}
    for module in modules:
        runtime = _COMES_WITH_RUNTIME.get(module, module)
        hint = REGISTRY[runtime].install if runtime in REGISTRY else module
        extra = re.fullmatch(r"seldon-caffe\[(\w+)\]", hint)
        if extra:
            extras[extra[1]] = None
        else:
            others[hint] = None
    steps = [f"pip install 'seldon-caffe[{','.join(extras)}]'"] if extras else []
    return "; ".join(steps + [f"install {hint}" for hint in others])
