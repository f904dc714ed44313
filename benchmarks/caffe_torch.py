"""Caffe nets on a GPU through the torch runtime, against torchvision's own architectures.

    python benchmarks/caffe_torch.py prepare          # here, with real Caffe (make caffe-env): ~3 min
    python benchmarks/caffe_torch.py measure          # where the GPU is: ~4 min on an H200

GoogLeNet, ResNet-50 and MobileNet v2 from the Caffe zoo's prototxts are served from their
Caffe files (`format: caffe`, `runtime: torch`: converted on load) through
`SeldonCaffeModel.predict`, with channels_last and CUDA graphs, at fp32 (TF32 off), fp16 and
TF32, batch 1 and 64. "Raw" is torchvision's architecture of the same net (random weights)
run by torch directly with the same settings, timed on device (input already there, output
left there) and numpy in / numpy out (the same job as ours); calls interleave.

Faithfulness: `prepare` makes random weights with real Caffe (the conformance suite's fill:
every layer's output at unit spread), rounds each large blob to 256 levels so the weights
travel in a quarter of their bytes (a GPU machine may not reach this one), writes the
caffemodel with our writer and runs real Caffe on it at batch 64; the inputs are seeded
(numpy's RandomState stream is stable across numpy versions) and hashed. `measure` rebuilds
the identical caffemodel and inputs (it checks the hashes) and reports ours against real
Caffe's outputs: max relative error (fp32), top-1 agreement (fp16, TF32).

The result replaces the `caffe-torch:cuda` section of docs/benchmarks.md (`--out` elsewhere).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import zlib
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO))
sys.path.insert(1, str(REPO / "benchmarks"))
from seldon_caffe.caffe import load_caffe_net  # noqa: E402
from seldon_caffe.caffe.net import WeightsError  # noqa: E402
from seldon_caffe.faithfulness import relative_error  # noqa: E402

ZOO = Path(os.environ.get("SELDON_CAFFE_ZOO", REPO.parent / "shared" / "caffe-zoo"))
NETS = {"bvlc_googlenet": "googlenet", "resnet50": "resnet50", "mobilenet_v2": "mobilenet_v2"}
BATCH = 64
SEED = 64
LEVELS_FROM = 4096  # blobs with at least this many values travel as 256 levels
PRECISIONS = {"fp32": {}, "tf32": {"tf32": True}, "fp16": {"precision": "fp16"}}
GOAL, FP16_GOAL = 0.9, 15000  # ours >= 90% of raw at batch 64; GoogLeNet fp16 >= 15,000 img/s (H200)
MARKERS = ("<!-- caffe-torch:cuda:start -->", "<!-- caffe-torch:cuda:end -->")


def inputs(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.RandomState(SEED).standard_normal((BATCH, *shape[1:])).astype(np.float32)


def digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# -- prepare (with real Caffe) --------------------------------------------------------------


def prepare(out: Path) -> None:
    from caffe_oracle import reference

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="caffe-torch-"))
    try:
        for name in NETS:
            prototxt = ZOO / f"{name}.prototxt"
            shutil.copy(prototxt, out / prototxt.name)
            fill = work / f"{name}.fill.caffemodel"
            reference.run_jobs([reference.weights_job(prototxt, fill, seed=zlib.crc32(name.encode()))], timeout=1800)
            net = load_caffe_net(prototxt, fill)
            packed = {}
            for layer in _weighted(net):
                blobs, rounded = net.get_weights(layer), []
                for k, blob in enumerate(blobs):
                    key = f"{layer}|{k}"
                    if blob.size >= LEVELS_FROM:
                        step = np.float32(np.abs(blob).max() / 127) or np.float32(1)
                        levels = np.round(blob / step).astype(np.int8)
                        packed[f"q:{key}"], packed[f"s:{key}"] = levels, np.asarray(step)
                        blob = levels.astype(np.float32) * step
                    else:
                        packed[f"f:{key}"] = blob.astype(np.float32)
                    rounded.append(blob.astype(np.float32))
                net.set_weights(layer, rounded)
            weights = work / f"{name}.caffemodel"
            weights.write_bytes(net.caffemodel_bytes())
            (data,) = net.input_shapes
            x = inputs(net.input_shapes[data])
            (result,) = reference.run_jobs([reference.forward_job(prototxt, weights, {data: x})], timeout=1800)
            meta = {"input": data, "inputs_sha256": digest([x]), "weights_sha256": digest(_all_blobs(net))}
            packed.update({f"out:{k}": v for k, v in result["outputs"].items()})
            np.savez_compressed(out / f"{name}.npz", meta=np.asarray(json.dumps(meta)), **packed)
            print(f"{name}: {sum(a.nbytes for a in packed.values()) / 2**20:.1f} MiB packed", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _weighted(net: Any) -> list[str]:
    """The layers that hold weights, in the net's order."""
    names = []
    for layer in net.layers:
        try:
            net.weight_shapes(layer.name)
        except WeightsError:
            continue
        names.append(layer.name)
    return names


