"""config.txt, dl_inference's model description: what it accepts, and the errors that name the entry."""

from __future__ import annotations

import json

import pytest

from seldon_caffe.engines.description import (
    DescriptionError,
    SignatureEntry,
    find_signature_entry,
    load_description,
    parse_description,
    unknown_node_name,
)

GOOD = {
    "batch_size": 64,
    "input": [
        {"name": "image", "data_type": "TYPE_FP32", "dims": [-1, 224, 224, 3], "node_name": "serving_default_image:0"},
        {"name": "ids", "data_type": "DT_INT64", "dims": [-1, -1]},
    ],
    "output": [{"name": "probs", "data_type": "float", "dims": [-1, 1000], "node_name": "predictions"}],
}


def test_reads_every_field(tmp_path):
    path = tmp_path / "config.txt"
    path.write_text(json.dumps(GOOD))
    description = load_description(path)
    assert description.batch_size == 64 and description.source == path
    image, ids = description.inputs
    assert (image.name, image.dtype, image.dims, image.node_name) == (
        "image",
        "float32",
        (-1, 224, 224, 3),
        "serving_default_image:0",
    )
    assert (ids.dtype, ids.node_name) == ("int64", "ids")  # node_name defaults to the name
    assert description.outputs[0].dtype == "float32" and description.outputs[0].triton_type == "TYPE_FP32"
    assert image.example_shape(batch=4) == (4, 224, 224, 3) and ids.example_shape(batch=2, free=7) == (2, 7)


@pytest.mark.parametrize(
    "data_type, dtype",
    [("float32", "float32"), ("FP16", "float16"), ("TYPE_INT32", "int32"), ("DT_DOUBLE", "float64"), ("long", "int64")],
)
def test_every_dtype_spelling_dl_inference_files_used(data_type, dtype):
    raw = {"input": [{"name": "x", "data_type": data_type, "dims": [3]}], "output": [GOOD["output"][0]]}
    assert parse_description(raw).inputs[0].dtype == dtype


def _with(**changes):
    raw = json.loads(json.dumps(GOOD))
    for path, value in changes.items():
        target = raw
        *parents, last = path.split("__")
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        if value is None:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value
    return raw


@pytest.mark.parametrize(
    "raw, message",
    [
        ([1, 2], "expected a JSON object"),
        (_with(inputs=[]), "'inputs': unknown field; allowed: batch_size, input, output"),
        (_with(input=None), "'input': expected a non-empty list"),
        (_with(output=[]), "'output': expected a non-empty list"),
        (_with(batch_size=-1), "'batch_size': -1 is not a whole number >= 0"),
        (_with(batch_size="8"), "'batch_size'"),
        (_with(input__0__data_type="complex"), "'input[0].data_type': 'complex' is not a type"),
        (_with(input__1__dims=[-1, 0]), "'input[1].dims': [-1, 0]: expected a list of sizes"),
        (_with(input__0__dims=[1, 224, 224, 3]), "with batch_size 64 the first dim is the batch axis and must be -1"),
        (_with(input__0__name=""), "'input[0].name': required"),
        (_with(input__0__shape=[1]), "'input[0].shape': unknown field"),
        (_with(output__0__name="image"), "'image' is used twice"),
        (_with(output__0__node_name=5), "'output[0].node_name'"),
    ],
)
def test_mistakes_name_the_entry(raw, message):
    with pytest.raises(DescriptionError) as error:
        parse_description(raw)
    assert message in str(error.value)


def test_batch_size_zero_takes_dims_as_they_are():
    raw = _with(batch_size=0, input__0__dims=[1, 224, 224, 3])
    assert parse_description(raw).inputs[0].dims == (1, 224, 224, 3)


def test_unreadable_and_non_json_files(tmp_path):
    with pytest.raises(DescriptionError, match="cannot read the model description"):
        load_description(tmp_path / "missing.txt")
    bad = tmp_path / "config.txt"
    bad.write_text("{'batch_size': 1}")
    with pytest.raises(DescriptionError, match=r"config.txt: not JSON .*docs/convert.md"):
        load_description(bad)


# -- node_name: every spelling saved_model_cli and the signature print -------------------------

# A Keras 3 export as `saved_model_cli show` prints it (then the frozen graph's name, tf2onnx's).
INPUTS = [SignatureEntry("image", ("serving_default_image:0", "image:0"))]
OUTPUTS = [
    SignatureEntry("logits", ("StatefulPartitionedCall_1:0", "Identity:0")),
    SignatureEntry("probs", ("StatefulPartitionedCall_1:1", "Identity_1:0")),
]


@pytest.mark.parametrize("node_name", ["image", "image:0", "serving_default_image:0", "serving_default_image"])
def test_every_printed_input_spelling_finds_the_input(node_name):
    assert find_signature_entry(node_name, INPUTS) == INPUTS[0]


@pytest.mark.parametrize(
    "node_name, key",
    [
        ("probs", "probs"),
        ("probs:0", "probs"),
        ("StatefulPartitionedCall_1:1", "probs"),
        ("StatefulPartitionedCall_1:0", "logits"),
        ("StatefulPartitionedCall_1", "logits"),  # no `:N` is output 0, as in TensorFlow
        ("Identity_1:0", "probs"),
    ],
)
def test_every_printed_output_spelling_finds_the_output(node_name, key):
    assert find_signature_entry(node_name, OUTPUTS).key == key


def test_unknown_spellings_and_the_key_first():
    assert find_signature_entry("input_1:0", INPUTS) is None  # Keras 2's name: not in a Keras 3 export
    assert find_signature_entry("StatefulPartitionedCall_1:2", OUTPUTS) is None
    assert find_signature_entry("image:1", INPUTS) is None
    # A key wins over another entry's tensor of the same spelling.
    entries = [SignatureEntry("a", ("b:0",)), SignatureEntry("b", ("x:0",))]
    assert find_signature_entry("b", entries).key == "b"


def test_errors_name_the_file_the_user_passed(tmp_path):
    path = tmp_path / "resnet-description.json"
    path.write_text(json.dumps(_with(input__0__node_name="input_1:0")))
    description = load_description(path)
    assert description.where == str(path) and parse_description(GOOD).where == "config.txt"
    error = unknown_node_name(
        description, "input", description.inputs[0], "signature 'serving_default' of saved_model", INPUTS
    )
    assert str(error) == (
        f"{path}: input 'image': node_name 'input_1:0' is not in signature 'serving_default' of saved_model; "
        "its inputs are image (serving_default_image:0)"
    )
    path.write_text(json.dumps(_with(input__0__dims=[1, 224, 224, 3])))
    with pytest.raises(DescriptionError, match=r"resnet-description.json: 'input\[0\].dims'"):
        load_description(path)
