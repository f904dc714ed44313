"""`seldon-caffe serve --protocol v2`: MLServer, supervised as the Seldon v1 service is.

MLServer reads its settings from a folder (settings.json and model-settings.json). They are
written into a temporary folder, never into the model directory: nothing the user gave is
overwritten, and a model-settings.json kept there is read as the starting point. Then
`mlserver start` runs on that folder as a child, in a session of its own (a terminal's Ctrl-C
reaches this process alone) and dying with this one, so that here:

- SIGTERM or SIGINT asks MLServer to stop (REST finishes in-flight requests, gRPC gets 5 s),
  whatever is left at STOP_S is killed, the folder is removed, exit 0;
- MLServer exiting on its own (a model that fails to load in it) is one line and exit 1, so
  Kubernetes restarts the pod.

The same check-load and port checks as v1 run before this, in `seldon-caffe serve`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import SeldonCaffeError
from ..server import (
    LOG_FORMAT,
    STOP_S,
    ServeOptions,
    StopSignal,
    announce_ready,
    configure_logging,
    die_with_parent,
    service_exit,
)

logger = logging.getLogger("seldon_caffe.server")

IMPLEMENTATION = "seldon_caffe.v2.SeldonCaffeRuntime"
MODEL_SETTINGS = "model-settings.json"

# Quiet by default, as v1 is: the service's own lines and every failed request. MLServer's
# gRPC layer logs each failed call again with a traceback; ours are logged once, by the runtime.
QUIET_LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": LOG_FORMAT}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "root": {"level": "WARNING", "handlers": ["stderr"]},
    "loggers": {
        "mlserver": {"level": "WARNING"},
        "mlserver.grpc": {"level": "CRITICAL"},
        "uvicorn": {"level": "WARNING"},
        "uvicorn.error": {"level": "WARNING"},
        "uvicorn.access": {"level": "WARNING"},
        "seldon_caffe": {"level": "INFO"},
    },
}


def serve_v2(options: ServeOptions) -> int:
    """Run MLServer until SIGTERM/SIGINT (0) or until it exits on its own (1)."""
    configure_logging(options.verbose)
    stop_signal = StopSignal()
    with tempfile.TemporaryDirectory(prefix="seldon-caffe-v2-") as folder:
        write_settings(Path(folder), options)
        command = [sys.executable, "-c", "from mlserver.cli import main; main()", "start", folder]
        process = subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent)
        alive = partial(_running, process)
        threading.Thread(target=announce_ready, args=(options, alive, stop_signal), daemon=True).start()
        try:
            code = _supervise(process, stop_signal)
        finally:
            _stop(process)
    return service_exit(stop_signal, None if code is None else ("MLServer", code))


def write_settings(folder: Path, options: ServeOptions) -> None:
    """settings.json (ports, limits, logging) and model-settings.json (this runtime on the
    model directory) into `folder`."""
    settings: dict[str, Any] = {
        "http_port": options.http_port,
        "grpc_port": options.grpc_port,
        "metrics_port": options.metrics_port,
        "parallel_workers": 0,  # the runtime's own threads give the concurrency (runtime.py says why)
        "grpc_max_message_length": options.max_request_bytes,
        "debug": False,  # MLServer's debug also puts tracebacks into 500 bodies: never
    }
    if not options.verbose:
        settings["logging_settings"] = QUIET_LOGGING
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    model = model_settings(options)
    model_folder = folder / "models" / model["name"]  # MLServer expects the folder named after the model
    model_folder.mkdir(parents=True)
    (model_folder / MODEL_SETTINGS).write_text(json.dumps(model, indent=2))


def model_settings(options: ServeOptions) -> dict[str, Any]:
    """The model directory's own model-settings.json, if any, with this runtime serving the
    directory; the name is that file's, else model.yaml's."""
    user = _read_model_settings(options.model_dir / MODEL_SETTINGS)
    parameters = dict(user.get("parameters") or {})
    extra = {**(parameters.get("extra") or {}), "threads": options.threads}
    if options.runtime:
        extra["runtime"] = options.runtime
    parameters.update(uri=str(options.model_dir), extra=extra)
    name = user.get("name") or options.model_name or _config_name(options.model_dir)
    return {**user, "name": name, "implementation": IMPLEMENTATION, "parameters": parameters}


def _config_name(model_dir: Path) -> str:
    from ..config import load_config  # numpy and yaml come with it: only when `serve` gave no name

    return load_config(model_dir).name


def _read_model_settings(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SeldonCaffeError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(settings, dict):
        raise SeldonCaffeError(f"{path}: expected a JSON object (MLServer's model settings)")
    return settings


def _running(process: subprocess.Popen) -> bool:
    return process.poll() is None


def _supervise(process: subprocess.Popen, stop_signal: StopSignal) -> int | None:
    """Wait for a stop signal (None) or for MLServer to exit on its own (its exit code)."""
    while not stop_signal:
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = process.wait(timeout=0.5)
            if not stop_signal:
                return code
    return None


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (MLServer drains), then SIGKILL to its whole session at STOP_S."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        logger.error("MLServer did not stop within %.1f s: killed", STOP_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
