"""Dynamic batching: which models may be batched, and joining and splitting calls.

A model is batchable only when the first dimension of every input and every
output is one and the same symbolic dimension (``["N", 8]`` in, ``["N", 5]``
out): then row ``i`` of every output depends on row ``i`` of the inputs
alone, as far as the signature says, and a batch of callers' rows can be
split back exactly. Calls are joined only when they agree on everything but
that first dimension (the same input names, dtypes and trailing dims, the
same requested outputs); a caller's own batch is always kept whole, in one
call to the worker.

Example::

    if batchable(info):
        key = compat_key(feeds, outputs)            # calls with equal keys may share a batch
        joined = join([feeds_a, feeds_b])           # np.concatenate along axis 0
        parts = split(result, [rows_a, rows_b])     # None if an output disagrees
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["batchable", "compat_key", "join", "rows_of", "split"]

Arrays = Mapping[str, np.ndarray[Any, Any]]


def batchable(info: Mapping[str, Any]) -> bool:
    """True when dim 0 of every input and output is the same symbolic dim."""
    dims = set()
    items = [*(info.get("inputs") or []), *(info.get("outputs") or [])]
    if not items:
        return False
    for item in items:
        shape = item.get("shape") if isinstance(item, dict) else None
        if not isinstance(shape, list) or not shape:
            return False
        d0 = shape[0]
        if not isinstance(d0, str) or not d0 or d0 == "?":
            return False  # fixed or unnamed: nothing says it is the batch
        dims.add(d0)
    return len(dims) == 1


def rows_of(feeds: Arrays) -> int | None:
    """The caller's batch size: dim 0, equal across its inputs (else None)."""
    rows = {a.shape[0] if a.ndim else None for a in feeds.values()}
    if len(rows) != 1:
        return None
    (n,) = rows
    return n


def compat_key(feeds: Arrays, outputs: Sequence[str] | None) -> tuple[Any, ...]:
    """Calls with equal keys can be joined into one batch."""
    sig = tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items()))
    return sig, tuple(outputs) if outputs is not None else None


def join(calls: Sequence[Arrays]) -> dict[str, np.ndarray[Any, Any]]:
    """Concatenate compatible calls' inputs along axis 0."""
    if len(calls) == 1:
        return dict(calls[0])
    return {name: np.concatenate([c[name] for c in calls], axis=0) for name in calls[0]}


def split(result: Arrays, rows: Sequence[int]) -> list[dict[str, np.ndarray[Any, Any]]] | None:
    """Cut a batch's outputs back into the callers' parts (views, no copy).

    None when an output's first dimension is not the batch's row count: the
    model did not keep rows apart after all, and the calls must run alone.
    """
    total = sum(rows)
    for arr in result.values():
        if arr.ndim == 0 or arr.shape[0] != total:
            return None
    parts: list[dict[str, np.ndarray[Any, Any]]] = []
    start = 0
    for n in rows:
        parts.append({name: arr[start : start + n] for name, arr in result.items()})
        start += n
    return parts
