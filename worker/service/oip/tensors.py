"""Tensors between the Open Inference Protocol and the vault's frames.

The protocol's datatypes map one to one onto the dtypes the vault carries;
numeric tensors cross without conversion (the protocol's binary layout, raw
little-endian row-major elements, is the vault's frame layout), strings
(``BYTES``) are UTF-8 text in the vault (onnxruntime's string tensors), and
the JSON encodings (flat row-major ``data``, or nested lists) are read with
numpy. Every inconsistency (a count that does not match the shape, a value
of the wrong kind, a binary size that does not add up) is an
:class:`~vault.core.errors.InputError`, as over ZeroMQ; the worker then checks
names, datatypes and shapes against the model's declared signature.

Example::

    desc, frame = from_json("x", "FP32", [2, 2], [1, 2, 3, 4])
    desc, frame = from_raw("x", "FP32", [2, 2], raw_bytes)
    name, datatype, shape, raw = to_raw(out_desc, out_frame)
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from vault.core.errors import InputError
from vault.core.protocol import MAX_RANK, decoding_too_dear, dtype_from_name

__all__ = [
    "DATATYPES",
    "from_bytes_list",
    "from_json",
    "from_typed",
    "from_raw",
    "oip_shape",
    "raw_size",
    "to_bytes_list",
    "to_json_data",
    "to_json_text",
    "to_raw",
]

# Open Inference Protocol datatype -> the vault's dtype name
DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BF16": "bfloat16",
    "BYTES": "string",
}
VAULT_TO_OIP = {v: k for k, v in DATATYPES.items()}
_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf", "V": "iuf"}  # numpy kinds JSON data may have


def _vault_dtype(datatype: Any) -> str:
    vd = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if vd is None:
        raise InputError(f"unknown datatype {datatype!r}; datatypes are {sorted(DATATYPES)}")
    return vd


def oip_shape(shape: Any) -> list[int]:
    """A request's shape: a list of at most 32 non-negative ints."""
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK:
        raise InputError("a tensor's shape is a list of at most 32 dimensions")
    out = []
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0 or d > 1 << 40:
            raise InputError(f"bad dimension {d!r} in a tensor's shape")
        out.append(int(d))
    return out


def _count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# Triton's extensions a request may name on a tensor, which this server does
# not implement: said, never silently ignored (an answer without the
# classification asked for, or a tensor left where a shared region was named)
_EXTENSIONS = ("classification", "shared_memory_region", "shared_memory_byte_size",
               "shared_memory_offset")  # fmt: skip


# a request's own parameters for Triton's sequence batcher: a stateful model's
# correlation; every model here is stateless, so a request that names one is
# refused (as Triton refuses a correlation id for a model without a sequence
# batcher), never run as if it were a new sequence's first step
def refuse_sequence(params: Any, get: Any = None) -> None:
    """InputError if a request's ``parameters`` ask for a sequence (a
    non-zero ``sequence_id``, ``sequence_start`` or ``sequence_end`` true).
    ``get(value)`` reads a parameter's value (gRPC's InferParameter)."""
    for key in ("sequence_id", "sequence_start", "sequence_end"):
        if key not in params:
            continue
        value = get(params[key]) if get is not None else params[key]
        if value not in (0, "", False, None):
            raise InputError(f"parameter {key!r} asks for a sequence (Triton's sequence "
                             "batching), which this server does not have: its models are "
                             "stateless; send each request on its own")  # fmt: skip


def refuse_extensions(name: Any, params: Any) -> None:
    """InputError if a tensor's ``parameters`` name an extension not served here."""
    for key in _EXTENSIONS:
        if key in params:
            raise InputError(f"{name!r}: parameter {key!r} (a Triton extension) is not "
                             "supported by this server")  # fmt: skip


