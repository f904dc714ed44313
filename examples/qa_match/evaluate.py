"""Measure FAQ matching on the held-out paraphrases, through the service's own code.

    .venv/bin/python examples/qa_match/evaluate.py [--runtime opencv|pycaffe|onnxruntime]

faq.json's `held_out` lists hold 3 paraphrases of each of the 42 standard questions (126
queries, picked at random when the set was written) that neither training nor the
service's knowledge base reads. Each goes through
SeldonCaffeModel.predict, the same setup -> preprocess -> run_model -> postprocess as a
request to the microservice; top-1 counts the first match, top-3 any of the three.
Beside it, the same matching without the net: cosine between tf-idf weighted n-gram rows,
the classic lexical baseline. Deterministic.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _train import load_hooks  # noqa: E402

from seldon_caffe.model import SeldonCaffeModel  # noqa: E402


def evaluate(model_dir: Path = HERE, runtime: str | None = None) -> dict[str, object]:
    """Top-1 and top-3 accuracy of the service on the held-out queries, and of the tf-idf baseline."""
    faq = json.loads((Path(model_dir) / "faq.json").read_text(encoding="utf-8"))
    held_out = [{"id": entry["id"], "query": query} for entry in faq for query in entry["held_out"]]
    served = SeldonCaffeModel(str(model_dir), runtime)
    served.load()
    try:
        ranked = [[m["id"] for m in served.predict(h["query"], names=[], meta={})["matches"]] for h in held_out]
        result: dict[str, object] = {"runtime": served.model.name, "queries": len(held_out)}
        result |= _accuracy(ranked, held_out, "model")
        result |= _accuracy(_baseline(served.context.state, held_out), held_out, "tf-idf")
        return result
    finally:
        served.model.close()


def _accuracy(ranked: list[list[int]], held_out: list[dict], name: str) -> dict[str, float]:
    truth = [h["id"] for h in held_out]
    return {
        f"{name} top-1": float(np.mean([r[0] == t for r, t in zip(ranked, truth, strict=True)])),
        f"{name} top-3": float(np.mean([t in r[:3] for r, t in zip(ranked, truth, strict=True)])),
    }


def _baseline(state: dict, held_out: list[dict]) -> list[list[int]]:
    """The hooks' matching with the encoder taken out: tf-idf weighted n-gram rows (idf over
    the knowledge base's texts), averaged per standard question, compared by cosine."""
    hooks = load_hooks(HERE / "hooks.py")
    faq, vocab = state["faq"], state["vocab"]
    groups = [hooks.features([e["question"], *e["paraphrases"]], vocab) for e in faq]
    texts = np.concatenate(groups) > 0
    idf = np.log((1 + len(texts)) / (1 + texts.sum(axis=0))) + 1
    centroids = hooks.unit(np.stack([hooks.unit(g * idf).mean(axis=0) for g in groups]))
    scores = hooks.unit(hooks.features([h["query"] for h in held_out], vocab) * idf) @ centroids.T
    return [[faq[i]["id"] for i in np.argsort(-row, kind="stable")[:3]] for row in scores]


def report(result: dict[str, object]) -> list[str]:
    """The figure lines README.md quotes (the tests check it still does)."""
    return [
        f"{name:6s}  top-1 {result[f'{name} top-1']:.1%}  top-3 {result[f'{name} top-3']:.1%}"
        for name in ("model", "tf-idf")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", help="serve with this runtime instead of model.yaml's")
    result = evaluate(runtime=parser.parse_args().runtime)
    print(f"held-out queries: {result['queries']}, runtime {result['runtime']}")
    print("\n".join(report(result)))


if __name__ == "__main__":
    main()
