"""`seldon-caffe init`: a new model directory from templates/.

The directory gets model.yaml, a documented hooks.py, requirements.txt, .s2i/environment,
a README, deploy/seldondeployment.yaml (from `k8s.build_manifest`, so it matches what
`seldon-caffe k8s` prints) and model-settings.json, which lets MLServer, and so Seldon Core v2
and KServe, serve the directory over the V2 protocol with seldon_caffe.v2's runtime. Given
the model's files (`--from`), it copies them in and points model.yaml at them, so the
directory serves at once; a model-settings.json among them replaces ours.

init never overwrites: it works out every path it would write first, and if any exists it
refuses, lists them all and writes nothing. Re-running it is therefore always safe.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import advice, k8s
from .config import FORMAT_FILES
from .errors import SeldonCaffeError
from .paths import check_output_dir
from .runtimes import registry

TEMPLATES_ENV = "SELDON_CAFFE_TEMPLATES"
MANIFEST = Path("deploy/seldondeployment.yaml")
MODEL_SETTINGS = Path(k8s.MODEL_SETTINGS)

# file extension -> (format, key of model.yaml's `files`), and what model.yaml names before the
# user has copied the real files in: both from the formats' declarations (runtimes/registry.py)
EXTENSIONS = registry.FILE_EXTENSIONS
PLACEHOLDER_FILES = registry.PLACEHOLDER_FILES
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


class InitError(SeldonCaffeError):
    """init cannot make the directory; nothing was written."""


@dataclass
class Plan:
    """What init will write: rendered text files, and model files to copy in."""

    target: Path
    format: str
    files: dict[str, str]  # model.yaml's `files`, relative to target
    texts: dict[Path, str] = field(default_factory=dict)
    copies: dict[Path, Path] = field(default_factory=dict)  # relative destination -> source

    def paths(self) -> list[Path]:
        return sorted([*self.texts, *self.copies])


def init_model_dir(target: Path, fmt: str | None = None, sources: list[Path] | None = None) -> Plan:
    """Create the model directory `target`; return what was written. Raises InitError.

    Its parent must exist: a mistyped path should not quietly grow a tree of folders."""
    check_output_dir(target)
    plan = plan_init(target, fmt, sources or [])
    conflicts = [rel for rel in plan.paths() if _conflicts(plan, rel)]
    if conflicts:
        listing = "\n".join(f"  {target / rel}" for rel in conflicts)
        raise InitError(
            f"refusing to overwrite {len(conflicts)} existing path(s); nothing was written:\n{listing}\n"
            "Move them away, or init a new directory."
        )
    _write(plan)
    return plan


def plan_init(target: Path, fmt: str | None, sources: list[Path]) -> Plan:
    """Decide every file and its content without touching the disk."""
    if target.exists() and not target.is_dir():
        raise InitError(f"{target} exists and is not a directory")
    name = target.resolve().name
    if sources:
        fmt, files, copies = _model_files(sources, fmt)
        note = "The model's files are in place: " + ", ".join(f"`{rel}`" for rel in sorted(files.values())) + "."
    else:
        fmt = fmt or "caffe"
        files, copies = dict(PLACEHOLDER_FILES[fmt]), {}
        note = (
            "First copy the model's files in, named as model.yaml's `files` says ("
            + ", ".join(f"`{rel}`" for rel in files.values())
            + "), or edit model.yaml to name yours."
        )
    values = {
        "name": name,
        "name_yaml": _yaml_scalar(name),
        "image_name": k8s.dns_name(name),
        "format": fmt,
        "files_yaml": _yaml_scalar(files),
        "files_note": note,
    }
    plan = Plan(target=target, format=fmt, files=files, copies=copies)
    root = templates_dir()
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            rel = path.relative_to(root)
            plan.texts[rel] = _render(path.read_text(), values, path)
    plan.texts[MANIFEST] = _manifest(name)
    plan.texts[MODEL_SETTINGS] = json.dumps(k8s.model_settings(name), indent=2) + "\n"
    for rel in copies:  # the user's own hooks.py, README.md... replace the templates
        plan.texts.pop(rel, None)
    return plan


def templates_dir() -> Path:
    """Where the templates are: $SELDON_CAFFE_TEMPLATES, the source tree, or the installed copy."""
    candidates = [
        Path(__file__).resolve().parent.parent / "templates",
        Path(sys.prefix) / "share/seldon-caffe/templates",
    ]
    if os.environ.get(TEMPLATES_ENV):
        candidates.insert(0, Path(os.environ[TEMPLATES_ENV]))
    for candidate in candidates:
        if (candidate / "model.yaml").is_file():
            return candidate
    raise InitError("templates not found in " + ", ".join(map(str, candidates)) + f"; set {TEMPLATES_ENV}")


def _model_files(sources: list[Path], fmt: str | None) -> tuple[str, dict[str, str], dict[Path, Path]]:
    """Pick the format and model.yaml's `files` from the given files; everything else is copied as is."""
    missing = [str(src) for src in sources if not src.exists()]
    if missing:
        raise InitError(f"--from: no such file: {', '.join(missing)}")
    copies: dict[Path, Path] = {}
    for src in sources:
        rel = Path(src.resolve().name)
        if rel in copies:
            raise InitError(f"--from: {copies[rel]} and {src} would both be copied to {rel}")
        copies[rel] = src
    roles = {rel: _role(src) for rel, src in copies.items()}
    if fmt is None:
        found = sorted({role[0] for role in roles.values() if role})
        if not found:
            known = ", ".join(sorted(EXTENSIONS)) + ", a SavedModel directory"
            raise InitError(f"--from: cannot tell the model format from {_names(copies)} ({known}); pass --format")
        if len(found) > 1:
            raise InitError(f"--from: files of several formats ({', '.join(found)}); pass --format to pick one")
        fmt = found[0]
    files = {}
    for key in FORMAT_FILES[fmt]:
        candidates = sorted(str(rel) for rel, role in roles.items() if role == (fmt, key))
        if not candidates:
            hint = ""
            if (fmt, key) == ("caffe", "weights"):  # a bare prototxt: random weights still serve
                given = [copies[rel] for rel, role in roles.items() if role == ("caffe", "prototxt")]
                make = f"seldon-caffe weights {given[0] if given else 'deploy.prototxt'} -o weights.caffemodel"
                hint = f"; without trained weights, make random ones: {make}"
            raise InitError(f"--from: format {fmt} needs a file for files.{key} ({_wants(fmt, key)}); none given{hint}")
        if len(candidates) > 1:
            raise InitError(f"--from: several files could be files.{key}: {', '.join(candidates)}; give only one")
        files[key] = candidates[0]
    return fmt, files, copies


