"""Write the sample requests from the first held-out session (a user the model never saw).

    .venv/bin/python examples/ranking/make_samples.py

samples/request.json          10 candidates as a REST body (jsonData), top_n 5 as a tag
samples/missing_feature.json  the same with candidate 2's price left out: a 400
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import simulator  # noqa: E402

SAMPLES = HERE / "samples"


def main() -> None:
    SAMPLES.mkdir(exist_ok=True)
    session = simulator.held_out_sessions()[0]
    request = {"user": session.user, "candidates": session.candidates[:10]}
    body = {"jsonData": request, "meta": {"tags": {"top_n": 5}}}
    (SAMPLES / "request.json").write_text(json.dumps(body, indent=1) + "\n")
    del request["candidates"][2]["price"]
    (SAMPLES / "missing_feature.json").write_text(json.dumps({"jsonData": request}, indent=1) + "\n")


if __name__ == "__main__":
    main()
