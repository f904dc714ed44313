"""Issue 25's acceptance: the public deploy prototxts in ../shared/caffe-wild/ (SOURCES.md says
where each comes from), brought as a team would bring them, are served.

For each net: it parses; `seldon-caffe weights` (the installed CLI, once per net per session)
gives it weights; at least MIN_ENGINES of opencv, onnxruntime, openvino and torch serve it
and agree within the tolerance (tests/test_conformance.py's measure, max|a - b| / max|b|,
every ordered pair of engines), and real BVLC Caffe agrees with each of them where the net
has BVLC layers only. An engine with a known gap for one of the net's layers
(runtimes/gaps.py) is left out of that net's set; every other engine must load and answer.

Sizes: the published input size; where the spatial dims are free (fully convolutional nets,
and OpenPose's 1x3x1x1 placeholder, whose "published" size is the 368x368 OpenPose feeds),
two more, the smallest that make the point (about 2/3 and 4/3 of the published size, one of
them not square, in the multiples the net's strides need). Each engine is loaded once per
net and runs every size, so the engines that plan per shape re-plan on the way.

Tolerance: REL_TOL (1e-4) for every net. TOLERANCES would name a net where float32
accumulation measurably exceeds it, with the measurement; none does (the deepest, segnet,
is within 7.4e-5 of a float64 run). Two kinds of answer are not continuous in float32
rounding, and tests/wild_answers.py compares them as its docstring says, with what was
measured: face_ssd's DetectionOutput rows ([1, 1, N, 7]: the same rows in the same order,
scores and boxes within the tolerance, except that rows whose scores tie may swap), and
segnet's values that Upsample routes by MaxPool masks (masks may differ only at ties, and
the answer is compared wherever those cannot reach). face_ssd's decoded blobs (mbox_loc,
mbox_conf_flatten, mbox_priorbox) and segnet's masks and pooled blobs are asked for under
model.yaml `outputs:`, so the checks do not rest on the final answer alone. face_ssd is also
served through the real microservice over Seldon v1, at two sizes.

faster_rcnn_zf's proposal layer (`rpn.proposal_layer`, py-faster-rcnn's own code) is not
published with the prototxt: its model directory gets the one tests/test_python_layers.py
writes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import REPO
from service import running_service
from test_conformance import REL_TOL, runs_on_real_caffe
from wild_answers import Routing, answer_error, detection_error

from caffe_oracle import reference
from seldon_caffe.caffe import load_caffe_net, read_prototxt, upgrade_net
from seldon_caffe.caffe.net import WeightsError
from seldon_caffe.config import parse_config
from seldon_caffe.runtimes import load_runtime
from seldon_caffe.runtimes.gaps import find_gaps

WILD = Path(os.environ.get("SELDON_CAFFE_WILD", REPO.parent / "shared" / "caffe-wild"))
ENGINES = ("opencv", "onnxruntime", "openvino", "torch")
MIN_ENGINES = 3
THREADS = 2
Size = tuple[int, int]  # (height, width)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not WILD.is_dir(), reason=f"the public deploy nets are not at {WILD} (set SELDON_CAFFE_WILD)"),
]
needs_caffe = pytest.mark.skipif(reference.unavailable_reason() is not None, reason=f"{reference.unavailable_reason()}")


@dataclass(frozen=True)
class WildNet:
    """One public net: its published input size (H, W), the other sizes where H and W are
    free, the blobs it answers by default, and the `outputs:` its model.yaml names, if any."""

    name: str
    published: Size
    answers: tuple[str, ...]
    others: tuple[Size, ...] = ()
    outputs: tuple[str, ...] = ()

    @property
    def prototxt(self) -> Path:
        return WILD / f"{self.name}.prototxt"

    @property
    def sizes(self) -> tuple[Size, ...]:
        return (self.published, *self.others)

    @property
    def free(self) -> bool:
        """Whether the net takes other spatial sizes (fully convolutional, or a placeholder)."""
        return bool(self.others)


HED_SIDES = tuple(f"sigmoid-dsn{k}" for k in range(1, 6)) + ("sigmoid-fuse",)
SSD_BLOBS = ("detection_out", "mbox_loc", "mbox_conf_flatten", "mbox_priorbox")
ZF_BLOBS = ("rois", "cls_prob", "bbox_pred")  # the proposal layer's ROIs, and the answers per ROI
# Nets whose Upsample places values by MaxPool masks: compared as wild_answers.py says.
ROUTED = {"segnet": Routing(upgrade_net(read_prototxt(WILD / "segnet.prototxt")), "prob")} if WILD.is_dir() else {}
SEGNET_BLOBS = ROUTED["segnet"].blobs if ROUTED else ("prob",)
WILD_NETS = {
    net.name: net
    for net in (
        WildNet("age_net", (227, 227), ("prob",)),
        WildNet("squeezenet_v10", (227, 227), ("prob",), ((151, 151), (227, 303))),
        WildNet("hed", (500, 500), HED_SIDES, ((333, 333), (250, 400))),
        WildNet("colorization_v2", (224, 224), ("class8_ab",), ((152, 152), (224, 296))),
        WildNet("face_ssd", (300, 300), SSD_BLOBS, ((200, 200), (300, 400)), outputs=SSD_BLOBS),
        WildNet("segnet", (224, 224), SEGNET_BLOBS, ((160, 160), (224, 288)), outputs=SEGNET_BLOBS),
        WildNet("openpose_coco", (368, 368), ("net_output",), ((368, 656), (240, 320))),
        WildNet("faster_rcnn_zf", (224, 224), ZF_BLOBS, ((192, 256), (288, 224)), outputs=ZF_BLOBS),
    )
}
# The nets with BVLC Caffe 1.0 layers only: real Caffe is their oracle too.
BVLC = ("age_net", "squeezenet_v10", "hed", "colorization_v2", "openpose_coco")
# Where float32 accumulation measurably exceeds REL_TOL: {net: (tolerance, the measured cause)}.
TOLERANCES: dict[str, tuple[float, str]] = {}
CASES = [pytest.param(n.name, s, id=f"{n.name}-{s[0]}x{s[1]}") for n in WILD_NETS.values() for s in n.sizes]
BVLC_CASES = [case for case in CASES if case.values[0] in BVLC]


def tolerance(name: str) -> float:
    return TOLERANCES.get(name, (REL_TOL, ""))[0]


def agreement_set(name: str) -> list[str]:
    """The engines without a known gap for any of the net's layers."""
    layers = upgrade_net(read_prototxt(WILD_NETS[name].prototxt)).layer
    return [engine for engine in ENGINES if not find_gaps(engine, layers)]


