"""The service's pure parts: which models batch and how rows split back; the
call-licence cache with a fake key server and clocks (no waiting)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from vault.core.errors import (
    KeyServerUnavailableError,
    LicenceRevokedError,
    RateLimitedError,
)
from worker.service import batching
from worker.service.calls import AdmissionPending, CallLicencePolicy
from worker.service.instances import Backoff


def _sig(*shapes: list[Any], declared: bool | None = True) -> dict[str, Any]:
    info: dict[str, Any] = {
        "inputs": [{"name": "x", "dtype": "float32", "shape": shapes[0]}],
        "outputs": [
            {"name": f"y{i}", "dtype": "float32", "shape": s} for i, s in enumerate(shapes[1:])
        ],
    }
    if declared is not None:
        info["batchable"] = declared
    return info


def test_only_the_publishers_declaration_makes_a_model_batchable() -> None:
    # the signature alone never does: y = x - mean(x) is ["N", 8] -> ["N", 8]
    assert not batching.batchable(_sig(["N", 8], ["N", 8], declared=None))
    assert not batching.batchable(_sig(["N", 8], ["N", 8], declared=False))
    assert batching.batchable(_sig(["N", 8], ["N", 5]))
    assert batching.batchable(_sig([None, 4], [None, 1]))  # skl2onnx leaves dim 0 unnamed
    assert not batching.batchable(_sig([], ["N"]))  # a scalar input: no dim 0
    seq = _sig(["N", 4], ["N"])
    seq["outputs"].append({"name": "p", "dtype": "sequence<map<int64,float32>>", "shape": None})
    assert not batching.batchable(seq)  # rows of a sequence cannot be split back
    assert batching.decide(_sig(["N", 8], ["N", 5]), max_batch=1) == (False, "--max-batch 1")
    on, why = batching.decide(_sig(["N", 8], ["N", 5], declared=None), max_batch=32)
    assert not on and "not declared batchable" in why
    on, why = batching.decide(_sig(["N", 8], ["N", 5]), max_batch=32)
    assert on and "declared batchable" in why


def test_rows_join_and_split_back_exactly() -> None:
    a = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    b = {"x": np.arange(3, dtype=np.float32).reshape(1, 3) + 100}
    assert batching.rows_of(a) == 2 and batching.rows_of(b) == 1
    assert batching.compat_key(a, None) == batching.compat_key(b, None)
    assert batching.compat_key(a, None) != batching.compat_key(a, ["y"])
    assert batching.compat_key(a, None) != batching.compat_key(
        {"x": a["x"].astype(np.float64)}, None
    )
    joined = batching.join([a, b])
    assert joined["x"].shape == (3, 3)
    parts = batching.split({"y": joined["x"] * 2}, [2, 1])
    assert parts is not None
    np.testing.assert_array_equal(parts[0]["y"], a["x"] * 2)
    np.testing.assert_array_equal(parts[1]["y"], b["x"] * 2)
    # an output that did not keep the rows apart: no split, the calls run alone
    assert batching.split({"y": np.zeros((1, 3), np.float32)}, [2, 1]) is None
    assert batching.rows_of({"x": np.zeros((2, 3)), "z": np.zeros((3, 3))}) is None


def test_backoff_doubles_and_resets() -> None:
    b = Backoff(first=0.5, cap=4.0, reset_after=60.0)
    assert [b.next_delay(1.0) for _ in range(6)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert b.next_delay(61.0) == 0.0  # served a minute: a fresh start


class FakeKeyServer:
    """The key server's call_decisions rules in miniature: grants reserve
    from a quota by their id, reports count once by theirs."""

    def __init__(self, quota: int | None = None) -> None:
        self.revoked = False
        self.budget: int | None = None
        self.rate: float | None = None
        self.down = False
        self.lose_answer = False  # process the request, then fail as if the answer were lost
        self.reports: list[dict[str, Any]] = []
        self.asks = 0
        self.quota = quota
        self.used = 0
        self.reserved = 0
        self.grants: dict[str, int | None] = {}  # grant id -> reserve (None: given back)
        self.seen: set[str] = set()

    def __call__(self, model: str | None, keys: list[str], usage: list[dict[str, Any]],
                 grants: dict[str, str]) -> Any:  # fmt: skip
        self.asks += 1
        if self.down:
            raise KeyServerUnavailableError("down")
        for rep in usage:
            if rep["id"] in self.seen:
                continue
            self.seen.add(rep["id"])
            self.reports.append(rep)
            self.used += rep["used"]
            gid = rep.get("grant_id")
            if gid is not None:
                self.reserved -= self.grants.get(gid) or 0
                self.grants[gid] = None
        out = {}
        for k in keys:
            if self.revoked:
                out[k] = {"ok": False, "error": LicenceRevokedError("revoked").to_wire()}
                continue
            budget = self.budget
            if self.quota is not None:
                budget = min(budget or self.quota, self.quota - self.used - self.reserved)
            if grants.get(k) in self.grants:  # a late copy: never a second reserve
                continue
            self.grants[grants[k]] = budget or 0
            self.reserved += budget or 0
            out[k] = {"ok": True, "licence_id": "lic-a", "budget": budget,
                      "rate": self.rate, "expires_at": None}  # fmt: skip
        if self.lose_answer:
            self.lose_answer = False
            raise KeyServerUnavailableError("answer lost")
        return {"ttl": 10.0, "decisions": out}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _policy(ks: FakeKeyServer, clock: Clock) -> tuple[CallLicencePolicy, threading.Event]:
    decided = threading.Event()
    p = CallLicencePolicy(ks, clock=clock, wall=clock, refresh_every=3600)  # refresher idle
    p.bind(lambda key, model: decided.set())
    return p, decided


def _admit(p: CallLicencePolicy, decided: threading.Event) -> Any:
    """Admit, waiting once for a decision being fetched (as the service does)."""
    try:
        return p.admit("K" * 40, "m")
    except AdmissionPending:
        assert decided.wait(5)
        decided.clear()
        return p.admit("K" * 40, "m")


def test_a_decision_is_never_used_past_one_lease() -> None:
    ks, clock = FakeKeyServer(), Clock()
    p, decided = _policy(ks, clock)
    try:
        assert _admit(p, decided).licence == "lic-a"
        ks.revoked = True
        clock.t += 9.9  # still within the lease: the cached grant holds
        assert p.admit("K" * 40, "m").licence == "lic-a"
        clock.t += 0.2  # past it: a new decision is fetched, and it refuses
        with pytest.raises(LicenceRevokedError):
            _admit(p, decided)
    finally:
        p.close()


def test_budget_is_reserved_per_lease_and_usage_reported() -> None:
    ks, clock = FakeKeyServer(), Clock()
    ks.budget = 2
    p, decided = _policy(ks, clock)
    try:
        a1 = _admit(p, decided)
        a2 = p.admit("K" * 40, "m")
        p.record(a1, ok=True)
        p.record(a2, ok=False)  # a failed call is not billed: its slot is free again
        a3 = p.admit("K" * 40, "m")
        p.record(a3, ok=True)
        with pytest.raises(AdmissionPending):  # the budget of 2 is spent: ask again
            p.admit("K" * 40, "m")
        assert decided.wait(5)
        [rep] = ks.reports  # the first grant given back by its id, with what it served
        assert (rep["licence_id"], rep["used"], rep["reserved"]) == ("lic-a", 2, 2)
        assert rep["grant_id"] in ks.grants and ks.grants[rep["grant_id"]] is None
    finally:
        p.close()


def test_a_failed_renewal_loses_no_call_and_counts_none_twice() -> None:
    # issue 17, item 7: a licence of 20 calls, 7 served across a failed
    # renewal: the key server ends with 7 used and nothing reserved
    ks, clock = FakeKeyServer(quota=20), Clock()
    p, decided = _policy(ks, clock)
    try:
        for _ in range(4):
            p.record(_admit(p, decided), ok=True)
        assert ks.reserved == 20
        ks.down = True
        clock.t += 10.1  # past the lease: the renewal fails, the decision is a refusal
        with pytest.raises(KeyServerUnavailableError):
            _admit(p, decided)
        ks.down = False
        clock.t += 1.1  # the short refusal ends: the next call asks again
        for _ in range(3):
            p.record(_admit(p, decided), ok=True)
        # a renewal whose answer is lost after the key server counted it
        ks.lose_answer = True
        clock.t += 10.1
        with pytest.raises(KeyServerUnavailableError):
            _admit(p, decided)
        assert ks.used == 7
    finally:
        p.close()  # the same reports again (counted once), every reserve given back
    assert ks.used == 7 and ks.reserved == 0
    assert p.pending_reports() == 0
    assert all(v is None for v in ks.grants.values())


def test_rate_is_enforced_per_call() -> None:
    ks, clock = FakeKeyServer(), Clock()
    ks.rate = 2.0
    p, decided = _policy(ks, clock)
    try:
        _admit(p, decided)
        p.admit("K" * 40, "m")  # a burst of 2
        with pytest.raises(RateLimitedError):
            p.admit("K" * 40, "m")
        clock.t += 0.5  # one token back
        p.admit("K" * 40, "m")
    finally:
        p.close()


def test_a_key_server_away_fails_closed() -> None:
    ks, clock = FakeKeyServer(), Clock()
    ks.down = True
    p, decided = _policy(ks, clock)
    try:
        with pytest.raises(KeyServerUnavailableError):
            _admit(p, decided)
        assert p.callback("vault", b"K" * 40) is False  # nobody new gets in either
    finally:
        p.close()


def test_usage_is_reported_at_close() -> None:
    ks, clock = FakeKeyServer(), Clock()
    ks.budget = 10
    p, decided = _policy(ks, clock)
    a = _admit(p, decided)
    p.record(a, ok=True)
    p.close()
    [rep] = ks.reports
    assert (rep["licence_id"], rep["used"], rep["reserved"]) == ("lic-a", 1, 10)
    assert ks.reserved == 0


def test_usage_is_reported_after_a_revocation_too() -> None:
    ks, clock = FakeKeyServer(), Clock()
    ks.budget = 5
    p, decided = _policy(ks, clock)
    try:
        for _ in range(2):
            p.record(_admit(p, decided), ok=True)
        ks.revoked = True
        clock.t += 10.1
        with pytest.raises(LicenceRevokedError):
            _admit(p, decided)
        # the refusing request itself carried the 2 calls and gave the reserve back
        assert ks.used == 2 and ks.reserved == 0
    finally:
        p.close()
