"""`seldon-caffe k8s` and the manifest `init` writes, checked against the real CRDs.

The default target (seldon-v1, a SeldonDeployment), and what the command does the same for
every target: advice, one-line errors, names, namespaces, -o. The V2 targets' documents:
test_k8s_v2.py. The strict CRD validation both use: k8s_check.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_check import (
    DNS_LABEL,
    IMAGE,
    Schemas,
    check,
    check_all,
    env_of,
    k8s_process,
    load_schemas,
    run_target,
    write_model_dir,
)

from seldon_caffe import cli, k8s, scaffold


@pytest.fixture(scope="session")
def schemas() -> Schemas:
    return load_schemas()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path)


VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "replicas": ["--replicas", "3"],
    "hpa": ["--hpa", "2:10:70"],
    "gpu": ["--gpu", "2"],
    "model-uri": ["--model-uri", "s3:models/lenet", "--storage-secret", "rclone-s3"],
    "model-uri-pvc": ["--model-uri", "pvc://models/zoo/lenet"],
    "tuned": ["--cpu", "500m:4", "--memory", "512Mi:4Gi", "--workers", "2", "--threads", "8", "--grpc-workers", "2"],
    "everything": ["--hpa", "1:4:60", "--gpu", "1", "--model-uri", "gs://bucket/lenet", "--runtime", "onnxruntime"],
}
# Each target's own arguments for the tests that run every target.
TARGET_ARGS = {"seldon-v1": [], "seldon-v2": ["--model-uri", "s3://b/l"], "kserve": []}


def run_k8s(capsys: pytest.CaptureFixture[str], model_dir: Path, *extra: str) -> dict[str, Any]:
    """The real command in-process; returns the one manifest it printed."""
    (manifest,) = run_target(capsys, model_dir, "seldon-v1", *extra)
    return manifest


def model_container(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["predictors"][0]["componentSpecs"][0]["spec"]["containers"][0]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_validates_against_the_crd(variant, schemas, model_dir, capsys):
    manifest = check(schemas, run_k8s(capsys, model_dir, *VARIANTS[variant]))
    assert (manifest["apiVersion"], manifest["kind"]) == ("machinelearning.seldon.io/v1", "SeldonDeployment")


def test_seldon_v1_is_the_default(model_dir, capsys):
    assert cli.main(["k8s", str(model_dir), "--image", IMAGE, "--hpa", "1:3:50"]) == 0
    default = capsys.readouterr()
    assert cli.main(["k8s", str(model_dir), "--image", IMAGE, "--hpa", "1:3:50", "--target", "seldon-v1"]) == 0
    assert capsys.readouterr() == default
    assert "\n---" not in default.out and "kind: SeldonDeployment" in default.out


def test_plain_manifest_probes_resources_and_workers(schemas, model_dir, capsys):
    manifest = check(schemas, run_k8s(capsys, model_dir))
    predictor = manifest["spec"]["predictors"][0]
    container = model_container(manifest)
    assert manifest["metadata"]["name"] == "lenet-v2"  # from model.yaml's name, made a DNS label
    assert predictor["replicas"] == 1 and "hpaSpec" not in predictor["componentSpecs"][0]
    assert container["image"] == IMAGE
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/status", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/ping", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/health/ping"
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "1Gi"},
        "limits": {"cpu": "2", "memory": "2Gi"},
    }
    env = env_of(container)
    assert env == {"GUNICORN_WORKERS": "1", "GUNICORN_THREADS": "4", "GRPC_WORKERS": "1", "GRPC_THREADS": "4"}
    assert "parameters" not in predictor["graph"] and "initContainers" not in predictor["componentSpecs"][0]["spec"]


def test_replicas_and_worker_settings(schemas, model_dir, capsys):
    manifest = check(schemas, run_k8s(capsys, model_dir, *VARIANTS["replicas"], *VARIANTS["tuned"]))
    container = model_container(manifest)
    assert manifest["spec"]["predictors"][0]["replicas"] == 3
    assert container["resources"]["requests"] == {"cpu": "500m", "memory": "512Mi"}
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "4Gi"}
    env = env_of(container)
    assert env == {"GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "8", "GRPC_WORKERS": "2", "GRPC_THREADS": "8"}


def test_hpa_scales_on_cpu_and_leaves_replicas_to_it(schemas, model_dir, capsys):
    predictor = check(schemas, run_k8s(capsys, model_dir, "--hpa", "2:10:70%"))["spec"]["predictors"][0]
    hpa = predictor["componentSpecs"][0]["hpaSpec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    assert hpa["metricsv2"] == [
        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}
    ]
    assert "replicas" not in predictor


def test_gpu_variant_requests_nvidia_gpus(schemas, model_dir, capsys):
    manifest = check(schemas, run_k8s(capsys, model_dir, "--gpu", "2"))
    assert model_container(manifest)["resources"]["limits"]["nvidia.com/gpu"] == 2
    pod = manifest["spec"]["predictors"][0]["componentSpecs"][0]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


# -- advice and errors, every target -------------------------------------------------------


def test_gpu_with_a_cpu_model_warns(model_dir, capsys):
    (model_dir / "model.yaml").write_text("name: lenet\nruntime: onnxruntime\noptions: {device: cpu}\n")
    assert cli.main(["k8s", str(model_dir), "--image", IMAGE, "--gpu", "1"]) == 0
    err = capsys.readouterr().err
    assert "GPU would sit idle" in err and "set device: cuda" in err and "s2i/Dockerfile.gpu" in err


@pytest.mark.parametrize("target", sorted(TARGET_ARGS))
def test_gpu_for_a_caffe_model_on_auto_says_opencv_ignores_it(schemas, model_dir, target):
    """The new user's first hour: device cuda, runtime auto, --gpu 1, and a pod that never uses the GPU."""
    (model_dir / "model-settings.json").write_text(json.dumps(k8s.model_settings("LeNet_v2")))
    done = k8s_process(model_dir, "--gpu", "1", "--target", target, *TARGET_ARGS[target])
    assert done.returncode == 0, done.stderr
    check_all(schemas, list(yaml.safe_load_all(done.stdout)))  # a warning, not a different manifest
    (warning,) = done.stderr.splitlines()
    assert warning.startswith("seldon-caffe: warning: model.yaml has options.device cuda and --gpu 1 asks for GPUs")
    assert "runtime opencv (what runtime: auto chooses for format caffe)" in warning
    assert "ignores the GPU" in warning
    assert "torch (on CUDA), tensorrt (a TensorRT plan), onnxruntime with CUDA" in warning