def _role(path: Path) -> tuple[str, str] | None:
    if path.is_dir():
        is_saved_model = any((path / f).is_file() for f in ("saved_model.pb", "saved_model.pbtxt"))
        return ("tensorflow", "saved_model") if is_saved_model else None
    return EXTENSIONS.get(path.suffix.lower())


def _wants(fmt: str, key: str) -> str:
    if fmt == "tensorflow":
        return "a SavedModel directory"
    return " or ".join(ext for ext, role in EXTENSIONS.items() if role == (fmt, key))


def _names(copies: dict[Path, Path]) -> str:
    return ", ".join(str(rel) for rel in copies)


def _conflicts(plan: Plan, rel: Path) -> bool:
    """True when writing `rel` would replace something (or needs a directory where a file is)."""
    dest = plan.target / rel
    for parent in list(rel.parents)[:-1]:
        if (plan.target / parent).exists() and not (plan.target / parent).is_dir():
            return True
    if not dest.exists():
        return False
    source = plan.copies.get(rel)
    return not (source is not None and dest.resolve() == source.resolve())  # in place: nothing to copy


def _write(plan: Plan) -> None:
    """Write the plan; on failure remove what this call created, so nothing half-made stays."""
    created: list[Path] = []
    try:
        if not plan.target.exists():
            plan.target.mkdir()
            created.append(plan.target)
        for rel in plan.paths():
            dest = plan.target / rel
            for parent in reversed([*rel.parents][:-1]):
                if not (plan.target / parent).exists():
                    (plan.target / parent).mkdir()
                    created.append(plan.target / parent)
            if rel in plan.texts:
                dest.write_text(plan.texts[rel])
            elif dest.exists():  # the model file is already where model.yaml points
                continue
            elif plan.copies[rel].is_dir():
                shutil.copytree(plan.copies[rel], dest, copy_function=shutil.copyfile)
            else:
                shutil.copyfile(plan.copies[rel], dest)  # contents only: the new directory is the user's to edit
            created.append(dest)
    except OSError as exc:
        for path in reversed(created):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise InitError(f"writing {plan.target} failed ({exc}); removed what was written") from None


