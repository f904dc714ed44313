"""Helpers the test modules share (`from helpers import ...`): where things live, model copies, threads.

Fixtures stay in conftest.py; tests/service.py (a served model), tests/fuzzing.py and
tests/k8s_check.py are the other helper modules.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
# ../shared/caffe-zoo beside the clone (DESIGN.md); overridable for other layouts.
ZOO = Path(os.environ.get("SELDON_CAFFE_ZOO", REPO.parent / "shared" / "caffe-zoo"))


def run_concurrently(worker: Callable[[int], None], count: int) -> None:
    """worker(0) ... worker(count - 1) in threads at once; the first failure is raised here."""
    with ThreadPoolExecutor(count) as pool:
        for future in [pool.submit(worker, i) for i in range(count)]:
            future.result()


def copy_model(source: Path, target: Path, *, hooks: str | None = None, yaml: str | None = None) -> Path:
    """Copy a model directory; optionally replace its hooks.py and model.yaml."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.onnx", ".cache"))
    if hooks is not None:
        (target / "hooks.py").write_text(hooks)
    if yaml is not None:
        (target / "model.yaml").write_text(yaml)
    return target


@contextmanager
def one_net_per_engine(raw_config: Callable[[str, str], tuple[dict, Path]]) -> Iterator[Callable[[str, str], Any]]:
    """load(net, engine): the net loaded on that engine, from `raw_config(net, engine)` (a raw
    model.yaml dict and the directory its paths are relative to). One net per engine is alive
    at a time: cases come net by net, so each net loads once per engine and few workers live.
    Every runtime is closed at the end."""
    from seldon_caffe.config import parse_config
    from seldon_caffe.runtimes import load_runtime

    loaded: dict[str, tuple[str, Any]] = {}

    def load(name: str, engine: str) -> Any:
        if engine in loaded and loaded[engine][0] == name:
            return loaded[engine][1]
        if engine in loaded:
            loaded.pop(engine)[1].close()
        raw, directory = raw_config(name, engine)
        loaded[engine] = (name, load_runtime(parse_config(raw, directory)))
        return loaded[engine][1]

    try:
        yield load
    finally:
        for _, model in loaded.values():
            model.close()
