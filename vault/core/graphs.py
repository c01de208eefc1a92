"""Is a stage graph pure computation? The one check, for ``seal`` and the worker.

A package is only ONNX graphs and tensors, whoever built it. :func:`check_graph`
reads a serialised ``ModelProto`` (the bytes that go into, or came out of, a
package) and refuses, with an :class:`~vault.core.errors.UnsafeModelError`:

- **external data by path**: a tensor whose bytes live "elsewhere" names a
  file, and onnxruntime reads that file from the loading process's working
  directory. Only a top-level initializer may be external, and only into one
  of the package's own in-memory weight files (``files``: name -> size),
  within its bounds; any other location, relative or absolute, is refused;
- **custom-op domains**: an operator outside the standard ONNX and
  onnxruntime domains needs a custom-op library, i.e. code (a model-local
  function is fine: its body is checked like the graph);
- **values the wire cannot carry**: a pipeline input or output must be a
  tensor of a supported dtype, or a sequence, map or optional of those
  (:mod:`vault.core.protocol` carries them); sparse and opaque types are refused;
- **malformed bytes**: anything that is not a well-formed protobuf, or graphs
  nested more than :data:`MAX_DEPTH` deep.

It reads the protobuf wire format itself (no ``onnx`` import: the worker does
not load onnx, and a hand-made reader bounds its own recursion). It also
returns the graph's public signature as :mod:`~vault.core.protocol` value types.

Example::

    sig = check_graph(graph_bytes, {"pipeline.weights": 123456}, where="pipeline")
    sig.inputs   # [{"name": "x", "dtype": "float32", "shape": ["N", 3]}]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import UnsafeModelError
from .protowire import WireError
from .protowire import fields as _fields

__all__ = ["ALLOWED_DOMAINS", "MAX_DEPTH", "GraphSignature", "check_graph", "onnx_type_name"]

ALLOWED_DOMAINS = frozenset(
    {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}
)
MAX_DEPTH = 64  # subgraphs (If/Loop/Scan bodies) inside subgraphs

# TensorProto.DataType -> wire dtype name (vault.core.protocol)
_ELEM = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
    8: "string", 9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64",
    14: "complex64", 15: "complex128", 16: "bfloat16", 17: "float8_e4m3fn",
    18: "float8_e4m3fnuz", 19: "float8_e5m2", 20: "float8_e5m2fnuz", 21: "uint4", 22: "int4",
}  # fmt: skip
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def onnx_type_name(elem_type: int) -> str | None:
    """The wire dtype name of an ONNX element type (None: not carried)."""
    return _ELEM.get(elem_type)


@dataclass
class GraphSignature:
    """The public inputs and outputs of a checked graph."""

    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)


_Malformed = WireError  # the check's one failure: not well-formed protobuf


def _text(v: Any) -> str:
    try:
        return bytes(v).decode("utf-8")
    except (UnicodeDecodeError, TypeError):
        raise _Malformed from None


def _sub(wt: int, v: Any) -> memoryview:
    if wt != 2:
        raise _Malformed
    return v  # type: ignore[no-any-return]


# --- the walk -----------------------------------------------------------------------------


class _Checker:
    def __init__(self, files: Mapping[str, int], where: str) -> None:
        self.files = files
        self.where = where
        self.local_functions: set[tuple[str, str]] = set()

    def refuse(self, what: str) -> UnsafeModelError:
        return UnsafeModelError(f"{self.where}: {what}")

    def tensor(self, buf: memoryview, *, top_level: bool) -> str:
        name = ""
        location = False
        ext: dict[str, str] = {}
        for num, wt, v in _fields(buf):
            if num == 8:
                name = _text(_sub(wt, v))
            elif num == 14:
                location = v == _EXTERNAL
            elif num == 13:
                k = val = ""
                for n2, w2, v2 in _fields(_sub(wt, v)):
                    if n2 == 1:
                        k = _text(_sub(w2, v2))
                    elif n2 == 2:
                        val = _text(_sub(w2, v2))
                ext[k] = val
        if location or ext:
            loc = ext.get("location", "")
            if not top_level or loc not in self.files:
                raise self.refuse(
                    f"tensor {name!r} names external data at {loc!r}: a package holds its "
                    "weights itself (a path in a model is a file read), refused"
                )
            try:
                off, length = int(ext.get("offset", "0")), int(ext["length"])
            except (KeyError, ValueError):
                raise self.refuse(
                    f"tensor {name!r}: external data without a valid length"
                ) from None
            if off < 0 or length < 0 or off + length > self.files[loc]:
                raise self.refuse(f"tensor {name!r}: external data outside its weight file")
        return name

    def sparse(self, buf: memoryview) -> None:
        for num, wt, v in _fields(buf):
            if num in (1, 2):
                self.tensor(_sub(wt, v), top_level=False)

    def attribute(self, buf: memoryview, depth: int) -> None:
        for num, wt, v in _fields(buf):
            if num in (5, 10):  # t, tensors
                self.tensor(_sub(wt, v), top_level=False)
            elif num in (6, 11):  # g, graphs
                self.graph(_sub(wt, v), depth + 1)
            elif num in (22, 23):  # sparse_tensor, sparse_tensors
                self.sparse(_sub(wt, v))

    def node(self, buf: memoryview, depth: int) -> None:
        op = domain = ""
        attrs: list[memoryview] = []
        for num, wt, v in _fields(buf):
            if num == 4:
                op = _text(_sub(wt, v))
            elif num == 7:
                domain = _text(_sub(wt, v))
            elif num == 5:
                attrs.append(_sub(wt, v))
        if domain not in ALLOWED_DOMAINS and (domain, op) not in self.local_functions:
            raise self.refuse(
                f"operator {op!r} from custom domain {domain!r} is refused: a package may hold "
                "only standard ONNX and onnxruntime operators, no custom-op code"
            )
        for a in attrs:
            self.attribute(a, depth)

    def graph(self, buf: memoryview, depth: int) -> tuple[list[Any], list[Any], set[str]]:
        if depth > MAX_DEPTH:
            raise self.refuse(f"graphs nested more than {MAX_DEPTH} deep")
        inputs: list[memoryview] = []
        outputs: list[memoryview] = []
        inits: set[str] = set()
        for num, wt, v in _fields(buf):
            if num == 1:
                self.node(_sub(wt, v), depth)
            elif num == 5:
                inits.add(self.tensor(_sub(wt, v), top_level=depth == 0))
            elif num == 15:
                self.sparse(_sub(wt, v))
            elif num == 11:
                inputs.append(_sub(wt, v))
            elif num == 12:
                outputs.append(_sub(wt, v))
        return inputs, outputs, inits

    def function(self, buf: memoryview) -> None:
        for num, wt, v in _fields(buf):
            if num == 7:
                self.node(_sub(wt, v), 1)

    def model(self, buf: memoryview) -> GraphSignature:
        graph: memoryview | None = None
        functions: list[memoryview] = []
        for num, wt, v in _fields(buf):
            if num == 7:
                graph = _sub(wt, v)
            elif num == 25:
                functions.append(_sub(wt, v))
            elif num == 20:  # training_info: graphs onnxruntime does not run, checked alike
                for n2, w2, v2 in _fields(_sub(wt, v)):
                    if n2 in (1, 2):
                        self.graph(_sub(w2, v2), 1)
        if graph is None:
            raise _Malformed
        for f in functions:
            name = domain = ""
            for num, wt, v in _fields(f):
                if num == 1:
                    name = _text(_sub(wt, v))
                elif num == 10:
                    domain = _text(_sub(wt, v))
            self.local_functions.add((domain, name))
        for f in functions:
            self.function(f)
        inputs, outputs, inits = self.graph(graph, 0)
        sig = GraphSignature()
        for vi in inputs:
            d = self.value_info(vi)
            if d["name"] not in inits:
                sig.inputs.append(d)
        sig.outputs = [self.value_info(vi) for vi in outputs]
        return sig

    # -- types -----------------------------------------------------------------------

    def value_info(self, buf: memoryview) -> dict[str, Any]:
        name = ""
        tbuf: memoryview | None = None
        for num, wt, v in _fields(buf):
            if num == 1:
                name = _text(_sub(wt, v))
            elif num == 2:
                tbuf = _sub(wt, v)
        if tbuf is None:
            raise self.refuse(f"pipeline value {name!r} has no type")
        dtype, shape = self.type_(tbuf, name, 0)
        return {"name": name, "dtype": dtype, "shape": shape}

    def type_(self, buf: memoryview, name: str, depth: int) -> tuple[str, list[Any] | None]:
        if depth > 8:
            raise self.refuse(f"pipeline value {name!r}: type nested too deeply")
        for num, wt, v in _fields(buf):
            if num == 1:  # tensor
                elem, shape = 0, None
                for n2, w2, v2 in _fields(_sub(wt, v)):
                    if n2 == 1:
                        elem = v2
                    elif n2 == 2:
                        shape = self.shape(_sub(w2, v2))
                dtype = onnx_type_name(elem)
                if dtype is None:
                    raise self.refuse(
                        f"pipeline value {name!r} has element type {elem}, which the worker "
                        "channel does not carry"
                    )
                return dtype, shape
            if num in (4, 9):  # sequence, optional
                inner = None
                for n2, w2, v2 in _fields(_sub(wt, v)):
                    if n2 == 1:
                        inner = self.type_(_sub(w2, v2), name, depth + 1)
                if inner is None:
                    raise self.refuse(f"pipeline value {name!r}: a container without a type")
                kind = "sequence" if num == 4 else "optional"
                return f"{kind}<{inner[0]}>", inner[1] if kind == "optional" else None
            if num == 5:  # map
                key, value = 0, None
                for n2, w2, v2 in _fields(_sub(wt, v)):
                    if n2 == 1:
                        key = v2
                    elif n2 == 2:
                        value = self.type_(_sub(w2, v2), name, depth + 1)
                kname = onnx_type_name(key)
                if kname is None or value is None or "<" in value[0]:
                    raise self.refuse(f"pipeline value {name!r}: a map the channel cannot carry")
                return f"map<{kname},{value[0]}>", None
            if num in (7, 8):
                kind = "an opaque" if num == 7 else "a sparse tensor"
                raise self.refuse(
                    f"pipeline value {name!r} is {kind} value, which the worker channel does "
                    "not carry"
                )
        raise self.refuse(f"pipeline value {name!r} has no type")

    def shape(self, buf: memoryview) -> list[Any]:
        dims: list[Any] = []
        for num, wt, v in _fields(buf):
            if num != 1:
                continue
            dim: Any = None
            for n2, w2, v2 in _fields(_sub(wt, v)):
                if n2 == 1 and w2 == 0:
                    dim = v2 if v2 < 1 << 63 else v2 - (1 << 64)
                elif n2 == 2:
                    dim = _text(_sub(w2, v2))
            dims.append(dim)
        return dims


def check_graph(
    data: Any, files: Mapping[str, int] | None = None, *, where: str = "graph"
) -> GraphSignature:
    """Refuse a serialised ModelProto that is not pure computation (see the
    module docstring); return its public signature. ``files`` maps each
    in-memory weight file the graph may name to its size in bytes."""
    buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    checker = _Checker(files or {}, where)
    try:
        return checker.model(buf)
    except _Malformed:
        raise UnsafeModelError(f"{where}: not a well-formed ONNX model") from None
    except RecursionError:
        raise UnsafeModelError(f"{where}: graphs nested too deeply") from None


_INVENTED_DIM = re.compile(r"unk__\d+")  # onnx shape inference's names for dims it made up


def known_dims(shape: Sequence[Any] | None) -> list[Any] | None:
    """A shape as the project records and shows it: onnx's shape inference
    names a dim it could not relate to any input ``unk__0``, ``unk__1``...;
    that name means nothing to a reader or a client, so such a dim becomes
    unknown (None), like one inference left unnamed. A model's own dim names
    (``batch``) stay."""
    if shape is None:
        return None
    return [None if isinstance(d, str) and _INVENTED_DIM.fullmatch(d) else d for d in shape]


def shape_text(shape: Sequence[Any] | None) -> str:
    """A shape for people: ``[?, 4]`` (``?`` an unknown dim), ``[batch, 4]``,
    ``(unknown rank)``."""
    if shape is None:
        return "(unknown rank)"
    return "[" + ", ".join("?" if d is None else str(d) for d in known_dims(shape) or []) + "]"