def _manifest(name: str) -> str:
    image = f"{k8s.dns_name(name)}:0.1.0"
    header = (
        f"Written by seldon-caffe init for the image the README's s2i build makes ({image}).\n"
        "For your registry, replicas, autoscaling or GPUs, regenerate it:\n"
        "  seldon-caffe k8s . --image REGISTRY/IMAGE:TAG -o deploy/seldondeployment.yaml --force"
    )
    return k8s.dump_manifest(k8s.build_manifest(k8s.DeploySpec(name=name, image=image)), header)


def _render(text: str, values: dict[str, str], source: Path) -> str:
    def fill(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise InitError(f"{source}: unknown placeholder {match.group(0)}")
        return values[match.group(1)]

    return _PLACEHOLDER.sub(fill, text)


def _yaml_scalar(value: object) -> str:
    """`value` as inline YAML, quoted only where YAML needs it (a name like 'yes' or '1.0')."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("...").strip()


# -- the command ---------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `init` to the `seldon-caffe` command."""
    parser = subparsers.add_parser(
        "init",
        help="make a new model directory from the templates",
        description="Make the model directory NAME: model.yaml, hooks.py, requirements.txt, .s2i/environment, "
        "deploy/seldondeployment.yaml, model-settings.json (for MLServer: Seldon Core v2, KServe), README.md. "
        "Existing files are never overwritten.",
    )
    parser.add_argument("target", type=Path, metavar="NAME", help="the directory to create (its name names the model)")
    parser.add_argument("--format", choices=sorted(FORMAT_FILES), help="default: detected from --from, else caffe")
    parser.add_argument(
        "--from",
        dest="sources",
        type=Path,
        nargs="+",
        default=[],
        metavar="FILE",
        help="the model's files to copy in (e.g. deploy.prototxt weights.caffemodel labels.txt)",
    )
    parser.set_defaults(handler=init_command)
    return parser


def init_command(args: argparse.Namespace) -> int:
    """Run init for the parsed command line and say what comes next."""
    plan = init_model_dir(args.target, args.format, args.sources)
    print(f"created {plan.target} ({plan.format}):")
    for rel in plan.paths():
        print(f"  {rel}")
    if not plan.copies:
        wanted = ", ".join(plan.files.values())
        print(f"next: copy the model's files into {plan.target} ({wanted}), then:")
    else:
        print("next:")
    print(f"  seldon-caffe inspect {plan.target}")
    print(f"  seldon-caffe serve {plan.target}")
    image = builder_for(plan)
    if image.note:
        print(f"  ({image.note})")
    elif not image.is_default:
        print(f"  {image.command()}    # in the seldon-caffe repository: the builder with the model's engine")
    print(f"  s2i build {plan.target} {image.tag} {k8s.dns_name(plan.target.resolve().name)}:0.1.0")
    return 0


def builder_for(plan: Plan) -> advice.Builder:
    """The builder image the new directory's runtime needs; its warnings go to stderr.

    Read back from the model.yaml just written: with --from it may be the user's own.
    """
    try:
        config = advice.model_settings(plan.target.resolve(), k8s.read_model_yaml(plan.target))
    except k8s.K8sError:  # the user's own model.yaml, not valid YAML: `inspect`, the next step, says why
        config = None
    if config is None:
        return advice.Builder()
    name = advice.image_runtime(config)
    for warning in advice.settings_warnings(config, name):
        print(f"seldon-caffe: warning: {warning}", file=sys.stderr)
    return advice.builder(config, name)
