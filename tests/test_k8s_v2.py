"""`seldon-caffe k8s --target seldon-v2|kserve`: the V2 protocol's manifests, checked for real.

Each document against its CRD, strictly (k8s_check.py); what the manifests set for MLServer
read back by MLServer itself; and the containers' commands run as the cluster would run
them, with the example LeNet answering V2 requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml
from helpers import copy_model
from k8s_check import (
    COMMAND_ENV,
    CRD_DIR,
    IMAGE,
    Schemas,
    by_kind,
    check_all,
    env_of,
    load_schemas,
    run_target,
    write_model_dir,
)
from service import Service, free_port, stop, wait_ready

from seldon_caffe import cli, k8s, scaffold


@pytest.fixture(scope="session")
def schemas() -> Schemas:
    return load_schemas()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path)


KSERVE_MLSERVER_RUNTIME = CRD_DIR / "kserve-mlserver-runtime-v0.20.0.yaml"  # KServe's own
IMPLEMENTATION = "seldon_caffe.v2.SeldonCaffeRuntime"
# Every setting each V2 target takes (a Seldon Core v2 Model always comes from storage).
V2_VARIANTS: dict[str, dict[str, list[str]]] = {
    "seldon-v2": {
        "plain": ["--model-uri", "s3://bucket/lenet"],
        "rclone-remote": ["--model-uri", "minio:models/lenet", "--storage-secret", "seldon-rclone"],
        "replicas": ["--model-uri", "gs://bucket/lenet", "--replicas", "3"],
        "gpu": ["--model-uri", "gs://bucket/lenet", "--gpu", "2"],
        "tuned": ["--model-uri", "gs://bucket/lenet", "--cpu", "500m:4", "--memory", "512Mi:4Gi"],
        "everything": ["--model-uri", "s3://b/l", "--gpu", "1", "--runtime", "onnxruntime", "--namespace", "ml"],
    },
    "kserve": {
        "plain": [],
        "model-uri": ["--model-uri", "s3://bucket/lenet"],
        "model-uri-pvc": ["--model-uri", "pvc://models/zoo/lenet"],
        "replicas": ["--replicas", "3"],
        "hpa": ["--hpa", "2:10:70"],
        "gpu": ["--gpu", "2"],
        "tuned": ["--cpu", "500m:4", "--memory", "512Mi:4Gi", "--threads", "8"],
        "everything": ["--hpa", "1:4:60", "--gpu", "1", "--model-uri", "gs://b/l", "--runtime", "onnxruntime"],
    },
}
KINDS = {"seldon-v2": ["Server", "Model"], "kserve": ["ServingRuntime", "InferenceService"]}


@pytest.mark.parametrize("target, variant", [(t, name) for t, variants in V2_VARIANTS.items() for name in variants])
def test_every_variant_validates_against_the_crds(target, variant, schemas, model_dir, capsys):
    documents = check_all(schemas, run_target(capsys, model_dir, target, *V2_VARIANTS[target][variant]))
    assert [d["kind"] for d in documents] == KINDS[target]  # what is referred to comes first


# -- Seldon Core v2 ------------------------------------------------------------------------


def test_seldon_v2_server_is_seldons_mlserver_with_our_image(schemas, model_dir, capsys):
    args = ["--model-uri", "s3://bucket/lenet", "--replicas", "2", "--gpu", "1", "--cpu", "2:4", "--memory", "3Gi:4Gi"]
    server = by_kind(check_all(schemas, run_target(capsys, model_dir, "seldon-v2", *args)))["Server"]
    assert server["apiVersion"] == "mlops.seldon.io/v1alpha1"
    assert server["spec"]["serverConfig"] == "mlserver" and server["spec"]["replicas"] == 2
    # only seldon-caffe models are placed on it: the capabilities replace the ServerConfig's
    assert server["spec"]["capabilities"] == ["seldon-caffe"] and "extraCapabilities" not in server["spec"]
    pod = server["spec"]["podSpec"]
    (container,) = pod["containers"]
    assert container["name"] == "mlserver"  # the container of Seldon's mlserver ServerConfig it overrides
    assert container["image"] == IMAGE
    assert container["command"] == ["mlserver", "start", "$(MLSERVER_MODELS_DIR)"]
    assert env_of(container)["MLSERVER_PARALLEL_WORKERS"] == "0"
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "3Gi"},
        "limits": {"cpu": "4", "memory": "4Gi", "nvidia.com/gpu": 1},
    }
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_seldon_v2_model_is_routed_to_the_server(schemas, model_dir, capsys):
    args = ["--model-uri", "s3://bucket/lenet", "--storage-secret", "seldon-rclone", "--memory", "3Gi:4Gi"]
    args += ["--runtime", "onnxruntime", "--threads", "8", "--replicas", "2", "--namespace", "ml"]
    documents = by_kind(check_all(schemas, run_target(capsys, model_dir, "seldon-v2", *args)))
    server, model = documents["Server"], documents["Model"]
    assert model["metadata"] == {"name": "lenet-v2", "namespace": "ml"}
    assert server["metadata"] == {"name": "lenet-v2-server", "namespace": "ml"}
    spec = model["spec"]
    assert set(spec["requirements"]) <= set(server["spec"]["capabilities"])
    assert spec["server"] == server["metadata"]["name"]
    assert spec["storageUri"] == "s3://bucket/lenet" and spec["secretName"] == "seldon-rclone"
    assert spec["memory"] == "3Gi" and spec["replicas"] == 2  # memory: the server pod's request
    # Seldon's agent copies these into model-settings.json's parameters.extra, which our runtime reads
    assert spec["parameters"] == [{"name": "runtime", "value": "onnxruntime"}, {"name": "threads", "value": "8"}]


def test_seldon_v2_settings_are_what_mlserver_reads(model_dir, capsys, monkeypatch):
    settings_module = pytest.importorskip("mlserver.settings")
    server = run_target(capsys, model_dir, "seldon-v2", "--model-uri", "s3://b/l")[0]
    for name, value in env_of(server["spec"]["podSpec"]["containers"][0]).items():
        monkeypatch.setenv(name, value)
    assert settings_module.Settings().parallel_workers == 0


def test_seldon_v2_warns_about_the_model_settings_the_agent_needs(model_dir, capsys):
    base = ["k8s", str(model_dir), "--image", IMAGE, "--target", "seldon-v2", "--model-uri", "s3://b/l", "--gpu", "1"]
    (model_dir / "model.yaml").write_text("name: lenet\nruntime: onnxruntime\noptions: {device: cuda}\n")
    assert cli.main(base) == 0
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "model-settings.json" in line]
    assert line.startswith(f"seldon-caffe: warning: {model_dir} has no model-settings.json")
    assert f'"implementation": "{IMPLEMENTATION}"' in line
    (model_dir / "model-settings.json").write_text(
        '{"name": "lenet", "implementation": "mlserver_sklearn.SKLearnModel"}'
    )
    assert cli.main(base) == 0
    assert "has implementation 'mlserver_sklearn.SKLearnModel'" in capsys.readouterr().err
    (model_dir / "model-settings.json").write_text(json.dumps(k8s.model_settings("lenet")))
    assert cli.main(base) == 0
    assert "model-settings.json" not in capsys.readouterr().err


# -- KServe --------------------------------------------------------------------------------


def test_kserve_runtime_is_modelled_on_kserves_own_mlserver_runtime(schemas, model_dir, capsys):
    theirs = yaml.safe_load(KSERVE_MLSERVER_RUNTIME.read_text())["spec"]
    runtime = by_kind(check_all(schemas, run_target(capsys, model_dir, "kserve", "--model-uri", "gs://b/l")))
    ours = runtime["ServingRuntime"]["spec"]
    (container,), (their_container,) = ours["containers"], theirs["containers"]
    assert container["name"] == their_container["name"] == "kserve-container"
    assert ours["protocolVersions"] == theirs["protocolVersions"] == ["v2"]
    assert container["securityContext"] == their_container["securityContext"]
    env, their_env = env_of(container), env_of(their_container)
    assert {env[name] for name in ("MLSERVER_HTTP_PORT", "MLSERVER_GRPC_PORT")} == {"8080", "9000"}
    assert all(env[name] == their_env[name] for name in ("MLSERVER_HTTP_PORT", "MLSERVER_GRPC_PORT"))
    assert env["MLSERVER_MODEL_IMPLEMENTATION"] == IMPLEMENTATION and env["MLSERVER_PARALLEL_WORKERS"] == "0"
    assert container["image"] == IMAGE and container["command"] == ["mlserver", "start", "/mnt/models"]
    assert ours["annotations"]["prometheus.kserve.io/port"] == env["MLSERVER_METRICS_PORT"]


@pytest.mark.parametrize(
    "args, scaling",
    [
        (["--replicas", "3"], {"minReplicas": 3, "maxReplicas": 3}),
        (
            ["--hpa", "2:10:70"],
            {"minReplicas": 2, "maxReplicas": 10, "scaleMetric": "cpu", "scaleMetricType": "Utilization"},
        ),
    ],
)
def test_kserve_inference_service_uses_the_runtime(schemas, model_dir, capsys, args, scaling):
    documents = run_target(capsys, model_dir, "kserve", "--model-uri", "s3://b/lenet", "--gpu", "1", *args)
    runtime, service = (by_kind(check_all(schemas, documents))[kind] for kind in ("ServingRuntime", "InferenceService"))
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["metadata"]["name"] == "lenet-v2"
    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"] == "lenet-v2-runtime"
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] == "v2" and model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["storageUri"] == "s3://b/lenet"
    assert model["resources"]["limits"] == {"cpu": "2", "memory": "2Gi", "nvidia.com/gpu": 1}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in predictor["tolerations"]
    assert scaling.items() <= predictor.items()
    assert predictor.get("scaleTarget") == (70 if "--hpa" in args else None)


def test_kserve_without_model_uri_serves_the_model_in_the_image(schemas, model_dir, capsys):
    runtime, service = check_all(schemas, run_target(capsys, model_dir, "kserve"))
    (container,) = runtime["spec"]["containers"]
    assert container["command"] == ["mlserver", "start", "/microservice"]  # where s2i/bin/assemble put it
    assert env_of(container)["MLSERVER_MODEL_URI"] == "/microservice"
    assert "storageUri" not in service["spec"]["predictor"]["model"]


def kserve_environment(documents: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The kserve-container's environment as KServe builds it: the runtime's, the model's on top,
    and `{{.Name}}` filled with the InferenceService's name."""
    runtime, service = documents
    env = {**env_of(runtime["spec"]["containers"][0]), **env_of(service["spec"]["predictor"]["model"])}
    env = {name: value.replace("{{.Name}}", service["metadata"]["name"]) for name, value in env.items()}
    for name in [name for name in os.environ if name.startswith("MLSERVER_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def test_kserve_environment_is_what_mlserver_reads(model_dir, tmp_path, capsys, monkeypatch):
    """MLServer itself reads the variables: the server settings, then the model with init's
    model-settings.json (its name and class, --runtime in parameters.extra) and without one."""
    pytest.importorskip("mlserver")
    from mlserver.repository import SchemalessModelRepository
    from mlserver.repository.load import load_model_settings
    from mlserver.settings import Settings

    args = ["--model-uri", "s3://b/l", "--runtime", "onnxruntime", "--threads", "8"]
    documents = run_target(capsys, model_dir, "kserve", *args)
    kserve_environment(documents, monkeypatch)
    settings = Settings()
    assert (settings.http_port, settings.grpc_port, settings.metrics_port) == (8080, 9000, 8082)
    assert settings.parallel_workers == 0

    plan = scaffold.init_model_dir(tmp_path / "LeNet_v2")  # the name k8s gives the InferenceService
    model = load_model_settings(str(plan.target / "model-settings.json"))
    assert (model.name, model.implementation_) == ("lenet-v2", IMPLEMENTATION)
    assert model.parameters.uri == "/mnt/models"
    assert model.parameters.extra == {"runtime": "onnxruntime", "threads": 8}  # what our runtime reads

    bare = tmp_path / "no-settings"
    bare.mkdir()
    (found,) = asyncio.run(SchemalessModelRepository(str(bare)).list())
    assert (found.name, found.implementation_, found.parameters.uri) == ("lenet-v2", IMPLEMENTATION, "/mnt/models")
    assert found.parameters.extra == {"runtime": "onnxruntime", "threads": 8}


def test_kserve_notes_what_the_directorys_model_settings_change(model_dir, capsys):
    (model_dir / "model-settings.json").write_text(
        json.dumps({"name": "lenet", "implementation": IMPLEMENTATION, "parameters": {"extra": {}}})
    )
    args = ["--target", "kserve", "--runtime", "onnxruntime", "--threads", "2"]
    assert cli.main(["k8s", str(model_dir), "--image", IMAGE, *args]) == 0
    note, warning = [line for line in capsys.readouterr().err.splitlines() if "model-settings.json" in line]
    assert "names the model 'lenet', so MLServer serves /v2/models/lenet/infer, not /v2/models/lenet-v2/infer" in note
    assert "has its own parameters, so MLServer ignores MLSERVER_MODEL_EXTRA and --runtime and --threads" in warning
    assert '"extra": {"runtime": "onnxruntime", "threads": 2}' in warning
    assert cli.main(["k8s", str(model_dir), "--image", IMAGE, "--target", "kserve", "--name", "lenet"]) == 0
    assert "model-settings.json" not in capsys.readouterr().err


# -- the V2 targets' container commands, run for real --------------------------------------

# What Seldon Core v2's `mlserver` ServerConfig (operator/config/serverconfigs/mlserver.yaml,
# v2.10) sets in the container our Server overrides; ports are free ones here.
SELDON_SERVERCONFIG_ENV = {"MLSERVER_MODEL_PARALLEL_WORKERS": "1", "MLSERVER_LOAD_MODELS_AT_STARTUP": "false"}


@pytest.fixture
def plain_lenet(tmp_path: Path, lenet_example: Path) -> Path:
    """The example LeNet without hooks (arrays in, arrays out), with init's model-settings.json."""
    model_dir = copy_model(lenet_example, tmp_path / "storage" / "lenet")
    (model_dir / "hooks.py").unlink()
    (model_dir / "model-settings.json").write_text(json.dumps(k8s.model_settings("lenet")))
    return model_dir


def run_container(container: dict[str, Any], env: dict[str, str], tmp_path: Path) -> Service:
    """The container's command with its env, as the kubelet runs it: $(VAR) expanded from the env."""
    env = {**os.environ, **env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONPATH"] = COMMAND_ENV["PYTHONPATH"]  # seldon_caffe importable, as in the image
    command = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], part) for part in container["command"]]
    log = tmp_path / f"{container['name']}.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, env=env, cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    ports = [int(env[f"MLSERVER_{kind}_PORT"]) for kind in ("HTTP", "GRPC", "METRICS")]
    return Service(process, *ports, log_path=log, protocol="v2")


