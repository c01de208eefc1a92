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

from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from .errors import ProtocolError, UnsupportedVersionError, VaultError, from_wire

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "SharedRegion",
    "PROTOCOL_VERSION",
    "SHM_MIN_BYTES",
    "SUPPORTED_DTYPES",
    "decode_tensor",
    "dtype_from_name",
    "dtype_name",
    "encode_tensors",
    "error_reply",
    "ok_reply",
    "pack_header",
    "raise_for_reply",
    "unpack_header",
]

PROTOCOL_VERSION = 1
DEFAULT_MAX_MESSAGE = 1 << 30  # 1 GiB per message; ZMQ_MAXMSGSIZE is set from this
MAX_HEADER = 1 << 20
MAX_RANK = 32
SHM_MIN_BYTES = 256 << 10  # below this a frame is as cheap as a copy into shared memory

try:  # onnx depends on ml_dtypes, so bfloat16 is normally available
    import ml_dtypes

    _BF16: Any = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BF16 = None

_NUMERIC = (
    "float16", "float32", "float64", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128",
)  # fmt: skip
SUPPORTED_DTYPES = frozenset((*_NUMERIC, "string", *(("bfloat16",) if _BF16 is not None else ())))


_NAME_CACHE: dict[Any, str] = {}


def _dtype_name_slow(dt: np.dtype[Any]) -> str:
    if _BF16 is not None and dt == _BF16:
        return "bfloat16"
    if dt.kind in ("U", "S", "O"):
        return "string"
    if dt.name not in SUPPORTED_DTYPES:
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
    if name == "bfloat16":
        return _BF16  # type: ignore[no-any-return]
    return np.dtype(name)


_BY_NAME: dict[str, np.dtype[Any]] = {n: _dtype_from_name_slow(n) for n in SUPPORTED_DTYPES}


def dtype_from_name(name: Any) -> np.dtype[Any]:
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ProtocolError(f"unsupported dtype {name!r}") from None


