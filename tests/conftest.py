"""Shared fixtures: model directories made from the repo's examples, and where things live.

Shared helper functions and constants are in helpers.py (`from helpers import ...`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

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


# -- no silent skips under `make test` ----------------------------------------------------------
# `make test` sets SELDON_CAFFE_STRICT_SKIPS=1: it installs every extra, real Caffe and the tools,
# so a skip there means something broke (an extra that no longer imports, a missing reference
# root), and the run fails. Allowed are only skips for what a CPU machine cannot have: tests
# marked `gpu`, and these reasons (what they start with). `make test-fast` and partial installs
# are not strict: their skips say what is missing.
STRICT_SKIPS_ENV = "SELDON_CAFFE_STRICT_SKIPS"
ALLOWED_SKIPS = (
    "needs TensorRT and an NVIDIA GPU",
    "no CUDA GPU visible to torch here",
    "needs a GPU (torch.cuda.is_available() is false)",
    # the seldon-core 1.17.1 lane (protobuf 3.20) cannot have TensorFlow beside it
    "tftensor needs tensorflow, which cannot be installed beside seldon-core 1.17.1",
)
_skips: dict[str, list[str]] = {"allowed": [], "unlisted": []}


def _note_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    allowed = "gpu" in getattr(report, "keywords", {}) or reason.startswith(ALLOWED_SKIPS)
    _skips["allowed" if allowed else "unlisted"].append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip(report)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if os.environ.get(STRICT_SKIPS_ENV) != "1":
        return
    terminalreporter.section("skips (strict: only the allowed ones may appear)")
    for kind in ("allowed", "unlisted"):
        reasons = Counter(line.split(": ", 1)[1] for line in _skips[kind])
        for reason, count in sorted(reasons.items()):
            terminalreporter.write_line(f"{kind}: {count} x {reason}")
    for line in _skips["unlisted"]:
        terminalreporter.write_line(f"UNLISTED SKIP (a failure under make test): {line}", red=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get(STRICT_SKIPS_ENV) == "1" and _skips["unlisted"] and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
