"""seldon_caffe.patching: every swap of a library's attribute is checked first, and a library
that no longer has what is swapped stops the start with one line naming its version."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

import pytest

from seldon_caffe import server
from seldon_caffe.patching import PatchError, replace

REPO = Path(__file__).resolve().parent.parent


def module_with(**attributes: object) -> ModuleType:
    module = ModuleType("library.part")
    module.__dict__.update(attributes)
    return module


def two(a, b):
    return a, b


def three(a, b, c):
    return a, b, c


def test_a_fitting_replacement_is_made() -> None:
    module = module_with(function=two, mapping={1: 2}, Base=Exception)
    replace(module, "function", lambda x, y: (y, x), library="pytest")
    replace(module, "mapping", {3: 4}, library="pytest")
    replace(module, "Base", ValueError, library="pytest")
    assert module.function(1, 2) == (2, 1) and module.mapping == {3: 4} and module.Base is ValueError


@pytest.mark.parametrize(
    ("attributes", "replacement", "message"),
    [
        ({}, two, "has no library.part.target, which seldon-caffe replaces"),
        ({"target": three}, two, "library.part.target takes 3 positional parameters, the replacement 2"),
        ({"target": ValueError}, KeyError, "is the class ValueError, and the replacement does not derive from it"),
        ({"target": {}}, [], "is a dict, the replacement a list"),
    ],
)
def test_what_does_not_fit_stops_with_one_line_naming_the_version(
    attributes: dict[str, object], replacement: object, message: str
) -> None:
    module = module_with(**attributes)
    with pytest.raises(PatchError, match=f"^pytest {version('pytest')}") as raised:
        replace(module, "target", replacement, library="pytest")
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert module.__dict__.get("target", None) is attributes.get("target")  # left as it was


def test_the_gunicorn_patch_fits_the_installed_gunicorn() -> None:
    from gunicorn import util

    copy = module_with(write_error=util.write_error)
    replace(copy, "write_error", server._json_error_page, library="gunicorn")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_seldon_serve_stops_when_gunicorn_lacks_what_it_replaces(tmp_path: Path) -> None:
    options = server.ServeOptions(model_dir=REPO / "examples" / "vision")
    done = run_python(
        "import sys, gunicorn.util as util; del util.write_error\n"
        "from seldon_caffe.server import main\n"
        f"sys.exit(main([{options.to_json()!r}]))"
    )
    assert done.returncode == 1
    want = f"seldon-caffe: error: gunicorn {version('gunicorn')} has no gunicorn.util.write_error"
    assert done.stderr.startswith(want) and done.stderr.count("\n") == 1, done.stderr


def test_the_v2_runtime_stops_its_process_when_mlserver_lacks_what_it_replaces() -> None:
    pytest.importorskip("mlserver", reason="the V2 route needs the mlserver extra")
    done = run_python(
        "import mlserver.grpc.converters as converters; del converters.inject_raw\nimport seldon_caffe.v2.runtime\n"
    )
    assert done.returncode == 1
    want = f"seldon-caffe: error: mlserver {version('mlserver')} has no mlserver.grpc.converters.inject_raw"
    assert done.stderr.startswith(want) and done.stderr.count("\n") == 1, done.stderr
