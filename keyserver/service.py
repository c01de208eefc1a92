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
    IntegrityError,
    KeyServerError,
    LicenceError,
    PermissionDeniedError,
    ProtocolError,
    UnknownLicenceError,
    VaultError,
)
from vault.core.licence import Licence
from vault.core.protocol import error_reply, ok_reply

from . import audit
from .layout import new_licence_id
from .policy import (
    Context,
    DeviceRecord,
    KeyRecord,
    LicenceRecord,
    Policy,
    default_release_policy,
    default_renew_policy,
)
from .store import KeyRow, LeaseRow, Store

__all__ = ["DEFAULT_LEASE_TTL", "KeyService", "Request"]

DEFAULT_LEASE_TTL = 60.0
MAX_SKEW = 60.0  # seconds a request's timestamp may differ from the server clock
_MAX_STR = 512


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


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _device_only(caller: LicenceRecord, h: Mapping[str, Any], now: float) -> dict[str, Any]:
    raise PermissionDeniedError(
        "only an enrolled device (a worker service) asks for call decisions"
    )


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
        log: Callable[[str], None] = _stderr,
    ) -> None:
        if lease_ttl <= 0:
            raise ValueError("lease_ttl must be positive")
        self.store = store
        self._master = master
        self.server_public_key = server_public_key
        self.publisher_key = publisher_key
        self.address = address
        self.lease_ttl = lease_ttl
        self.clock = clock
        self.release_policy = release_policy or default_release_policy()
        self.renew_policy = renew_policy or default_renew_policy()
        self.log = log
        self._nonces: set[bytes] = set()
        self._nonce_expiry: deque[tuple[float, bytes]] = deque()
        self._ops: dict[str, Callable[[LicenceRecord, Mapping[str, Any], float], dict[str, Any]]]
        self._ops = {
            "release": self._release,
            "renew": self._renew,
            "register_key": self._register_key,
            "issue": self._issue,
            "revoke": self._revoke,
            "list": self._list,
            "enroll_device": self._enroll_device,
            "revoke_device": self._revoke_device,
            "list_devices": self._list_devices,
            "call_decisions": _device_only,  # answered in _device_op (keyserver/calls.py)
        }

    # --- admission (ZAP) -------------------------------------------------------

    def admits(self, client_public_key: str) -> bool:
        """Whether a CURVE key may connect: any licence holder or admin, or an
        enrolled device that is not revoked, looked up live (a licence issued
        a second ago connects). Revoked holders are admitted so they hear the
        typed 'revoked' denial instead of silence; a revoked device is not."""
        if self.store.has_client_key(client_public_key):
            return True
        dev = self.store.device_by_key(client_public_key)
        return dev is not None and dev.revoked_at is None

    # --- batches ---------------------------------------------------------------

    def process_batch(self, requests: Sequence[Request]) -> list[dict[str, Any]]:
        now = self.clock()
        try:
            self.store.begin()
        except self.store.errors as exc:
            self.log(f"keyserver: cannot open a transaction ({type(exc).__name__}); refusing batch")
            return [self._audit_failed(r) for r in requests]
        self._batch_broken = False
        replies = [self._one(r, now) for r in requests]
        failures: tuple[type[BaseException], ...] = (_LostTransaction, *self.store.errors)
        try:
            if self._batch_broken:
                raise _LostTransaction("transaction was lost mid-batch")
            self.store.commit()
        except failures as exc:
            self.log(f"keyserver: commit failed ({type(exc).__name__}); nothing released")
            if self.store.in_transaction:
                try:
                    self.store.rollback()
                except self.store.errors:
                    pass
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
            self._check_fresh(h, now)
            device = self._device(req.identity)
            if device is not None:
                fields = self._device_op(device, str(op), h, now)
            else:
                fields = handler(self._caller(req.identity), h, now)
            self.store.release_savepoint()
            return ok_reply(rid, **fields)
        except _Denied as d:
            self.store.release_savepoint()  # keep the audit record of the denial
            return error_reply(rid, d.error)
        except VaultError as exc:
            self._rollback_savepoint()
            return error_reply(rid, exc)
        except self.store.errors as exc:
            self.log(f"keyserver: {op} failed to write ({type(exc).__name__}); fail closed")
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
            self.log(f"keyserver: internal error in {op}: {type(exc).__name__} at {where}")
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
        check stops a buggy or malicious *holder* re-sending a request."""
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

    def _caller(self, identity: str | None) -> LicenceRecord:
        if identity is None:
            raise PermissionDeniedError("connection is not CURVE-authenticated")
        rec = self.store.licence_by_key(identity)
        if rec is None:
            raise UnknownLicenceError("no licence holds this client key")
        return rec

    def _licence(self, licence_id: str) -> LicenceRecord | None:
        return self.store.licence(licence_id)

    def _deny(
        self, caller: LicenceRecord, op: str, error: VaultError, now: float, **detail: Any
    ) -> _Denied:
        audit.append(
            self.store, ts=now, event="denied", actor=caller.licence_id,
            licence_id=detail.pop("licence_id", caller.licence_id),
            model_id=detail.pop("model_id", None),
            detail={"op": op, "reason": error.code, "message": error.message, **detail},
        )  # fmt: skip
        if op not in ("release", "renew"):
            self.log(f"keyserver: denied {op} for {caller.licence_id}: {error.code}")
        return _Denied(error)

    def _require_admin(self, caller: LicenceRecord, op: str, now: float) -> None:
        if not caller.is_admin:
            raise self._deny(caller, op, PermissionDeniedError(f"{op} needs an admin licence"), now)

    # --- leases ------------------------------------------------------------------

    def _budget(self, lic: LicenceRecord) -> int | None:
        """Calls the worker may serve on this lease before it must renew:
        what is left of the quota, and at most rate_limit x ttl."""
        caps = []
        if lic.max_calls is not None:
            caps.append(max(0, lic.max_calls - lic.used_calls))
        if lic.rate_limit is not None and lic.rate_limit > 0:
            caps.append(max(1, math.ceil(lic.rate_limit * self.lease_ttl)))
        return min(caps) if caps else None

    def _lease_fields(self, lease_id: str, lic: LicenceRecord, now: float) -> dict[str, Any]:
        expires = now + self.lease_ttl
        return {
            "lease_id": lease_id,
            "ttl": self.lease_ttl,
            "grace": lic.grace,
            "expires_at": expires,
            "hard_end": expires + lic.grace,
            "call_budget": self._budget(lic),
        }

    # --- ops -----------------------------------------------------------------------

    def _release(self, caller: LicenceRecord, h: Mapping[str, Any], now: float) -> dict[str, Any]:
        """A key request made with a licence's own key (not a device's): only a
        licence issued ``--same-user`` (tier 0) is answered."""
        req = self._release_fields(h)
        ids = {"model_id": req["model_id"], "key_id": req["key_id"]}
        if req["licence_id"] != caller.licence_id:
            err: VaultError = (
                UnknownLicenceError(f"no licence {req['licence_id']}")
                if self._licence(req["licence_id"]) is None
                else PermissionDeniedError("this licence id does not belong to the connecting key")
            )
            raise self._deny(caller, "release", err, now, **ids)
        self._check_kind(caller, now, ids, actor=caller.licence_id)
        if not caller.same_user:
            err = PermissionDeniedError(
                "a key is released only to an enrolled device: this licence is not --same-user "
                "(use it through `vault daemon`)"
            )
            raise self._deny(caller, "release", err, now, reason_detail="no_device", **ids)
        return self._grant(caller, req, now, device_id="", actor=caller.licence_id)

    @staticmethod
    def _release_fields(h: Mapping[str, Any]) -> dict[str, Any]:
        suite = h.get("suite", "x25519")
        if suite not in _crypto.HPKE_SUITES:
            raise ProtocolError(f"unknown HPKE suite {suite!r}")
        return {
            "model_id": _str(h, "model_id"),
            "key_id": _str(h, "key_id"),
            "digest": _str(h, "package_digest"),
            "licence_id": _str(h, "licence_id"),
            "suite": suite,
            "ephemeral": _bytes(h, "ephemeral_key", max_len=4096),
        }

    def _check_kind(
        self, lic: LicenceRecord, now: float, ids: dict[str, Any], *, actor: str
    ) -> None:
        if lic.kind == "runtime" and not lic.is_admin:
            return
        why = (
            "a call licence gives no key (it is checked by the vendor's service)"
            if lic.kind == "call"
            else f"a {lic.kind} licence gives no key"
        )
        raise self._deny_as(actor, "release", PermissionDeniedError(why), now,
                            licence_id=lic.licence_id, **ids)  # fmt: skip

    def _grant(
        self, lic: LicenceRecord, req: dict[str, Any], now: float, *, device_id: str, actor: str
    ) -> dict[str, Any]:
        """The policy, the lease, the audit record and the sealed key."""
        model_id, key_id, digest = req["model_id"], req["key_id"], req["digest"]
        suite = req["suite"]
        ids = {"model_id": model_id, "key_id": key_id}
        row = self.store.key(model_id, key_id)
        key = None if row is None else KeyRecord(model_id, key_id, row.package_digest)
        ctx = Context("release", lic, now, model_id, digest, key)
        try:
            self.release_policy.check(ctx)
        except LicenceError as exc:
            raise self._deny_as(actor, "release", exc, now, licence_id=lic.licence_id,
                                **ids) from None  # fmt: skip
        if row is None:
            err = KeyServerError(f"no key {key_id!r} is registered for model {model_id!r}")
            raise self._deny_as(actor, "release", err, now, licence_id=lic.licence_id, **ids)
        lease_id = os.urandom(12).hex()
        lease = self._lease_fields(lease_id, lic, now)
        self.store.insert_lease(
            LeaseRow(lease_id, lic.licence_id, model_id, key_id, now, lease["expires_at"],
                     lease["hard_end"], lease["call_budget"], False, device_id or None)
        )  # fmt: skip
        # Audit first; the reply leaves only after COMMIT (see process_batch).
        audit.append(
            self.store, ts=now, event="released", actor=actor,
            licence_id=lic.licence_id, model_id=model_id,
            detail={"key_id": key_id, "lease_id": lease_id, "suite": suite,
                    "package_digest": digest, "device_id": device_id or None},
        )  # fmt: skip
        plain = _crypto.unwrap_key(self._master, row.wrapped, key_id=key_id, model_id=model_id)
        try:
            info = _crypto.key_release_info(model_id, digest, lic.licence_id, device_id)
            try:
                sealed = _crypto.hpke_seal(suite, req["ephemeral"], plain, info)
            except VaultError as exc:  # a malformed ephemeral key
                raise ProtocolError("malformed ephemeral public key") from exc
        finally:
            _crypto.zeroize(plain)
        return {"sealed_key": sealed, "suite": suite, "lease": lease}

    # --- devices -------------------------------------------------------------------

    def _device(self, identity: str | None) -> DeviceRecord | None:
        if identity is None:
            return None
        return self.store.device_by_key(identity)

    def _deny_as(
        self, actor: str, op: str, error: VaultError, now: float, **detail: Any
    ) -> _Denied:
        """Audit a denial whose actor may be a device, then refuse."""
        audit.append(
            self.store, ts=now, event="denied", actor=actor,
            licence_id=detail.pop("licence_id", None), model_id=detail.pop("model_id", None),
            detail={"op": op, "reason": error.code, "message": error.message, **detail},
        )  # fmt: skip
        if op not in ("release", "renew"):
            self.log(f"keyserver: denied {op} for {actor}: {error.code}")
        return _Denied(error)

    def _device_op(
        self, device: DeviceRecord, op: str, h: Mapping[str, Any], now: float
    ) -> dict[str, Any]:
        """A request made as an enrolled device: key release (with the
        caller's licence proof) and lease renewal, nothing else."""
        actor = device.device_id
        if device.revoked_at is not None:
            err: VaultError = PermissionDeniedError(f"device {device.device_id} was revoked")
            raise self._deny_as(actor, op, err, now)
        if op == "renew":
            lease_id = _str(h, "lease_id")
            lease_row = self.store.device_lease(lease_id, device.device_id)
            lic = None if lease_row is None else self._licence(lease_row.licence_id)
            if lic is None:
                raise LicenceError("unknown lease")
            return self._renew(lic, h, now, device_id=device.device_id)
        if op == "call_decisions":  # a worker service checking its callers' call licences
            from .calls import call_decisions

            return call_decisions(self, device, h, now)
        if op != "release":
            err = PermissionDeniedError(
                f"a device may only ask for keys and renew leases, not {op}"
            )
            raise self._deny_as(actor, op, err, now)
        req = self._release_fields(h)
        ids = {"model_id": req["model_id"], "key_id": req["key_id"]}
        claimed = h.get("device_id")
        if claimed not in (None, device.device_id):
            err = PermissionDeniedError("device id does not match the connecting device")
            raise self._deny_as(actor, "release", err, now, licence_id=req["licence_id"], **ids)
        lic = self._licence(req["licence_id"])
        if lic is None:
            err = UnknownLicenceError(f"no licence {req['licence_id']}")
            raise self._deny_as(actor, "release", err, now, **ids)
        self._check_kind(lic, now, ids, actor=actor)
        if lic.devices and device.device_id not in lic.devices:
            err = PermissionDeniedError(
                f"licence {lic.licence_id} is not valid on device {device.device_id}"
            )
            raise self._deny_as(actor, "release", err, now, licence_id=lic.licence_id, **ids)
        self._check_proof(lic, device, req, h, now, actor=actor)
        return self._grant(lic, req, now, device_id=device.device_id, actor=actor)

    def _check_proof(
        self,
        lic: LicenceRecord,
        device: DeviceRecord,
        req: dict[str, Any],
        h: Mapping[str, Any],
        now: float,
        *,
        actor: str,
    ) -> None:
        """The caller's signature with the licence's proof key over this very
        request (licence, device, model, key, package, a fresh nonce and time)."""
        ids = {"model_id": req["model_id"], "key_id": req["key_id"], "licence_id": lic.licence_id}
        sig = h.get("proof")
        nonce = h.get("proof_nonce")
        ts = h.get("proof_ts")
        if (
            not isinstance(sig, bytes)
            or not isinstance(nonce, bytes)
            or not 8 <= len(nonce) <= 64
            or isinstance(ts, bool)
            or not isinstance(ts, (int, float))
            or not math.isfinite(ts)
        ):
            err: VaultError = PermissionDeniedError(
                "a key request needs the caller's proof of the licence"
            )
            raise self._deny_as(actor, "release", err, now, **ids)
        if abs(now - float(ts)) > MAX_SKEW:
            err = PermissionDeniedError("licence proof is stale (clock skew?)")
            raise self._deny_as(actor, "release", err, now, **ids)
        msg = _crypto.licence_proof_message(
            licence_id=lic.licence_id, device_id=device.device_id, model_id=req["model_id"],
            key_id=req["key_id"], package_digest=req["digest"], nonce=nonce, ts=float(ts),
        )  # fmt: skip
        try:
            if not lic.proof_public_key:
                raise IntegrityError()
            public = base64.b64decode(lic.proof_public_key)
            _crypto.verify_signature(public, sig, msg)
        except VaultError:
            err = PermissionDeniedError("licence proof does not verify")
            raise self._deny_as(actor, "release", err, now, **ids) from None
        try:
            self._remember_nonce(b"proof:" + nonce, float(ts), now)
        except ProtocolError:
            err = PermissionDeniedError("licence proof was used before")
            raise self._deny_as(actor, "release", err, now, **ids) from None

    def _renew(
        self,
        caller: LicenceRecord,
        h: Mapping[str, Any],
        now: float,
        *,
        device_id: str | None = None,
    ) -> dict[str, Any]:
        lease_id = _str(h, "lease_id")
        calls = _int(h, "calls", optional=True) or 0
        # a lease granted to a device is renewed by that device only
        row = (
            self.store.lease(lease_id, caller.licence_id)
            if device_id is None
            else self.store.device_lease(lease_id, device_id)
        )
        if row is None:
            raise LicenceError("unknown lease")
        model_id, ended, hard_end = row.model_id, row.ended, row.hard_end
        lic = caller
        if calls:
            self.store.add_usage(caller.licence_id, calls)
            audit.append(
                self.store, ts=now, event="usage", actor=caller.licence_id,
                licence_id=caller.licence_id, model_id=model_id,
                detail={"lease_id": lease_id, "calls": calls},
            )  # fmt: skip
            lic = self._licence(caller.licence_id) or caller
        try:
            self.renew_policy.check(Context("renew", lic, now, model_id))
            if ended:
                raise LicenceError("lease already ended")
        except LicenceError as exc:
            self.store.end_lease(lease_id)
            raise self._deny(lic, "renew", exc, now, model_id=model_id, lease_id=lease_id) from None
        lease = self._lease_fields(lease_id, lic, now)
        self.store.extend_lease(
            lease_id,
            expires_at=lease["expires_at"],
            hard_end=lease["hard_end"],
            call_budget=lease["call_budget"],
        )
        audit.append(
            self.store, ts=now, event="renewed", actor=caller.licence_id,
            licence_id=caller.licence_id, model_id=model_id,
            detail={"lease_id": lease_id, "late": now > hard_end},
        )  # fmt: skip
        return {"lease": lease}

    def _register_key(
        self, caller: LicenceRecord, h: Mapping[str, Any], now: float
    ) -> dict[str, Any]:
        self._require_admin(caller, "register_key", now)
        model_id = _str(h, "model_id")
        key_id = _str(h, "key_id")
        digest = _str(h, "package_digest")
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
        self.log(f"keyserver: registered key {key_id} for model {model_id}")
        return {"created": True}

    def _issue(self, caller: LicenceRecord, h: Mapping[str, Any], now: float) -> dict[str, Any]:
        self._require_admin(caller, "issue", now)
        model_id = _str(h, "model_id")
        holder = _str(h, "holder")
        expires = _num(h, "expires", optional=True)
        max_calls = _int(h, "max_calls", optional=True)
        rate_limit = _num(h, "rate_limit", optional=True)
        grace = _num(h, "grace", optional=True, default=0.0)
        if rate_limit is not None and rate_limit <= 0:
            raise ProtocolError("field 'rate_limit' must be positive")
        kind, same_user, devices = self._issue_kind(h)
        public, secret = zmq.curve_keypair()
        proof_key = _crypto.PublisherKey.generate()
        proof_public = base64.b64encode(proof_key.public_raw).decode()
        licence_id = new_licence_id()
        expires_at = None if expires is None else now + expires
        self.store.insert_licence(
            LicenceRecord(licence_id, holder, "caller", model_id, public.decode(), now,
                          expires_at, max_calls, rate_limit, grace, None, 0, kind=kind,
                          same_user=same_user, devices=tuple(devices),
                          proof_public_key=proof_public)
        )  # fmt: skip
        audit.append(
            self.store, ts=now, event="issued", actor=caller.licence_id, licence_id=licence_id,
            model_id=model_id,
            detail={"holder": holder, "expires_at": expires_at, "max_calls": max_calls,
                    "rate_limit": rate_limit, "grace": grace, "kind": kind,
                    "same_user": same_user, "devices": devices},
        )  # fmt: skip
        self.log(f"keyserver: issued {licence_id} to {holder} for {model_id}")
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
        )
        return {"licence": lic.to_json()}

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
            if not isinstance(d, str) or self.store.device(d) is None:
                raise KeyServerError(f"no enrolled device {d!r}")
        if devices and kind != "runtime":
            raise ProtocolError("only a runtime licence names devices")
        return kind, same_user, sorted(set(devices))

    def _revoke(self, caller: LicenceRecord, h: Mapping[str, Any], now: float) -> dict[str, Any]:
        self._require_admin(caller, "revoke", now)
        licence_id = _str(h, "licence_id")
        target = self._licence(licence_id)
        if target is None:
            raise UnknownLicenceError(f"no licence {licence_id}")
        if target.licence_id == caller.licence_id:
            raise PermissionDeniedError("refusing to revoke the licence making the request")
        if target.revoked_at is not None:
            return {"licence_id": licence_id, "revoked_at": target.revoked_at, "already": True}
        self.store.set_revoked(licence_id, now)
        self.store.end_leases_of(licence_id)
        audit.append(
            self.store, ts=now, event="revoked", actor=caller.licence_id, licence_id=licence_id,
            model_id=target.model_id, detail={"holder": target.holder},
        )  # fmt: skip
        self.log(f"keyserver: revoked {licence_id}")
        return {"licence_id": licence_id, "revoked_at": now, "already": False}

    def _list(self, caller: LicenceRecord, h: Mapping[str, Any], now: float) -> dict[str, Any]:
        self._require_admin(caller, "list", now)
        out = []
        for rec in self.store.licences():
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
                    "rate_limit": rec.rate_limit,
                    "grace": rec.grace,
                    "revoked": rec.revoked_at is not None,
                    "revoked_at": rec.revoked_at,
                    "kind": rec.kind,
                    "same_user": rec.same_user,
                    "devices": list(rec.devices),
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
        old = self.store.device(device_id)
        if old is not None:
            if old.revoked_at is not None:
                raise PermissionDeniedError(f"device {device_id} was revoked; make a new one")
            return {"device_id": device_id, "created": False}
        if self.store.has_client_key(public_key):
            raise ProtocolError("that key already belongs to a licence")
        self.store.insert_device(
            DeviceRecord(device_id, public_key, name, now, caller.licence_id, None)
        )
        audit.append(
            self.store, ts=now, event="device_enrolled", actor=caller.licence_id,
            detail={"device_id": device_id, "name": name, "public_key": public_key},
        )  # fmt: skip
        self.log(f"keyserver: enrolled device {device_id} ({name})")
        return {"device_id": device_id, "created": True}

    def _revoke_device(
        self, caller: LicenceRecord, h: Mapping[str, Any], now: float
    ) -> dict[str, Any]:
        self._require_admin(caller, "revoke_device", now)
        device_id = _str(h, "device_id")
        dev = self.store.device(device_id)
        if dev is None:
            raise KeyServerError(f"no enrolled device {device_id}")
        if dev.revoked_at is not None:
            return {"device_id": device_id, "revoked_at": dev.revoked_at, "already": True}
        self.store.revoke_device(device_id, now)
        audit.append(
            self.store, ts=now, event="device_revoked", actor=caller.licence_id,
            detail={"device_id": device_id},
        )  # fmt: skip
        self.log(f"keyserver: revoked device {device_id}")
        return {"device_id": device_id, "revoked_at": now, "already": False}

    def _list_devices(
        self, caller: LicenceRecord, h: Mapping[str, Any], now: float
    ) -> dict[str, Any]:
        self._require_admin(caller, "list_devices", now)
        out = [
            {"device_id": d.device_id, "public_key": d.public_key, "name": d.name,
             "enrolled_at": d.enrolled_at, "enrolled_by": d.enrolled_by,
             "revoked": d.revoked_at is not None, "revoked_at": d.revoked_at}
            for d in self.store.devices()
        ]  # fmt: skip
        return {"devices": out}
