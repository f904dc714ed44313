"""Real BVLC Caffe as the oracle, for tests and benchmarks.

Real Caffe 1.0 (Debian bullseye's python3-caffe) lives in a root built by
`scripts/caffe-env.sh` (`make caffe-env`); it cannot be imported by our Python 3.12.
This module runs Python 3.9 inside that root with `chroot`: it links or copies the files a
job needs and the input arrays (.npz) into a fresh directory under the root's /tmp, runs
`reference_root.py` (this module's other half) there as a script, and reads the results
back. Many jobs go in one call, because starting Caffe costs seconds and the conformance
suite needs a hundred answers. Everything inside the root is Caffe's own code: nets are
built, filled, saved (net.save) and run by pycaffe.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from caffe_oracle import reference_root
from caffe_oracle.reference_root import describe_proto as describe_proto  # for the tests
from seldon_caffe.paths import cache_dir
from seldon_caffe.runtimes import pycaffe_process
from seldon_caffe.runtimes.pycaffe_process import caffe_env

ROOT_ENV = "SELDON_CAFFE_REFERENCE_ROOT"
_WORKER = Path(pycaffe_process.__file__).resolve().parent / "pycaffe_worker.py"


def default_root() -> Path:
    """Where `make caffe-env` builds the root: outside any clone, shared by all of them."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV])
    return cache_dir("caffe-root")


def unavailable_reason(root: Path | None = None) -> str | None:
    """Why real Caffe cannot be used here (None when it can): the text of a test skip."""
    root = root or default_root()
    if not (root / "usr" / "bin" / "python3").exists():
        return f"no real-Caffe root at {root} (run `make caffe-env` as root, or set {ROOT_ENV})"
    if os.geteuid() != 0:
        return f"real Caffe at {root} needs chroot, which needs root"
    if shutil.which("chroot") is None:
        return "no chroot command to enter the real-Caffe root"
    return None


def find_root() -> Path | None:
    """The real-Caffe root, or None when it is missing or unusable."""
    root = default_root()
    return None if unavailable_reason(root) else root


def python_command(root: Path | None = None) -> list[str]:
    """The interpreter with real pycaffe: what `options.pycaffe_command` should say."""
    return ["chroot", str(root or default_root()), "python3"]


