"""Reading the protobuf wire format without parsing into objects: the one
reader both the purity check on graphs (:mod:`vault.core.graphs`) and the
worker's in-place weights (``worker/initializers.py``) walk a serialised
ONNX model with, so neither copies a 2 GB model into protobuf objects.

Every malformation (a truncated varint or field, field number 0, a group
wire type) is a :class:`WireError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["WireError", "fields", "spans", "varint"]


class WireError(ValueError):
    """The bytes are not well-formed protobuf."""


def varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos``: (value, position after it)."""
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WireError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def spans(buf: memoryview) -> Iterator[tuple[int, int, Any, memoryview]]:
    """(field number, wire type, value, the field's raw bytes with its key):
    the value is an int for varints, 0 for fixed widths, a memoryview for
    length-delimited fields."""
    pos, end = 0, len(buf)
    while pos < end:
        start = pos
        key, pos = varint(buf, pos)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise WireError("field number 0")
        val: Any = 0
        if wt == 0:
            val, pos = varint(buf, pos)
        elif wt == 2:
            n, pos = varint(buf, pos)
            if pos + n > end:
                raise WireError("truncated field")
            val = buf[pos : pos + n]
            pos += n
        elif wt == 1:
            pos += 8
        elif wt == 5:
            pos += 4
        else:  # groups (3, 4) are not used by onnx.proto
            raise WireError(f"wire type {wt}")
        if pos > end:
            raise WireError("truncated field")
        yield num, wt, val, buf[start:pos]


def fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value), as :func:`spans` without the bytes."""
    for num, wt, val, _raw in spans(buf):
        yield num, wt, val
