"""`runtime: auto` for a Caffe net: the fastest engine here that answers like the others.

Which engine is fastest depends on the net and on the CPU (OpenVINO wins GoogLeNet by 2x
on one machine, ONNX Runtime wins SqueezeNet on another), so it is measured, not assumed:

1. Candidates: the installed engines among CANDIDATES with no known gap for the net's
   layers (runtimes/gaps.py), and only those with get/set_weights when hooks.py calls them
   (the "change weights from a request parameter, then run" hooks). pycaffe is not one: where it is importable (or
   `pycaffe_command` is set), `auto` means pycaffe, as before (resolve_runtime).
2. Each candidate loads the net at `options.precision` (an engine that cannot run that
   precision drops out, so auto never serves a lower precision than asked) and answers
   one random input at the batch size the service will run: batching.max_batch_size when
   batching is on, else 1 (timing_batch).
3. At fp32, a candidate whose answer differs from the most trusted candidate's (first in
   CANDIDATES: our ONNX conversion is proven equal to real Caffe) by more than 1e-4
   relative drops out: a gap the table does not know yet must not be served silently.
4. The rest are timed in interleaved rounds of blocks: per round, each engine runs calls
   back to back for a short block, as under load (a single call after a pause misjudges
   some engines: OpenVINO's threads are slow to wake). Interleaving makes a noisy neighbour
   slow every engine alike. An engine's time is its fastest block's median (a neighbour
   only ever adds time); one over CLEAR_LOSS times the leader's stops being timed. The
   fastest is served, the others are closed.

The choice is cached as JSON beside the ONNX conversion (MODEL_DIR/.cache/auto, else the
user's cache), keyed by the prototxt, the caffemodel's size and modification time, the
options, the batch size, the engines' versions, the CPU model, flags and cores and the
thread-count variables, so a second start loads only the winner and a service moved to
another CPU measures again. `seldon-caffe inspect` shows the choice and timings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .. import cpu
from ..caffe.converter_version import CONVERTER_VERSION
from ..config import ModelConfig
from ..errors import ModelLoadError, SeldonCaffeError, first_line
from ..faithfulness import worst_relative_error
from ..paths import cache_dir
from ..threads import THREAD_VARIABLES
from ._onnx_source import CACHE_SUBDIR
from .base import Runtime

log = logging.getLogger(__name__)

# Most trusted first: the reference answer at fp32 comes from the first that loads.
CANDIDATES = ("onnxruntime", "openvino", "opencv")
# When nothing is measured yet (inspect before the first start): the usual winner first.
LIKELY_ORDER = ("openvino", "onnxruntime", "opencv")
_ENGINE = {  # runtime -> (module to find, distributions that may provide it)
    "onnxruntime": ("onnxruntime", ("onnxruntime", "onnxruntime-gpu")),
    "openvino": ("openvino", ("openvino",)),
    "opencv": ("cv2", ("opencv-python-headless", "opencv-python", "opencv-contrib-python")),
}
# The precisions each engine runs (the others refuse, or in OpenCV's case ignore, the option).
_PRECISIONS = {
    "onnxruntime": ("fp32", "fp16", "int8"),
    "openvino": ("fp32", "fp16", "bf16", "int8"),
    "opencv": ("fp32",),
}
# The engines whose get_weights / set_weights work (a hook may change weights per request).
_WEIGHT_ACCESS = ("opencv",)
_USES_WEIGHTS = re.compile(r"\b[gs]et_weights\b")
TOLERANCE = 1e-4  # max |a - b| / max |reference|, the conformance tests' measure
WARMUP_RUNS = 2  # after the answer compared in _drop_unfaithful, itself a first run
MAX_ROUNDS, MIN_ROUNDS = 4, 2
TIMING_BUDGET_S = 3.0  # shared by the blocks; rounds are cut to fit, down to MIN_ROUNDS, for big nets
CLEAR_LOSS = 1.5  # an engine this many times slower than the leader after a round is out
CHOICE_VERSION = 2  # bump when the way of choosing changes: old choices are measured again

Loader = Callable[[ModelConfig, str], Runtime]


@dataclasses.dataclass
class Choice:
    """What `auto` chose for a net on this machine, and why."""

    runtime: str
    batch: int
    timings_ms: dict[str, float]  # one run's time (_time), per engine that was timed
    excluded: dict[str, str]  # engine -> why it was not a candidate
    cpu: str
    measured: str  # when (ISO 8601)
    cached: bool = False  # read from the cache rather than measured by this process

    def summary(self) -> str:
        timed = ", ".join(f"{name} {ms:.3g} ms" for name, ms in sorted(self.timings_ms.items(), key=lambda kv: kv[1]))
        text = f"fastest at batch {self.batch}: {timed}" if self.timings_ms else "not timed"
        dropped = "; ".join(f"{name}: {why}" for name, why in self.excluded.items())
        return text + (f"; not considered: {dropped}" if dropped else "") + ("; cached" if self.cached else "")

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "cached"}


def resolve(config: ModelConfig) -> str:
    """The engine `auto` serves (or will serve) this net with, without loading it: the cached
    choice, else the likely winner among the installed, gap-free engines."""
    if not all(config.files.get(role, Path()).is_file() for role in ("prototxt", "weights")):
        return likely(config, _installed())  # (advice on a model.yaml alone): gaps unknown
    cached = cached_choice(config)
    if cached is not None:
        return cached.runtime
    candidates, _ = _candidates(config)
    return next((name for name in LIKELY_ORDER if name in candidates), "opencv")


def likely(config: ModelConfig, engines: Iterable[str]) -> str:
    """The engine auto would most likely pick among `engines` without measuring: the usual
    winner that runs options.precision; if none of them runs it, any engine that does (for
    advice on what an image must hold)."""
    precision = config.options.get("precision", "fp32")
    runs = [name for name in LIKELY_ORDER if precision in _PRECISIONS[name]]
    return next((name for name in runs if name in set(engines)), runs[0] if runs else "opencv")


def cached_choice(config: ModelConfig) -> Choice | None:
    """The choice measured earlier for this net, options, batch size, engines and CPU, if any."""
    return _read_choice(config, _cache_key(config))


def _read_choice(config: ModelConfig, key: str) -> Choice | None:
    name = f"{key}.json"
    for directory in _cache_dirs(config):
        try:
            return Choice(**json.loads((directory / name).read_text()), cached=True)
        except (OSError, ValueError, TypeError):
            continue
    return None


def load_fastest(config: ModelConfig, load: Loader) -> Runtime:
    """Load the net with the fastest faithful engine (module docstring), measuring on a cache miss."""
    key = _cache_key(config)
    cached = _read_choice(config, key)
    if cached is not None and cached.runtime in _installed():
        # DEBUG: every server process of a service reads it; the measurement was logged once
        log.debug("runtime auto: %s for %s (%s)", cached.runtime, config.name, cached.summary())
        return load(config, cached.runtime)
    candidates, excluded = _candidates(config)
    if not candidates:
        raise ModelLoadError(
            f"{config.source}: runtime auto: none of {', '.join(CANDIDATES)} is installed "
            "(pip install 'seldon-caffe[openvino]' or 'seldon-caffe[onnx]')"
        )
    choice, runtime = _measure(config, candidates, excluded, load)
    log.info("runtime auto: %s for %s (%s)", choice.runtime, config.name, choice.summary())
    _store(config, key, choice)
    return runtime


def _measure(
    config: ModelConfig, candidates: list[str], excluded: dict[str, str], load: Loader
) -> tuple[Choice, Runtime]:
    batch = timing_batch(config)
    loaded: dict[str, Runtime] = {}
    first_error: SeldonCaffeError | None = None
    for name in candidates:
        try:
            loaded[name] = load(dataclasses.replace(config, runtime=name), name)
        except SeldonCaffeError as exc:  # not installed right, cannot run this precision...
            first_error = first_error or exc
            excluded[name] = first_line(exc, 300)
    if first_error is not None and not loaded:
        raise first_error
    try:
        feed = _random_feed(next(iter(loaded.values())), batch)
        timings: dict[str, float] = {}
        if feed is not None and len(loaded) > 1:
            _drop_unfaithful(config, loaded, feed, excluded)
            timings = _time(loaded, feed) if len(loaded) > 1 else {}
        elif feed is None:  # an input whose shape we cannot make up: the most trusted serves
            log.warning("runtime auto: an input of %s has an open dimension besides the batch: not timed", config.name)
        winner = min(loaded, key=lambda name: (timings.get(name, math.inf), CANDIDATES.index(name)))
    except BaseException:
        for runtime in loaded.values():
            runtime.close()
        raise
    for name, runtime in loaded.items():
        if name != winner:
            runtime.close()
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    choice = Choice(winner, batch, {n: round(t, 4) for n, t in timings.items()}, excluded, cpu.describe(), when)
    return choice, loaded[winner]


def _drop_unfaithful(config: ModelConfig, loaded: dict[str, Runtime], feed: dict, excluded: dict[str, str]) -> None:
    """At fp32, every engine must answer like the most trusted one (CANDIDATES order)."""
    answers = {name: runtime.run(feed) for name, runtime in loaded.items()}
    if config.options.get("precision", "fp32") != "fp32":
        return  # lower precisions differ from each other by design; the user asked for one
    reference_name = next(iter(answers))
    for name in list(loaded)[1:]:
        error = worst_relative_error(got=answers[name], want=answers[reference_name])
        if not error <= TOLERANCE:  # (NaN fails too)
            log.warning(
                "runtime auto: %s answers %s differently from %s (relative error %.2g > %g): not served",
                name,
                config.name,
                reference_name,
                error,
                TOLERANCE,
            )
            excluded[name] = f"differs from {reference_name} by {error:.2g} (> {TOLERANCE:g})"
            loaded.pop(name).close()


def _time(loaded: dict[str, Runtime], feed: dict) -> dict[str, float]:
    """ms of one run per engine: the fastest block's median over interleaved rounds (step 4)."""
    for runtime in loaded.values():
        for _ in range(WARMUP_RUNS):
            runtime.run(feed)
    block_s = TIMING_BUDGET_S / (MAX_ROUNDS * len(loaded))
    best = dict.fromkeys(loaded, math.inf)
    timing = dict(loaded)
    began = time.perf_counter()
    for done in range(1, MAX_ROUNDS + 1):
        for name, runtime in timing.items():
            best[name] = min(best[name], _block_ms(runtime, feed, block_s))
        leader = min(best[name] for name in timing)
        timing = {name: runtime for name, runtime in timing.items() if best[name] <= CLEAR_LOSS * leader}
        elapsed = time.perf_counter() - began
        if len(timing) == 1 or (done >= MIN_ROUNDS and elapsed + elapsed / done > TIMING_BUDGET_S):
            break
    return best


