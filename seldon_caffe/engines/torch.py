"""torch, as both `convert torch` and the torch runtime load it: the safe import and the saved-file kinds."""

from __future__ import annotations

import logging
import sys
import warnings
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import SeldonCaffeError


def import_torch() -> ModuleType:
    """`import torch`, keeping OpenAI Triton out of a process that has loaded TensorFlow.

    PyPI's CUDA builds of torch bring the `triton` package, which torch imports lazily
    (torch.export, its flop counter). Loaded after TensorFlow, triton's native library
    crashes the process (segfault; seen with tensorflow-cpu 2.20 and triton 3.8, reproduced by
    `import tensorflow, triton.knobs`). Seldon Core imports TensorFlow whenever it is
    installed, so a served ExportedProgram would take the server down. Nothing here needs
    triton (it compiles kernels for torch.compile), so in such a process `import triton` is
    made to fail, which torch treats as triton not being installed.
    """
    if "tensorflow" in sys.modules and "triton" not in sys.modules:
        sys.modules["triton"] = None  # type: ignore[assignment]  # import triton -> ImportError
        logging.getLogger(__name__).info("TensorFlow is loaded: triton is kept out of this process")
    import torch

    return torch


def torch_file_kind(path: Path) -> str:
    """'torchscript', 'exported_program' or 'pickle', from the archive's members."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        detail = exc.strerror if isinstance(exc, OSError) else "not a zip archive"
        raise SeldonCaffeError(f"{path}: not a PyTorch file ({detail or exc})") from None
    if any(name.endswith("/constants.pkl") for name in names):
        return "torchscript"
    if any(name.endswith("/archive_format") for name in names):
        return "exported_program"
    if any(name.endswith("/data.pkl") for name in names):
        return "pickle"
    raise SeldonCaffeError(f"{path}: a zip archive, but not one torch wrote (TorchScript, .pt2 or torch.save)")


def load_saved(path: Path, kind: str, map_location: Any = "cpu") -> Any:
    """A TorchScript archive (its ScriptModule, in eval mode) or an ExportedProgram, as saved;
    `kind` is torch_file_kind's. Shared by `convert torch` and the torch runtime."""
    torch = import_torch()
    with warnings.catch_warnings():  # torch.jit.* warns that it is deprecated, at every call
        warnings.simplefilter("ignore", FutureWarning)
        if kind == "torchscript":
            return torch.jit.load(str(path), map_location=map_location).eval()
        with open(path, "rb") as file:  # a file object: by name, torch.export.load insists on ".pt2"
            return torch.export.load(file)
