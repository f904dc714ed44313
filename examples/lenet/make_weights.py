"""Write weights.caffemodel: seeded random (Xavier-scaled) weights for deploy.prototxt.

The walk-through model shows the mechanics, not accuracy (examples/vision is trained), so
its weights are random but reproducible: `python examples/lenet/make_weights.py`.
"""

from pathlib import Path

import numpy as np

from seldon_caffe.caffe import PARAMETRISED_LAYERS, load_caffe_net

HERE = Path(__file__).resolve().parent


def main(seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    net = load_caffe_net(HERE / "deploy.prototxt")
    for layer in net.layers:
        if layer.type not in PARAMETRISED_LAYERS:
            continue
        weight_shape, *rest = net.weight_shapes(layer.name)
        fan_in = int(np.prod(weight_shape[1:]))
        weights = rng.uniform(-1, 1, weight_shape) * np.sqrt(3.0 / fan_in)
        net.set_weights(layer.name, [weights, *(rng.normal(0, 0.01, s) for s in rest)])
    (HERE / "weights.caffemodel").write_bytes(net.caffemodel_bytes())


if __name__ == "__main__":
    main()
