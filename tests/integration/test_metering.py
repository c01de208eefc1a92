"""Metering the caller cannot get around (issue 10), with real workers and a
real key server, at the numbers the issue measured:

- ``--max-calls 5``, ten rounds of open, compute through the lease's budget,
  close: 5 calls served in all (it was 50), and ``licence list`` says 5/5;
- four concurrent leases on a 10-call licence: 10 calls (it was 40);
- 1 call/s for 5 s: at most 5 + one lease's bucket (it was 2,855 calls/s).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vault
from tests.models import mlp
from vault.core.crypto import PublisherKey
from vault.sealing import seal

X = np.ones((1, 8), np.float32)


@pytest.fixture
def package(keyserver: Any, tmp_path: Path) -> str:
    res = seal(mlp(), model_id="metered", signing_key=PublisherKey.load(keyserver.publisher_key_path),
               output=tmp_path / "m.vault")  # fmt: skip
    keyserver.register(res.model_id, res.key_id, res.key, res.digest)
    return str(res.path)


def _row(keyserver: Any, licence_id: str) -> dict[str, Any]:
    with keyserver.admin() as admin:
        [row] = [r for r in admin.list() if r["licence_id"] == licence_id]
    return row


def _compute_until_refused(model: Any, limit: int = 1000) -> int:
    served = 0
    for _ in range(limit):
        try:
            model.compute({"x": X})
        except vault.LicenceError:
            return served
        served += 1
    return served


def test_quota_of_5_holds_over_10_rounds_of_open_compute_close(keyserver, package):
    lic = keyserver.issue("metered", max_calls=5, same_user=True)  # tier 0: no daemon here
    # round 1 stops early: closing reports 2 calls and refunds the other 3
    with vault.open(package, licence=lic) as model:
        assert model.health()["lease"]["call_budget"] == 5  # reserved at grant
        assert _row(keyserver, lic.licence_id)["reserved_calls"] == 5
        model.compute({"x": X})
        model.compute({"x": X})
    row = _row(keyserver, lic.licence_id)
    assert (row["used_calls"], row["reserved_calls"]) == (2, 0)
    served, refused_opens = 2, 0
    for _ in range(9):
        try:
            model = vault.open(package, licence=lic)
        except vault.QuotaExhaustedError:
            refused_opens += 1
            continue
        with model:
            served += _compute_until_refused(model)
    assert served == 5
    # once the quota is gone, opening is refused at the key server (which
    # round that is depends on when a short lease ends on a loaded machine)
    assert refused_opens >= 1
    row = _row(keyserver, lic.licence_id)
    assert (row["used_calls"], row["reserved_calls"], row["max_calls"]) == (5, 0, 5)


def test_four_concurrent_leases_share_a_10_call_quota(keyserver, package):
    lic = keyserver.issue("metered", max_calls=10, same_user=True)  # tier 0
    served: list[int] = []
    refused: list[str] = []
    barrier = threading.Barrier(4)

    def caller() -> None:
        barrier.wait()
        try:
            model = vault.open(package, licence=lic)
        except vault.LicenceError as exc:
            refused.append(exc.code)
            return
        with model:
            served.append(_compute_until_refused(model))

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum(served) == 10, (served, refused)
    assert len(served) + len(refused) == 4
    row = _row(keyserver, lic.licence_id)
    assert row["used_calls"] + row["reserved_calls"] <= 10


def test_one_call_per_second(keyserver, package):
    """A caller hammering a 1/s licence until it has been served 5 calls: at
    no point has it been served more than the rate allows over the time it
    measured (the bound holds whatever the machine's speed: a slow machine
    serves fewer, never more)."""
    lic = keyserver.issue("metered", rate_limit=1.0, same_user=True)  # tier 0
    capacity = max(1.0, 1.0 * keyserver.lease_ttl)  # one lease's worth of calls
    served = refused = 0
    with vault.open(package, licence=lic) as model:
        t0 = time.monotonic()
        while served < 5:  # past the first lease's budget: refills are what serve the rest
            try:
                model.compute({"x": X})
                served += 1
            except vault.RateLimitedError:
                refused += 1
                time.sleep(0.005)
            elapsed = time.monotonic() - t0
            assert served <= 1.0 * elapsed + capacity + 1, (served, refused, elapsed)
        assert model.health()["lease"]["state"] != "ended"  # rate-limited, not revoked
    counts = {"served": served, "refused": refused, "elapsed": elapsed}
    assert refused > served, counts  # the caller hammered it
    # the refusals cost the key server nothing: renewals stay at the lease's
    # pace (one in the background per half TTL; when the budget is spent, one
    # that finds the bucket empty and one after its retry_after: about 3/s)
    with keyserver.admin() as admin:
        assert admin.list()  # still serving
    from keyserver import audit, store

    st = store.SqliteStore.open(keyserver.dir / "keyserver.db")
    try:
        events = [r.event for r in audit.records(st) if r.licence_id == lic.licence_id]
    finally:
        st.close()
    assert 0 < events.count("renewed") <= 3 * elapsed + 3, (events, counts)


def test_a_dead_workers_reserve_stays_spent(keyserver, package):
    """Fail closed: a worker killed with SIGKILL never reports; once its lease
    has passed its hard end, its whole reservation counts as used."""
    import os
    import signal

    lic = keyserver.issue("metered", max_calls=5, same_user=True)  # tier 0
    model = vault.open(package, licence=lic)
    try:
        model.compute({"x": X})
        proc = model._localw.proc  # the local worker's process
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        model.close()
    assert _row(keyserver, lic.licence_id)["reserved_calls"] == 5  # nobody refunded it
    time.sleep(keyserver.lease_ttl + 0.3)  # past the lease's hard end (no grace)
    with pytest.raises(vault.QuotaExhaustedError):
        vault.open(package, licence=lic)
    row = _row(keyserver, lic.licence_id)
    assert (row["used_calls"], row["reserved_calls"]) == (5, 0)  # settled as used


def test_a_report_sent_again_counts_once(keyserver, package):
    # a renewal whose answer was lost is sent again as it was (same report
    # id, same calls): the key server counts its calls once (issue 17, item 7)
    from vault.core.package import Package

    with Package.load(package) as pkg:
        args = {"model_id": "metered", "key_id": pkg.key_id, "package_digest": pkg.digest}
    lic = keyserver.issue("metered", max_calls=100)
    with keyserver.client(lic) as ks:
        rel = ks.release(**args)
        for _ in range(2):  # the first answer "lost": the same report again
            ks.renew(lease_id=rel.lease.lease_id, calls=7, report_id="r-" + "a" * 22)
        ks.renew(lease_id=rel.lease.lease_id, calls=3, report_id="r-" + "b" * 22)
        ks.close_lease(lease_id=rel.lease.lease_id, calls=1, report_id="r-" + "c" * 22)
        ks.close_lease(lease_id=rel.lease.lease_id, calls=1, report_id="r-" + "c" * 22)
    row = _row(keyserver, lic.licence_id)
    assert (row["used_calls"], row["reserved_calls"]) == (11, 0)
    # control: without ids, a report sent again is counted again
    lic2 = keyserver.issue("metered", max_calls=100)
    with keyserver.client(lic2) as ks:
        rel = ks.release(**args)
        for _ in range(2):
            ks.renew(lease_id=rel.lease.lease_id, calls=7)
        ks.close_lease(lease_id=rel.lease.lease_id, calls=0)
    assert _row(keyserver, lic2.licence_id)["used_calls"] == 14
