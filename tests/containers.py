"""seldon-caffe's images run with podman, for tests/test_image.py and benchmarks/pod_cost.py.

A container is started attached (`podman run`, its output in a log file) with its ports
published on free host ports, so the venv service's helpers (tests/service.py: post, client,
wait_ready) talk to it unchanged; it is stopped as Kubernetes stops a pod (`podman stop`:
SIGTERM, then SIGKILL after the grace period) and removed. podman runs with the project's
settings (scripts/image/containers.conf: runc, cgroupfs) and this machine's ulimits.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from service import Service, free_port, ready_until_stopped, wait_ready

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts" / "image"
CONTAINERS_CONF = SCRIPTS / "containers.conf"
# The ports each protocol serves inside the image (s2i/environment's defaults).
PORTS = {"seldon": (9000, 5000, 6000), "v2": (8080, 8081, 8082)}
STOP_GRACE_S = 10  # podman stop's -t: as a pod's terminationGracePeriodSeconds


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """podman ARGS; `run` with this machine's ulimits (podman's defaults exceed them)."""
    if args[:1] == ("run",):
        args = ("run", *ulimit_flags(), *args[1:])
    done = subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(), timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {shlex.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done


def unavailable_reason(builder: str | None) -> str | None:
    """Why the container tests cannot run here (None: they can)."""
    if builder is None:
        return "no builder image given (SELDON_CAFFE_TEST_BUILDER; `make image-test` builds and names it)"
    if os.geteuid() != 0:
        return "podman's image store is root's (run as root: `make image-test`)"
    if shutil.which("podman") is None:
        return "podman is not installed (`make image` installs it)"
    if podman("image", "exists", builder, check=False).returncode != 0:
        return f"no image {builder} (`make image` builds it)"
    return None


def ulimit_flags() -> list[str]:
    """The --ulimit flags scripts/image/podman.sh computes for this machine."""
    script = f". {shlex.quote(str(SCRIPTS / 'podman.sh'))}; ulimit_flags"
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()


def build_model_image(model_dir: Path, builder: str, image: str) -> subprocess.CompletedProcess:
    """`make model-image`'s build: as `s2i build MODEL_DIR BUILDER IMAGE`."""
    command = ["bash", str(SCRIPTS / "build.sh"), "model", str(model_dir), builder, image]
    return subprocess.run(command, capture_output=True, text=True, env=podman_env(), timeout=900)


@dataclass
class Container(Service):
    name: str = ""

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *command, check=False)

    def host_pids(self) -> list[int]:
        """The container's processes, as PIDs of this host."""
        done = podman("top", self.name, "hpid", check=False)
        return [int(line) for line in done.stdout.split()[1:] if line.strip().isdigit()]


def start_container(
    image: str,
    protocol: str = "seldon",
    env: dict[str, str] | None = None,
    run_args: Sequence[str] = (),
    command: Sequence[str] = (),
) -> Container:
    """`podman run` IMAGE attached, its protocol's ports published on free host ports."""
    name = f"seldon-caffe-test-{uuid.uuid4().hex[:10]}"
    host_ports = [free_port() for _ in PORTS[protocol]]
    publish = [f"-p127.0.0.1:{host}:{inside}" for host, inside in zip(host_ports, PORTS[protocol], strict=True)]
    variables = {"SELDON_CAFFE_PROTOCOL": protocol, **(env or {})}
    environment = [f"-e{key}={value}" for key, value in variables.items()]
    log = Path(tempfile.mkstemp(prefix="container-", suffix=".log")[1])
    argv = ["podman", "run", "--name", name, *ulimit_flags(), *publish, *environment, *run_args, image, *command]
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=podman_env())
    return Container(process, *host_ports, log, protocol=protocol, name=name)


def stop_container(container: Container, grace_s: int = STOP_GRACE_S) -> int:
    """`podman stop` (SIGTERM to the container's PID 1, SIGKILL after `grace_s`); the
    container's exit code. The container is removed."""
    podman("stop", "-t", str(grace_s), container.name, check=False, timeout=grace_s + 30)
    with contextlib.suppress(subprocess.TimeoutExpired):
        container.process.wait(timeout=30)
    if container.process.poll() is None:
        container.process.kill()
        container.process.wait()
    code = podman("inspect", "-f", "{{.State.ExitCode}}", container.name, check=False).stdout.strip()
    podman("rm", "-f", container.name, check=False)
    return int(code) if code.lstrip("-").isdigit() else -1


def running_container(
    image: str, protocol: str = "seldon", timeout: float = 180, **kwargs
) -> contextlib.AbstractContextManager[Container]:
    """A ready container (as tests/service.py's running_service), stopped and removed after."""
    return ready_until_stopped(start_container(image, protocol, **kwargs), stop_container, timeout)


def seconds_to_ready(container: Container, started: float, timeout: float = 180) -> float:
    """From `started` (time.monotonic() before `podman run`) until the service is ready."""
    wait_ready(container, timeout)
    return time.monotonic() - started


def memory_mb(container: Container) -> dict[str, float]:
    """The container's memory: its cgroup's usage and working set (usage less inactive page
    cache: what the kubelet compares with a pod's limit), and the sum of its processes' PSS."""
    pss_kb = 0
    for pid in container.host_pids():
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss_kb += int(line.split()[1])
    cgroup = podman("inspect", "-f", "{{.State.CgroupPath}}", container.name).stdout.strip()
    usage, inactive = _cgroup_memory(cgroup)
    mib = 1024 * 1024
    return {"cgroup": usage / mib, "working_set": (usage - inactive) / mib, "pss": pss_kb / 1024}


def _cgroup_memory(path: str) -> tuple[int, int]:
    """(usage, inactive file cache) in bytes, from cgroup v2's or v1's memory controller."""
    for root, usage_file, inactive_key in (
        (Path("/sys/fs/cgroup"), "memory.current", "inactive_file"),
        (Path("/sys/fs/cgroup/unified"), "memory.current", "inactive_file"),
        (Path("/sys/fs/cgroup/memory"), "memory.usage_in_bytes", "total_inactive_file"),
    ):
        directory = root / path.lstrip("/")
        if (directory / usage_file).is_file():
            stat = dict(line.split() for line in (directory / "memory.stat").read_text().splitlines())
            return int((directory / usage_file).read_text()), int(stat.get(inactive_key, 0))
    raise AssertionError(f"no memory controller found for the container's cgroup {path}")


def measure_pod(image: str, protocol: str, send: Callable[[Container], object], requests_n: int = 1000) -> dict:
    """One container's cost: seconds from `podman run` to ready, memory idle (memory_mb) and
    after `requests_n` calls of `send` (one request each; those that raise are counted)."""
    began = time.monotonic()
    container = start_container(image, protocol)
    try:
        ready_s = seconds_to_ready(container, began)
        time.sleep(1.0)  # let start-up's last allocations settle
        idle = memory_mb(container)
        errors = 0
        for _ in range(requests_n):
            try:
                send(container)
            except Exception:  # counted, and the count is the result
                errors += 1
        after = memory_mb(container)
        processes = len(container.host_pids())
    finally:
        stop_container(container)
        container.log_path.unlink(missing_ok=True)
    return {"ready_s": ready_s, "idle": idle, "after": after, "errors": errors, "processes": processes}


def image_size_mb(image: str) -> float:
    return int(podman("image", "inspect", "-f", "{{.Size}}", image).stdout.strip()) / 2**20
