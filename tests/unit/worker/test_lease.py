"""worker.lease: renewal, revocation, the offline grace period (fake clock)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from vault.core.errors import KeyServerUnavailableError, LicenceRevokedError, QuotaExhaustedError
from worker.lease import LeaseKeeper


@dataclass
class FakeLease:
    lease_id: str = "L1"
    ttl: float = 10.0
    expires_at: float = 10.0
    hard_end: float = 20.0
    call_budget: int | None = None


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_renewal_reports_calls_and_extends() -> None:
    clock = Clock()
    seen: list[tuple[str, int]] = []

    def renew(lease_id: str, calls: int) -> FakeLease:
        seen.append((lease_id, calls))
        return FakeLease("L2", expires_at=clock.t + 10, hard_end=clock.t + 20)

    keeper = LeaseKeeper(FakeLease(), renew=renew, on_end=lambda: None, clock=clock)
    for _ in range(3):
        keeper.check()
        keeper.record_call()
    keeper._renew_once()
    assert seen == [("L1", 3)]
    assert keeper.snapshot()["lease_id"] == "L2"
    assert keeper.snapshot()["state"] == "active"


def test_revocation_ends_the_lease_and_drops_sessions() -> None:
    dropped: list[bool] = []

    def renew(lease_id: str, calls: int) -> FakeLease:
        raise LicenceRevokedError()

    keeper = LeaseKeeper(
        FakeLease(), renew=renew, on_end=lambda: dropped.append(True), clock=Clock()
    )
    keeper._renew_once()
    assert dropped == [True]
    with pytest.raises(LicenceRevokedError):
        keeper.check()
    assert keeper.snapshot()["state"] == "ended"


def test_unreachable_key_server_is_tolerated_until_hard_end() -> None:
    clock = Clock()

    def renew(lease_id: str, calls: int) -> FakeLease:
        raise KeyServerUnavailableError()

    keeper = LeaseKeeper(FakeLease(), renew=renew, on_end=lambda: None, clock=clock)
    keeper.check()  # one call let through
    keeper._renew_once()
    clock.t = 15.0  # past expires_at, before hard_end: still serving
    keeper.check()
    assert keeper.snapshot()["state"] == "grace"
    clock.t = 20.0
    with pytest.raises(KeyServerUnavailableError):
        keeper.check()
    assert keeper._calls_unreported == 2  # both calls let through are kept to report later


def test_spent_call_budget_renews_before_serving() -> None:
    calls: list[int] = []

    def renew(lease_id: str, n: int) -> FakeLease:
        calls.append(n)
        if len(calls) > 1:
            raise QuotaExhaustedError()
        return FakeLease(call_budget=2)

    keeper = LeaseKeeper(FakeLease(call_budget=2), renew=renew, on_end=lambda: None, clock=Clock())
    for _ in range(4):
        keeper.check()
        keeper.record_call()
    assert calls == [2]
    with pytest.raises(QuotaExhaustedError):
        keeper.check()


def test_background_thread_renews() -> None:
    import threading

    done = threading.Event()

    def renew(lease_id: str, calls: int) -> FakeLease:
        done.set()
        return FakeLease(ttl=0.2)

    import time

    now = time.time()
    keeper = LeaseKeeper(
        FakeLease(ttl=0.2, expires_at=now + 0.2, hard_end=now + 5), renew=renew, on_end=lambda: None
    )
    keeper.start()
    try:
        assert done.wait(2)
    finally:
        keeper.stop()


def test_a_slow_start_renews_before_serving() -> None:
    """Start-up took most of the lease: start() renews at once, in the calling
    thread, so the first call meets a fresh lease."""
    now = [1000.0]
    renewed: list[tuple[str, int]] = []

    class L:
        lease_id = "l1"
        ttl = 2.0
        expires_at = 1000.5  # 0.5 s left of a 2 s lease
        hard_end = 1000.5
        call_budget = 5
        retry_after = None

    class Fresh(L):
        expires_at = 1002.0
        hard_end = 1002.0

    def renew(lease_id: str, calls: int) -> Any:
        renewed.append((lease_id, calls))
        return Fresh()

    k = LeaseKeeper(L(), renew=renew, on_end=lambda: None, clock=lambda: now[0])
    k.start()
    try:
        assert renewed == [("l1", 0)]
        now[0] = 1001.0  # past the old lease's hard end: the fresh one serves
        k.check()
    finally:
        k._stop.set()  # noqa: SLF001 - no close callback here


def test_a_prompt_start_does_not_renew_at_once() -> None:
    renewed: list[str] = []

    class L:
        lease_id = "l1"
        ttl = 2.0
        expires_at = 1001.9
        hard_end = 1001.9
        call_budget = 5
        retry_after = None

    k = LeaseKeeper(L(), renew=lambda i, c: renewed.append(i), on_end=lambda: None,
                    clock=lambda: 1000.0)  # fmt: skip
    k.start()
    k._stop.set()  # noqa: SLF001
    assert renewed == []


@dataclass
class RatedLease(FakeLease):
    rate: float | None = 2.0
    burst: float | None = 2.0


def test_a_whole_lease_budget_is_served_at_the_licences_rate() -> None:
    # issue 18, item 6: --rate 2/s with a 60 s lease (budget 120) served 126
    # calls in 3 s: the lease's rate and burst are enforced per call
    from vault.core.errors import RateLimitedError

    clock = Clock()
    keeper = LeaseKeeper(RatedLease(call_budget=120, hard_end=1e9), renew=None,
                         on_end=lambda: None, clock=clock)  # fmt: skip
    served, waits = 0, []
    for step in range(300):  # a caller hammering for 3 s (every 10 ms)
        clock.t = step * 0.01
        try:
            keeper.check()
            served += 1
        except RateLimitedError as exc:
            assert exc.retry_after is not None
            waits.append(exc.retry_after)
    assert served == 2 + 5  # the burst, then one every 0.5 s (at 0.5, 1.0, ... 2.5)
    assert 0 < min(waits) and max(waits) <= 0.5
    assert keeper._calls_unreported == served  # refused calls took nothing of the budget


def test_a_report_whose_answer_was_lost_is_sent_again_as_it_was() -> None:
    clock = Clock()
    sent: list[tuple[str, int, str]] = []
    lose = [True]

    def renew(lease_id: str, calls: int, report_id: str) -> FakeLease:
        sent.append((lease_id, calls, report_id))
        if lose[0]:
            lose[0] = False
            raise KeyServerUnavailableError("the answer was lost")
        return FakeLease("L1", expires_at=clock.t + 10, hard_end=clock.t + 20)

    closed: list[tuple[str, int, str]] = []
    keeper = LeaseKeeper(FakeLease(), renew=renew, on_end=lambda: None, clock=clock,
                         close=lambda i, c, r: closed.append((i, c, r)), report_ids=True)  # fmt: skip
    for _ in range(3):
        keeper.check()
    keeper._renew_once()  # lost
    keeper.check()  # a call after the loss: in the next report, not this one
    keeper._renew_once()  # the same report again
    assert [c for _, c, _ in sent] == [3, 3] and sent[0][2] == sent[1][2]
    keeper.stop()
    assert closed[0][1] == 1 and closed[0][2] != sent[0][2]
