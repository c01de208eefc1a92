"""Call licences: the decisions a vendor's worker service checks each call against.

A *call* licence gives its holder no key at all: it lets the holder call a
vendor-hosted service (``vault worker serve``). The service, an enrolled
device, asks here (op ``call_decisions``) what each caller's CURVE key may
do with a model for the next lease: the licence it belongs to and either a
typed refusal (revoked, expired, quota spent, wrong model, not a call
licence) or a grant with a call budget. Budgets follow the key server's
metering rules (:mod:`keyserver.metering`, the same as for a worker's lease):
reserved from the quota when granted, the unused part refunded when the
service reports what it served (at its next ask), so no number of services
or leases can serve more calls than the quota; budgets are drawn from the
licence's call bucket (the rate limit), and the service also enforces the
rate per call. Every grant, refusal and usage report is audited; an unknown
key and somebody else's runtime licence get the same answer.

A grant is capped (:func:`keyserver.metering.call_grant_cap`: at most 1,000
calls and a quarter of the quota left; with a rate limit, at most the
bucket, rate x lease) and **lapses** :data:`LAPSE_LEASES` leases after it
was made if the service never gave it back (a replica killed, or cut off
from the key server): its reserve returns to the quota, audited
(``grant_lapsed``). The service uses a decision for at most one lease from
before it asked, so by then it serves nothing more under it; a report that
arrives later (a partitioned service) is still counted, once (by its id),
and gives nothing back a second time. What a dead service served and never
reported is not counted: at most one grant's worth per service and grant,
which is what the cap bounds.

Request ``{"model_id", "keys": [Z85...], "usage": [{"licence_id", "used",
"reserved"}...]}`` (without ``model_id``: a probe, whether each key holds a
live call licence at all, reserving nothing: the service's ZAP check, and
its doors' vetting of a bearer token, with ``proof_key`` and
``expires_at``); reply ``{"ttl", "decisions": {key: {"ok": true,
"licence_id", "holder", "budget", "rate", "expires_at", "proof_key"[, "model_id"
(a probe's: the models the licence covers, null for all)]} | {"ok": false,
"error": {...}[, "licence_id", "proof_key"]}}}`` (``proof_key``: the licence's
Ed25519 public key, which verifies the bearer tokens its holder mints).

Example (the service's side, through :class:`vault.core.keyclient.KeyServerClient`)::

    with KeyServerClient(service_licence, device=device) as ks:
        out = ks.call_decisions(model_id="m", keys=[alice_key], usage=[])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vault.core.errors import (
    KeyServerError,
    LicenceExpiredError,
    LicenceRevokedError,
    PermissionDeniedError,
    ProtocolError,
    QuotaExhaustedError,
    UnknownLicenceError,
    VaultError,
    WrongModelError,
)
from vault.core.modelscope import covers

from . import audit, metering
from .policy import DeviceRecord, LicenceRecord
from .store import MeteringId

if TYPE_CHECKING:  # pragma: no cover
    from .service import KeyService

__all__ = ["LAPSE_LEASES", "MAX_KEYS", "call_decisions", "lapse_grants"]

MAX_KEYS = 1024
# A grant not given back lapses this many leases after it was made: one lease
# of use (the service's decision ends within one lease of its request) and
# one for the calls still in flight then and the report on its way.
LAPSE_LEASES = 2.0


def _refusal(lic: LicenceRecord | None, model_id: str | None, now: float) -> VaultError | None:
    if lic is None or lic.kind != "call" or lic.is_admin:
        return UnknownLicenceError("no call licence for this key")  # one answer for both
    if lic.revoked_at is not None:
        return LicenceRevokedError(f"licence {lic.licence_id} was revoked")
    if lic.expires_at is not None and now >= lic.expires_at:
        return LicenceExpiredError(f"licence {lic.licence_id} has expired")
    if model_id is not None and lic.model_id is not None and not covers(lic.model_id, model_id):
        return WrongModelError(f"licence {lic.licence_id} is not for model {model_id!r}")
    if lic.max_calls is not None and lic.debited_calls >= lic.max_calls:
        if lic.reserved_calls:  # some are only held by grants: they come back
            return QuotaExhaustedError(
                f"licence {lic.licence_id} has no call left to grant: {lic.used_calls} used and "
                f"{lic.reserved_calls} held by services' open grants, of {lic.max_calls}; held "
                "calls come back as the services report or their grants lapse"
            )
        return QuotaExhaustedError(f"licence {lic.licence_id} has used its {lic.max_calls} calls")
    return None


_ID_LEN = (8, 64)
RETENTION = 7 * 86400.0  # how long report and grant ids are remembered (seconds)


def _ident(v: Any, what: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not _ID_LEN[0] <= len(v) <= _ID_LEN[1] or not v.isascii():
        raise ProtocolError(f"{what} must be a string of {_ID_LEN[0]}-{_ID_LEN[1]} characters")
    return v


@dataclass(frozen=True)
class _Report:
    licence_id: str | None
    used: int
    reserved: int
    report_id: str | None  # resent as is until acknowledged: counted once
    grant_id: str | None  # the grant whose reserve this gives back (its budget, from here)
    model_id: str | None = None  # the model the calls were made on (older services: unnamed)


def _usage(h: Mapping[str, Any]) -> list[_Report]:
    items = h.get("usage") or []
    if not isinstance(items, list) or len(items) > MAX_KEYS:
        raise ProtocolError("usage must be a list")
    out = []
    for it in items:
        if not isinstance(it, dict):
            raise ProtocolError("usage entries are maps")
        lid, used, reserved = it.get("licence_id"), it.get("used"), it.get("reserved")
        grant = _ident(it.get("grant_id"), "grant_id")
        if (not (isinstance(lid, str) or (lid is None and grant is not None))
                or not isinstance(used, int) or isinstance(used, bool)
                or used < 0 or used > 1 << 48 or not (reserved is None or (
                    isinstance(reserved, int) and not isinstance(reserved, bool)
                    and 0 <= reserved <= 1 << 48))):  # fmt: skip
            raise ProtocolError("usage entries need licence_id, used >= 0 and reserved")
        model = it.get("model_id")
        if model is not None and (not isinstance(model, str) or not 0 < len(model) <= 256):
            raise ProtocolError("a usage entry's model_id is a model id")
        out.append(_Report(lid, used, reserved or 0, _ident(it.get("id"), "usage id"), grant,
                           model))  # fmt: skip
    return out


def _grants(h: Mapping[str, Any]) -> dict[str, str]:
    grants = h.get("grants") or {}
    if not isinstance(grants, dict) or len(grants) > MAX_KEYS:
        raise ProtocolError("grants must map caller keys to grant ids")
    out: dict[str, str] = {}
    for key, gid in grants.items():
        ident = _ident(gid, "grant id")
        if not isinstance(key, str) or ident is None:
            raise ProtocolError("grants must map caller keys to grant ids")
        out[key] = ident
    return out


def _settle_report(svc: KeyService, actor: str, rep: _Report, now: float) -> None:
    """Count one usage report (once: a report id already seen is skipped) and
    give back the reserve it names: the grant's own budget, looked up here,
    or (older services) the ``reserved`` count it carries. Audited under the
    model the report names: a report rides whichever request the service
    makes next, whose own model may be another caller's (it was audited so:
    one licence's calls under a model it does not even hold)."""
    store = svc.store
    if rep.report_id is not None:
        if store.metering_id(rep.report_id) is not None:
            return  # sent again after its answer was lost: already counted
        store.insert_metering_id(MeteringId(rep.report_id, "report", rep.licence_id), at=now)
    reserved: int | None = rep.reserved
    lid = rep.licence_id
    if rep.grant_id is not None:
        grant = store.metering_id(rep.grant_id)
        if grant is None:
            # never granted (the request was lost), or not yet processed: a
            # tombstone, so a late copy of that request grants nothing
            store.insert_metering_id(MeteringId(rep.grant_id, "grant", lid, 0, True), at=now)
            reserved = 0
        elif grant.released or grant.kind != "grant":
            reserved = 0
        else:
            store.release_metering_id(rep.grant_id)
            reserved = grant.budget
            lid = grant.licence_id
    if lid is None:
        return
    lic = svc._licence(lid, now)
    if lic is None or lic.kind != "call":
        return
    if not rep.used and not reserved:
        return
    # the calls served become used; the reservation is released (its unused
    # part refunded); more calls than reserved are charged in full
    u, r = metering.settle(lic, reserved=reserved, calls=rep.used)
    svc._meter(lic, used=u, reserved=r, refund_tokens=max(0, (reserved or 0) - rep.used))
    # a model the licence does not hold is recorded as the service named it,
    # and flagged: the calls are counted all the same (a report is never lost)
    foreign = (rep.model_id is not None and lic.model_id is not None
               and not covers(lic.model_id, rep.model_id))  # fmt: skip
    audit.append(
        store, ts=now, event="usage", actor=actor, licence_id=lid, model_id=rep.model_id,
        detail={"calls": rep.used, "reserved": reserved, "via": "service",
                **({"grant_id": rep.grant_id} if rep.grant_id else {}),
                **({"model_not_in_licence": True} if foreign else {})},
    )  # fmt: skip


