"""Paths: output paths, checked before any work (a command that would fail to write its result
says so in one line at once, instead of a traceback after minutes of converting or
quantizing), and the per-user cache folder."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SeldonCaffeError


def check_output_path(path: Path) -> Path:
    """Before any work: the folder an output goes to exists and can be written, and the path is no folder."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise SeldonCaffeError(f"{path} is a directory; give a file name to write")
    if not folder.is_dir():
        raise SeldonCaffeError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise SeldonCaffeError(f"cannot write {path}: the folder {folder} is not writable")
    return path


def check_output_dir(path: Path) -> Path:
    """Before any work: an output folder either exists, or can be made in an existing parent."""
    if path.exists() and not path.is_dir():
        raise SeldonCaffeError(f"{path} exists and is not a directory")
    if not path.exists():
        check_output_path(path)
    return path


def cache_dir(*parts: str) -> Path:
    """$XDG_CACHE_HOME/seldon-caffe/PARTS (default ~/.cache/seldon-caffe/PARTS): caches that outlive
    a model folder (ONNX conversions, TensorRT engines) and the real-Caffe reference root."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "seldon-caffe", *parts)
