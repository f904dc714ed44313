"""Hooks for the LeNet walk-through: images or arrays in, the top classes out.

preprocess takes what a client is likely to send: an image file (binData, or base64 in
strData) or an array already shaped like the input. postprocess turns the 10 probabilities
into the three most likely digits.
"""

import base64
import binascii

import cv2
import numpy as np

from seldon_caffe import BadRequest, decode_image

MAX_PIXELS = 4096 * 4096  # the image is shrunk to 28x28: anything larger is no better, only slower


def preprocess(payload, ctx):
    if isinstance(payload, str):  # strData: a base64-encoded image
        try:
            payload = base64.b64decode(payload, validate=True)
        except binascii.Error:
            raise BadRequest("strData must be a base64-encoded PNG or JPEG image") from None
    if isinstance(payload, bytes):
        # decode_image reads the header first: a small file declaring a huge image is a 400.
        image = decode_image(payload, cv2.IMREAD_GRAYSCALE, max_pixels=MAX_PIXELS)
        image = cv2.resize(image, (28, 28), interpolation=cv2.INTER_AREA)
        return (image.astype(np.float32) / 255.0)[None, None]
    try:
        return np.asarray(payload, dtype=np.float32)  # an ndarray of shape (N, 1, 28, 28)
    except (TypeError, ValueError, OverflowError) as exc:  # strings, ragged lists, objects
        raise BadRequest(f"expected numbers shaped (N, 1, 28, 28) or an image file; {exc}") from None


def postprocess(outputs, ctx):
    # A dict goes back as jsonData: one list of the three best guesses per image.
    top = np.argsort(-outputs["prob"], axis=1)[:, :3]
    guesses = [
        [{"digit": int(d), "probability": float(row[d])} for d in best]
        for row, best in zip(outputs["prob"], top, strict=True)
    ]
    return {"predictions": guesses}
