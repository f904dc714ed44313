# ruff: noqa: B905 -- the part "inside the root" runs on Python 3.9, where zip() has no strict=
"""Train a net with real BVLC Caffe: the solver runs in the reference root, the data comes from here.

Why real Caffe: the examples' weights should come from the engine the format belongs to,
and every runtime is checked against it. Caffe 1.0 lives in a Python 3.9 root
(`make caffe-env`), so, like `caffe_oracle/reference.py`, this file copies itself and the
data (.npz) into the root's /tmp and runs its own bottom half there with `chroot`.

The training net declares one Input layer per array (at the batch size); each step this
file's root half writes the next minibatch into those blobs and calls `solver.step(1)`,
so any numpy data trains without LMDB or HDF5 files. Sparse rows (hashed features, n-gram
bags) travel as (index, value) pairs and become dense only one batch at a time. After
training, the layers of the deploy prototxt get the learned blobs by name and Caffe's own
`net.save` writes the caffemodel: it holds the deploy layers only.

Only the standard library and numpy are imported at the top, so the file runs in the root's
Python 3.9 as well as in ours; seldon_caffe is imported lazily, on this side only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Sparse:
    """Rows of a sparse matrix with `dim` columns: per row up to K (index, value) pairs.

    `indices` is (N, K) int32 with -1 marking an unused slot; `values` is (N, K) float32.
    A 4096-wide hashed feature vector for 100k rows is 1.6 GB dense and a few MB like this.
    """

    indices: np.ndarray
    values: np.ndarray
    dim: int

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[int, float]], dim: int) -> Sparse:
        width = max([len(row) for row in rows] + [1])
        indices = np.full((len(rows), width), -1, np.int32)
        values = np.zeros((len(rows), width), np.float32)
        for i, row in enumerate(rows):
            indices[i, : len(row)] = list(row.keys())
            values[i, : len(row)] = list(row.values())
        return cls(indices, values, dim)

    @classmethod
    def from_dense(cls, blocks: Sequence[np.ndarray]) -> Sparse:
        """Stack dense row blocks (e.g. one per request) keeping only their non-zeros."""
        dim = blocks[0].shape[1]
        rows = [dict(zip(np.flatnonzero(r).tolist(), r[r != 0].tolist())) for block in blocks for r in block]
        return cls.from_rows(rows, dim)

    def __len__(self) -> int:
        return len(self.indices)


def train(
    train_net: str,
    deploy: Path,
    data: Mapping[str, np.ndarray | Sparse],
    *,
    solver: Mapping[str, Any],
    iterations: int,
    batch: int,
    out: Path,
    seed: int = 0,
    log_every: int = 100,
) -> list[float]:
    """Train `train_net` (prototxt text) on `data` and write the deploy net's weights to `out`.

    `data` maps every Input top of `train_net` to an array (or Sparse) with one row per
    example; minibatches are drawn epoch by epoch from a permutation seeded with `seed`, and
    Caffe's own fillers are seeded too, so a run is reproducible. `solver` holds solver
    fields (type, base_lr, lr_policy, weight_decay...). The net must have a blob "loss".
    Returns the mean training loss of every `log_every` iterations.
    """
    clone = str(Path(__file__).resolve().parents[2])  # caffe_oracle/ lives at the clone's root
    if clone not in sys.path:
        sys.path.append(clone)
    from caffe_oracle.reference import chroot_env, default_root, unavailable_reason

    root = default_root()
    reason = unavailable_reason(root)
    if reason:
        raise SystemExit(f"training needs real Caffe: {reason}")
    sizes = {len(value) for value in data.values()}
    if len(sizes) != 1:
        raise ValueError(f"every array needs one row per example; got row counts {sorted(sizes)}")
    work = Path(tempfile.mkdtemp(prefix="seldon-caffe-train-", dir=root / "tmp"))
    inside = "/" + str(work.relative_to(root))
    try:
        shutil.copy(__file__, work / "caffe_solver.py")
        (work / "train.prototxt").write_text(train_net)
        shutil.copy(deploy, work / "deploy.prototxt")
        arrays, inputs = {}, {}
        for name, value in data.items():
            if isinstance(value, Sparse):
                arrays[f"{name}.idx"], arrays[f"{name}.val"] = value.indices, value.values
                inputs[name] = {"sparse": value.dim}
            else:
                arrays[name] = np.asarray(value, np.float32)
                inputs[name] = {}
        np.savez(work / "data.npz", **arrays)
        fields = {"net": f"{inside}/train.prototxt", "random_seed": seed, "max_iter": iterations, **solver}
        fields.update(display=0, snapshot=0, snapshot_after_train=False, solver_mode="CPU")
        (work / "solver.prototxt").write_text("".join(f"{k}: {_prototxt_value(v)}\n" for k, v in fields.items()))
        job = {"inputs": inputs, "iterations": iterations, "batch": batch, "seed": seed, "log_every": log_every}
        (work / "job.json").write_text(json.dumps(job))
        # One BLAS thread: the same run gives the same weights, and the machine is shared.
        argv = ["chroot", str(root), "python3", f"{inside}/caffe_solver.py", inside]
        subprocess.run(argv, env=chroot_env(threads=1), check=True)
        out.write_bytes((work / "trained.caffemodel").read_bytes())
        return json.loads((work / "losses.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def training_net(
    deploy: Path,
    batch: int,
    *,
    inputs: Mapping[str, Sequence[int]],
    drop: Sequence[str] = (),
    after: Mapping[str, str] | None = None,
    loss: str,
) -> str:
    """The training net for a deploy prototxt, as prototxt text.

    The deploy net stays the single definition of the model: its Input layers get batch
    `batch`, `inputs` adds more (labels, as {top: shape without the batch}), layers named in
    `drop` go (the output Softmax a loss replaces), `after` puts prototxt layers right after
    the named layer (Dropout), and `loss` is appended. Deploy and training share layer
    names, which is how the trained blobs find their way back into the deploy net.
    """
    from seldon_caffe.caffe import caffe_pb2, format_prototxt, parse_prototxt, read_prototxt

    net = read_prototxt(deploy)
    kept = caffe_pb2.NetParameter()
    kept.CopyFrom(net)
    del kept.layer[:]
    for name, shape in inputs.items():
        kept.layer.append(parse_prototxt(_input_layer(name, [batch, *shape])).layer[0])
    for layer in net.layer:
        if layer.name in drop:
            continue
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = batch
        kept.layer.append(layer)
        if after and layer.name in after:
            kept.layer.extend(parse_prototxt(after[layer.name]).layer)
    kept.layer.extend(parse_prototxt(loss).layer)
    return format_prototxt(kept)


def _input_layer(name: str, shape: Sequence[int]) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {dims} }} }} }}'


def load_hooks(path: Path) -> Any:
    """Import a model directory's hooks.py as a module of its own (training uses its features)."""
    return load_script(path, f"_train_hooks_{path.parent.name}")


