"""docs/caffe-layers.md's engine table is what the code declares (scripts/caffe_layers_doc.py)."""

from __future__ import annotations

import runpy

from helpers import REPO


def test_engine_table_is_current() -> None:
    script = runpy.run_path(str(REPO / "scripts" / "caffe_layers_doc.py"))
    page = script["DOC"].read_text()
    assert script["render"](page) == page, "docs/caffe-layers.md is stale: run python scripts/caffe_layers_doc.py"
