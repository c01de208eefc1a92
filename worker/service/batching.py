"""Dynamic batching: which models may be batched, and joining and splitting calls.

A model is batched only when its publisher declared it (``vault seal
--batchable``: ``"batchable": true`` in the signed manifest, which the worker
reports in its ``info`` after checking the signature). ``vault seal`` checked
that declaration by running the pipeline on random rows together and apart
(:mod:`vault.core.batchcheck`). Nothing is ever inferred from the signature:
``["N", 8] -> ["N", 8]`` says nothing about whether row ``i`` of the output
depends on row ``j`` of the input (``y = x - mean(x)`` has that signature,
and so has an LSTM exported sequence-first), and joining such calls would let
one caller see and change another's results. Calls are joined only when they
agree on everything but that first dimension (the same input names, dtypes
and trailing dims, the same requested outputs); a caller's own batch is
always kept whole, in one call to the worker.

Example::

    on, why = batching.decide(info, max_batch=32)   # (False, "not declared batchable ...")
    key = compat_key(feeds, outputs)            # calls with equal keys may share a batch
    joined = join([feeds_a, feeds_b])           # np.concatenate along axis 0
    parts = split(result, [rows_a, rows_b])     # None if an output disagrees
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["batchable", "compat_key", "decide", "join", "rows_of", "split"]

Arrays = Mapping[str, np.ndarray[Any, Any]]


def batchable(info: Mapping[str, Any]) -> bool:
    """True only when the package's publisher declared it batchable (the
    worker's ``info`` carries the signed manifest's ``batchable``), and the
    signature has tensors to join: never inferred from the shapes alone."""
    if info.get("batchable") is not True:
        return False
    items = [*(info.get("inputs") or []), *(info.get("outputs") or [])]
    for item in items:
        shape = item.get("shape") if isinstance(item, dict) else None
        dtype = item.get("dtype") if isinstance(item, dict) else None
        if not isinstance(dtype, str) or "<" in dtype:
            return False  # a sequence or map: rows cannot be split back
        if shape is not None and (not isinstance(shape, list) or not shape):
            return False
    return bool(items)


def decide(info: Mapping[str, Any] | None, *, max_batch: int) -> tuple[bool, str]:
    """Whether calls of this model are joined, and why (for the start-up log
    and ``start()``'s answer)."""
    if max_batch <= 1:
        return False, "--max-batch 1"
    if info is None:
        return False, "no worker has started yet"
    if info.get("batchable") is not True:
        return False, "not declared batchable by its publisher (vault seal --batchable)"
    if not batchable(info):
        return False, "declared batchable, but an input or output is not a tensor with a dim 0"
    return True, f"declared batchable by its publisher; up to {max_batch} rows a batch"


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
