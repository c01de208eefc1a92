"""The service's pure parts: which models batch and how rows split back; the
call-licence cache with a fake key server and clocks (no waiting)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np
import pytest

from tests.waiting import wait_for
from vault.core.errors import (
    KeyServerUnavailableError,
    LicenceExpiredError,
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


@pytest.mark.parametrize(("each_try_s", "tries"), [(10.0, 1), (0.1, 3)])
def test_a_stopping_service_tries_its_last_report_within_a_budget(
    each_try_s: float, tries: int
) -> None:
    """A key server gone when the service stops: the last report is tried
    again only while that fits the close's budget (one slow timeout: one
    try; quick refusals: all three), and what is left is said, not lost
    silently."""
    ks, clock = FakeKeyServer(), Clock()
    p, decided = _policy(ks, clock)
    p.record(_admit(p, decided), ok=True)
    ks.down = True
    asked = ks.asks

    def slow(*args: Any) -> Any:
        clock.t += each_try_s  # what the request's timeout costs
        return ks(*args)

    p._ask = slow  # noqa: SLF001 - the transport, as the key server's failure shows it
    p.close()
    assert ks.asks - asked == tries
    assert p.pending_reports() > 0  # the call and the reserve, still owed
    # control: a key server that answers takes the report at the first try
    ks2, clock2 = FakeKeyServer(), Clock()
    p2, decided2 = _policy(ks2, clock2)
    p2.record(_admit(p2, decided2), ok=True)
    asked = ks2.asks
    p2.close()
    assert ks2.asks - asked == 1 and p2.pending_reports() == 0 and ks2.used == 1


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


def test_a_refused_handshake_says_why_to_the_service() -> None:
    """``refusal_from`` (the ZAP handler's question) gives the key server's
    code for a refused key (for the service's log and metric: the caller
    hears "refused" only), ``keyserver_unavailable`` when it cannot be asked
    (answered 500: the caller hears that), ``probe_budget`` past the
    address's budget; None admits."""
    from worker.service.calls import KEYSERVER_UNAVAILABLE, PROBE_BUDGET_SPENT, PROBE_BURST

    class Probes:
        down = False

        def __call__(self, model: Any, keys: list[str], usage: Any, grants: Any) -> Any:
            if self.down:
                raise KeyServerUnavailableError("down")
            errors = {"R": LicenceRevokedError("revoked"), "E": LicenceExpiredError("expired")}
            return {"ttl": 10.0, "decisions": {
                k: {"ok": True, "licence_id": "lic-a"} if k[0] == "L"
                else {"ok": False, "error": errors[k[0]].to_wire()} for k in keys}}  # fmt: skip

    ks, clock = Probes(), Clock()
    p = CallLicencePolicy(ks, clock=clock, wall=clock, refresh_every=3600)
    try:
        assert p.refusal_from("10.0.0.1", b"L" * 40) is None
        assert p.refusal_from("10.0.0.1", b"R" * 40) == "licence_revoked"
        assert p.refusal_from("10.0.0.1", b"E" * 40) == "licence_expired"
        assert p.refusal_from("10.0.0.1", b"E" * 40) == "licence_expired"  # from the cache
        ks.down = True
        assert p.refusal_from("10.0.0.2", b"X" * 40) == KEYSERVER_UNAVAILABLE
        for _ in range(PROBE_BURST):
            p.refusal_from("10.0.0.3", os.urandom(20).hex().encode())
        assert p.refusal_from("10.0.0.3", b"Y" * 40) == PROBE_BUDGET_SPENT
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


# --- bearer tokens and first decisions (review findings) ---------------------------------


def _token_licence(model: str | None = None) -> Any:
    import base64

    from vault.core.crypto import PublisherKey
    from vault.core.licence import Licence

    proof = PublisherKey.generate()
    return Licence(licence_id="lic-a", holder="shop", keyserver_address="tcp://127.0.0.1:1",
                   keyserver_public_key="k" * 40, client_public_key="T" * 40,
                   client_secret_key="s" * 40, model_id=model, kind="call",
                   proof_key=base64.b64encode(proof.export_private_raw()).decode())  # fmt: skip


class TokenKeyServer(FakeKeyServer):
    """The fake key server, answering with the licence's proof key as the
    real one does (so the service can verify the licence's tokens)."""

    def __init__(self, proof_public_key: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.proof_public_key = proof_public_key

    def __call__(self, model: str | None, keys: list[str], usage: list[dict[str, Any]],
                 grants: dict[str, str]) -> Any:  # fmt: skip
        out = super().__call__(model, keys, usage, grants)
        for d in out["decisions"].values():
            d["proof_key"] = self.proof_public_key
        return out


def _rewritten(text: str, **changes: Any) -> str:
    """The token's payload changed, its signature kept as it was."""
    import base64
    import json

    prefix, payload, sig = text.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    for k, v in changes.items():
        if v is None:
            body.pop(k, None)
        else:
            body[k] = v
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return f"{prefix}.{base64.urlsafe_b64encode(raw).decode().rstrip('=')}.{sig}"


def test_a_token_verified_once_cannot_be_rewritten_under_its_signature() -> None:
    # An end user holds a 1-call, 1-minute token for model m. Once the service
    # has verified its signature, a payload rewritten under that same signature
    # (no budget, a day's life, other models) must fail as any forgery does.
    from vault.core.errors import TokenError, TokenSpentError
    from vault.core.token import mint_token, parse_token

    lic = _token_licence()
    ks, clock = TokenKeyServer(lic.proof_public_key), Clock()
    p, decided = _policy(ks, clock)
    try:
        text = mint_token(lic, models=["m"], expires=60, max_calls=1, now=clock.t)
        tok = parse_token(text)
        try:
            p.admit(None, "m", tok)
        except AdmissionPending:
            assert decided.wait(5)
        p.record(p.admit(None, "m", tok), ok=True)
        # the control: the genuine token's budget holds
        with pytest.raises(TokenSpentError):
            p.admit(None, "m", tok)
        unlimited = _rewritten(text, max_calls=None, jti="fresh-id")
        with pytest.raises(TokenError):
            p.admit(None, "m", parse_token(unlimited))
        clock.t += 3600  # the genuine token has long expired
        decided.clear()
        revived = _rewritten(text, iat=clock.t, exp=clock.t + 86400, models=["m", "n"])
        for model in ("m", "n"):
            try:
                p.admit(None, model, parse_token(revived))
            except AdmissionPending:
                assert decided.wait(5)
                decided.clear()
            with pytest.raises(TokenError):
                p.admit(None, model, parse_token(revived))
    finally:
        p.close()


class SlowKeyServer(FakeKeyServer):
    """Answers only when released, so several calls arrive before a decision."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def __call__(self, model: str | None, keys: list[str], usage: list[dict[str, Any]],
                 grants: dict[str, str]) -> Any:  # fmt: skip
        self.entered.release()
        assert self.gate.wait(10)
        return super().__call__(model, keys, usage, grants)


def test_calls_that_arrive_before_the_first_decision_ask_for_it_once() -> None:
    # A licence of 20 calls. Eight calls of one caller arrive before the key
    # server has answered the first: one grant must be asked for, not eight
    # (each reserving from the quota, all but one never given back: the
    # licence would read exhausted with nothing served).
    ks, clock = SlowKeyServer(quota=20), Clock()
    p, decided = _policy(ks, clock)
    try:
        for _ in range(8):
            with pytest.raises(AdmissionPending):
                p.admit("K" * 40, "m")
        assert ks.entered.acquire(timeout=5)  # the first request is at the key server
        ks.gate.set()
        assert decided.wait(5)
        for _ in range(5):
            p.record(p.admit("K" * 40, "m"), ok=True)
    finally:
        p.close()
    assert ks.asks == 2  # the decision, and the close's report
    assert len(ks.grants) == 1
    assert ks.used == 5 and ks.reserved == 0  # every reserve given back, nothing lost


def test_strangers_cannot_make_the_service_ask_without_bound() -> None:
    # every new caller key costs a key-server request: a flood of made-up keys
    # (a token names any key it likes) is refused past a bound, with a typed
    # error, instead of one thread and one request each
    from vault.core.errors import ServiceUnavailableError
    from worker.service import calls

    ks, clock = SlowKeyServer(), Clock()
    p, _ = _policy(ks, clock)
    try:
        refused = 0
        for i in range(calls.MAX_PENDING_DECISIONS + 50):
            try:
                p.admit(f"{i:040d}", "m")
            except AdmissionPending:
                pass
            except ServiceUnavailableError:
                refused += 1
        assert refused == 50
        ks.gate.set()
    finally:
        p.close()


def test_one_licences_tokens_never_spend_another_licences_token_budget() -> None:
    # A token's budget is counted by its id, which the minter chooses: a call
    # licence holder minting with the id of another holder's token (seen in an
    # error message, a log line) must not spend that token's calls.
    import base64
    import json

    from vault.core.crypto import PublisherKey
    from vault.core.errors import TokenSpentError
    from vault.core.licence import Licence
    from vault.core.token import mint_token, parse_token

    def licence(lid: str, key: str) -> Licence:
        proof = PublisherKey.generate()
        return Licence(licence_id=lid, holder=lid, keyserver_address="tcp://127.0.0.1:1",
                       keyserver_public_key="k" * 40, client_public_key=key,
                       client_secret_key="s" * 40, kind="call",
                       proof_key=base64.b64encode(proof.export_private_raw()).decode())  # fmt: skip

    a, b = licence("lic-a", "A" * 40), licence("lic-b", "B" * 40)
    by_key = {lic.client_public_key: lic for lic in (a, b)}

    def ask(model: str | None, keys: list[str], usage: list[dict[str, Any]],
            grants: dict[str, str]) -> Any:  # fmt: skip
        return {"ttl": 10.0, "decisions": {
            k: {"ok": True, "licence_id": by_key[k].licence_id, "budget": None, "rate": None,
                "expires_at": None, "proof_key": by_key[k].proof_public_key} for k in keys}}  # fmt: skip

    clock = Clock()
    p = CallLicencePolicy(ask, clock=clock, wall=clock, refresh_every=3600)
    decided = threading.Event()
    p.bind(lambda key, model: decided.set())

    def with_id(lic: Licence, jti: str) -> str:  # minted by lic's holder, with a chosen id
        text = mint_token(lic, models=["m"], max_calls=1, now=clock.t)
        prefix, payload, _ = text.split(".")
        body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        body["jti"] = jti
        raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        key = PublisherKey.from_private_raw(base64.b64decode(lic.proof_key or ""))
        enc = base64.urlsafe_b64encode
        sig = enc(key.sign(b"vault-token/1\x00", raw)).decode().rstrip("=")
        return f"{prefix}.{enc(raw).decode().rstrip('=')}.{sig}"

    def admit(text: str) -> Any:
        tok = parse_token(text)
        try:
            return p.admit(None, "m", tok)
        except AdmissionPending:
            assert decided.wait(5)
            decided.clear()
            return p.admit(None, "m", tok)

    try:
        victim = with_id(b, "same-id")
        p.record(admit(with_id(a, "same-id")), ok=True)  # the other holder's call
        p.record(admit(victim), ok=True)  # the victim's one call is still there
        with pytest.raises(TokenSpentError):  # the control: and then it is spent
            admit(victim)
    finally:
        p.close()


class ProbeKeyServer(TokenKeyServer):
    """Answers probes (no model: "is this a live call licence") as the real
    key server does: the licence and its proof key for the one licence it
    knows, nothing for a key it does not; reserves nothing."""

    def __init__(self, proof_public_key: str, known: str, **kw: Any) -> None:
        super().__init__(proof_public_key, **kw)
        self.known = known
        self.probes = 0
        self.hold: threading.Event | None = None  # set: probes wait for it

    def __call__(self, model: str | None, keys: list[str], usage: list[dict[str, Any]],
                 grants: dict[str, str]) -> Any:  # fmt: skip
        if model is not None:
            return super().__call__(model, keys, usage, grants)
        if self.hold is not None:
            self.hold.wait(5)
        self.probes += 1
        if self.down:
            raise KeyServerUnavailableError("down")
        return {"ttl": 10.0, "decisions": {
            k: {"ok": not self.revoked, "licence_id": "lic-a", "holder": "shop",
                "proof_key": self.proof_public_key, "expires_at": None,
                **({"error": LicenceRevokedError("revoked").to_wire()} if self.revoked else {})}
            for k in keys if k == self.known}}  # fmt: skip


def test_a_door_vets_a_token_before_the_request_is_read_and_reserves_nothing() -> None:
    """CallPolicy.vet, what a door asks before it reads a body: a stranger's
    token (a made-up licence; the real licence's key signed by the stranger)
    is refused once the probe is in, the holder's passes, nothing is reserved
    or counted, and a revoked licence is refused before its body is read."""
    from vault.core.errors import TokenError
    from vault.core.token import mint_token, parse_token
    from worker.service.calls import VET

    lic = _token_licence()
    ks, clock = ProbeKeyServer(lic.proof_public_key, lic.client_public_key), Clock()
    p = CallLicencePolicy(ks, clock=clock, wall=clock, refresh_every=3600)
    told: list[tuple[str, str]] = []
    decided = threading.Event()

    def notify(key: str, model: str) -> None:
        told.append((key, model))
        decided.set()

    p.bind(notify)

    def vet(token: Any, model: str | None = "m") -> None:
        try:
            p.vet(token, model)
        except AdmissionPending:  # the probe is fetched: the door waits for it, once
            assert decided.wait(5)
            decided.clear()
            p.vet(token, model)

    try:
        from vault.core.licence import Licence

        genuine = parse_token(mint_token(lic, models=["m"], now=clock.t))
        stranger = _token_licence()  # the real licence's id and key, the stranger's proof key
        forged = parse_token(mint_token(stranger, models=["m"], now=clock.t))
        nobodys = Licence.from_json({**stranger.to_json(), "licence_id": "lic-nobody",
                                     "client": {"public_key": "U" * 40, "secret_key": "s" * 40}})  # fmt: skip
        made_up = parse_token(mint_token(nobodys, models=["m"], now=clock.t))
        for token in (forged, made_up):
            with pytest.raises(TokenError):
                vet(token)
        assert told == [(lic.client_public_key, VET), ("U" * 40, VET)]
        vet(genuine)  # the control: the holder's token passes (the probe is reused)
        vet(genuine, None)  # a door that does not know the model yet (gRPC)
        assert ks.probes == 2 and ks.reserved == 0 and not ks.reports
        assert p.usage() == {} and p.pending_reports() == 0
        # a licence revoked: refused at the vetting, once the probe is stale
        ks.revoked = True
        clock.t += 5.1
        with pytest.raises(LicenceRevokedError):
            vet(genuine)
        # the key server away: refused typed, fail closed
        ks.revoked, ks.down = False, True
        clock.t += 5.1
        with pytest.raises(KeyServerUnavailableError):
            vet(genuine)
    finally:
        p.close()


def test_a_door_vets_in_its_own_thread_only_from_what_is_fresh() -> None:
    """CallPolicy.vet(fetch=False), what a door asks in its own thread before
    it posts a vetting into the service's loop: it answers from the same
    cached probe or decision within the same age (the holder passes, a forged
    token is refused), never from a stale one (a revoked licence is refused
    within one lease, as through the loop), and fetches and caches nothing
    for a token whose answer is not at hand: a hundred strangers' made-up
    licences cost no probe and grow nothing (the control: the loop's vetting,
    fetch=True, fetches a probe for the same token)."""
    from vault.core.errors import TokenError
    from vault.core.licence import Licence
    from vault.core.token import mint_token, parse_token

    lic = _token_licence()
    ks, clock = ProbeKeyServer(lic.proof_public_key, lic.client_public_key), Clock()
    p = CallLicencePolicy(ks, clock=clock, wall=clock, refresh_every=3600)
    decided = threading.Event()
    p.bind(lambda key, model: decided.set())

    def fetched() -> None:  # the loop's vetting: fetches the probe, answered after
        with pytest.raises(AdmissionPending):
            p.vet(genuine, "m")
        assert decided.wait(5)
        decided.clear()

    try:
        genuine = parse_token(mint_token(lic, models=["m"], now=clock.t))
        for model in ("m", None):  # nothing known yet: no answer here, nothing fetched
            with pytest.raises(AdmissionPending):
                p.vet(genuine, model, fetch=False)
        assert ks.probes == 0
        fetched()
        assert ks.probes == 1
        p.vet(genuine, "m", fetch=False)  # decided in the door's thread now
        p.vet(genuine, None, fetch=False)  # gRPC: the model not known yet
        forged = parse_token(mint_token(_token_licence(), models=["m"], now=clock.t))
        with pytest.raises(TokenError):  # the real licence's key signed by a stranger
            p.vet(forged, "m", fetch=False)
        stranger = _token_licence()
        verified, probes = len(p._verified), len(p._probes)
        for i in range(100):
            made_up = Licence.from_json({**stranger.to_json(), "licence_id": f"lic-{i}",
                                         "client": {"public_key": f"U{i:039d}",
                                                    "secret_key": "s" * 40}})  # fmt: skip
            with pytest.raises(AdmissionPending):
                p.vet(parse_token(mint_token(made_up, models=["m"], now=clock.t)), "m",
                      fetch=False)  # fmt: skip
        assert ks.probes == 1 and (len(p._verified), len(p._probes)) == (verified, probes)
        assert ks.reserved == 0 and p.usage() == {} and p.pending_reports() == 0
        # revoked at the key server: the probe in hand is used for its age (as
        # the loop uses it), then never again; the next one refuses, here too
        ks.revoked = True
        p.vet(genuine, "m", fetch=False)
        clock.t += 5.1
        with pytest.raises(AdmissionPending):
            p.vet(genuine, "m", fetch=False)
        assert ks.probes == 1
        fetched()
        with pytest.raises(LicenceRevokedError):
            p.vet(genuine, "m", fetch=False)
    finally:
        p.close()


def test_a_doors_vetting_of_made_up_licences_costs_a_bounded_number_of_probes() -> None:
    """A stranger's tokens naming a new made-up licence each cost the key
    server a request at a door's vetting (770 a second from one address).
    As at the ZeroMQ handshake, a key with no answer at hand draws on its
    address's budget (PROBE_BURST, then PROBE_RATE a second), past it is
    refused unasked (rate_limited); another address and a key the key
    server called live lately are not held back. The control: the same
    flood vetted without an address asks about every key."""
    from vault.core.errors import RateLimitedError
    from vault.core.licence import Licence
    from vault.core.token import mint_token, parse_token
    from worker.service.calls import PROBE_BURST

    lic = _token_licence()
    ks, clock = ProbeKeyServer(lic.proof_public_key, lic.client_public_key), Clock()
    p = CallLicencePolicy(ks, clock=clock, wall=clock, refresh_every=3600)
    decided = threading.Event()
    p.bind(lambda key, model: decided.set())
    stranger = _token_licence()

    def made_up(i: int) -> Any:
        return parse_token(mint_token(Licence.from_json({
            **stranger.to_json(), "licence_id": f"lic-{i}",
            "client": {"public_key": f"U{i:039d}", "secret_key": "s" * 40}}),
            models=["m"], now=clock.t))  # fmt: skip

    def flood(first: int, address: str | None) -> tuple[int, int]:
        pending = refused = 0
        for i in range(first, first + 100):
            try:
                p.vet(made_up(i), "m", address=address)
            except AdmissionPending:
                pending += 1
            except RateLimitedError:
                refused += 1
        return pending, refused

    def probes_done(n: int) -> None:
        deadline = time.monotonic() + 10
        while ks.probes < n or p._fetching:
            assert time.monotonic() < deadline, (ks.probes, n)
            time.sleep(0.01)

    genuine = parse_token(mint_token(lic, models=["m"], now=clock.t))
    try:
        # one licence new to the service, 40 requests at once from one
        # address: one probe, one token of the budget, nobody refused
        ks.hold = threading.Event()
        for _ in range(40):
            with pytest.raises(AdmissionPending):
                p.vet(genuine, "m", address="192.0.2.1")
        ks.hold.set()
        probes_done(1)
        assert p._probe_budgets[p._budget_key("192.0.2.1")].tokens == PROBE_BURST - 1
        p._probes.clear()  # forgotten: the flood below starts from nothing known
        p._known_good.clear()
        ks.probes = 0
        assert flood(0, "203.0.113.7") == (PROBE_BURST, 100 - PROBE_BURST)
        probes_done(PROBE_BURST)
        with pytest.raises(AdmissionPending):  # another address: asked about
            p.vet(made_up(500), "m", address="198.51.100.1")
        probes_done(PROBE_BURST + 1)
        # the holder's licence, new to the service, from the flooded address:
        # refused until the budget refills, like a stranger's...
        with pytest.raises(RateLimitedError):
            p.vet(genuine, "m", address="203.0.113.7")
        decided.clear()
        with pytest.raises(AdmissionPending):  # ... asked about from elsewhere: live
            p.vet(genuine, "m", address="198.51.100.1")
        assert decided.wait(5)
        probes_done(PROBE_BURST + 2)
        clock.t += 5.1  # the probe is stale: asked again, on no budget (known live)
        assert flood(1000, "203.0.113.7")[0] > 0  # the refilled budget, spent again
        with pytest.raises(AdmissionPending):
            p.vet(genuine, "m", address="203.0.113.7")
        # the control: without the address every made-up key is asked about
        probes = ks.probes
        assert flood(2000, None) == (100, 0)
        probes_done(probes + 100)
    finally:
        p.close()


def test_a_refusal_for_one_model_is_not_the_licences_answer_for_the_others() -> None:
    """Two holders of one licence's tokens: mallory's for m names model
    "types", which the licence does not cover; the service fetches that
    refusal. Before, it became the licence's latest decision, by which the
    gRPC door vets tokens before it knows the model: alice's other end
    users were refused (wrong_model) on every gRPC call, and since renewals
    counted as uses, for good. Now the refusal stays with its model: a
    token is still vetted by the licence's own standing."""
    from vault.core.errors import QuotaExhaustedError, WrongModelError
    from vault.core.token import mint_token, parse_token

    class Scoped(ProbeKeyServer):  # the licence covers m only; its quota is held by grants
        def __call__(self, model: Any, keys: list[str], usage: Any, grants: Any) -> Any:
            if model in ("types", "full"):
                err = (WrongModelError("licence lic-a is not for model 'types'") if model == "types"
                       else QuotaExhaustedError("no call left to grant: held by open grants")
                       ).to_wire()  # fmt: skip
                no = {"ok": False, "error": err, "licence_id": "lic-a",
                      "proof_key": self.proof_public_key}  # as the key server refuses  # fmt: skip
                return {"ttl": 10.0, "decisions": {k: no for k in keys}}
            return super().__call__(model, keys, usage, grants)

    lic = _token_licence()
    ks, clock = Scoped(lic.proof_public_key, lic.client_public_key), Clock()
    p = CallLicencePolicy(ks, clock=clock, wall=clock, refresh_every=3600)
    decided = threading.Event()
    p.bind(lambda key, model: decided.set())

    def waited(fn: Any) -> Any:
        try:
            return fn()
        except AdmissionPending:
            assert decided.wait(5)
            decided.clear()
            return fn()

    try:
        alice = parse_token(mint_token(lic, models=["m"], now=clock.t))
        mallory = parse_token(mint_token(lic, models=["m"], now=clock.t))
        p.record(waited(lambda: p.admit(None, "m", token=alice)), ok=True)
        p.vet(alice, None, fetch=False)  # gRPC's vetting: passes
        with pytest.raises(WrongModelError):
            waited(lambda: p.admit(None, "types", token=mallory))
        assert p._decisions[(lic.client_public_key, "types")].ok is False  # fetched
        p.vet(alice, None, fetch=False)  # still passes: the refusal was for "types"
        p.vet(mallory, None, fetch=False)  # and mallory's token for m too
        # the key server's quota_exhausted while the quota is held by open
        # grants (this service's own among them) is about that model's grant
        every = parse_token(mint_token(lic, models=["full"], now=clock.t))
        with pytest.raises(QuotaExhaustedError):
            waited(lambda: p.admit(None, "full", token=every))
        p.vet(alice, None, fetch=False)
        with pytest.raises(WrongModelError):  # where the model is known, it refuses
            p.vet(mallory, "types", fetch=False)
    finally:
        p.close()


def test_a_decision_nobody_calls_on_goes_idle_and_its_reserve_back_though_renewed() -> None:
    """A decision is renewed from half its lease while it is used and given
    back once nobody has called on it for a lease. A renewal used to count
    as a use: one call kept its decision (and a reserve of the licence's
    quota) renewed, a key-server request every half lease, for good."""
    ks, clock = FakeKeyServer(quota=100), Clock()
    ks.budget = 5
    p = CallLicencePolicy(ks, clock=clock, wall=clock, refresh_every=3600)  # its thread idle
    decided = threading.Event()
    p.bind(lambda key, model: decided.set())
    settle = p.refresh  # one pass of the refresher at this clock, run here

    try:
        p.record(_admit(p, decided), ok=True)  # one call at t0, then none
        assert ks.reserved == 5
        clock.t += 6.0  # past half the lease: renewed (it was used within the lease)
        settle()
        renewed = ks.asks
        assert renewed == 2
        clock.t += 5.0  # a lease since the one call: idle, given back
        settle()
        assert ("K" * 40, "m") not in p._decisions
        assert ks.reserved == 0 and ks.used == 1
        asks = ks.asks
        for _ in range(4):  # and nothing more is asked for it
            clock.t += 6.0
            settle()
        assert ks.asks == asks
        # the control: a caller that keeps calling keeps its decision
        decided.clear()  # set by the renewal above
        p.record(_admit(p, decided), ok=True)
        for _ in range(3):
            clock.t += 6.0
            settle()
            decided.clear()
            p.record(_admit(p, decided), ok=True)
        assert ("K" * 40, "m") in p._decisions and p.usage() == {"lic-a": 5}
    finally:
        p.close()


def test_a_strangers_fresh_keys_cost_the_key_server_a_bounded_number_of_requests() -> None:
    """Each CURVE handshake with a key the service has no answer for costs a
    key-server request on the one ZAP thread; a stranger mints a key per
    handshake. Per peer address, past a burst and a rate, unknown keys are
    refused without asking; another address, a known key and the same
    address a while later are not held back (the control: the same flood
    through ZAP without the address, ``callback``, asks for every key)."""
    from worker.service.calls import PROBE_BURST, PROBE_RATE

    class Probes:  # the key server's answer to a probe: licensed keys are L... and M...
        asks = 0

        def __call__(self, model: Any, keys: list[str], usage: Any, grants: Any) -> Any:
            self.asks += 1
            ok = {"ok": True, "licence_id": "lic-a", "expires_at": None}
            no = {"ok": False, "error": LicenceRevokedError("unknown").to_wire()}
            return {"ttl": 10.0, "decisions": {k: ok if k[0] in "LM" else no for k in keys}}

    ks, clock = Probes(), Clock()
    p = CallLicencePolicy(ks, clock=clock, wall=clock, refresh_every=3600)
    try:
        keys = [os.urandom(20).hex().encode() for _ in range(300)]
        assert not any(p.admit_from("10.0.0.9", k) for k in keys)
        assert ks.asks == PROBE_BURST and p.probes_refused == 300 - PROBE_BURST
        # a licensed caller's key, from elsewhere: asked, admitted
        assert p.admit_from("10.0.0.7", b"L" * 40) is True and ks.asks == PROBE_BURST + 1
        assert p.admit_from("10.0.0.9", b"L" * 40) is True  # a fresh answer: no token spent
        assert ks.asks == PROBE_BURST + 1
        assert p.admit_from("10.0.0.9", b"M" * 40) is False  # the flooder's address: spent
        clock.t += 1.0  # PROBE_RATE tokens back a second
        assert p.admit_from("10.0.0.9", b"M" * 40) is True
        assert ks.asks == PROBE_BURST + 2
        # a licensed caller behind the flooder's address (a NAT), back after its
        # answer went stale while the flood goes on: asked again, on no budget
        clock.t += 10.0
        for _ in range(3):
            for k in [os.urandom(20).hex().encode() for _ in range(40)]:
                p.admit_from("10.0.0.9", k)
            assert p.admit_from("10.0.0.9", b"L" * 40) is True
            clock.t += 6.0
        assert p.admit_from("10.0.0.9", b"N" * 40) is False  # a new key there still waits
        before = ks.asks
        # one budget for all of loopback, and for an IPv6 /64: addresses a
        # stranger on one host can take as many of as it likes
        for a, b in (("127.0.0.1", "127.8.9.10"), ("2001:db8::1", "2001:db8::ffff:1"),
                     ("::1", "127.0.0.2"), ("::ffff:10.0.0.9", "10.0.0.9")):  # fmt: skip
            assert p._budget_key(a) == p._budget_key(b), (a, b)
        assert p._budget_key("10.0.0.9") != p._budget_key("10.0.0.10")
        assert p._budget_key("2001:db8::1") != p._budget_key("2001:db8:0:1::1")
        for _ in range(100):  # the control: no address, no budget
            p.callback("vault", os.urandom(20).hex().encode())
        assert ks.asks == before + 100
        assert PROBE_RATE >= 1
    finally:
        p.close()


def test_a_killed_services_instance_directories_are_swept_and_nothing_else(tmp_path: Any) -> None:
    """A service killed with SIGKILL leaves each instance's private directory
    and its dead socket behind; the next service of the same uid removes
    them. Left alone: a socket somebody listens on, a directory too young to
    be sure of, one holding anything else, one not 0700, one of another name."""
    import socket
    import time
    from pathlib import Path

    from worker.service.instances import sweep_stale_dirs

    base = Path(tmp_path)
    old = time.time() - 3600

    def instance(name: str, *, listen: bool = False, extra: bool = False, mode: int = 0o700,
                 age: float = old) -> tuple[Path, socket.socket]:  # fmt: skip
        d = base / name
        d.mkdir()
        d.chmod(mode)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(d / "w.sock"))
        if listen:
            s.listen(1)
        if extra:
            (d / "other").write_text("x")
        os.utime(d, (age, age))
        return d, s

    dead, s1 = instance("vault-svc-dead")
    s1.close()  # its process is gone: the file stays, nobody answers
    live, s2 = instance("vault-svc-live", listen=True)
    young, s3 = instance("vault-svc-young", age=time.time())
    s3.close()
    mixed, s4 = instance("vault-svc-mixed", extra=True)
    s4.close()
    opened, s5 = instance("vault-svc-open", mode=0o755)
    s5.close()
    other, s6 = instance("vault-other")
    s6.close()
    try:
        assert sweep_stale_dirs(str(base)) == 1
        assert not dead.exists()
        assert all(d.exists() for d in (live, young, mixed, opened, other))
    finally:
        s2.close()


def test_what_a_caller_sees_follows_the_models_its_licence_covers() -> None:
    """``sees`` (op ``stats``): the models the key server said the licence
    covers at the handshake; for a key it has not answered about lately it
    is asked again and the caller told to retry; a key server that does not
    say (older than the service) leaves every model visible, as before."""
    from vault.core.errors import PermissionDeniedError, WrongModelError

    scopes = {"A" * 40: "m", "B" * 40: None, "C" * 40: "absent", "D" * 40: "m"}

    def ask(model: str | None, keys: list[str], usage: list[dict[str, Any]],
            grants: dict[str, str]) -> Any:  # fmt: skip
        out = {}
        for k in keys:
            d = {"ok": True, "licence_id": f"lic-{k[0]}", "expires_at": None, "proof_key": None}
            if scopes[k] != "absent":
                d["model_id"] = scopes[k]
            out[k] = d
        return {"ttl": 10.0, "decisions": out}

    clock = Clock()
    p = CallLicencePolicy(ask, clock=clock, wall=clock, refresh_every=3600)
    try:
        for k in list(scopes)[:3]:
            assert p.callback("vault", k.encode())
        p.sees("A" * 40, "m")
        with pytest.raises(WrongModelError):
            p.sees("A" * 40, "other")
        p.sees("B" * 40, "other")  # a licence for every model
        p.sees("C" * 40, "other")  # an older key server: as before
        with pytest.raises(PermissionDeniedError, match="retry"):
            p.sees("D" * 40, "m")  # not asked about yet: asked now

        def seen() -> bool:
            try:
                p.sees("D" * 40, "m")
                return True
            except PermissionDeniedError:
                return False  # the key server's answer is not in yet

        wait_for(seen, "the policy has the key server's answer about D")
        with pytest.raises(WrongModelError):
            p.sees("D" * 40, "other")
    finally:
        p.close()


def test_refused_handshakes_are_logged_within_a_cap_and_all_counted() -> None:
    """A refused handshake is logged once a minute per address and reason,
    and at most 60 a minute in all: a stranger cycling through addresses
    (an IPv6 /64 each) had one line each. The rest are counted by the metric
    and said in one line when the next minute starts."""
    import threading
    import types

    from worker.service.service import WorkerService

    lines: list[tuple[str, dict[str, Any]]] = []
    counted: list[str] = []
    labels = types.SimpleNamespace(inc=lambda: counted.append("x"))
    svc = types.SimpleNamespace(
        metrics=types.SimpleNamespace(handshakes_refused=types.SimpleNamespace(
            labels=lambda why: labels)),
        log=lambda event, **kw: lines.append((event, kw)),
        _refusals_logged={}, _refusal_window=[float("-inf"), 0, 0],
        _refusals_lock=threading.Lock(),
    )  # fmt: skip
    for i in range(200):
        WorkerService._handshake_refused(svc, "licence_unknown", f"2001:db8:{i:x}::1")  # type: ignore[arg-type]
    WorkerService._handshake_refused(svc, "licence_unknown", "2001:db8:0::1")  # type: ignore[arg-type]
    assert len(counted) == 201 and [e for e, _ in lines] == ["caller_refused"] * 60
    svc._refusal_window[0] -= 61  # the next minute
    WorkerService._handshake_refused(svc, "licence_unknown", "2001:db8:ffff::1")  # type: ignore[arg-type]
    assert lines[-2] == ("caller_refused_unlogged", {**lines[-2][1], "count": 140})
    assert lines[-1][0] == "caller_refused"
