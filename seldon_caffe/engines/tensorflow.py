"""TensorFlow SavedModels, as both `convert tensorflow` and the tensorflow runtime read them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def signature_def_tensors(
    saved_model: str | Path, signature: str, tags: Sequence[str] | None
) -> tuple[dict[str, str], dict[str, str]]:
    """The SignatureDef's {key: graph tensor} for inputs and outputs, the names `saved_model_cli
    show` prints (`serving_default_image:0`, `StatefulPartitionedCall_1:0`).

    A loaded signature function no longer knows them (its tensors are renamed), so they are read
    from saved_model.pb; TensorFlow must already be imported. Empty when there is none to read
    (a text saved_model.pbtxt): the keys alone still match."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = Path(saved_model) / "saved_model.pb"
    if not path.is_file():
        return {}, {}
    proto = saved_model_pb2.SavedModel.FromString(path.read_bytes())
    for meta_graph in proto.meta_graphs:
        if tags and set(meta_graph.meta_info_def.tags) != set(tags):
            continue
        if signature in meta_graph.signature_def:
            found = meta_graph.signature_def[signature]
            return {k: v.name for k, v in found.inputs.items()}, {k: v.name for k, v in found.outputs.items()}
    return {}, {}
