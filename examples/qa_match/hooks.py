"""Hooks for FAQ matching: a customer's question in Chinese, the three closest standard questions out.

This example is about setup and run_model, the custom-invoke part of the contract. The net
is an encoder (character n-grams in, a 64-d vector out). Matching is a lookup that no net
input or output expresses: compare the question's vector with the vector of every
standard question. So:

  setup       once per process: read the knowledge base (faq.json: standard questions and
              their known paraphrases) and encode all of it; each standard question's
              vector is the mean of its texts'. The matrix lives in ctx.state.
  preprocess  strData "question" or jsonData {"question": ...} -> n-gram features (1 x V).
  run_model   encode the question with model.run, then score it against ctx.state's matrix
              (cosine similarity): the model call a default hook could not make.
  postprocess the top three standard questions with their scores.

Updating the FAQ needs no retraining as long as the new questions are worded with known
n-grams: edit faq.json and restart. `features` is the whole text pipeline; train.py builds
its training rows with it too.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seldon_caffe import BadRequest

FAQ_FILE = "faq.json"
VOCAB_FILE = "vocab.txt"
TOP = 3


def setup(ctx: Any) -> dict[str, Any]:
    """Encode the whole knowledge base once; requests only encode their question."""
    from seldon_caffe.runtimes import load_runtime

    model_dir = Path(ctx.model_dir)
    vocab = load_vocab(model_dir / VOCAB_FILE)
    faq = json.loads((model_dir / FAQ_FILE).read_text(encoding="utf-8"))
    texts, owners = [], []
    for row, entry in enumerate(faq):
        for text in [entry["question"], *entry["paraphrases"]]:
            texts.append(text)
            owners.append(row)
    # setup(ctx) is not handed the served model, so it opens the same files with the same
    # runtime for this one batch and closes it again.
    with load_runtime(ctx.config) as encoder:
        vectors = unit(encoder.run(features(texts, vocab))["embedding"])
    owners_array = np.asarray(owners)
    matrix = unit(np.stack([vectors[owners_array == row].mean(axis=0) for row in range(len(faq))]))
    ctx.logger.info("encoded %d standard questions from %d texts", len(faq), len(texts))
    return {"vocab": vocab, "faq": faq, "matrix": matrix}


def preprocess(payload: Any, ctx: Any) -> np.ndarray:
    """strData (the question) or jsonData {"question": "..."} -> a 1 x V row of n-gram features."""
    if isinstance(payload, dict):
        payload = payload.get("question")
    if not isinstance(payload, str):
        raise BadRequest('send the question as strData, or as jsonData {"question": "..."}')
    if not normalise(payload):
        raise BadRequest("the question is empty: send the customer's question as text, e.g. 忘记密码了怎么办")
    return features([payload], ctx.state["vocab"])


def run_model(model: Any, inputs: np.ndarray, ctx: Any) -> dict[str, np.ndarray]:
    """Encode the question, then score it against every standard question (cosine)."""
    query = unit(model.run(inputs)["embedding"])[0]
    return {"scores": ctx.state["matrix"] @ query}


def postprocess(outputs: dict[str, np.ndarray], ctx: Any) -> dict[str, Any]:
    """The three best standard questions: id, text, and cosine score (1.0 = same direction)."""
    scores, faq = outputs["scores"], ctx.state["faq"]
    best = np.argsort(-scores, kind="stable")[:TOP]
    return {
        "matches": [
            {"id": faq[i]["id"], "question": faq[i]["question"], "score": round(float(scores[i]), 4)} for i in best
        ]
    }


def normalise(text: str) -> str:
    """Full-width to half-width, lower case, and only letters and digits (punctuation and
    spaces carry nothing here, and users type them every which way)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if ch.isalnum())


def ngrams(text: str) -> list[str]:
    """Character unigrams and bigrams: Chinese has no spaces, and bigrams catch most words."""
    chars = normalise(text)
    return list(chars) + [chars[i : i + 2] for i in range(len(chars) - 1)]


def features(texts: Sequence[str], vocab: dict[str, int]) -> np.ndarray:
    """N texts -> N x V float32: 1 for each known n-gram present, rows scaled to unit length.
    Unknown n-grams are dropped: the net has learned nothing about them."""
    rows = np.zeros((len(texts), len(vocab)), np.float32)
    for r, text in enumerate(texts):
        for gram in ngrams(text):
            if gram in vocab:
                rows[r, vocab[gram]] = 1.0
    return unit(rows)


def load_vocab(path: Path) -> dict[str, int]:
    return {gram: i for i, gram in enumerate(path.read_text(encoding="utf-8").split("\n")) if gram}


def unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (all-zero rows stay zero)."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, 1e-12)).astype(np.float32)
