"""Hooks for the click ranker: one user and their candidate listings in, the listings ranked out.

This example is about preprocess building a batch. A request is jsonData

    {"user": {"age": 34, "gender": "f", "city": "chengdu", "device": "ios", "recent_category": "pets"},
     "candidates": [{"item_id": "i00042", "category": "pets", "brand": "pets-b3", "price": 820.0,
                     "rating": 4.2, "age_days": 3}, ...]}

and the net scores one row per candidate, so preprocess turns the request into a batch of
N rows for the wide-and-deep net's two inputs: "wide", hashed one-hot crosses of user and
item features (city x category, age band x category...; a linear model memorises these), and
"deep", per-field hashed one-hots plus scaled numbers for the MLP. Feature hashing needs no
vocabulary file: an unseen city or brand still lands in a bucket. `encode` is the whole
feature pipeline and train.py builds the training rows with it, so serving cannot drift
from training. postprocess sorts the candidates by the predicted click probability.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from seldon_caffe import BadRequest

USER_FEATURES = {"age": "number", "gender": "text", "city": "text", "device": "text", "recent_category": "text"}
ITEM_FEATURES = {
    "item_id": "text",
    "category": "text",
    "brand": "text",
    "price": "number",
    "rating": "number",
    "age_days": "number",
}
WIDE_DIM = 4096
# Each categorical field gets its own block of the deep input, sized for its cardinality.
DEEP_FIELDS = {"age_band": 8, "gender": 4, "city": 32, "device": 4, "recent_category": 32, "category": 32, "brand": 128}
DEEP_NUMBERS = ("log_price", "rating", "log_age_days", "age", "recent_is_category")
DEEP_DIM = sum(DEEP_FIELDS.values()) + len(DEEP_NUMBERS)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def preprocess(payload: Any, ctx: Any) -> dict[str, np.ndarray]:
    """jsonData {"user": {...}, "candidates": [{...}, ...]} -> {"wide": N x 4096, "deep": N x 245}."""
    user, candidates = parse_request(payload)
    ctx.item_ids = [str(item["item_id"]) for item in candidates]  # ctx is per request: a note for postprocess
    return encode(user, candidates)


def postprocess(outputs: dict[str, np.ndarray], ctx: Any) -> dict[str, Any]:
    """The candidates, best first: item_id, score (click probability) and index in the request.

    The request tag `top_n` keeps only the first n.
    """
    scores = outputs["score"].reshape(-1)
    order = np.argsort(-scores, kind="stable")
    top_n = ctx.tags.get("top_n")
    if top_n is not None:
        # Checked as a number first: int() of inf or NaN raises, and would be a 500.
        if not _is_number(top_n) or top_n < 1 or top_n != int(top_n):
            raise BadRequest(f"tag top_n must be a positive whole number; got {top_n!r}")
        order = order[: int(top_n)]
    ids = ctx.item_ids
    return {"ranked": [{"item_id": ids[i], "index": int(i), "score": round(float(scores[i]), 6)} for i in order]}


def parse_request(payload: Any) -> tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]:
    """Check the request's shape and every feature; a 400 names what is missing and where."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get("candidates"), list):
        raise BadRequest('expected jsonData {"user": {features}, "candidates": [{features}, ...]}')
    user, candidates = payload.get("user"), payload["candidates"]
    if not isinstance(user, Mapping):
        raise BadRequest(f"user must be an object with features {', '.join(USER_FEATURES)}")
    if not candidates:
        raise BadRequest("candidates is empty: send at least one item to rank")
    _check("user", user, USER_FEATURES)
    for i, item in enumerate(candidates):
        if not isinstance(item, Mapping):
            raise BadRequest(f"candidate {i} must be an object with features {', '.join(ITEM_FEATURES)}")
        label = f"candidate {i}" + (f" (item_id {item['item_id']!r})" if "item_id" in item else "")
        _check(label, item, ITEM_FEATURES)
    return user, candidates


def _check(label: str, features: Mapping[str, Any], wanted: Mapping[str, str]) -> None:
    for name, kind in wanted.items():
        if name not in features or features[name] is None:
            raise BadRequest(f"{label} is missing feature {name!r}; every one needs {', '.join(wanted)}")
        value = features[name]
        if kind == "number" and not _is_number(value):
            raise BadRequest(f"{label}: feature {name!r} must be a number, got {value!r}")
        if kind == "number" and abs(value) > FLOAT32_MAX:
            # the net's inputs are float32: a larger number would reach it as Inf
            raise BadRequest(f"{label}: feature {name!r} is out of range ({value:.3g}; at most {FLOAT32_MAX:.3g})")
        if kind == "text" and not isinstance(value, str):
            raise BadRequest(f"{label}: feature {name!r} must be a string, got {value!r}")


def _is_number(value: Any) -> bool:
    """A finite int or float; not a bool. JSON can carry integers too large for a float
    (10**400): math.isfinite raises OverflowError on those, so they are caught here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def encode(user: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The net's two inputs, one row per candidate (features already checked)."""
    wide = np.zeros((len(candidates), WIDE_DIM), np.float32)
    deep = np.zeros((len(candidates), DEEP_DIM), np.float32)
    band = f"{min(int(user['age']) // 10, 7)}"
    for row, item in enumerate(candidates):
        category, price_band = str(item["category"]), f"{min(int(math.log1p(max(item['price'], 0))), 12)}"
        crosses = [
            ("item", item["item_id"]),
            ("brand", item["brand"]),
            ("band x category", band, user["gender"], category),
            ("city x category", user["city"], category),
            ("recent x category", user["recent_category"], category),
            ("band x category x price", band, category, price_band),
            ("city x device x price", user["city"], user["device"], category, price_band),
            ("bias",),
        ]
        for cross in crosses:
            wide[row, _bucket("|".join(map(str, cross)), WIDE_DIM)] = 1.0
        fields = {"age_band": band, **{k: user[k] for k in ("gender", "city", "device", "recent_category")}}
        fields |= {"category": category, "brand": item["brand"]}
        offset = 0
        for name, size in DEEP_FIELDS.items():
            deep[row, offset + _bucket(f"{name}={fields[name]}", size)] = 1.0
            offset += size
        numbers = (
            math.log1p(max(item["price"], 0)) / 10,
            item["rating"] / 5,
            math.log1p(max(item["age_days"], 0)) / 5,
            user["age"] / 100,
            float(user["recent_category"] == category),
        )
        deep[row, offset:] = numbers
    return {"wide": wide, "deep": deep}


def _bucket(key: str, size: int) -> int:
    # crc32, not hash(): Python salts str hashes per process, and the buckets must be the
    # same in training, in every worker and after every restart.
    return zlib.crc32(key.encode("utf-8")) % size
