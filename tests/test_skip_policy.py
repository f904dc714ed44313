"""The skip policy of `make test` (tests/conftest.py): with SELDON_CAFFE_STRICT_SKIPS=1 a skip
whose reason is not on the allow-list fails the run, and says which; without it, it is a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# a test that skips here for want of a builder image: an unlisted reason
SKIPPING = ["tests/test_image.py", "-k", "builder_carries"]


def run_pytest(strict: bool) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SELDON_CAFFE_TEST_")}
    env.pop("SELDON_CAFFE_STRICT_SKIPS", None)
    if strict:
        env["SELDON_CAFFE_STRICT_SKIPS"] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SKIPPING]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_an_unlisted_skip_fails_a_strict_run_and_is_named() -> None:
    done = run_pytest(strict=True)
    assert done.returncode == 1, done.stdout
    assert "UNLISTED SKIP (a failure under make test): tests/test_image.py::" in done.stdout
    assert "unlisted: 1 x no builder image given" in done.stdout


def test_outside_make_test_a_skip_stays_a_skip() -> None:
    done = run_pytest(strict=False)
    assert done.returncode == 0, done.stdout
    assert "1 skipped" in done.stdout and "UNLISTED" not in done.stdout
