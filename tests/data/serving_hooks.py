"""Hooks for the serving-process tests: a slow request, and each kind of failure, on demand.

Request tags: `sleep` (seconds, in preprocess), `raise` (an error class of seldon_caffe.errors,
or RuntimeError for a hook bug).
"""

import time

from seldon_caffe import errors
from seldon_caffe.hooks import default_preprocess


def preprocess(payload, ctx):
    time.sleep(float(ctx.tags.get("sleep", 0)))
    kind = ctx.tags.get("raise")
    if kind == "RuntimeError":
        raise RuntimeError("asked to fail")
    if kind:
        raise getattr(errors, kind)(f"asked for {kind}")
    return default_preprocess(payload, ctx)
