"""keyserver.metering: budgets from the quota and the call bucket (no clock, no DB)."""

from __future__ import annotations

import dataclasses

from keyserver.metering import settle, size_budget
from keyserver.policy import LicenceRecord

LIC = LicenceRecord(
    licence_id="lic-1", holder="alice", role="caller", model_id="m", client_public_key="k",
    issued_at=0.0, expires_at=None, max_calls=None, rate_limit=None, grace=0.0,
    revoked_at=None, used_calls=0,
)  # fmt: skip


def lic(**kw: object) -> LicenceRecord:
    return dataclasses.replace(LIC, **kw)


def test_no_limits_means_an_unlimited_budget():
    b = size_budget(lic(), now=0.0, lease_ttl=60.0)
    assert (b.budget, b.tokens, b.retry_after) == (None, None, None)


def test_the_budget_is_the_quota_left_after_every_reservation():
    assert size_budget(lic(max_calls=10), now=0.0, lease_ttl=60).budget == 10
    assert size_budget(lic(max_calls=10, used_calls=3, reserved_calls=5), now=0.0,
                       lease_ttl=60).budget == 2  # fmt: skip
    assert size_budget(lic(max_calls=10, used_calls=12), now=0.0, lease_ttl=60).budget == 0


def test_the_rate_bucket_holds_rate_x_ttl_and_refills_at_the_rate():
    fresh = size_budget(lic(rate_limit=2.0), now=100.0, lease_ttl=2.0)
    assert fresh.budget == 4 and fresh.tokens == 0.0  # full bucket: 2/s x 2 s
    drained = lic(rate_limit=2.0, rate_tokens=0.0, rate_at=100.0)
    empty = size_budget(drained, now=100.2, lease_ttl=2.0)
    assert empty.budget == 0 and abs(empty.retry_after - 0.3) < 1e-9  # 0.4 tokens, 0.6 to go
    later = size_budget(drained, now=100.6, lease_ttl=2.0)
    assert later.budget == 1 and abs(later.tokens - 0.2) < 1e-9
    capped = size_budget(drained, now=1e6, lease_ttl=2.0)
    assert capped.budget == 4  # never more than one lease's worth, however long it waited
    slow = size_budget(lic(rate_limit=0.1), now=0.0, lease_ttl=2.0)
    assert slow.budget == 1  # at least one call fits in the bucket


def test_quota_and_rate_together_take_the_smaller():
    assert size_budget(lic(rate_limit=100.0, max_calls=7), now=0, lease_ttl=60).budget == 7
    assert size_budget(lic(rate_limit=1.0, max_calls=7), now=0, lease_ttl=2).budget == 2


def test_settle_turns_reported_calls_into_used_and_refunds_the_rest():
    held = lic(max_calls=10, used_calls=2, reserved_calls=8)
    assert settle(held, reserved=5, calls=3) == (5, 3)  # 2 of the 5 refunded
    assert settle(held, reserved=5, calls=5) == (7, 3)
    assert settle(held, reserved=None, calls=4) == (6, 8)  # unlimited lease: nothing held
    assert settle(held, reserved=5, calls=9) == (11, 3)  # over-reporting is charged in full
