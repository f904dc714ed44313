"""Measure the digit classifier on the 450 held-out digits, through the service's own code.

    .venv/bin/python examples/vision/evaluate.py [--runtime opencv|pycaffe|onnxruntime]

Each held-out digit (digits_data.split(); training never saw them) is sent as an image
file in two forms (digits_data.eval_styles): the dataset's own 8x8 grey image, and a
40-200 px colour JPEG with dark ink on light paper. Each file goes through
SeldonCaffeModel.predict, the same preprocess -> runtime -> postprocess a request to the
microservice takes, and the top label is compared with the truth. Deterministic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import digits_data  # noqa: E402

from seldon_caffe.model import SeldonCaffeModel  # noqa: E402


def evaluate(model_dir: Path = HERE, runtime: str | None = None) -> dict[str, Any]:
    """Top-1 accuracy on the held-out digits per form of file, and over both forms."""
    served = SeldonCaffeModel(str(model_dir), runtime)
    served.load()
    try:
        _, _, digits, labels = digits_data.split()
        hits: dict[str, list[bool]] = {}
        for index, (digit, label) in enumerate(zip(digits, labels, strict=True)):
            for style, options in digits_data.eval_styles(index).items():
                answer = served.predict(digits_data.render(digit, **options), names=[], meta={})
                hits.setdefault(style, []).append(answer["predictions"][0]["label"] == label)
        result: dict[str, Any] = {style: sum(h) / len(h) for style, h in hits.items()}
        every = [hit for h in hits.values() for hit in h]
        result["all"] = sum(every) / len(every)
        result["runtime"] = served.model.name
        result["count"] = len(digits)
        return result
    finally:
        served.model.close()


def report(result: dict[str, Any]) -> list[str]:
    """The figure lines README.md quotes (the tests check it still does)."""
    return [f"top-1 accuracy {value:.1%}  ({style})" for style, value in result.items() if isinstance(value, float)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", help="serve with this runtime instead of model.yaml's")
    result = evaluate(runtime=parser.parse_args().runtime)
    print(f"held-out digits: {result['count']}, runtime {result['runtime']}")
    print("\n".join(report(result)))


if __name__ == "__main__":
    main()
