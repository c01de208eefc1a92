"""Who may call the service, and under which licence: the call policy.

A policy is asked four things: by the ZAP handler, whether a CURVE client
key may connect at all (:meth:`CallPolicy.callback`); by the Open Inference
Protocol's doors, before a request's body is read, whether its bearer token
is genuine and its licence in force (:meth:`CallPolicy.vet`: nothing
reserved, nothing counted); for each call, which licence it runs under, or
the typed licence error that refuses it (:meth:`CallPolicy.admit`); and,
when it is answered, to count it (:meth:`CallPolicy.record`).

- :class:`OpenPolicy`: every caller, one label ``local``: for an ``ipc://``
  service that only processes of this host reach.
- :class:`AllowListPolicy`: the client keys in a directory (``NAME.key``);
  the file name is the caller's label in metrics and logs.
- :class:`CallLicencePolicy`: each caller's CURVE key maps to its *call
  licence* at the key server, which decides (revoked, expired, quota, wrong
  model) and grants a call budget for one lease, reserved from the quota;
  decisions are cached for at most one lease and renewed from half-way with
  the usage served, so a revocation stops a caller within one lease. The
  rate limit is enforced here per call (a token bucket per licence).

Example::

    policy = AllowListPolicy.from_dir("clients/")
    adm = policy.admit(caller_key, "model-id")   # raises a LicenceError to refuse
    policy.record(adm, ok=True)
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vault.core.errors import (
    ConfigError,
    KeyServerError,
    KeyServerUnavailableError,
    LicenceExpiredError,
    PermissionDeniedError,
    RateLimitedError,
    ServiceUnavailableError,
    TokenError,
    TokenSpentError,
    VaultError,
    WrongModelError,
    from_wire,
)
from vault.core.modelscope import covers
from vault.core.peercap import address_key
from vault.core.token import Token

from ..server import ZAP_KEYSERVER_UNAVAILABLE

__all__ = [
    "Admission",
    "AdmissionPending",
    "AllowListPolicy",
    "CallLicencePolicy",
    "CallPolicy",
    "OpenPolicy",
]


@dataclass(frozen=True)
class Admission:
    """A call let in: the licence (or caller label) it is counted against."""

    licence: str
    caller_key: str | None = None
    decision: Any = field(default=None, compare=False)
    token_id: str | None = None  # the bearer token it came with (the OIP doors)


class AdmissionPending(Exception):
    """No decision for this caller and model yet: one is being fetched; the
    service parks the call and asks again when :meth:`CallPolicy.bind`'s
    callback names the pair."""


class CallPolicy(Protocol):
    def bind(self, notify: Callable[[str, str], None]) -> None: ...

    def callback(self, domain: str, key: bytes) -> bool: ...

    def admit(
        self, caller_key: str | None, model_id: str, token: Token | None = None
    ) -> Admission: ...

    def vet(
        self, token: Token, model_id: str | None, *, fetch: bool = True, address: str | None = None
    ) -> None: ...

    def sees(self, caller_key: str | None, model_id: str) -> None: ...

    def record(self, admission: Admission, *, ok: bool) -> None: ...

    def close(self) -> None: ...

    def pending_reports(self) -> int: ...


class _Usage:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    def bind(self, notify: Callable[[str, str], None]) -> None:
        del notify  # decisions are local: nothing is ever pending

    def sees(self, caller_key: str | None, model_id: str) -> None:
        """Whether this caller may read ``model_id``'s statistics (op
        ``stats``); raises if not. Here every caller the policy lets in may
        call every model: yes."""
        del caller_key, model_id

    def record(self, admission: Admission, *, ok: bool) -> None:
        with self._lock:
            (self.calls if ok else self.failures)[admission.licence] += 1

    def close(self) -> None:
        pass

    def pending_reports(self) -> int:
        """Usage reports owed to a key server: none (decisions are local)."""
        return 0


class OpenPolicy(_Usage):
    """Everyone who can reach the socket (an ``ipc://`` service only)."""

    def callback(self, domain: str, key: bytes) -> bool:
        del domain, key
        return False  # never used on tcp://: a CURVE service needs a real policy

    def admit(self, caller_key: str | None, model_id: str, token: Token | None = None) -> Admission:
        del model_id
        if token is not None:
            raise TokenError("this service takes no bearer tokens (it has no call licences)")
        return Admission("local", caller_key)

    def vet(
        self, token: Token, model_id: str | None, *, fetch: bool = True, address: str | None = None
    ) -> None:
        del token, model_id, fetch
        raise TokenError("this service takes no bearer tokens (it has no call licences)")


class AllowListPolicy(_Usage):
    """Client keys from files; the file's stem names the caller."""

    def __init__(self, keys: dict[str, str]) -> None:
        super().__init__()
        self.by_key = {k: name for name, k in keys.items()}

    @classmethod
    def from_dir(cls, directory: str) -> AllowListPolicy:
        import zmq.auth

        keys: dict[str, str] = {}
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            raise ConfigError(f"{directory}: cannot read the allow-list ({exc.strerror})") from exc
        for name in names:
            if not name.endswith((".key", ".pub")) or name.endswith("_secret"):
                continue
            path = os.path.join(directory, name)
            with open(path, "rb") as fh:
                text = fh.read().strip()
            if len(text) != 40 or b"\n" in text:
                try:
                    public, _secret = zmq.auth.load_certificate(path)
                except (ValueError, OSError):
                    raise ConfigError(
                        f"{path}: neither a Z85 public key nor a zmq certificate"
                    ) from None
                if not public:
                    continue
                text = public
            keys[name.rsplit(".", 1)[0]] = text.decode("ascii")
        return cls(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        del domain  # pyzmq passes the client key Z85-encoded
        return key.decode("ascii", "replace") in self.by_key

    def admit(self, caller_key: str | None, model_id: str, token: Token | None = None) -> Admission:
        del model_id
        if token is not None:
            raise TokenError("this service takes no bearer tokens (it has no call licences)")
        name = self.by_key.get(caller_key or "")
        if name is None:
            raise PermissionDeniedError("this caller is not on the service's allow-list")
        return Admission(name, caller_key)

    def vet(
        self, token: Token, model_id: str | None, *, fetch: bool = True, address: str | None = None
    ) -> None:
        del token, model_id, fetch
        raise TokenError("this service takes no bearer tokens (it has no call licences)")


# --- call licences, decided by the key server ----------------------------------------

# ask(model_id, keys, usage, grants): the key server's call_decisions op
Ask = Callable[[str | None, list[str], list[dict[str, Any]], dict[str, str]], dict[str, Any]]


@dataclass(eq=False)
class _Decision:
    key: str
    model_id: str
    fetched: float
    ttl: float
    ok: bool
    error: dict[str, Any] | None = None
    licence: str = ""
    budget: int | None = None
    retry_after: float | None = None  # budget 0 because of the rate: ask again after this
    rate: float | None = None
    burst: float | None = None
    expires_at: float | None = None
    proof_key: str | None = None  # the licence's Ed25519 public key: verifies its tokens
    grant_id: str | None = None  # the key server's reserve for this lease, by its id
    admitted: int = 0  # calls let in under this grant (served and in flight)
    last_used: float = 0.0
    refreshing: bool = False
    retired: bool = False  # its reserve was given back (replaced, idle, closing)


class _Bucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, burst)
        self.tokens = self.capacity
        self.at = now

    def take(self, now: float) -> float | None:
        """None when a call may go now (and takes its token), else the
        seconds until one may."""
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return None
        return (1.0 - self.tokens) / self.rate


# refusals that hold for every model of a licence (the rest, wrong_model
# above all, are about the one model asked for)
# (quota_exhausted is not: the key server says it too while the quota is
# only held by open grants, this service's own for another model among them)
_LICENCE_WIDE = frozenset(("licence_revoked", "licence_expired", "licence_unknown"))


def _for_caller(exc: VaultError) -> VaultError:
    """What a caller reads of a failed request to the key server: its own
    refusal as it is, but of a key server the service cannot reach only that
    (the key client's words name its address, which reached a web page's
    script through the REST door), typed as before."""
    if isinstance(exc, KeyServerUnavailableError):
        return KeyServerUnavailableError(
            "this service cannot reach its licence server right now: try again shortly"
        )
    return exc


def _new_id() -> str:
    return os.urandom(12).hex()


# First decisions being fetched at once (one thread and one key-server request
# each). Every new caller key costs one, and a bearer token may name any key
# it likes before its signature can be checked (the proof key comes with the
# decision): past this bound a new caller is refused, typed, rather than a
# flood of made-up keys costing a thread and a request each.
MAX_PENDING_DECISIONS = 256
# How long a stopping service keeps trying its last usage report: one key
# server request's timeout (10 s) and a little. Three tries of a key server
# that was gone made a SIGTERM take 32 s, past Kubernetes' default grace
# period (30 s).
CLOSE_BUDGET_S = 12.0
_PROBE_TTL = 5.0  # how long a probe's answer (ZAP, a door's vetting) is reused
# CURVE handshakes whose key the service has no fresh answer for, per peer
# address: each costs a key-server request, made on the one ZAP thread every
# handshake waits on, and a stranger mints a fresh key per handshake. Past
# the budget, an address's unknown keys are refused without asking (libzmq
# retries the handshake on its reconnect interval): 17,920 stranger
# handshakes in 20 s took a licensed caller's p99 from 6 to 95 ms and its
# first call from 56 to 679 ms, before this.
PROBE_BURST = 32
PROBE_RATE = 8.0  # per second, per address
_MAX_PROBE_ADDRESSES = 1 << 16
# keys the key server has called live call licences: they are still asked
# about at each handshake, but spend no address's budget for this long, so a
# flood from a licensed caller's address (a NAT, loopback) does not lock it out
_KNOWN_GOOD_S = 3600.0
_NO_SCOPE: Any = object()  # _known_live without a scope: the one recorded stays
_MAX_KNOWN_GOOD = 1 << 16
VET = ""  # the model part of the pair a door's vetting waits on (no model yet)
# why a handshake was refused, beside the key server's error codes (ZAP)
KEYSERVER_UNAVAILABLE = ZAP_KEYSERVER_UNAVAILABLE  # it could not be asked (ZAP: 500)
PROBE_BUDGET_SPENT = "probe_budget"  # the peer address's unknown keys, past its budget
NOT_ALLOWED = "not_allowed"  # not on the --allow list


@dataclass(frozen=True)
class _Probe:
    """The key server's answer to "is this a live call licence at all"
    (no model, nothing reserved): for ZAP, and for a door's vetting of a
    bearer token before it reads the request."""

    ok: bool
    at: float
    licence: str = ""
    proof_key: str | None = None
    error: dict[str, Any] | None = None
    expires_at: float | None = None


class CallLicencePolicy(_Usage):
    """Decisions from the key server, cached for at most one lease.

    ``ask(model_id, keys, usage, grants)`` is the key server's
    ``call_decisions`` op (:meth:`vault.core.keyclient.KeyServerClient.call_decisions`);
    the clocks are parameters so tests need no waiting.

    Metering (nothing lost, nothing counted twice): every call served is
    counted under its licence until a usage report carries it; a grant's
    reserve is given back, by the grant's id, when its decision is replaced,
    left idle or the service stops, whatever the licence's decision is by
    then (a failed renewal, a refusal, a revocation). Reports are formed
    once, each with its own id, and sent with *every* request to the key
    server (a decision, a ZAP probe, the idle hand-back, the close) until
    one is answered; the key server counts an id once, so a report whose
    answer was lost is sent again safely. A grant whose answer was lost is
    given back by its id at the next contact (the key server refunds it if
    it made it, and refuses a late copy of the request otherwise).
    """

    def __init__(
        self,
        ask: Ask,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        refresh_every: float = 0.1,
    ) -> None:
        super().__init__()
        self._ask = ask
        self._clock = clock
        self._wall = wall
        self._notify: Callable[[str, str], None] = lambda key, model: None
        self._decisions: dict[tuple[str, str], _Decision] = {}
        # the latest decision fetched for each key, whatever its model: a door
        # vetting a token before it knows the model (gRPC) uses it while fresh
        self._latest: dict[str, _Decision] = {}
        self._probes: dict[str, _Probe] = {}
        self._probe_budgets: dict[str, _Bucket] = {}  # peer address -> unknown-key probes
        self._known_good: dict[str, float] = {}  # key -> when the key server last said live
        # key -> the models its licence covers (the key server's pattern, None: all),
        # for as long as the key is known good
        self._scopes: dict[str, str | None] = {}
        self._pruned_at = 0.0
        self.probes_refused = 0  # handshakes refused past their address's budget
        # (licence, model) -> calls served, not yet in a report: each report names
        # the model its calls were made on (the key server audits it so)
        self._unreported: Counter[tuple[str, str | None]] = Counter()
        # (licence, reserved, grant, model)
        self._giveback: list[tuple[str | None, int, str | None, str | None]] = []
        self._outbox: dict[str, dict[str, Any]] = {}  # report id -> report, until answered
        self._buckets: dict[str, _Bucket] = {}
        # bearer tokens: signatures already verified (signature -> proof key),
        # and calls admitted per token id (with its expiry, to forget it after)
        # (keyed by the digest of the whole signed message: the same signature
        # under another payload is another token, checked afresh)
        self._verified: dict[bytes, str] = {}
        self._fetching: set[tuple[str, str]] = set()  # first decisions being fetched
        self._token_calls: dict[tuple[str, str], list[float]] = {}  # (licence, token id)
        self.unanswered = 0  # requests to the key server that got no answer
        self._ask_lock = threading.Lock()  # one key-server request at a time
        self._stop = threading.Event()
        self._every = refresh_every
        self._thread = threading.Thread(target=self._refresher, name="vault-calls", daemon=True)
        self._thread.start()

    def bind(self, notify: Callable[[str, str], None]) -> None:
        self._notify = notify

    # -- ZAP: is this a live call licence at all (no model, nothing reserved) --

    def callback(self, domain: str, key: bytes) -> bool:
        del domain
        return self._refusal(key) is None

    def _refusal(self, key: bytes) -> str | None:
        """None to admit ``key``'s handshake, else why not: the key server's
        error code for it (``licence_unknown``, ``licence_revoked``,
        ``licence_expired``, ...), or :data:`KEYSERVER_UNAVAILABLE` when it
        could not be asked (nobody new gets in: fail closed)."""
        z = key.decode("ascii", "replace")
        now = self._clock()
        with self._lock:
            hit = self._probes.get(z)
        if hit is None or now - hit.at >= _PROBE_TTL:
            try:
                hit = self._probe(z, now)
            except VaultError:
                return KEYSERVER_UNAVAILABLE
        if hit.ok:
            return None
        code = (hit.error or {}).get("code")
        return code if isinstance(code, str) and code else "licence_unknown"

    @staticmethod
    def _budget_key(address: str) -> str:
        """The budget a peer address draws on: :func:`address_key`'s, and one
        for all of loopback (127.0.0.0/8: a local stranger may bind any of
        its 16 million)."""
        key = address_key(address)
        return "loopback" if key == "::1" or key.startswith("127.") else key

    def admit_from(self, address: str, key: bytes) -> bool:
        """ZAP with the peer's address (``sealed_authenticator`` passes it):
        a key with a fresh answer is answered from it; a key the key server
        called live within the hour is asked about on no budget; any other
        costs a token of its address's budget (:data:`PROBE_BURST`, then
        :data:`PROBE_RATE` a second), and past it is refused unasked."""
        return self.refusal_from(address, key) is None

    def refusal_from(self, address: str, key: bytes) -> str | None:
        """:meth:`admit_from`, saying why a key is refused (for the ZAP
        handler's log, metric and status code): :meth:`_refusal`'s reasons,
        and :data:`PROBE_BUDGET_SPENT` past the address's budget."""
        z = key.decode("ascii", "replace")
        now = self._clock()
        with self._lock:
            hit = self._probes.get(z)
            fresh = hit is not None and now - hit.at < _PROBE_TTL
            if not fresh and self._spend_probe(z, address, now) is not None:
                return PROBE_BUDGET_SPENT
        return self._refusal(key)  # a fresh probe answers; else the key server is asked

    def _spend_probe(self, key: str, address: str, now: float) -> float | None:
        """A key-server request about ``key`` from ``address`` (lock held):
        None when it may go (a key called live within the hour costs
        nothing; any other a token of its address's budget), else the
        seconds until the address's budget has one again (counted refused)."""
        seen = self._known_good.get(key)
        if seen is not None and now - seen < _KNOWN_GOOD_S:  # a licensed caller's: no budget
            return None
        budget = self._probe_budget(self._budget_key(address), now)
        wait = budget.take(now) if budget is not None else 1.0
        if wait is not None:
            self.probes_refused += 1
        return wait

    def _probe_budget(self, address: str, now: float) -> _Bucket | None:
        """The address's budget (lock held); None past the addresses kept."""
        budget = self._probe_budgets.get(address)
        if budget is None:
            if len(self._probe_budgets) >= _MAX_PROBE_ADDRESSES:
                return None  # more addresses at once than kept: fail closed
            budget = self._probe_budgets[address] = _Bucket(PROBE_RATE, PROBE_BURST, now)
        return budget

    def _known_live(self, key: str, now: float, scope: Any = _NO_SCOPE) -> None:
        """The key server called ``key`` a live call licence covering the
        models ``scope`` names (lock held)."""
        if key in self._known_good or len(self._known_good) < _MAX_KNOWN_GOOD:
            self._known_good[key] = now
        if scope is not _NO_SCOPE:  # kept past the known-good table's bound: the newest win
            self._scopes.pop(key, None)
            if len(self._scopes) >= _MAX_KNOWN_GOOD:
                del self._scopes[next(iter(self._scopes))]
            self._scopes[key] = scope

    def sees(self, caller_key: str | None, model_id: str) -> None:
        """A caller reads a model's statistics only where its licence covers
        the model, as for a compute: they are the other callers' activity.
        What the licence covers is what the key server said at the caller's
        handshake (a licence's models never change); for a caller it has not
        answered about lately, it is asked again, and the caller told to
        retry."""
        with self._lock:
            if caller_key is not None and caller_key in self._scopes:
                scope = self._scopes[caller_key]
            else:
                if caller_key is not None:
                    self._probe_async(caller_key)
                raise PermissionDeniedError(
                    "this connection's licence is being checked again: retry in a moment"
                )
        if scope is not None and not covers(scope, model_id):
            raise WrongModelError(f"this caller's licence is not for model {model_id!r}")

    def _probe(self, key: str, now: float) -> _Probe:
        """Ask the key server whether ``key`` holds a live call licence (no
        model, nothing reserved) and keep the answer for :data:`_PROBE_TTL`."""
        out = self._call(None, [key])
        d = (out.get("decisions") or {}).get(key) or {}
        probe = _Probe(bool(d.get("ok")), now, licence=str(d.get("licence_id") or ""),
                       proof_key=d.get("proof_key") or None, error=d.get("error"),
                       expires_at=d.get("expires_at"))  # fmt: skip
        scope = d.get("model_id") if isinstance(d.get("model_id"), (str, type(None))) else ""
        with self._lock:
            self._probes[key] = probe
            if probe.ok:
                # a key server that does not say (older than this service): as
                # before, every model (refusing would refuse every caller's open)
                self._known_live(key, now, scope if "model_id" in d else None)
        return probe

    # -- a door's vetting: the token genuine and its licence in force, before the body --

    def vet(
        self, token: Token, model_id: str | None, *, fetch: bool = True, address: str | None = None
    ) -> None:
        """Before a door reads a request's body (or decodes its message): the
        token's signature (with the licence's proof key, from the key
        server), its expiry and scope, and the licence in force (not
        revoked, expired or spent), from the caller's decision for the
        model if one is at hand, else from a probe (no model, nothing
        reserved, answered for :data:`_PROBE_TTL`). Nothing is admitted or
        counted: the call itself is admitted by :meth:`admit` once read.
        :class:`AdmissionPending` while the probe is being fetched (the
        callback then names ``(key, VET)``); a typed error to refuse.

        Thread-safe (everything under ``self._lock``): a door calls it from
        its own thread with ``fetch=False`` first, which decides from what is
        cached (the same decisions and probes, the same ages, so a
        revocation is seen exactly as soon) and raises
        :class:`AdmissionPending` without fetching anything when nothing
        fresh is at hand; the door then asks the service's loop, which
        fetches and parks (:meth:`WorkerService.vet_now`). Nothing is cached
        for a token here that a genuine signature did not put there."""
        key = token.licence_key
        now = self._clock()
        with self._lock:
            d = (self._decisions.get((key, model_id)) if model_id is not None
                 else self._latest.get(key))  # fmt: skip
            if d is None or now >= d.fetched + d.ttl:
                probe = self._probes.get(key)
                if probe is None or now - probe.at >= _PROBE_TTL:
                    if fetch:
                        if (key, VET) not in self._fetching:  # a probe starts: it costs one
                            self._vet_budget(key, address, now)
                        self._probe_async(key)
                    raise AdmissionPending()
                d = _Decision(key, "", probe.at, _PROBE_TTL, probe.ok, error=probe.error,
                              licence=probe.licence, expires_at=probe.expires_at,
                              proof_key=probe.proof_key, retired=True)  # fmt: skip
            self._check_token(token, d, model_id)
            if not d.ok:
                raise from_wire(d.error)
            if d.expires_at is not None and self._wall() >= d.expires_at:
                raise LicenceExpiredError(f"licence {d.licence} has expired")
            if token.max_calls is not None:
                spent = self._token_calls.get((d.licence, token.token_id))
                if spent is not None and spent[0] >= token.max_calls:
                    raise TokenSpentError(
                        f"bearer token {token.token_id}: its {token.max_calls} calls are spent"
                    )

    def _vet_budget(self, key: str, address: str | None, now: float) -> None:
        """A door's token naming a key with no answer at hand costs a
        key-server request, and a stranger mints a licence key per request:
        as at the ZeroMQ handshake (:meth:`admit_from`), a key the key server
        called live within the hour is asked about on no budget, any other
        draws on its peer address's (:data:`PROBE_BURST`, then
        :data:`PROBE_RATE` a second) and past it is refused unasked (lock
        held). (Before, one address's made-up licences cost 770 key-server
        requests a second.)"""
        if address is None:
            return
        wait = self._spend_probe(key, address, now)
        if wait is not None:
            raise RateLimitedError(
                "this address has asked about too many licences this service does not know; "
                "try again shortly",
                retry_after=wait,
            )

    def _probe_async(self, key: str) -> None:
        """Fetch a probe for ``key`` once however many requests wait on it;
        bounded with the first decisions (lock held)."""
        pair = (key, VET)
        if pair in self._fetching:
            return
        if len(self._fetching) >= MAX_PENDING_DECISIONS:
            raise ServiceUnavailableError(
                "too many callers are waiting for a licence decision; try again shortly"
            )
        self._fetching.add(pair)

        def run() -> None:
            try:
                self._probe(key, self._clock())
            except VaultError as exc:
                with self._lock:  # refused for a moment: the next request asks again
                    self._probes[key] = _Probe(False, self._clock() - _PROBE_TTL + 1.0,
                                               error=_for_caller(exc).to_wire())  # fmt: skip
            finally:
                with self._lock:
                    self._fetching.discard(pair)
                self._notify(key, VET)

        threading.Thread(target=run, name="vault-probe", daemon=True).start()

    # -- per call ----------------------------------------------------------------

    def admit(self, caller_key: str | None, model_id: str, token: Token | None = None) -> Admission:
        if token is not None:
            caller_key = token.licence_key
        if caller_key is None:
            raise PermissionDeniedError("a call licence is needed (connect over CURVE)")
        now = self._clock()
        with self._lock:
            d = self._decisions.get((caller_key, model_id))
            if d is None or now >= d.fetched + d.ttl:
                # none yet, or older than one lease: never used past that
                if d is None:
                    self._first_fetch(caller_key, model_id)
                else:
                    d.last_used = now  # a call waits on its renewal: in use
                if d is not None and not d.refreshing:
                    d.refreshing = True
                    self._fetch_async(caller_key, model_id)
                raise AdmissionPending()
            d.last_used = now
            if token is not None:
                self._check_token(token, d, model_id)
            if not d.ok:
                raise from_wire(d.error)
            if d.expires_at is not None and self._wall() >= d.expires_at:
                raise LicenceExpiredError(f"licence {d.licence} has expired")
            if d.budget is not None and d.admitted >= d.budget:
                if d.retry_after is not None and now < d.fetched + d.retry_after:
                    raise RateLimitedError(
                        f"licence {d.licence}: call rate exceeded",
                        retry_after=d.fetched + d.retry_after - now,
                    )
                # this lease's reserve is spent: ask for the next one (or the refusal)
                if not d.refreshing:
                    d.refreshing = True
                    self._fetch_async(caller_key, model_id)
                raise AdmissionPending()
            spent = None
            if token is not None and token.max_calls is not None:
                # counted per licence and id: the id is the minter's choice, so
                # one holder's tokens never spend another holder's
                spent = self._token_calls.setdefault((d.licence, token.token_id),
                                                     [0, token.expires_at])  # fmt: skip
                if spent[0] >= token.max_calls:
                    raise TokenSpentError(
                        f"bearer token {token.token_id}: its {token.max_calls} calls are spent"
                    )
            if d.rate is not None:
                burst = d.burst if d.burst is not None else max(1.0, d.rate)
                bucket = self._buckets.get(d.licence)
                if bucket is None or bucket.rate != d.rate or bucket.capacity != max(1.0, burst):
                    bucket = self._buckets[d.licence] = _Bucket(d.rate, burst, now)
                wait = bucket.take(now)
                if wait is not None:
                    raise RateLimitedError(
                        f"licence {d.licence}: more than {d.rate:g} calls/s "
                        f"(bursts of {bucket.capacity:g})",
                        retry_after=wait,
                    )
            d.admitted += 1
            if spent is not None:
                spent[0] += 1
            return Admission(d.licence, caller_key, d, token.token_id if token else None)

    def _first_fetch(self, key: str, model_id: str) -> None:
        """Fetch the first decision for a pair once, however many of its calls
        arrive before it (each fetch reserves a grant: two at once would leave
        one never given back); bounded (lock held)."""
        pair = (key, model_id)
        if pair in self._fetching:
            return
        if len(self._fetching) >= MAX_PENDING_DECISIONS:
            raise ServiceUnavailableError(
                "too many callers are waiting for a licence decision; try again shortly"
            )
        self._fetching.add(pair)
        self._fetch_async(key, model_id)

    def _check_token(self, token: Token, d: _Decision, model_id: str | None) -> None:
        """A bearer token's signature, expiry and scope (under ``self._lock``).
        The signature comes first: a forged token learns nothing about the
        licence it names, not even whether it is revoked."""
        if not d.proof_key:
            err = from_wire(d.error) if not d.ok else TokenError()
            if isinstance(err, KeyServerError):
                raise err  # the key server is away: say so, fail closed
            raise TokenError()
        # the cache is keyed by the whole signed message: a payload rewritten
        # under a signature verified before (no budget, a later expiry, other
        # models) is another message, verified afresh, and refused
        signed = hashlib.sha256(token.payload + token.signature).digest()
        if self._verified.get(signed) != d.proof_key or d.licence != token.licence_id:
            token.verify(d.proof_key, licence_id=d.licence)
            if len(self._verified) >= 65536:
                self._verified.clear()
            self._verified[signed] = d.proof_key
        token.check_time(self._wall())
        if model_id is not None and not token.allows(model_id):
            raise WrongModelError(f"this bearer token is not for model {model_id!r}")

    def record(self, admission: Admission, *, ok: bool) -> None:
        super().record(admission, ok=ok)
        d = admission.decision
        with self._lock:
            if ok:
                model = d.model_id if isinstance(d, _Decision) else None
                self._unreported[(admission.licence, model)] += 1
            elif isinstance(d, _Decision):
                d.admitted -= 1  # a failed call is not billed: its slot is free again
                spent = (
                    self._token_calls.get((admission.licence, admission.token_id))
                    if admission.token_id is not None
                    else None
                )
                if spent is not None:
                    spent[0] -= 1

    def usage(self) -> dict[str, int]:
        """Calls served per licence since this service started."""
        with self._lock:
            return dict(self.calls)

    def pending_reports(self) -> int:
        """Usage reports formed and not yet acknowledged by the key server."""
        with self._lock:
            return (
                len(self._outbox)
                + len(self._giveback)
                + sum(1 for n in self._unreported.values() if n)
            )

    # -- talking to the key server ---------------------------------------------------

    def _retire(self, d: _Decision) -> None:
        """Give the decision's reserve back at the next contact (once; lock held)."""
        if d.retired:
            return
        d.retired = True
        if d.ok and d.grant_id is not None:
            self._giveback.append((d.licence, int(d.budget or 0), d.grant_id, d.model_id))

    def _form_reports(self) -> list[dict[str, Any]]:
        """Everything not yet reported becomes reports with ids (lock held);
        returns every report not yet answered, old ones unchanged."""
        used = self._unreported
        self._unreported = Counter()
        for lic, reserved, grant, model in self._giveback:
            rid = _new_id()
            n = used.pop((lic, model), 0) if lic is not None else 0
            self._outbox[rid] = {"id": rid, "licence_id": lic, "used": n, "reserved": reserved,
                                 "grant_id": grant, **({"model_id": model} if model else {})}  # fmt: skip
        self._giveback = []
        for (lic, model), n in used.items():
            if n:
                rid = _new_id()
                self._outbox[rid] = {"id": rid, "licence_id": lic, "used": n, "reserved": 0,
                                     **({"model_id": model} if model else {})}  # fmt: skip
        return list(self._outbox.values())

    def _call(self, model_id: str | None, keys: list[str],
              grants: dict[str, str] | None = None) -> Any:  # fmt: skip
        """One request to the key server, carrying every pending report; the
        reports are done with once it is answered (whatever it decides)."""
        with self._ask_lock:
            with self._lock:
                usage = self._form_reports()
            try:
                out = self._ask(model_id, keys, usage, dict(grants or {}))
            except VaultError:
                self.unanswered += 1
                raise
            except Exception as exc:  # a transport failure: the reports stay pending
                self.unanswered += 1
                raise KeyServerUnavailableError(
                    f"key server request failed ({type(exc).__name__})"
                ) from None
            with self._lock:
                for rep in usage:
                    self._outbox.pop(rep["id"], None)
            return out

    def _fetch(self, key: str, model_id: str) -> None:
        with self._lock:
            old = self._decisions.get((key, model_id))
            if old is not None:
                self._retire(old)  # its reserve goes back in this very request
        gid = _new_id()
        now = self._clock()
        try:
            out = self._call(model_id, [key], {key: gid})
            raw = (out.get("decisions") or {}).get(key)
            ttl = float(out.get("ttl") or 10.0)
            if not isinstance(raw, dict):
                raise KeyServerError("the key server gave no decision for this caller")
        except VaultError as exc:
            with self._lock:
                # maybe granted, answer lost: given back by its id at the next contact
                self._giveback.append((None, 0, gid, model_id))
                self._retire_replaced(key, model_id, old)
                # a short-lived refusal, so the next call tries again
                self._decisions[(key, model_id)] = _Decision(
                    key, model_id, now, min(1.0, (old.ttl if old else 1.0)), False,
                    error=_for_caller(exc if isinstance(exc, KeyServerError)
                                      else KeyServerUnavailableError(str(exc))).to_wire(),
                    retired=True,
                )  # fmt: skip
            self._notify(key, model_id)
            return
        ok = bool(raw.get("ok"))
        # a renewal is not a use: a decision nobody calls on goes idle a lease
        # after its last call, and its reserve back (a renewal that counted as
        # one renewed every decision ever fetched, refusals too, for good)
        with self._lock:
            cur = self._decisions.get((key, model_id))
            used = max([x.last_used for x in (old, cur) if x is not None] or [now])
        d = _Decision(key, model_id, now, ttl, ok, error=raw.get("error"),
                      licence=str(raw.get("licence_id") or ""), budget=raw.get("budget"),
                      retry_after=raw.get("retry_after"), rate=raw.get("rate"),
                      burst=raw.get("burst"), expires_at=raw.get("expires_at"), last_used=used,
                      grant_id=gid if ok else None, retired=not ok,
                      proof_key=raw.get("proof_key") or None)  # fmt: skip
        with self._lock:
            self._retire_replaced(key, model_id, old)
            self._decisions[(key, model_id)] = d
            # what a door vets a token by before it knows the model: only an
            # answer about the licence itself (a refusal for one model, asked
            # for by any of the licence's token holders, says nothing of the
            # others: it refused every holder's gRPC calls to every model)
            err = raw.get("error")
            if ok or (isinstance(err, dict) and err.get("code") in _LICENCE_WIDE):
                self._latest[key] = d
            if ok:
                self._known_live(key, now)
        self._notify(key, model_id)

    def _retire_replaced(self, key: str, model_id: str, old: _Decision | None) -> None:
        """A decision stored meanwhile by another fetch is replaced now: its
        reserve goes back too, never left reserved for good (lock held)."""
        cur = self._decisions.get((key, model_id))
        if cur is not None and cur is not old:
            self._retire(cur)

    def _fetch_async(self, key: str, model_id: str) -> None:
        def run() -> None:
            try:
                self._fetch(key, model_id)
            finally:  # whatever happened, the next call of the pair may ask again
                with self._lock:
                    self._fetching.discard((key, model_id))

        threading.Thread(target=run, name="vault-decision", daemon=True).start()

    def _refresher(self) -> None:
        while not self._stop.wait(self._every):
            self.refresh()

    def refresh(self) -> None:
        """One pass of the refresher thread (every ``refresh_every`` s): renew
        decisions from half-way through their lease while they are used;
        give back and forget those left unused for a whole lease."""
        now = self._clock()
        due: list[tuple[str, str]] = []
        idle: list[_Decision] = []
        with self._lock:
            wall = self._wall()
            for tk in [k for k, (_, exp) in self._token_calls.items() if exp <= wall]:
                del self._token_calls[tk]  # expired tokens are refused anyway
            for z in [z for z, p in self._probes.items() if now - p.at >= _PROBE_TTL]:
                del self._probes[z]  # never reused: one per key a stranger tried
            if now - self._pruned_at >= 1.0:  # the tables can be large: once a second
                self._pruned_at = now
                full = [a for a, b in self._probe_budgets.items()
                        if b.tokens + (now - b.at) * b.rate >= b.capacity]  # fmt: skip
                for a in full:
                    del self._probe_budgets[a]  # an idle address starts afresh anyway
                for z in [z for z, t in self._known_good.items() if now - t >= _KNOWN_GOOD_S]:
                    del self._known_good[z]
            for k, d in list(self._decisions.items()):
                if d.refreshing:
                    continue
                if now - d.last_used >= d.ttl:
                    idle.append(self._decisions.pop(k))
                    self._retire(idle[-1])
                    if self._latest.get(k[0]) is d:
                        del self._latest[k[0]]
                elif now >= d.fetched + d.ttl / 2:
                    d.refreshing = True
                    due.append(k)
            pending = bool(self._outbox or self._giveback)
        for key, model_id in due:
            self._fetch(key, model_id)
        if idle or pending:  # reports (and given-back reserves) go out now
            try:
                self._call(idle[0].model_id if idle else None, [])
            except VaultError:
                pass  # they stay pending: the next contact carries them

    def close(self, *, attempts: int = 3, budget_s: float = CLOSE_BUDGET_S) -> None:
        """Report what was served and give back every reserve, whatever each
        licence's decision is now; tried up to ``attempts`` times, a new try
        only while it would end within ``budget_s`` of the first (judged by
        the last try's length): a key server that is gone costs a stopping
        service one request's timeout, not three. What is still unreported
        after that is :meth:`pending_reports` (the service logs it); its
        reserves come back when the grants lapse."""
        self._stop.set()
        self._thread.join(2)
        with self._lock:
            for d in self._decisions.values():
                self._retire(d)
        start = self._clock()
        for _ in range(attempts):
            with self._lock:
                if not (self._outbox or self._giveback or any(self._unreported.values())):
                    return
            tried = self._clock()
            try:
                self._call(None, [])
                return
            except VaultError:
                now = self._clock()
                if now - start + (now - tried) > budget_s:
                    return
