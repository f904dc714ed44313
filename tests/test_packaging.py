"""`seldon-caffe init` and the s2i builder, run for real on this machine.

Docker does not run here, so the s2i scripts run directly against directories laid out as
an s2i build lays them out (the source in S2I_SOURCE_DIR, installed into
SELDON_CAFFE_APP_DIR), with this venv standing in for the builder image's Python.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from seldon_core.utils import grpc_datadef_to_array
from service import Service, free_port, stop, wait_ready

from seldon_caffe import cli, scaffold
from seldon_caffe.caffe import PARAMETRISED_LAYERS, load_caffe_net
from seldon_caffe.config import load_config
from seldon_caffe.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
S2I = REPO / "s2i"
BIN = Path(sys.executable).parent


def command_env(**extra: str) -> dict[str, str]:
    """The environment of an installed seldon-caffe: this venv first on PATH, the package importable."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PIP_NO_INDEX"] = "1"  # assemble's pip must find everything installed already
    env.update(extra)
    return env


def seldon_caffe(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = BIN / "seldon-caffe"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "seldon_caffe.cli"]
    return subprocess.run([*argv, *args], cwd=cwd, env=command_env(), capture_output=True, text=True, timeout=120)


def s2i_layout(tmp: Path, model_dir: Path) -> tuple[Path, Path, dict[str, str]]:
    """Copy `model_dir` where s2i injects the source; return (source, app dir, script env)."""
    src, app = tmp / "tmp-src", tmp / "microservice"
    shutil.copytree(model_dir, src)
    env = command_env(
        S2I_SOURCE_DIR=str(src),
        SELDON_CAFFE_APP_DIR=str(app),
        SELDON_CAFFE_PYTHON=sys.executable,
        SELDON_CAFFE_COMMAND=str(BIN / "seldon-caffe"),
    )
    return src, app, env


def assemble(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(S2I / "bin/assemble")], env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def lenet_files(tmp_path_factory: pytest.TempPathFactory, zoo: Path) -> list[Path]:
    """The zoo's LeNet with random weights, written by our own caffemodel writer."""
    directory = tmp_path_factory.mktemp("zoo")
    prototxt = shutil.copy(zoo / "lenet.prototxt", directory / "lenet.prototxt")
    net = load_caffe_net(prototxt)
    rng = np.random.default_rng(6)
    for layer in net.layers:
        if layer.type in PARAMETRISED_LAYERS:
            shapes = net.weight_shapes(layer.name)
            net.set_weights(layer.name, [rng.normal(0.0, 0.1, shape).astype(np.float32) for shape in shapes])
    weights = directory / "lenet.caffemodel"
    weights.write_bytes(net.caffemodel_bytes())
    return [Path(prototxt), weights]


@pytest.fixture(scope="module")
def lenet_dir(tmp_path_factory: pytest.TempPathFactory, lenet_files: list[Path]) -> Path:
    """`seldon-caffe init lenet --from <zoo files>`, run as a user runs it."""
    work = tmp_path_factory.mktemp("init")
    done = seldon_caffe("init", "lenet", "--from", *map(str, lenet_files), cwd=work)
    assert done.returncode == 0, done.stderr
    assert "s2i build lenet seldon-caffe-s2i:0.1.0 lenet:0.1.0" in done.stdout
    return work / "lenet"