def test_a_cuda_model_without_gpus_warns(model_dir):
    (model_dir / "model.yaml").write_text("name: lenet\nruntime: torch\noptions: {device: cuda}\n")
    done = k8s_process(model_dir)
    assert done.returncode == 0, done.stderr
    assert "seldon-caffe: warning: model.yaml has options.device cuda, but the pod asks for no GPU" in done.stderr
    assert "seldon-caffe: warning" not in k8s_process(model_dir, "--gpu", "1").stderr


@pytest.mark.parametrize(
    "model_yaml, build_arg",
    [
        ("format: tensorflow\n", "--build-arg EXTRAS=tensorflow "),
        ("format: caffe\nruntime: openvino\n", "--build-arg EXTRAS=onnx,openvino "),
        ("format: torch\n", "--build-arg EXTRAS=torch "),
        (
            "format: onnx\nruntime: tensorrt\noptions: {device: cuda}\n",
            "-f s2i/Dockerfile.gpu --build-arg WITH_TENSORRT=1",
        ),
    ],
)
@pytest.mark.parametrize("target", ["seldon-v1", "kserve"])
def test_the_builder_the_runtime_needs_is_printed(model_dir, model_yaml, build_arg, target):
    (model_dir / "model.yaml").write_text(model_yaml)
    done = k8s_process(model_dir, "--gpu", "1", "--target", target)
    assert done.returncode == 0, done.stderr
    (note,) = [line for line in done.stderr.splitlines() if line.startswith("seldon-caffe: note: ")]
    assert build_arg in note and "s2i build" in note


