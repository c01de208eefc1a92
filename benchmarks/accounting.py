"""Licence accounting on the hot path, timed in isolation.

The worker does two things per compute for the licence: ``LeaseKeeper.check()``
before running (lease ended? hard end passed? call budget spent?) and
``LeaseKeeper.record_call()`` after (two counters under a lock). The worker
does not time them itself, so this times exactly that pair, on the worker's
own :class:`worker.lease.LeaseKeeper` with a live-looking lease (an hour to
run, a large call budget) and no renewal thread, in a tight loop; the loop's
own cost (an empty loop of the same length) is subtracted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import Context

import statistics
import time
from types import SimpleNamespace
from typing import Any


def run(quick: bool) -> dict[str, Any]:
    try:
        from worker.lease import LeaseKeeper
    except Exception as exc:  # noqa: BLE001
        return {"unavailable": f"worker.lease not importable ({type(exc).__name__}: {exc})"}
    now = time.time()
    lease = SimpleNamespace(
        lease_id="bench",
        expires_at=now + 3600,
        hard_end=now + 3600,
        call_budget=10**12,
        renew_after=now + 1800,
    )
    keeper = LeaseKeeper(lease, renew=None, on_end=lambda: None)
    n = 50_000 if quick else 200_000
    check, record = keeper.check, keeper.record_call
    per_call: list[float] = []
    for _ in range(5 if quick else 11):
        t = time.perf_counter()
        for _ in range(n):
            pass
        empty = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n):
            check()
            record()
        per_call.append((time.perf_counter() - t - empty) / n)
    return {
        "method": "worker.lease.LeaseKeeper check()+record_call() in isolation, loop cost subtracted",
        "calls_per_repeat": n,
        "median_s": statistics.median(per_call),
        "min_s": min(per_call),
        "samples_s": per_call,
    }


def section(ctx: Context) -> dict[str, Any]:
    return run(ctx.quick)
