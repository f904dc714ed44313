"""Every Caffe runtime against real BVLC Caffe, the oracle, net by net.

Nets: every zoo net (../shared/caffe-zoo, real input sizes) and one small net per layer
type in tests/layer_nets/, with the parameters that trip converters.
Weights: random, made and saved by real Caffe's own writer (reference.weights_job), once
per session. Inputs: random, the same for every runtime, at batch 1 and 4.

Agreement: relative error <= 1e-4, where

    relative error = max|a - b| / max(max|b|, 1e-12)

with `a` the runtime's output and `b` real Caffe's (seldon_caffe/faithfulness.py, the
project's one measure): the worst absolute difference against the scale of the output
itself. (An elementwise ratio would explode wherever Caffe's
output is near zero, which post-ReLU and softmax outputs mostly are.)

Gaps: where a runtime cannot do a layer, the case is a strict expected failure carrying
the reason from seldon_caffe/runtimes/gaps.py; a runtime that learns the layer turns it
into a failure until the table is updated. Real Caffe is reached through chroot, so the
module skips (saying how to get it) when the root from `make caffe-env` is absent.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf.message import Message
from helpers import ZOO, one_net_per_engine

from caffe_oracle import reference
from seldon_caffe.caffe import load_caffe_net, read_prototxt, upgrade_net
from seldon_caffe.caffe.fork_proto import FORK_FIELDS
from seldon_caffe.caffe.forks import FORK_SHAPE_RULES
from seldon_caffe.faithfulness import relative_error
from seldon_caffe.runtimes.gaps import find_gaps

REL_TOL = 1e-4
BATCHES = (1, 4)
RUNTIMES = ("opencv", "pycaffe")
LAYER_NETS = Path(__file__).parent / "layer_nets"


def runs_on_real_caffe(prototxt: Path) -> bool:
    """Whether BVLC Caffe 1.0 knows every layer type and every field the net uses. The other
    layer nets exercise the forks' layers (caffe-ssd, py-faster-rcnn, ...), which no BVLC
    Caffe has: tests/test_fork_layers.py holds those to their numpy reference and OpenCV."""
    layers = upgrade_net(read_prototxt(prototxt)).layer
    return not any(layer.type in FORK_SHAPE_RULES or _sets_fork_field(layer) for layer in layers)


def _sets_fork_field(layer: Message) -> bool:
    """A field that only forks define (fork_proto.FORK_FIELDS), set on the layer or its params."""
    messages = {value.DESCRIPTOR.full_name: value for _, value in layer.ListFields() if isinstance(value, Message)}
    messages[layer.DESCRIPTOR.full_name] = layer
    return any(name in messages and messages[name].HasField(field) for name, field in FORK_FIELDS)


NETS = {
    p.stem: p
    for p in [*sorted(ZOO.glob("*.prototxt")), *sorted(LAYER_NETS.glob("*.prototxt"))]
    if runs_on_real_caffe(p)
}

pytestmark = [
    pytest.mark.reference,
    pytest.mark.skipif(reference.unavailable_reason() is not None, reason=f"{reference.unavailable_reason()}"),
]


def runtime_cases(nets: dict[str, Path], runtimes: Sequence[str]) -> Iterator[Any]:
    """(net, runtime, batch) for every combination; a known gap (gaps.py) is a strict xfail."""
    for name, path in nets.items():
        layers = upgrade_net(read_prototxt(path)).layer
        for runtime in runtimes:
            gaps = find_gaps(runtime, layers)
            why = "; ".join(f"{kind} ({layer}): {reason}" for layer, kind, reason in gaps)
            marks = [pytest.mark.xfail(strict=True, reason=why)] if gaps else []
            for batch in BATCHES:
                yield pytest.param(name, runtime, batch, marks=marks, id=f"{name}-{runtime}-b{batch}")


class ReferenceData:
    """Real Caffe's weights, outputs and loaded params per net, made on first use.

    The first request computes every net the session selected, in one real-Caffe process:
    starting Caffe costs seconds, the jobs themselves are mostly milliseconds.
    """

    def __init__(self, workdir: Path, wanted: list[str]):
        self.workdir = workdir
        self.wanted = wanted
        self._nets: dict[str, dict[str, Any]] = {}
        self._ours: dict[str, dict[str, Any]] = {}

    def weights(self, name: str) -> Path:
        return self.workdir / f"{name}.caffemodel"

    def net(self, name: str) -> dict[str, Any]:
        """{"forward": {batch: {"inputs", "outputs"}}, "params": {layer: [arrays]}}."""
        if name not in self._nets:
            todo = [n for n in dict.fromkeys([name, *self.wanted]) if n not in self._nets]
            jobs: list[dict[str, Any]] = []
            for n in todo:
                prototxt, weights = NETS[n], self.weights(n)
                jobs.append(reference.weights_job(prototxt, weights, seed=zlib.crc32(n.encode())))
                jobs += [reference.forward_job(prototxt, weights, batch=b, seed=b) for b in BATCHES]
                jobs.append(reference.params_job(prototxt, weights))
            results = iter(reference.run_jobs(jobs, timeout=1800))
            for n in todo:
                next(results)
                forward = {b: next(results) for b in BATCHES}
                self._nets[n] = {"forward": forward, "params": next(results)["params"]}
        return self._nets[name]

    def ours(self, name: str) -> dict[str, Any]:
        """Real Caffe on files our writer wrote: forward (unchanged weights) and params
        (after set_weights on one layer), with what we expect of each."""
        if name not in self._ours:
            todo = [n for n in dict.fromkeys([name, *self.wanted]) if n not in self._ours]
            jobs, expected = [], {}
            for n in todo:
                try:
                    same, changed = self._write_ours(n, self.workdir / f"ours-{n}")
                except Exception as exc:  # our reader or writer failed on this net: its test says so
                    self._ours[n] = {"error": exc}
                    continue
                jobs.append(reference.forward_job(*same, self.net(n)["forward"][1]["inputs"]))
                jobs.append(reference.params_job(*changed[:2]))
                expected[n] = changed[2]
            results = iter(reference.run_jobs(jobs, timeout=1800))
            for n in expected:
                self._ours[n] = {"forward": next(results), "params": next(results)["params"], "expect": expected[n]}
        if "error" in self._ours[name]:
            raise self._ours[name]["error"]
        return self._ours[name]

    def _write_ours(self, name: str, out: Path) -> tuple[tuple[Path, Path], tuple[Path, Path, dict]]:
        out.mkdir(exist_ok=True)
        ours = load_caffe_net(NETS[name], self.weights(name))
        same = (out / "net.prototxt", out / "same.caffemodel")
        same[0].write_bytes(ours.prototxt_bytes())
        same[1].write_bytes(ours.caffemodel_bytes())
        layers = list(self.net(name)["params"])
        if layers:  # new values through our API, so the writer has to serialise them itself
            ours.set_weights(layers[0], [-0.5 * a - 0.25 for a in ours.get_weights(layers[0])])
        changed = out / "changed.caffemodel"
        changed.write_bytes(ours.caffemodel_bytes())
        return same, (same[0], changed, {layer: ours.get_weights(layer) for layer in layers})


@pytest.fixture(scope="session")
def real_caffe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ReferenceData:
    wanted = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if item.module.__name__ == __name__ and callspec and "name" in callspec.params:
            wanted.append(callspec.params["name"])
    return ReferenceData(tmp_path_factory.mktemp("real-caffe"), list(dict.fromkeys(wanted)))


@pytest.fixture(scope="session")
def runtimes(real_caffe: ReferenceData) -> Iterator[Any]:
    """load(name, runtime): one loaded net per runtime at a time (helpers.one_net_per_engine)."""

    def raw(name: str, runtime: str) -> tuple[dict, Path]:
        weights = real_caffe.weights(name)
        files = {"prototxt": str(NETS[name]), "weights": str(weights)}
        options = {"pycaffe_command": reference.python_command(), "threads": 2}
        return {"files": files, "runtime": runtime, "options": options}, weights.parent

    with one_net_per_engine(raw) as load:
        yield load


@pytest.mark.parametrize(("name", "runtime", "batch"), list(runtime_cases(NETS, RUNTIMES)))
def test_runtime_matches_real_caffe(name: str, runtime: str, batch: int, real_caffe: ReferenceData, runtimes) -> None:
    expected = real_caffe.net(name)["forward"][batch]
    model = runtimes(name, runtime)
    assert [s.name for s in model.inputs] == list(expected["inputs"])
    for spec in model.inputs:  # -1: a dim the net lets each request choose (runtimes/caffe_model.py)
        declared = expected["inputs"][spec.name].shape
        assert len(spec.shape) == len(declared), f"input {spec.name} rank"
        assert all(w in (-1, d) for w, d in zip(spec.shape[1:], declared[1:], strict=True)), f"input {spec.name} shape"
    assert sorted(s.name for s in model.outputs) == sorted(expected["outputs"])
    assert_matches_real_caffe(model, expected)


def assert_matches_real_caffe(model: Any, expected: dict[str, Any]) -> None:
    """Run `model` on real Caffe's inputs; every output within REL_TOL of real Caffe's."""
    got = model.run(expected["inputs"])
    for output, want in expected["outputs"].items():
        assert np.isfinite(want).all(), f"real Caffe's {output} is not finite: the net's inputs are wrong"
        assert got[output].shape == want.shape, f"{output}: shape {got[output].shape}, real Caffe {want.shape}"
        error = relative_error(got[output], want)
        assert error <= REL_TOL, f"{output}: relative error {error:.2e} > {REL_TOL:.0e}"


@pytest.mark.parametrize("name", list(NETS))
def test_real_caffe_weights_read_identically(name: str, real_caffe: ReferenceData) -> None:
    """A caffemodel saved by real Caffe reads back in ours with every blob bit-equal."""
    params = real_caffe.net(name)["params"]
    ours = load_caffe_net(NETS[name], real_caffe.weights(name))
    for layer, blobs in params.items():
        mine = ours.get_weights(layer)
        assert len(mine) == len(blobs), layer
        for k, (a, b) in enumerate(zip(mine, blobs, strict=True)):
            assert a.dtype == np.float32 and a.shape == b.shape and np.array_equal(a, b), f"{layer}[{k}]"


@pytest.mark.parametrize("name", list(NETS))
def test_our_writer_loads_in_real_caffe(name: str, real_caffe: ReferenceData) -> None:
    """Files our writer wrote load in real Caffe: same outputs, and changed weights arrive."""
    ours = real_caffe.ours(name)
    expected = real_caffe.net(name)["forward"][1]["outputs"]
    for output, want in expected.items():
        assert np.array_equal(ours["forward"]["outputs"][output], want), output
    for layer, blobs in ours["expect"].items():
        for k, (a, b) in enumerate(zip(ours["params"][layer], blobs, strict=True)):
            assert np.array_equal(a, b), f"{layer}[{k}] as real Caffe read it from our caffemodel"