def _block_ms(runtime: Runtime, feed: dict, seconds: float) -> float:
    """The median ms of calls run back to back for about `seconds` (at least one call)."""
    times: list[float] = []
    began = time.perf_counter()
    while not times or time.perf_counter() - began < seconds:
        start = time.perf_counter()
        runtime.run(feed)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def timing_batch(config: ModelConfig) -> int:
    """The batch size the service will run at: batching's largest, else a batch size model.yaml
    fixes for the inputs, else 1 (one item per request). The prototxt's own batch size is no
    guide: deploy files say 10 for a net served one image at a time."""
    if config.batching is not None:
        return config.batching.max_batch_size
    fixed = [spec["shape"][0] for spec in config.inputs or () if spec.get("shape") and spec["shape"][0] > 0]
    return fixed[0] if fixed else 1


def _random_feed(runtime: Runtime, batch: int) -> dict[str, np.ndarray] | None:
    """Uniform [0, 1) inputs (index inputs, such as Embed's, floor to 0), at the runtime's
    example shapes where it has them (free image sizes); None when a dim other than the
    batch is unknown."""
    rng = np.random.default_rng(0)
    feed = {}
    examples = runtime.example_shapes or {}
    for spec in runtime.inputs:
        shape = (batch, *examples.get(spec.name, spec.shape)[1:])
        if any(d < 0 for d in shape):
            return None
        feed[spec.name] = rng.random(shape).astype(spec.dtype)
    return feed


