"""The wire protocol shared by clients, workers and the key server.

A message is ZeroMQ multipart: one small msgpack **header** frame and, for
tensors, one raw C-contiguous frame per tensor. Headers always carry the
protocol version ``v``; a reply is ``{"v", "id", "ok": true, ...}`` or
``{"v", "id", "ok": false, "error": {"code", "message"}}``.

Worker ops: ``info``, ``compute``, ``health``, ``stats``.
Key server ops: ``release``, ``renew``, ``register_key``, ``issue``,
``revoke``, ``list``, ``ping``.

Example::

    descs, frames = encode_tensors({"x": np.ones((2, 3), np.float32)})
    header = pack_header({"v": PROTOCOL_VERSION, "op": "compute", "id": 1, "tensors": descs})
    sock.send_multipart([header, *frames], copy=False)
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from .errors import InputError, ProtocolError, UnsupportedVersionError, VaultError, from_wire

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "MAX_HEADER",
    "SharedRegion",
    "PROTOCOL_VERSION",
    "RepeatPlan",
    "RepeatPlans",
    "SHM_GROUP_BYTES",
    "SHM_GROUP_MIN",
    "SHM_MIN_BYTES",
    "SUPPORTED_DTYPES",
    "decode_tensor",
    "decode_tensors",
    "decoding_too_dear",
    "encode_value",
    "is_tensor_type",
    "parse_type",
    "dtype_from_name",
    "dtype_name",
    "encode_tensors",
    "frame_len",
    "shm_threshold",
    "error_reply",
    "ok_reply",
    "pack_header",
    "raise_for_reply",
    "unpack_header",
]

PROTOCOL_VERSION = 1
DEFAULT_MAX_MESSAGE = 1 << 30  # 1 GiB per message; ZMQ_MAXMSGSIZE is set from this
# One limit for every header frame, worker and key server alike. A header
# names tensors (about 60 bytes each); 1 MiB is ~16k descriptors.
MAX_HEADER = 1 << 20
MAX_RANK = 32
MAX_NESTING = 8  # sequence<map<...>> and the like; deeper is refused unread
SHM_MIN_BYTES = 256 << 10  # below this a frame is as cheap as a copy into shared memory
# ...unless the message's tensors add up to more than a local socket's send
# buffer (about 208 KiB by default): such a record leaves the caller in
# several sends, each waiting for the worker to read the last (a GPT-2 call
# with its past, 18 tensors of 24 KiB, took two sends per call). Then every
# tensor of SHM_GROUP_MIN or more goes through shared memory instead.
SHM_GROUP_BYTES = 128 << 10
SHM_GROUP_MIN = 4 << 10
# What decoding a request may cost in memory: each string element becomes a
# Python str, an object pointer and, inside onnxruntime, a std::string (about
# 96 bytes together, however short the string is on the wire), and the total
# may be at most MEMORY_FACTOR times the bytes that came in, or MEMORY_FLOOR,
# whichever is larger. Checked from the header alone, before any frame is decoded.
STRING_ELEMENT_COST = 96
MEMORY_FACTOR = 8
MEMORY_FLOOR = 64 << 20

_NUMERIC = (
    "float16", "float32", "float64", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128",
)  # fmt: skip
# dtypes numpy knows only through ml_dtypes (which onnx depends on); onnxruntime
# takes them only as OrtValues, one byte per element here (int4/uint4 too:
# the worker packs two to a byte for onnxruntime)
_ML_DTYPES = (
    "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
    "int4", "uint4",
)  # fmt: skip
# ml_dtypes is imported on first use of one of these: its import costs ~0.7 s
# of CPU (measured here), paid otherwise by every worker and every CLI command
_EXTRA: dict[str, Any] = {}
_EXTRA_LOADED = False
ORTVALUE_DTYPES = frozenset(_ML_DTYPES)
SUPPORTED_DTYPES = frozenset((*_NUMERIC, "string", *_ML_DTYPES))


def _extra() -> dict[str, Any]:
    """The ml_dtypes dtypes by name (imported once, on first need)."""
    global _EXTRA_LOADED
    if not _EXTRA_LOADED:
        try:
            import ml_dtypes

            for n in _ML_DTYPES:
                if hasattr(ml_dtypes, n):
                    _EXTRA[n] = np.dtype(getattr(ml_dtypes, n))
        except ImportError:  # pragma: no cover - onnx depends on it
            pass
        _EXTRA_LOADED = True
    return _EXTRA


_NAME_CACHE: dict[Any, str] = {}


def _dtype_name_slow(dt: np.dtype[Any]) -> str:
    if dt.kind in ("U", "S", "O"):
        return "string"
    if dt.name not in SUPPORTED_DTYPES or (
        dt.name in ORTVALUE_DTYPES and dt != _extra().get(dt.name)
    ):
        raise ProtocolError(f"unsupported dtype {dt}")
    return str(dt.name)


def dtype_name(dtype: Any) -> str:
    """The wire name of a numpy dtype. Cached: ``np.dtype.name`` costs ~5 µs,
    which is a visible share of a small call's round trip."""
    try:
        return _NAME_CACHE[dtype]
    except (KeyError, TypeError):
        pass
    dt = np.dtype(dtype)
    name = _dtype_name_slow(dt)
    if dt.kind not in ("U", "S"):  # str dtypes vary by length: don't grow the cache
        _NAME_CACHE[dt] = name
    return name


