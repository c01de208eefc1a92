"""KeyService without a network: batches, fail-closed commit, replay."""

from __future__ import annotations

import json
import os
import sqlite3
import time

import pytest

from keyserver import init_dir, layout, store
from keyserver.service import KeyService, Request
from vault.core import crypto as _crypto
from vault.core.licence import Licence
from vault.core.protocol import PROTOCOL_VERSION


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def svc(tmp_path):
    d = tmp_path / "ks"
    init_dir(d)
    st = store.SqliteStore.open(d / "keyserver.db")
    clock = Clock()
    s = KeyService(
        st, layout.load_master(d, st), server_public_key="S" * 40, publisher_key="",
        address="tcp://x:1", lease_ttl=5.0, clock=clock, log=lambda event, **fields: None,
    )  # fmt: skip
    s.admin = Licence.load(d / "admin.licence").client_public_key  # type: ignore[attr-defined]
    s.test_clock = clock  # type: ignore[attr-defined]
    yield s
    st.close()


def req(identity: str, op: str, **fields: object) -> Request:
    h = {"v": PROTOCOL_VERSION, "op": op, "id": 1, "nonce": os.urandom(16), "ts": time.time()}
    return Request(identity, {**h, **fields})


def _setup_caller(
    svc: KeyService, *, expires: float | None = None, rate_limit: float | None = None
) -> tuple[str, str, bytearray]:
    key = _crypto.generate_key()
    [r1, r2] = svc.process_batch([
        req(svc.admin, "register_key", model_id="m", key_id="k", key=bytes(key),
            package_digest="d"),
        # tier 0 (same user): the licence's own key may ask, so no device is needed here
        req(svc.admin, "issue", model_id="m", holder="a", max_calls=None, rate_limit=rate_limit,
            expires=expires, same_user=True),
    ])  # fmt: skip
    assert r1["ok"] and r2["ok"], (r1, r2)
    lic = r2["licence"]
    return lic["client"]["public_key"], lic["licence_id"], key


def test_a_batch_is_one_transaction_and_keys_come_sealed(svc):
    ident, licence_id, key = _setup_caller(svc)
    eph = _crypto.EphemeralKey()
    [rep] = svc.process_batch([
        req(ident, "release", model_id="m", key_id="k", package_digest="d",
            licence_id=licence_id, ephemeral_key=eph.public_bytes),
    ])  # fmt: skip
    assert rep["ok"] and bytes(key) not in rep["sealed_key"]
    assert eph.open(rep["sealed_key"], _crypto.key_release_info("m", "d", licence_id)) == key
    assert rep["lease"]["expires_at"] == svc.test_clock.now + 5.0


def test_commit_failure_turns_every_reply_into_an_audit_error(svc):
    ident, licence_id, _ = _setup_caller(svc)

    class FailingCommit(store.SqliteStore):
        def commit(self) -> None:
            raise sqlite3.OperationalError("disk I/O error")

    real = svc.store
    svc.store = FailingCommit(real.conn)
    eph = _crypto.EphemeralKey()
    replies = svc.process_batch([
        req(ident, "release", model_id="m", key_id="k", package_digest="d",
            licence_id=licence_id, ephemeral_key=eph.public_bytes),
        req(ident, "ping"),
    ])  # fmt: skip
    svc.store = real
    assert replies[0]["ok"] is False and replies[0]["error"]["code"] == "audit"
    assert "sealed_key" not in replies[0]
    assert replies[1]["ok"] is True  # ping needs no durable write
    assert real.count_leases() == 0


def test_replay_is_refused_even_within_one_batch(svc):
    r = req(svc.admin, "list")
    first, second = svc.process_batch([r, r])
    assert first["ok"] and not second["ok"] and "replayed" in second["error"]["message"]
    [third] = svc.process_batch([r])
    assert "replayed" in third["error"]["message"]


def _release(svc: KeyService, ident: str, licence_id: str) -> dict[str, object]:
    [rep] = svc.process_batch([
        req(ident, "release", model_id="m", key_id="k", package_digest="d",
            licence_id=licence_id, ephemeral_key=_crypto.EphemeralKey().public_bytes),
    ])  # fmt: skip
    return rep