def _candidates(config: ModelConfig) -> tuple[list[str], dict[str, str]]:
    """(installed engines with no known gap for the net, {engine: why not} for the rest).
    When that leaves none, the first installed engine all the same (inspect warns of its gaps)."""
    from ..caffe import read_prototxt, upgrade_net
    from .gaps import find_gaps

    layers = upgrade_net(read_prototxt(config.files["prototxt"])).layer
    installed = _installed()
    precision = config.options.get("precision", "fp32")
    needs_weights = config.hooks is not None and bool(_USES_WEIGHTS.search(config.hooks.read_text(errors="replace")))
    candidates, excluded = [], {}
    for name in CANDIDATES:
        gaps = find_gaps(name, layers)
        if name not in installed:
            excluded[name] = "not installed"
        elif precision not in _PRECISIONS[name]:
            excluded[name] = f"does not run precision {precision}"
        elif needs_weights and name not in _WEIGHT_ACCESS:
            excluded[name] = f"hooks.py calls get_weights / set_weights, which {name} does not offer"
        elif gaps:
            layer, kind, reason = gaps[0]
            excluded[name] = f"layer {layer} ({kind}): {reason}"
        else:
            candidates.append(name)
    if not candidates:  # every installed engine is ruled out: the first serves, as before auto measured
        candidates = [name for name in CANDIDATES if name in installed][:1]
    return candidates, excluded


