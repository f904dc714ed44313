"""Host side of the real-Caffe oracle: hand files to the Caffe root, run jobs, read answers.

Real BVLC Caffe lives in a Debian root (see DESIGN.md, "Real Caffe") entered with chroot,
so files travel through a scratch folder under the root's /tmp. Tests skip, saying why,
when the root is missing or chroot is not allowed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(os.environ.get("SELDON_CAFFE_REFERENCE_ROOT", "/root/.cache/seldon-caffe/caffe-root"))
ORACLE = Path(__file__).with_name("caffe_oracle.py")
CHROOT = shutil.which("chroot") or shutil.which("chroot", path="/usr/sbin:/sbin")
ZOO = Path(os.environ.get("SELDON_CAFFE_ZOO", Path(__file__).resolve().parents[4] / "shared" / "caffe-zoo"))
ZOO_NETS = sorted(p.stem for p in ZOO.glob("*.prototxt"))


def unavailable_reason() -> str | None:
    """Why real Caffe cannot be used here, or None when it can."""
    if not (ROOT / "usr/lib/python3/dist-packages/caffe").is_dir():
        return f"no real-Caffe root at {ROOT} (set SELDON_CAFFE_REFERENCE_ROOT; see DESIGN.md 'Real Caffe')"
    if CHROOT is None:
        return "no chroot command to enter the real-Caffe root"
    if os.geteuid() != 0:
        return "entering the real-Caffe root needs chroot, i.e. root"
    return None


class CaffeReference:
    """A scratch folder inside the Caffe root plus a way to run oracle jobs there."""

    def __init__(self) -> None:
        (ROOT / "tmp").mkdir(exist_ok=True)
        self.host_dir = Path(tempfile.mkdtemp(prefix="seldon-caffe-format-tests-", dir=ROOT / "tmp"))
        self.inner_dir = "/tmp/" + self.host_dir.name
        shutil.copy(ORACLE, self.host_dir / ORACLE.name)

    def put(self, name: str, data: bytes | str) -> str:
        """Write a file for Caffe; returns its path as seen inside the root."""
        path = self.host_dir / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return self.inner(name)

    def inner(self, name: str) -> str:
        return f"{self.inner_dir}/{name}"

    def host(self, name: str) -> Path:
        return self.host_dir / name

    def forward_job(self, name: str, prototxt: bytes, caffemodel: bytes, feed: dict[str, np.ndarray]) -> dict:
        """A job that loads the two files in Caffe and runs `feed`; see `results(name)`."""
        np.savez(self.host(f"{name}_in.npz"), **feed)
        return {
            "kind": "forward",
            "prototxt": self.put(f"{name}.prototxt", prototxt),
            "caffemodel": self.put(f"{name}.caffemodel", caffemodel),
            "inputs": self.inner(f"{name}_in.npz"),
            "outputs": ["prob"],
            "result": self.inner(f"{name}_out.npz"),
        }

    def results(self, name: str) -> dict[str, np.ndarray]:
        """A forward job's arrays: "out/BLOB" and "param/LAYER/INDEX"."""
        return dict(np.load(self.host(f"{name}_out.npz")))

    def run(self, jobs: dict[str, dict[str, Any]], timeout: float = 600) -> dict[str, Any]:
        """Run the jobs in one Caffe process (start-up is the slow part) and return its answers."""
        self.put("jobs.json", json.dumps(jobs))
        env = {"PATH": "/usr/bin:/bin", "GLOG_minloglevel": "2", "OMP_NUM_THREADS": "1", "HOME": "/tmp"}
        command = [str(CHROOT), str(ROOT), "python3", self.inner(ORACLE.name), self.inner("jobs.json")]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"real Caffe failed ({done.returncode}): {done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def close(self) -> None:
        shutil.rmtree(self.host_dir, ignore_errors=True)
