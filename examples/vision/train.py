"""Train the digit classifier with real Caffe and write weights.caffemodel.

    nice .venv/bin/python examples/vision/train.py     # about a minute; needs `make caffe-env`

The training set is the train part of digits_data.split() (1347 digits; the 450 held-out
ones are never seen). Each digit is used as it is and as AUGMENT random image files
(random_style: any size, aspect, slant, polarity, colour, PNG or JPEG), and every one of
them goes through the service's own path, hooks.decode_image + hooks.digit_grid, before the net sees
it: the only way to be sure a served image is prepared exactly as in training. All
randomness is seeded, so a rerun writes the same weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import digits_data  # noqa: E402
from _train import load_hooks, train, training_net  # noqa: E402

SEED = 0
AUGMENT = 8  # random renderings per training digit, besides the digit itself
BATCH = 64
ITERATIONS = 2000
SOLVER = {"type": "Adam", "base_lr": 0.001, "momentum": 0.9, "momentum2": 0.999, "weight_decay": 0.0001}
SOLVER |= {"lr_policy": "step", "gamma": 0.3, "stepsize": 700}
DROPOUT = 'layer { name: "drop1" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.3 } }'
LOSS = 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }'


def training_set(hooks: object, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(N x 1 x 8 x 8 grids, N labels): every train digit, plain and rendered AUGMENT times."""
    rng = np.random.default_rng(seed)
    images, labels, _, _ = digits_data.split()
    grids, targets = [], []
    for digit, label in zip(images, labels, strict=True):
        grids.append(hooks.digit_grid(digit))
        for _ in range(AUGMENT):
            data = digits_data.render(digit, **digits_data.random_style(rng))
            grids.append(hooks.digit_grid(hooks.decode_image(data)))
        targets += [label] * (AUGMENT + 1)
    return np.stack(grids)[:, None].astype(np.float32), np.asarray(targets, np.float32)


def main() -> None:
    hooks = load_hooks(HERE / "hooks.py")
    grids, labels = training_set(hooks)
    print(f"{len(grids)} training grids from {len(grids) // (AUGMENT + 1)} digits", flush=True)
    deploy = HERE / "deploy.prototxt"
    net = training_net(deploy, BATCH, inputs={"label": []}, drop=["prob"], after={"relu3": DROPOUT}, loss=LOSS)
    data = {"data": grids, "label": labels}
    out = HERE / "weights.caffemodel"
    losses = train(net, deploy, data, solver=SOLVER, iterations=ITERATIONS, batch=BATCH, out=out, seed=SEED)
    print(f"final training loss {losses[-1]:.4f}; wrote {out} ({out.stat().st_size} bytes)")
    print("measure it: .venv/bin/python examples/vision/evaluate.py")


if __name__ == "__main__":
    main()