# -- the session's models: weights from the CLI, each engine's answers --------------------


@dataclass
class EngineRun:
    """One engine on one net: its signature and its answer per size (or why it failed)."""

    inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    answers: dict[Size, dict[str, np.ndarray]] = field(default_factory=dict)
    errors: dict[Size | None, str] = field(default_factory=dict)  # None: the load failed


class WildModels:
    """Per net: a model directory (the published prototxt, weights from `seldon-caffe weights`,
    a proposal layer module for faster_rcnn_zf) and every agreeing engine's answers."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.weights_seconds: dict[str, float] = {}
        self.weights_warnings: dict[str, str] = {}
        self._runs: dict[str, dict[str, EngineRun]] = {}

    def model_dir(self, name: str) -> Path:
        """The net's directory with its weights, made by the real CLI on first use."""
        target = self.workdir / name
        if (target / "weights.caffemodel").exists():
            return target
        target.mkdir(exist_ok=True)
        shutil.copy(WILD_NETS[name].prototxt, target / "deploy.prototxt")
        if name == "faster_rcnn_zf":
            write_proposal_module(target)
        started = time.perf_counter()
        done = subprocess.run(
            [*seldon_caffe_command(), "weights", "deploy.prototxt", "-o", "weights.caffemodel"],
            cwd=target,
            capture_output=True,
            text=True,
            timeout=900,
        )
        self.weights_seconds[name] = time.perf_counter() - started
        assert done.returncode == 0, f"seldon-caffe weights {name}: exit {done.returncode}\n{done.stderr}"
        self.weights_warnings[name] = done.stderr.strip()  # a layer measured by fan-in only, say
        return target

    def config(self, name: str, runtime: str) -> Any:
        target = self.model_dir(name)
        raw: dict[str, Any] = {
            "files": {"prototxt": "deploy.prototxt", "weights": "weights.caffemodel"},
            "runtime": runtime,
            "options": {"threads": THREADS},
        }
        if WILD_NETS[name].outputs:
            raw["outputs"] = [{"name": blob} for blob in WILD_NETS[name].outputs]
        return parse_config(raw, target)

    def runs(self, name: str) -> dict[str, EngineRun]:
        """Every agreeing engine at every size of the net: loaded once, closed before the next."""
        if name not in self._runs:
            self._runs[name] = {engine: self._run(name, engine) for engine in agreement_set(name)}
        return self._runs[name]

    def _run(self, name: str, engine: str) -> EngineRun:
        run = EngineRun()
        try:
            model = load_runtime(self.config(name, engine))
        except Exception as exc:  # the test names the engine and the error
            run.errors[None] = f"{type(exc).__name__}: {exc}"
            return run
        with model:
            run.inputs = {spec.name: spec.shape for spec in model.inputs}
            run.outputs = [spec.name for spec in model.outputs]
            for size in WILD_NETS[name].sizes:
                try:
                    run.answers[size] = model.run(feed(name, size))
                except Exception as exc:
                    run.errors[size] = f"{type(exc).__name__}: {exc}"
        return run


