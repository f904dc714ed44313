"""What each Caffe runtime cannot do, as measured against real Caffe.

`KNOWN_GAPS[runtime][layer type]` says why a layer of that type fails or answers
differently under that runtime. Every entry is pinned by a strict expected failure in
tests/test_conformance.py (the forks' layers: tests/test_fork_layers.py): when a runtime
learns the layer, that test fails until the entry goes, so the table cannot go stale.
`seldon-caffe inspect` reports `find_gaps` for the net and runtime it would serve, so users
hear about a gap before they deploy.

A runtime added by another package (runtimes/registry.py) declares its own gaps, as
`register_runtime(..., gaps={layer type: reason})`; a runtime with none has no known gap.

Some gaps depend on the layer's parameters (OpenCV's LRN ignores `k`, but AlexNet's LRN
uses k = 1 and is served exactly): `_APPLIES` narrows those, so a net is only flagged
when its layers actually hit the gap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_ADAPTIVE_NMS = "adaptive NMS (nms_param.eta < 1) has no ONNX form: the conversion refuses the layer"

KNOWN_GAPS: dict[str, dict[str, str]] = {
    # OpenCV 4.11's Caffe importer (the `opencv` runtime).
    "opencv": {
        "ArgMax": "OpenCV's Caffe importer has no ArgMax layer (the net does not load)",
        "Bias": "OpenCV's Caffe importer has no Bias layer (the net does not load); Scale with bias_term works",
        "Clip": "OpenCV's Caffe importer has no Clip layer (the net does not load)",
        "Embed": "OpenCV's Caffe importer has no Embed layer (the net does not load)",
        "Reduction": "OpenCV's Caffe importer has no Reduction layer (the net does not load)",
        "Threshold": "OpenCV's Caffe importer has no Threshold layer (the net does not load)",
        "Tile": "OpenCV does not read Caffe's tile_param (the net does not load)",
        "LRN": "OpenCV ignores lrn_param.k and always uses k = 1: outputs differ when k != 1",
        "Log": "OpenCV ignores log_param base/scale/shift and computes ln(x): outputs differ",
        "MVN": "OpenCV adds eps to the variance where Caffe adds it to the standard deviation: outputs "
        "differ by about eps / (2 std) relative (flagged for eps >= 1e-5; the default 1e-9 is exact)",
        "ReLU6": "OpenCV ignores relu6_param.negative_slope and clips at 0: outputs differ when it is set",
        "Swish": "OpenCV ignores swish_param.beta and computes x * sigmoid(x): outputs differ when beta != 1",
        # caffe-ssd's layers (tests/test_fork_layers.py holds them to caffe_oracle/numpy_ssd.py).
        "Normalize": "OpenCV cannot scale per channel after a norm over C, H and W (across_spatial with "
        "channel_shared false): its forward fails",
        "Permute": "OpenCV needs permute_param.order to list every axis (caffe-ssd appends the unlisted ones): "
        "the net does not load",
        "PriorBox": "OpenCV clips priors when clip is unset (caffe-ssd does not), ignores img_size / img_h / img_w, "
        "keeps fractional min_size / max_size (caffe-ssd truncates them) and refuses a PriorBox without variance",
        # Its row order and zero padding differ from caffe-ssd's too; the opencv runtime undoes those.
        "DetectionOutput": "OpenCV refuses keep_top_k unset, code_type CORNER_SIZE and "
        "variance_encoded_in_target, and ignores nms_param.eta (adaptive NMS)",
        # The other forks' layers (tests/test_fork_layers.py holds them to caffe_oracle/numpy_forks.py).
        "BN": "OpenCV's Caffe importer has no BN layer (SegNet's or PSPNet's): the net does not load",
        "Upsample": "OpenCV's Caffe importer has no Upsample layer (SegNet's by a pooling mask, nor the YOLO "
        "ports' nearest-neighbour one): the net does not load",
        "DepthwiseConvolution": "OpenCV's Caffe importer has no DepthwiseConvolution layer: the net does not load",
        "Interp": "OpenCV's Interp ignores shrink_factor (alone, it makes an empty output: the net does not load) "
        "and pad_beg / pad_end (the output's size differs), and refuses interp_type and a second bottom",
        "ConvolutionDepthwise": "OpenCV takes ConvolutionDepthwise's output channels from num_output, which the "
        "fork ignores: without num_output the net does not load (and one other than the input's channels fails "
        "or answers wrong)",
    },
    # Real Caffe itself: nothing is missing. (Clip and Swish came after the 1.0 release;
    # Debian's 1.0.0+git20180821 has both, a pycaffe from the 1.0 tag or conda does not,
    # and then the worker's load fails with Caffe's "Unknown layer type".)
    "pycaffe": {},
    # Caffe converted to ONNX (seldon_caffe/caffe/to_onnx.py): every supported layer matches
    # real Caffe on both engines (tests/test_onnx_runtimes.py).
    "onnxruntime": {"DetectionOutput": _ADAPTIVE_NMS},
    "openvino": {"DetectionOutput": _ADAPTIVE_NMS},
    # The torch runtime serves that same ONNX conversion rebuilt in torch (caffe/to_torch.py).
    "torch": {"DetectionOutput": _ADAPTIVE_NMS},
}

# (runtime, layer type) -> does this layer, with its parameters, hit the gap?
_APPLIES: dict[tuple[str, str], Callable[[Any], bool]] = {
    ("opencv", "LRN"): lambda layer: abs(layer.lrn_param.k - 1.0) > 1e-6,
    ("opencv", "Log"): lambda layer: (
        (layer.log_param.base, layer.log_param.scale, layer.log_param.shift) != (-1.0, 1.0, 0.0)
    ),
    ("opencv", "MVN"): lambda layer: layer.mvn_param.normalize_variance and layer.mvn_param.eps >= 1e-5,
    ("opencv", "Swish"): lambda layer: abs(layer.swish_param.beta - 1.0) > 1e-6,
    ("opencv", "ReLU6"): lambda layer: layer.relu6_param.negative_slope != 0.0,
    ("opencv", "Normalize"): lambda layer: layer.norm_param.across_spatial and not layer.norm_param.channel_shared,
    ("opencv", "Permute"): lambda layer: (
        sorted(layer.permute_param.order) != list(range(len(layer.permute_param.order)))
    ),
    ("opencv", "PriorBox"): lambda layer: _opencv_prior_box_differs(layer.prior_box_param),
    ("opencv", "Interp"): lambda layer: _opencv_interp_differs(layer),
    ("opencv", "ConvolutionDepthwise"): lambda layer: not layer.convolution_param.HasField("num_output"),
    ("opencv", "DetectionOutput"): lambda layer: _opencv_detection_differs(layer.detection_output_param),
    **{
        (runtime, "DetectionOutput"): lambda layer: _adaptive_nms(layer)
        for runtime in ("onnxruntime", "openvino", "torch")
    },
}


def _opencv_detection_differs(p: Any) -> bool:
    """Whether OpenCV's DetectionOutput refuses or ignores these settings (see KNOWN_GAPS)."""
    from ..caffe import caffe_pb2

    corner_size = p.code_type == caffe_pb2.PriorBoxParameter.CORNER_SIZE
    return p.keep_top_k <= 0 or corner_size or p.variance_encoded_in_target or p.nms_param.eta < 1