def _all_blobs(net: Any) -> list[np.ndarray]:
    return [blob for layer in _weighted(net) for blob in net.get_weights(layer)]


def unpack(source: Path, name: str, target: Path) -> tuple[Path, np.ndarray, dict[str, np.ndarray]]:
    """The caffemodel, inputs and real Caffe's outputs `prepare` packed, checked by hash."""
    packed = np.load(source / f"{name}.npz")
    meta = json.loads(str(packed["meta"]))
    net = load_caffe_net(source / f"{name}.prototxt")
    layers: dict[str, dict[int, np.ndarray]] = {}
    for key in packed.files:
        kind, _, rest = key.partition(":")
        if kind in ("q", "f"):
            layer, index = rest.rsplit("|", 1)
            value = packed[key] if kind == "f" else packed[key].astype(np.float32) * packed[f"s:{rest}"]
            layers.setdefault(layer, {})[int(index)] = value.astype(np.float32)
    for layer, blobs in layers.items():
        net.set_weights(layer, [blobs[k] for k in sorted(blobs)])
    weights = target / f"{name}.caffemodel"
    weights.write_bytes(net.caffemodel_bytes())
    x = inputs(net.input_shapes[meta["input"]])
    if digest([x]) != meta["inputs_sha256"] or digest(_all_blobs(net)) != meta["weights_sha256"]:
        raise SystemExit(f"{name}: the rebuilt weights or inputs differ from prepare's (numpy's RandomState?)")
    expected = {key[4:]: packed[key] for key in packed.files if key.startswith("out:")}
    return weights, x, expected