def load_script(path: Path, name: str | None = None) -> Any:
    """Import an example's script (examples are not packages) under a name of its own,
    `example_<dir>_<stem>` unless given: every example has an evaluate.py."""
    name = name or f"example_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered first: dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def _prototxt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.isupper():  # an enum: CPU, GPU
        return value
    return json.dumps(value)


def _densify(indices: np.ndarray, values: np.ndarray, dim: int) -> np.ndarray:
    dense = np.zeros((len(indices), dim), np.float32)
    rows, slots = np.nonzero(indices >= 0)
    np.add.at(dense, (rows, indices[rows, slots]), values[rows, slots])
    return dense


# -- inside the root (Python 3.9, real pycaffe) ----------------------------------------


def _root_main(work: str) -> None:
    import caffe

    caffe.set_mode_cpu()
    with open(os.path.join(work, "job.json")) as f:
        job = json.load(f)
    caffe.set_random_seed(job["seed"])
    with np.load(os.path.join(work, "data.npz")) as npz:
        arrays = {key: npz[key] for key in npz.files}
    solver = caffe.get_solver(os.path.join(work, "solver.prototxt"))
    net, batch = solver.net, job["batch"]

    def rows(name: str, spec: dict, picked: np.ndarray) -> np.ndarray:
        if "sparse" in spec:
            return _densify(arrays[name + ".idx"][picked], arrays[name + ".val"][picked], spec["sparse"])
        return arrays[name][picked]

    count = len(next(iter(arrays.values())))
    rng = np.random.RandomState(job["seed"])
    order, losses, window = np.empty(0, np.int64), [], []
    for iteration in range(job["iterations"]):
        if len(order) < batch:
            order = rng.permutation(count)
        picked, order = order[:batch], order[batch:]
        for name, spec in job["inputs"].items():
            net.blobs[name].data[...] = rows(name, spec, picked).reshape(net.blobs[name].data.shape)
        solver.step(1)
        window.append(float(net.blobs["loss"].data))
        if len(window) == job["log_every"] or iteration == job["iterations"] - 1:
            losses.append(sum(window) / len(window))
            window = []
            print(f"iteration {iteration + 1}: loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    deploy = caffe.Net(os.path.join(work, "deploy.prototxt"), caffe.TEST)
    for layer, blobs in deploy.params.items():
        for mine, trained in zip(blobs, net.params[layer]):
            mine.data[...] = trained.data
    deploy.save(os.path.join(work, "trained.caffemodel"))
    with open(os.path.join(work, "losses.json"), "w") as f:
        json.dump(losses, f)


if __name__ == "__main__":
    _root_main(sys.argv[1])
