"""Measure the click ranker on held-out users' sessions, through the service's own code.

    .venv/bin/python examples/ranking/evaluate.py [--runtime opencv|pycaffe|onnxruntime]

simulator.held_out_sessions(): 1000 feed sessions (20 listings each) of users the model
never saw. Each session's request goes through SeldonCaffeModel.predict, the same
preprocess -> runtime -> postprocess as a request to the microservice; the scores that
come back are compared with the simulated clicks:
  AUC      over all 20,000 impressions: does a clicked listing score above an unclicked one?
  NDCG@10  per session with at least one click (sklearn's ndcg_score, clicks as relevance).
Beside them: the same figures for the simulator's true click probabilities (the best any
ranker could do) and for a random order. Deterministic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import ndcg_score, roc_auc_score

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import simulator  # noqa: E402

from seldon_caffe.model import SeldonCaffeModel  # noqa: E402


def evaluate(model_dir: Path = HERE, runtime: str | None = None, sessions: int | None = None) -> dict[str, object]:
    """AUC and NDCG@10 of the served model, the oracle and a random order (first `sessions` only if given)."""
    served = SeldonCaffeModel(str(model_dir), runtime)
    served.load()
    try:
        held_out = simulator.held_out_sessions()[:sessions]
        scores = []
        for session in held_out:
            ranked = served.predict(session.request(), names=[], meta={})["ranked"]
            by_index = np.empty(len(ranked))
            by_index[[r["index"] for r in ranked]] = [r["score"] for r in ranked]
            scores.append(by_index)
        runtime_name = served.model.name
    finally:
        served.model.close()
    clicks = [s.clicks for s in held_out]
    rng = np.random.default_rng(0)
    orders = {"model": scores, "oracle": [s.truth for s in held_out], "random": [rng.random(len(c)) for c in clicks]}
    clicked = [i for i, c in enumerate(clicks) if c.any()]
    result: dict[str, object] = {
        "runtime": runtime_name,
        "sessions": len(held_out),
        "impressions": sum(map(len, clicks)),
    }
    for name, order in orders.items():
        result[f"{name} auc"] = roc_auc_score(np.concatenate(clicks), np.concatenate(order))
        result[f"{name} ndcg@10"] = ndcg_score([clicks[i] for i in clicked], [order[i] for i in clicked], k=10)
    return result


def report(result: dict[str, object]) -> list[str]:
    """The figure lines README.md quotes (the tests check it still does)."""
    return [
        f"{name:7s} AUC {result[f'{name} auc']:.3f}  NDCG@10 {result[f'{name} ndcg@10']:.3f}"
        for name in ("model", "oracle", "random")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", help="serve with this runtime instead of model.yaml's")
    result = evaluate(runtime=parser.parse_args().runtime)
    print(f"held-out sessions: {result['sessions']} ({result['impressions']} impressions), runtime {result['runtime']}")
    print("\n".join(report(result)))


if __name__ == "__main__":
    main()