def check_strings(inputs: Sequence[tuple[Any, Any, Any]], wire: int) -> None:
    """The worker's memory rule for strings (``vault.core.protocol``:
    decoding may cost at most ``MEMORY_FACTOR`` times the request, or
    ``MEMORY_FLOOR``), applied to a request's ``(name, datatype, shape)``
    inputs at the door, before one BYTES element is split or decoded: each
    element becomes Python objects there, several times its bytes (a 64 MiB
    body of empty BYTES elements took a service from 75 to 1,050 MB)."""
    strings = 0
    for name, datatype, shape in inputs:
        if datatype == "BYTES":
            try:
                strings += _count(oip_shape(shape))
            except InputError as exc:
                raise InputError(f"{name!r}: {exc}") from None
    over = decoding_too_dear(wire, strings)
    if over:
        raise InputError(
            f"request refused: decoding its {strings} BYTES elements would take {over}"
        )


def _desc(name: str, vd: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "dtype": vd, "shape": shape}


def _strings(name: str, items: Sequence[Any]) -> bytes:
    out = []
    for x in items:
        if isinstance(x, (bytes, bytearray, memoryview)):
            try:
                out.append(bytes(x).decode("utf-8"))
            except UnicodeDecodeError:
                raise InputError(f"{name!r}: a BYTES element is not UTF-8 text") from None
        elif isinstance(x, str):
            out.append(x)
        else:
            raise InputError(f"{name!r}: BYTES elements are strings")
    try:
        return msgpack.packb(out, use_bin_type=True)  # type: ignore[no-any-return]
    except UnicodeEncodeError:  # JSON's "\ud800", a lone surrogate: no UTF-8 for it
        raise InputError(f"{name!r}: a BYTES element is not valid Unicode text") from None


def from_json(
    name: str, datatype: Any, shape: Any, data: Any, *, bools: bool = True
) -> tuple[dict[str, Any], Any]:
    """A tensor from the JSON encoding: ``data`` flat row-major, or nested.
    ``bools``: whether the request's JSON may hold a ``true`` or ``false`` at
    all (False: the door saw neither, and the per-value look is skipped)."""
    vd = _vault_dtype(datatype)
    dims = oip_shape(shape)
    n = _count(dims)
    if vd == "string":
        flat = np.asarray(data, dtype=object).reshape(-1) if isinstance(data, list) else None
        if flat is None or flat.size != n:
            raise InputError(f"{name!r}: data does not hold the {n} elements of shape {dims}")
        return _desc(name, vd, dims), _strings(name, flat.tolist())
    if datatype == "BF16":
        raise InputError(f"{name!r}: BF16 travels only as binary data")
    if not isinstance(data, list):
        raise InputError(f"{name!r}: data must be a list of {datatype} values")
    if len(data) != n and not (data and isinstance(data[0], list)):
        # a flat list counted before numpy reads it (4M values: 0.2 s of the door's loop)
        raise InputError(f"{name!r}: data holds {len(data)} elements, shape {dims} needs {n}")
    try:
        arr = np.asarray(data)
    except ValueError:
        raise InputError(f"{name!r}: data is ragged") from None
    dt = dtype_from_name(vd)
    if arr.size != n:
        raise InputError(f"{name!r}: data holds {arr.size} elements, shape {dims} needs {n}")
    if n and dt.kind in "iu" and arr.dtype.kind in "fO":
        # JSON integers past int64 ([1, 2**63] is float64 to numpy, [2**64] an
        # object array): taken as the exact integers JSON gave, or refused
        return _desc(name, vd, dims), _exact_integers(name, datatype, data, dt)
    if n and arr.dtype.kind not in _KINDS.get(dt.kind, ""):
        raise InputError(f"{name!r}: data holds values that are not {datatype}")
    if n and bools and dt.kind != "b" and arr.dtype.kind != "b" and _holds_bool(data):
        # numpy reads [true, 2.5] as [1.0, 2.5]: a bool among numbers is refused,
        # as a number among a BOOL input's values is
        raise InputError(f"{name!r}: data holds values that are not {datatype}")
    return _desc(name, vd, dims), _cast(name, datatype, arr, dt)


