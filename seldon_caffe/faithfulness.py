"""How far an answer is from a reference answer: the one measure of the project.

    relative_error(got, want) = max |got - want| / max |want|

in float64 over the elements where the reference is finite (the scale at least 1e-12, so that
an all-zero reference still compares). `auto` (which engine is faithful), `convert --check`,
`inspect --accuracy`, the benchmarks and the tests all use it, so that one tolerance (1e-4
for fp32) means the same thing everywhere.

It never calls a mismatch faithful: the answer is infinitely far (math.inf) when the shapes
differ, when it has NaN or an infinity where the reference is finite (or a finite value where
the reference has NaN or an infinity), or when one is numeric and the other is not and they
differ. For named outputs, when the two share no output or the answer lacks one the reference
has: nothing compared is not "no difference".
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike

_TINY = 1e-12
_NUMERIC = "biuf"  # bool, ints, floats: what subtracts


def relative_error(got: ArrayLike, want: ArrayLike) -> float:
    """max|got - want| / max|want| (module docstring), math.inf for a mismatch."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return math.inf
    if got.dtype.kind not in _NUMERIC or want.dtype.kind not in _NUMERIC:
        return 0.0 if np.array_equal(got, want) else math.inf
    g, w = got.astype(np.float64), want.astype(np.float64)
    finite = np.isfinite(w)
    if not np.array_equal(np.isfinite(g), finite):
        return math.inf
    if not finite.all() and not np.array_equal(g[~finite], w[~finite], equal_nan=True):
        return math.inf  # +inf for -inf: the same places, not the same values
    if not finite.any():
        return 0.0
    difference = float(np.max(np.abs(g[finite] - w[finite])))
    return difference / max(float(np.max(np.abs(w[finite]))), _TINY)


def worst_relative_error(got: Mapping[str, ArrayLike], want: Mapping[str, ArrayLike]) -> float:
    """The largest relative_error over the reference's outputs; math.inf when the answer
    lacks one of them (and so when the two share none)."""
    if not want or not want.keys() <= got.keys():
        return math.inf
    return max(relative_error(got[name], want[name]) for name in want)
