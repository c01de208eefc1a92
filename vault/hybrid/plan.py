"""Choose where to cut: head + transfer + tail, as Neurosurgeon (ASPLOS 2017) does.

The cost of a cut on a link is::

    head_ms (caller's device) + RTT + (bytes up + bytes down) / bandwidth + tail_ms (server)

where the head and tail costs are sums of per-node latencies measured with
onnxruntime's profiler (``vault profile``), the bytes up are the crossing
tensors and the bytes down the model's outputs. :func:`plan` ranks every
allowed cut (the all-server "cut" at the inputs included) and
:func:`format_table` prints what it chose from. :class:`Replanner` is the
client's side: it keeps a running estimate of the link and moves to another
shipped cut only when that one is clearly (``hysteresis``) and repeatedly
(``patience``) better.

Example::

    rows = plan(costs, Link(rtt_ms=20, mbit=100))
    print(format_table(rows, Link(20, 100)))
    rows[0].cut                                   # the cheapest
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CutCost", "Link", "LinkEstimator", "Planned", "Replanner", "format_table", "plan"]


@dataclass(frozen=True)
class Link:
    """A network link: round-trip time (ms) and bandwidth (Mbit/s, both ways)."""

    rtt_ms: float
    mbit: float

    def transfer_ms(self, nbytes: float) -> float:
        return nbytes * 8.0 / (self.mbit * 1e3) if self.mbit > 0 else float("inf")


@dataclass(frozen=True)
class CutCost:
    """What one cut costs: per-side compute and the bytes that cross."""

    cut: str
    head_ms: float
    tail_ms: float
    bytes_up: int
    bytes_down: int

    def total_ms(self, link: Link, *, head_scale: float = 1.0) -> float:
        return (
            self.head_ms * head_scale
            + link.rtt_ms
            + link.transfer_ms(self.bytes_up + self.bytes_down)
            + self.tail_ms
        )

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CutCost:
        return cls(str(d["cut"]), float(d["head_ms"]), float(d["tail_ms"]),
                   int(d["bytes_up"]), int(d["bytes_down"]))  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {"cut": self.cut, "head_ms": round(self.head_ms, 4),
                "tail_ms": round(self.tail_ms, 4), "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down}  # fmt: skip


@dataclass(frozen=True)
class Planned:
    cost: CutCost
    total_ms: float

    @property
    def cut(self) -> str:
        return self.cost.cut


def plan(costs: Sequence[CutCost], link: Link) -> list[Planned]:
    """Every cut with its predicted latency, cheapest first (stable on ties)."""
    rows = [Planned(c, c.total_ms(link)) for c in costs]
    return sorted(rows, key=lambda r: r.total_ms)


def format_table(rows: Sequence[Planned], link: Link, *, limit: int = 40) -> str:
    """The planner's table: one row per cut, the chosen one marked."""
    lines = [
        f"link: RTT {link.rtt_ms:g} ms, {link.mbit:g} Mbit/s",
        f"  {'cut':<28} {'head ms':>9} {'bytes up':>10} {'xfer ms':>9} {'tail ms':>9} {'total ms':>9}",
    ]
    for i, r in enumerate(rows[:limit]):
        c = r.cost
        xfer = link.rtt_ms + link.transfer_ms(c.bytes_up + c.bytes_down)
        name = c.cut if len(c.cut) <= 28 else c.cut[:25] + "..."
        mark = "*" if i == 0 else " "
        lines.append(
            f"{mark} {name:<28} {c.head_ms:9.2f} {c.bytes_up:10d} {xfer:9.2f} "
            f"{c.tail_ms:9.2f} {r.total_ms:9.2f}"
        )
    if len(rows) > limit:
        lines.append(f"  ... {len(rows) - limit} more")
    return "\n".join(lines)


class LinkEstimator:
    """A running (EWMA) estimate of RTT and bandwidth from the client's own calls.

    Bandwidth is averaged as time per bit, not bits per second: one slow call
    then moves the estimate at once (what a latency planner must see), while
    one fast call after many slow ones does not.
    """

    def __init__(self, *, alpha: float = 0.3, initial: Link | None = None) -> None:
        self.alpha = alpha
        self.rtt_ms: float | None = initial.rtt_ms if initial else None
        self._ms_per_bit: float | None = 1 / (initial.mbit * 1e3) if initial else None
        self.samples = 0

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def observe_rtt(self, ms: float) -> None:
        self.rtt_ms = self._mix(self.rtt_ms, ms)

    def observe_call(self, *, wall_ms: float, server_ms: float, nbytes: int) -> None:
        """One tail call: its wall time, the server's share, and the bytes both ways."""
        if self.rtt_ms is None or nbytes <= 0:
            return
        transfer = wall_ms - self.rtt_ms - server_ms
        # below ~0.2 ms the estimate is noise: treat the link as fast, not infinite
        self._ms_per_bit = self._mix(self._ms_per_bit, max(transfer, 0.2) / (nbytes * 8.0))
        self.samples += 1

    @property
    def mbit(self) -> float | None:
        return None if self._ms_per_bit is None else 1 / (self._ms_per_bit * 1e3)

    @property
    def link(self) -> Link | None:
        mbit = self.mbit
        if self.rtt_ms is None or mbit is None:
            return None
        return Link(self.rtt_ms, mbit)


class Replanner:
    """Moves between shipped cuts when the link changes, with hysteresis.

    ``choose(link, head_scale)`` returns the cut to use next: the current one
    unless another is predicted at least ``hysteresis`` (a fraction) cheaper
    on ``patience`` consecutive evaluations.
    """

    def __init__(
        self,
        costs: Sequence[CutCost],
        current: str,
        *,
        hysteresis: float = 0.15,
        patience: int = 3,
    ) -> None:
        self.costs = {c.cut: c for c in costs}
        if current not in self.costs:
            raise ValueError(f"unknown cut {current!r}")
        self.current = current
        self.hysteresis = hysteresis
        self.patience = patience
        self._streak: tuple[str, int] = ("", 0)
        self.switches = 0

    def choose(self, link: Link, *, head_scale: float = 1.0) -> str:
        totals = {n: c.total_ms(link, head_scale=head_scale) for n, c in self.costs.items()}
        best = min(totals, key=lambda n: totals[n])
        if best == self.current or totals[best] > totals[self.current] * (1 - self.hysteresis):
            self._streak = ("", 0)
            return self.current
        name, count = self._streak
        count = count + 1 if name == best else 1
        self._streak = (best, count)
        if count >= self.patience:
            self.current = best
            self._streak = ("", 0)
            self.switches += 1
        return self.current
