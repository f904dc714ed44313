"""`seldon-caffe weights`: random weights for a bare prototxt, checked in real Caffe.

The file our writer makes must load in real Caffe, and real Caffe's answers on it must be
what our runtimes answer (relative error 1e-4, as in the conformance suite) and not saturated:
the layers keep unit spread, so a runtime's mistake would show.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ZOO
from test_conformance import REL_TOL, relative_error

from caffe_oracle import reference
from seldon_caffe.caffe import load_caffe_net
from seldon_caffe.config import parse_config
from seldon_caffe.runtimes import load_runtime

LAYER_NETS = Path(__file__).parent / "layer_nets"


def weights(*args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "seldon_caffe.cli", "weights", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.reference
@pytest.mark.skipif(reference.unavailable_reason() is not None, reason=f"{reference.unavailable_reason()}")
def test_weights_load_in_real_caffe_and_answer_like_our_runtime(tmp_path: Path, zoo: Path) -> None:
    prototxt, out = zoo / "bvlc_googlenet.prototxt", tmp_path / "googlenet.caffemodel"
    done = weights(prototxt, "-o", out, "--seed", 7)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out}: random weights (seed 7) for bvlc_googlenet.prototxt"), done.stdout
    x = np.random.default_rng(3).standard_normal((2, 3, 224, 224)).astype(np.float32)
    caffe = reference.forward(prototxt, out, {"data": x}, outputs=["loss3/classifier", "prob"])
    # unit spread kept to the last layer (on other inputs than the fill's), so softmax is not one-hot
    assert 0.5 < float(caffe["loss3/classifier"].std()) < 2.0
    assert float(caffe["prob"].max()) < 0.5
    raw = {"format": "caffe", "files": {"prototxt": str(prototxt), "weights": str(out)}, "runtime": "opencv"}
    with load_runtime(parse_config(raw, tmp_path)) as model:
        assert relative_error(model.run({"data": x})["prob"], caffe["prob"]) <= REL_TOL


@pytest.mark.slow
def test_same_seed_same_file_and_user_files_kept(tmp_path: Path) -> None:
    prototxt = ZOO / "lenet.prototxt" if ZOO.is_dir() else Path(__file__).parents[1] / "examples/lenet/deploy.prototxt"
    first, second, other = tmp_path / "a.caffemodel", tmp_path / "b.caffemodel", tmp_path / "c.caffemodel"
    for out, seed in ((first, 1), (second, 1), (other, 2)):
        assert weights(prototxt, "-o", out, "--seed", seed).returncode == 0
    assert first.read_bytes() == second.read_bytes() != other.read_bytes()
    net = load_caffe_net(prototxt, first)  # our reader takes it back
    assert net.get_weights("conv1")[0].shape == (20, 1, 5, 5)

    again = weights(prototxt, "-o", first)
    assert (
        again.returncode == 1
        and again.stderr.strip() == f"seldon-caffe: error: {first} exists; pass --force to replace it"
    )
    assert first.read_bytes() == second.read_bytes()
    assert weights(prototxt, "-o", first, "--seed", 2, "--force").returncode == 0
    assert first.read_bytes() == other.read_bytes()

    nowhere = weights(prototxt, "-o", tmp_path / "missing" / "w.caffemodel")
    assert nowhere.returncode == 1 and "the folder" in nowhere.stderr and "does not exist" in nowhere.stderr
    assert len(nowhere.stderr.strip().splitlines()) == 1


def test_a_layer_opencv_cannot_run_is_named_and_the_file_still_written(tmp_path: Path) -> None:
    out = tmp_path / "tile.caffemodel"
    done = weights(LAYER_NETS / "tile.prototxt", "-o", out)
    assert done.returncode == 0, done.stderr
    assert "OpenCV cannot run layer 'tile' (Tile" in done.stderr and "fan-in only" in done.stderr
    load_caffe_net(LAYER_NETS / "tile.prototxt", out)
