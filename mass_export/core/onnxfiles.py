"""Where an ONNX file's tensors keep external data, read without the onnx package (the runtime may not import it).

protobuf (a dependency of onnxruntime) parses the file as unknown fields of an empty message; we walk only the
fields that can hold a TensorProto (field numbers from onnx.proto) and collect every ``external_data``
``location``. A tensor marked EXTERNAL without a location is reported as ``""``.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import empty_pb2
from google.protobuf.unknown_fields import UnknownFieldSet

LENGTH_DELIMITED = 2
# message -> {field number: kind of message it holds}
_FIELDS = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_TENSOR_DATA_LOCATION, _TENSOR_EXTERNAL_DATA, _EXTERNAL = 14, 13, 1

# The external-data location of a graph's constants that the runtime supplies when it opens the graph (ONNX
# Runtime's add_external_initializers), e.g. the first pass's theta_MT, made at load from the stored factors.
# Constants, unlike inputs fed on every call, are folded and pre-packed by ONNX Runtime: the first pass of
# ViT-B-16 ran 3.5% faster so (benchmarks/constants_vs_inputs.py). Not a file (angle brackets cannot name one on every system): a graph whose
# constant was not supplied fails to open rather than reading anything from disk.
SUPPLIED_AT_LOAD = "<supplied-at-load>"


def _fields(data: bytes):
    message = empty_pb2.Empty()
    message.ParseFromString(data)
    return UnknownFieldSet(message)


def _tensor_locations(data: bytes) -> list[str]:
    locations, external = [], False
    for field in _fields(data):
        if field.field_number == _TENSOR_DATA_LOCATION and field.data == _EXTERNAL:
            external = True
        elif field.field_number == _TENSOR_EXTERNAL_DATA and field.wire_type == LENGTH_DELIMITED:
            entry = {f.field_number: f.data for f in _fields(field.data) if f.wire_type == LENGTH_DELIMITED}
            if entry.get(1, b"") == b"location":
                locations.append(entry.get(2, b"").decode("utf-8", "replace"))
    return locations or ([""] if external else [])


def _walk(data: bytes, kind: str) -> list[str]:
    if kind == "tensor":
        return _tensor_locations(data)
    found = []
    for field in _fields(data):
        child = _FIELDS[kind].get(field.field_number)
        if child and field.wire_type == LENGTH_DELIMITED:
            found += _walk(field.data, child)
    return found


def external_data_locations(path: Path) -> list[str]:
    """Every external-data location named by tensors in the ONNX file (relative to the file's folder)."""
    return _walk(Path(path).read_bytes(), "model")
