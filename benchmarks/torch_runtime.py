"""The torch runtime against raw torch: torchvision GoogLeNet and ResNet-50, random weights.

    nice python benchmarks/torch_runtime.py             # CPU: fp32, batch 1 and 8; ~5 min on 2 busy cores
    python benchmarks/torch_runtime.py --device cuda    # GPU: fp32 and fp16, batch 1 and 64,
                                                        # channels_last and CUDA graphs for raw and ours

Each model is saved as TorchScript (traced; `--format exported` saves an ExportedProgram
instead) and served through `SeldonCaffeModel.predict`: the hooks and the runtime, what a
request pays once Seldon has decoded it. "Raw" is the torchvision module itself, run the way
a careful user would: the same precision, channels_last and CUDA graphs as ours, cuDNN's
autotuner on. On a GPU raw is timed twice: on device (the input already there, the output left
there: how the issue's anchor was measured) and numpy in / numpy out (the same job as ours:
host to device, the model, device to host). On CPU the two are the same thing, and only the
second is run.

Calls are interleaved (raw, ours, raw, ours...) so that load from other jobs on a shared
machine falls on both alike; img/s is batch / median seconds per call, after warm-up calls
(which also capture the CUDA graphs). `max rel diff` compares ours with raw numpy's answer,
relative to its largest value. Results replace this device's "torch runtime" section of
docs/benchmarks.md (`torch-runtime:cpu` or `torch-runtime:cuda` markers), nothing else.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO))
import torch  # noqa: E402
import torchvision  # noqa: E402
import yaml  # noqa: E402
from _report import cpu_model, wait_for_quiet, write_section  # noqa: E402

from seldon_caffe.faithfulness import relative_error  # noqa: E402
from seldon_caffe.model import SeldonCaffeModel  # noqa: E402

MODELS = {
    "googlenet": lambda: torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True),
    "resnet50": lambda: torchvision.models.resnet50(weights=None),
}
SHAPE = (3, 224, 224)
# The anchor: raw torch, channels_last, CUDA graphs, fp16, batch 64, on an H200.
ANCHOR = {"googlenet": 19807, "resnet50": 15225}
GOAL = 0.9  # ours at >= 90% of raw at the largest batch


def markers(device: str) -> tuple[str, str]:
    return f"<!-- torch-runtime:{device}:start -->", f"<!-- torch-runtime:{device}:end -->"


# -- the two contenders -------------------------------------------------------------------


def save_model(net: torch.nn.Module, path: Path, fmt: str) -> None:
    """What a user hands the runtime: TorchScript (traced) or an ExportedProgram with any batch."""
    example = torch.zeros(2, *SHAPE)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit.* says it is deprecated
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(net, example), str(path))
        else:
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.export.save(torch.export.export(net, (example,), dynamic_shapes={"x": {0: batch}}), str(path))


def ours(model_file: Path, work: Path, options: dict[str, Any]) -> SeldonCaffeModel:
    """Our runtime behind the default hooks, through the Seldon user-model object."""
    model_dir = work / f"{model_file.stem}-{options['precision']}"
    model_dir.mkdir(exist_ok=True)
    config = {
        "name": model_dir.name,
        "format": "torch",
        "files": {"torchscript": str(model_file)},
        "runtime": "torch",
        "options": options,
        "inputs": [{"name": "image", "dtype": "float32", "shape": [-1, *SHAPE]}],
    }
    (model_dir / "model.yaml").write_text(yaml.safe_dump(config))
    served = SeldonCaffeModel(str(model_dir))
    served.load()
    return served


class Raw:
    """The torchvision module run directly: eager, or replaying a CUDA graph captured for one batch."""

    def __init__(self, net: torch.nn.Module, device: torch.device, precision: str, channels_last: bool, graphs: bool):
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = copy.deepcopy(net).to(device, self.dtype).to(memory_format=self.format).eval()
        self.device, self.graphs = device, graphs
        self.static: torch.Tensor | None = None
        self.out: torch.Tensor | None = None
        self.graph: Any = None

    def prepare(self, x: np.ndarray) -> None:
        """The on-device input for this batch; with graphs, warm up on a side stream and capture."""
        with torch.inference_mode():
            self.static = self._to_device(x)
            if not self.graphs:
                return
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.net(self.static)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.net(self.static)

    def on_device(self) -> None:
        """The model alone: input already on the device, output left there."""
        with torch.inference_mode():
            if self.graph is not None:
                self.graph.replay()
            else:
                self.out = self.net(self.static)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def numpy(self, x: np.ndarray) -> np.ndarray:
        """numpy in, numpy out: the same job as our runtime."""
        with torch.inference_mode():
            if self.graph is not None:
                self.static.copy_(torch.from_numpy(x))
                self.graph.replay()
                return self.out.float().cpu().numpy()
            return self.net(self._to_device(x)).float().cpu().numpy()

    def _to_device(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(self.device).to(self.dtype).contiguous(memory_format=self.format)


# -- timing ---------------------------------------------------------------------------


def interleaved(runners: dict[str, Callable[[], Any]], warmup: int, repeats: int, sync: bool) -> dict[str, float]:
    """Median seconds per call of each runner, timed in turns: wall time, and `NAME_cpu`, the
    CPU time of all the process's threads, which other jobs on a shared machine disturb far
    less (a thread waiting for a core costs wall time, not CPU time)."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {key: [] for name in runners for key in (name, f"{name}_cpu")}
    for _ in range(repeats):
        for name, run in runners.items():
            if sync:
                torch.cuda.synchronize()
            start, cpu = time.perf_counter(), time.process_time()
            run()
            if sync:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            times[f"{name}_cpu"].append(time.process_time() - cpu)
    return {key: statistics.median(t) for key, t in times.items()}