def _installed() -> dict[str, str]:
    """{engine: version} of the CANDIDATES importable here (found, not imported: that is slow)."""
    found = {}
    for name, (module, distributions) in _ENGINE.items():
        if importlib.util.find_spec(module) is None:
            continue
        found[name] = next((v for v in map(_version, distributions) if v), "unknown")
    return found


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cache_key(config: ModelConfig) -> str:
    # the converter's version: what the ONNX engines run
    digest = hashlib.sha256(f"seldon-caffe auto {CHOICE_VERSION} converter {CONVERTER_VERSION}\n".encode())
    digest.update(config.files["prototxt"].read_bytes())
    # The caffemodel by size and modification time, as make does: hashing a 240 MB AlexNet
    # took 0.5 s, which a second start should not pay for a choice that a stale key costs
    # at most some speed (the net's layers, which decide faithfulness, are the prototxt's).
    # Whole seconds: an image layer (a tar) keeps no more, so the choice `s2i build` made
    # must still match in the container.
    weights = config.files["weights"].stat()
    digest.update(f"{weights.st_size} {int(weights.st_mtime)}".encode())
    context = {
        "options": config.options,
        "batch": timing_batch(config),
        "engines": _installed(),
        "cpu": [cpu.model(), cpu.flags(), cpu.cores()],
        # without options.threads, some engines size their pools from these
        "thread_env": {name: os.environ.get(name) for name in THREAD_VARIABLES},
    }
    digest.update(json.dumps(context, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def _cache_dirs(config: ModelConfig) -> list[Path]:
    return [config.model_dir / CACHE_SUBDIR.parent / "auto", cache_dir("auto")]


def _store(config: ModelConfig, key: str, choice: Choice) -> None:
    """Write the choice where the next start finds it; a cache we cannot write costs a re-measure."""
    text = json.dumps(choice.to_dict(), indent=1)
    for directory in _cache_dirs(config):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as handle:
                handle.write(text)
            try:
                os.replace(handle.name, directory / f"{key}.json")  # atomic: no half-read file
            finally:
                Path(handle.name).unlink(missing_ok=True)
            return
        except OSError as exc:
            log.warning("runtime auto: cannot cache the choice in %s (%s)", directory, exc.strerror or exc)
