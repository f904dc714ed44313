"""How tests/test_caffe_wild.py compares two engines' answers to one public net.

Arrays: tests/test_conformance.py's relative error, max|a - b| / max|b|.

DetectionOutput ([1, 1, N, 7] rows of image, label, score, x1, y1, x2, y2): the same rows in
the same order; scores within the tolerance (absolute: they are in [0, 1]), boxes within it
as a relative error.

Values routed by a pooling mask (SegNet's Upsample puts each decoder value where the encoder's
MaxPool found its window's maximum): the answer is not continuous in float32 rounding. Where
a window's largest inputs tie within rounding (most often a window of ReLU zeros in which
one engine's pre-ReLU value rounds to a tiny positive), engines pick different argmaxes, and
the decoder value lands on a neighbouring pixel, which the decoder's convolutions spread.
Measured on segnet with `seldon-caffe weights` and the test's inputs: the float32 engines
flip 0 mask elements against each other at 224x224, 3 at 160x160 (prob differs by 1.4e-2
over 27% of the image), 2 at 224x288 (6.8e-2 over 0.8%); a float64 run of the same ONNX in
torch flips 1 element against all of them at 224x224 (7.1e-2). Outside the pixels those
flips can reach, every engine is within 8.3e-5 of every other and within 7.4e-5 of float64
(onnxruntime 2.7e-5, torch 3.0e-5, openvino 7.4e-5). So for such nets, `routed_error`
checks that (1) the pools' inputs agree within the tolerance, (2) every mask element the
engines disagree on picks between two inputs equal within the tolerance (a tie, not a bug),
and (3) the answer agrees within the tolerance at every pixel no disagreeing mask element
can reach (found by walking the layers after each Upsample: a convolution widens the reach by
its padding, an Upsample scales it), which must be at least MIN_COMPARED of the image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from test_conformance import REL_TOL, relative_error

from seldon_caffe.caffe import caffe_pb2

Arrays = Mapping[str, np.ndarray]
MIN_COMPARED = 0.5  # of a mask-routed answer's pixels, compared within the tolerance


def answer_error(blob: str, got: np.ndarray, want: np.ndarray, tolerance: float = REL_TOL) -> float:
    """The relative error of one answer; a DetectionOutput answer row by row."""
    assert got.shape == want.shape, f"{blob}: shape {got.shape}, expected {want.shape}"
    if blob == "detection_out":
        return detection_error(got, want, tolerance)
    return relative_error(got, want)


def detection_error(got: np.ndarray, want: np.ndarray, tolerance: float = REL_TOL) -> float:
    """caffe-ssd's rows: the same images and labels in the same order; the worst of the
    scores' absolute error and the boxes' relative error. Rows whose scores tie within the
    tolerance (same image and label) may come in either order: caffe-ssd sorts by score, and
    a float32 rounding decides such a tie (measured: face_ssd at 300x300 has two rows of
    scores 0.95673406 and 0.95673394, which openvino orders the other way round)."""
    rows, expected = got.reshape(-1, 7), want.reshape(-1, 7)
    assert rows.shape == expected.shape, f"{len(rows)} detections, expected {len(expected)}"
    assert np.array_equal(rows[:, :2], expected[:, :2]), "the rows' images and labels differ (order or content)"
    rows = rows[_tie_order(rows, expected, tolerance)]
    score = float(np.max(np.abs(rows[:, 2].astype(np.float64) - expected[:, 2]))) if len(rows) else 0.0
    return max(score, relative_error(rows[:, 3:], expected[:, 3:]))


def _tie_order(rows: np.ndarray, expected: np.ndarray, tolerance: float) -> np.ndarray:
    """An order of `rows` that pairs, within each run of tied expected rows (same image and
    label, each score within the tolerance of the previous), every row with the nearest box."""
    order = np.arange(len(rows))
    start = 0
    for end in range(1, len(expected) + 1):
        tied = end < len(expected) and np.array_equal(expected[end, :2], expected[end - 1, :2])
        if tied and abs(float(expected[end, 2]) - float(expected[end - 1, 2])) <= tolerance:
            continue
        free = list(range(start, end))
        for k in range(start, end):  # greedy: runs are a few rows long
            nearest = min(free, key=lambda j: float(np.max(np.abs(rows[j, 3:] - expected[k, 3:]))))
            order[k] = nearest
            free.remove(nearest)
        start = end
    return order


@dataclass(frozen=True)
class Routing:
    """A net whose Upsample layers place values by MaxPool masks: which blobs to ask for, and
    how to compare its answer (see the module docstring)."""

    definition: caffe_pb2.NetParameter
    answer: str  # the routed answer (SegNet's prob)

    @property
    def pools(self) -> dict[str, str]:
        """{mask blob: the pooled input blob} of every MaxPool whose mask an Upsample reads."""
        read = {
            layer.bottom[1] for layer in self.definition.layer if layer.type == "Upsample" and len(layer.bottom) > 1
        }
        return {
            layer.top[1]: layer.bottom[0]
            for layer in self.definition.layer
            if layer.type == "Pooling" and len(layer.top) > 1 and layer.top[1] in read
        }

    @property
    def blobs(self) -> tuple[str, ...]:
        """What to answer: the routed answer, the masks, the pools' inputs."""
        return (self.answer, *self.pools, *dict.fromkeys(self.pools.values()))

    def error(self, got: Arrays, want: Arrays, tolerance: float = REL_TOL) -> float:
        """The worst relative error of the pools' inputs and of the answer where no
        disagreeing mask element reaches; asserts the disagreements are ties."""
        errors = [relative_error(got[source], want[source]) for source in self.pools.values()]
        flips = {mask: self._flips(got, want, mask, tolerance) for mask in self.pools}
        reached = self._reach(flips)
        if reached is None:
            return max(errors + [relative_error(got[self.answer], want[self.answer])])
        compared = 1.0 - float(reached.mean())
        assert compared >= MIN_COMPARED, f"mask ties reach {1 - compared:.0%} of {self.answer}: too little compared"
        errors.append(relative_error(got[self.answer][..., ~reached], want[self.answer][..., ~reached]))
        return max(errors)

    def _flips(self, got: Arrays, want: Arrays, mask: str, tolerance: float) -> np.ndarray:
        """The (H, W) map of `mask` elements the two answers disagree on, each checked to be a
        tie: the pool's input at both picks equal within the tolerance of its scale."""
        source = want[self.pools[mask]]
        differ = got[mask] != want[mask]
        scale = float(np.max(np.abs(source)))
        for n, c, i, j in np.argwhere(differ):
            plane = source[n, c].reshape(-1)
            gap = abs(float(plane[int(got[mask][n, c, i, j])]) - float(plane[int(want[mask][n, c, i, j])]))
            assert gap <= tolerance * scale, (
                f"{mask}[{n}, {c}, {i}, {j}]: argmax {int(got[mask][n, c, i, j])} vs {int(want[mask][n, c, i, j])}, "
                f"whose inputs differ by {gap:.2e} (scale {scale:.2e}): not a tie"
            )
        return differ.any(axis=(0, 1))

    def _reach(self, flips: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The (H, W) pixels of the answer that a disagreeing mask element can change."""
        touched: dict[str, np.ndarray] = {}
        for layer in self.definition.layer:
            maps = [touched[b] for b in layer.bottom if b in touched]
            if layer.type == "Upsample":
                scale = layer.upsample_param.scale
                maps += [flips[b] for b in layer.bottom[1:] if b in flips and flips[b].any()]
                reach = np.kron(np.logical_or.reduce(maps), np.ones((scale, scale), bool)) if maps else None
            elif maps and layer.type == "Convolution":
                reach = _widen(np.logical_or.reduce(maps), layer.convolution_param)
            else:
                reach = np.logical_or.reduce(maps) if maps else None
            for top in layer.top:
                if reach is not None:
                    touched[top] = reach
        return touched.get(self.answer)


def _widen(reach: np.ndarray, conv: caffe_pb2.ConvolutionParameter) -> np.ndarray:
    """A stride-1 'same' convolution's reach: every pixel within its padding of one reached."""
    pad = conv.pad[0] if conv.pad else conv.pad_h
    kernel = conv.kernel_size[0] if conv.kernel_size else conv.kernel_h
    dilation = conv.dilation[0] if conv.dilation else 1
    stride = conv.stride[0] if conv.stride else 1
    assert stride == 1 and 2 * pad == (kernel - 1) * dilation, "only 'same' convolutions follow an Upsample here"
    padded = np.pad(reach, pad)
    wide = np.zeros_like(reach)
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            wide |= padded[dy : dy + reach.shape[0], dx : dx + reach.shape[1]]
    return wide