def measure(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads)
    if cuda:
        torch.cuda.set_device(device.index or 0)
        torch.backends.cudnn.benchmark = True  # ours turns it on too (options.cudnn_benchmark)
    rng = np.random.default_rng(0)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        net = MODELS[name]().eval()
        model_file = work / f"{name}.{'pt' if args.format == 'torchscript' else 'pt2'}"
        save_model(net, model_file, args.format)
        for precision in args.precision:
            options = {"device": args.device, "precision": precision, "threads": args.threads}
            if cuda:
                options.update(channels_last=args.channels_last, cuda_graphs=args.cuda_graphs)
            served = ours(model_file, work, options)
            raw = Raw(net, device, precision, args.channels_last, args.cuda_graphs and cuda)
            for batch in args.batch:
                x = rng.standard_normal((batch, *SHAPE), dtype=np.float32)
                raw.prepare(x)
                runners = {"raw_numpy": partial(raw.numpy, x), "ours": partial(served.predict, x)}
                if cuda:
                    runners = {"raw_device": raw.on_device, **runners}
                seconds = interleaved(runners, args.warmup, args.repeats, cuda)
                want, got = raw.numpy(x), served.predict(x)
                diff = relative_error(got, want)
                row = {"model": name, "precision": precision, "batch": batch, "diff": diff}
                row.update({k: batch / s for k, s in seconds.items() if not k.endswith("_cpu")})
                row.update({f"{k}_ms": 1000 * s for k, s in seconds.items() if k.endswith("_cpu")})
                print(row, flush=True)
                rows.append(row)
            served.model.close()
    return rows


# -- the report -----------------------------------------------------------------------


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, host {cpu_model()}"
    return cpu_model()