@pytest.mark.e2e
def test_init_then_s2i_assemble_and_run_answers_over_rest(lenet_dir, tmp_path):
    expected = {".s2i/environment", "README.md", "deploy/seldondeployment.yaml", "hooks.py", "model.yaml"}
    expected.add("model-settings.json")
    assert expected | {"requirements.txt", "lenet.prototxt", "lenet.caffemodel"} == {
        str(p.relative_to(lenet_dir)) for p in lenet_dir.rglob("*") if p.is_file()
    }
    src, app, env = s2i_layout(tmp_path, lenet_dir)
    with open(src / "requirements.txt", "a") as requirements:
        requirements.write("numpy<2\n")  # satisfied already: exercises the install without a download

    built = assemble(env)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "Installing requirements.txt" in built.stdout
    assert "input     data: float32[N, 1, 28, 28]" in built.stdout  # the model was loaded once
    assert (app / "lenet.caffemodel").read_bytes() == (lenet_dir / "lenet.caffemodel").read_bytes()

    ports = [free_port() for _ in range(3)]
    env.update(
        PREDICTIVE_UNIT_HTTP_SERVICE_PORT=str(ports[0]),
        PREDICTIVE_UNIT_GRPC_SERVICE_PORT=str(ports[1]),
        PREDICTIVE_UNIT_METRICS_SERVICE_PORT=str(ports[2]),
        GUNICORN_WORKERS="1",
        GUNICORN_THREADS="2",
        # what `seldon-caffe k8s --model-uri` relies on: Seldon's model_dir parameter wins
        PREDICTIVE_UNIT_PARAMETERS=f'[{{"name": "model_dir", "value": "{app}", "type": "STRING"}}]',
        SELDON_CAFFE_MODEL_DIR=str(tmp_path / "not-here"),
    )
    service = start_s2i_run(env, tmp_path, ports)
    try:
        wait_ready(service, timeout=180)
        x = np.random.default_rng(1).random((2, 1, 28, 28), dtype=np.float32)
        response = service.post({"data": {"ndarray": x.tolist()}})
        assert response.status_code == 200, response.text
        prob = np.asarray(response.json()["data"]["ndarray"])
        grpc = service.client("grpc").microservice(data=x, method="predict")
        assert grpc.success, grpc.msg
        metrics = requests.get(f"http://127.0.0.1:{ports[2]}/metrics", timeout=10)
    finally:
        stop(service)
    assert prob.shape == (2, 10) and np.allclose(prob.sum(axis=1), 1.0, atol=1e-4)
    assert np.allclose(grpc_datadef_to_array(grpc.response.data), prob, atol=1e-5)
    assert metrics.status_code == 200 and "seldon_caffe_run_model_seconds" in metrics.text
    assert "Serving the model_dir parameter's directory with seldon-caffe" in service.log()
    assert f"serving {app} " in service.log()  # `seldon-caffe serve` found it through the parameter
    _assert_answers_as_served(app, x, prob)


@pytest.mark.parametrize("broken", ["format", "weights"])
def test_assemble_fails_on_a_broken_model_with_a_clear_message(lenet_dir, tmp_path, broken):
    src, _, env = s2i_layout(tmp_path, lenet_dir)
    if broken == "format":
        config = src / "model.yaml"
        config.write_text(config.read_text().replace("format: caffe", "format: caffee"))
        reason = re.escape(f"{src.parent / 'microservice/model.yaml'}: field 'format': 'caffee' is not a format")
    else:
        weights = src / "lenet.caffemodel"
        weights.write_bytes(weights.read_bytes()[:1000])
        reason = r"lenet\.caffemodel"
    built = assemble(env)
    assert built.returncode != 0
    assert re.search(reason, built.stderr), built.stderr
    assert "error: the model directory does not load" in built.stderr


