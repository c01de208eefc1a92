"""Weights handed to onnxruntime without a copy: OrtValues over the plaintext.

A sealed graph keeps its large initializers outside the graph: each names
an in-memory "file" of the decrypted payload, an offset and a length
(``external_data``). :func:`external_initializers` reads those references
from the graph's bytes and returns, per initializer, a numpy view of the
decrypted buffer at that place, shaped and typed as the graph declares it.
:func:`add_to_options` hands each view to onnxruntime as an ``OrtValue``
(``SessionOptions.add_initializer``: onnxruntime uses the caller's memory
as is, and that memory must outlive the session; ``add_external_initializers``
and ``add_external_initializers_from_files_in_memory`` both copy, measured:
wiping the buffer after the session exists does not change their results), so the decrypted buffer
is the only copy of the weights in the worker. Whoever builds the session
keeps the views (and the buffer) alive until the session is dropped, and
wipes the buffer then.

The graph is read with a small protobuf walker (only ``ModelProto.graph``
→ ``GraphProto.initializer`` → the TensorProto fields below), not with the
``onnx`` package, whose import alone costs more than a small model's whole
start-up.

Example::

    graph2, views = zero_copy_graph(graph_bytes, plain.files)
    keep = add_to_options(so, views)
    sess = ort.InferenceSession(graph2, so)   # keep and views must outlive sess
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from vault.core.errors import ConfigError
from vault.core.protowire import fields as _fields
from vault.core.protowire import spans as _spans
from vault.core.protowire import varint as _varint

__all__ = ["external_initializers", "add_to_options", "zero_copy_graph"]

# TensorProto.DataType -> numpy (only fixed-size types can live in a view)
_DTYPES: dict[int, Any] = {
    1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32,
    7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32,
    13: np.uint64, 14: np.complex64, 15: np.complex128,
}  # fmt: skip
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
# onnxruntime refuses caller memory for tiny tensors (shape inference reads
# them): a graph with one goes the in-memory-files route, which copies. It is
# all or nothing: one initializer left to that route makes onnxruntime read
# the whole file. (Sealing externalises only large tensors.)
_MIN_BYTES = 128


def _enc_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        c = v & 0x7F
        v >>= 7
        if v:
            out.append(c | 0x80)
        else:
            out.append(c)
            return bytes(out)


def _ld(num: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _enc_varint(num << 3 | 2) + _enc_varint(len(payload)) + payload


def _tensor(t: memoryview) -> tuple[str, int, list[int], dict[str, str], int]:
    name, dtype, dims, ext, loc = "", 0, [], {}, 0
    for num, wt, v in _fields(t):
        if num == 1:  # dims: int64, packed or not
            if wt == 2:
                j = 0
                while j < len(v):
                    d, j = _varint(v, j)
                    dims.append(d)
            else:
                dims.append(v)
        elif num == 2 and wt == 0:
            dtype = v
        elif num == 8 and wt == 2:
            name = bytes(v).decode()
        elif num == 13 and wt == 2:  # StringStringEntryProto
            kv = {k: bytes(s).decode() for k, w, s in _fields(v) if w == 2}
            ext[kv.get(1, "")] = kv.get(2, "")
        elif num == 14 and wt == 0:
            loc = v
    return name, dtype, dims, ext, loc


def external_initializers(graph: Any, files: Mapping[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
    """Per external initializer of ``graph`` (model bytes) whose file is in
    ``files``: a read-only numpy view of that file's bytes, no copy."""
    out: dict[str, np.ndarray[Any, Any]] = {}
    if not files:
        return out
    try:
        model = memoryview(graph).cast("B")
        for num, wt, g in _fields(model):
            if num != 7 or wt != 2:  # ModelProto.graph
                continue
            for gnum, gwt, t in _fields(g):
                if gnum != 5 or gwt != 2:  # GraphProto.initializer
                    continue
                name, dtype, dims, ext, loc = _tensor(t)
                if loc != _EXTERNAL or ext.get("location") not in files:
                    continue
                if dtype not in _DTYPES:
                    return {}  # all or nothing: onnxruntime reads every one (and copies)
                np_dtype = np.dtype(_DTYPES[dtype])
                count = 1
                for d in dims:
                    count *= d
                off, length = int(ext.get("offset", 0)), int(ext.get("length", -1))
                nbytes = count * np_dtype.itemsize
                buf = files[ext["location"]]
                if (
                    length not in (-1, nbytes)
                    or nbytes < _MIN_BYTES
                    or off < 0
                    or off + nbytes > len(buf)
                    or off % np_dtype.itemsize
                ):
                    return {}  # left to onnxruntime's own checks (and copy)
                arr = np.frombuffer(buf, dtype=np_dtype, count=count, offset=off).reshape(dims)
                out[name] = arr
    except (ValueError, UnicodeDecodeError):
        # a graph this walker cannot read: onnxruntime reads it (and copies)
        return {}
    return out