def seldon_caffe_command() -> list[str]:
    """The installed console script beside this interpreter (what users run)."""
    script = Path(sys.executable).parent / "seldon-caffe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "seldon_caffe.cli"]


def write_proposal_module(target: Path) -> None:
    """The `rpn` package (proposal_layer and its anchors) tests/test_python_layers.py writes
    for this net: py-faster-rcnn's own is not published with the prototxt."""
    from test_python_layers import RPN

    for path, source in RPN.items():
        (target / path).parent.mkdir(parents=True, exist_ok=True)
        (target / path).write_text(source)


def feed(name: str, size: Size) -> dict[str, np.ndarray]:
    """The same random inputs for every engine and real Caffe: N(0, 1) images at `size`;
    faster_rcnn_zf's im_info says the image's height, width and scale, as py-faster-rcnn's."""
    rng = np.random.RandomState(zlib.crc32(f"{name}-{size}".encode()))
    arrays = {}
    for blob, shape in declared_inputs(name).items():
        if blob == "im_info":
            arrays[blob] = np.array([[size[0], size[1], 1.0]], np.float32)
        else:
            arrays[blob] = rng.standard_normal((1, *shape[1:-2], *size)).astype(np.float32)
    return arrays


def declared_inputs(name: str) -> dict[str, tuple[int, ...]]:
    net = upgrade_net(read_prototxt(WILD_NETS[name].prototxt))
    shapes = {}
    for layer in net.layer:
        if layer.type == "Input":  # one shape for every top, or one each
            dims = [tuple(shape.dim) for shape in layer.input_param.shape]
            shapes.update({top: dims[min(k, len(dims) - 1)] for k, top in enumerate(layer.top)})
    assert shapes, f"{name}: no Input layer after the upgrade"
    return shapes


@pytest.fixture(scope="session")
def wild(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WildModels]:
    models = WildModels(tmp_path_factory.mktemp("caffe-wild"))
    yield models
    if models.weights_seconds:
        print("\nseldon-caffe weights: " + ", ".join(f"{n} {s:.1f} s" for n, s in models.weights_seconds.items()))
        for name, warning in models.weights_warnings.items():
            if warning:
                print(f"seldon-caffe weights {name}: {warning}")


