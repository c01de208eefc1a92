"""Floods: request rate limits, and repeated refusals coalesced in the audit.

Two defences against one party flooding the key server with requests it
will refuse (issue 17, item 5: 3,000 refused requests in 2.9 s grew the
database and its WAL from 0.3 to 16.9 MB, one audit row each):

- :class:`Buckets`: a token bucket per CURVE identity (licence holders and
  enrolled devices have their own :class:`Limit`), and one per licence for
  the requests devices make on a licence's behalf, checked before any
  policy runs. A request past its bucket is refused with
  :class:`~vault.core.errors.RateLimitedError` and ``retry_after``. The
  table is bounded (least recently used identities are dropped first: a
  dropped bucket was idle long enough to be full again, unless more than
  ``max_entries`` identities are active at once).
- :class:`Coalescer`: the first few refusals of a kind (same event, actor,
  licence, model and detail) in an interval are audited at once, each its
  own record, as every refusal was (``individually``, 8 by default: a
  holder probing a few times is seen in full); the identical ones that
  follow in that interval are counted in memory and written as one
  ``denied_repeated`` record carrying their count, first and last time, when
  the interval ends (or the server stops, or the table is full). Every record still joins the
  hash chain, so ``vault keyserver audit --verify`` and the anchors work as
  before. The table follows the batch's transaction: a batch that rolls
  back rolls its changes here back too.

Example::

    ids = Buckets(Limit(20.0, 100.0))
    wait = ids.take("client-key", now)        # None: go on; else seconds to wait
    c = Coalescer(60.0)
    c.begin(); write_now, flush = c.refusal(record, now); c.commit()
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Buckets", "Coalescer", "Limit", "Refusal", "parse_limit"]


@dataclass(frozen=True)
class Limit:
    """``rate`` requests per second, bursts of ``burst``."""

    rate: float
    burst: float

    def __str__(self) -> str:
        return f"{self.rate:g}/s:{self.burst:g}"


_LIMIT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*(?::\s*(\d+(?:\.\d+)?))?\s*")
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RETRY = re.compile(r"; retry after [0-9.e+-]+ s$")


def parse_limit(text: str) -> Limit | None:
    """``"20/s:100"`` (rate, burst), ``"20/s"`` (burst: 5 seconds' worth, at
    least one), ``"off"`` -> None."""
    if text.strip().lower() in ("off", "none", "0"):
        return None
    m = _LIMIT.fullmatch(text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"bad request limit {text!r} (use e.g. 20/s:100, 600/m, or off)")
    rate = float(m.group(1)) / _PER[m.group(2) or "s"]
    burst = float(m.group(3)) if m.group(3) else max(1.0, 5 * rate)
    if burst < 1:
        raise ValueError(f"request limit {text!r}: the burst must be at least 1")
    return Limit(rate, burst)


class Buckets:
    """A token bucket per key, in a table of at most ``max_entries``."""

    def __init__(self, limit: Limit, *, max_entries: int = 65536) -> None:
        self.limit = limit
        self.max_entries = max_entries
        self._table: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def __len__(self) -> int:
        return len(self._table)

    def take(self, key: str, now: float) -> float | None:
        """Take one token for ``key``: None if there was one, else the
        seconds until there will be."""
        rate, burst = self.limit.rate, self.limit.burst
        tokens, at = self._table.pop(key, (burst, now))
        tokens = min(burst, tokens + max(0.0, now - at) * rate)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = None
        else:
            wait = (1.0 - tokens) / rate
        self._table[key] = (tokens, now)  # most recently used last
        while len(self._table) > self.max_entries:
            self._table.popitem(last=False)
        return wait


@dataclass(frozen=True)
class Refusal:
    """One refusal as the audit records it."""

    event: str
    actor: str | None
    licence_id: str | None
    model_id: str | None
    detail: dict[str, Any]

    def kind(self) -> str:
        """What makes two refusals identical: everything but a retry-after
        in the message (the time it names changes with every refusal)."""
        same = dict(self.detail)
        if isinstance(same.get("message"), str):
            same["message"] = _RETRY.sub("", same["message"])
        return json.dumps([self.event, self.actor, self.licence_id, self.model_id, same],
                          sort_keys=True, separators=(",", ":"), default=str)  # fmt: skip


@dataclass
class _Open:
    refusal: Refusal
    first: float
    last: float
    written: int = 1  # refusals of this interval audited one by one
    repeats: int = 0  # refusals counted, not yet written


@dataclass
class Coalescer:
    """Identical refusals within ``interval`` seconds: the first
    ``individually`` a record each, the rest one record with their count
    when the interval ends. ``interval`` 0: every refusal is its own record."""

    interval: float
    individually: int = 8
    max_entries: int = 4096
    _open: OrderedDict[str, _Open] = field(default_factory=OrderedDict)
    _journal: list[tuple[str, _Open | None]] | None = None

    def begin(self) -> None:
        self._journal = []

    def commit(self) -> None:
        self._journal = None

    def rollback(self) -> None:
        """Undo every change since :meth:`begin` (the batch's records are gone)."""
        journal, self._journal = self._journal or [], None
        for key, old in reversed(journal):
            if old is None:
                self._open.pop(key, None)
            else:
                self._open[key] = old

    def _remember(self, key: str) -> None:
        if self._journal is not None:
            old = self._open.get(key)
            self._journal.append((key, None if old is None else _Open(**vars(old))))

    def refusal(self, r: Refusal, now: float) -> tuple[bool, list[dict[str, Any]]]:
        """(whether to write ``r`` now, summary records to write now: the
        entries this one pushes out of a full table)."""
        if self.interval <= 0:
            return True, []
        key = r.kind()
        entry = self._open.get(key)
        if entry is not None and now < entry.first + self.interval:
            self._remember(key)
            entry.last = now
            if entry.written < self.individually:
                entry.written += 1
                return True, []
            entry.repeats += 1
            return False, []
        out = []
        if entry is not None:  # its interval ended: its summary first, then a new one
            out += self._close(key)
        self._remember(key)
        self._open[key] = _Open(r, now, now)
        while len(self._open) > self.max_entries:
            out += self._close(next(iter(self._open)))
        return True, out

    def due(self, now: float, *, every: bool = False) -> list[dict[str, Any]]:
        """Summary records of the intervals that ended (or of all of them)."""
        out: list[dict[str, Any]] = []
        for key in [k for k, e in self._open.items() if every or now >= e.first + self.interval]:
            out += self._close(key)
        return out

    def has_due(self, now: float) -> bool:
        """Whether an interval with counted refusals has ended."""
        return any(e.repeats and now >= e.first + self.interval for e in self._open.values())

    def pending(self) -> int:
        """Refusals counted and not yet written."""
        return sum(e.repeats for e in self._open.values())

    def _close(self, key: str) -> list[dict[str, Any]]:
        self._remember(key)
        e = self._open.pop(key)
        if not e.repeats:
            return []
        r = e.refusal
        detail = dict(r.detail)
        if isinstance(detail.get("message"), str):
            detail["message"] = _RETRY.sub("", detail["message"])
        detail.update(count=e.repeats, first=e.first, last=e.last, interval=self.interval,
                      of=r.event)  # fmt: skip
        return [{"event": "denied_repeated", "actor": r.actor, "licence_id": r.licence_id,
                 "model_id": r.model_id, "detail": detail}]  # fmt: skip