def add_to_options(so: Any, views: Mapping[str, np.ndarray[Any, Any]]) -> list[Any]:
    """Give onnxruntime each view as an initializer over the same memory; the
    returned OrtValues (and the views) must outlive every session built with ``so``."""
    import onnxruntime as ort

    # the placeholder is checked under this folder, not the working directory
    # (which a worker under another uid, or under Landlock, may not reach)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", "/")
    vals = []
    for name, arr in views.items():
        v = ort.OrtValue.ortvalue_from_numpy(arr)
        if v.data_ptr() != arr.ctypes.data:  # pragma: no cover - onnxruntime copied
            raise ConfigError("onnxruntime copied an initializer")
        so.add_initializer(name, v)
        vals.append(v)
    return vals


# Ops whose weights onnxruntime's CPU optimisers rewrite into a new tensor
# (the NCHWc layout, Conv+Add/Mul/BatchNorm folding) by reading the graph's
# TensorProto, not the supplied value: a graph with one would fail to load
# in place (and be retried with the copying route), and onnxruntime makes its
# own copy of those weights anyway.
_REWRITTEN_BY_OPTIMISERS = {b"Conv", b"ConvTranspose", b"BatchNormalization"}


def _reorders_weights(graph: Any, views: Mapping[str, Any]) -> bool:
    try:
        for num, wt, g in _fields(memoryview(graph).cast("B")):
            if num != 7 or wt != 2:
                continue
            for gnum, gwt, node in _fields(g):
                if gnum != 1 or gwt != 2:  # GraphProto.node
                    continue
                op, ins = b"", []
                for nnum, nwt, v in _fields(node):
                    if nnum == 4 and nwt == 2:  # NodeProto.op_type
                        op = bytes(v)
                    elif nnum == 1 and nwt == 2:  # NodeProto.input
                        ins.append(bytes(v).decode())
                if op in _REWRITTEN_BY_OPTIMISERS and any(i in views for i in ins):
                    return True
    except (ValueError, UnicodeDecodeError):
        return True
    return False


# onnxruntime checks that an external-data location exists under the model's
# folder (set to "/" by ``add_to_options``) before it sees that an initializer
# of that name was supplied, and never reads it then. "." (the folder itself)
# always exists; it is not a file, so a graph naming
# it without a supplied initializer fails to load instead of reading anything.
_PLACEHOLDER = b"."


def _rewrite_tensor(t: memoryview) -> bytes:
    out = bytearray()
    for num, wt, v, raw in _spans(t):
        if num == 13 and wt == 2:
            kv = {k: bytes(s) for k, w, s in _fields(v) if w == 2}
            if kv.get(1) == b"location":
                out += _ld(13, _ld(1, b"location") + _ld(2, _PLACEHOLDER))
                continue
        out += raw
    return bytes(out)


def zero_copy_graph(
    graph: Any, files: Mapping[str, Any]
) -> tuple[bytes, dict[str, np.ndarray[Any, Any]]] | None:
    """The graph with its external initializers pointed at the placeholder,
    and the views to supply for them (``add_to_options``); None when some
    external initializer cannot be served from a view (the caller falls back
    to onnxruntime's in-memory-files route, which copies)."""
    views = external_initializers(graph, files)
    if not views or _reorders_weights(graph, views):
        return None
    model = memoryview(graph).cast("B")
    out = bytearray()
    try:
        for num, wt, g, raw in _spans(model):
            if num != 7 or wt != 2:
                out += raw
                continue
            body = bytearray()
            for gnum, gwt, t, graw in _spans(g):
                if gnum == 5 and gwt == 2 and _tensor(t)[0] in views:
                    body += _ld(5, _rewrite_tensor(t))
                else:
                    body += graw
            out += _ld(7, bytes(body))
    except (ValueError, UnicodeDecodeError):
        return None
    return bytes(out), views
