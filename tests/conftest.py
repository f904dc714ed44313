"""Shared fixtures: model directories made from the repo's examples, and where things live."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
# ../shared/caffe-zoo beside the clone (DESIGN.md); overridable for other layouts.
ZOO = Path(os.environ.get("SELDON_CAFFE_ZOO", REPO.parent / "shared" / "caffe-zoo"))

sys.path.insert(0, str(Path(__file__).parent))

# seldon_core.utils imports TensorFlow (when installed) as soon as any test imports it, and
# TensorFlow fixes its oneDNN switch at that first import. Import it the way the tensorflow
# runtime's default asks (oneDNN on), as `seldon-caffe serve` does for a served model, so the
# in-process runtime tests do not depend on which test module pytest collects first.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # tests import service.py and each other's helpers


def copy_model(source: Path, target: Path, *, hooks: str | None = None, yaml: str | None = None) -> Path:
    """Copy a model directory; optionally replace its hooks.py and model.yaml."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.onnx", ".cache"))
    if hooks is not None:
        (target / "hooks.py").write_text(hooks)
    if yaml is not None:
        (target / "model.yaml").write_text(yaml)
    return target


@pytest.fixture(scope="session")
def lenet_example() -> Path:
    return EXAMPLES / "lenet"


@pytest.fixture(scope="session")
def zoo() -> Path:
    if not ZOO.is_dir():
        pytest.skip(f"reference nets not found at {ZOO} (set SELDON_CAFFE_ZOO)")
    return ZOO