def from_typed(
    name: str, datatype: Any, shape: Any, values: Any, natural: np.dtype[Any]
) -> tuple[dict[str, Any], Any]:
    """A tensor from a gRPC request's typed contents: ``values`` a protobuf
    repeated field whose elements are ``natural`` (float32 for
    ``fp32_contents``, int32 for ``int_contents``...). Counted against the
    shape before anything is made of it, then read straight into an array:
    no Python object per value (before, ``list(values)`` made 4M Python
    floats, 128 MB, for a request the shape then refused)."""
    vd = _vault_dtype(datatype)
    dims = oip_shape(shape)
    n = _count(dims)
    if len(values) != n:
        raise InputError(f"{name!r}: data holds {len(values)} elements, shape {dims} needs {n}")
    arr = np.fromiter(values, dtype=natural, count=n)
    dt = dtype_from_name(vd)
    return _desc(name, vd, dims), _cast(name, datatype, arr, dt)


def _cast(name: str, datatype: Any, arr: np.ndarray[Any, Any], dt: np.dtype[Any]) -> Any:
    """``arr`` as little-endian ``dt``, flat bytes; a value that does not fit
    (an integer out of range or changed, a float past float16) is refused."""
    try:
        with np.errstate(over="raise", invalid="raise"):
            out = arr.astype(dt.newbyteorder("<"), casting="unsafe")
        if dt.kind in "iu" and not np.array_equal(out, arr):
            raise InputError(f"{name!r}: a value does not fit {datatype}")
    except (OverflowError, FloatingPointError, ValueError):
        raise InputError(f"{name!r}: a value does not fit {datatype}") from None
    return np.ascontiguousarray(out).reshape(-1).view(np.uint8).data


def _holds_bool(data: Any) -> bool:
    return any(type(x) is bool for x in np.asarray(data, dtype=object).reshape(-1).tolist())


def _exact_integers(name: str, datatype: Any, data: Any, dt: np.dtype[Any]) -> Any:
    items = np.asarray(data, dtype=object).reshape(-1).tolist()
    if not all(type(x) is int for x in items):  # not a bool, not a float
        raise InputError(f"{name!r}: data holds values that are not {datatype}")
    info = np.iinfo(dt)
    if not all(info.min <= x <= info.max for x in items):
        raise InputError(f"{name!r}: a value does not fit {datatype}")
    return np.array(items, dtype=dt.newbyteorder("<")).view(np.uint8).data


def raw_size(datatype: Any, shape: Sequence[int]) -> int | None:
    """Bytes a binary tensor of this type and shape takes (None for BYTES)."""
    vd = _vault_dtype(datatype)
    return None if vd == "string" else _count(shape) * dtype_from_name(vd).itemsize


def from_raw(name: str, datatype: Any, shape: Any, raw: Any) -> tuple[dict[str, Any], Any]:
    """A tensor from its binary encoding (the binary extension, or gRPC's
    ``raw_input_contents``): numeric data as is, BYTES length-prefixed."""
    vd = _vault_dtype(datatype)
    dims = oip_shape(shape)
    n = _count(dims)
    buf = memoryview(raw).cast("B")
    if vd == "string":
        return _desc(name, vd, dims), _strings(name, _split_bytes(name, buf, n))
    need = n * dtype_from_name(vd).itemsize
    if buf.nbytes != need:
        raise InputError(
            f"{name!r}: {buf.nbytes} bytes of data, shape {dims} of {datatype} needs {need}"
        )
    return _desc(name, vd, dims), buf