def call_decisions(
    svc: KeyService, device: DeviceRecord, h: Mapping[str, Any], now: float
) -> dict[str, Any]:
    """The ``call_decisions`` op, asked by a device the vendor enrolled as a
    worker service (``vault device enroll --service``). Any other enrolled
    device (a customer's daemon) is refused before anything is read: a
    decision reserves from a caller's quota, and a usage report spends it, so
    a device that could ask would spend any caller's whose key it learned (a
    bearer token names it) and read its holder."""
    if not svc.is_service_device(device.device_id):
        # audited like every device's denial: a daemon probing callers' keys leaves a trace
        raise svc._deny_as(device.device_id, "call_decisions", PermissionDeniedError(
            f"device {device.device_id} is not enrolled as a worker service: only a service "
            "asks for call decisions (vault device enroll DIR --licence admin.licence --service)"
        ), now)  # fmt: skip
    model_id = h.get("model_id")
    keys = h.get("keys") or []
    probe = model_id is None  # only "does this key hold a live call licence" (the ZAP check)
    if not probe and (not isinstance(model_id, str) or not model_id):
        raise ProtocolError("model_id must be a model id, or absent for a probe")
    if (
        not isinstance(keys, list)
        or len(keys) > MAX_KEYS
        or not all(isinstance(k, str) and len(k) == 40 for k in keys)
    ):
        raise ProtocolError(f"keys must be a list of at most {MAX_KEYS} Z85 keys")
    store = svc.store
    actor = device.device_id
    grants = _grants(h)
    for rep in _usage(h):
        _settle_report(svc, actor, rep, now)
    lapse_grants(svc, now)
    _prune(svc, now)
    decisions: dict[str, Any] = {}
    for key in dict.fromkeys(keys):
        lic = svc._authentic(store.licence_by_key(key), now)
        err = _refusal(lic, model_id if not probe else None, now)
        if lic is not None and lic.devices and device.device_id not in lic.devices and err is None:
            err = UnknownLicenceError("no call licence for this key")
        budget: metering.Budget | None = None
        gid = grants.get(key)
        if err is None and not probe:
            assert lic is not None
            old = store.metering_id(gid) if gid is not None else None
            if old is not None:
                # a copy of a request already answered (or given up): never a second reserve
                err = KeyServerError("this grant was already answered; ask with a new grant id")
            else:
                lic, budget = svc._grant(lic, lic.reserved_calls, lic.used_calls, now,
                                         cap=metering.call_grant_cap)  # fmt: skip
                if budget.budget == 0 and budget.retry_after is None:
                    err = QuotaExhaustedError(f"licence {lic.licence_id} has no calls left")
        if err is not None:
            svc._audit_refusal(  # identical refusals coalesced (keyserver.limits)
                "denied", actor,
                lic.licence_id if lic is not None and lic.kind == "call" else None,
                model_id, {"op": "call_decisions", "reason": err.code}, now,
            )  # fmt: skip
            decisions[key] = {"ok": False, "error": err.to_wire()}
            if lic is not None and lic.kind == "call" and err.code != "licence_unknown":
                # the service checks a bearer token's signature before it says why
                # the licence is refused, so a forger learns nothing of its state
                decisions[key].update(licence_id=lic.licence_id, proof_key=lic.proof_public_key)
            continue
        assert lic is not None
        if budget is None:  # a probe: is this a live call licence at all
            # (with the proof key: a door checks a bearer token's signature
            # on it before it reads the request the token came with)
            # (and the models it covers: a service shows a model's signature,
            # health and statistics only to callers whose licence covers it)
            decisions[key] = {"ok": True, "licence_id": lic.licence_id, "holder": lic.holder,
                              "proof_key": lic.proof_public_key, "expires_at": lic.expires_at,
                              "model_id": lic.model_id}  # fmt: skip
            continue
        if gid is not None:
            store.insert_metering_id(
                MeteringId(gid, "grant", lic.licence_id, budget.budget), at=now
            )
        audit.append(
            store, ts=now, event="call_lease", actor=actor, licence_id=lic.licence_id,
            model_id=model_id, detail={"budget": budget.budget, "ttl": svc.lease_ttl,
                                       **({"grant_id": gid} if gid else {})},
        )  # fmt: skip
        decisions[key] = {
            "ok": True,
            "licence_id": lic.licence_id,
            "holder": lic.holder,
            "budget": budget.budget,
            "retry_after": budget.retry_after,
            "rate": lic.rate_limit,
            "burst": metering.call_burst(lic.rate_limit),
            "expires_at": lic.expires_at,
            "proof_key": lic.proof_public_key,  # verifies the licence's bearer tokens
            "grant_id": gid,
        }
    return {"ttl": svc.lease_ttl, "decisions": decisions}


