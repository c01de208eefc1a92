"""The append-only, hash-chained audit log.

Every decision the key server takes (licence issued, key released, request
denied and why, lease renewed, usage reported, licence revoked, key
registered, master key rotated) is one row. Each row's ``hash`` is

    SHA-256("vault-audit/v1" || prev_hash || canonical JSON of the row)

so editing a row breaks its own hash, re-hashing an edited row breaks the
next row's ``prev_hash``, and deleting a row leaves a gap in ``seq`` (and a
deleted tail shows against SQLite's AUTOINCREMENT high-water mark). A
tamperer who rewrites the whole chain from the edit onwards is caught only
by an external anchor: export :func:`head` somewhere else now and then.

Example::

    append(store, ts=time.time(), event="released", licence_id="lic-1", detail={"key_id": "k1"})
    problems = verify(store)   # [] when intact
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .store import Store

__all__ = ["GENESIS", "AuditProblem", "AuditRecord", "append", "head", "records", "verify"]

GENESIS = b"\x00" * 32
_DOMAIN = b"vault-audit/v1\x00"


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    ts: float
    event: str
    actor: str | None
    licence_id: str | None
    model_id: str | None
    detail: str  # canonical JSON text
    prev_hash: bytes
    hash: bytes

    def canonical(self) -> bytes:
        return _canonical(
            self.seq, self.ts, self.event, self.actor, self.licence_id, self.model_id, self.detail
        )


@dataclass(frozen=True)
class AuditProblem:
    position: int  # the seq (1-based position in the chain) where the problem shows
    reason: str

    def __str__(self) -> str:
        return f"record {self.position}: {self.reason}"


def _canonical(
    seq: int,
    ts: float,
    event: str,
    actor: str | None,
    licence_id: str | None,
    model_id: str | None,
    detail: str,
) -> bytes:
    # repr(float) round-trips exactly, so the verifier recomputes the same bytes.
    obj = [seq, repr(float(ts)), event, actor, licence_id, model_id, detail]
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode()


def _hash(prev: bytes, canonical: bytes) -> bytes:
    return hashlib.sha256(_DOMAIN + prev + canonical).digest()


def append(
    store: Store,
    *,
    ts: float,
    event: str,
    actor: str | None = None,
    licence_id: str | None = None,
    model_id: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> int:
    """Append one record inside the caller's transaction; returns its seq.

    Raises one of ``store.errors`` when the write fails: callers must then
    release nothing (fail closed).
    """
    from .store import AuditRow

    last = store.audit_head()
    seq, prev = (1, GENESIS) if last is None else (last[0] + 1, last[1])
    text = json.dumps(dict(detail or {}), sort_keys=True, separators=(",", ":"))
    digest = _hash(prev, _canonical(seq, ts, event, actor, licence_id, model_id, text))
    store.insert_audit(AuditRow(seq, ts, event, actor, licence_id, model_id, text, prev, digest))
    return seq


def records(store: Store) -> Iterator[AuditRecord]:
    for r in store.audit_rows():
        yield AuditRecord(
            r.seq, r.ts, r.event, r.actor, r.licence_id, r.model_id, r.detail, r.prev_hash, r.hash
        )


def head(store: Store) -> tuple[int, bytes]:
    """(seq, hash) of the last record: the value to anchor externally."""
    last = store.audit_head()
    return (0, GENESIS) if last is None else last


def verify(store: Store) -> list[AuditProblem]:
    """Walk the chain; one problem per break, each with its position."""
    problems: list[AuditProblem] = []
    expected, prev = 1, GENESIS
    for rec in records(store):
        gap = rec.seq != expected
        if gap:
            missing = (
                f"record {expected} deleted"
                if rec.seq == expected + 1
                else f"records {expected}..{rec.seq - 1} deleted"
            )
            problems.append(AuditProblem(expected, missing))
        elif rec.prev_hash != prev:
            problems.append(AuditProblem(rec.seq, "chain broken: previous record was altered"))
        if _hash(rec.prev_hash, rec.canonical()) != rec.hash:
            problems.append(AuditProblem(rec.seq, "record edited: hash does not match contents"))
        expected, prev = rec.seq + 1, rec.hash
    high = store.audit_high_water()
    if high >= expected:
        what = f"record {expected}" if high == expected else f"records {expected}..{high}"
        problems.append(AuditProblem(expected, f"{what} deleted from the end of the log"))
    return problems
