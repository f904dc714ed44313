"""Write the engine table of docs/caffe-layers.md from what the code declares.

The table is every Caffe layer type seldon-caffe knows (BVLC Caffe 1.0's and the forks' in
seldon_caffe/caffe/forks/) against every Caffe engine, read from runtimes/gaps.py: a cell
is "yes", or "no" (or "partly", where only some parameter values differ) with a numbered
note saying why. Generated, so it cannot drift from the
code; tests/test_caffe_layers_doc.py fails when the committed page is stale.

Usage: python scripts/caffe_layers_doc.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

from seldon_caffe.caffe.forks import FORK_SHAPE_RULES
from seldon_caffe.caffe.shapes import SUPPORTED_LAYERS
from seldon_caffe.runtimes.gaps import CAFFE_ENGINES, depends_on_parameters, layer_support

DOC = Path(__file__).resolve().parents[1] / "docs" / "caffe-layers.md"
BEGIN, END = "<!-- engine table: scripts/caffe_layers_doc.py writes it -->", "<!-- end of engine table -->"


def table() -> str:
    """The Markdown table, one row per layer type (BVLC first, then the forks'), and its notes."""
    bvlc = sorted(SUPPORTED_LAYERS - set(FORK_SHAPE_RULES))
    forks = sorted(FORK_SHAPE_RULES)
    support = layer_support([*bvlc, *forks])
    notes: dict[str, int] = {}
    rows = ["| layer type | from | " + " | ".join(CAFFE_ENGINES) + " |", "|---|---|" + "---|" * len(CAFFE_ENGINES)]
    for kind in [*bvlc, *forks]:
        cells = []
        for engine in CAFFE_ENGINES:
            why = support[kind][engine]
            if why is None:
                cells.append("yes")
                continue
            verdict = "partly" if depends_on_parameters(engine, kind) else "no"
            cells.append(f"{verdict} [{notes.setdefault(why, len(notes) + 1)}]")
        origin = "fork" if kind in FORK_SHAPE_RULES else "BVLC"
        rows.append(f"| {kind} | {origin} | " + " | ".join(cells) + " |")
    listed = [f"{number}. {why}" for why, number in notes.items()]
    return "\n".join([*rows, "", *listed])


def render(page: str) -> str:
    """`page` with the text between the markers replaced by the current table."""
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    page = DOC.read_text()
    wanted = render(page)
    if "--check" in argv:
        if wanted != page:
            print(f"{DOC} is stale: run python scripts/caffe_layers_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(wanted)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