@pytest.fixture(scope="session")
def real_caffe(request: pytest.FixtureRequest, wild: WildModels) -> Any:
    """(name, size) -> real Caffe's answers on our weights and inputs: every BVLC case the
    session selected, in one real-Caffe process."""
    wanted = [
        (item.callspec.params["name"], item.callspec.params["size"])
        for item in request.session.items
        if item.module.__name__ == __name__ and "real_caffe" in getattr(item, "fixturenames", ())
    ]
    answers: dict[tuple[str, Size], dict[str, np.ndarray]] = {}

    def get(name: str, size: Size) -> dict[str, np.ndarray]:
        if (name, size) not in answers:
            todo = [case for case in dict.fromkeys([(name, size), *wanted]) if case not in answers]
            jobs = [caffe_job(wild, *case) for case in todo]
            for case, result in zip(todo, reference.run_jobs(jobs, timeout=1800), strict=True):
                answers[case] = result["outputs"]
        return answers[(name, size)]

    return get


def caffe_job(wild: WildModels, name: str, size: Size) -> dict[str, Any]:
    """Real Caffe's forward of the published prototxt, answering the blobs the engines answer
    (colorization's class8_ab is consumed by Silence: Caffe lists no output for it)."""
    target = wild.model_dir(name)
    net = WILD_NETS[name]
    return reference.forward_job(net.prototxt, target / "weights.caffemodel", feed(name, size), outputs=net.answers)


# -- comparing answers ------------------------------------------------------------------