def test_the_default_builder_prints_nothing(model_dir):
    (model_dir / "model.yaml").write_text("name: lenet\nformat: caffe\n")
    done = k8s_process(model_dir)
    assert done.returncode == 0 and done.stderr == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cpu", "500m:250m"], "--cpu 500m:250m: the request must be <= the limit"),
        (["--memory", "1Gi:1000Mi"], "--memory 1Gi:1000Mi: the request must be <= the limit"),
        (["--model-uri", "./model"], "--model-uri ./model: expected a storage URI"),
        (["--model-uri", "/srv/models/lenet"], "expected a storage URI"),
        (["--model-uri", "lenet"], "expected a storage URI"),
        (["--model-uri", "file:///srv/models/lenet"], "expected a storage URI"),
        (["--model-uri", "C:\\models"], "expected a storage URI"),
        (["--runtime", "tensorflow"], "--runtime tensorflow cannot serve format caffe"),
        # what a target cannot honour: one line, before any advice
        (["--target", "seldon-v2"], "--target seldon-v2 needs --model-uri: Seldon Core v2's agent always fetches"),
        (["--target", "seldon-v2", "--model-uri", "s3://b/l", "--hpa", "1:3:50"], "--hpa: not for --target seldon-v2"),
        (["--target", "seldon-v2", "--model-uri", "pvc://models/lenet"], "rclone, which cannot read a"),
        (["--target", "seldon-v2", "--model-uri", "s3://b/l", "--workers", "2"], "--workers: not for --target"),
        (
            ["--target", "kserve", "--workers", "3", "--grpc-workers", "2"],
            "--workers, --grpc-workers: not for --target",
        ),
        (["--target", "kserve", "--model-uri", "s3://b/l", "--storage-secret", "s"], "the predictor's ServiceAccount"),
        (["--target", "kserve", "--model-uri", "minio:models/lenet"], "not rclone's REMOTE:PATH"),
    ],
)
def test_settings_the_cluster_would_refuse_are_errors_before_anything_is_written(model_dir, tmp_path, args, message):
    out = tmp_path / "sdep.yaml"
    done = k8s_process(model_dir, "-o", str(out), *args)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()  # one line, no warnings first: the checks come before anything else
    assert line.startswith("seldon-caffe: error: ") and message in line
    assert not out.exists()