def _opencv_prior_box_differs(p: Any) -> bool:
    """Whether OpenCV's PriorBox answers differently from caffe-ssd's for these settings."""
    sizes = [*p.min_size, *p.max_size]
    explicit_image = p.HasField("img_size") or p.HasField("img_h") or p.HasField("img_w")
    return not p.HasField("clip") or explicit_image or any(s != int(s) for s in sizes) or not p.variance


def _opencv_interp_differs(layer: Any) -> bool:
    """Whether OpenCV's Interp fails or answers differently from the fork's for this layer."""
    p = layer.interp_param
    cropped = bool(p.pad_beg or p.pad_end)
    return cropped or p.HasField("shrink_factor") or p.HasField("interp_type") or len(layer.bottom) > 1


def _adaptive_nms(layer: Any) -> bool:
    return layer.detection_output_param.nms_param.eta < 1


def find_gaps(runtime: str, layers: Any) -> list[tuple[str, str, str]]:
    """(layer name, layer type, reason) for each layer `runtime` cannot serve like Caffe.

    `layers` are LayerParameter messages (e.g. `CaffeNet.definition.layer`, upgraded). Besides
    the measured gaps, a type the engine cannot run at all counts (no ONNX form, a type we
    do not know), so `auto` only ever weighs engines that run the whole net.
    """
    from .registry import REGISTRY

    declared = REGISTRY[runtime].gaps if runtime in REGISTRY else {}  # another package's runtime's own
    gaps = {**declared, **KNOWN_GAPS.get(runtime, {})}
    found = []
    for layer in layers:
        reason = gaps.get(layer.type)
        applies = _APPLIES.get((runtime, layer.type))
        if reason and (applies is None or applies(layer)):
            found.append((layer.name, layer.type, reason))
        elif not reason and (missing := _cannot_run(runtime, layer.type)):
            found.append((layer.name, layer.type, missing))
    return found


