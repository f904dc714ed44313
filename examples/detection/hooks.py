"""Hooks for the shapes detector: an image in, the shapes found and their boxes out.

preprocess   an image file (PNG/JPEG as binData, or base64 in strData) or an array
             (H x W x 3, BGR as OpenCV gives it, 0..255; or H x W grey), any size: resized
             to the net's 96 x 96, scaled to -1..1, as train.py prepares its scenes
postprocess  DetectionOutput's rows [image, label, score, xmin, ymin, xmax, ymax]
             (normalised) -> [{label, score, box}], best first, with the box in the pixels
             of the image that was sent, kept when score >= the request tag `threshold`
             (default 0.5)
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import cv2
import numpy as np
from shapes_data import CLASSES  # beside this file: the labels 1..3 (0 is the background)

from seldon_caffe import BadRequest
from seldon_caffe import decode_image as decode_file

SIDE = 96  # the net's input is 1 x 3 x 96 x 96
DEFAULT_THRESHOLD = 0.5
# The image is resized to 96 x 96 anyway; a bigger one costs memory and time, and a small
# file can declare a huge image (a flat PNG compresses ~1000:1), so the header is checked first.
MAX_PIXELS = 4096 * 4096


def preprocess(payload: Any, ctx: Any) -> np.ndarray:
    """The request's image -> the 1 x 3 x 96 x 96 float32 batch; its size is noted on ctx
    for postprocess, which answers in the sent image's pixels."""
    image = to_bgr(payload)
    ctx.image_size = image.shape[:2]  # ctx is per request: a note for postprocess
    return prepare(image)[None]


def postprocess(outputs: dict[str, np.ndarray], ctx: Any) -> dict[str, Any]:
    """The detections scoring at least the `threshold` tag, best first.

    caffe-ssd's DetectionOutput writes its rows label by label (and a row of -1s when it finds
    nothing): rows of other labels are dropped and the answer put in descending score order
    here, equal scores by label and box."""
    threshold = score_threshold(ctx.tags.get("threshold", DEFAULT_THRESHOLD))
    height, width = ctx.image_size
    scale = np.asarray([width, height, width, height], np.float64)
    found = []
    for row in outputs["detection_out"].reshape(-1, 7):
        label, score = int(row[1]), float(row[2])
        if 1 <= label <= len(CLASSES) and score >= threshold:
            box = np.clip(row[3:7].astype(np.float64) * scale, 0, scale)
            found.append(
                {"label": CLASSES[label - 1], "score": round(score, 6), "box": [round(float(v), 2) for v in box]}
            )
    found.sort(key=lambda detection: (-detection["score"], detection["label"], detection["box"]))
    return {"detections": found}


def prepare(image: np.ndarray) -> np.ndarray:
    """Any BGR uint8 image -> the net's 3 x 96 x 96 float32, BGR scaled to -1..1."""
    height, width = image.shape[:2]
    if (height, width) != (SIDE, SIDE):
        shrink = height * width > SIDE * SIDE
        image = cv2.resize(image, (SIDE, SIDE), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return (image.astype(np.float32) / np.float32(127.5) - 1.0).transpose(2, 0, 1)


def to_bgr(payload: Any) -> np.ndarray:
    """The request's image as H x W x 3 uint8 BGR; a clear 400 when it is not one."""
    if isinstance(payload, str):
        try:
            payload = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("strData must be a base64-encoded PNG or JPEG image") from None
    if isinstance(payload, (bytes, bytearray)):
        return decode_file(bytes(payload), cv2.IMREAD_COLOR, max_pixels=MAX_PIXELS)
    if isinstance(payload, (np.ndarray, list)):
        return from_array(np.asarray(payload))
    raise BadRequest(
        "expected an image file (PNG or JPEG) as binData, base64 in strData, or an H x W x 3 BGR array; "
        f"got {type(payload).__name__}"
    )


def from_array(array: np.ndarray) -> np.ndarray:
    """An H x W x 3 (or 1 x H x W x 3) BGR array, or H x W grey, with values 0..255 -> uint8 BGR."""
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    grey = array.ndim == 2
    if not (grey or (array.ndim == 3 and array.shape[2] == 3)) or min(array.shape[:2], default=0) < 1:
        raise BadRequest(f"an image array must be H x W x 3 (BGR) or H x W (grey); got shape {list(array.shape)}")
    if array.shape[0] * array.shape[1] > MAX_PIXELS:
        raise BadRequest(f"the image is {array.shape[1]}x{array.shape[0]}; this service takes at most 4096x4096")
    if array.dtype.kind not in "uif" or not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise BadRequest("an image array must hold numbers from 0 to 255")
    image = np.rint(array).astype(np.uint8)
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if grey else image


def score_threshold(value: Any) -> float:
    """The `threshold` tag as a number from 0 to 1, or a 400 saying what is allowed."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = float("nan")
    if isinstance(value, bool) or not 0.0 <= number <= 1.0:
        raise BadRequest(f"tag threshold must be a number from 0 to 1; got {value!r}")
    return number