def _dtype_from_name_slow(name: str) -> np.dtype[Any]:
    if name == "string":
        return np.dtype(object)
    if name in ORTVALUE_DTYPES:
        dt = _extra().get(name)
        if dt is None:  # pragma: no cover - an ml_dtypes without it
            raise ProtocolError(f"unsupported dtype {name!r}")
        return dt  # type: ignore[no-any-return]
    return np.dtype(name)


_BY_NAME: dict[str, np.dtype[Any]] = {
    n: _dtype_from_name_slow(n) for n in SUPPORTED_DTYPES if n not in ORTVALUE_DTYPES
}


def dtype_from_name(name: Any) -> np.dtype[Any]:
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        if isinstance(name, str) and name in ORTVALUE_DTYPES:
            _BY_NAME[name] = _dtype_from_name_slow(name)
            return _BY_NAME[name]
        raise ProtocolError(f"unsupported dtype {name!r}") from None


# --- value types -----------------------------------------------------------------
# A value's type is a string: a dtype name for a tensor ("float32"), or
# "sequence<T>", "map<K,V>" (K a dtype name, V a type) and "optional<T>",
# which is how onnxruntime's seq(...), map(...) and optional(...) cross the wire.

ValueType = tuple[Any, ...]  # ("tensor", dtype) | ("sequence", T) | ("map", K, T) | ("optional", T)
_TYPE_CACHE: dict[str, ValueType] = {}


def _split_args(body: str) -> list[str]:
    depth, parts, cur = 0, [], ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += (ch == "<") - (ch == ">")
        cur += ch
    parts.append(cur)
    return parts


def parse_type(text: Any, _depth: int = 0) -> ValueType:
    """Parse a value type string; ProtocolError for anything else."""
    if not isinstance(text, str):
        raise ProtocolError(f"unsupported dtype {text!r}")
    hit = _TYPE_CACHE.get(text)
    if hit is not None:
        return hit
    if _depth > MAX_NESTING or len(text) > 256:
        raise ProtocolError("value type nested too deeply")
    out: ValueType
    if "<" not in text:
        dtype_from_name(text)
        out = ("tensor", text)
    else:
        kind, _, rest = text.partition("<")
        if not rest.endswith(">"):
            raise ProtocolError(f"malformed value type {text!r}")
        args = _split_args(rest[:-1])
        if kind in ("sequence", "optional") and len(args) == 1:
            out = (kind, parse_type(args[0], _depth + 1))
        elif kind == "map" and len(args) == 2 and args[0] in SUPPORTED_DTYPES:
            out = ("map", args[0], parse_type(args[1], _depth + 1))
        else:
            raise ProtocolError(f"malformed value type {text!r}")
    if len(_TYPE_CACHE) < 4096:
        _TYPE_CACHE[text] = out
    return out


def is_tensor_type(text: Any) -> bool:
    return isinstance(text, str) and "<" not in text


def pack_header(header: Mapping[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)  # type: ignore[no-any-return]


def unpack_header(frame: Any, *, limit: int = MAX_HEADER) -> dict[str, Any]:
    """Parse and version-check a header frame; ProtocolError on anything odd.
    ``limit`` may only be lower than :data:`MAX_HEADER` (the key server's
    requests are small, so it takes less)."""
    data = frame.buffer if hasattr(frame, "buffer") else frame
    if len(data) > min(limit, MAX_HEADER):
        raise ProtocolError("header frame too large")
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=True, max_array_len=1 << 16)
    except Exception as exc:  # msgpack raises many types on garbage
        raise ProtocolError("header is not valid msgpack") from exc
    if not isinstance(header, dict):
        raise ProtocolError("header must be a map")
    v = header.get("v")
    if v != PROTOCOL_VERSION:
        raise UnsupportedVersionError(
            f"protocol version {v!r} not supported (want {PROTOCOL_VERSION})"
        )
    return header


