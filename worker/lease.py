"""The key lease: renew it in the background, refuse calls when it ends.

The key server hands the worker a lease with the package key and a call
budget it reserved from the licence's quota. A :class:`LeaseKeeper` renews it
before it runs out (or as soon as the budget is spent), reporting the calls
served since the last renewal, and reports the last ones when the worker
stops (``close``), so the unused budget goes back to the quota. A budget of
0 with ``retry_after`` (the licence's rate limit) refuses calls with
``RateLimitedError`` until then, without asking the key server again. The
lease's ``rate`` and ``burst`` are enforced per call (a token bucket): at
most ``burst`` calls at once, then ``rate`` per second, each refusal with its
``retry_after``; so a budget sized for a whole lease is served at the
licence's rate, never in one burst.
A licence denial (revoked, expired, quota) ends it at once: the worker
drops its sessions and every later compute gets that same licence error.
An unreachable key server is tolerated until the lease's ``hard_end``;
after that the worker refuses too.

Time and the renew call are parameters, so tests need no clock or server.

Example::

    keeper = LeaseKeeper(lease, renew=lambda lease_id, calls: ks.renew(lease_id=lease_id, calls=calls),
                         on_end=pipeline.close,
                         close=lambda lease_id, calls: ks.close_lease(lease_id=lease_id, calls=calls))
    keeper.start()
    keeper.check()          # before each compute: takes one call of the budget, or raises
    keeper.record_call()    # after it was served
    keeper.stop()           # reports the last calls (close)
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from vault.core.errors import (
    KeyServerError,
    KeyServerUnavailableError,
    LicenceError,
    LicenceExpiredError,
    QuotaExhaustedError,
    RateLimitedError,
    VaultError,
)

__all__ = ["LeaseKeeper"]


def _get(lease: Any, name: str, default: Any = None) -> Any:
    return getattr(lease, name, default) if lease is not None else default


class LeaseKeeper:
    """Owns the current lease, its renewal thread and the refusal state."""

    def __init__(
        self,
        lease: Any,
        *,
        renew: Callable[[str, int], Any] | None,
        on_end: Callable[[], None],
        clock: Callable[[], float] = time.time,
        unsafe_no_lease: bool = False,
        close: Callable[[str, int], Any] | None = None,
        report_ids: bool = False,
        on_ended: Callable[[VaultError], None] | None = None,
    ) -> None:
        self._lease = lease
        # after on_end, once, with the error that ended the lease (a service's
        # worker exits: its supervisor starts one that asks for a new lease)
        self._on_ended = on_ended
        # with report ids, renew and close are called (lease_id, calls, report_id):
        # a report whose answer was lost is sent again as it was, and counted once
        self._report_ids = report_ids
        self._pending: tuple[str, int] | None = None
        self._renew = renew
        self._close = close
        self._renew_lock = threading.Lock()  # one synchronous renewal at a time
        self._retry_at = 0.0
        self._on_end = on_end
        self._clock = clock
        self._unsafe = unsafe_no_lease
        self._lock = threading.Lock()
        self._error: VaultError | None = None
        self._calls_unreported = 0
        self._calls_in_lease = 0
        self._served = 0
        self._renewals = 0
        self._last_problem: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tokens: float | None = None  # the per-call bucket (None: full)
        self._tokens_at = 0.0

    # -- serving side ------------------------------------------------------------

    def check(self) -> None:
        """Raise the error that ended the lease, or end it now if its time is up."""
        err = self._error
        if err is not None:
            raise err
        if self._unsafe or self._lease is None:
            return
        hard_end = _get(self._lease, "hard_end")
        if hard_end is not None and self._clock() >= float(hard_end):
            self._end(self._expired_error())
            raise self._error  # type: ignore[misc]
        self._pace()
        if self._take():
            return
        # The lease's call budget is spent: renew now, in the caller's thread,
        # so the quota and the rate are enforced by the key server and not by
        # our timing; while the rate allows nothing, refuse without asking.
        with self._renew_lock:
            if self._take():
                return
            if self._clock() < self._retry_at:
                raise RateLimitedError("the licence's rate limit allows no call yet",
                                       retry_after=self._retry_at - self._clock())  # fmt: skip
            self._renew_once()
            if self._error is not None:
                raise self._error
            if self._take():
                return
            retry = _get(self._lease, "retry_after")
            if retry is not None:
                self._retry_at = self._clock() + float(retry)
                raise RateLimitedError("the licence's rate limit allows no call yet",
                                       retry_after=float(retry))  # fmt: skip
            raise QuotaExhaustedError("lease call budget spent")

    def _pace(self) -> None:
        """The licence's rate, per call: a token bucket of ``burst`` calls
        filling at ``rate`` (from the lease); RateLimitedError with
        ``retry_after`` when empty. A refused call takes nothing."""
        rate = _get(self._lease, "rate")
        if rate is None or float(rate) <= 0:
            return
        rate = float(rate)
        burst = max(1.0, float(_get(self._lease, "burst") or rate))
        with self._lock:
            now = self._clock()
            tokens = burst if self._tokens is None else self._tokens
            tokens = min(burst, tokens + max(0.0, now - self._tokens_at) * rate)
            self._tokens_at = now
            if tokens < 1.0:
                self._tokens = tokens
                raise RateLimitedError(
                    f"the licence allows {rate:g} calls/s (bursts of {burst:g})",
                    retry_after=(1.0 - tokens) / rate,
                )
            self._tokens = tokens - 1.0

    def _take(self) -> bool:
        """Count one call against the lease's budget if it has one left
        (atomic: concurrent handler threads never overrun the budget). A call
        is reported from the moment it is let through, served or not, so
        every call the budget allowed is reported exactly once."""
        with self._lock:
            budget = _get(self._lease, "call_budget")
            if budget is not None and self._calls_in_lease >= int(budget):
                return False
            self._calls_in_lease += 1
            self._calls_unreported += 1
            return True

    def record_call(self) -> None:
        """A call was served (statistics; the budget was counted by check)."""
        with self._lock:
            self._served += 1

    def snapshot(self) -> dict[str, Any]:
        if self._unsafe:
            return {"state": "none", "detail": "UNSAFE test key: no lease, no key server"}
        state = (
            "ended" if self._error is not None else ("grace" if self._last_problem else "active")
        )
        return {
            "state": state,
            "error": self._error.to_wire() if self._error is not None else None,
            "lease_id": _get(self._lease, "lease_id"),
            "expires_at": _get(self._lease, "expires_at"),
            "hard_end": _get(self._lease, "hard_end"),
            "call_budget": _get(self._lease, "call_budget"),
            "renewals": self._renewals,
            "served": self._served,
            "last_problem": self._last_problem,
        }

    # -- renewal -------------------------------------------------------------------

    def _end(self, err: VaultError) -> None:
        with self._lock:
            if self._error is not None:
                return
            self._error = err
        self._stop.set()
        try:
            self._on_end()
        except Exception:  # pragma: no cover - dropping sessions must not kill serving
            pass
        if self._on_ended is not None:
            self._on_ended(err)

    def _expired_error(self) -> VaultError:
        if self._last_problem:
            return KeyServerUnavailableError(
                "the lease ended while the key server was unreachable; calls are refused"
            )
        return LicenceExpiredError("the lease ended and was not renewed")

    def _next_report(self) -> tuple[str, int]:
        """The report to send: the one whose answer was lost, as it was, or
        the calls not yet reported under a new id (lock held)."""
        if self._pending is None:
            self._pending = (os.urandom(12).hex(), self._calls_unreported)
            self._calls_unreported = 0
        return self._pending

    def _send(self, fn: Callable[..., Any], lease_id: str, report: tuple[str, int]) -> Any:
        if self._report_ids:
            return fn(lease_id, report[1], report[0])
        return fn(lease_id, report[1])

    def _unanswered(self) -> None:
        """No answer: with report ids, the same report goes again next time;
        without, its calls go back to the count (lock held)."""
        if not self._report_ids and self._pending is not None:
            self._calls_unreported += self._pending[1]
            self._pending = None

    def _renew_once(self) -> None:
        if self._renew is None or self._error is not None:
            return
        with self._lock:
            report = self._next_report()
            taken = self._calls_in_lease
        try:
            lease = self._send(self._renew, str(_get(self._lease, "lease_id")), report)
        except LicenceError as exc:
            with self._lock:  # answered (a refusal): the calls were counted
                self._pending = None
            self._end(exc)
            return
        except (KeyServerError, OSError) as exc:
            # Unreachable: keep serving until hard_end, keep the count to report.
            with self._lock:
                self._unanswered()
            self._last_problem = f"{getattr(exc, 'code', 'error')}: {exc}"
            return
        except VaultError as exc:
            with self._lock:
                self._unanswered()
            self._last_problem = f"{exc.code}: {exc}"
            return
        with self._lock:
            self._pending = None
            self._lease = lease
            # calls let through during the round trip count against the new budget
            self._calls_in_lease -= taken
        self._renewals += 1
        self._last_problem = None

    def _delay(self) -> float:
        now = self._clock()
        ttl = float(_get(self._lease, "ttl", 10.0) or 10.0)
        expires = float(_get(self._lease, "expires_at", now + ttl) or now + ttl)
        if self._last_problem:
            return max(0.05, min(1.0, ttl / 4))  # retry soon while the server is away
        # renew halfway through the lease: one lost round trip still leaves time
        return max(0.05, min(expires - now - ttl / 2, ttl / 2))

    def _loop(self) -> None:
        while not self._stop.wait(self._delay()):
            with self._renew_lock:
                self._renew_once()
            hard_end = _get(self._lease, "hard_end")
            if hard_end is not None and self._clock() >= float(hard_end):
                self._end(self._expired_error())

    def start(self) -> None:
        """Start renewing in the background. A start-up that used half the
        lease or more (a slow session build on a loaded machine) renews once
        first, in this thread, so the first call never meets a lease that
        ended while the sessions were being built."""
        if self._unsafe or self._renew is None or self._lease is None:
            return
        now = self._clock()
        ttl = float(_get(self._lease, "ttl", 10.0) or 10.0)
        expires = float(_get(self._lease, "expires_at", now + ttl) or now + ttl)
        if expires - now < ttl / 2:
            with self._renew_lock:
                self._renew_once()
        self._thread = threading.Thread(target=self._loop, name="vault-lease", daemon=True)
        self._thread.start()

    def drop_sessions(self) -> None:
        """At exit: drop the sessions (and wipe the weights once no call is in flight)."""
        try:
            self._on_end()
        except Exception:  # pragma: no cover - best effort on the way out
            pass

    def stop(self) -> None:
        """Stop renewing and close the lease, reporting the calls not yet
        reported (the key server refunds the rest of the budget). Best
        effort: an unreachable server leaves the reservation spent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._unsafe or self._close is None or self._lease is None:
            return
        with self._lock:
            lease_id = str(_get(self._lease, "lease_id"))
            waiting = self._pending is not None and self._error is None
        if waiting and self._renew is not None:  # a report whose answer was lost goes first
            with self._renew_lock:
                self._renew_once()
        with self._lock:
            if self._pending is not None:
                # unanswered twice: its calls go with the last ones, under the
                # close's own id (counted twice only if the lost one did arrive)
                self._calls_unreported += self._pending[1]
                self._pending = None
            report = self._next_report()
        try:
            self._send(self._close, lease_id, report)
            with self._lock:
                self._pending = None
        except (VaultError, OSError) as exc:
            self._last_problem = f"close: {getattr(exc, 'code', 'error')}"
