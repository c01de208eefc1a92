"""The key server's decisions, independent of the transport.

:class:`KeyService` takes a batch of parsed requests, runs them in **one**
store transaction (one savepoint each), commits, and only then hands back
the replies. That order is the fail-closed rule: a sealed key leaves the
server only after its audit record is durable; if the commit fails every
reply in the batch becomes an :class:`~vault.core.errors.AuditError`. Batching is
also group commit: one fsync covers every request that arrived together.

Example::

    svc = KeyService(open_store("ks/keyserver.db"), master, server_public_key=pub, publisher_key=pk,
                     address="tcp://127.0.0.1:7700", lease_ttl=60.0)
    [reply] = svc.process_batch([Request(identity=client_key, header=header)])
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from vault.core import crypto as _crypto
from vault.core.errors import (
    AuditError,
    ConfigError,
    KeyServerError,
    LicenceError,
    PermissionDeniedError,
    ProtocolError,
    RateLimitedError,
    UnknownLicenceError,
    UnknownModelError,
    VaultError,
)
from vault.core.licence import Licence
from vault.core.logs import Log
from vault.core.modelscope import MAX_SCOPE, make_scope, scope_items
from vault.core.protocol import error_reply, ok_reply

from . import audit, metering
from .layout import new_licence_id
from .limits import Buckets, Coalescer, Limit, Refusal
from .policy import (
    Context,
    DeviceRecord,
    KeyRecord,
    LicenceRecord,
    Policy,
    default_release_policy,
    default_renew_policy,
)
from .rowauth import RowAuth
from .store import KeyRow, LeaseRow, MeteringId, Store

__all__ = ["DEFAULT_LEASE_TTL", "KeyService", "RequestLimits", "Request"]

DEFAULT_LEASE_TTL = 60.0
DEFAULT_COALESCE = 60.0  # seconds: identical refusals within it make two audit records at most
NOT_YOURS = "no such licence for this client key"
MAX_SKEW = 60.0  # seconds a request's timestamp may differ from the server clock
_MAX_STR = 512


@dataclass(frozen=True)
class RequestLimits:
    """Requests per CURVE identity (a licence holder's key, an enrolled
    device's key) and per licence (what devices ask on its behalf), checked
    before any policy runs; None: no limit. The defaults leave every normal
    use far below them (a worker asks once per open and once per half
    lease) and slow a flood to a trickle."""

    identity: Limit | None = Limit(20.0, 100.0)
    device: Limit | None = Limit(1000.0, 2000.0)
    licence: Limit | None = Limit(50.0, 200.0)
    max_entries: int = 65536


@dataclass(frozen=True)
class Request:
    """One request: the caller's CURVE public key (Z85, from ZAP) and either
    its header or the error met while parsing it."""

    identity: str | None
    header: Mapping[str, Any] | None
    error: VaultError | None = None


class _LostTransaction(Exception):
    """The engine dropped the batch's transaction under us (see _rollback_savepoint)."""


class _Denied(Exception):
    """A decision to refuse, already audited: the savepoint is kept."""

    def __init__(self, error: VaultError) -> None:
        super().__init__(error.code)
        self.error = error


# --- field validation: every malformed field is a ProtocolError ---------------


def _str(h: Mapping[str, Any], name: str, *, optional: bool = False) -> Any:
    v = h.get(name)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v or len(v) > _MAX_STR:
        raise ProtocolError(f"field {name!r} must be a non-empty string")
    return v


def _bytes(h: Mapping[str, Any], name: str, *, max_len: int) -> bytes:
    v = h.get(name)
    if not isinstance(v, bytes) or not v or len(v) > max_len:
        raise ProtocolError(f"field {name!r} must be bytes (at most {max_len})")
    return v


def _num(h: Mapping[str, Any], name: str, *, optional: bool, default: float | None = None) -> Any:
    v = h.get(name)
    if v is None and optional:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ProtocolError(f"field {name!r} must be a non-negative number")
    return float(v)


def _int(h: Mapping[str, Any], name: str, *, optional: bool) -> Any:
    v = h.get(name)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1 << 48:
        raise ProtocolError(f"field {name!r} must be a non-negative integer")
    return v


def _scope(h: Mapping[str, Any]) -> str:
    """The ``model_id`` of an ``issue``: a model scope (one id, several,
    ``prefix*``, ``*``), canonical; a malformed one is a ProtocolError."""
    v = h.get("model_id")
    if not isinstance(v, str) or not v or len(v) > MAX_SCOPE:
        raise ProtocolError("field 'model_id' must be a model id, a list of them or a pattern")
    try:
        return make_scope([v])
    except ConfigError as exc:
        raise ProtocolError(exc.message) from None


def _device_only(caller: LicenceRecord, h: Mapping[str, Any], now: float) -> dict[str, Any]:
    raise PermissionDeniedError(
        "only an enrolled device (a worker service) asks for call decisions"
    )


def _authorize_device_only(
    caller: LicenceRecord, h: Mapping[str, Any], now: float
) -> dict[str, Any]:
    raise PermissionDeniedError("only an enrolled device (a local daemon) asks for authorisation")


class KeyService:
    def __init__(
        self,
        store: Store,
        master: bytearray,
        *,
        server_public_key: str,
        publisher_key: str,
        address: str,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        clock: Callable[[], float] = time.time,
        release_policy: Policy | None = None,
        renew_policy: Policy | None = None,
        log: Callable[..., None] | None = None,
        checkpoint: Callable[[int, bytes, float], None] | None = None,
        limits: RequestLimits | None = None,
        coalesce: float = DEFAULT_COALESCE,
    ) -> None:
        if lease_ttl <= 0:
            raise ValueError("lease_ttl must be positive")
        self.limits = limits or RequestLimits()
        lim = self.limits
        self._by_identity = {
            kind: Buckets(limit, max_entries=lim.max_entries)
            for kind, limit in (("licence", lim.identity), ("device", lim.device))
            if limit is not None
        }
        self._by_licence = (
            Buckets(lim.licence, max_entries=lim.max_entries) if lim.licence is not None else None
        )
        self._identity_kind: dict[str, str] = {}  # from ZAP: which keys are devices
        self.coalescer = Coalescer(coalesce)
        self.store = store
        self._master = master
        self.rows = RowAuth(master)
        self.checkpoint = checkpoint
        self._checkpointed: tuple[int, bytes] | None = None
        self.server_public_key = server_public_key
        self.publisher_key = publisher_key
        self.address = address
        self.lease_ttl = lease_ttl
        self.clock = clock
        self.release_policy = release_policy or default_release_policy()
        self.renew_policy = renew_policy or default_renew_policy()
        # structured events (vault.core.logs.Log): log(event, level=..., **fields)
        self.log: Callable[..., None] = log or Log(sys.stderr, component="keyserver")
        self._nonces: set[bytes] = set()
        self._nonce_expiry: deque[tuple[float, bytes]] = deque()
        self._ops: dict[str, Callable[[LicenceRecord, Mapping[str, Any], float], dict[str, Any]]]
        self._ops = {
            "release": self._release,
            "renew": self._renew,
            "close": self._close,
            "register_key": self._register_key,
            "issue": self._issue,
            "revoke": self._revoke,
            "list": self._list,
            "enroll_device": self._enroll_device,
            "revoke_device": self._revoke_device,
            "list_devices": self._list_devices,
            "call_decisions": _device_only,  # answered in _device_op (keyserver/calls.py)
            "authorize": _authorize_device_only,  # answered in _device_op
        }

    # --- admission (ZAP) -------------------------------------------------------

    def admits(self, client_public_key: str) -> bool:
        """Whether a CURVE key may connect: any licence holder or admin, or an
        enrolled device that is not revoked, looked up live (a licence issued
        a second ago connects). Revoked holders are admitted so they hear the
        typed 'revoked' denial instead of silence; a revoked device is not."""
        if self.store.has_client_key(client_public_key):
            self._note_identity(client_public_key, "licence")
            return True
        dev = self.store.device_by_key(client_public_key)
        if dev is None or dev.revoked_at is not None:
            return False
        if not self.rows.device_authentic(dev):  # written into the database by someone else
            self.log("row_refused", level="error", table="devices", device=dev.device_id,
                     reason="its tag does not match: not written by this key server")  # fmt: skip
            return False
        self._note_identity(client_public_key, "device")
        return True

    def _note_identity(self, key: str, kind: str) -> None:
        """Which request limit a connected key gets (bounded: the oldest go)."""
        kinds = self._identity_kind
        kinds.pop(key, None)
        kinds[key] = kind
        while len(kinds) > self.limits.max_entries:
            del kinds[next(iter(kinds))]

    # --- batches ---------------------------------------------------------------

    def process_batch(self, requests: Sequence[Request]) -> list[dict[str, Any]]:
        now = self.clock()
        try:
            self.store.begin()
        except self.store.errors as exc:
            self.log("batch_refused", level="error", error=type(exc).__name__,
                     reason="cannot open a transaction")  # fmt: skip
            return [self._audit_failed(r) for r in requests]
        self._batch_broken = False
        self.coalescer.begin()
        try:
            self._write_repeats(self.coalescer.due(now), now)
        except self.store.errors:
            self._batch_broken = True
        replies = [self._one(r, now) for r in requests]
        failures: tuple[type[BaseException], ...] = (_LostTransaction, *self.store.errors)
        head: tuple[int, bytes] | None = None
        try:
            if self._batch_broken:
                raise _LostTransaction("transaction was lost mid-batch")
            if self.checkpoint is not None:
                head = audit.head(self.store)  # the head this batch leaves
            self.store.commit()
        except failures as exc:
            self.log("commit_failed", level="error", error=type(exc).__name__,
                     reason="nothing released")  # fmt: skip
            self.coalescer.rollback()
            if self.store.in_transaction:
                try:
                    self.store.rollback()
                except self.store.errors:
                    pass
            return [
                rep if self._is_ping(req) else self._audit_failed(req)
                for req, rep in zip(requests, replies)
            ]
        self.coalescer.commit()
        if head is not None and head != self._checkpointed:
            # The head leaves the database (signed, to the anchor) before any
            # reply does: a record that let a key out is covered by a
            # checkpoint a database writer cannot rewrite.
            try:
                assert self.checkpoint is not None
                self.checkpoint(head[0], head[1], now)
                self._checkpointed = head
            except Exception as exc:  # noqa: BLE001 - any failure: release nothing
                self.log("checkpoint_failed", level="error", error=type(exc).__name__,
                         reason="nothing released")  # fmt: skip
                return [
                    rep if self._is_ping(req) else self._audit_failed(req)
                    for req, rep in zip(requests, replies)
                ]
        return replies

    @staticmethod
    def _is_ping(req: Request) -> bool:
        return req.header is not None and req.header.get("op") == "ping"

    @staticmethod
    def _audit_failed(req: Request) -> dict[str, Any]:
        rid = req.header.get("id") if req.header is not None else None
        return error_reply(rid, AuditError("audit record could not be written; nothing released"))

    # --- floods: request limits, coalesced refusals (keyserver.limits) ----------

    def tick(self, now: float | None = None) -> None:
        """Write the records of refusal intervals that ended (the server's
        loop calls this when idle; a batch does it too)."""
        if self.coalescer.has_due(self.clock() if now is None else now):
            self.process_batch([])

    def flush_refusals(self) -> None:
        """At stop: every refusal counted and not yet written gets its record."""
        if not self.coalescer.pending():
            return
        now = self.clock()
        self.store.begin()
        self.coalescer.begin()
        try:
            self._write_repeats(self.coalescer.due(now, every=True), now)
            head = audit.head(self.store) if self.checkpoint is not None else None
            self.store.commit()
        except BaseException:
            self.coalescer.rollback()
            if self.store.in_transaction:
                self.store.rollback()
            raise
        self.coalescer.commit()
        if head is not None and self.checkpoint is not None and head != self._checkpointed:
            self.checkpoint(head[0], head[1], now)
            self._checkpointed = head

    def _write_repeats(self, records: list[dict[str, Any]], now: float) -> None:
        for rec in records:
            audit.append(self.store, ts=now, **rec)

    def _audit_refusal(self, event: str, actor: str | None, licence_id: str | None,
                       model_id: str | None, detail: dict[str, Any], now: float) -> None:  # fmt: skip
        """Audit a refusal: at once if it is the first of its kind in its
        interval, else counted for one record at the interval's end."""
        write, pushed = self.coalescer.refusal(
            Refusal(event, actor, licence_id, model_id, detail), now
        )
        self._write_repeats(pushed, now)
        if write:
            audit.append(self.store, ts=now, event=event, actor=actor, licence_id=licence_id,
                         model_id=model_id, detail=detail)  # fmt: skip

    def _limit_identity(self, identity: str | None, op: str, now: float) -> None:
        """The requester's own bucket, before anything else is looked at."""
        if identity is None:
            return
        kind = self._identity_kind.get(identity, "licence")
        buckets = self._by_identity.get(kind)
        if buckets is None:
            return
        wait = buckets.take(identity, now)
        if wait is not None:
            err = RateLimitedError(
                f"too many requests from this {'device' if kind == 'device' else 'client key'}",
                retry_after=wait,
            )
            self._audit_refusal("denied", None, None, None,
                                {"op": op, "reason": err.code, "message": err.message,
                                 "limit": "identity", "identity": identity}, now)  # fmt: skip
            raise _Denied(err)

    def _limit_licence(self, licence_id: str, actor: str, op: str, now: float) -> None:
        """The licence's bucket, for what devices ask on its behalf."""
        if self._by_licence is None:
            return
        wait = self._by_licence.take(licence_id, now)
        if wait is not None:
            err = RateLimitedError(f"too many requests for licence {licence_id}",
                                   retry_after=wait)  # fmt: skip
            self._audit_refusal("denied", actor, licence_id, None,
                                {"op": op, "reason": err.code, "message": err.message,
                                 "limit": "licence"}, now)  # fmt: skip
            raise _Denied(err)

    def _one(self, req: Request, now: float) -> dict[str, Any]:
        rid = req.header.get("id") if req.header is not None else None
        if req.error is not None or req.header is None:
            return error_reply(rid, req.error or ProtocolError())
        h = req.header
        op = h.get("op")
        if op == "ping":
            return ok_reply(rid, pong=True, time=now)
        handler = self._ops.get(op) if isinstance(op, str) else None
        if handler is None:
            return error_reply(rid, ProtocolError(f"unknown op {op!r}"))
        self.store.savepoint()
        try:
            self._limit_identity(req.identity, str(op), now)  # before any policy runs
            self._check_fresh(h, now)
            device = self._device(req.identity, now)
            if device is not None:
                fields = self._device_op(device, str(op), h, now)
            else:
                fields = handler(self._caller(req.identity, now), h, now)
            self.store.release_savepoint()
            return ok_reply(rid, **fields)
        except _Denied as d:
            self.store.release_savepoint()  # keep the audit record of the denial
            return error_reply(rid, d.error)
        except VaultError as exc:
            self._rollback_savepoint()
            return error_reply(rid, exc)
        except self.store.errors as exc:
            self.log("write_failed", level="error", op=str(op), error=type(exc).__name__,
                     reason="fail closed")  # fmt: skip
            self._rollback_savepoint()
            return error_reply(
                rid, AuditError("audit record could not be written; nothing released")
            )
        except Exception as exc:  # a bug; never let it kill the server
            tb = exc.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"
            # type and place only: an exception's text could quote request bytes
            self.log("internal_error", level="error", op=str(op), error=type(exc).__name__,
                     where=where)  # fmt: skip
            self._rollback_savepoint()
            return error_reply(rid, KeyServerError("internal key server error"))

    def _rollback_savepoint(self) -> None:
        try:
            self.store.rollback_savepoint()
        except self.store.errors:
            # The engine rolled back the whole transaction (e.g. disk full):
            # every earlier reply of this batch is void too.
            self._batch_broken = True
            if not self.store.in_transaction:
                self.store.begin()

    def _check_fresh(self, h: Mapping[str, Any], now: float) -> None:
        """Replay defence: each request carries a random nonce and its send
        time. A time more than MAX_SKEW away is refused, so a nonce need only
        be remembered until its own time + MAX_SKEW (<= 2 x MAX_SKEW): memory
        is bounded by the request rate. Kept in memory, not the DB: a restart
        forgets them, which is safe because an application-level replay needs
        the CURVE session (the holder's secret key) in the first place; this
        check stops a buggy or malicious *holder* re-sending a request. A
        licence proof, which travels through a daemon and a worker, is
        different: its use is kept in the database (:meth:`_check_proof_fresh`)."""
        nonce = h.get("nonce")
        if not isinstance(nonce, bytes) or not 8 <= len(nonce) <= 64:
            raise ProtocolError("request needs a random 'nonce' (8-64 bytes)")
        ts = _num(h, "ts", optional=False)
        if abs(now - ts) > MAX_SKEW:
            raise ProtocolError("request timestamp outside the accepted window (clock skew?)")
        self._remember_nonce(nonce, ts, now)

    def _remember_nonce(self, nonce: bytes, ts: float, now: float) -> None:
        expiry = self._nonce_expiry
        while expiry and expiry[0][0] < now:
            self._nonces.discard(expiry.popleft()[1])
        if nonce in self._nonces:
            raise ProtocolError("replayed request (nonce seen before)")
        self._nonces.add(nonce)
        # ts + MAX_SKEW is when the timestamp check alone starts refusing it;
        # entries arrive nearly in order, so the deque front expires first.
        expiry.append((max(now, ts) + MAX_SKEW, nonce))

    def _caller(self, identity: str | None, now: float) -> LicenceRecord:
        if identity is None:
            raise PermissionDeniedError("connection is not CURVE-authenticated")
        rec = self._authentic(self.store.licence_by_key(identity), now)
        if rec is None:
            raise _Denied(UnknownLicenceError("no licence holds this client key"))
        return rec

    def _licence(self, licence_id: str, now: float) -> LicenceRecord | None:
        return self._authentic(self.store.licence(licence_id), now)

    def _authentic(self, rec: LicenceRecord | None, now: float) -> LicenceRecord | None:
        """The row if the key server wrote it; a row with a wrong or missing
        tag (written by someone else into the database) is refused as if
        absent, and reported: a log line and an audit record."""
        if rec is None or self.rows.authentic(rec):
            return rec
        self._report_row(rec, now)
        return None

    def _report_row(self, rec: LicenceRecord, now: float) -> None:
        self.log("row_refused", level="error", table="licences", licence=rec.licence_id,
                 role=rec.role, holder=rec.holder,
                 reason="its tag does not match: not written by this key server")  # fmt: skip
        audit.append(
            self.store, ts=now, event="row_refused", licence_id=rec.licence_id,
            detail={"table": "licences", "role": rec.role, "holder": rec.holder,
                    "client_public_key": rec.client_public_key,
                    "reason": "row not authenticated under the master key"},
        )  # fmt: skip

    def _deny(
        self, caller: LicenceRecord, op: str, error: VaultError, now: float, **detail: Any
    ) -> _Denied:
        self._audit_refusal(
            "denied", caller.licence_id, detail.pop("licence_id", caller.licence_id),
            detail.pop("model_id", None),
            {"op": op, "reason": error.code, "message": error.message, **detail}, now,
        )  # fmt: skip
        if op not in ("release", "renew"):
            self.log("denied", level="warning", op=op, actor=caller.licence_id, code=error.code)
        return _Denied(error)

    def _require_admin(self, caller: LicenceRecord, op: str, now: float) -> None:
        if not caller.is_admin:
            raise self._deny(caller, op, PermissionDeniedError(f"{op} needs an admin licence"), now)

    # --- leases and metering (rules in keyserver.metering) -------------------------

    def _meter(self, lic: LicenceRecord, *, used: int, reserved: int,
               bucket: tuple[float, float] | None = None,
               refund_tokens: int = 0) -> LicenceRecord:  # fmt: skip
        """Store the licence's new counters (and call bucket: tokens at a
        time; None keeps it; ``refund_tokens`` unserved calls of a budget go
        back to it); returns the record as it now is."""
        if bucket is None and refund_tokens:
            bucket = metering.refund(lic, refund_tokens, lease_ttl=self.lease_ttl)
        tokens, at = bucket if bucket is not None else (lic.rate_tokens, lic.rate_at)
        if (used, reserved, tokens, at) == (lic.used_calls, lic.reserved_calls, lic.rate_tokens,
                                            lic.rate_at):  # fmt: skip
            return lic  # nothing metered (an unlimited licence): no write
        new = self.rows.seal(dataclasses.replace(lic, used_calls=used, reserved_calls=reserved,
                                                 rate_tokens=tokens, rate_at=at))  # fmt: skip
        self.store.update_licence(new)
        return new

    def _lapse(self, lic: LicenceRecord, now: float) -> LicenceRecord:
        """Leases past their hard end that never closed (a dead worker): their
        reservation stays spent, as used calls. Audited once each."""
        for lease in self.store.lapsed_leases_of(lic.licence_id, now):
            forfeited = lease.call_budget or 0
            used, reserved = metering.settle(lic, reserved=lease.call_budget, calls=forfeited)
            lic = self._meter(lic, used=used, reserved=reserved) if forfeited else lic
            self.store.end_lease(lease.lease_id)
            audit.append(
                self.store, ts=now, event="lapsed", actor=lic.licence_id,
                licence_id=lic.licence_id, model_id=lease.model_id,
                detail={"lease_id": lease.lease_id, "forfeited_calls": forfeited},
            )  # fmt: skip
        return lic

    def _lease_fields(
        self, lease_id: str, lic: LicenceRecord, now: float, budget: metering.Budget
    ) -> dict[str, Any]:
        expires = now + self.lease_ttl
        return {
            "lease_id": lease_id,
            "ttl": self.lease_ttl,
            "grace": lic.grace,
            "expires_at": expires,
            "hard_end": expires + lic.grace,
            "call_budget": budget.budget,
            "retry_after": budget.retry_after,
            # the rate enforced per call by the worker holding the lease
            "rate": lic.rate_limit,
            "burst": metering.call_burst(lic.rate_limit),
        }

    def _grant(self, lic: LicenceRecord, reserved: int, used: int, now: float, *,
               cap: Callable[[int | None], int] | None = None,
               ) -> tuple[LicenceRecord, metering.Budget]:  # fmt: skip
        """Size a budget from the licence as settled (``used``/``reserved``)
        and reserve it; returns the licence as stored and the budget."""
        settled = dataclasses.replace(lic, used_calls=used, reserved_calls=reserved)
        b = metering.size_budget(settled, now=now, lease_ttl=self.lease_ttl, cap=cap)
        bucket = None if b.tokens is None else (b.tokens, now)
        return self._meter(settled, used=used, reserved=reserved + (b.budget or 0),
                           bucket=bucket), b  # fmt: skip

    # --- ops -----------------------------------------------------------------------

    def _release(self, caller: LicenceRecord, h: Mapping[str, Any], now: float) -> dict[str, Any]:
        """A key request made with a licence's own key (not a device's): only a
        licence issued ``--same-user`` (tier 0) is answered."""
        req = self._release_fields(h)
        ids = {"model_id": req["model_id"], "key_id": req["key_id"]}
        if req["licence_id"] != caller.licence_id:
            # One answer whether the id exists or is somebody else's: the
            # reply must not tell a holder which licence ids exist.
            err: VaultError = UnknownLicenceError(NOT_YOURS)
            raise self._deny(caller, "release", err, now, **ids, asked_for=req["licence_id"])
        self._check_kind(caller, now, ids, actor=caller.licence_id)
        if not caller.same_user:
            err = PermissionDeniedError(
                "a key is released only to an enrolled device: this licence is not --same-user "
                "(use it through `vault daemon`)"
            )
            raise self._deny(caller, "release", err, now, **ids)
        return self._release_key(caller, req, now, device_id="", actor=caller.licence_id)

    @staticmethod
    def _release_fields(h: Mapping[str, Any], *, ephemeral: bool = True) -> dict[str, Any]:
        suite = h.get("suite", "x25519")
        if suite not in _crypto.HPKE_SUITES:
            raise ProtocolError(f"unknown HPKE suite {suite!r}")
        client_key = h.get("client_key", "")
        if not isinstance(client_key, str) or len(client_key) not in (0, 40):
            raise ProtocolError("field 'client_key' must be a Z85 CURVE public key")
        return {
            "model_id": _str(h, "model_id"),
            "key_id": _str(h, "key_id"),
            "digest": _str(h, "package_digest"),
            "licence_id": _str(h, "licence_id"),
            "suite": suite,
            "client_key": client_key,
            "ephemeral": _bytes(h, "ephemeral_key", max_len=4096) if ephemeral else b"",
        }

    def _check_kind(
        self, lic: LicenceRecord, now: float, ids: dict[str, Any], *, actor: str,
        op: str = "release",
    ) -> None:  # fmt: skip
        if lic.kind == "runtime" and not lic.is_admin:
            return
        why = (
            "a call licence gives no key (it is checked by the vendor's service)"
            if lic.kind == "call"
            else f"an {lic.kind} licence gives no key"
        )
        raise self._deny_as(actor, op, PermissionDeniedError(why), now,
                            licence_id=lic.licence_id, **ids)  # fmt: skip

    def _release_key(
        self, caller: LicenceRecord, req: dict[str, Any], now: float, *, device_id: str,
        actor: str,
    ) -> dict[str, Any]:  # fmt: skip
        """The policy, the reserved budget, the lease, the audit record and the
        sealed key (bound to the device that asked; "" for tier 0)."""
        model_id, key_id, digest, suite = (req["model_id"], req["key_id"], req["digest"],
                                           req["suite"])  # fmt: skip
        ids = {"model_id": model_id, "key_id": key_id, "licence_id": caller.licence_id}
        row = self.store.key(model_id, key_id)
        key = None if row is None else KeyRecord(model_id, key_id, row.package_digest)
        lic = self._lapse(caller, now)
        ctx = Context("release", lic, now, model_id, digest, key)
        try:
            self.release_policy.check(ctx)
        except LicenceError as exc:
            raise self._deny_as(actor, "release", exc, now, **ids) from None
        if row is None:
            err = KeyServerError(f"no key {key_id!r} is registered for model {model_id!r}")
            raise self._deny_as(actor, "release", err, now, **ids)
        lic, budget = self._grant(lic, lic.reserved_calls, lic.used_calls, now)
        if budget.budget == 0:
            # Only the rate can do this (QuotaLeft passed): a grant counts against it.
            assert lic.rate_limit is not None
            rl = RateLimitedError(
                f"licence {lic.licence_id} is limited to {lic.rate_limit:g} calls/s",
                retry_after=budget.retry_after,
            )
            raise self._deny_as(actor, "release", rl, now, **ids)
        lease_id = os.urandom(12).hex()
        lease = self._lease_fields(lease_id, lic, now, budget)
        self.store.insert_lease(
            LeaseRow(lease_id, caller.licence_id, model_id, key_id, now, lease["expires_at"],
                     lease["hard_end"], budget.budget, False, 0, device_id or None)
        )  # fmt: skip
        # Audit first; the reply leaves only after COMMIT (see process_batch).
        audit.append(
            self.store, ts=now, event="released", actor=actor,
            licence_id=caller.licence_id, model_id=model_id,
            detail={"key_id": key_id, "lease_id": lease_id, "suite": suite,
                    "package_digest": digest, "reserved_calls": budget.budget,
                    "device_id": device_id or None},
        )  # fmt: skip
        plain = _crypto.unwrap_key(self._master, row.wrapped, key_id=key_id, model_id=model_id)
        try:
            info = _crypto.key_release_info(model_id, digest, caller.licence_id, device_id)
            try:
                sealed = _crypto.hpke_seal(suite, req["ephemeral"], plain, info)
            except VaultError as exc:  # a malformed ephemeral key
                raise ProtocolError("malformed ephemeral public key") from exc
        finally:
            _crypto.zeroize(plain)
        return {"sealed_key": sealed, "suite": suite, "lease": lease}

    # --- devices -------------------------------------------------------------------

    def _device(self, identity: str | None, now: float) -> DeviceRecord | None:
        return (
            None if identity is None else self._device_row(self.store.device_by_key(identity), now)
        )

    def _device_row(self, rec: DeviceRecord | None, now: float) -> DeviceRecord | None:
        """The device row if the key server wrote it; one written into the
        database by anyone else is refused as if absent, and reported."""
        if rec is None or self.rows.device_authentic(rec):
            return rec
        self.log("row_refused", level="error", table="devices", device=rec.device_id,
                 reason="its tag does not match: not written by this key server")  # fmt: skip
        audit.append(
            self.store, ts=now, event="row_refused",
            detail={"table": "devices", "device_id": rec.device_id,
                    "public_key": rec.public_key,
                    "reason": "row not authenticated under the master key"},
        )  # fmt: skip
        return None

    def _deny_as(
        self, actor: str, op: str, error: VaultError, now: float, **detail: Any
    ) -> _Denied:
        """Audit a denial whose actor may be a device, then refuse."""
        self._audit_refusal(
            "denied", actor, detail.pop("licence_id", None), detail.pop("model_id", None),
            {"op": op, "reason": error.code, "message": error.message, **detail}, now,
        )  # fmt: skip
        if op not in ("release", "renew", "close", "authorize"):
            self.log("denied", level="warning", op=op, actor=actor, code=error.code)
        return _Denied(error)

    def _device_op(
        self, device: DeviceRecord, op: str, h: Mapping[str, Any], now: float
    ) -> dict[str, Any]:
        """A request made as an enrolled device: a key release (with the
        caller's licence proof), and renewing or closing its own leases."""
        actor = device.device_id
        if device.revoked_at is not None:
            err: VaultError = PermissionDeniedError(f"device {device.device_id} was revoked")
            raise self._deny_as(actor, op, err, now)
        if op in ("renew", "close"):
            lease = self.store.device_lease(_str(h, "lease_id"), device.device_id)
            lic = None if lease is None else self._licence(lease.licence_id, now)
            if lic is None:
                raise LicenceError("unknown lease")
            handler = self._renew if op == "renew" else self._close
            return handler(lic, h, now, device_id=device.device_id)
        if op == "call_decisions":  # a worker service checking its callers' call licences
            from .calls import call_decisions

            return call_decisions(self, device, h, now)
        if op not in ("release", "authorize"):
            err = PermissionDeniedError(
                f"a device may only ask for keys and renew or close its leases, not {op}"
            )
            raise self._deny_as(actor, op, err, now)
        req = self._release_fields(h, ephemeral=op == "release")
        ids = {"model_id": req["model_id"], "key_id": req["key_id"]}
        if h.get("device_id") not in (None, device.device_id):
            err = PermissionDeniedError("device id does not match the connecting device")
            raise self._deny_as(actor, op, err, now, **ids)
        lic = self._licence(req["licence_id"], now)
        if lic is None or not self._proof_verifies(lic, device, req, h):
            # one answer for an unknown licence and for a proof that fails
            # (another holder's, another device's, another caller key's): the
            # reply does not tell which licence ids exist (the audit does)
            raise self._deny_as(actor, op, UnknownLicenceError(NOT_YOURS), now,
                                asked_for=req["licence_id"], proof="bad", **ids)  # fmt: skip
        self._limit_licence(lic.licence_id, actor, op, now)  # its holder signed this one
        self._check_kind(lic, now, ids, actor=actor, op=op)
        if lic.devices and device.device_id not in lic.devices:
            err = PermissionDeniedError(
                f"licence {lic.licence_id} is not valid on device {device.device_id}"
            )
            raise self._deny_as(actor, op, err, now, licence_id=lic.licence_id, **ids)
        self._check_proof_fresh(lic, h, now, actor=actor, ids=ids, op=op)
        if op == "authorize":
            return self._authorize(lic, req, now, device_id=device.device_id, actor=actor)
        return self._release_key(lic, req, now, device_id=device.device_id, actor=actor)

    def _authorize(
        self, lic: LicenceRecord, req: dict[str, Any], now: float, *, device_id: str, actor: str
    ) -> dict[str, Any]:
        """The daemon's question before it starts or assigns a worker: would a
        release of this key be granted now? Every rule a release applies
        (revocation, expiry, model, digest, quota, the rate bucket holding a
        call), with nothing released and nothing debited; audited either way."""
        model_id, key_id, digest = req["model_id"], req["key_id"], req["digest"]
        ids = {"model_id": model_id, "key_id": key_id, "licence_id": lic.licence_id}
        row = self.store.key(model_id, key_id)
        key = None if row is None else KeyRecord(model_id, key_id, row.package_digest)
        lic = self._lapse(lic, now)
        try:
            self.release_policy.check(Context("release", lic, now, model_id, digest, key))
        except LicenceError as exc:
            raise self._deny_as(actor, "authorize", exc, now, **ids) from None
        if row is None:
            err: VaultError = KeyServerError(
                f"no key {key_id!r} is registered for model {model_id!r}"
            )
            raise self._deny_as(actor, "authorize", err, now, **ids)
        budget = metering.size_budget(lic, now=now, lease_ttl=self.lease_ttl)
        if budget.budget == 0:  # QuotaLeft passed: only the rate can say no
            assert lic.rate_limit is not None
            err = RateLimitedError(
                f"licence {lic.licence_id} is limited to {lic.rate_limit:g} calls/s"
            )
            raise self._deny_as(actor, "authorize", err, now, **ids)
        audit.append(
            self.store, ts=now, event="authorized", actor=actor, licence_id=lic.licence_id,
            model_id=model_id,
            detail={"key_id": key_id, "package_digest": digest, "device_id": device_id},
        )  # fmt: skip
        return {"authorized": True, "licence_id": lic.licence_id, "expires_at": lic.expires_at}

    @staticmethod
    def _proof_verifies(
        lic: LicenceRecord, device: DeviceRecord, req: dict[str, Any], h: Mapping[str, Any]
    ) -> bool:
        """The caller's signature with the licence's proof key over this very
        request: licence, device, model, key, package, a nonce, a time, and
        the CURVE key of the caller the worker will answer (a relay that puts
        its own key there holds no proof for it)."""
        sig, nonce, ts = h.get("proof"), h.get("proof_nonce"), h.get("proof_ts")
        if (
            not lic.proof_public_key
            or not isinstance(sig, bytes)
            or not isinstance(nonce, bytes)
            or not 8 <= len(nonce) <= 64
            or isinstance(ts, bool)
            or not isinstance(ts, (int, float))
            or not math.isfinite(ts)
        ):
            return False
        msg = _crypto.licence_proof_message(
            licence_id=lic.licence_id, device_id=device.device_id, model_id=req["model_id"],
            key_id=req["key_id"], package_digest=req["digest"], nonce=nonce, ts=float(ts),
            client_key=req["client_key"],
        )  # fmt: skip
        try:
            _crypto.verify_signature(base64.b64decode(lic.proof_public_key), sig, msg)
        except (VaultError, ValueError):
            return False
        return True

    def _check_proof_fresh(
        self, lic: LicenceRecord, h: Mapping[str, Any], now: float, *, actor: str,
        ids: dict[str, Any], op: str = "release",
    ) -> None:  # fmt: skip
        """A valid proof is good once for each step of one open, within the
        clock-skew window: one authorisation (the daemon's, before any worker)
        and one release (the worker's). Its use is recorded in the database
        (until it is stale anyway), so it is good once across every replica
        of a PostgreSQL store and across restarts, not once per process; a
        proof that verified is spent once the step is granted or refused
        (the use commits with the grant or with the refusal's audit record)."""
        ts, nonce = float(h["proof_ts"]), bytes(h["proof_nonce"])
        err: VaultError | None = None
        if abs(now - ts) > MAX_SKEW:
            err = PermissionDeniedError("licence proof is stale (clock skew?)")
        else:
            step = b"release" if op == "release" else b"authorize"
            ident = hashlib.sha256(b"\0".join([b"vault-proof-use/v1", step,
                                                lic.licence_id.encode(), nonce])).hexdigest()  # fmt: skip
            if not self.store.use_proof(ident, expires_at=max(now, ts) + MAX_SKEW, now=now):
                err = PermissionDeniedError("licence proof was used before")
        if err is not None:
            raise self._deny_as(actor, op, err, now, licence_id=lic.licence_id, **ids)

    def _report(self, caller: LicenceRecord, h: Mapping[str, Any], now: float, op: str,
                device_id: str | None = None
                ) -> tuple[LicenceRecord, LeaseRow, int, int, int]:  # fmt: skip
        """The lease named in ``h`` and the licence with its ``calls`` settled:
        (licence, lease, used, reserved-without-this-lease, calls)."""
        lease_id = _str(h, "lease_id")
        calls = _int(h, "calls", optional=True) or 0
        report_id = h.get("report_id")
        if report_id is not None:
            if not isinstance(report_id, str) or not 8 <= len(report_id) <= 64:
                raise ProtocolError("field 'report_id' must be a string of 8-64 characters")
            if self.store.metering_id(report_id) is not None:
                calls = 0  # sent again after its answer was lost: counted already
            else:
                self.store.insert_metering_id(
                    MeteringId(report_id, "report", caller.licence_id), at=now
                )
        # a lease granted to a device is renewed and closed by that device only
        lease = (
            self.store.lease(lease_id, caller.licence_id)
            if device_id is None
            else self.store.device_lease(lease_id, device_id)
        )
        if lease is None:
            raise LicenceError("unknown lease")
        lic = caller
        if lease.ended:
            used, reserved = lic.used_calls + calls, lic.reserved_calls
        else:
            used, reserved = metering.settle(lic, reserved=lease.call_budget, calls=calls)
        if calls:
            audit.append(
                self.store, ts=now, event="usage", actor=caller.licence_id,
                licence_id=caller.licence_id, model_id=lease.model_id,
                detail={"lease_id": lease_id, "calls": calls, "op": op},
            )  # fmt: skip
        return lic, lease, used, reserved, calls

    def _renew(self, caller: LicenceRecord, h: Mapping[str, Any], now: float, *,
               device_id: str | None = None) -> dict[str, Any]:  # fmt: skip
        lic, row, used, reserved, calls = self._report(caller, h, now, "renew", device_id)
        lease_id = row.lease_id
        unused = 0 if row.ended or row.call_budget is None else max(0, row.call_budget - calls)
        settled = self._meter(lic, used=used, reserved=reserved, refund_tokens=unused)
        try:
            self.renew_policy.check(Context("renew", settled, now, row.model_id))
            if row.ended:
                raise LicenceError("lease already ended")
        except LicenceError as exc:
            self.store.end_lease(lease_id, calls=calls)
            raise self._deny(settled, "renew", exc, now, model_id=row.model_id,
                             lease_id=lease_id) from None  # fmt: skip
        lic, budget = self._grant(settled, reserved, used, now)
        lease = self._lease_fields(lease_id, lic, now, budget)
        self.store.extend_lease(lease_id, expires_at=lease["expires_at"],
                                hard_end=lease["hard_end"], call_budget=budget.budget,
                                calls=calls)  # fmt: skip
        audit.append(
            self.store, ts=now, event="renewed", actor=caller.licence_id,
            licence_id=caller.licence_id, model_id=row.model_id,
            detail={"lease_id": lease_id, "late": now > row.hard_end,
                    "reserved_calls": budget.budget},
        )  # fmt: skip
        return {"lease": lease}

    def _close(self, caller: LicenceRecord, h: Mapping[str, Any], now: float, *,
               device_id: str | None = None) -> dict[str, Any]:  # fmt: skip
        """The worker is done with the lease: its last calls are used, the rest
        of its reservation is refunded to the quota."""
        lic, row, used, reserved, calls = self._report(caller, h, now, "close", device_id)
        refunded = 0 if row.ended or row.call_budget is None else max(0, row.call_budget - calls)
        self._meter(lic, used=used, reserved=reserved, refund_tokens=refunded)
        self.store.end_lease(row.lease_id, calls=calls)
        if not row.ended:
            audit.append(
                self.store, ts=now, event="closed", actor=caller.licence_id,
                licence_id=caller.licence_id, model_id=row.model_id,
                detail={"lease_id": row.lease_id, "calls": calls, "refunded_calls": refunded},
            )  # fmt: skip
        return {"lease_id": row.lease_id, "refunded_calls": refunded, "used_calls": used}

    def _register_key(
        self, caller: LicenceRecord, h: Mapping[str, Any], now: float
    ) -> dict[str, Any]:
        self._require_admin(caller, "register_key", now)
        model_id = _str(h, "model_id")
        key_id = _str(h, "key_id")
        digest = _str(h, "package_digest")
        signer = _str(h, "publisher", optional=True)  # absent from clients before it
        if signer is not None and self.publisher_key:
            ours = _crypto.fingerprint(base64.b64decode(self.publisher_key))
            if signer != ours:
                raise KeyServerError(
                    f"model {model_id!r}: the package is signed by publisher key {signer}, "
                    f"not by this key server's ({ours}): no licence it issues could open it; "
                    "seal with this key server's publisher.key"
                )
        key = bytearray(_bytes(h, "key", max_len=_crypto.KEY_SIZE))
        try:
            if len(key) != _crypto.KEY_SIZE:
                raise ProtocolError(f"field 'key' must be {_crypto.KEY_SIZE} bytes")
            row = self.store.key(model_id, key_id)
            if row is not None:
                old = _crypto.unwrap_key(
                    self._master, row.wrapped, key_id=key_id, model_id=model_id
                )
                same = old == key and row.package_digest == digest
                _crypto.zeroize(old)
                if not same:
                    raise KeyServerError(
                        f"key {key_id!r} of model {model_id!r} is already registered differently"
                    )
                return {"created": False}
            wrapped = _crypto.wrap_key(self._master, key, key_id=key_id, model_id=model_id)
        finally:
            _crypto.zeroize(key)
        self.store.insert_key(KeyRow(model_id, key_id, digest, wrapped), registered_at=now)
        audit.append(
            self.store, ts=now, event="key_registered", actor=caller.licence_id,
            model_id=model_id, detail={"key_id": key_id, "package_digest": digest},
        )  # fmt: skip
        self.log("key_registered", key_id=key_id, model=model_id)
        return {"created": True}

    def _issue(self, caller: LicenceRecord, h: Mapping[str, Any], now: float) -> dict[str, Any]:
        self._require_admin(caller, "issue", now)
        model_id = _scope(h)
        holder = _str(h, "holder")
        expires = _num(h, "expires", optional=True)
        max_calls = _int(h, "max_calls", optional=True)
        rate_limit = _num(h, "rate_limit", optional=True)
        grace = _num(h, "grace", optional=True, default=0.0)
        if rate_limit is not None and rate_limit <= 0:
            raise ProtocolError("field 'rate_limit' must be positive")
        require_key = h.get("require_key", False)
        if not isinstance(require_key, bool):
            raise ProtocolError("field 'require_key' must be a boolean")
        # each id the scope names must be known; a pattern ("digits-*", "*") covers
        # the models registered now and later, so it needs none yet
        unknown = [m for m in scope_items(model_id) if not m.endswith("*")
                   and not self._known_model(m)] if require_key else []  # fmt: skip
        if unknown:
            known = self.store.model_ids(limit=20)
            raise UnknownModelError(
                f"the key server has no key for model {unknown[0]!r} (registered: "
                f"{', '.join(known) if known else 'none'}); seal and register it first, "
                "or issue it anyway with --force"
            )
        kind, same_user, devices = self._issue_kind(h)
        public, secret = zmq.curve_keypair()
        proof_key = _crypto.PublisherKey.generate()
        proof_public = base64.b64encode(proof_key.public_raw).decode()
        licence_id = new_licence_id()
        expires_at = None if expires is None else now + expires
        self.store.insert_licence(self.rows.seal(
            LicenceRecord(licence_id, holder, "caller", model_id, public.decode(), now,
                          expires_at, max_calls, rate_limit, grace, None, 0, kind=kind,
                          same_user=same_user, devices=tuple(devices),
                          proof_public_key=proof_public)
        ))  # fmt: skip
        audit.append(
            self.store, ts=now, event="issued", actor=caller.licence_id, licence_id=licence_id,
            model_id=model_id,
            detail={"holder": holder, "expires_at": expires_at, "max_calls": max_calls,
                    "rate_limit": rate_limit, "grace": grace, "kind": kind,
                    "same_user": same_user, "devices": devices},
        )  # fmt: skip
        self.log("issued", licence=licence_id, holder=holder, models=model_id, kind=kind)
        lic = Licence(
            licence_id=licence_id,
            holder=holder,
            keyserver_address=self.address,
            keyserver_public_key=self.server_public_key,
            client_public_key=public.decode(),
            client_secret_key=secret.decode(),
            publisher_key=self.publisher_key,
            model_id=model_id,
            role="caller",
            kind=kind,
            same_user=same_user,
            devices=tuple(devices),
            proof_key=base64.b64encode(proof_key.export_private_raw()).decode(),
            expires_at=expires_at,
            max_calls=max_calls,
            rate_limit=rate_limit,
            grace=grace,
        )
        return {"licence": lic.to_json()}

    def _known_model(self, model_id: str) -> bool:
        """A key is registered for it; or it is a hybrid's plain head
        (``ID.head``, ``ID.head.cK``) whose sealed tail (``ID.tail...``) is."""
        if self.store.has_model(model_id):
            return True
        return ".head" in model_id and self.store.has_model(model_id.replace(".head", ".tail", 1))

    def _issue_kind(self, h: Mapping[str, Any]) -> tuple[str, bool, list[str]]:
        kind = h.get("kind", "runtime")
        if kind not in ("runtime", "call"):
            raise ProtocolError("field 'kind' must be 'runtime' or 'call'")
        same_user = h.get("same_user", False)
        if not isinstance(same_user, bool):
            raise ProtocolError("field 'same_user' must be a boolean")
        if same_user and kind != "runtime":
            raise ProtocolError("only a runtime licence can be --same-user")
        devices = h.get("devices") or []
        if not isinstance(devices, list) or len(devices) > 256:
            raise ProtocolError("field 'devices' must be a list of device ids")
        for d in devices:
            if (
                not isinstance(d, str)
                or self._device_row(self.store.device(d), self.clock()) is None
            ):
                raise KeyServerError(f"no enrolled device {d!r}")
        if devices and kind != "runtime":
            raise ProtocolError("only a runtime licence names devices")
        return kind, same_user, sorted(set(devices))

    def _revoke(self, caller: LicenceRecord, h: Mapping[str, Any], now: float) -> dict[str, Any]:
        self._require_admin(caller, "revoke", now)
        licence_id = _str(h, "licence_id")
        target = self._licence(licence_id, now)
        if target is None:
            raise UnknownLicenceError(f"no licence {licence_id}")
        if target.licence_id == caller.licence_id:
            raise PermissionDeniedError("refusing to revoke the licence making the request")
        if target.revoked_at is not None:
            return {"licence_id": licence_id, "revoked_at": target.revoked_at, "already": True}
        # Its open leases end at their next renewal (NotRevoked), which also
        # settles what they reserved.
        self.store.update_licence(self.rows.seal(dataclasses.replace(target, revoked_at=now)))
        audit.append(
            self.store, ts=now, event="revoked", actor=caller.licence_id, licence_id=licence_id,
            model_id=target.model_id, detail={"holder": target.holder},
        )  # fmt: skip
        self.log("revoked", licence=licence_id)
        return {"licence_id": licence_id, "revoked_at": now, "already": False}

    def _list(self, caller: LicenceRecord, h: Mapping[str, Any], now: float) -> dict[str, Any]:
        self._require_admin(caller, "list", now)
        from .calls import lapse_grants

        lapse_grants(self, now)  # what the list shows is reserved now
        out = []
        for rec in self.store.licences():
            authentic = self._authentic(rec, now) is not None
            out.append(
                {
                    "licence_id": rec.licence_id,
                    "holder": rec.holder,
                    "role": rec.role,
                    "model_id": rec.model_id,
                    "issued_at": rec.issued_at,
                    "expires_at": rec.expires_at,
                    "max_calls": rec.max_calls,
                    "used_calls": rec.used_calls,
                    "reserved_calls": rec.reserved_calls,
                    "rate_limit": rec.rate_limit,
                    "grace": rec.grace,
                    "revoked": rec.revoked_at is not None,
                    "revoked_at": rec.revoked_at,
                    "kind": rec.kind,
                    "same_user": rec.same_user,
                    "devices": list(rec.devices),
                    "authentic": authentic,  # False: a row the key server refuses
                }
            )
        return {"licences": out}

    # --- devices (admin) ---------------------------------------------------------------

    def _enroll_device(
        self, caller: LicenceRecord, h: Mapping[str, Any], now: float
    ) -> dict[str, Any]:
        self._require_admin(caller, "enroll_device", now)
        from vault.core.device import device_id_for

        device_id = _str(h, "device_id")
        public_key = _str(h, "public_key")
        name = _str(h, "name", optional=True) or device_id
        if len(public_key) != 40 or device_id_for(public_key) != device_id:
            raise ProtocolError("device id and public key do not belong together")
        service = h.get("service", False)
        if not isinstance(service, bool):
            raise ProtocolError("service is true or false")
        old = self._device_row(self.store.device(device_id), now)
        if old is not None:
            if old.revoked_at is not None:
                raise PermissionDeniedError(f"device {device_id} was revoked; make a new one")
            if old.public_key != public_key:
                raise ProtocolError("device id and public key do not belong together")
            if service and not self.is_service_device(device_id):
                self._designate_service(caller, device_id, now)  # an enrolled device made a service
                return {"device_id": device_id, "created": False, "service": True}
            return {"device_id": device_id, "created": False,
                    "service": self.is_service_device(device_id)}  # fmt: skip
        if self.store.has_client_key(public_key):
            raise ProtocolError("that key already belongs to a licence")
        self.store.insert_device(
            self.rows.seal_device(DeviceRecord(device_id, public_key, name, now,
                                               caller.licence_id, None))
        )  # fmt: skip
        audit.append(
            self.store, ts=now, event="device_enrolled", actor=caller.licence_id,
            detail={"device_id": device_id, "name": name, "public_key": public_key,
                    "service": service},
        )  # fmt: skip
        self.log("device_enrolled", device=device_id, name=name, service=service)
        if service:
            self._designate_service(caller, device_id, now)
        return {"device_id": device_id, "created": True, "service": service}

    def _designate_service(self, caller: LicenceRecord, device_id: str, now: float) -> None:
        """Name an enrolled device one of the vendor's worker services: only
        those ask for call decisions and report calls served under call
        licences (a customer's daemon is a device too)."""
        self.store.insert_service_device(
            device_id, self.rows.tag("service_devices", [device_id]).hex()
        )
        audit.append(
            self.store, ts=now, event="device_service", actor=caller.licence_id,
            detail={"device_id": device_id},
        )  # fmt: skip

    def is_service_device(self, device_id: str) -> bool:
        """Whether the vendor enrolled ``device_id`` as a worker service (its
        row present and its tag good: a row written into the database by
        hand is not one)."""
        tag = self.store.service_device_tag(device_id)
        if tag is None:
            return False
        try:
            mac = bytes.fromhex(tag)
        except ValueError:
            return False
        return self.rows.ok("service_devices", [device_id], mac)

    def _revoke_device(
        self, caller: LicenceRecord, h: Mapping[str, Any], now: float
    ) -> dict[str, Any]:
        self._require_admin(caller, "revoke_device", now)
        device_id = _str(h, "device_id")
        dev = self._device_row(self.store.device(device_id), now)
        if dev is None:
            raise KeyServerError(f"no enrolled device {device_id}")
        if dev.revoked_at is not None:
            return {"device_id": device_id, "revoked_at": dev.revoked_at, "already": True}
        self.store.update_device(self.rows.seal_device(dataclasses.replace(dev, revoked_at=now)))
        self.store.end_device_leases(device_id)
        audit.append(
            self.store, ts=now, event="device_revoked", actor=caller.licence_id,
            detail={"device_id": device_id},
        )  # fmt: skip
        self.log("device_revoked", device=device_id)
        return {"device_id": device_id, "revoked_at": now, "already": False}

    def _list_devices(
        self, caller: LicenceRecord, h: Mapping[str, Any], now: float
    ) -> dict[str, Any]:
        self._require_admin(caller, "list_devices", now)
        out = [
            {"device_id": d.device_id, "public_key": d.public_key, "name": d.name,
             "enrolled_at": d.enrolled_at, "enrolled_by": d.enrolled_by,
             "revoked": d.revoked_at is not None, "revoked_at": d.revoked_at,
             "authentic": self.rows.device_authentic(d),
             "service": self.is_service_device(d.device_id)}
            for d in self.store.devices()
        ]  # fmt: skip
        return {"devices": out}