def lapse_grants(svc: KeyService, now: float) -> int:
    """Give back the reserve of every call grant made :data:`LAPSE_LEASES`
    leases ago or more and never given back (see the module docstring);
    returns how many lapsed. A report for one later counts its calls, once."""
    store = svc.store
    lapsed = store.open_grants_before(now - LAPSE_LEASES * svc.lease_ttl)
    for grant in lapsed:
        store.release_metering_id(grant.ident)
        lic = svc._licence(grant.licence_id, now) if grant.licence_id else None
        returned = 0
        if lic is not None and lic.kind == "call" and grant.budget:
            used, reserved = metering.settle(lic, reserved=grant.budget, calls=0)
            svc._meter(lic, used=used, reserved=reserved)
            returned = grant.budget
        audit.append(
            store, ts=now, event="grant_lapsed", actor=None, licence_id=grant.licence_id,
            model_id=None, detail={"grant_id": grant.ident, "returned_calls": returned},
        )  # fmt: skip
    return len(lapsed)


def _prune(svc: KeyService, now: float) -> None:
    """Forget report and grant ids older than :data:`RETENTION` (at most hourly)."""
    last = getattr(svc, "_metering_pruned", 0.0)
    if now - last < 3600.0:
        return
    svc._metering_pruned = now  # type: ignore[attr-defined]
    svc.store.prune_metering_ids(now - RETENTION)
