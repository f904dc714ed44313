"""The digits data (scikit-learn's copy of UCI optdigits), its held-out split, and images of it.

Every digit is 8x8 with 17 grey levels (0..16), light ink on a dark ground, the digit's
height filling all 8 rows. Clients send real image files instead, so training and
evaluation turn digits into files (`render`) and back through the service's own
preprocess: the model only ever learns from what the service will actually feed it.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SPLIT_SEED = 0
HELD_OUT = 0.25  # 450 of the 1797 digits, stratified by label

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def split() -> Split:
    """(train images, train labels, held-out images, held-out labels); always the same split."""
    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.images, digits.target, test_size=HELD_OUT, random_state=SPLIT_SEED, stratify=digits.target
    )
    return train_x, train_y, test_x, test_y


def render(
    digit: np.ndarray,
    *,
    height: int = 8,
    aspect: float = 1.0,
    margin: float = 0.0,
    angle: float = 0.0,
    dark_on_light: bool = False,
    ink: tuple[int, int, int] = (255, 255, 255),
    paper: tuple[int, int, int] = (0, 0, 0),
    interpolation: int = cv2.INTER_NEAREST,
    ext: str = ".png",
    quality: int = 95,
    grey: bool = False,
) -> bytes:
    """One 8x8 digit as an image file: scaled to `height` pixels (width times `aspect`),
    `margin` (a fraction of the height) of paper around it, turned by `angle` degrees,
    drawn in `ink` (BGR) on `paper`. `dark_on_light` swaps the defaults to black on white."""
    if dark_on_light and ink == (255, 255, 255) and paper == (0, 0, 0):
        ink, paper = (0, 0, 0), (255, 255, 255)
    width = max(1, round(height * aspect))
    alpha = cv2.resize((digit / 16.0).astype(np.float32), (width, height), interpolation=interpolation)
    pad = round(margin * height)
    alpha = cv2.copyMakeBorder(np.clip(alpha, 0, 1), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    if angle:
        h, w = alpha.shape
        turn = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        alpha = cv2.warpAffine(alpha, turn, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    colour = np.asarray(paper, np.float32) * (1 - alpha[..., None]) + np.asarray(ink, np.float32) * alpha[..., None]
    image = np.clip(np.rint(colour), 0, 255).astype(np.uint8)
    if grey:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else []
    ok, encoded = cv2.imencode(ext, image, params)
    if not ok:
        raise ValueError(f"OpenCV cannot encode {ext}")
    return encoded.tobytes()


def random_style(rng: np.random.Generator) -> dict[str, Any]:
    """A random way a client might photograph or draw a digit: size, aspect, margin, slant,
    polarity, colours, resampling and file format. Training sees many of these per digit."""
    dark = bool(rng.random() < 0.5)
    light = tuple(int(v) for v in rng.integers(170, 256, 3))
    dim = tuple(int(v) for v in rng.integers(0, 90, 3))
    ink, paper = (dim, light) if dark else (light, dim)
    return {
        "height": int(rng.integers(8, 97)),
        "aspect": float(rng.uniform(0.8, 1.2)),
        "margin": float(rng.uniform(0.0, 0.5)),
        "angle": float(rng.uniform(-8, 8)),
        "ink": ink,
        "paper": paper,
        "interpolation": int(rng.choice([cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_CUBIC])),
        "ext": ".jpg" if rng.random() < 0.5 else ".png",
        "quality": int(rng.integers(60, 96)),
        "grey": bool(rng.random() < 0.3),
    }


# The two ways evaluate.py sends every held-out digit: the dataset's own 8x8 image, and
# a larger colour JPEG with dark ink on light paper (sizes vary per digit, seeded).
def eval_styles(index: int) -> dict[str, dict[str, Any]]:
    rng = np.random.default_rng(1000 + index)
    return {
        "png, 8x8 grey, light on dark": {"grey": True},
        "jpeg, 40-200 px colour, dark on light": {
            "height": int(rng.integers(40, 201)),
            "margin": 0.25,
            "ink": (110, 40, 20),
            "paper": (225, 238, 245),
            "interpolation": cv2.INTER_CUBIC,
            "ext": ".jpg",
            "quality": 90,
        },
    }