def ok_reply(req_id: Any, **fields: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": True, **fields}


def error_reply(req_id: Any, exc: VaultError) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": False, "error": exc.to_wire()}


def raise_for_reply(header: Mapping[str, Any]) -> None:
    if not header.get("ok"):
        raise from_wire(header.get("error"))


# --- tensors ----------------------------------------------------------------


def encode_tensor(name: str, value: Any) -> tuple[dict[str, Any], Any]:
    """One tensor's descriptor and its frame (a buffer, not a copy, where the
    array is already C-contiguous)."""
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    kind = dtype_name(arr.dtype)
    desc = {"name": name, "dtype": kind, "shape": list(arr.shape)}
    if kind == "string":
        try:
            items = [x.decode() if isinstance(x, bytes) else str(x)
                     for x in arr.reshape(-1).tolist()]  # fmt: skip
        except UnicodeDecodeError:
            raise InputError(f"{name!r}: a bytes element is not UTF-8 text") from None
        try:
            return desc, msgpack.packb(items, use_bin_type=True)
        except UnicodeEncodeError:  # a lone surrogate ("\ud800"): no UTF-8 for it
            raise InputError(f"{name!r}: a string element is not valid Unicode text") from None
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if not arr.size:
        return desc, b""
    buf: Any = arr
    try:  # one object, not three (a quarter of the time, per tensor of a call)
        return desc, memoryview(buf).cast("B")
    except (ValueError, TypeError, NotImplementedError):  # bfloat16, float8: no buffer format
        flat: Any = arr.reshape(-1).view(np.uint8)
        return desc, memoryview(flat)


def _as_tensor(name: str, value: Any, dtype: str) -> np.ndarray[Any, Any]:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple, dict)) or value is None:
        raise InputError(f"{name!r} must be a {dtype} tensor, got {type(value).__name__}")
    return np.asarray(value, dtype=None if dtype == "string" else dtype_from_name(dtype))


def _array(items: list[Any], dtype: str) -> np.ndarray[Any, Any]:
    if dtype == "string":
        return np.array([str(x) for x in items], dtype=object)
    return np.asarray(items, dtype=dtype_from_name(dtype))


def encode_value(name: str, value: Any, vtype: str) -> tuple[dict[str, Any], list[Any]]:
    """A value of declared type ``vtype`` (a tensor, or a sequence, map or
    optional) as a descriptor and its frames, in order."""
    t = parse_type(vtype)
    if t[0] == "tensor":
        d, f = encode_tensor(name, _as_tensor(name, value, t[1]))
        return d, [f]
    desc: dict[str, Any] = {"name": name, "dtype": vtype}
    frames: list[Any] = []
    if t[0] == "optional":
        inner = vtype[len("optional<") : -1]
        if value is None:
            desc["value"] = None
        else:
            d, frames = encode_value("", value, inner)
            desc["value"] = d
        return desc, frames
    if t[0] == "sequence":
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{name!r} is a {vtype}: pass a list, got {type(value).__name__}")
        inner = vtype[len("sequence<") : -1]
        items = []
        for v in value:
            d, fs = encode_value("", v, inner)
            items.append(d)
            frames += fs
        desc["items"] = items
        return desc, frames
    # map<K,V>: the keys and the values as two 1-D tensors
    if not isinstance(value, Mapping):
        raise InputError(f"{name!r} is a {vtype}: pass a dict, got {type(value).__name__}")
    inner = vtype[len("map<") + len(t[1]) + 1 : -1]
    if t[2][0] != "tensor":
        raise InputError(f"{name!r}: map values of type {inner} are not supported")
    keys = _array(list(value.keys()), t[1])
    vals = _array(list(value.values()), t[2][1])
    kd, kf = encode_tensor("", keys.reshape(-1))
    vd, vf = encode_tensor("", vals.reshape(-1))
    desc["keys"], desc["values"] = kd, vd
    return desc, [kf, vf]


_MAX_DIM = 1 << 40


def _check_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK:
        raise ProtocolError("tensor shape must be a list of at most 32 dims")
    out = tuple(shape)
    for d in out:
        if type(d) is not int or d < 0 or d > _MAX_DIM:  # not a bool, not a float
            raise ProtocolError(f"bad dimension {d!r} in tensor shape")
    return out


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def _numeric(desc: dict[str, Any], buf: Any, align: bool = False) -> np.ndarray[Any, Any]:
    """A numeric tensor over ``buf`` (no copy), for a descriptor whose name and
    dtype are already checked: its shape against the bytes. ``align``: the
    bytes may start anywhere (a ZeroMQ frame's): a tensor not on a 16-byte
    boundary is copied to one."""
    dt = dtype_from_name(desc.get("dtype"))
    shape = _check_shape(desc.get("shape"))
    count = _count(shape)
    expected = count * dt.itemsize
    if len(buf) != expected:
        raise ProtocolError(
            f"tensor {desc.get('name')!r}: frame has {len(buf)} bytes, shape {list(shape)} of "
            f"{dt.name} needs {expected}"
        )
    if not count:
        return np.empty(shape, dtype=dt)
    arr = np.ndarray(shape, dt, buf)  # a view of the frame, as frombuffer's
    if align and arr.__array_interface__["data"][0] & 15:
        # onnxruntime's answer depends on where its input sits: a ReduceSum
        # over float32 gives other last bits unless the data starts on a
        # 16-byte boundary, as every numpy array a caller makes does. libzmq
        # puts a large frame 8 bytes off one, a small one anywhere in its
        # receive buffer. (Records of the local channel, shared memory and
        # sealed frames are laid out on 64-byte boundaries by the sender.)
        arr = arr.copy()
    return arr