def test_help_says_how_each_target_maps_the_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["k8s", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--target {kserve,seldon-v1,seldon-v2}" in text
    assert "how options map, as seldon-v1 / seldon-v2 / kserve:" in text
    assert "--workers, --grpc-workers: seldon-v1 only, an error elsewhere" in text
    assert "--hpa: hpaSpec / error on seldon-v2" in text


@pytest.mark.parametrize("cpu", ["1:1000m", "250m:0.5", "2:2"])
def test_a_request_up_to_its_limit_is_fine(schemas, model_dir, capsys, cpu):
    limits = model_container(check(schemas, run_k8s(capsys, model_dir, "--cpu", cpu)))["resources"]
    assert limits["requests"]["cpu"] == cpu.split(":")[0]


@pytest.mark.parametrize("uri", ["https://models.example.com/lenet.tar.gz", "s3://bucket/lenet", "minio:models/lenet"])
def test_storage_uris_are_accepted(schemas, model_dir, capsys, uri):
    manifest = check(schemas, run_k8s(capsys, model_dir, "--model-uri", uri))
    pod = manifest["spec"]["predictors"][0]["componentSpecs"][0]["spec"]
    assert pod["initContainers"][0]["args"] == [uri, "/mnt/models"]


def test_model_uri_adds_a_storage_initializer_and_model_dir(schemas, model_dir, capsys):
    manifest = check(schemas, run_k8s(capsys, model_dir, *VARIANTS["model-uri"]))
    predictor = manifest["spec"]["predictors"][0]
    pod = predictor["componentSpecs"][0]["spec"]
    (initializer,) = pod["initContainers"]
    assert initializer["name"] == "lenet-v2-model-initializer"  # the operator's own name for it
    assert initializer["args"] == ["s3:models/lenet", "/mnt/models"]
    assert initializer["envFrom"] == [{"secretRef": {"name": "rclone-s3"}}]
    assert model_container(manifest)["volumeMounts"] == [
        {"name": "lenet-v2-provision-location", "mountPath": "/mnt/models", "readOnly": True}
    ]
    assert pod["volumes"] == [{"name": "lenet-v2-provision-location", "emptyDir": {}}]
    assert predictor["graph"]["parameters"] == [{"name": "model_dir", "type": "STRING", "value": "/mnt/models"}]


def test_model_uri_on_a_pvc_mounts_the_claim(schemas, model_dir, capsys):
    manifest = check(schemas, run_k8s(capsys, model_dir, *VARIANTS["model-uri-pvc"]))
    predictor = manifest["spec"]["predictors"][0]
    pod = predictor["componentSpecs"][0]["spec"]
    assert "initContainers" not in pod
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert predictor["graph"]["parameters"][0]["value"] == "/mnt/pvc/zoo/lenet"


def test_init_writes_a_manifest_that_validates(schemas, tmp_path):
    plan = scaffold.init_model_dir(tmp_path / "My Model")
    manifest = check(schemas, yaml.safe_load((plan.target / "deploy/seldondeployment.yaml").read_text()))
    assert manifest["metadata"]["name"] == "my-model"
    assert model_container(manifest)["image"] == "my-model:0.1.0"


def test_output_file_is_never_replaced_without_force(model_dir, tmp_path, capsys):
    out = tmp_path / "deploy" / "sdep.yaml"
    base = ["k8s", str(model_dir), "--image", IMAGE, "-o", str(out)]
    assert cli.main(base) == 1 and not out.parent.exists()  # a missing folder is an error, not made
    assert "the folder" in capsys.readouterr().err
    out.parent.mkdir()
    assert cli.main(base) == 0 and "replicas: 1" in out.read_text()
    assert cli.main([*base, "--replicas", "2"]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert "replicas: 1" in out.read_text()
    assert cli.main([*base, "--replicas", "2", "--force"]) == 0
    assert "replicas: 2" in out.read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hpa", "3:2:50"], "MIN <= MAX"),
        (["--hpa", "2:10"], "MIN:MAX:CPU%"),
        (["--hpa", "1:2:150"], "1..100"),
        (["--replicas", "2", "--hpa", "1:2:50"], "not allowed with"),
        (["--cpu", "lots"], "not a Kubernetes quantity"),
        (["--gpu", "0"], "positive integer"),
        (["--target", "seldon-v3"], "invalid choice: 'seldon-v3'"),
    ],
)
def test_bad_options_are_refused_with_a_reason(model_dir, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["k8s", str(model_dir), "--image", IMAGE, *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_storage_secret_needs_a_model_uri(model_dir, capsys):
    assert cli.main(["k8s", str(model_dir), "--image", IMAGE, "--storage-secret", "s"]) == 1
    assert "--storage-secret only makes sense with --model-uri" in capsys.readouterr().err


def test_the_strict_schema_catches_typos_and_wrong_types(schemas, model_dir, capsys):
    """The validation above is not vacuous: the mistakes a hand edit makes are caught, in every kind."""
    manifest = run_k8s(capsys, model_dir, "--hpa", "1:3:50")
    typo = copy.deepcopy(manifest)
    typo["spec"]["predictors"][0]["componentSpecs"][0]["hpaSpec"]["metricsV2"] = []
    wrong_type = copy.deepcopy(manifest)
    model_container(wrong_type)["livenessProbe"]["periodSeconds"] = "10"
    bad_quantity = copy.deepcopy(manifest)
    model_container(bad_quantity)["resources"]["limits"]["memory"] = "2 GB"
    server, model = run_target(capsys, model_dir, "seldon-v2", "--model-uri", "s3://b/l")
    runtime, service = run_target(capsys, model_dir, "kserve", "--model-uri", "s3://b/l")
    broken = [typo, wrong_type, bad_quantity]
    for document, path, key, value in [
        (server, ["spec", "podSpec", "containers", 0], "imagePolicy", "Always"),
        (server, ["spec"], "replicas", "2"),
        (model, ["spec"], "storageURI", "s3://b/l"),
        (model, ["spec"], "memory", "1 GB"),
        (runtime, ["spec", "containers", 0], "environment", []),
        (runtime, ["spec", "supportedModelFormats", 0], "priority", 0),
        (service, ["spec", "predictor", "model"], "protocolversion", "v2"),
        (service, ["spec", "predictor"], "scaleMetric", "gpu"),
    ]:
        copied = copy.deepcopy(document)
        node = copied
        for step in path:
            node = node[step]
        node[key] = value
        broken.append(copied)
    for document in broken:
        validator = schemas[(document["apiVersion"], document["kind"])]
        assert list(validator.iter_errors(document)), document


@pytest.mark.parametrize(
    "text, name", [("LeNet_v2", "lenet-v2"), ("my model", "my-model"), ("3d-unet", "m-3d-unet"), ("a" * 80, "a" * 63)]
)
def test_names_become_dns_labels(text, name):
    assert k8s.dns_name(text) == name and DNS_LABEL.match(name)


def test_long_names_keep_their_suffixes(schemas, model_dir, capsys):
    documents = run_target(capsys, model_dir, "kserve", "--name", "m" * 70)
    runtime, service = check_all(schemas, documents)
    assert runtime["metadata"]["name"] == "m" * 55 + "-runtime" and service["metadata"]["name"] == "m" * 63


@pytest.mark.parametrize("target", sorted(TARGET_ARGS))
def test_namespace_is_checked_not_rewritten(schemas, model_dir, capsys, target):
    documents = check_all(
        schemas, run_target(capsys, model_dir, target, "--namespace", "ml-serving", *TARGET_ARGS[target])
    )
    assert {document["metadata"]["namespace"] for document in documents} == {"ml-serving"}
    bad = ["k8s", str(model_dir), "--image", IMAGE, "--target", target, "--namespace", "ML_Serving"]
    assert cli.main([*bad, *TARGET_ARGS[target]]) == 1
    assert "namespace 'ML_Serving' is not a Kubernetes name" in capsys.readouterr().err
