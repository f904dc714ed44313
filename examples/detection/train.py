"""Train the shapes detector with torch and write deploy.prototxt + weights.caffemodel.

    nice .venv/bin/python examples/detection/train.py     # a few minutes on 2 CPU cores

The training set is scenes 0..TRAIN_SCENES-1 of shapes_data's "train" split (the held-out
split is never seen). Targets are made once, the way caffe-ssd's MultiBoxLoss makes them
(multibox.py: match each prior to a box, encode CENTER_SIZE against the prior and its
variance); each step mines the hardest negatives (3 per positive) as caffe-ssd's
MAX_NEGATIVE does and adds smooth-L1 box loss to softmax class loss, both divided by the
number of matched priors. Our own writer (seldon_caffe.caffe) then writes the Caffe form
(ssd_net.deploy_net), and OpenCV's own Caffe importer, which implements caffe-ssd's layers,
checks that the written net computes what the torch net computes. Seeded: on the same
machine and thread count a rerun writes the same weights.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import multibox  # noqa: E402
import shapes_data  # noqa: E402
import ssd_net  # noqa: E402

sys.path.insert(0, str(HERE.parent))
from _train import load_hooks  # noqa: E402

HOOKS = load_hooks(HERE / "hooks.py")  # images are prepared for the net by the service's own code

SEED = 0
TRAIN_SCENES = 6000
BATCH = 32
EPOCHS = 14
LEARNING_RATE = 2e-3
DECAY_AT = (0.65, 0.9)  # fractions of training after which the learning rate drops tenfold
THREADS = 2


def training_set() -> dict[str, Any]:
    """The training images (uint8 NHWC, numpy) and per-prior targets: class, box code, negative-eligible."""
    priors, variances = ssd_net.all_priors()
    if HOOKS.SIDE != ssd_net.INPUT or shapes_data.CANVAS != ssd_net.INPUT:
        raise SystemExit(f"hooks.SIDE, shapes_data.CANVAS and ssd_net.INPUT must agree: the net takes {ssd_net.INPUT}")
    images, classes, codes, negatives = [], [], [], []
    for index in range(TRAIN_SCENES):
        scene = shapes_data.scene("train", index)
        found = multibox.targets(priors, variances, scene.boxes / ssd_net.INPUT, scene.labels)
        images.append(scene.image)
        classes.append(found[0])
        codes.append(found[1])
        negatives.append(found[2])
    return {
        "images": np.stack(images),
        "classes": torch.from_numpy(np.stack(classes)),
        "codes": torch.from_numpy(np.stack(codes)),
        "negatives": torch.from_numpy(np.stack(negatives)),
    }


def multibox_loss(
    loc: torch.Tensor, conf: torch.Tensor, classes: torch.Tensor, codes: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    """caffe-ssd's MultiBoxLoss: smooth L1 over matched priors, softmax loss over matched priors
    and the mined negatives (per image, the NEG_POS_RATIO x positives eligible priors whose
    background loss is highest), divided by the number of matched priors (VALID)."""
    batch, count = classes.shape
    loc = loc.view(batch, count, 4)
    log_prob = F.log_softmax(conf.view(batch, count, ssd_net.NUM_CLASSES), dim=-1)
    positive = classes > 0
    matched = positive.sum().clamp(min=1)
    with torch.no_grad():
        background = (-log_prob[..., 0]).masked_fill(~negatives, -float("inf"))
        wanted = (positive.sum(1) * int(multibox.NEG_POS_RATIO)).clamp(max=negatives.sum(1))
        rank = background.argsort(dim=1, descending=True).argsort(dim=1)
        mined = rank < wanted[:, None]
    box_loss = F.smooth_l1_loss(loc[positive], codes[positive], reduction="sum", beta=1.0)
    class_loss = -log_prob.gather(-1, classes[..., None]).squeeze(-1)[positive | mined].sum()
    return (box_loss + class_loss) / matched


def train(data: dict[str, Any]) -> ssd_net.TinySSD:
    """Adam over EPOCHS passes in seeded random order, learning rate stepped down at DECAY_AT."""
    torch.manual_seed(SEED)
    model = ssd_net.TinySSD()
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    steps = EPOCHS * (TRAIN_SCENES // BATCH)
    milestones = [int(steps * fraction) for fraction in DECAY_AT]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones, gamma=0.1)
    order = np.random.default_rng(SEED)
    start = time.monotonic()
    for epoch in range(EPOCHS):
        losses = []
        permutation = torch.from_numpy(order.permutation(TRAIN_SCENES))
        for first in range(0, TRAIN_SCENES - BATCH + 1, BATCH):
            rows = permutation[first : first + BATCH]
            images = torch.from_numpy(np.stack([HOOKS.prepare(image) for image in data["images"][rows.numpy()]]))
            loss = multibox_loss(*model(images), data["classes"][rows], data["codes"][rows], data["negatives"][rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
        print(f"epoch {epoch + 1}/{EPOCHS}: loss {np.mean(losses):.3f} ({time.monotonic() - start:.0f} s)", flush=True)
    return model.eval()


def write(model: ssd_net.TinySSD) -> None:
    """deploy.prototxt and weights.caffemodel, written by seldon_caffe.caffe."""
    net = ssd_net.deploy_net(model)
    (HERE / "deploy.prototxt").write_bytes(net.prototxt_bytes())
    (HERE / "weights.caffemodel").write_bytes(net.caffemodel_bytes())


def check_with_opencv(model: ssd_net.TinySSD, count: int = 8) -> float:
    """OpenCV runs the written files; its mbox_loc, softmaxed scores and priors must be the
    torch net's and multibox.py's. Returns the largest difference seen."""
    net = cv2.dnn.readNetFromCaffe(str(HERE / "deploy.prototxt"), str(HERE / "weights.caffemodel"))
    batch = np.stack([HOOKS.prepare(shapes_data.scene("held-out", i).image) for i in range(count)])
    net.setInput(batch)
    loc, conf, priors = net.forward(["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"])
    with torch.no_grad():
        want_loc, logits = model(torch.from_numpy(batch))
    want_conf = torch.softmax(logits.view(count, -1, ssd_net.NUM_CLASSES), dim=-1).flatten(1)
    boxes, variances = ssd_net.all_priors()
    worst = max(
        float(np.abs(loc - want_loc.numpy()).max()),
        float(np.abs(conf - want_conf.numpy()).max()),
        float(np.abs(priors[0, 0] - boxes.ravel()).max()),
        float(np.abs(priors[0, 1] - variances.ravel()).max()),
    )
    if worst > 1e-4:
        raise SystemExit(
            f"OpenCV's run of the written net differs from the torch net by {worst:.2g} (expected <= 1e-4)"
        )
    return worst


def main() -> None:
    torch.set_num_threads(THREADS)
    data = training_set()
    positives = (data["classes"] > 0).sum(1).float().mean()
    print(f"{TRAIN_SCENES} training scenes, {positives:.1f} matched priors per scene", flush=True)
    model = train(data)
    write(model)
    worst = check_with_opencv(model)
    size = (HERE / "weights.caffemodel").stat().st_size
    print(f"wrote deploy.prototxt and weights.caffemodel ({size} bytes); OpenCV agrees within {worst:.1g}")
    print("measure it: .venv/bin/python examples/detection/evaluate.py")


if __name__ == "__main__":
    main()
