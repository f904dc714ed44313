"""Write the sample requests: held-out digits (never trained on) as the files a client sends.

    .venv/bin/python examples/vision/make_samples.py

sample.png            a 7, 128 px, black on white (what `make demo` sends)
samples/digit_4.jpg   a 4, 150 px colour JPEG, blue ink on cream paper
samples/digit_0.png   a 0, the dataset's own 8x8 grey image, light on dark
samples/digit_9.png   a 9, 80 px, black ink on a transparent canvas (RGBA)
samples/request.json  sample.png as a REST body: curl ... -d @samples/request.json
samples/not_an_image.txt   text, for the 400 a non-image gets
The file names carry the true label; the tests check the service agrees.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import digits_data  # noqa: E402

SAMPLES = HERE / "samples"


def main() -> None:
    SAMPLES.mkdir(exist_ok=True)
    _, _, digits, labels = digits_data.split()
    first = {int(label): digits[i] for i, label in reversed(list(enumerate(labels)))}
    black_on_white = {"height": 96, "margin": 1 / 6, "dark_on_light": True, "interpolation": cv2.INTER_CUBIC}
    (HERE / "sample.png").write_bytes(digits_data.render(first[7], grey=True, **black_on_white))
    colour = {"height": 110, "aspect": 0.9, "margin": 0.2, "ink": (150, 60, 10), "paper": (215, 240, 250)}
    jpeg = digits_data.render(first[4], interpolation=cv2.INTER_CUBIC, ext=".jpg", quality=90, **colour)
    (SAMPLES / "digit_4.jpg").write_bytes(jpeg)
    (SAMPLES / "digit_0.png").write_bytes(digits_data.render(first[0], grey=True))
    ink = cv2.imdecode(np.frombuffer(digits_data.render(first[9], height=64, margin=0.125, grey=True), np.uint8), 0)
    canvas = np.dstack([np.zeros_like(ink)] * 3 + [ink])  # black everywhere; alpha is the ink
    (SAMPLES / "digit_9.png").write_bytes(cv2.imencode(".png", canvas)[1].tobytes())
    body = {"binData": base64.b64encode((HERE / "sample.png").read_bytes()).decode(), "meta": {"tags": {"k": 3}}}
    (SAMPLES / "request.json").write_text(json.dumps(body) + "\n")
    (SAMPLES / "not_an_image.txt").write_text("a text file is not an image\n")


if __name__ == "__main__":
    main()
