"""The synthetic shapes data set: squares, circles and triangles on a 96x96 canvas.

Every scene holds 1-4 shapes, never touching, of random size (10-36 px across), position,
rotation and colour on a shaded, noisy ground; each shape's box is the tight box of the
pixels it covers, in pixels, as [xmin, ymin, xmax, ymax) (xmax = last column + 1). Scene
`i` of a split comes from its own seed (split, i), so any one image can be rebuilt alone,
and the held-out split shares no seed with the training split.

Labels follow caffe-ssd: 0 is the background, the shapes are 1..3 in CLASSES order.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

CANVAS = 96
CLASSES = ("square", "circle", "triangle")  # labels 1, 2, 3
SPLITS = {"train": 0, "held-out": 1}
SIZES = (10, 36)  # a shape's width before rotation, in pixels
MAX_OBJECTS = 4
GAP = 2  # pixels between two shapes' boxes: no shape hides part of another
MIN_CONTRAST = 90.0  # Euclidean BGR distance between a shape and the ground under it


class Scene(NamedTuple):
    image: np.ndarray  # CANVAS x CANVAS x 3 uint8, BGR
    boxes: np.ndarray  # N x 4 float32 pixels: xmin, ymin, xmax, ymax
    labels: np.ndarray  # N int64 in 1..len(CLASSES)


def scene(split: str, index: int) -> Scene:
    """Scene `index` of `split` ("train" or "held-out"): always the same image and boxes."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([SPLITS[split], index])
    image = _ground(rng)
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        placed = _place(rng, image, boxes)
        if placed is not None:
            boxes.append(placed[0])
            labels.append(placed[1])
    noise = rng.normal(0.0, 6.0, image.shape)
    final = np.clip(np.rint(image + noise), 0, 255).astype(np.uint8)
    return Scene(final, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64))


def scenes(split: str, count: int) -> list[Scene]:
    """Scenes 0..count-1 of `split`."""
    return [scene(split, i) for i in range(count)]


def png(image: np.ndarray) -> bytes:
    """An image as PNG bytes: what evaluate.py and the tests send to the service."""
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("OpenCV cannot encode the image as PNG")
    return encoded.tobytes()


def _ground(rng: np.random.Generator) -> np.ndarray:
    """A float BGR ground: a random colour shaded linearly in a random direction."""
    base = rng.uniform(30, 225, 3)
    slope = rng.uniform(-40, 40, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (
        np.cos(angle) * np.linspace(-0.5, 0.5, CANVAS)[None, :]
        + np.sin(angle) * np.linspace(-0.5, 0.5, CANVAS)[:, None]
    )
    return np.clip(base[None, None, :] + ramp[..., None] * slope[None, None, :], 0, 255)


def _place(rng: np.random.Generator, image: np.ndarray, boxes: list[np.ndarray]) -> tuple[np.ndarray, int] | None:
    """Draw one random shape at least GAP pixels clear of every earlier box;
    its tight box and label, or None after 20 tries (the scene then has fewer shapes)."""
    for _ in range(20):
        label = int(rng.integers(1, len(CLASSES) + 1))
        mask = _shape_mask(rng, label)
        rows, cols = np.nonzero(mask > 0.5)
        box = np.asarray([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float32)
        if all(_apart(box, other) for other in boxes):
            _paint(rng, image, mask)
            return box, label
    return None


def _shape_mask(rng: np.random.Generator, label: int) -> np.ndarray:
    """A CANVAS x CANVAS coverage mask (0..1, anti-aliased) of one shape inside the canvas."""
    size = rng.uniform(*SIZES)
    half = size / 2
    kind = CLASSES[label - 1]
    angle = rng.uniform(-15, 15) if kind == "square" else rng.uniform(0, 360)
    corners = {"square": 4, "triangle": 3}.get(kind, 0)
    radius = half * {"square": np.sqrt(2), "triangle": 2 / np.sqrt(3)}.get(kind, 1.0)  # centre to corner
    centre = rng.uniform(radius + 1, CANVAS - radius - 1, 2)
    shift = 4  # cv2 draws in 1/16 pixel steps: smooth edges at any position
    mask = np.zeros((CANVAS, CANVAS), np.uint8)
    if not corners:
        cv2.circle(
            mask, tuple(int(v) for v in np.rint(centre * 16)), int(round(half * 16)), 255, -1, cv2.LINE_AA, shift
        )
    else:
        turns = np.deg2rad(angle + 45 if corners == 4 else angle) + np.arange(corners) * 2 * np.pi / corners
        points = centre + radius * np.stack([np.cos(turns), np.sin(turns)], axis=1)
        cv2.fillPoly(mask, [np.rint(points * 16).astype(np.int32)], 255, cv2.LINE_AA, shift)
    return mask.astype(np.float32) / 255.0


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> None:
    """Fill the mask with a colour that stands out from the ground under it."""
    under = image[mask > 0.5].mean(axis=0)
    for _ in range(50):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - under) >= MIN_CONTRAST:
            break
    else:
        colour = np.where(under > 127, 0.0, 255.0)
    image *= 1 - mask[..., None]
    image += mask[..., None] * colour[None, None, :]


def _apart(a: np.ndarray, b: np.ndarray) -> bool:
    """True when boxes a and b are at least GAP pixels apart along x or along y."""
    return bool(a[0] >= b[2] + GAP or b[0] >= a[2] + GAP or a[1] >= b[3] + GAP or b[1] >= a[3] + GAP)


SAMPLE = ("held-out", 7, 2)  # sample.png: held-out scene 7 (a square, a triangle, a circle) at twice the size


def write_sample(path: str) -> None:
    """sample.png, the image README.md's requests send: a scene drawn larger than the net's input,
    so the answer's boxes show they are in the sent image's pixels."""
    split, index, factor = SAMPLE
    image = cv2.resize(scene(split, index).image, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    with open(path, "wb") as file:
        file.write(png(image))


if __name__ == "__main__":
    import pathlib

    write_sample(str(pathlib.Path(__file__).with_name("sample.png")))
