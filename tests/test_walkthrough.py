"""README.md's five-minute walk-through, command by command, as a new user types it.

The commands are read from the README itself, so the text cannot drift from what works.
Three are stood in for: the clone and `make setup` (this is the clone, and its .venv), the
download of BVLC's GoogLeNet prototxt (no internet here: the zoo's copy of the same file,
../shared/caffe-zoo/SOURCES.md), and `serve ... &` (started on free ports, waited for and
stopped by tests/service.py; the curl then asks those ports). Everything else runs in bash.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO
from service import START_TIMEOUT_S, start_service, stop, wait_ready

pytestmark = pytest.mark.e2e  # the README's commands, `seldon-caffe serve` and curl

DOWNLOAD = "curl -sLO https://raw.githubusercontent.com/BVLC/caffe/master/models/bvlc_googlenet/deploy.prototxt"
SET_UP = ("git clone ", "make setup", ". .venv/bin/activate", "kill %1")


def walkthrough_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- walk-through.*?```bash\n(.*?)```\n<!-- end of walk-through -->", text, re.DOTALL)
    assert block, "README.md has no walk-through block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_walkthrough_serves_googlenet_to_curl(tmp_path: Path, zoo: Path) -> None:
    commands = walkthrough_commands()
    assert DOWNLOAD in commands and any(c.startswith("seldon-caffe serve googlenet &") for c in commands)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    started, service, answer = time.monotonic(), None, None
    try:
        for command in commands:
            if command.startswith(SET_UP):
                continue
            if command == DOWNLOAD:
                shutil.copy(zoo / "bvlc_googlenet.prototxt", tmp_path / "deploy.prototxt")
                continue
            if command.startswith("seldon-caffe serve googlenet &"):
                service = start_service(tmp_path / "googlenet", verbose=False)
                wait_ready(service, START_TIMEOUT_S)
                continue
            if service is not None:
                command = command.replace("localhost:9000", f"localhost:{service.http_port}")
            done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, timeout=300)
            assert done.returncode == 0, f"{command}\n{done.stderr.decode()[-2000:]}"
            if command.startswith("curl -s localhost"):
                answer = json.loads(done.stdout)
    finally:
        if service is not None:
            stop(service)
            service.log_path.unlink(missing_ok=True)
    print(f"walk-through commands (setup excluded): {time.monotonic() - started:.0f} s")
    assert answer is not None, "the walk-through asks the service with curl"
    probabilities = np.asarray(answer["data"]["ndarray"])
    assert probabilities.shape == (1, 1000) and abs(float(probabilities.sum()) - 1.0) < 1e-4
    assert sorted(p.name for p in (tmp_path / "googlenet").iterdir() if p.is_file()) == [
        "README.md",
        "deploy.prototxt",
        "hooks.py",
        "model-settings.json",
        "model.yaml",
        "requirements.txt",
        "weights.caffemodel",
    ]
    assert (tmp_path / "deploy.prototxt").is_file() and (tmp_path / "weights.caffemodel").is_file()  # copied, kept
