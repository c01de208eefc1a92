"""Signed audit checkpoints, kept where the database writer cannot rewrite them.

The hash chain (:mod:`keyserver.audit`) shows an edited or deleted record,
but somebody who can write the database can also re-hash the whole chain
after an edit, and the chain then verifies. So the key server also writes
its chain head, signed with its own Ed25519 audit key (``DIR/audit.key``),
as one line of an *anchor* file outside the database
(``vault keyserver serve --anchor PATH``): after every batch that appended
records, before any reply of that batch leaves (a released key is always
covered by a checkpoint), and once at start-up. Put the anchor where the
database's writers cannot write (another volume, a file with the append-only
attribute, a log shipper's input); the server only ever appends to it.

``vault keyserver audit DIR --verify --anchor PATH`` checks every line's
signature against ``DIR/audit.pub`` and that the record at each
checkpoint's position still has the checkpointed hash: any rewrite of the
log up to the last checkpoint fails, and so does a log cut shorter than it.

One line::

    {"v": 1, "seq": 42, "head": "9f..", "ts": 1764064800.12, "key": "ab12..", "sig": "base64"}

Example::

    writer = AnchorWriter("/var/lib/vault-anchor/audit.anchor", PublisherKey.load("ks/audit.key"))
    writer(42, head_hash, time.time())
    problems, last = verify_anchor(store, "/var/lib/vault-anchor/audit.anchor", public_raw)
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vault.core import crypto as _crypto
from vault.core.errors import IntegrityError

from .audit import AuditProblem

if TYPE_CHECKING:
    from .store import Store

__all__ = ["AnchorWriter", "Checkpoint", "verify_anchor"]

_DOMAIN = b"vault-audit-checkpoint/v1\x00"
_MAX_LINE = 4096


def _message(seq: int, head: bytes, ts: float) -> bytes:
    return _DOMAIN + json.dumps([seq, head.hex(), repr(float(ts))]).encode()


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    head: bytes
    ts: float
    line: int  # 1-based line number in the anchor file

    def when(self) -> str:
        return _dt.datetime.fromtimestamp(self.ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class AnchorWriter:
    """Appends signed checkpoints to ``path`` (O_APPEND, fsync per line)."""

    def __init__(self, path: str | os.PathLike[str], key: _crypto.PublisherKey) -> None:
        self.path = os.fspath(path)
        self._key = key
        # made 0600: each line's time and position tell when, and how often, the
        # key server decided something (another local user reading them learns
        # the callers' activity); an operator may open an existing file to a
        # log shipper, whose mode is left as it is
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o600)

    def __call__(self, seq: int, head: bytes, ts: float) -> None:
        sig = self._key.sign(_message(seq, head, ts))
        line = {
            "v": 1,
            "seq": seq,
            "head": head.hex(),
            "ts": ts,
            "key": self._key.fingerprint,
            "sig": base64.b64encode(sig).decode(),
        }
        data = (json.dumps(line, sort_keys=True) + "\n").encode()
        # one write() of a short line to an O_APPEND file: lines from two
        # replicas sharing one anchor never interleave
        if os.write(self._fd, data) != len(data):
            raise OSError("short write to the audit anchor")
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _parse(raw: bytes, n: int, public_raw: bytes) -> Checkpoint:
    if len(raw) > _MAX_LINE:
        raise ValueError("line too long")
    obj = json.loads(raw)
    if not isinstance(obj, dict) or obj.get("v") != 1:
        raise ValueError("not a checkpoint")
    seq, head_hex, ts, sig = obj["seq"], obj["head"], obj["ts"], obj["sig"]
    if not isinstance(seq, int) or not isinstance(head_hex, str) or not isinstance(ts, float):
        raise ValueError("malformed fields")
    head = bytes.fromhex(head_hex)
    try:
        _crypto.verify_signature(public_raw, base64.b64decode(sig), _message(seq, head, ts))
    except IntegrityError:
        raise ValueError("bad signature") from None
    return Checkpoint(seq, head, ts, n)


def verify_anchor(
    store: Store, path: str | os.PathLike[str], public_raw: bytes
) -> tuple[list[AuditProblem], Checkpoint | None]:
    """Problems found by checking the log against every checkpoint in the
    anchor at ``path``, and the last valid checkpoint."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        return [AuditProblem(0, f"anchor {p} cannot be read ({exc.strerror})")], None
    problems: list[AuditProblem] = []
    checkpoints: list[Checkpoint] = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            checkpoints.append(_parse(raw, n, public_raw))
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(
                AuditProblem(0, f"anchor line {n} is not a valid signed checkpoint ({exc})")
            )
    if not checkpoints:
        problems.append(AuditProblem(0, f"anchor {p} holds no valid checkpoint"))
        return problems, None
    hashes = {r.seq: r.hash for r in store.audit_rows()}
    for cp in checkpoints:
        have = hashes.get(cp.seq)
        if cp.seq == 0:
            continue  # an empty log was checkpointed: nothing to compare
        if have is None:
            problems.append(
                AuditProblem(
                    cp.seq,
                    f"missing, but the signed checkpoint of {cp.when()} "
                    f"(anchor line {cp.line}) covers it",
                )  # fmt: skip
            )
        elif have != cp.head:
            problems.append(
                AuditProblem(
                    cp.seq,
                    f"does not match the signed checkpoint of {cp.when()} "
                    f"(anchor line {cp.line}): the log was rewritten",
                )  # fmt: skip
            )
    return problems, max(checkpoints, key=lambda c: c.seq)