def _split_bytes(name: str, buf: memoryview, n: int) -> list[bytes]:
    out, at, end = [], 0, buf.nbytes
    for _ in range(n):
        if at + 4 > end:
            raise InputError(f"{name!r}: BYTES data ends before its {n} elements")
        (size,) = struct.unpack_from("<I", buf, at)
        at += 4
        if at + size > end:
            raise InputError(f"{name!r}: a BYTES element runs past the data")
        out.append(bytes(buf[at : at + size]))
        at += size
    if at != end:
        raise InputError(f"{name!r}: BYTES data has {end - at} bytes past its {n} elements")
    return out


def from_bytes_list(
    name: str, datatype: Any, shape: Any, items: Sequence[bytes]
) -> tuple[dict[str, Any], Any]:
    """A BYTES tensor from gRPC's ``bytes_contents``."""
    vd = _vault_dtype(datatype)
    dims = oip_shape(shape)
    if vd != "string" or len(items) != _count(dims):
        raise InputError(
            f"{name!r}: bytes_contents does not match datatype {datatype} and shape {dims}"
        )
    return _desc(name, vd, dims), _strings(name, items)


# --- outputs ------------------------------------------------------------------------


def _out_strings(frame: Any, count: int) -> list[str]:
    items = msgpack.unpackb(bytes(frame), raw=False)
    if not isinstance(items, list) or len(items) != count:
        raise InputError("the worker's string output does not match its shape")
    return [str(x) for x in items]


def _parse_out(desc: Any) -> tuple[str, str, list[int]]:
    name, vd, shape = desc.get("name"), desc.get("dtype"), desc.get("shape")
    if vd not in VAULT_TO_OIP:
        raise InputError(
            f"output {name!r} is a {vd}, which the Open Inference Protocol cannot carry"
        )
    return str(name), str(vd), [int(d) for d in shape]


def to_raw(desc: dict[str, Any], frame: Any) -> tuple[str, str, list[int], bytes | memoryview]:
    """(name, datatype, shape, binary data) of one output."""
    name, vd, shape = _parse_out(desc)
    if vd == "string":
        parts = []
        for s in _out_strings(frame, _count(shape)):
            b = s.encode("utf-8")
            parts += [struct.pack("<I", len(b)), b]
        return name, "BYTES", shape, b"".join(parts)
    return name, VAULT_TO_OIP[vd], shape, memoryview(frame).cast("B")


def to_bytes_list(desc: dict[str, Any], frame: Any) -> list[bytes]:
    _, vd, shape = _parse_out(desc)
    return [s.encode("utf-8") for s in _out_strings(frame, _count(shape))]


def to_json_text(
    desc: dict[str, Any], frame: Any, per: int = 1 << 14
) -> tuple[str, str, list[int], str]:
    """(name, datatype, shape, the flat data as JSON array text) of one
    output, written ``per`` values at a time: one ``json.dumps`` of millions
    of values holds the interpreter's lock throughout (4 Mi floats: 2.4 s in
    which no other thread of the service ran), slices let it go between them."""
    name, dt, shape, data = to_json_data(desc, frame, listed=False)
    parts = []
    for i in range(0, len(data), per):
        chunk = data[i : i + per]
        chunk = chunk.tolist() if isinstance(chunk, np.ndarray) else chunk
        parts.append(json.dumps(chunk, separators=(",", ":"))[1:-1])
    return name, dt, shape, "[" + ",".join(parts) + "]"


def to_json_data(
    desc: dict[str, Any], frame: Any, *, listed: bool = True
) -> tuple[str, str, list[int], Any]:
    """(name, datatype, shape, flat row-major data) of one output, for JSON
    (``listed=False``: a numeric output's data as a flat array, not a list)."""
    name, vd, shape = _parse_out(desc)
    if vd == "string":
        return name, "BYTES", shape, _out_strings(frame, _count(shape))
    if vd == "bfloat16":
        arr = np.frombuffer(frame, dtype=dtype_from_name(vd)).astype(np.float32)
    else:
        arr = np.frombuffer(frame, dtype=dtype_from_name(vd).newbyteorder("<"))
    return name, VAULT_TO_OIP[vd], shape, arr.tolist() if listed else arr