def wait_model_ready(service: Service, model: str, timeout: float = 180) -> None:
    """Ready (every model the repository lists is READY), then this model among them."""
    wait_ready(service, timeout)
    deadline = time.monotonic() + timeout
    while requests.get(f"{service.url}/v2/models/{model}/ready", timeout=10).status_code != 200:
        assert service.process.poll() is None and time.monotonic() < deadline, service.log()
        time.sleep(0.3)


def wait_live(service: Service, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert service.process.poll() is None and time.monotonic() < deadline, service.log()
        try:
            if requests.get(f"{service.url}/v2/health/live", timeout=10).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)


def infer_lenet(service: Service, model: str, x: np.ndarray) -> np.ndarray:
    request = {"inputs": [{"name": "data", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    response = requests.post(f"{service.url}/v2/models/{model}/infer", json=request, timeout=120)
    assert response.status_code == 200, response.text
    (output,) = [output for output in response.json()["outputs"] if output["name"] == "prob"]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


@pytest.mark.e2e
def test_kserve_container_serves_the_model_from_the_storage_location(plain_lenet, tmp_path, capsys):
    """The ServingRuntime's command and env, as KServe runs them once its storage initializer put
    the model in /mnt/models (here a folder), answer V2 requests under the InferenceService's name."""
    runtime, service = run_target(capsys, plain_lenet, "kserve", "--model-uri", "s3://b/lenet", "--name", "lenet")
    (container,) = runtime["spec"]["containers"]
    assert "/mnt/models" in container["command"]
    container["command"] = [str(plain_lenet) if part == "/mnt/models" else part for part in container["command"]]
    env = {name: value.replace("{{.Name}}", service["metadata"]["name"]) for name, value in env_of(container).items()}
    env["MLSERVER_MODEL_URI"] = str(plain_lenet)
    env.update({f"MLSERVER_{kind}_PORT": str(free_port()) for kind in ("HTTP", "GRPC", "METRICS")})
    running = run_container(container, env, tmp_path)
    x = np.random.default_rng(3).random((2, 1, 28, 28), dtype=np.float32)
    try:
        wait_model_ready(running, service["metadata"]["name"])
        prob = infer_lenet(running, service["metadata"]["name"], x)
    finally:
        stop(running)
    assert prob.shape == (2, 10) and np.allclose(prob.sum(axis=1), 1.0, atol=1e-4)


@pytest.mark.e2e
def test_seldon_v2_container_loads_the_model_as_seldons_agent_asks(plain_lenet, tmp_path, capsys):
    """The Server's command in the env Seldon's ServerConfig gives it starts an empty MLServer;
    the model then loads as Seldon's agent loads one: the artifact copied under the models folder,
    model-settings.json renamed to <model>_<version> with the Model's parameters in its extra,
    and MLServer's repository API asked to load it."""
    args = ["--model-uri", "s3://b/lenet", "--runtime", "opencv", "--threads", "3"]
    server, model = run_target(capsys, plain_lenet, "seldon-v2", *args)
    (container,) = server["spec"]["podSpec"]["containers"]
    models = tmp_path / "agent" / "models"
    models.mkdir(parents=True)
    env = {**SELDON_SERVERCONFIG_ENV, "MLSERVER_MODELS_DIR": str(models), **env_of(container)}
    env.update({f"MLSERVER_{kind}_PORT": str(free_port()) for kind in ("HTTP", "GRPC", "METRICS")})
    running = run_container(container, env, tmp_path)
    versioned = f"{model['metadata']['name']}_1"
    artifact = models / versioned
    shutil.copytree(plain_lenet, artifact)
    settings = json.loads((artifact / "model-settings.json").read_text())
    extra = {p["name"]: p["value"] for p in model["spec"]["parameters"]}
    settings.update(name=versioned, parameters={"version": "1", "extra": extra})
    (artifact / "model-settings.json").write_text(json.dumps(settings))
    x = np.random.default_rng(4).random((3, 1, 28, 28), dtype=np.float32)
    try:
        wait_live(running, timeout=180)  # no model yet: the agent loads it next
        loaded = requests.post(f"{running.url}/v2/repository/models/{versioned}/load", timeout=180)
        assert loaded.status_code == 200, loaded.text + running.log()
        prob = infer_lenet(running, versioned, x)
    finally:
        stop(running)
    assert prob.shape == (3, 10) and np.allclose(prob.sum(axis=1), 1.0, atol=1e-4)
    assert "with runtime opencv" in running.log()  # the Model's parameter reached the runtime