def decode_tensor(desc: Any, frame: Any) -> tuple[str, np.ndarray[Any, Any]]:
    """Rebuild one tensor from its descriptor and frame, without a copy for
    numeric types. Every inconsistency is a ProtocolError."""
    if not isinstance(desc, dict):
        raise ProtocolError("tensor descriptor must be a map")
    name = desc.get("name")
    if not isinstance(name, str):
        raise ProtocolError("tensor descriptor needs a string name")
    zmq_frame = hasattr(frame, "buffer")
    buf = frame.buffer if zmq_frame else frame
    if desc.get("dtype") == "string":
        shape = _check_shape(desc.get("shape"))
        return name, _decode_strings(name, buf, _count(shape)).reshape(shape)
    return name, _numeric(desc, buf, zmq_frame)


def _decode_strings(name: str, buf: Any, count: int) -> np.ndarray[Any, Any]:
    # the element count is read first: a frame whose count does not match
    # its shape is refused before a single string is built
    unpacker = msgpack.Unpacker(
        raw=False, max_buffer_size=max(len(buf), 1), max_array_len=count,
        max_map_len=0, max_bin_len=0, max_ext_len=0,
    )  # fmt: skip
    arr = np.empty(count, dtype=object)
    try:
        unpacker.feed(buf)
        if unpacker.read_array_header() != count:
            raise ProtocolError(f"tensor {name!r}: string frame does not match its shape")
        for i in range(count):
            x = unpacker.unpack()
            if not isinstance(x, str):
                raise ProtocolError(f"tensor {name!r}: string frame holds a non-string")
            arr[i] = x
    except ProtocolError:
        raise
    except Exception:
        raise ProtocolError(f"tensor {name!r}: malformed string frame") from None
    try:
        unpacker.unpack()
    except msgpack.OutOfData:
        return arr
    except Exception:
        pass
    raise ProtocolError(f"tensor {name!r}: string frame has trailing data")