def report(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, seconds: float, load: tuple) -> str:
    cuda = args.device.startswith("cuda")
    settings = f"threads={args.threads}"
    if cuda:
        settings += f", channels_last={args.channels_last}, cuda_graphs={args.cuda_graphs}, cudnn.benchmark on"
    lines = [
        f"## torch runtime vs raw torch ({'GPU' if cuda else 'CPU'})",
        "",
        f"Measured {datetime.date.today().isoformat()} on {device_name(args.device)}; Python "
        f"{platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}. "
        f"The run took {seconds / 60:.1f} min; 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} "
        "at the end" + ("" if cuda else " (the machine is shared: read the ratios more than the absolutes)") + ".",
        "",
        f"    {command}",
        "",
        f"torchvision architectures with random weights, 224x224, saved as {args.format}; ours is "
        f"`SeldonCaffeModel.predict` (default hooks, the `torch` runtime; {settings}), raw is the torchvision "
        f"module with the same settings. Median of {args.repeats} interleaved calls after {args.warmup} warm-up "
        "calls; img/s = batch / median seconds.",
        "",
    ]
    if cuda:
        lines += [
            "| model | precision | batch | raw on device (img/s) | raw numpy in/out (img/s) | ours (img/s) "
            "| ours / raw on device | ours / raw numpy | max rel diff |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['model']} | {r['precision']} | {r['batch']} | {r['raw_device']:,.0f} | {r['raw_numpy']:,.0f} "
                f"| {r['ours']:,.0f} | {r['ours'] / r['raw_device']:.2f} | {r['ours'] / r['raw_numpy']:.2f} "
                f"| {r['diff']:.1e} |"
            )
    else:
        lines += [
            "`CPU ms` is the CPU time of all the process's threads per call (median), which load from other jobs "
            "disturbs far less than wall time: on a shared machine its ratio is the one to read.",
            "",
            "| model | precision | batch | raw torch (img/s) | ours (img/s) | ours / raw | raw CPU ms | ours CPU ms "
            "| CPU ratio raw / ours | max rel diff |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['model']} | {r['precision']} | {r['batch']} | {r['raw_numpy']:.1f} | {r['ours']:.1f} "
                f"| {r['ours'] / r['raw_numpy']:.2f} | {r['raw_numpy_cpu_ms']:.0f} | {r['ours_cpu_ms']:.0f} "
                f"| {r['raw_numpy_cpu_ms'] / r['ours_cpu_ms']:.2f} | {r['diff']:.1e} |"
            )
    lines += ["", *findings(rows, cuda), ""]
    return "\n".join(lines)


def findings(rows: list[dict[str, Any]], cuda: bool) -> list[str]:
    top = max(r["batch"] for r in rows)
    base = "raw_device" if cuda else "raw_numpy"
    out = []
    for r in (r for r in rows if r["batch"] == top):
        ratio = r["ours"] / r[base]
        verdict = "meets" if ratio >= GOAL else "misses"
        cpu = "" if cuda else f"; by CPU time per call, {r['raw_numpy_cpu_ms'] / r['ours_cpu_ms']:.0%}"
        out.append(
            f"- {r['model']} {r['precision']} batch {top}: ours at {ratio:.0%} of raw"
            f"{' on device' if cuda else ''} ({verdict} the {GOAL:.0%} goal){cpu}."
        )
    if cuda:
        out.append(
            "- Anchor (H200, raw torch, channels_last, CUDA graphs, fp16, batch 64): "
            + ", ".join(f"{m} {v:,} img/s" for m, v in ANCHOR.items())
            + "."
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--precision", nargs="+", choices=("fp32", "fp16", "bf16"), help="default cpu: fp32; cuda: fp32 fp16"
    )
    parser.add_argument("--batch", nargs="+", type=int, help="default cpu: 1 8; cuda: 1 64")
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--format", choices=("torchscript", "exported"), default="torchscript")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="default: on for cuda")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, help="default: on for cuda")
    parser.add_argument("--repeats", type=int, help="timed calls per runner and case (default cpu 7, cuda 50)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default cpu 2, cuda 10)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, raw and ours")
    parser.add_argument("--wait-quiet", type=float, default=120, help="cpu: seconds to wait for a load average < 1")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch.cuda.is_available() is false here")
    args.precision = args.precision or (["fp32", "fp16"] if cuda else ["fp32"])
    if not cuda and "fp16" in args.precision:
        parser.error("fp16 runs on cuda only (the runtime refuses it on cpu); use fp32 or bf16")
    args.batch = args.batch or ([1, 64] if cuda else [1, 8])
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    args.cuda_graphs = cuda if args.cuda_graphs is None else args.cuda_graphs
    if args.cuda_graphs and not cuda:
        parser.error("--cuda-graphs needs --device cuda")
    args.repeats = args.repeats or (50 if cuda else 7)
    args.warmup = args.warmup or (10 if cuda else 2)

    if not cuda:
        wait_for_quiet(args.wait_quiet, 1.0)
    began, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-torch-") as work:
        rows = measure(args, Path(work))
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/torch_runtime.py", *(argv or sys.argv[1:])])
    command = ("" if cuda else "nice ") + command
    section = report(rows, args, command, time.perf_counter() - began, (load_before, os.getloadavg()[0]))
    print(section)
    if not args.no_write:
        write_section(section, args.out, markers("cuda" if cuda else "cpu"))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
