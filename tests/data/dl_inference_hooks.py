"""Hooks written for 58.com's dl_inference: `f(x, **kwargs)`, no ctx argument."""

import numpy as np


def preprocess(x, **kwargs):
    return np.asarray(x, dtype=np.float32) / 255.0


def run_model(model, x, **kwargs):
    return model.run(x)


def postprocess(x, **kwargs):
    return {"argmax": np.argmax(x["prob"], axis=1).tolist(), "runtime": kwargs["config"].runtime}
