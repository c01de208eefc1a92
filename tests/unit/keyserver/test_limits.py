"""Request limits and coalesced refusals (keyserver/limits.py), on a given clock."""

from __future__ import annotations

import pytest

from keyserver.limits import Buckets, Coalescer, Limit, Refusal, parse_limit


def test_a_bucket_lets_a_burst_through_then_says_when() -> None:
    b = Buckets(Limit(2.0, 3.0))
    assert [b.take("k", 100.0) for _ in range(3)] == [None, None, None]
    assert b.take("k", 100.0) == pytest.approx(0.5)  # one token in 0.5 s at 2/s
    assert b.take("other", 100.0) is None  # each key its own bucket
    assert b.take("k", 100.5) is None


def test_the_table_is_bounded_and_drops_the_least_recently_used() -> None:
    b = Buckets(Limit(1.0, 1.0), max_entries=100)
    for i in range(1000):
        b.take(f"k{i}", 0.0)
    assert len(b) == 100
    assert b.take("k999", 0.0) is not None  # recent: still remembered (empty)
    assert b.take("k0", 0.0) is None  # dropped long ago: starts full


def test_parse_limit() -> None:
    assert parse_limit("20/s:100") == Limit(20.0, 100.0)
    assert parse_limit("600/m") == Limit(10.0, 50.0)
    assert parse_limit("off") is None
    for bad in ("fast", "0/s", "5/s:0.5"):
        with pytest.raises(ValueError):
            parse_limit(bad)


def _r(reason: str = "permission_denied", message: str = "no") -> Refusal:
    return Refusal("denied", "lic-1", "lic-1", "m", {"op": "release", "reason": reason,
                                                     "message": message})  # fmt: skip


def test_identical_refusals_a_few_at_once_then_one_count_per_interval() -> None:
    c = Coalescer(60.0, individually=3)
    written = [c.refusal(_r(), 10.0 + i)[0] for i in range(10)]
    assert written == [True] * 3 + [False] * 7
    assert c.refusal(_r("rate_limited", "slow; retry after 0.25 s"), 11.0)[0] is True
    # a retry-after in the message does not make a refusal another kind
    assert c.refusal(_r("rate_limited", "slow; retry after 0.75 s"), 11.0)[0] is True
    assert c.pending() == 7 and not c.has_due(69.0) and c.has_due(70.0)
    [rec] = c.due(70.0)
    assert rec["event"] == "denied_repeated" and rec["detail"]["count"] == 7
    assert (rec["detail"]["first"], rec["detail"]["last"]) == (10.0, 19.0)
    assert c.refusal(_r(), 71.0)[0] is True  # a new interval starts with a record


def test_a_batch_that_rolls_back_rolls_the_counts_back() -> None:
    c = Coalescer(60.0, individually=1)
    c.begin()
    assert c.refusal(_r(), 1.0)[0] is True
    c.commit()
    c.begin()
    assert c.refusal(_r(), 2.0)[0] is False
    c.rollback()  # that refusal's reply became an AuditError: nothing to count
    assert c.pending() == 0
    c.begin()
    c.refusal(_r(), 3.0)
    c.commit()
    c.begin()
    assert len(c.due(100.0)) == 1
    c.rollback()  # the summary written in a failed batch is written again later
    assert c.pending() == 1 and len(c.due(100.0)) == 1


def test_no_coalescing_at_interval_zero_and_a_full_table_writes_its_oldest() -> None:
    c = Coalescer(0.0)
    assert all(c.refusal(_r(), float(i))[0] for i in range(20))
    c = Coalescer(60.0, individually=1, max_entries=2)
    for who in ("a", "a", "b", "c"):
        write, pushed = c.refusal(Refusal("denied", who, None, None, {}), 1.0)
        if who == "c":
            assert [p["actor"] for p in pushed] == ["a"] and pushed[0]["detail"]["count"] == 1
