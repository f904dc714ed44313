"""Train the wide-and-deep click ranker with real Caffe and write weights.caffemodel.

    nice .venv/bin/python examples/ranking/train.py     # well under a minute; needs `make caffe-env`

Click logs: simulator.train_sessions() (5000 feed sessions x 20 listings of the training
users; the held-out users' sessions are never seen). Every session becomes rows through
hooks.parse_request + hooks.encode, the service's own feature code, and the net learns
click / no click with a sigmoid cross-entropy loss. Seeded throughout: a rerun writes the
same weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import simulator  # noqa: E402
from _train import Sparse, load_hooks, train, training_net  # noqa: E402

SEED = 0
BATCH = 256
ITERATIONS = 2500  # about 6 passes over the 100k training rows
SOLVER = {"type": "Adam", "base_lr": 0.002, "momentum": 0.9, "momentum2": 0.999, "weight_decay": 0.00002}
SOLVER |= {"lr_policy": "step", "gamma": 0.3, "stepsize": 1000}
LOSS = 'layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "logit" bottom: "label" top: "loss" }'


def training_rows(hooks: object) -> dict[str, Sparse | np.ndarray]:
    """The net's inputs for every impression of the training sessions, and the clicks."""
    wide, deep, clicks = [], [], []
    for session in simulator.train_sessions():
        rows = hooks.encode(*hooks.parse_request(session.request()))
        wide.append(rows["wide"])
        deep.append(rows["deep"])
        clicks.append(session.clicks)
    labels = np.concatenate(clicks).astype(np.float32)[:, None]
    return {"wide": Sparse.from_dense(wide), "deep": Sparse.from_dense(deep), "label": labels}


def main() -> None:
    hooks = load_hooks(HERE / "hooks.py")
    data = training_rows(hooks)
    print(f"{len(data['label'])} impressions, click rate {data['label'].mean():.3f}", flush=True)
    deploy = HERE / "deploy.prototxt"
    net = training_net(deploy, BATCH, inputs={"label": [1]}, drop=["score"], loss=LOSS)
    out = HERE / "weights.caffemodel"
    losses = train(net, deploy, data, solver=SOLVER, iterations=ITERATIONS, batch=BATCH, out=out, seed=SEED)
    print(f"final training loss {losses[-1]:.4f}; wrote {out} ({out.stat().st_size} bytes)")
    print("measure it: .venv/bin/python examples/ranking/evaluate.py")


if __name__ == "__main__":
    main()
