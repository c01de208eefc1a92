"""Call metering: what a lease may serve, from the quota and the rate limit.

Pure functions over a :class:`~keyserver.policy.LicenceRecord` and the time;
:mod:`keyserver.service` stores what they return. The rules (issue 10):

- **Reserve on grant.** A lease's call budget is debited from the quota when
  the lease is granted or renewed (``reserved_calls``); the worker reports
  what it served at each renewal and at close, and the unused part of the
  reservation is refunded then. A worker that dies never reports: its
  reservation stays spent (fail closed: once the lease's hard end has
  passed, the service settles it as if every reserved call had been served). So the quota cannot
  be exceeded by any number of concurrent or successive leases.
- **The rate limit sizes budgets.** ``rate_limit`` is calls per second. A
  bucket of call tokens, kept with the licence in the database (so replicas
  share it), fills at ``rate_limit`` up to ``rate_limit x lease_ttl`` (at
  least one call); every grant and every renewal draws its whole budget from
  it, and the part a lease did not serve goes back to it when the lease
  reports (a renewal, a close, a service's usage report; never for a lease
  that lapsed). A grant that finds less than one call is refused
  (``RateLimitedError`` with ``retry_after``); a renewal then gets a budget of
  0 and ``retry_after`` seconds. Over any T seconds a licence serves at most
  ``rate_limit x (T + lease_ttl)`` calls in all, however often it asks.
- **Per call, the rate itself.** The lease (and a service's call grant)
  carries ``rate`` and ``burst`` (:func:`call_burst`: one second of calls, at
  least one): the worker or service holding it lets at most ``burst`` calls
  through at once and then one every ``1 / rate`` seconds, refusing the rest
  with ``retry_after``. So a holder calling as fast as it can is served at the
  licence's rate, not a whole lease's budget at once.

Example::

    g = size_budget(lic, now=time.time(), lease_ttl=60.0)
    g.budget, g.tokens, g.retry_after
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .policy import LicenceRecord

__all__ = [
    "CALL_GRANT_MAX",
    "Budget",
    "bucket_capacity",
    "call_burst",
    "call_grant_cap",
    "refill",
    "refund",
    "settle",
    "size_budget",
]


@dataclass(frozen=True)
class Budget:
    budget: int | None  # calls the lease may serve before renewing; None: unlimited
    tokens: float | None  # the bucket after this grant (None: no rate limit)
    retry_after: float | None  # budget 0 because of the rate: seconds until one call


def bucket_capacity(rate: float, lease_ttl: float) -> float:
    return max(1.0, rate * lease_ttl)


def call_burst(rate: float | None) -> float | None:
    """Calls a worker or service lets through at once under ``rate`` (one
    second's worth, at least one); None without a rate limit."""
    if rate is None or rate <= 0:
        return None
    return max(1.0, float(rate))


def refund(lic: LicenceRecord, calls: int, *, lease_ttl: float) -> tuple[float, float] | None:
    """The call bucket (tokens, at) once ``calls`` unserved calls of a lease's
    budget go back to it (capped at its capacity); None: nothing changes."""
    rate = lic.rate_limit
    if calls <= 0 or rate is None or rate <= 0 or lic.rate_tokens is None or lic.rate_at is None:
        return None  # no rate limit, or a bucket never drawn from (still full)
    cap = bucket_capacity(rate, lease_ttl)
    return min(cap, lic.rate_tokens + calls), lic.rate_at


def refill(lic: LicenceRecord, *, now: float, lease_ttl: float) -> float | None:
    """Tokens in the licence's call bucket at ``now`` (None: no rate limit)."""
    rate = lic.rate_limit
    if rate is None or rate <= 0:
        return None
    cap = bucket_capacity(rate, lease_ttl)
    if lic.rate_tokens is None or lic.rate_at is None:
        return cap  # a fresh licence starts full
    return min(cap, lic.rate_tokens + max(0.0, now - lic.rate_at) * rate)


def size_budget(
    lic: LicenceRecord,
    *,
    now: float,
    lease_ttl: float,
    cap: Callable[[int | None], int] | None = None,
) -> Budget:
    """The budget of a lease granted or renewed at ``now``: the quota left
    (after every open reservation) and the whole calls in the bucket; and
    ``cap(quota_left)`` when given (a service's call grant: :func:`call_grant_cap`)."""
    caps: list[int] = []
    left = None
    if lic.max_calls is not None:
        left = max(0, lic.max_calls - lic.debited_calls)
        caps.append(left)
    if cap is not None:
        caps.append(cap(left))
    tokens = refill(lic, now=now, lease_ttl=lease_ttl)
    if tokens is not None:
        caps.append(math.floor(tokens + 1e-9))
    budget = min(caps) if caps else None
    retry = None
    if tokens is not None and tokens + 1e-9 < 1.0:
        assert lic.rate_limit is not None
        retry = (1.0 - tokens) / lic.rate_limit
    rest = None if tokens is None else tokens - (budget or 0)
    return Budget(budget, rest, retry)


CALL_GRANT_MAX = 1000  # calls one service grant reserves at most
CALL_GRANT_SHARE = 4  # ... and at most a quarter of the quota left


def call_grant_cap(quota_left: int | None) -> int:
    """The most calls one call grant (a worker service's lease) reserves:
    :data:`CALL_GRANT_MAX`, and a quarter of the quota left (at least one
    call), so a service that dies holding one locks little of the quota and
    only until the grant lapses, and replicas share a small quota."""
    if quota_left is None:
        return CALL_GRANT_MAX
    return min(CALL_GRANT_MAX, max(1, math.ceil(quota_left / CALL_GRANT_SHARE)))


def settle(lic: LicenceRecord, *, reserved: int | None, calls: int) -> tuple[int, int]:
    """(used_calls, reserved_calls) once a lease holding ``reserved`` reports
    ``calls``: the calls become used, the reservation is released (its unused
    part refunded). More calls than reserved are charged in full."""
    used = lic.used_calls + calls
    held = lic.reserved_calls - (reserved or 0)
    return used, max(0, held)