def test_expired_licence_is_denied_on_release_and_renewal(svc):
    """Expiry on the service's clock: no test sleeps against a real expiry time."""
    ident, licence_id, _ = _setup_caller(svc, expires=30.0)
    rep = _release(svc, ident, licence_id)
    assert rep["ok"], rep
    svc.test_clock.now += 29.0
    assert _release(svc, ident, licence_id)["ok"]  # still valid one second before
    svc.test_clock.now += 2.0
    denied = _release(svc, ident, licence_id)
    assert denied["ok"] is False and denied["error"]["code"] == "licence_expired", denied
    [renew] = svc.process_batch(
        [req(ident, "renew", lease_id=rep["lease"]["lease_id"], calls=0)]  # type: ignore[index]
    )
    assert renew["ok"] is False and renew["error"]["code"] == "licence_expired", renew


def test_rate_limit_refills_with_the_services_clock(svc):
    """2 calls/s over a 5 s lease: the first grant takes the whole bucket (10
    calls), the next is refused, and 0.6 s later one call's worth is back."""
    ident, licence_id, _ = _setup_caller(svc, rate_limit=2.0)
    first = _release(svc, ident, licence_id)
    assert first["ok"] and first["lease"]["call_budget"] == 10, first  # type: ignore[index]
    refused = _release(svc, ident, licence_id)
    assert refused["ok"] is False and refused["error"]["code"] == "rate_limited", refused
    svc.test_clock.now += 0.6
    again = _release(svc, ident, licence_id)
    assert again["ok"] and again["lease"]["call_budget"] == 1, again  # type: ignore[index]


def test_used_proofs_are_kept_until_stale_then_forgotten(tmp_path):
    """The store's record of used proofs: a second use is refused while the
    proof could still pass the clock-skew check; rows past it are deleted."""
    d = tmp_path / "ks"
    init_dir(d)
    st = store.SqliteStore.open(d / "keyserver.db")
    try:
        with st.transaction():
            assert st.use_proof("p1", expires_at=100.0, now=0.0)
            assert not st.use_proof("p1", expires_at=100.0, now=50.0)  # used before
            assert st.use_proof("p2", expires_at=160.0, now=60.0)
        with st.transaction():  # past p1's window: its row goes, p2's stays
            assert st.use_proof("p3", expires_at=220.0, now=120.0)
            assert st.count_used_proofs() == 2
            assert not st.use_proof("p2", expires_at=160.0, now=120.0)
        # a use inside a transaction that rolls back never happened
        with pytest.raises(RuntimeError), st.transaction():
            assert st.use_proof("p4", expires_at=300.0, now=200.0)
            raise RuntimeError("the batch failed")
        with st.transaction():
            assert st.use_proof("p4", expires_at=300.0, now=200.0)
    finally:
        st.close()


def _service_and_caller(
    svc: KeyService, *, max_calls: int, model_id: str = "m"
) -> tuple[str, str, str]:
    """An enrolled device (a worker service) and a call licence: (device key,
    caller key, licence id)."""
    import zmq

    from vault.core.device import device_id_for

    dev = zmq.curve_keypair()[0].decode()
    [r1, r2] = svc.process_batch([
        req(svc.admin, "enroll_device", device_id=device_id_for(dev), public_key=dev, service=True),
        req(svc.admin, "issue", model_id=model_id, holder="c", kind="call", max_calls=max_calls),
    ])  # fmt: skip
    assert r1["ok"] and r2["ok"], (r1, r2)
    return dev, r2["licence"]["client"]["public_key"], r2["licence"]["licence_id"]


def _row(svc: KeyService, licence_id: str) -> tuple[int, int]:
    [rep] = svc.process_batch([req(svc.admin, "list")])
    (row,) = [r for r in rep["licences"] if r["licence_id"] == licence_id]
    return row["used_calls"], row["reserved_calls"]


