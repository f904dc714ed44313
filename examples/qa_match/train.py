"""Train the question encoder with real Caffe; write vocab.txt, deploy.prototxt's width, weights.caffemodel.

    nice .venv/bin/python examples/qa_match/train.py     # under a minute; needs `make caffe-env`

Data: faq.json's standard questions and `paraphrases` (42 x (1 + 13)), the knowledge base
the service also reads; the `held_out` paraphrases (3 per question) are never read here.
The vocabulary is every character unigram and bigram of the knowledge base. Each text is
used as written and as AUGMENT noisy copies (characters dropped, polite openings and
endings added: how customers really type), all turned into features by hooks.features,
the service's own code. The encoder learns as a cosine classifier over the 42 standard
questions: its embedding is scaled to unit length (Power, Reduction, Scale: plain Caffe
layers) before a linear layer and a softmax, so what it learns is direction, and the
service then matches by cosine between embeddings. The classifier is dropped after
training. Seeded: a rerun writes the same files.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _train import Sparse, load_hooks, train, training_net  # noqa: E402

SEED = 0
AUGMENT = 30
DROP_CHAR = 0.25
OPENINGS = ("", "", "", "请问", "你好，", "您好，请问", "我想问一下", "麻烦问下", "客服，", "问一下")
ENDINGS = ("", "", "", "？", "吗", "呢", "啊", "呀", "，谢谢", "，急")
BATCH = 64
ITERATIONS = 1500
SOLVER = {"type": "Adam", "base_lr": 0.001, "momentum": 0.9, "momentum2": 0.999, "weight_decay": 0.0005}
SOLVER |= {"lr_policy": "step", "gamma": 0.3, "stepsize": 600}
INPUT_DROPOUT = 'layer { name: "drop" type: "Dropout" bottom: "data" top: "data" dropout_param { dropout_ratio: 0.4 } }'
COSINE_SCALE = 16  # softmax over 16 x cosine: sharp enough to train, bounded like the service's scores
LOSS = """
layer { name: "square" type: "Power" bottom: "embedding" top: "square" power_param { power: 2 } }
layer { name: "sumsq" type: "Reduction" bottom: "square" top: "sumsq" reduction_param { operation: SUM axis: 1 } }
layer { name: "inv_norm" type: "Power" bottom: "sumsq" top: "inv_norm" power_param { power: -0.5 shift: 1e-6 } }
layer { name: "unit" type: "Scale" bottom: "embedding" bottom: "inv_norm" top: "unit" scale_param { axis: 0 } }
layer { name: "classify" type: "InnerProduct" bottom: "unit" top: "classify"
        inner_product_param { num_output: %d weight_filler { type: "xavier" } } }
layer { name: "sharpen" type: "Power" bottom: "classify" top: "sharpen" power_param { scale: %d } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "sharpen" bottom: "label" top: "loss" }
"""


def noisy(text: str, rng: np.random.Generator) -> str:
    """A customer's version of `text`: some characters gone, a greeting or an ending added."""
    kept = "".join(ch for ch in text if rng.random() >= DROP_CHAR) or text
    return str(rng.choice(OPENINGS)) + kept + str(rng.choice(ENDINGS))


def main() -> None:
    hooks = load_hooks(HERE / "hooks.py")
    faq = json.loads((HERE / "faq.json").read_text(encoding="utf-8"))
    texts = [(row, text) for row, entry in enumerate(faq) for text in [entry["question"], *entry["paraphrases"]]]
    grams = sorted({gram for _, text in texts for gram in hooks.ngrams(text)})
    (HERE / "vocab.txt").write_text("\n".join(grams) + "\n", encoding="utf-8")
    vocab = hooks.load_vocab(HERE / "vocab.txt")
    deploy = HERE / "deploy.prototxt"
    deploy.write_text(re.sub(r"dim: 1 dim: \d+", f"dim: 1 dim: {len(vocab)}", deploy.read_text(), count=1))

    rng = np.random.default_rng(SEED)
    blocks, labels = [], []
    for row, text in texts:
        variants = [text] + [noisy(text, rng) for _ in range(AUGMENT)]
        blocks.append(hooks.features(variants, vocab))
        labels += [row] * len(variants)
    data = {"data": Sparse.from_dense(blocks), "label": np.asarray(labels, np.float32)}
    print(f"{len(labels)} training rows, {len(vocab)} n-grams, {len(faq)} standard questions", flush=True)
    net = training_net(
        deploy, BATCH, inputs={"label": []}, after={"data": INPUT_DROPOUT}, loss=LOSS % (len(faq), COSINE_SCALE)
    )
    out = HERE / "weights.caffemodel"
    losses = train(net, deploy, data, solver=SOLVER, iterations=ITERATIONS, batch=BATCH, out=out, seed=SEED)
    print(f"final training loss {losses[-1]:.4f}; wrote {out} ({out.stat().st_size} bytes)")
    print("measure it: .venv/bin/python examples/qa_match/evaluate.py")


if __name__ == "__main__":
    main()