class SharedRegion:
    """One caller's slot of the shared-memory arena a local worker and its
    caller both map (``vault/core/shm.py``). Large tensors are placed from
    ``cursor`` on; ``cursor`` moves past what is placed or read, so a worker
    writes its outputs after the inputs it read."""

    __slots__ = ("buf", "start", "end", "cursor", "_mv")

    def __init__(self, buf: Any, start: int, end: int) -> None:
        self.buf, self.start, self.end, self.cursor = buf, start, end, start
        self._mv: memoryview | None = None  # one view of the arena per call, made on first use

    @classmethod
    def from_wire(cls, buf: Any, region: Any) -> SharedRegion:
        """The ``{"offset", "size"}`` slot a header names, checked against the arena."""
        if not isinstance(region, dict):
            raise ProtocolError("shm region must be a map")
        off, size = region.get("offset"), region.get("size")
        if not isinstance(off, int) or not isinstance(size, int) or isinstance(off, bool):
            raise ProtocolError("shm region needs integer offset and size")
        if off < 0 or size <= 0 or off + size > len(buf):
            raise ProtocolError("shm region lies outside the shared arena")
        return cls(buf, off, off + size)

    def to_wire(self) -> dict[str, int]:
        return {"offset": self.start, "size": self.end - self.start}

    def _view(self) -> memoryview:
        mv = self._mv
        if mv is None:
            mv = self._mv = memoryview(self.buf).cast("B")
        return mv

    def place(self, frame: Any) -> list[int] | None:
        """Copy ``frame`` in at the cursor if it fits; its ``[offset, nbytes]``."""
        return self.put(_as_bytes(frame))

    def put(self, src: memoryview) -> list[int] | None:
        """:meth:`place` for a 1-D byte view."""
        n = src.nbytes
        at = self.cursor
        if at + n > self.end:
            return None
        self._view()[at : at + n] = src
        self.cursor = min(self.end, (at + n + 63) // 64 * 64)
        return [at, n]

    def view(self, loc: Any) -> memoryview:
        """The bytes a ``"shm": [offset, nbytes]`` descriptor names, bounds-checked."""
        # type() is int: a bool (an int subclass) is no offset
        if type(loc) is not list or len(loc) != 2:
            raise ProtocolError("shm tensor lies outside its region")
        off, n = loc
        if (
            type(off) is not int
            or type(n) is not int
            or off < self.start
            or n < 0
            or off + n > self.end
        ):
            raise ProtocolError("shm tensor lies outside its region")
        if off + n >= self.cursor:
            self.cursor = min(self.end, (off + n + 63) // 64 * 64)
        return self._view()[off : off + n]


def _numeric_bytes(arrays: Mapping[str, Any]) -> tuple[int, int]:
    """The largest numeric tensor's size, and all of theirs together."""
    big = total = 0
    for v in arrays.values():
        if isinstance(v, np.ndarray) and v.dtype.kind not in "OUS":
            n = v.nbytes
            total += n
            if n > big:
                big = n
    return big, total


def shm_threshold(arrays: Mapping[str, Any]) -> int | None:
    """The size from which these tensors of a local call go through shared
    memory (``SHM_GROUP_MIN`` when together they reach ``SHM_GROUP_BYTES``,
    else ``SHM_MIN_BYTES``), or None when none of them would."""
    big, total = _numeric_bytes(arrays)
    if total >= SHM_GROUP_BYTES:
        return SHM_GROUP_MIN
    return SHM_MIN_BYTES if big >= SHM_MIN_BYTES else None


def encode_tensors(
    arrays: Mapping[str, Any],
    region: SharedRegion | None = None,
    *,
    min_bytes: int | None = None,
    types: Mapping[str, str] | None = None,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Descriptors and frames for ``arrays``. With a ``region``, numeric
    tensors of ``min_bytes`` or more that fit are copied into it and named by
    ``"shm": [offset, nbytes]`` instead of travelling as a frame (by default
    :func:`shm_threshold`'s size; a caller that already asked it passes its
    answer). ``types`` (name -> value type) says which values are sequences,
    maps or optionals."""
    limit = 0
    if region is not None:
        limit = min_bytes if min_bytes is not None else shm_threshold(arrays) or SHM_MIN_BYTES
    descs: list[dict[str, Any]] = []
    frames: list[Any] = []
    names = _NAME_CACHE
    for name, value in arrays.items():
        vtype = types.get(name) if types else None
        if vtype is not None and not is_tensor_type(vtype):
            d, fs = encode_value(name, value, vtype)
            descs.append(d)
            frames += fs
            continue
        # the common case inline (a call of 19 tensors spent a third of its
        # encoding in per-tensor calls): a C-contiguous numeric array in the
        # machine's byte order, which travels as its own buffer
        src: memoryview | None = None
        kind = names.get(value.dtype) if type(value) is np.ndarray else None
        if (
            kind is not None
            and kind != "string"
            and value.size
            and value.flags.c_contiguous
            and value.dtype.byteorder != ">"
        ):
            try:
                src = memoryview(value).cast("B")
            except (ValueError, TypeError, NotImplementedError):  # bfloat16, float8
                src = None
        if src is not None:
            d = {"name": name, "dtype": kind, "shape": list(value.shape)}
            f: Any = src
        else:
            d, f = encode_tensor(name, value)
        if region is not None and d["dtype"] != "string":
            if src is None:
                src = _as_bytes(f)
            loc = region.put(src) if src.nbytes >= limit else None
            if loc is not None:
                d["shm"] = loc
                descs.append(d)
                continue
        frames.append(f)
        descs.append(d)
    return descs, frames


def _as_bytes(frame: Any) -> memoryview:
    src = frame if type(frame) is memoryview else memoryview(frame)
    return src if src.ndim == 1 and src.format == "B" else src.cast("B")


def _plan(desc: Any, want: ValueType | None, depth: int) -> tuple[int, int]:
    """Check one descriptor from the header alone: (frames it needs, Python
    objects decoding it makes: strings and map entries). Nothing is decoded here."""
    if not isinstance(desc, dict):
        raise ProtocolError("tensor descriptor must be a map")
    if depth > MAX_NESTING:
        raise ProtocolError("value nested too deeply")
    t = parse_type(desc.get("dtype"))
    if want is not None and t != want:
        raise ProtocolError("a nested value does not have its container's type")
    if t[0] == "tensor":
        count = _count(_check_shape(desc.get("shape")))
        return (0 if "shm" in desc else 1), (count if t[1] == "string" else 0)
    if "shm" in desc:
        raise ProtocolError("only tensors travel through shared memory")
    if t[0] == "optional":
        v = desc.get("value")
        return (0, 0) if v is None else _plan(v, t[1], depth + 1)
    if t[0] == "sequence":
        items = desc.get("items")
        if not isinstance(items, list):
            raise ProtocolError("a sequence descriptor needs a list of items")
        frames = strings = 0
        for item in items:
            f, n = _plan(item, t[1], depth + 1)
            frames, strings = frames + f, strings + n
        return frames, strings
    kf, kn = _plan(desc.get("keys"), ("tensor", t[1]), depth + 1)
    vf, vn = _plan(desc.get("values"), t[2], depth + 1)
    if "shm" in desc["keys"] or "shm" in desc["values"] or kf + vf != 2:
        raise ProtocolError("map keys and values travel as frames")
    if desc["keys"].get("shape") != desc["values"].get("shape") or len(desc["keys"]["shape"]) != 1:
        raise ProtocolError("a map needs as many keys as values, as 1-D tensors")
    # a decoded map entry is two Python objects and a dict slot: count it as strings are
    return 2, kn + vn + 2 * int(desc["keys"]["shape"][0])


def _writable(frame: Any) -> Any:
    """A caller's result is always writable: a read-only frame's bytes, copied."""
    buf = frame.buffer if hasattr(frame, "buffer") else frame
    return bytearray(buf) if memoryview(buf).readonly else frame


def _decode_value(
    desc: dict[str, Any], frames: Any, region: SharedRegion | None, copy: bool
) -> Any:
    t = parse_type(desc["dtype"])
    if t[0] == "tensor":
        if "shm" in desc:
            assert region is not None
            if t[1] == "string":
                raise ProtocolError("string tensors cannot travel through shared memory")
            view = region.view(desc["shm"])
            # a caller gets an owned, writable copy (its slot is about to be reused)
            return decode_tensor(desc, bytearray(view) if copy else view)[1]
        frame = next(frames)
        if copy and t[1] != "string":
            frame = _writable(frame)
        return decode_tensor(desc, frame)[1]
    if t[0] == "optional":
        v = desc.get("value")
        return None if v is None else _decode_value(v, frames, region, copy)
    if t[0] == "sequence":
        return [_decode_value(d, frames, region, copy) for d in desc["items"]]
    keys = decode_tensor(desc["keys"], next(frames))[1].tolist()
    values = decode_tensor(desc["values"], next(frames))[1].tolist()
    if len(set(keys)) != len(keys):
        raise ProtocolError("a map holds the same key twice")
    return dict(zip(keys, values))


def decode_tensors(
    descs: Any,
    frames: Sequence[Any],
    region: SharedRegion | None = None,
    *,
    copy: bool = False,
    expect: Mapping[str, str] | None = None,
    bound: bool = True,
) -> dict[str, Any]:
    """Rebuild the values of a message (tensors, and sequences, maps and
    optionals of them). ``"shm"`` descriptors are read from ``region`` (as
    views, or owned copies with ``copy=True`` for a caller whose slot is about
    to be reused); without a region they are a ProtocolError.

    Everything is checked from the header before any frame is decoded: names
    against ``expect`` (name -> declared value type; an unknown name or another
    type is an InputError), shapes against frame counts, and the memory that
    decoding would cost (strings!) against the bytes that came in; a caller
    reading its worker's answer passes ``bound=False``: what onnxruntime made
    is what the caller asked for (a million one-letter strings were refused
    after the call had run and been counted)."""
    if not isinstance(descs, list):
        raise ProtocolError("tensors must be a list")
    seen: set[str] = set()
    need = strings = wire = 0
    numeric_only = True
    shm = False
    for d in descs:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise ProtocolError("tensor descriptor needs a string name")
        name = d["name"]
        if name in seen:
            raise ProtocolError(f"tensor {name!r} sent twice")
        seen.add(name)
        dtype = d.get("dtype")
        t = parse_type(dtype)  # an unknown dtype is a protocol error, whatever the name
        if expect is not None:
            if name not in expect:
                raise InputError(f"no input named {name!r}; inputs are {sorted(expect)}")
            if dtype != expect[name]:
                raise InputError(f"input {name!r} must be {expect[name]}, got {dtype}")
        if "shm" in d:
            if region is None:
                raise ProtocolError("shared-memory tensors need a shm region (local workers only)")
            shm = True
            loc = d["shm"]
            if isinstance(loc, list) and len(loc) == 2 and isinstance(loc[1], int):
                wire += max(0, loc[1])
        if t[0] == "tensor" and t[1] != "string":
            # the common case: a numeric tensor decodes as a view, no memory to bound
            # (its shape is checked against its frame when it is decoded)
            need += "shm" not in d
            continue
        numeric_only = False
        f, n = _plan(d, None, 0)
        need, strings = need + f, strings + n
    if need != len(frames):
        raise ProtocolError(f"header names {need} framed tensors but {len(frames)} frames came")
    if not numeric_only and bound:
        wire += sum(frame_len(f) for f in frames)
        over = decoding_too_dear(wire, strings)
        if over:
            raise ProtocolError(f"request refused: decoding its {strings} strings and map "
                                f"entries would take {over}")  # fmt: skip
    it = iter(frames)
    if not numeric_only:
        return {d["name"]: _decode_value(d, it, region, copy) for d in descs}
    # the common case, every value a numeric tensor (names and dtypes checked above)
    out: dict[str, Any] = {}
    owned = None
    if copy and shm:
        assert region is not None  # checked above
        # a caller gets owned, writable copies (its slot is about to be reused)
        owned = iter(_owned_copies(region, [d["shm"] for d in descs if "shm" in d]))
    for d in descs:
        if "shm" in d:
            assert region is not None  # checked above
            out[d["name"]] = _numeric(d, next(owned) if owned else region.view(d["shm"]))
            continue
        frame = next(it)
        if copy:
            frame = _writable(frame)
        zmq_frame = hasattr(frame, "buffer")
        out[d["name"]] = _numeric(d, frame.buffer if zmq_frame else frame, zmq_frame)
    return out


_PLAN_KEYS = frozenset(("name", "dtype", "shape", "shm"))
_REGION_KEYS = frozenset(("offset", "size"))


class RepeatPlan:
    """What :func:`decode_tensors` checked of a request, kept for the next one.

    A caller sends the same descriptors call after call (names, dtypes,
    shapes, and the same shared-memory offsets when it uses the same slot).
    When the next request's descriptors and region compare equal to the
    checked ones (one C-level comparison), every check from the header holds
    again: only each frame's length is checked and its view made, and a
    shared-memory input is the same view over the same bytes, which the
    caller has just rewritten. A worker's thread for one caller's connection
    keeps one (never a thread that serves many callers: worker/ops.py says
    why); the caller's threads keep one each for answers. For 19 inputs of
    24 KiB the worker's handler took 176 us around a 49 us run, 132 us with
    the plan (a hand measurement, warm, in one process; docs/benchmarks.md).
    Values that compare equal decode alike (a dimension sent as ``1.0`` or
    ``true`` after one sent as ``1`` is read as ``1``, the same bytes).

    Built only for numeric tensors that are not empty; anything else is
    decoded in full every time."""

    __slots__ = ("descs", "region", "items", "frames", "cursor", "copy", "runs")

    def __init__(self, descs: Any, region_wire: Any,
                 values: Mapping[str, Any], cursor: int = 0, *, copy: bool = False) -> None:  # fmt: skip
        """``values``: what the full decode of ``descs`` gave. ``copy``: a
        caller reading its worker's answers, which gets owned copies each
        time (its slot is reused); a worker keeps the shared-memory views."""
        self.descs, self.region, self.cursor, self.copy = descs, region_wire, cursor, copy
        items: list[tuple[str, np.dtype[Any], tuple[int, ...], int, bool, Any]] = []
        for d in descs:
            arr = values[d["name"]]
            shared = "shm" in d
            view = arr if shared and not copy else None
            items.append((d["name"], arr.dtype, arr.shape, arr.nbytes, shared, view))
        self.items = items
        self.frames = sum(1 for it in items if not it[4])
        # the locations were checked against the region by the full decode
        self.runs = _runs([d["shm"] for d in descs if "shm" in d])

    @staticmethod
    def fits(descs: Any, values: Mapping[str, Any], region_wire: Any = None) -> bool:
        """Whether a decoded message may be planned: numeric tensors only,
        none empty, and nothing in the descriptors or the region but what the
        protocol names (the decoder ignores other keys; a plan that kept them
        would hold a sender's junk, up to a header's 1 MiB, after its call)."""
        if not isinstance(descs, list):
            return False
        if isinstance(region_wire, dict) and region_wire.keys() - _REGION_KEYS:
            return False
        for d in descs:
            if d.keys() - _PLAN_KEYS or not isinstance(d.get("shape"), list):
                return False
            if not is_tensor_type(d.get("dtype")) or d.get("dtype") == "string":
                return False
            arr = values.get(d["name"])
            if not isinstance(arr, np.ndarray) or not arr.size:
                return False
        return True

    def decode(
        self,
        descs: Any,
        region_wire: Any,
        frames: Sequence[Any],
        region: SharedRegion | None = None,
    ) -> dict[str, Any] | None:
        """The values of a message with the planned descriptors, or None
        (decode it in full). In copy mode ``region`` is the caller's slot."""
        if len(frames) != self.frames or region_wire != self.region or descs != self.descs:
            return None
        owned = None
        if self.copy and self.runs:
            if region is None:
                return None
            owned = iter(_copies(region, self.runs))
        out: dict[str, Any] = {}
        it = iter(frames)
        for name, dt, shape, nbytes, shared, view in self.items:
            if shared:
                out[name] = view if owned is None else np.ndarray(shape, dt, next(owned))
                continue
            frame = next(it)
            if self.copy:
                frame = _writable(frame)
            zmq_frame = hasattr(frame, "buffer")
            buf = frame.buffer if zmq_frame else frame
            if len(buf) != nbytes:
                return None  # the full decode says what is wrong
            arr = np.ndarray(shape, dt, buf)
            if zmq_frame and arr.__array_interface__["data"][0] & 15:
                arr = arr.copy()  # as _numeric does
            out[name] = arr
        return out


class RepeatPlans(threading.local):
    """One thread's :class:`RepeatPlan`, built only once the same descriptors
    came twice in a row: a caller whose shapes change call to call (a growing
    past, a varying batch) pays one comparison a call, not a plan built and
    thrown away (by hand: 24 us for 19 tensors, on top of a 41 us decode).

    ``remember`` (:meth:`learn`): whether a message's descriptors may be kept
    until the next one (a worker keeps those of small headers only: what it
    keeps of a sender's message it holds until that sender's next call).
    Callers read ``.plan`` (None until one is built) and decode with it."""

    def __init__(self, *, copy: bool = False) -> None:
        self.copy = copy
        self.plan: RepeatPlan | None = None
        self.seen: tuple[Any, Any] | None = None

    def learn(self, descs: Any, region_wire: Any, values: Mapping[str, Any], cursor: int = 0,
              *, remember: bool = True) -> None:  # fmt: skip
        """After a full decode of ``descs`` into ``values``."""
        self.plan = None
        if self.seen is not None and self.seen == (descs, region_wire):
            self.seen = None
            if RepeatPlan.fits(descs, values, region_wire):
                self.plan = RepeatPlan(descs, region_wire, values, cursor, copy=self.copy)
            return
        self.seen = (descs, region_wire) if remember else None


def _owned_copies(region: SharedRegion, locs: list[Any]) -> list[Any]:
    """Owned copies of the shared-memory tensors ``locs`` names (each checked
    by :meth:`SharedRegion.view`), in order, copied run by run (:func:`_runs`)."""
    for loc in locs:
        region.view(loc)
    return _copies(region, _runs(locs))


def _runs(locs: list[Any]) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """The checked ``[offset, nbytes]`` locations ``locs`` as runs to copy:
    ``(start, stop, [(offset in the run, nbytes), ...])``. Small tensors
    (under :data:`SHM_MIN_BYTES` each: a call's many small tensors, which go
    through shared memory together) laid out back to back make one run, one
    copy that their arrays share: 19 outputs of 24 KiB each were 19
    allocations and copies, 60-75 us more a call than one (a hand
    measurement on a 2-core VM). A tensor of its own size is a run of its own, so keeping one
    output never keeps a large one alive (a run's block lives while any of
    its arrays do)."""
    runs: list[tuple[int, int, list[tuple[int, int]]]] = []
    i, count = 0, len(locs)
    while i < count:
        off, n = locs[i]
        parts, stop, i = [(0, n)], off + n, i + 1
        if n < SHM_MIN_BYTES:
            while i < count:
                o, m = locs[i]
                if m >= SHM_MIN_BYTES or not stop <= o <= (stop + 63) // 64 * 64:
                    break
                parts.append((o - off, m))
                stop, i = o + m, i + 1
        runs.append((off, stop, parts))
    return runs


def _copies(region: SharedRegion, runs: list[tuple[int, int, list[tuple[int, int]]]]) -> list[Any]:
    mv = region._view()
    out: list[Any] = []
    for start, stop, parts in runs:
        if len(parts) == 1:
            out.append(bytearray(mv[start:stop]))
        else:
            block = memoryview(bytearray(mv[start:stop]))
            out.extend(block[o : o + m] for o, m in parts)
    return out


def decoding_too_dear(wire: int, strings: int) -> str:
    """The memory rule for decoding (module constants): ``""`` when ``strings``
    elements from ``wire`` bytes may be decoded, else what it would cost, in
    words for the refusal. Shared by the worker's decoder and the Open
    Inference Protocol doors, which apply it before they split a body."""
    cost = wire + strings * STRING_ELEMENT_COST
    if not strings or cost <= max(MEMORY_FACTOR * wire, MEMORY_FLOOR):
        return ""
    return f"about {cost >> 20} MiB, more than {MEMORY_FACTOR}x its {wire >> 20} MiB"


def frame_len(f: Any) -> int:
    """A frame's bytes: a ZeroMQ frame's buffer, or any buffer's."""
    return len(f.buffer) if hasattr(f, "buffer") else memoryview(f).nbytes