def pack_header(header: Mapping[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)  # type: ignore[no-any-return]


def unpack_header(frame: Any) -> dict[str, Any]:
    """Parse and version-check a header frame; ProtocolError on anything odd."""
    data = frame.buffer if hasattr(frame, "buffer") else frame
    if len(data) > MAX_HEADER:
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
        items = [x.decode() if isinstance(x, bytes) else str(x) for x in arr.reshape(-1).tolist()]
        return desc, msgpack.packb(items, use_bin_type=True)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    flat: Any = arr.reshape(-1).view(np.uint8)
    return desc, memoryview(flat) if arr.size else b""


def _check_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK:
        raise ProtocolError("tensor shape must be a list of at most 32 dims")
    out = []
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0 or d > 1 << 40:
            raise ProtocolError(f"bad dimension {d!r} in tensor shape")
        out.append(d)
    return tuple(out)


def decode_tensor(desc: Any, frame: Any) -> tuple[str, np.ndarray[Any, Any]]:
    """Rebuild one tensor from its descriptor and frame, without a copy for
    numeric types. Every inconsistency is a ProtocolError."""
    if not isinstance(desc, dict):
        raise ProtocolError("tensor descriptor must be a map")
    name = desc.get("name")
    if not isinstance(name, str):
        raise ProtocolError("tensor descriptor needs a string name")
    dt = dtype_from_name(desc.get("dtype"))
    shape = _check_shape(desc.get("shape"))
    buf = frame.buffer if hasattr(frame, "buffer") else frame
    count = 1
    for d in shape:
        count *= d
    if desc.get("dtype") == "string":
        try:
            items = msgpack.unpackb(buf, raw=False, max_array_len=1 << 28)
        except Exception as exc:
            raise ProtocolError(f"tensor {name!r}: malformed string frame") from exc
        if (
            not isinstance(items, list)
            or len(items) != count
            or not all(isinstance(x, str) for x in items)
        ):
            raise ProtocolError(f"tensor {name!r}: string frame does not match its shape")
        arr = np.empty(count, dtype=object)
        arr[:] = items
        return name, arr.reshape(shape)
    expected = count * dt.itemsize
    if len(buf) != expected:
        raise ProtocolError(
            f"tensor {name!r}: frame has {len(buf)} bytes, shape {list(shape)} of {dt.name} "
            f"needs {expected}"
        )
    arr = np.frombuffer(buf, dtype=dt, count=count) if count else np.empty(0, dtype=dt)
    return name, arr.reshape(shape)


class SharedRegion:
    """One caller's slot of the shared-memory arena a local worker and its
    caller both map (``vault/core/shm.py``). Large tensors are placed from
    ``cursor`` on; ``cursor`` moves past what is placed or read, so a worker
    writes its outputs after the inputs it read."""

    __slots__ = ("buf", "start", "end", "cursor")

    def __init__(self, buf: Any, start: int, end: int) -> None:
        self.buf, self.start, self.end, self.cursor = buf, start, end, start

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

    def place(self, frame: Any) -> list[int] | None:
        """Copy ``frame`` in at the cursor if it fits; its ``[offset, nbytes]``."""
        n = memoryview(frame).nbytes
        if self.cursor + n > self.end:
            return None
        np.frombuffer(self.buf, np.uint8, n, self.cursor)[:] = np.frombuffer(frame, np.uint8)
        loc = [self.cursor, n]
        self._advance(self.cursor + n)
        return loc

    def view(self, loc: Any) -> memoryview:
        """The bytes a ``"shm": [offset, nbytes]`` descriptor names, bounds-checked."""
        if (
            not isinstance(loc, list)
            or len(loc) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in loc)
            or loc[0] < self.start
            or loc[1] < 0
            or loc[0] + loc[1] > self.end
        ):
            raise ProtocolError("shm tensor lies outside its region")
        self._advance(max(self.cursor, loc[0] + loc[1]))
        return memoryview(self.buf)[loc[0] : loc[0] + loc[1]]

    def _advance(self, to: int) -> None:
        self.cursor = min(self.end, (to + 63) // 64 * 64)


def encode_tensors(
    arrays: Mapping[str, Any], region: SharedRegion | None = None, *, min_bytes: int = SHM_MIN_BYTES
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Descriptors and frames for ``arrays``. With a ``region``, numeric
    tensors of ``min_bytes`` or more that fit are copied into it and named by
    ``"shm": [offset, nbytes]`` instead of travelling as a frame."""
    descs: list[dict[str, Any]] = []
    frames: list[Any] = []
    for name, value in arrays.items():
        d, f = encode_tensor(name, value)
        loc = None
        if region is not None and d["dtype"] != "string" and memoryview(f).nbytes >= min_bytes:
            loc = region.place(f)
        if loc is None:
            frames.append(f)
        else:
            d["shm"] = loc
        descs.append(d)
    return descs, frames


def decode_tensors(
    descs: Any, frames: Sequence[Any], region: SharedRegion | None = None, *, copy: bool = False
) -> dict[str, np.ndarray[Any, Any]]:
    """Rebuild the tensors of a message. ``"shm"`` descriptors are read from
    ``region`` (as views, or copies with ``copy=True`` for a caller whose slot
    is about to be reused); without a region they are a ProtocolError."""
    if not isinstance(descs, list):
        raise ProtocolError("tensors must be a list")
    shared = [isinstance(d, dict) and "shm" in d for d in descs]
    if any(shared) and region is None:
        raise ProtocolError("shared-memory tensors need a shm region (local workers only)")
    if len(descs) - sum(shared) != len(frames):
        raise ProtocolError(
            f"header names {len(descs) - sum(shared)} framed tensors but {len(frames)} frames came"
        )
    out: dict[str, np.ndarray[Any, Any]] = {}
    it = iter(frames)
    for d, in_shm in zip(descs, shared):
        if in_shm:
            assert region is not None
            if d.get("dtype") == "string":
                raise ProtocolError("string tensors cannot travel through shared memory")
            view = region.view(d["shm"])
            name, arr = decode_tensor(d, view.tobytes() if copy else view)
        else:
            name, arr = decode_tensor(d, next(it))
        if name in out:
            raise ProtocolError(f"tensor {name!r} sent twice")
        out[name] = arr
    return out
