"""Shared fixtures: model directories made from the repo's examples, and where things live.

Shared helper functions and constants are in helpers.py (`from helpers import ...`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import EXAMPLES, ZOO

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


@pytest.fixture(scope="session")
def lenet_example() -> Path:
    return EXAMPLES / "lenet"


@pytest.fixture(scope="session")
def zoo() -> Path:
    if not ZOO.is_dir():
        pytest.skip(f"reference nets not found at {ZOO} (set SELDON_CAFFE_ZOO)")
    return ZOO