# -- measure (on the GPU) -------------------------------------------------------------------


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch
    import torchvision
    from torch_runtime import Raw, interleaved

    from seldon_caffe.model import SeldonCaffeModel

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device.index or 0)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="caffe-torch-"))
    for name, arch in NETS.items():
        weights, x, expected = unpack(args.data, name, work)
        (prob,) = expected
        cache = None
        torch.manual_seed(0)
        reference = getattr(torchvision.models, arch)(
            weights=None, **({"aux_logits": False, "init_weights": True} if arch == "googlenet" else {})
        ).eval()
        for precision in args.precision:
            options = {"device": args.device, "channels_last": cuda, "cuda_graphs": cuda, **PRECISIONS[precision]}
            model_dir = work / f"{name}-{precision}"
            model_dir.mkdir()
            if cache is not None:  # the conversion cache of the first precision: converted once per net
                shutil.copytree(cache, model_dir / ".cache")
            config = {
                "name": name,
                "format": "caffe",
                "files": {"prototxt": str(args.data / f"{name}.prototxt"), "weights": str(weights)},
                "runtime": "torch",
                "options": options,
            }
            (model_dir / "model.yaml").write_text(yaml.safe_dump(config))
            started = time.perf_counter()
            served = SeldonCaffeModel(str(model_dir))
            served.load()
            load_s = time.perf_counter() - started
            cache = cache or model_dir / ".cache"
            reduced = "fp16" if precision == "fp16" else "fp32"
            raw = Raw(reference, device, reduced, cuda, cuda)
            graph = Raw(served.model.native, device, reduced, cuda, cuda)  # our torch graph of the Caffe net, alone
            for batch in args.batch:
                xb = np.ascontiguousarray(x[:batch])
                raw.prepare(xb)
                graph.prepare(xb)
                runners = {
                    "raw_device": raw.on_device,
                    "graph_device": graph.on_device,
                    "raw_numpy": partial(raw.numpy, xb),
                    "ours": partial(served.predict, xb),
                }
                seconds = interleaved(runners, args.warmup, args.repeats, cuda)
                got = served.predict(xb)
                want = expected[prob][:batch]
                row = {
                    "net": name,
                    "precision": precision,
                    "batch": batch,
                    "load_s": load_s,
                    "rel_err": relative_error(got, want),
                    "top1": float(np.mean(got.reshape(batch, -1).argmax(1) == want.reshape(batch, -1).argmax(1))),
                }
                row.update({k: batch / s for k, s in seconds.items() if not k.endswith("_cpu")})
                print(json.dumps(row), flush=True)
                rows.append(row)
            served.model.close()
            del raw, graph
            if cuda:
                torch.cuda.empty_cache()
    shutil.rmtree(work, ignore_errors=True)
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> str:
    import torch
    import torchvision
    from _report import cpu_model

    if args.device == "cpu":
        where = f"{cpu_model()} (a try-out of the script: no CUDA graphs, no channels_last)"
    else:
        props = torch.cuda.get_device_properties(torch.device(args.device))
        where = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, host {cpu_model()}"
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/caffe_torch.py", *sys.argv[1:]])
    lines = [
        "## Caffe nets on a GPU: the torch runtime vs torchvision",
        "",
        f"Measured {datetime.date.today().isoformat()} on {where}; Python {platform.python_version()}, torch "
        f"{torch.__version__}, torchvision {torchvision.__version__}; {seconds / 60:.1f} min.",
        "",
        f"    {command}",
        "",
        "Ours: the Caffe zoo prototxt and a caffemodel (`format: caffe`, `runtime: torch`, converted on load) "
        "through `SeldonCaffeModel.predict`, numpy in and out, with channels_last and CUDA graphs. Caffe graph: "
        "the torch module the runtime built from those files, timed on device like raw. Raw: "
        "torchvision's architecture of the same net (random weights), same precision, channels_last and CUDA "
        "graphs, timed on device (input already there, output left there) and numpy in / numpy out (the same "
        f"job as ours). Median of {args.repeats} interleaved calls after {args.warmup} warm-up calls; img/s = "
        "batch / median seconds. fp32 is strict fp32 (TF32 off, the runtime's default); tf32 is "
        "`options.tf32: true`. Error and top-1 are against real Caffe (CPU) on the same weights and inputs "
        "(batch 64's first rows at batch 1). `load` is the first load: Caffe -> ONNX -> torch, then warm-up.",
        "",
        "| net | precision | batch | raw on device | Caffe graph on device | raw numpy in/out | ours "
        "| graph / raw on device | ours / raw numpy | max rel err vs Caffe | top-1 = Caffe | load s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['net']} | {r['precision']} | {r['batch']} | {r['raw_device']:,.0f} | {r['graph_device']:,.0f} "
            f"| {r['raw_numpy']:,.0f} | {r['ours']:,.0f} | {r['graph_device'] / r['raw_device']:.2f} "
            f"| {r['ours'] / r['raw_numpy']:.2f} | {r['rel_err']:.1e} | {r['top1']:.0%} | {r['load_s']:.1f} |"
        )
    lines += ["", *findings(rows), ""]
    return "\n".join(lines)


def findings(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if r["batch"] != BATCH:
            continue
        graph, numpy_ratio = r["graph_device"] / r["raw_device"], r["ours"] / r["raw_numpy"]
        verdict = "meets" if numpy_ratio >= GOAL else "misses"
        out.append(
            f"- {r['net']} {r['precision']} batch {BATCH}: ours {r['ours']:,.0f} img/s, {numpy_ratio:.0%} of raw "
            f"numpy in/out ({verdict} the {GOAL:.0%} goal); on device our graph runs at {graph:.0%} of torchvision's."
        )
    fp16 = next(
        (r for r in rows if r["net"] == "bvlc_googlenet" and r["precision"] == "fp16" and r["batch"] == BATCH), None
    )
    if fp16:
        verdict = "meets" if fp16["ours"] >= FP16_GOAL else "misses"
        out.append(
            f"- GoogLeNet fp16 batch {BATCH}: {fp16['ours']:,.0f} img/s ({verdict} the {FP16_GOAL:,} img/s goal)."
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("prepare", "measure"))
    parser.add_argument("--data", type=Path, default=REPO / ".gpu", help="where prepare writes and measure reads")
    parser.add_argument("--precision", nargs="+", choices=tuple(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, BATCH])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cuda", help="cuda (or cpu, to try the script: no graphs, fp32)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.data)
        return
    from _report import write_section

    began = time.perf_counter()
    rows = measure(args)
    section = report(rows, args, time.perf_counter() - began)
    print(section)
    write_section(section, args.out, MARKERS)


if __name__ == "__main__":
    main()