def chroot_env(threads: int = 2) -> dict[str, str]:
    """A clean environment for the root: none of our venv's variables leak into Python 3.9.

    What Caffe's own libraries read (OPENBLAS_*, thread counts, glog) follows the pycaffe
    worker's rule, `caffe_env`: the oracle must run the kernels the served worker runs.
    """
    return caffe_env(threads, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"})


# -- jobs: built here, run inside the root by run_jobs ---------------------------------


def weights_job(prototxt: Path, out: Path, seed: int = 0) -> dict[str, Any]:
    """Random weights for `prototxt`, saved to `out` by Caffe's own writer.

    The values are scaled so every layer's output keeps unit spread (a comparison of
    saturated softmaxes or of vanishing activations would prove nothing), and BatchNorm
    gets positive variances, means near the real ones and a moving-average factor other
    than 1, which converters must divide out.
    """
    return {"op": "weights", "files": {"prototxt": prototxt}, "out": Path(out), "seed": seed}


def forward_job(
    prototxt: Path,
    weights: Path,
    inputs: Mapping[str, np.ndarray] | None = None,
    *,
    batch: int = 1,
    seed: int = 0,
    outputs: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Caffe's forward. Without `inputs`, random ones at `batch` (indices for Embed inputs)."""
    return {
        "op": "forward",
        "files": {"prototxt": prototxt, "weights": weights},
        "arrays": dict(inputs or {}),
        "batch": batch,
        "seed": seed,
        "outputs": list(outputs) if outputs else None,
    }


def params_job(prototxt: Path, weights: Path) -> dict[str, Any]:
    """The learned blobs as real Caffe loaded them: {"params": {layer: [arrays]}}."""
    return {"op": "params", "files": {"prototxt": prototxt, "weights": weights}}


def shapes_job(prototxt: Path, batch: int | None = 1) -> dict[str, Any]:
    """Every blob's shape as Caffe infers it, plus the inputs, outputs, layer types and the
    learned blobs' shapes. `batch` None builds the net exactly as the file declares it."""
    return {"op": "shapes", "files": {"prototxt": prototxt}, "batch": batch}


def timing_job(
    prototxt: Path, weights: Path, batch: int, repeats: int, warmup: int = 1, min_seconds: float = 0.0
) -> dict[str, Any]:
    """Seconds per forward, timed inside the root around pycaffe's own net.forward():
    `repeats` calls, more while they add up to less than `min_seconds` (at most 1000)."""
    files = {"prototxt": prototxt, "weights": weights}
    return {"op": "time", "files": files, "batch": batch, "repeats": repeats, "warmup": warmup, "min": min_seconds}


def proto_job() -> dict[str, Any]:
    """Caffe's own caffe.proto, as `describe_proto` describes it."""
    return {"op": "proto", "files": {}}


def run_jobs(
    jobs: Sequence[dict[str, Any]], root: Path | None = None, threads: int = 2, timeout: float | None = None
) -> list[Any]:
    """Run `jobs` in one real-Caffe process; returns one result per job.

    A weights job's `out` may be a later job's weights file: it is used from inside the
    root without a copy. Forward results are {"inputs": {...}, "outputs": {...}} of arrays.
    """
    root = root or default_root()
    reason = unavailable_reason(root)
    if reason:
        raise RuntimeError(reason)
    work = Path(tempfile.mkdtemp(prefix="seldon-caffe-ref-", dir=root / "tmp"))
    inside = "/" + str(work.relative_to(root))
    try:
        shutil.copy(reference_root.__file__, work / "reference_root.py")
        shutil.copy(_WORKER, work / "pycaffe_worker.py")
        specs, arrays, produced = _stage(jobs, work, inside)
        np.savez(work / "in.npz", **arrays)
        (work / "jobs.json").write_text(json.dumps(specs))
        argv = ["chroot", str(root), "python3", f"{inside}/reference_root.py", inside]
        done = subprocess.run(argv, env=chroot_env(threads), capture_output=True, timeout=timeout)
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(f"real Caffe failed (exit {done.returncode}):\n" + "\n".join(tail))
        for inner, out in produced:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.unlink(missing_ok=True)
            _place(work / inner, out)
        results = json.loads((work / "results.json").read_text())
        with np.load(work / "out.npz") as npz:
            out_arrays = {key: npz[key] for key in npz.files}
        return [_decode(result, out_arrays) for result in results]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _stage(jobs: Sequence[dict[str, Any]], work: Path, inside: str) -> tuple[list, dict, list]:
    """Copy each job's files into `work` once; number its arrays; note what comes back."""
    placed: dict[Path, str] = {}
    arrays: dict[str, np.ndarray] = {}
    produced: list[tuple[str, Path]] = []
    specs = []
    for i, job in enumerate(jobs):
        spec = {k: v for k, v in job.items() if k not in ("files", "arrays", "out")}
        spec["source"] = str(job["files"].get("prototxt", "caffe.proto"))
        for role, path in job.get("files", {}).items():
            path = Path(path).resolve()
            if path not in placed:
                name = f"f{len(placed)}_{path.name}"
                _place(path, work / name)
                placed[path] = name
            spec[role] = f"{inside}/{placed[path]}"
        spec["inputs"] = {}
        for name, value in job.get("arrays", {}).items():
            key = f"a{len(arrays)}"
            arrays[key] = np.asarray(value)
            spec["inputs"][name] = key
        if "out" in job:
            inner = f"out{i}_{job['out'].name}"
            placed[job["out"].resolve()] = inner
            produced.append((inner, job["out"]))
            spec["out"] = f"{inside}/{inner}"
        specs.append(spec)
    return specs, arrays, produced


def _place(source: Path, target: Path) -> None:
    """A hard link where the root shares a filesystem with the file (caffemodels run to
    hundreds of MB, and a suite moves each a few times), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy(source, target)


def _decode(result: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Results name arrays of out.npz by key, or lists of keys: swap in the arrays."""
    if not (isinstance(result, dict) and result.pop("kind", None) == "arrays"):
        return result

    def get(key: str | list[str]) -> Any:
        return [arrays[k] for k in key] if isinstance(key, list) else arrays[key]

    return {part: {name: get(key) for name, key in named.items()} for part, named in result.items()}


def make_weights(prototxt: Path, out_caffemodel: Path, seed: int = 0) -> None:
    """Random weights for `prototxt`, written by real Caffe's net.save (see weights_job)."""
    run_jobs([weights_job(prototxt, out_caffemodel, seed)])


def forward(
    prototxt: Path, caffemodel: Path, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Real Caffe's outputs (default: the net's outputs) for `inputs`."""
    return run_jobs([forward_job(prototxt, caffemodel, inputs, outputs=outputs)])[0]["outputs"]


def blob_shapes(prototxt: Path, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Every blob's shape in real Caffe at input batch `batch`."""
    shapes = run_jobs([shapes_job(prototxt, batch)])[0]["blobs"]
    return {name: tuple(shape) for name, shape in shapes.items()}