def test_assemble_without_model_yaml_leaves_the_model_to_run_time(tmp_path):
    source = tmp_path / "hooks-only"
    source.mkdir()
    (source / "hooks.py").write_text("def setup(ctx):\n    return None\n")
    _, app, env = s2i_layout(tmp_path, source)
    built = assemble(env)
    assert built.returncode == 0, built.stderr
    assert "No model.yaml" in built.stdout and (app / "hooks.py").is_file()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"GUNICORN_WORKERS": "two"}, "GUNICORN_WORKERS=two: expected a positive integer"),
        ({"SELDON_CAFFE_PROTOCOL": "v3"}, "SELDON_CAFFE_PROTOCOL=v3: expected seldon or v2"),
        ({"SELDON_CAFFE_PROTOCOL": "v2", "MLSERVER_GRPC_PORT": "grpc"}, "MLSERVER_GRPC_PORT=grpc: expected a positive"),
    ],
)
def test_run_refuses_settings_that_are_not_counts(tmp_path, settings, message):
    env = command_env(SELDON_CAFFE_APP_DIR=str(tmp_path), **settings)
    done = subprocess.run([str(S2I / "bin/run")], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: ") and message in line


def start_s2i_run(env: dict[str, str], tmp_path: Path, ports: list[int], protocol: str = "seldon") -> Service:
    """s2i/bin/run as the image starts it, its output in a log file; not waited for."""
    log = Path(tempfile.mkstemp(prefix="s2i-run-", suffix=".log", dir=tmp_path)[1])
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [str(S2I / "bin/run")],
            env=env,
            cwd=tmp_path,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Service(process, *ports, log_path=log, protocol=protocol)


@pytest.mark.e2e
@pytest.mark.skipif(importlib.util.find_spec("seldon_caffe.v2") is None, reason="seldon_caffe.v2 is not there yet")
def test_s2i_run_with_protocol_v2_answers_over_v2(lenet_dir, tmp_path):
    """The image's other protocol: SELDON_CAFFE_PROTOCOL=v2 makes s2i/bin/run serve V2 on MLServer's ports."""
    _, app, env = s2i_layout(tmp_path, lenet_dir)
    built = assemble(env)
    assert built.returncode == 0, built.stdout + built.stderr
    ports = [free_port() for _ in range(3)]
    env.update(
        SELDON_CAFFE_PROTOCOL="v2",
        MLSERVER_HTTP_PORT=str(ports[0]),
        MLSERVER_GRPC_PORT=str(ports[1]),
        MLSERVER_METRICS_PORT=str(ports[2]),
    )
    service = start_s2i_run(env, tmp_path, ports, protocol="v2")
    x = np.random.default_rng(1).random((2, 1, 28, 28), dtype=np.float32)
    request = {"inputs": [{"name": "data", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    try:
        wait_ready(service, timeout=180)
        response = service.post(request, path="/v2/models/lenet/infer")
    finally:
        stop(service)
    assert response.status_code == 200, response.text
    assert "with seldon-caffe over the V2 protocol (MLServer)" in service.log()
    (output,) = [o for o in response.json()["outputs"] if o["name"] == "prob"]
    prob = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    _assert_answers_as_served(app, x, prob)


def test_usage_explains_the_builder():
    for argv in ([str(S2I / "bin/usage")], [str(S2I / "bin/assemble"), "-h"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "s2i build MODEL_DIR seldon-caffe-s2i:0.1.0 IMAGE" in done.stdout


def test_s2i_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    scripts = [f"s2i/bin/{name}" for name in ("assemble", "run", "usage", "defaults.sh", "entrypoint")]
    scripts += [str(p.relative_to(REPO)) for p in sorted((REPO / "scripts").glob("**/*.sh"))]
    done = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_are_s2i_builders(dockerfile):
    text = (S2I / dockerfile).read_text()
    assert 'io.openshift.s2i.scripts-url="image:///s2i/bin"' in text
    for line in re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE):
        for source in line.split():
            assert (REPO / source).exists(), f"{dockerfile} copies {source}, which the repository lacks"
    # the V2 protocol's MLServer by default (s2i/bin/run's SELDON_CAFFE_PROTOCOL=v2, `k8s --target seldon-v2|kserve`)
    assert "ARG WITH_MLSERVER=1" in text and "mlserver" in text and "8080" in text.split("EXPOSE")[-1]
    # Python 3.12 for both (seldon-core 1.19 and MLServer 1.7 share only it); the GPU image
    # takes CUDA from the wheels of torch and onnxruntime-gpu, not from an nvidia/cuda base
    assert re.search(r"^FROM python:3\.12-slim-bookworm$", text, re.MULTILINE)
    assert 'ENTRYPOINT ["/s2i/bin/entrypoint"]' in text  # the service is PID 1: s2i/bin/entrypoint
    if dockerfile == "Dockerfile.gpu":
        assert "onnxruntime-gpu" in text and "ARG EXTRAS=torch" in text


def test_init_refuses_to_overwrite_and_writes_nothing(tmp_path, capsys):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "model.yaml").write_text("mine\n")
    (target / "hooks.py").write_text("# mine\n")
    assert cli.main(["init", str(target)]) == 1
    err = capsys.readouterr().err
    assert "refusing to overwrite 2 existing path(s); nothing was written" in err
    assert f"{target / 'hooks.py'}\n" in err and f"{target / 'model.yaml'}\n" in err
    assert sorted(p.name for p in target.iterdir()) == ["hooks.py", "model.yaml"]
    assert (target / "model.yaml").read_text() == "mine\n"


def test_init_writes_model_settings_that_mlserver_accepts(tmp_path, monkeypatch, capsys):
    """model-settings.json: our runtime's class by name (seldon_caffe.v2 is not imported), the
    model named as `k8s` names the deployment, and its files where MLServer looks by default."""
    settings = pytest.importorskip("mlserver.settings")
    from mlserver.repository.load import load_model_settings

    for name in [name for name in os.environ if name.startswith("MLSERVER_")]:
        monkeypatch.delenv(name)  # the file alone decides
    plan = scaffold.init_model_dir(tmp_path / "My Model")
    path = plan.target / "model-settings.json"
    implementation = "seldon_caffe.v2.SeldonCaffeRuntime"
    assert json.loads(path.read_text()) == {"name": "my-model", "implementation": implementation}
    assert settings.ModelSettings.parse_file(str(path)).implementation_ == implementation
    loaded = load_model_settings(str(path))
    assert loaded.name == "my-model" and loaded.parameters.uri == str(plan.target)  # the model directory
    assert cli.main(["k8s", str(plan.target), "--image", "my-model:1", "--target", "kserve"]) == 0
    assert "name: my-model\n" in capsys.readouterr().out  # the InferenceService: MLServer's model name


def test_init_keeps_the_users_own_model_settings(tmp_path):
    onnx, own = tmp_path / "net.onnx", tmp_path / "model-settings.json"
    onnx.write_text("# mine\n")
    own.write_text('{"name": "mine", "implementation": "seldon_caffe.v2.SeldonCaffeRuntime"}\n')
    plan = scaffold.init_model_dir(tmp_path / "onnx-model", sources=[onnx, own])
    assert json.loads((plan.target / "model-settings.json").read_text())["name"] == "mine"


def test_init_without_files_names_placeholders(tmp_path):
    plan = scaffold.init_model_dir(tmp_path / "yes", "onnx")
    assert yaml.safe_load((plan.target / "model.yaml").read_text())["name"] == "yes"  # a string, not True
    assert yaml.safe_load((plan.target / "model.yaml").read_text())["files"] == {"onnx": "model.onnx"}
    assert "First copy the model's files in" in (plan.target / "README.md").read_text()
    with pytest.raises(ConfigError, match=r"field 'files.onnx': .*model.onnx does not exist"):
        load_config(plan.target)


def test_init_detects_the_format_and_copies_extra_files(tmp_path):
    onnx, labels, other = tmp_path / "net.onnx", tmp_path / "labels.txt", tmp_path / "train.prototxt"
    hooks = tmp_path / "hooks.py"
    for path in (onnx, labels, other, hooks):
        path.write_text("# mine\n")
    plan = scaffold.init_model_dir(tmp_path / "onnx-model", sources=[onnx, labels, hooks])
    assert (plan.format, plan.files) == ("onnx", {"onnx": "net.onnx"})
    assert (plan.target / "labels.txt").is_file()
    assert (plan.target / "hooks.py").read_text() == "# mine\n"  # the user's hooks win over the template
    with pytest.raises(scaffold.InitError, match="several formats"):
        scaffold.init_model_dir(tmp_path / "mixed", sources=[onnx, other])
    assert not (tmp_path / "mixed").exists()
    plan = scaffold.init_model_dir(tmp_path / "picked", "onnx", [onnx, other])  # the prototxt rides along
    assert plan.files == {"onnx": "net.onnx"} and (plan.target / "train.prototxt").is_file()
    with pytest.raises(scaffold.InitError, match=r"needs a file for files.weights \(.caffemodel\)"):
        scaffold.init_model_dir(tmp_path / "no-weights", sources=[other])


def test_init_in_place_keeps_the_model_files(lenet_files, tmp_path):
    target = tmp_path / "existing"
    target.mkdir()
    in_place = [Path(shutil.copy(path, target)) for path in lenet_files]
    plan = scaffold.init_model_dir(target, sources=in_place)
    assert plan.files == {"prototxt": "lenet.prototxt", "weights": "lenet.caffemodel"}
    assert load_config(target).files["weights"] == in_place[1].resolve()


def _assert_answers_as_served(app: Path, x: np.ndarray, prob: np.ndarray) -> None:
    """The same model in this process, no service in between, answers what the service did."""
    from seldon_caffe.pipeline import Pipeline

    direct = Pipeline.load(app)
    try:
        assert np.allclose(direct.model.run(x)["prob"], prob, atol=1e-5)
    finally:
        direct.model.close()