def pair_error(name: str, got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """The worst relative error of one engine's answers against another's (or real Caffe's)."""
    routed = ROUTED.get(name)
    if routed is not None:
        return routed.error(got, want, tolerance(name))
    return max(answer_error(blob, got[blob], want[blob], tolerance(name)) for blob in want)


def worst_errors(name: str, answers: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    """engine -> its worst relative error against any other engine, either way round:
    agreement among all of them, with no engine singled out as the truth."""
    worst = dict.fromkeys(answers, 0.0)
    for engine, got in answers.items():
        for other, want in answers.items():
            if other != engine:
                error = pair_error(name, got, want)
                worst[engine] = max(worst[engine], error)
                worst[other] = max(worst[other], error)
    return worst


def describe(errors: dict[str, float]) -> str:
    return ", ".join(f"{engine} {error:.1e}" for engine, error in errors.items())


def served(wild: WildModels, name: str, size: Size | None = None) -> dict[str, EngineRun]:
    """The agreeing engines' runs, after checking there are enough and none failed."""
    runs = wild.runs(name)
    assert len(runs) >= MIN_ENGINES, f"{name}: only {list(runs)} lack a known gap; {MIN_ENGINES} must serve it"
    failed = {engine: run.errors.get(None) or run.errors.get(size) for engine, run in runs.items()}
    failed = {engine: why for engine, why in failed.items() if why}
    assert not failed, f"{name} {size}: " + "; ".join(f"{engine}: {why}" for engine, why in failed.items())
    return runs


# -- the tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(WILD_NETS))
def test_parses(name: str, wild: WildModels) -> None:
    """The published file parses (fork fields and all) and every blob's shape infers; the
    net is BVLC-only exactly where the table says so (it decides real Caffe's part)."""
    net = WILD_NETS[name]
    assert upgrade_net(read_prototxt(net.prototxt)).layer
    caffe_net = load_caffe_net(wild.model_dir(name) / "deploy.prototxt")  # beside faster_rcnn's rpn/
    assert set(net.answers) <= set(caffe_net.shapes), f"{name}: blobs {sorted(caffe_net.shapes)}"
    assert runs_on_real_caffe(net.prototxt) == (name in BVLC)


@pytest.mark.parametrize("name", list(WILD_NETS))
def test_weights_from_the_cli(name: str, wild: WildModels) -> None:
    """`seldon-caffe weights` fills every learned blob with the shape the net needs."""
    target = wild.model_dir(name)
    caffe_net = load_caffe_net(target / "deploy.prototxt", target / "weights.caffemodel")
    learned = 0
    for layer in caffe_net.definition.layer:
        try:
            shapes = caffe_net.weight_shapes(layer.name)
        except WeightsError:
            continue  # learns nothing
        arrays = caffe_net.get_weights(layer.name)  # ValueError if the file lacks them
        assert [a.shape for a in arrays] == [tuple(s) for s in shapes], layer.name
        assert all(np.isfinite(a).all() for a in arrays), f"{layer.name}: non-finite weights"
        learned += 1
    assert learned, f"{name}: no learned blobs"


@pytest.mark.parametrize("name", list(WILD_NETS))
def test_signature(name: str, wild: WildModels) -> None:
    """Every engine answers the same blobs, and shows the spatial dims free (-1) exactly for
    the nets that take other sizes (a placeholder input too), the batch free for all."""
    net = WILD_NETS[name]
    for engine, run in served(wild, name).items():
        assert sorted(run.outputs) == sorted(net.answers), f"{engine}: answers {run.outputs}"
        for blob, shape in run.inputs.items():
            if len(shape) == 4:
                want = (-1, shape[1], -1, -1) if net.free else (-1, shape[1], *declared_inputs(name)[blob][2:])
                assert shape == want, f"{engine}: input {blob} {shape}, expected {want}"


@pytest.mark.parametrize(("name", "size"), CASES)
def test_engines_agree(name: str, size: Size, wild: WildModels) -> None:
    """At least MIN_ENGINES engines answer, every pair within the net's tolerance."""
    answers = {engine: run.answers[size] for engine, run in served(wild, name, size).items()}
    for engine, got in answers.items():
        assert sorted(got) == sorted(WILD_NETS[name].answers), f"{engine}: answered {sorted(got)}"
        for blob, value in got.items():
            assert np.isfinite(value).all(), f"{engine}: {blob} is not finite"
            assert np.ptp(value) > 0, f"{engine}: {blob} is constant: agreeing on it would prove nothing"
    if name == "face_ssd":
        rows = next(iter(answers.values()))["detection_out"].reshape(-1, 7)
        assert (rows[:, 0] >= 0).any(), "no detection passed the threshold: the row comparison proves nothing"
    errors = worst_errors(name, answers)
    print(f"{name} {size[0]}x{size[1]}: worst relative error between engines: {describe(errors)}")
    assert max(errors.values()) <= tolerance(name), f"{name} {size}: {describe(errors)} > {tolerance(name):.0e}"


@pytest.mark.reference
@needs_caffe
@pytest.mark.parametrize(("name", "size"), BVLC_CASES)
def test_engines_match_real_caffe(name: str, size: Size, wild: WildModels, real_caffe: Any) -> None:
    """Where the net is BVLC's, each engine against real Caffe on the same weights and inputs."""
    want = real_caffe(name, size)
    assert sorted(want) == sorted(WILD_NETS[name].answers)
    errors = {}
    for engine, run in served(wild, name, size).items():
        errors[engine] = pair_error(name, run.answers[size], want)
    print(f"{name} {size[0]}x{size[1]}: relative error against real Caffe: {describe(errors)}")
    assert max(errors.values()) <= tolerance(name), f"{name} {size}: {describe(errors)} > {tolerance(name):.0e}"


@pytest.mark.e2e
def test_face_ssd_served_over_seldon_v1(wild: WildModels, tmp_path: Path) -> None:
    """OpenCV's face detector definition through the real microservice: the published size and
    another, the answers the engine gave in process."""
    name, runtime = "face_ssd", "onnxruntime"
    engine = served(wild, name)[runtime]
    model_dir = tmp_path / name
    shutil.copytree(wild.model_dir(name), model_dir, ignore=shutil.ignore_patterns(".cache"))
    (model_dir / "model.yaml").write_text(
        f"name: {name}\nformat: caffe\nfiles: {{prototxt: deploy.prototxt, weights: weights.caffemodel}}\n"
        f"runtime: {runtime}\noptions: {{threads: 1}}\n"
    )
    sizes = WILD_NETS[name].sizes[::2]  # the published size, and one not square
    with running_service(model_dir) as service:
        for size in sizes:
            response = service.post({"data": {"ndarray": feed(name, size)["data"].tolist()}})
            assert response.status_code == 200, response.text
            got = np.asarray(response.json()["data"]["ndarray"], np.float32)
            assert detection_error(got, engine.answers[size]["detection_out"]) <= REL_TOL, size
