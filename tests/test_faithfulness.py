"""seldon_caffe.faithfulness: the one measure of how far an answer is from a reference, and
each mismatch it refuses to call faithful."""

from __future__ import annotations

import math

import numpy as np
import pytest

from seldon_caffe.faithfulness import relative_error, worst_relative_error

WANT = np.array([[0.5, -2.0], [1.0, 0.0]], dtype=np.float32)


def test_the_measure_is_the_worst_difference_over_the_references_scale() -> None:
    got = WANT + np.array([[0.0, 0.01], [-0.02, 0.0]], dtype=np.float32)
    assert relative_error(got, WANT) == pytest.approx(0.02 / 2.0, rel=1e-5)
    assert relative_error(WANT, WANT) == 0.0
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0  # an all-zero reference compares
    assert relative_error(np.full(3, 1e-3), np.zeros(3)) == pytest.approx(1e-3 / 1e-12)


@pytest.mark.parametrize(
    ("got", "why"),
    [
        (WANT.reshape(4), "another shape"),
        (WANT[:1], "fewer rows"),
        (np.where(WANT == 1.0, np.nan, WANT), "NaN where the reference is finite"),
        (np.where(WANT == 1.0, np.inf, WANT), "an infinity where the reference is finite"),
        (np.array([["a", "b"], ["c", "d"]]), "text against numbers"),
    ],
)
def test_a_mismatch_is_infinitely_far(got: np.ndarray, why: str) -> None:
    assert relative_error(got, WANT) == math.inf, why


def test_non_finite_references_must_be_matched_in_place_and_kind() -> None:
    want = np.array([np.nan, np.inf, 1.0])
    assert relative_error(np.array([np.nan, np.inf, 1.0 + 1e-6]), want) == pytest.approx(1e-6)
    assert relative_error(np.array([0.0, np.inf, 1.0]), want) == math.inf  # finite where NaN
    assert relative_error(np.array([np.nan, -np.inf, 1.0]), want) == math.inf  # the other infinity
    assert relative_error(np.array([np.nan, np.inf]), np.array([np.nan, np.inf])) == 0.0


def test_named_outputs_take_the_worst_and_refuse_what_cannot_be_compared() -> None:
    want = {"prob": WANT, "feat": np.ones(2)}
    got = {"prob": WANT * 1.001, "feat": np.ones(2), "extra": np.zeros(1)}
    assert worst_relative_error(got, want) == pytest.approx(0.001, rel=1e-3)
    assert worst_relative_error({"other": WANT}, {"prob": WANT}) == math.inf  # no output shared
    assert worst_relative_error({"prob": WANT}, want) == math.inf  # one the reference has is missing
    assert worst_relative_error({}, {}) == math.inf  # nothing compared is not "no difference"
