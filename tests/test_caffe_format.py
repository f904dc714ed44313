"""The Caffe file format, ours: proto, prototxt / caffemodel IO, upgrades, weights, errors.

Real Caffe (through its chroot) and OpenCV are the judges: our caffe.proto must describe
the same fields as Caffe's, and caffemodels we write must load in both and compute the
same thing. Without the Caffe root those checks skip; the rest always runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from helpers import ZOO

from caffe_oracle import reference
from seldon_caffe.caffe import (
    PARAMETRISED_LAYERS,
    CaffeFormatError,
    CaffeNet,
    array_to_blob,
    blob_to_array,
    caffe_pb2,
    fork_proto,
    format_prototxt,
    load_caffe_net,
    parse_caffemodel,
    parse_prototxt,
    read_caffemodel,
    read_prototxt,
    upgrade_net,
    write_caffemodel,
    write_prototxt,
)
from seldon_caffe.errors import ModelLoadError

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "caffe"
SMALL_NET = (DATA / "small.prototxt").read_text()
SIAMESE = (DATA / "siamese.prototxt").read_text()


def _load(name: str, path: Path):  # a helper module loaded by path: tests/ is not a package
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


builders = _load("caffe_builders", DATA / "builders.py")
ZOO_NETS = sorted(p.stem for p in ZOO.glob("*.prototxt"))


@pytest.fixture(scope="module")
def lenet() -> CaffeNet:
    net = load_caffe_net(ZOO / "lenet.prototxt")
    builders.randomise(net, seed=1)
    return net


@pytest.fixture(scope="module")
def small() -> CaffeNet:
    net = CaffeNet(parse_prototxt(SMALL_NET, "small.prototxt"), source="small.prototxt")
    builders.randomise(net, seed=2)
    return net


@pytest.fixture(scope="module")
def caffe_says(tmp_path_factory: pytest.TempPathFactory, lenet: CaffeNet, small: CaffeNet) -> dict:
    """One real-Caffe run: its proto, a caffemodel it saves, and forwards over files we wrote."""
    reason = reference.unavailable_reason()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("caffe")
    rng = np.random.default_rng(3)
    feeds = {"lenet": rng.random((2, 1, 28, 28), np.float32), "small": rng.random((2, 3, 12, 12), np.float32)}
    files = {
        "lenet": (lenet.prototxt_bytes(), lenet.caffemodel_bytes(), feeds["lenet"]),
        "small": (small.prototxt_bytes(), small.caffemodel_bytes(), feeds["small"]),
        "lenet_v1": (
            (DATA / "lenet_v1.prototxt").read_bytes(),
            builders.to_v1(lenet.to_caffemodel()).SerializeToString(),
            feeds["lenet"],
        ),
    }
    jobs = []
    for name, (prototxt, caffemodel, feed) in files.items():
        (tmp / f"{name}.prototxt").write_bytes(prototxt)
        (tmp / f"{name}.caffemodel").write_bytes(caffemodel)
        paths = (tmp / f"{name}.prototxt", tmp / f"{name}.caffemodel")
        jobs += [reference.forward_job(*paths, {"data": feed}, outputs=["prob"]), reference.params_job(*paths)]
    saved = tmp / "saved.caffemodel"  # Caffe's own writer, then the arrays as Caffe loads them back
    jobs += [reference.weights_job(ZOO / "lenet.prototxt", saved), reference.params_job(ZOO / "lenet.prototxt", saved)]
    jobs.append(reference.proto_job())
    results = iter(reference.run_jobs(jobs, timeout=600))
    answers: dict = {"feeds": feeds}
    for name in files:  # "out/BLOB" and "param/LAYER/INDEX", as Caffe computed and loaded them
        answers[f"{name}.npz"] = {f"out/{blob}": array for blob, array in next(results)["outputs"].items()}
        answers[f"{name}.npz"].update(_param_arrays(next(results)["params"], "param/"))
    next(results)  # the weights job writes `saved`
    answers["saved.npz"] = _param_arrays(next(results)["params"])
    answers["saved.caffemodel"] = saved
    answers["proto"] = next(results)
    return answers


def _param_arrays(params: dict[str, list[np.ndarray]], prefix: str = "") -> dict[str, np.ndarray]:
    return {f"{prefix}{layer}/{i}": array for layer, arrays in params.items() for i, array in enumerate(arrays)}


# -- the proto ------------------------------------------------------------------------


@pytest.mark.reference
def test_our_proto_matches_real_caffe(caffe_says: dict) -> None:
    """Every message, field (number, type, label, packing, default) and enum value we define is Caffe's.

    Except the forks' additions that fork_proto.py lists, which must not reuse a number of
    the Caffe message they extend.
    """
    theirs, ours = caffe_says["proto"], reference.describe_proto(caffe_pb2.DESCRIPTOR)
    left_out = {"caffe.V1LayerParameter": {"layer"}}  # the V0 format, which we do not read
    for name, entry in ours.items():
        if name in fork_proto.FORK_MESSAGES:
            assert name not in theirs, f"{name} is Caffe's own: take it out of FORK_MESSAGES"
            continue
        assert name in theirs, f"{name} is not a Caffe message or enum"
        if "values" in entry:
            assert entry == theirs[name], name
            continue
        forks = {field for field in entry["fields"] if fork_proto.fork_of(name, field)}
        caffe_numbers = {spec[0] for spec in theirs[name]["fields"].values()}
        reused = {entry["fields"][field][0] for field in forks} & caffe_numbers
        assert not reused, f"{name}: a fork field reuses Caffe's number(s) {reused}"
        assert set(entry["fields"]) - forks == set(theirs[name]["fields"]) - left_out.get(name, set()), name
        for field, (*spec, default) in entry["fields"].items():
            if field in forks:
                continue
            *their_spec, their_default = theirs[name]["fields"][field]
            assert spec == their_spec, f"{name}.{field}"
            assert default == pytest.approx(their_default, rel=1e-6), f"{name}.{field} default"


# -- prototxt -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO_NETS)
def test_zoo_prototxt_round_trip_is_lossless(name: str, tmp_path: Path) -> None:
    net = read_prototxt(ZOO / f"{name}.prototxt")
    text = format_prototxt(net)
    again = parse_prototxt(text)
    assert again == net
    write_prototxt(again, tmp_path / "again.prototxt")
    assert (tmp_path / "again.prototxt").read_text() == text
    assert len(net.layer) == (ZOO / f"{name}.prototxt").read_text().count("layer {")


def test_train_val_from_the_wild_parses_and_upgrades_with_test_phase() -> None:
    net = read_prototxt(DATA / "train_val.prototxt")
    assert net.layer[0].transform_param.mean_value == [104, 117, 123]
    assert parse_prototxt(format_prototxt(net)) == net
    kept = [layer.name for layer in upgrade_net(net).layer]
    assert kept == ["images", "ip", "drop", "acc", "loss", "staged"]


def test_v1_prototxt_upgrades_to_the_v2_definition() -> None:
    v1 = read_prototxt(DATA / "lenet_v1.prototxt")
    assert v1.layers and not v1.layer and list(v1.input_dim) == [64, 1, 28, 28]
    v2 = read_prototxt(ZOO / "lenet.prototxt")
    v2.layer[0].name = "input"  # Caffe names the layer it makes from legacy inputs "input"
    assert upgrade_net(v1) == upgrade_net(v2)
    assert len(v1.layers) == 8  # the input is untouched
    assert load_caffe_net(DATA / "lenet_v1.prototxt").shapes == load_caffe_net(ZOO / "lenet.prototxt").shapes


def test_v1_caffemodel_reads_like_its_v2_original(lenet: CaffeNet, tmp_path: Path) -> None:
    write_caffemodel(builders.to_v1(lenet.to_caffemodel()), tmp_path / "v1.caffemodel")
    for prototxt in (ZOO / "lenet.prototxt", DATA / "lenet_v1.prototxt"):
        net = load_caffe_net(prototxt, tmp_path / "v1.caffemodel")
        for layer in ("conv1", "conv2", "ip1", "ip2"):
            for ours, original in zip(net.get_weights(layer), lenet.get_weights(layer), strict=True):
                np.testing.assert_array_equal(ours, original)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('input: "a" input_dim: 1 input_dim: 3 input_dim: 4 input_dim: 5', {"a": (1, 3, 4, 5)}),
        ('input: "a" input_shape { dim: 2 dim: 7 }', {"a": (2, 7)}),
        (
            'input: "a" input: "b" input_dim: 1 input_dim: 3 input_dim: 4 input_dim: 5 '
            "input_dim: 1 input_dim: 3 input_dim: 4 input_dim: 5",
            {"a": (1, 3, 4, 5), "b": (1, 3, 4, 5)},
        ),
        (
            'input: "a" input_shape { dim: 2 dim: 7 } input: "b" input_shape { dim: 2 dim: 7 }',
            {"a": (2, 7), "b": (2, 7)},
        ),
    ],
)
def test_legacy_input_forms(header: str, expected: dict) -> None:
    body = "".join(f'layer {{ name: "r{n}" type: "ReLU" bottom: "{n}" top: "r{n}" }}' for n in expected)
    net = CaffeNet(parse_prototxt(header + "\n" + body))
    assert net.input_shapes == expected
    assert net.definition.layer[0].name == "input" and not net.definition.input
    assert net.outputs == [f"r{n}" for n in expected]


def test_legacy_input_count_mismatch_is_an_error() -> None:
    with pytest.raises(CaffeFormatError, match="x.prototxt: 1 input.* need 4 input_dim values, found 3"):
        upgrade_net(parse_prototxt('input: "a" input_dim: 1 input_dim: 3 input_dim: 4'), "x.prototxt")


# -- caffemodel, weights, OpenCV and real Caffe -----------------------------------------


def _opencv(net: CaffeNet) -> cv2.dnn.Net:
    return cv2.dnn.readNetFromCaffe(
        np.frombuffer(net.prototxt_bytes(), np.uint8), np.frombuffer(net.caffemodel_bytes(), np.uint8)
    )


def test_caffemodel_round_trip(small: CaffeNet, tmp_path: Path) -> None:
    data = small.caffemodel_bytes()
    model = parse_caffemodel(data)
    assert model == small.to_caffemodel() and model.SerializeToString() == data
    (tmp_path / "m.caffemodel").write_bytes(data)
    again = CaffeNet(parse_prototxt(SMALL_NET), read_caffemodel(tmp_path / "m.caffemodel"))
    for layer in ("conv1", "bn1", "sc1", "dw", "prelu", "up", "ip"):
        for a, b in zip(again.get_weights(layer), small.get_weights(layer), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.reference
@pytest.mark.parametrize("name", ["lenet", "small"])
def test_our_caffemodel_answers_the_same_in_opencv_and_real_caffe(
    caffe_says: dict, name: str, lenet: CaffeNet, small: CaffeNet
) -> None:
    net = {"lenet": lenet, "small": small}[name]
    caffe_out = caffe_says[f"{name}.npz"]
    for layer in net.layers:  # Caffe read exactly our weights
        if layer.type in PARAMETRISED_LAYERS:
            for i, array in enumerate(net.get_weights(layer.name)):
                np.testing.assert_array_equal(caffe_out[f"param/{layer.name}/{i}"], array)
    cv_net = _opencv(net)
    cv_net.setInput(caffe_says["feeds"][name])
    np.testing.assert_allclose(cv_net.forward("prob"), caffe_out["out/prob"], rtol=1e-4, atol=1e-5)


@pytest.mark.reference
def test_v1_files_we_write_load_in_real_caffe(caffe_says: dict) -> None:
    np.testing.assert_allclose(caffe_says["lenet_v1.npz"]["out/prob"], caffe_says["lenet.npz"]["out/prob"], rtol=1e-6)


@pytest.mark.reference
def test_we_read_a_caffemodel_real_caffe_saved(caffe_says: dict) -> None:
    net = load_caffe_net(ZOO / "lenet.prototxt", caffe_says["saved.caffemodel"])
    for key, array in caffe_says["saved.npz"].items():
        layer, index = key.split("/")
        np.testing.assert_array_equal(net.get_weights(layer)[int(index)], array)


def test_get_and_set_weights_round_trip_through_opencv(lenet: CaffeNet) -> None:
    net = CaffeNet(lenet.definition, lenet.to_caffemodel())
    cv_net = _opencv(net)
    for layer in ("conv1", "ip2"):
        for i, array in enumerate(net.get_weights(layer)):
            np.testing.assert_array_equal(cv_net.getParam(layer, i).reshape(array.shape), array)
    new = [np.full(s, 0.5, np.float32) for s in net.weight_shapes("ip2")]
    net.set_weights("ip2", new)
    np.testing.assert_array_equal(_opencv(net).getParam("ip2", 0), new[0])
    assert not np.array_equal(lenet.get_weights("ip2")[0], new[0])  # the source net is untouched


def test_set_weights_rejects_wrong_arrays_clearly(lenet: CaffeNet) -> None:
    net = CaffeNet(lenet.definition)
    with pytest.raises(
        ValueError, match=r"layer 'conv1' \(Convolution\) takes 2 arrays of shapes \[20, 1, 5, 5\], \[20\], got 1"
    ):
        net.set_weights("conv1", [np.zeros((20, 1, 5, 5))])
    with pytest.raises(ValueError, match=r"array 1 must have shape \[20\], got \[21\]"):
        net.set_weights("conv1", [np.zeros((20, 1, 5, 5)), np.zeros(21)])
    with pytest.raises(ValueError, match="no layer with weights named 'relu1'.*conv1, conv2, ip1, ip2"):
        net.set_weights("relu1", [])
    with pytest.raises(ValueError, match="'conv1' has no weights yet"):
        net.get_weights("conv1")
    weights = [np.ones((20, 1, 5, 5)), np.ones(20)]
    net.set_weights("conv1", weights)
    weights[0][...] = 7  # ours is a copy, and so is what get_weights returns
    net.get_weights("conv1")[0][...] = 9
    assert net.get_weights("conv1")[0].max() == 1 and net.get_weights("conv1")[0].dtype == np.float32


def test_shared_params_follow_each_other() -> None:
    net = CaffeNet(parse_prototxt(SIAMESE))
    net.set_weights("f", [np.ones((2, 4)), np.zeros(2)])
    np.testing.assert_array_equal(net.get_weights("f_p")[0], np.ones((2, 4)))
    model = net.to_caffemodel()
    del model.layer[2].blobs[:]  # a caffemodel that stores shared blobs once
    again = CaffeNet(parse_prototxt(SIAMESE), model)
    np.testing.assert_array_equal(again.get_weights("f_p")[0], np.ones((2, 4)))
    assert net.outputs == ["fa", "fb"]


def test_blobs_legacy_double_and_scalar() -> None:
    legacy = caffe_pb2.BlobProto(num=1, channels=1, height=2, width=3, double_data=[1, 2, 3, 4, 5, 6])
    assert blob_to_array(legacy).shape == (1, 1, 2, 3) and blob_to_array(legacy).dtype == np.float32
    scalar = array_to_blob(np.array(2.5))
    # Like Caffe's Blob::ToProto, a 0-d blob is written with no shape field (OpenCV rejects `shape {}`)
    assert not scalar.HasField("shape") and blob_to_array(scalar).shape == () and blob_to_array(scalar) == 2.5
    big = np.arange(100_000, dtype=np.float32).reshape(10, 100, 100)
    assert list(array_to_blob(big).shape.dim) == [10, 100, 100]
    np.testing.assert_array_equal(blob_to_array(array_to_blob(big)), big)
    with pytest.raises(CaffeFormatError, match="has 5 values but its shape \\[2, 3\\] needs 6"):
        blob_to_array(caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[2, 3]), data=[1, 2, 3, 4, 5]))


# -- errors ---------------------------------------------------------------------------


def test_broken_files_are_clear_errors(lenet: CaffeNet, tmp_path: Path) -> None:
    prototxt = ZOO / "lenet.prototxt"
    data = lenet.caffemodel_bytes()
    cases = {
        "half.caffemodel": (data[: len(data) // 2], "half.caffemodel: the caffemodel is truncated or not a caffemodel"),
        "empty.caffemodel": (b"", "empty.caffemodel: the caffemodel is empty"),
        "text.caffemodel": (prototxt.read_bytes(), "text.caffemodel: the caffemodel is truncated or not a caffemodel"),
        "zeros.caffemodel": (bytes(64), "zeros.caffemodel: the caffemodel is truncated or not a caffemodel"),
    }
    # Cut exactly between two layers: protobuf parses that happily, the weight check does not.
    model = lenet.to_caffemodel()
    del model.layer[4:]
    cases["cut.caffemodel"] = (
        model.SerializeToString(),
        r"cut.caffemodel: layer 'ip1' \(InnerProduct\) has no weights",
    )
    other = load_caffe_net(ZOO / "cifar10_quick.prototxt")
    builders.randomise(other, seed=4)
    cases["other.caffemodel"] = (
        other.caffemodel_bytes(),
        r"other.caffemodel: layer 'conv1' \(Convolution\) array 0 must have shape \[20, 1, 5, 5\], got \[32, 3, 5, 5\]",
    )
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CaffeFormatError, match=message):
            load_caffe_net(prototxt, tmp_path / name)
    with pytest.raises(CaffeFormatError, match="nothere.caffemodel: caffemodel file not found"):
        load_caffe_net(prototxt, tmp_path / "nothere.caffemodel")
    with pytest.raises(CaffeFormatError, match="nothere.prototxt: prototxt file not found"):
        load_caffe_net(tmp_path / "nothere.prototxt")


def test_prototxt_errors_name_file_line_and_column(tmp_path: Path) -> None:
    text = (ZOO / "lenet.prototxt").read_text().splitlines()
    text[11] = "  kernel_size: 5"  # line 12 is inside conv1, not inside convolution_param
    (tmp_path / "deploy.prototxt").write_text("\n".join(text))
    # A field LayerParameter lacks is skipped (a fork's, perhaps); the net's own error then names it.
    skipped = r"skipped on reading.*layer.kernel_size \(line 12, layer 'conv1' \(Convolution\)\)"
    with pytest.raises(CaffeFormatError, match=r"deploy.prototxt: layer 'conv1' \(Convolution\): .*" + skipped) as info:
        load_caffe_net(tmp_path / "deploy.prototxt")
    assert isinstance(info.value, ModelLoadError)
    with pytest.raises(CaffeFormatError, match=r"^x.prototxt:2:\d+: Expected"):
        parse_prototxt('layer {\n name: "a"', "x.prototxt")
    unknown = (ZOO / "lenet.prototxt").read_text().replace('type: "ReLU"', 'type: "Mish"')
    (tmp_path / "mish.prototxt").write_text(unknown)
    with pytest.raises(CaffeFormatError, match=r"mish.prototxt: layer 'relu1' \(Mish\): unsupported layer type 'Mish'"):
        load_caffe_net(tmp_path / "mish.prototxt")
    with pytest.raises(CaffeFormatError, match="both 'layer' and the old 'layers'"):
        upgrade_net(parse_prototxt('layer { name: "a" } layers { name: "b" }'))
    with pytest.raises(CaffeFormatError, match="defines no layers"):
        CaffeNet(parse_prototxt('name: "empty"'))


# -- protobuf 3.20 (the seldon-core 1.17.1 lane) --------------------------------------


def test_generated_code_works_on_protobuf_3_20(lenet: CaffeNet, tmp_path: Path) -> None:
    """The committed caffe_pb2.py imports and round-trips on protobuf 3.20 too."""
    python = os.environ.get("SELDON_CAFFE_PB320_PYTHON")
    if not python:
        pytest.skip("set SELDON_CAFFE_PB320_PYTHON to a Python with protobuf 3.20.x and numpy")
    (tmp_path / "lenet.caffemodel").write_bytes(lenet.caffemodel_bytes())
    request = {
        "zoo": [str(ZOO / f"{n}.prototxt") for n in ZOO_NETS],
        "model": str(tmp_path / "lenet.caffemodel"),
        "out": str(tmp_path),
    }
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [python, str(DATA / "pb_compat.py"), json.dumps(request)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["protobuf"].startswith("3.20."), report
    for name in ZOO_NETS:  # the text it formats is the net we parse
        assert parse_prototxt((tmp_path / f"{name}.prototxt").read_text()) == read_prototxt(ZOO / f"{name}.prototxt")
    again = load_caffe_net(ZOO / "lenet.prototxt", tmp_path / "written.caffemodel")
    for layer in ("conv1", "ip2"):
        np.testing.assert_array_equal(again.get_weights(layer)[0], lenet.get_weights(layer)[0])


def test_generated_code_is_current_and_coexists_with_pycaffe(tmp_path: Path) -> None:
    """caffe_pb2.py is caffe.proto compiled, and importing it beside Caffe's own proto works."""
    conflict = (
        "from google.protobuf import descriptor_pb2, descriptor_pool\n"
        "fd = descriptor_pb2.FileDescriptorProto(name='caffe.proto', package='caffe')\n"
        "fd.message_type.add(name='BlobShape')\n"
        "descriptor_pool.Default().Add(fd)  # what `import caffe` registers first\n"
        "from seldon_caffe.caffe import caffe_pb2\n"
        "print(caffe_pb2.BlobShape(dim=[1]).dim[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", conflict], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.stdout.strip() == "1", done.stderr[-2000:]
    protoc = shutil.which("protoc")
    if protoc is None:
        pytest.skip("no protoc to recompile caffe.proto (apt-get install protobuf-compiler)")
    proto = "seldon_caffe/caffe/caffe.proto"
    subprocess.run([protoc, "--descriptor_set_out", str(tmp_path / "d.pb"), proto], cwd=REPO, check=True)
    compiled = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "d.pb").read_bytes()).file[0]
    embedded = descriptor_pb2.FileDescriptorProto.FromString(caffe_pb2.DESCRIPTOR.serialized_pb)
    assert builders.comparable(compiled) == builders.comparable(embedded), (
        "caffe_pb2.py is stale: run scripts/gen_caffe_pb2.sh"
    )
