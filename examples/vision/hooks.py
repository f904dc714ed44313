"""Hooks for the digit classifier: an image file in, the k most likely digits out.

This example is about preprocess and postprocess. The net was trained on scikit-learn's
digits: 8x8, light ink on a dark ground, the digit's height filling the grid, 17 grey
levels. Clients send whatever they have (a PNG or JPEG of any size, colour or grey,
usually dark ink on white paper), so preprocess must turn that into the same 8x8 grid:
decode with OpenCV, go grey, put the ink bright, crop to the digit, scale its height to 8
keeping its aspect, and stretch the levels to 0..1. `digit_grid` is that whole
normalisation; train.py builds every training example with it, so a served image is
treated exactly as the training images were.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import cv2
import numpy as np

from seldon_caffe import BadRequest
from seldon_caffe import decode_image as decode_file

GRID = 8  # the net's input is 1x1x8x8
INK = 0.2  # a pixel at 20% of the contrast range counts as ink when finding the digit
DEFAULT_K = 3
# The digit ends up 8x8: more pixels than this add nothing but memory and time, and a small
# file can declare a huge image (a flat PNG compresses ~1000:1), so the header is checked first.
MAX_PIXELS = 4096 * 4096


def preprocess(payload: Any, ctx: Any) -> np.ndarray:
    """binData (the file's bytes) or strData (the file in base64) -> a 1x1x8x8 float32 batch."""
    return digit_grid(decode_image(payload))[None, None]


def postprocess(outputs: dict[str, np.ndarray], ctx: Any) -> dict[str, Any]:
    """The top k labels with their probabilities; k comes from the request tag `k` (default 3)."""
    k = top_k(ctx.tags.get("k", DEFAULT_K))
    prob = outputs["prob"][0]
    best = np.argsort(-prob, kind="stable")[:k]
    return {"predictions": [{"label": int(d), "probability": round(float(prob[d]), 6)} for d in best]}


def decode_image(payload: Any) -> np.ndarray:
    """The request's image as a 2-D grey array; a clear 400 when it is not an image, or is
    larger than MAX_PIXELS (4096x4096).

    Colour goes grey by luminance. A PNG with transparency is read by its alpha channel:
    a digit drawn on a transparent canvas has no other contrast (ink and "paper" can both
    be black)."""
    if isinstance(payload, str):
        try:
            payload = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("strData must be a base64-encoded PNG or JPEG image") from None
    if not isinstance(payload, bytes):
        raise BadRequest(
            f"expected an image file (PNG or JPEG) as binData, or base64 in strData; got {type(payload).__name__}"
        )
    image = decode_file(payload, cv2.IMREAD_UNCHANGED, max_pixels=MAX_PIXELS)
    if image.dtype.kind == "f" and not np.isfinite(image).all():  # float TIFFs can hold NaN/Inf
        raise BadRequest("the image holds NaN or infinite pixel values: no digit to classify")
    if image.ndim == 3 and image.shape[2] == 4 and image[..., 3].min() < image[..., 3].max():
        return image[..., 3]  # drawn on a transparent canvas: the ink is where it is opaque
    if image.ndim == 3:
        return cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2GRAY)
    return image


def digit_grid(grey: np.ndarray) -> np.ndarray:
    """Any grey image of one digit -> the 8x8 float32 grid the net was trained on (0..1).

    Polarity: the digits are light on dark, photos usually dark on light; the image's border
    is ground, so when the border is brighter than mid-range the image is inverted.
    Aspect: every training digit fills the grid's height and is centred across, so the ink's
    bounding box is scaled to 8 rows, its width by the same factor, and centred.
    """
    image = grey.astype(np.float32)
    low, high = float(image.min()), float(image.max())
    if high - low < 1e-6:
        raise BadRequest("the image is blank (one flat colour): no digit to classify")
    image = (image - low) / (high - low)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    if border.mean() > 0.5:
        image = 1.0 - image
    rows = np.flatnonzero((image > INK).any(axis=1))
    cols = np.flatnonzero((image > INK).any(axis=0))
    digit = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = digit.shape
    new_width = min(GRID, max(1, round(width * GRID / height)))
    resized = cv2.resize(digit, (new_width, GRID), interpolation=cv2.INTER_AREA)
    grid = np.zeros((GRID, GRID), np.float32)
    left = (GRID - new_width) // 2
    grid[:, left : left + new_width] = resized
    return grid / max(float(grid.max()), 1e-6)


def top_k(value: Any) -> int:
    """The `k` tag as an int in 1..10, or a 400 saying what is allowed."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON integer like 10**400
        number = float("nan")
    if isinstance(value, bool) or not number.is_integer() or not 1 <= number <= 10:
        raise BadRequest(f"tag k must be a whole number from 1 to 10; got {value!r}")
    return int(number)
