"""Shared fixtures: model directories made from the repo's examples, and where things live."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
# This process loads TensorFlow (through seldon_core) and torch, as a served model's does, but
# tests also call torch.export directly, and OpenAI Triton loaded after TensorFlow crashes the
# process. Keep it out from the start, as seldon_caffe.convert.torch.import_torch does in a
# server (tests/test_torch_runtime.py serves an ExportedProgram to check that path).
if importlib.util.find_spec("tensorflow") is not None:
    sys.modules.setdefault("triton", None)


def run_concurrently(worker: Callable[[int], None], count: int) -> None:
    """worker(0) ... worker(count - 1) in threads at once; the first failure is raised here."""
    with ThreadPoolExecutor(count) as pool:
        for future in [pool.submit(worker, i) for i in range(count)]:
            future.result()


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