# The Caffe engines a layer table speaks of, in the order docs/caffe-layers.md lists them.
CAFFE_ENGINES = ("pycaffe", "opencv", "onnxruntime", "openvino", "torch")


def layer_support(layer_types: Any) -> dict[str, dict[str, str | None]]:
    """{layer type: {engine: None if it runs the type like Caffe, else why not}}.

    What `seldon-caffe inspect` shows per layer type of a net, and docs/caffe-layers.md per
    type we know. A gap that depends on the layer's parameters (LRN's k on opencv) is listed
    here whatever the parameters; `find_gaps` narrows it for a given net.
    """
    return {
        kind: {engine: KNOWN_GAPS.get(engine, {}).get(kind) or _cannot_run(engine, kind) for engine in CAFFE_ENGINES}
        for kind in dict.fromkeys(layer_types)
    }


def depends_on_parameters(engine: str, kind: str) -> bool:
    """Whether `engine`'s gap for `kind` hits only some parameter values (LRN's k on opencv)."""
    return (engine, kind) in _APPLIES


# The engines that run a Caffe net through its ONNX conversion (torch rebuilds that ONNX).
_CONVERTED = ("onnxruntime", "openvino", "torch")


def _cannot_run(engine: str, kind: str) -> str | None:
    """Why `engine` cannot run layer type `kind` at all (None: it can, or no rule says not)."""
    from ..caffe.forks import FORK_SHAPE_RULES
    from ..caffe.shapes import SUPPORTED_LAYERS

    if engine == "pycaffe":
        if kind in FORK_SHAPE_RULES and kind != "Python":  # real BVLC Caffe 1.0 is the pycaffe we test
            return "not in BVLC Caffe 1.0: only in a pycaffe built from the fork that defines it (pycaffe_command)"
        return None  # the user's own Caffe build may know any type
    if kind not in SUPPORTED_LAYERS:
        return "a layer type seldon-caffe does not know: serve it with runtime pycaffe and your Caffe build"
    converted = _converted_types()
    if engine in _CONVERTED and converted is not None and kind not in converted:
        return "the Caffe -> ONNX converter has no form for it"
    return None


def _converted_types() -> set[str] | None:
    """The layer types the ONNX converter writes (None where onnx is not installed)."""
    try:
        from ..caffe.to_onnx import CONVERTERS
    except ImportError:
        return None
    return {*CONVERTERS, "Input", "MemoryData", "Python"}  # Python layers run between the engine's parts