def test_a_call_licence_for_two_models_serves_both_and_says_what_holds_its_calls(svc):
    """A newcomer's two-model call licence answered 200, 429, 200, 429: the first
    model's grant reserved the whole quota, and the second was told the licence
    "has used its 1000 calls" after 5 calls. Grants now take a share, and a
    refusal says which calls are used and which are only held."""
    dev, caller, lid = _service_and_caller(svc, max_calls=1000, model_id="mlp,rf")

    def ask(model: str) -> dict:
        return svc.process_batch([req(dev, "call_decisions", model_id=model, keys=[caller])])[0][
            "decisions"
        ][caller]

    a, b = ask("mlp"), ask("rf")
    assert a["ok"] and b["ok"], (a, b)
    assert a["budget"] + b["budget"] < 1000
    # a licence of 2 calls: two grants hold both, and a third model call is told so
    dev2, caller2, lid2 = _service_and_caller(svc, max_calls=2, model_id="x,y,z")
    got = [svc.process_batch([req(dev2, "call_decisions", model_id=m, keys=[caller2])])[0]
           ["decisions"][caller2] for m in ("x", "y", "z")]  # fmt: skip
    assert got[0]["ok"] and got[1]["ok"], got
    assert got[2]["error"]["code"] == "quota_exhausted", got
    assert "0 used" in got[2]["error"]["message"] and "2 held" in got[2]["error"]["message"]


def test_a_call_grant_is_capped_and_lapses_and_a_late_report_counts_once(svc):
    dev, caller, lid = _service_and_caller(svc, max_calls=40)

    def ask(gid: str) -> dict:
        return svc.process_batch(
            [req(dev, "call_decisions", model_id="m", keys=[caller], grants={caller: gid})]
        )[0]

    # a quarter of the quota left, not all of it: a second service gets its own
    first = ask("grant-one-0001")
    assert first["ok"] and first["decisions"][caller]["budget"] == 10
    second = ask("grant-two-0001")
    assert second["decisions"][caller]["budget"] == 8  # a quarter of the 30 left, rounded up
    assert _row(svc, lid) == (0, 18)
    # the first service reports and gives its grant back; the second dies
    svc.process_batch([req(dev, "call_decisions", keys=[], usage=[
        {"id": "report-one-01", "licence_id": lid, "used": 4, "reserved": 10,
         "grant_id": "grant-one-0001"}])])  # fmt: skip
    assert _row(svc, lid) == (4, 8)
    # one lease on, the dead service's grant still holds its reserve ...
    svc.test_clock.now += 5.0
    assert _row(svc, lid) == (4, 8)
    # ... two leases on it has lapsed: the reserve is back, audited
    svc.test_clock.now += 5.1
    assert _row(svc, lid) == (4, 0)
    lapsed = [r for r in audit_rows(svc) if r.event == "grant_lapsed"]
    assert [(json.loads(r.detail)["grant_id"], json.loads(r.detail)["returned_calls"])
            for r in lapsed] == [
        ("grant-two-0001", 8)]  # fmt: skip
    # it was only cut off: its report comes late, counted once, nothing given back twice
    late = {"id": "report-two-01", "licence_id": lid, "used": 3, "reserved": 8,
            "grant_id": "grant-two-0001"}  # fmt: skip
    for _ in range(2):  # the second copy: its answer was lost
        svc.process_batch([req(dev, "call_decisions", keys=[], usage=[late])])
        assert _row(svc, lid) == (7, 0)
    # and the whole rest of the quota can be granted again
    total = 0
    for i in range(20):
        rep = ask(f"grant-more-{i:04d}")
        d = rep["decisions"][caller]
        if not d["ok"]:
            assert d["error"]["code"] == "quota_exhausted"
            break
        total += d["budget"]
    assert total == 40 - 7


def audit_rows(svc: KeyService) -> list:
    from keyserver import audit

    return list(audit.records(svc.store))


def test_a_usage_report_is_audited_under_the_model_it_names(svc):
    """A report rides whatever request the service makes next: audited under
    the model the report names (flagged when the licence does not hold it,
    counted all the same), an older service's unnamed one under none, never
    under the request's own model."""
    dev, caller, lid = _service_and_caller(svc, max_calls=100, model_id="mlp,rf")
    svc.process_batch([req(dev, "call_decisions", model_id="rf", keys=[caller], usage=[
        {"id": "report-named-1", "licence_id": lid, "used": 3, "reserved": 0, "model_id": "mlp"},
        {"id": "report-other-1", "licence_id": lid, "used": 2, "reserved": 0, "model_id": "xx"},
        {"id": "report-plain-1", "licence_id": lid, "used": 1, "reserved": 0}])])  # fmt: skip
    usage = [(r.model_id, json.loads(r.detail)) for r in audit_rows(svc) if r.event == "usage"]
    assert [(m, d["calls"], d.get("model_not_in_licence")) for m, d in usage] == [
        ("mlp", 3, None), ("xx", 2, True), (None, 1, None)]  # fmt: skip
    assert _row(svc, lid)[0] == 6
