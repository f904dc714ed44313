"""Measure the shapes detector on held-out scenes, through the service's own code: mAP@0.5.

    .venv/bin/python examples/detection/evaluate.py [--runtime opencv|onnxruntime|openvino|torch]

Each of the first HELD_OUT scenes of shapes_data's "held-out" split (training never saw
that split) is sent as a PNG file through SeldonCaffeModel.predict, the same preprocess ->
runtime -> postprocess a request to the microservice takes, with the tag threshold=0 so
every detection the net keeps (DetectionOutput: score > 0.01, at most 20) is scored.
Per class, VOC's average precision: detections in descending score order, each a true
positive when it overlaps a not yet claimed box of its class by IoU >= 0.5, and the area
under the precision envelope over all recall points (VOC 2010+, "all points"); the mAP is
the mean over the three classes. Deterministic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import multibox  # noqa: E402
import shapes_data  # noqa: E402

from seldon_caffe.model import SeldonCaffeModel  # noqa: E402

HELD_OUT = 500
IOU = 0.5


def evaluate(model_dir: Path = HERE, runtime: str | None = None, count: int = HELD_OUT) -> dict[str, Any]:
    """mAP@0.5 and the AP per class over the first `count` held-out scenes."""
    served = SeldonCaffeModel(str(model_dir), runtime)
    served.load()
    try:
        truths, found = [], []
        for index in range(count):
            scene = shapes_data.scene("held-out", index)
            answer = served.predict(shapes_data.png(scene.image), names=[], meta={"tags": {"threshold": 0}})
            truths.append(scene)
            found.append(answer["detections"])
        result: dict[str, Any] = {name: average_precision(truths, found, name) for name in shapes_data.CLASSES}
        result["mAP"] = float(np.mean([result[name] for name in shapes_data.CLASSES]))
        result["runtime"] = served.model.name
        result["count"] = count
        return result
    finally:
        served.model.close()


def average_precision(truths: list[shapes_data.Scene], found: list[list[dict[str, Any]]], name: str) -> float:
    """VOC all-points AP of class `name`: `found[i]` are the detections for scene `truths[i]`."""
    label = shapes_data.CLASSES.index(name) + 1
    boxes = [scene.boxes[scene.labels == label] for scene in truths]
    claimed = [np.zeros(len(b), bool) for b in boxes]
    ranked = [(d["score"], i, np.asarray(d["box"])) for i, ds in enumerate(found) for d in ds if d["label"] == name]
    ranked.sort(key=lambda item: -item[0])  # stable: equal scores keep scene order
    hits = np.zeros(len(ranked), bool)
    for k, (_, image, box) in enumerate(ranked):
        overlaps = multibox.jaccard(box[None], boxes[image])[0]
        best = int(np.argmax(overlaps)) if len(overlaps) else -1
        if best >= 0 and overlaps[best] >= IOU and not claimed[image][best]:
            hits[k] = claimed[image][best] = True
    total = sum(len(b) for b in boxes)
    recall = np.cumsum(hits) / max(total, 1)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return area_under(recall, precision)


def area_under(recall: np.ndarray, precision: np.ndarray) -> float:
    """The area under the precision envelope (the best precision at any higher recall)."""
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


def report(result: dict[str, Any]) -> list[str]:
    """The figure lines README.md quotes (the tests check it still does)."""
    lines = [f"mAP@0.5 {result['mAP']:.3f}"]
    lines += [f"AP {name} {result[name]:.3f}" for name in shapes_data.CLASSES]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", help="serve with this runtime instead of model.yaml's")
    result = evaluate(runtime=parser.parse_args().runtime)
    print(f"held-out scenes: {result['count']}, runtime {result['runtime']}")
    print("\n".join(report(result)))


if __name__ == "__main__":
    main()
