"""The worker service: many models, a supervised pool each, batching, drain.

One thread, the *loop*, owns every ZeroMQ socket: the front ROUTER callers
reach (``tcp://`` with CURVE and a ZAP check, or ``ipc://``), and one DEALER
per worker process. A call is admitted (the caller's licence, see
:mod:`.calls`), queued on its model, and sent to the least-loaded ready
worker of that model's pool, alone or joined with other callers' rows into
one batch (:mod:`.batching`). Replies are matched by a service-side request
id, split back, and answered to the caller with the caller's own id.

- A worker that dies is seen at once (a ``pidfd`` in the poll set): each call
  it held is answered :class:`~vault.core.errors.WorkerCrashedError`, never
  retried by the service (so never run or counted twice), and the worker is
  restarted with backoff.
- A call past its timeout is answered :class:`WorkerTimeoutError` and its
  slot freed (counted against its licence if a worker has it and completes
  it: a worker runs a call to its end); a worker still busy with an abandoned call a full
  timeout later is sent nothing more, and killed and restarted once no
  other call on it is waited for.
- Each model loads on its own: one that cannot (no licence covers it, a
  damaged package, a key refused) is *unavailable* on its own, its reason
  logged once per attempt (``model_unavailable``: code and sanitised
  message), retried with backoff (1 s doubling to 60 s), while the others
  serve. Readiness follows Triton's and KServe's data plane: :meth:`live`,
  :meth:`ready` (the initial load has finished, at least one model is ready,
  not draining), :meth:`model_ready`, :meth:`model_signature`.
- Signals only wake the loop (``signal.set_wakeup_fd``); SIGTERM starts a
  drain: readiness goes false, new calls are refused with
  :class:`ServiceUnavailableError`, the calls already admitted finish within
  ``drain_timeout``, the workers stop, and :meth:`WorkerService.run` returns 0.
  SIGHUP rescans the repository.

Example::

    cfg = ServiceConfig(bind="tcp://0.0.0.0:7701", packages=["m.vault"],
                        launch=LaunchSpec(licence=lic), curve=(public, secret),
                        policy=AllowListPolicy.from_dir("clients/"))
    svc = WorkerService(cfg)
    ready = svc.start()          # the initial load has finished (see ready())
    svc.run()                    # until SIGTERM (or svc.request_stop())
"""

from __future__ import annotations

import itertools
import os
import queue
import select
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from vault.core.errors import (
    ConfigError,
    IntegrityError,
    ProtocolError,
    ServiceUnavailableError,
    TokenError,
    UnknownModelError,
    VaultError,
    WorkerCrashedError,
    WorkerTimeoutError,
    shown,
)
from vault.core.peercap import PeerCap, address_key, prepare, raise_open_files
from vault.core.protocol import (
    PROTOCOL_VERSION,
    decode_tensors,
    encode_tensors,
    error_reply,
    ok_reply,
    pack_header,
    unpack_header,
)
from vault.core.sealed import ServerSession, SessionTable, plain_error, session_id
from vault.core.token import Token

from ..server import connection_session, sealed_authenticator, sealed_socket
from . import batching
from .calls import VET, Admission, AdmissionPending, CallPolicy, OpenPolicy
from .instances import (
    Backoff,
    Instance,
    LaunchSpec,
    check_workers_user,
    start_instance,
    sweep_stale_dirs,
)
from .logs import JsonLog, reason
from .metrics import HttpEndpoints, Metrics
from .repository import Repository

__all__ = ["EdgeCall", "ServiceConfig", "WorkerService"]

_HOUSEKEEPING_S = 0.02
_MAX_SCAN = 256  # queue entries looked at when forming one batch
_CLOSE_LINGER_MS = 5000  # how long the last replies may take to leave at close
_FLUSH_S = 0.5  # the front stays open this long after the last answer (see _flush_front)
_FLUSH_MAX_S = 10.0
_LOAD_RETRY_FIRST_S = 1.0  # a model that cannot load is tried again after 1, 2, 4 ... 60 s
_LOAD_RETRY_CAP_S = 60.0
VERSION = "1"  # one version per model id: the package the repository holds now
_REFUSAL_LOG_EVERY_S = 60.0  # caller_refused: once a minute per address and reason ...
_REFUSAL_LOG_MAX = 60  # ... and at most this many a minute in all (addresses are many)
_REFUSAL_HINTS = {
    "licence_unknown": "no call licence the key server knows has this key",
    "licence_revoked": "the caller's call licence is revoked",
    "licence_expired": "the caller's call licence has expired",
    "quota_exhausted": "the caller's call licence has no calls left",
    "permission_denied": "the key server refuses this service's question (its device)",
    "keyserver_unavailable": "the key server could not be asked: nobody new gets in until "
    "it answers (the caller is told KeyServerUnavailableError)",
    "probe_budget": "this address tried more unknown keys than the service asks about",
    "not_allowed": "the key is not in the --allow directory",
}
_REFUSAL_REASONS = frozenset(_REFUSAL_HINTS) | {
    "wrong_model", "rate_limited", "licence", "wrong_keyserver", "keyserver",
}  # fmt: skip
READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"
_NO_DECISION_IN_TIME = (
    "this call's timeout passed while its licence was being checked with the key server "
    "(a call waits at most its own timeout, and at most --request-timeout): nothing ran"
)


@dataclass
class ServiceConfig:
    bind: str
    packages: Sequence[str] = ()
    repository: str | None = None
    poll_interval: float | None = None
    instances: int = 1
    max_batch: int = 1
    max_queue_delay_us: int = 0
    instance_inflight: int = 2
    request_timeout: float = 60.0
    drain_timeout: float = 30.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    max_message: int = 1 << 30
    curve: tuple[bytes, bytes] | None = None  # (public, secret) for tcp://
    sealed_port: int | None = 0  # sealed calls' socket, on the bind host (0: any; None: none)
    policy: CallPolicy = field(default_factory=OpenPolicy)
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    # re-read the service's licences on a rescan (SIGHUP): a licence replaced
    # on disk is used by the next attempt of every model that is unavailable
    reload_licences: Callable[[], Any] | None = None
    oip: Any = None  # an oip.OipConfig: serve the Open Inference Protocol too
    # a worker found stuck gets a replacement started at once, so its model
    # serves the other callers while it finishes the calls still waited for
    # (that model holds one worker more meanwhile); False: its slot is
    # restarted only once it has gone, and the model serves nobody on that
    # slot until then (another caller's call on it can take a full timeout)
    replace_stuck: bool = True


@dataclass(eq=False)
class EdgeCall:
    """A call from a door other than the ZeroMQ front (the Open Inference
    Protocol's REST and gRPC servers): posted into the loop with
    :meth:`WorkerService.submit`, admitted, queued, batched and metered there
    exactly as a ZeroMQ caller's, and answered by calling ``reply(header,
    frames)`` once, from the loop's thread (so ``reply`` must only hand the
    answer over, e.g. with ``loop.call_soon_threadsafe``)."""

    model: str | None
    token: Token | None
    tensors: list[dict[str, Any]]
    frames: list[Any]
    outputs: list[str] | None
    reply: Any  # Callable[[dict[str, Any], Sequence[Any]], None]
    timeout: float | None = None
    # only vet the token (before the door reads the request): answered ok
    # once it is genuine and its licence in force, nothing admitted
    # (CallPolicy.vet); ``model`` None when the door does not know it yet
    vet: bool = False
    # the caller's peer address: a vetting that would ask the key server about
    # a licence it has no answer for draws on the address's budget
    address: str | None = None


# what a worker answers when its own key lease has ended: it serves nothing more
# (its callers' call licences are the service's to check, never a worker's)
_LEASE_ENDED = frozenset({"key_server_unavailable", "licence_expired", "licence_revoked",
                          "licence_unknown"})  # fmt: skip
_LEASE_EXIT_GRACE_S = 5.0  # how long such a worker has to exit by itself before it is killed


@dataclass(eq=False)
class _Call:
    ident: Any
    rid: Any
    model: str
    admission: Admission
    header: dict[str, Any]
    frames: list[Any]
    arrived: float
    deadline: float
    feeds: dict[str, np.ndarray[Any, Any]] | None = None
    rows: int | None = None
    key: Any = None
    solo: bool = False
    done: bool = False
    lease_retried: bool = False  # sent again once after a worker whose lease had ended refused it
    # answered (timed out) while its worker still runs it: counted once the
    # worker's own answer says whether it ran (ok: counted; else not)
    unsettled: bool = False


@dataclass(eq=False)
class _Dispatch:
    did: int
    inst: Instance
    calls: list[_Call]
    sent: float
    joined: bool
    stuck_at: float
    rows: int = 0


class _Model:
    def __init__(self, model_id: str, path: str, stamp: Any) -> None:
        self.model_id = model_id
        self.path = path
        self.stamp = stamp
        self.info: dict[str, Any] | None = None
        self._signature: dict[str, Any] | None = None
        self.batchable = False
        self.batching_why = "no worker has started yet"
        self.instances: list[Instance] = []
        self.starting: set[int] = set()
        self.backoff: dict[int, Backoff] = {}
        self.restart_at: dict[int, float] = {}
        self.queue: deque[_Call] = deque()
        self.removing = False
        # loading on its own: the last failure (code, message) while no worker
        # serves, the model-level retry, and whether the first attempt is over
        self.reason: tuple[str, str] | None = None
        self.retry_at: float | None = None
        self.attempts = 0
        self.settled = False
        self.batch_timer: float | None = None
        self.calls = 0
        self.errors = 0
        self.batches = 0
        self.latencies: deque[float] = deque(maxlen=4096)
        # each caller's own (its key: a licence's, its bearer tokens' included),
        # which is all its ``stats`` tells it (never the other callers' activity)
        self.by_caller: dict[str, _CallerStats] = {}

    def caller(self, key: str | None) -> _CallerStats:
        k = key or ""
        cs = self.by_caller.get(k)
        if cs is None:
            if len(self.by_caller) >= _MAX_CALLER_STATS:  # the longest unseen goes
                del self.by_caller[next(iter(self.by_caller))]
            cs = self.by_caller[k] = _CallerStats()
        else:  # most recently seen last
            self.by_caller[k] = self.by_caller.pop(k)
        return cs

    def signature(self) -> dict[str, Any]:
        """``{"inputs", "outputs"}`` from the package's public manifest (no key
        needed), cached; the worker's own ``info`` once one has started."""
        if self.info is not None:
            return {"inputs": self.info["inputs"], "outputs": self.info["outputs"]}
        if self._signature is None:
            from vault.core.package import inspect

            man = inspect(self.path)
            self._signature = {"inputs": man["inputs"], "outputs": man["outputs"]}
        return self._signature

    @property
    def state(self) -> str:
        if any(not i.lease_ended for i in self.instances):
            return READY
        return UNAVAILABLE if self.reason is not None else LOADING

    def busy(self, dispatches: dict[int, _Dispatch]) -> bool:
        return bool(self.queue) or any(d.inst.model_id == self.model_id and d.inst in
                                       self.instances for d in dispatches.values())  # fmt: skip


class WorkerService:
    """See the module docstring."""

    def __init__(self, cfg: ServiceConfig, *, log: JsonLog | None = None) -> None:
        check_workers_user(cfg.launch)  # before anything is opened: a ConfigError leaks nothing
        if not cfg.packages and not cfg.repository:
            raise ConfigError("give packages to serve, or --repository DIR")
        self.cfg = cfg
        self.log = log or JsonLog(None)
        self.metrics = Metrics()
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.models: dict[str, _Model] = {}
        self.retiring: list[_Model] = []
        self.dispatches: dict[int, _Dispatch] = {}
        self._ids = itertools.count(1)
        self._refusals_logged: dict[tuple[str, str], float] = {}  # (address, reason) -> when
        self._refusal_window: list[float] = [float("-inf"), 0, 0]  # minute start, logged, unlogged
        self._refusals_lock = threading.Lock()
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_lock = threading.Lock()  # for threads only; signals use set_wakeup_fd
        self._poller = zmq.Poller()
        self._by_sock: dict[Any, Instance] = {}
        self._by_pidfd: dict[int, Instance] = {}
        self.draining = False
        self._drain_deadline = 0.0
        self._stopped = False
        self._heartbeat = time.monotonic()
        self._last_answer = 0.0
        self._signals_caught = False
        self._old_wakeup: int | None = None
        self._old_handlers: dict[int, Any] = {}
        self._auth: Any = None
        self._http: HttpEndpoints | None = None
        self._oip: Any = None
        self._edge_closed = False
        self.front = self.ctx.socket(zmq.ROUTER)
        self.sessions: SessionTable | None = None
        self.bulk: zmq.Socket[Any] | None = None
        self._peercap: PeerCap | None = None  # the TCP ports' per-address bounds
        self.bulk_port: int | None = None
        self.endpoint = cfg.bind
        self.repo = Repository(cfg.repository) if cfg.repository else None
        self._next_poll = 0.0
        self._parked: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
        self._initial_done = False
        # what the probes read from other threads: replaced whole, never mutated
        self._status: dict[str, tuple[str, tuple[str, str] | None]] = {}
        cfg.policy.bind(self._decided)

    # -- start ----------------------------------------------------------------------

    def _configure_front(self) -> None:
        f = self.front
        f.linger = 0
        f.maxmsgsize = self.cfg.max_message
        f.sndhwm = f.rcvhwm = 10000
        f.router_mandatory = False
        if self.cfg.bind.startswith("tcp://"):
            if self.cfg.curve is None:
                raise ConfigError("a tcp:// service needs CURVE keys and an allow-list")
            self._auth = sealed_authenticator(self.ctx)  # CURVE here, PLAIN on the sealed port
            self._auth.start()
            self._auth.configure_curve_callback(
                domain="vault", credentials_provider=self.cfg.policy
            )
            self._auth.on_refused = self._handshake_refused
            public, secret = self.cfg.curve
            f.curve_server = True
            f.curve_secretkey = secret
            f.curve_publickey = public
            f.zap_domain = b"vault"
            prepare(f)  # handshakes bounded: before the bind (vault/core/peercap.py)
        if self.cfg.bind.startswith("tcp://") and self.cfg.sealed_port is not None:
            # sealed calls: AES-256-GCM on a second socket, keys agreed over
            # this CURVE one (vault/core/sealed.py, docs/transport.md); a call's
            # frames may wait in a queue or a batch: a fresh buffer per message
            assert self.cfg.curve is not None
            self.sessions = SessionTable(self.cfg.curve[0], reuse=False)
            assert self._auth is not None
            self._auth.sessions = self.sessions  # only a live session's holder connects
            self.bulk = sealed_socket(self.ctx, hwm=10000)
            prepare(self.bulk)

    def _handshake_refused(self, why: str, address: str) -> None:
        """The ZAP handler refused a caller's key (its thread): counted by
        reason in ``vault_handshakes_refused``, and logged
        (``caller_refused``, with the reason and the peer's address) once a
        minute per address and reason (a refused client's libzmq retries
        every 100 ms; a stranger mints a key per handshake)."""
        if why not in _REFUSAL_REASONS:
            why = "other"  # a label from a fixed set, whatever a key server sends
        self.metrics.handshakes_refused.labels(why).inc()
        where = address_key(address) if address else ""
        now = time.monotonic()
        suppressed = 0
        with self._refusals_lock:
            last = self._refusals_logged.get((where, why))
            if last is not None and now - last < _REFUSAL_LOG_EVERY_S:
                return
            if now - self._refusal_window[0] >= _REFUSAL_LOG_EVERY_S:  # a new minute
                suppressed, self._refusal_window = int(self._refusal_window[2]), [now, 0, 0]
            if self._refusal_window[1] >= _REFUSAL_LOG_MAX:  # many addresses: counted only
                self._refusal_window[2] += 1
                return
            self._refusal_window[1] += 1
            while len(self._refusals_logged) >= 4096:  # the oldest first
                del self._refusals_logged[next(iter(self._refusals_logged))]
            self._refusals_logged.pop((where, why), None)
            self._refusals_logged[(where, why)] = now
        if suppressed:
            self.log("caller_refused_unlogged", level="warning", count=suppressed,
                     hint="refused handshakes from more addresses than are logged a minute "
                          "(vault_handshakes_refused_total counts every one)")  # fmt: skip
        self.log("caller_refused", level="warning", reason=why, address=where,
                 hint=_REFUSAL_HINTS.get(why, ""))  # fmt: skip

    def _initial_sources(self) -> list[tuple[str, str, Any]]:
        out: list[tuple[str, str, Any]] = []
        if self.repo is not None:
            out.extend(self.repo.scan(self.log))
        for p in self.cfg.packages:
            if not os.path.exists(p):
                raise ConfigError(f"{p}: no such package")
            try:
                out.append(Repository.describe(p))
            except VaultError as exc:  # unreadable: logged, the others are served
                code, message = reason(exc)
                self.log("package_skipped", level="error", file=os.path.basename(p), code=code,
                         message=message)  # fmt: skip
        seen: dict[str, str] = {}
        for model_id, path, _ in out:
            if model_id in seen and seen[model_id] != path:
                raise ConfigError(f"model id {model_id!r} is in both {seen[model_id]} and {path}")
            seen[model_id] = path
        return out

    def start(self) -> dict[str, Any]:
        """Start every model's pool, wait for the initial load (each model
        ready, or failed once and retrying on its own), then bind and start
        the HTTP endpoints. One model that cannot load never fails the
        service; a configuration error (a bad bind, missing CURVE keys)
        raises."""
        try:  # what a killed predecessor of this uid left in the temp directory
            swept = sweep_stale_dirs()
        except Exception:  # noqa: BLE001 - tidying must never stop a start
            swept = 0
        if swept:
            self.log("stale_instance_dirs_removed", level="info", count=swept)
        if os.geteuid() == 0 and not self.cfg.launch.user:
            # allowed (a container's root is often no root at all), but said
            self.log("workers_run_as_root", level="warning",
                     message="started as root without --user: every worker runs as root; "
                             "--user NAME drops them to NAME (docs/service.md, Operations)")  # fmt: skip
        sources = self._initial_sources()
        self._configure_front()
        for model_id, path, stamp in sources:
            self.models[model_id] = _Model(model_id, path, stamp)
        self._publish()
        try:
            if self.cfg.metrics_port is not None:
                # probes answer during the initial load: live, not yet ready
                try:
                    self._http = HttpEndpoints(self.metrics, self, host=self.cfg.metrics_host,
                                               port=self.cfg.metrics_port)  # fmt: skip
                except OSError as exc:
                    raise ConfigError(f"cannot serve metrics on {self.cfg.metrics_host}:"
                                      f"{self.cfg.metrics_port}: {exc.strerror}") from None  # fmt: skip
                self._http.start()
            for m in self.models.values():
                for i in range(self.cfg.instances):
                    self._launch(m, i)
            while not self.draining and any(not m.settled for m in self.models.values()):
                self._heartbeat = time.monotonic()
                waker = select.poll()  # not select(): descriptors may pass 1,023
                waker.register(self._wake_r, select.POLLIN)
                if waker.poll(500):
                    self._wake()
            self._initial_done = True
            try:
                self.front.bind(self.cfg.bind)
            except zmq.ZMQError as exc:
                raise ConfigError(f"cannot bind {self.cfg.bind}: {exc}") from None
            self.endpoint = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
            self._poller.register(self.front, zmq.POLLIN)
            if self.bulk is not None:
                host = self.endpoint[len("tcp://") :].rpartition(":")[0]
                try:
                    self.bulk.bind(f"tcp://{host}:{self.cfg.sealed_port or 0}")
                except zmq.ZMQError as exc:
                    raise ConfigError(f"cannot bind the sealed port: {exc}") from None
                last = self.bulk.getsockopt_string(zmq.LAST_ENDPOINT)
                self.bulk_port = int(last.rpartition(":")[2])
                self._poller.register(self.bulk, zmq.POLLIN)
            self._poller.register(self._wake_r, zmq.POLLIN)
            if self.endpoint.startswith("tcp://"):
                # a descriptor per connection: the soft limit up to the hard
                # one; a stranger's silent connections bounded per address
                before, after = raise_open_files()
                if after != before:
                    self.log("open_files_raised", level="info", before=before, after=after)
                self._peercap = PeerCap(log=self.log)
                self._peercap.watch(self.front, "front")
                if self.bulk is not None:
                    self._peercap.watch(self.bulk, "sealed")
                self._peercap.start()
            if self.cfg.oip is not None:
                from .oip import OipServer

                self._oip = OipServer(self, self.cfg.oip)
                try:
                    self._oip.start()
                except BaseException:
                    self._oip = None
                    raise
        except BaseException:
            self.close()
            raise
        if self.repo is not None and self.cfg.poll_interval:
            self._next_poll = time.monotonic() + self.cfg.poll_interval
        states = [m.state for m in self.models.values()]
        self._publish()
        self.log("service_ready", level="info" if READY in states or not states else "error",
                 endpoint=self.endpoint, models=len(states), models_ready=states.count(READY),
                 models_unavailable=len(states) - states.count(READY),
                 instances=self.cfg.instances, max_batch=self.cfg.max_batch,
                 metrics_port=self.metrics_port, http_port=self.http_port,
                 grpc_port=self.grpc_port)  # fmt: skip
        return {
            "endpoint": self.endpoint,
            "http_port": self.http_port,
            "grpc_port": self.grpc_port,
            "server_key": self.cfg.curve[0].decode() if self.cfg.curve else None,
            "models": {k: self._describe(m) for k, m in self.models.items()},
            "metrics_port": self.metrics_port,
            "sealed_port": self.bulk_port,
        }

    @property
    def metrics_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    @property
    def http_port(self) -> int | None:
        """The Open Inference Protocol's REST port, once started."""
        return self._oip.http_port if self._oip is not None else None

    @property
    def grpc_port(self) -> int | None:
        """The Open Inference Protocol's gRPC port, once started."""
        return self._oip.grpc_port if self._oip is not None else None

    def _describe(self, m: _Model) -> dict[str, Any]:
        out = {"state": m.state, "instances": len(m.instances), "batching": m.batchable,
               "batching_reason": m.batching_why,
               "provider": (m.info or {}).get("provider")}  # fmt: skip
        if m.reason is not None and not m.instances:
            out["reason"] = {"code": m.reason[0], "message": m.reason[1]}
        return out

    def _attach(self, m: _Model, inst: Instance) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.sndhwm = sock.rcvhwm = 0
        sock.maxmsgsize = -1
        sock.connect(inst.endpoint)
        inst.sock = sock
        self._poller.register(sock, zmq.POLLIN)
        self._by_sock[sock] = inst
        if inst.pidfd is not None:
            self._poller.register(inst.pidfd, zmq.POLLIN)
            self._by_pidfd[inst.pidfd] = inst
        m.instances.append(inst)
        if m.info is None:
            m.info = inst.info
            m.batchable, m.batching_why = batching.decide(inst.info, max_batch=self.cfg.max_batch)
            self.log("model_batching", model=m.model_id, batching=m.batchable,
                     reason=m.batching_why)  # fmt: skip
        self._gauge(m)
        self.log("worker_ready", model=m.model_id, index=inst.index, pid=inst.pid)

    def _gauge(self, m: _Model) -> None:
        self.metrics.instances.labels(m.model_id, "ready").set(len(m.instances))
        self.metrics.instances.labels(m.model_id, "starting").set(len(m.starting))
        if self.models.get(m.model_id) is m:
            self.metrics.model_ready.labels(m.model_id).set(1 if m.instances else 0)
        self._publish()

    def _publish(self) -> None:
        """The models' states as the probes see them (one reference swap, so a
        reader on another thread sees one whole picture)."""
        self._status = {k: (m.state, m.reason if not m.instances else None)
                        for k, m in self.models.items() if not m.removing}  # fmt: skip

    # -- the data plane's health, as Triton and KServe define it ----------------------

    def live(self) -> bool:
        """The service is up and its loop turns (``/v2/health/live``)."""
        return not self._stopped and time.monotonic() - self._heartbeat < 10.0

    healthy = live  # /healthz

    def ready(self) -> bool:
        """The service takes calls (``/v2/health/ready``, ``/readyz``): the
        initial load has finished (every model found at start is ready or has
        failed once), at least one model is ready, and it is not draining.
        Whatever some models did: one that cannot load is unavailable on its
        own (:meth:`model_ready`) and never takes the others out of a load
        balancer (OpenVINO Model Server's rule, plus "something to serve")."""
        return (
            self.live()
            and self._initial_done
            and not self.draining
            and any(state == READY for state, _ in self._status.values())
        )

    def model_ready(self, model: str, version: str | None = None) -> bool:
        """Model ``model`` takes calls here (``/v2/models/{model}/ready``): it
        is served, one of its workers is ready, and the service is not
        draining. Each model has one version, ``"1"`` (the package the
        repository holds now); any other ``version`` is not ready."""
        if version not in (None, "", VERSION):
            return False
        st = self._status.get(model)
        return st is not None and st[0] == READY and not self.draining and self.live()

    def model_state(self, model: str) -> tuple[str, tuple[str, str] | None] | None:
        """``(READY | LOADING | UNAVAILABLE, (code, message) or None)``, or
        None for a model this service does not serve."""
        return self._status.get(model)

    def models_status(self) -> list[dict[str, Any]]:
        """Every model with its version, state and (when not ready) reason:
        the repository index of Triton's model-repository extension."""
        out = []
        for name, (state, why) in sorted(self._status.items()):
            row: dict[str, Any] = {"name": name, "version": VERSION, "state": state}
            if why is not None:
                row["reason"] = f"{why[0]}: {why[1]}"
            out.append(row)
        return out

    def model_signature(self, model: str) -> dict[str, Any] | None:
        """``{"inputs", "outputs"}`` of a model served here, from its worker
        once one has started, else from the package's public manifest (known
        even while the model cannot load: no key needed); None for a model
        this service does not serve. The doors turn it into the protocol's
        model metadata."""
        m = self.models.get(model)
        if m is None or m.removing:
            return None
        return m.signature()

    def door_error(self, door: str, code: str) -> None:
        """An error answer a door sent (thread-safe): ``vault_door_errors``."""
        self.metrics.door_errors.labels(door, code).inc()

    def model_info(self, model: str) -> dict[str, Any] | None:
        """The public signature of a served model (thread-safe), or None."""
        m = self.models.get(model)
        if m is None or m.removing or m.info is None:
            return None
        return dict(m.info)

    def model_ids(self) -> list[str]:
        return sorted(k for k, m in list(self.models.items()) if not m.removing)

    # -- control from other threads ------------------------------------------------------

    def _post(self, *event: Any) -> bool:
        with self._wake_lock:  # never write to the fd number after close() reused it
            closed = self._wake_w < 0
            if not closed:
                self._events.put(event)
                try:
                    os.write(self._wake_w, b"\0")
                except BlockingIOError:  # the pipe is full: the loop is awake anyway
                    pass
        if closed and event[0] == "started":  # finished starting after the service stopped
            event[3].stop()
        return not closed

    def submit(self, call: EdgeCall) -> None:
        """Post a call from another door into the loop (thread-safe). It is
        always answered through ``call.reply``, also when the service has
        stopped (``ServiceUnavailableError``)."""
        if self._edge_closed or not self._post("edge", call):
            call.reply(error_reply(None, ServiceUnavailableError("the service has stopped")), ())

    def _decided(self, key: str, model_id: str) -> None:
        self._post("decided", key, model_id)

    def request_stop(self) -> None:
        """Start a drain (thread-safe; what SIGTERM does)."""
        self._post("drain")

    def request_rescan(self) -> None:
        """Rescan the repository (thread-safe; what SIGHUP does)."""
        self._post("rescan")

    # -- the loop ----------------------------------------------------------------------

    def catch_signals(self) -> None:
        """From now on SIGTERM/SIGINT start a drain and SIGHUP a rescan, even
        before :meth:`run` (main thread only; undone by :meth:`close`). Call it
        before printing a ready line: a signal that arrives between the line and
        the loop then still drains instead of killing the process."""
        if self._signals_caught or threading.current_thread() is not threading.main_thread():
            return
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, _wake_only)
        self._signals_caught = True

    def _release_signals(self) -> None:
        if not self._signals_caught:
            return
        self._signals_caught = False
        signal.set_wakeup_fd(self._old_wakeup if self._old_wakeup is not None else -1)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def run(self) -> int:
        """Serve until a drain completes; returns the exit code (0)."""
        self.catch_signals()
        try:
            self._loop()
        finally:
            self.close()
        return 0

    def _loop(self) -> None:
        next_house = 0.0
        while True:
            now = time.monotonic()
            self._heartbeat = now
            timeout = self._poll_timeout(now)
            events = dict(self._poller.poll(timeout))
            for key in events:
                if key == self._wake_r:
                    self._wake()
                elif key is self.front:
                    self._from_callers()
                elif key is self.bulk:
                    self._from_sealed()
                elif isinstance(key, int):
                    inst = self._by_pidfd.get(key)
                    if inst is not None:
                        self._crashed(inst)
                else:
                    inst = self._by_sock.get(key)
                    if inst is not None:
                        self._from_worker(inst)
            now = time.monotonic()
            if now >= next_house:
                next_house = now + _HOUSEKEEPING_S
                self._housekeeping(now)
            for m in self._all_models():
                self._pump(m, now)
            if self.draining and (not self._pending() or now >= self._drain_deadline):
                self._finish_drain()
                return

    def _poll_timeout(self, now: float) -> int:
        t = _HOUSEKEEPING_S
        for m in self.models.values():
            if m.batch_timer is not None:
                t = min(t, max(0.0, m.batch_timer - now))
        return max(0, int(t * 1000))

    def _all_models(self) -> list[_Model]:
        return [*self.models.values(), *self.retiring]

    def _pending(self) -> bool:
        return (
            bool(self.dispatches) or bool(self._parked) or any(m.queue for m in self._all_models())
        )

    def _wake(self) -> None:
        try:
            data = os.read(self._wake_r, 4096)
        except BlockingIOError:
            data = b""
        for b in data:
            if b in (signal.SIGTERM, signal.SIGINT):
                self._start_drain("signal")
            elif b == signal.SIGHUP:
                self._rescan()
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                break
            self._event(ev)

    def _event(self, ev: tuple[Any, ...]) -> None:
        kind = ev[0]
        m: _Model
        if kind == "drain":
            self._start_drain("request")
        elif kind == "rescan":
            self._rescan()
        elif kind == "decided":
            self._unpark(ev[1], ev[2])
        elif kind == "edge":
            self._edge(ev[1])
        elif kind == "started":
            _, m, index, inst = ev
            m.starting.discard(index)
            if self.draining or m.removing or self.models.get(m.model_id) is not m:
                threading.Thread(target=inst.stop, daemon=True).start()
            else:
                self._attach(m, inst)
                if m.attempts:  # it was logged unavailable: say that it serves now
                    self.log("model_ready", model=m.model_id, attempts=m.attempts + 1)
                m.reason, m.retry_at, m.attempts = None, None, 0
                m.settled = True
                self._fill(m)
            self._gauge(m)
        elif kind == "start_failed":
            _, m, index, exc = ev
            m.starting.discard(index)
            if not self.draining and not m.removing:
                self._start_failed(m, index, exc)
            self._gauge(m)

    def _start_failed(self, m: _Model, index: int, exc: BaseException) -> None:
        code, message = reason(exc)
        if m.instances:
            # the model serves; one more worker of it failed to start: that slot
            # is retried on its own
            self.log("worker_failed", level="error", model=m.model_id, index=index, code=code,
                     message=message)  # fmt: skip
            delay = m.backoff.setdefault(index, Backoff()).next_delay(0.0)
            m.restart_at[index] = time.monotonic() + max(delay, 0.5)
            return
        m.reason = (code, message)
        if m.starting:
            return  # the other workers of this attempt report too: one line per attempt
        m.settled = True
        m.restart_at.clear()  # the model-level retry starts one worker, then the rest
        m.attempts += 1
        delay = min(_LOAD_RETRY_CAP_S, _LOAD_RETRY_FIRST_S * 2 ** (m.attempts - 1))
        m.retry_at = time.monotonic() + delay
        self.log("model_unavailable", level="error", model=m.model_id, code=code, message=message,
                 attempt=m.attempts, retry_in_s=round(delay, 3))  # fmt: skip
        for c in m.queue:  # nobody can answer them here now
            self._fail(c, ServiceUnavailableError(
                f"model {m.model_id!r} is not available on this service"))  # fmt: skip
        m.queue.clear()

    def _fill(self, m: _Model) -> None:
        """Start the workers a model lacks (after its first one is ready)."""
        running = {i.index for i in m.instances} | m.starting | set(m.restart_at)
        for i in range(self.cfg.instances):
            if i not in running:
                self._launch(m, i)

    def _launch(self, m: _Model, index: int) -> None:
        m.starting.add(index)
        spec = self.cfg.launch

        def run() -> None:
            try:
                inst = start_instance(spec, m.path, model_id=m.model_id, index=index)
            except BaseException as exc:
                self._post("start_failed", m, index, exc)
                return
            self._post("started", m, index, inst)

        threading.Thread(target=run, name=f"vault-start-{m.model_id}-{index}", daemon=True).start()
        self._gauge(m)

    # -- callers ----------------------------------------------------------------------

    def _from_callers(self) -> None:
        front = self.front
        for _ in range(1024):  # EVENTS, not NOBLOCK + Again: no exception per wake-up
            if not _readable(front):
                return
            self._request(front.recv_multipart(copy=False))

    def _from_sealed(self) -> None:
        """Sealed calls from the second socket: opened, then served as any call,
        admitted as the CURVE key that made their session; answered sealed."""
        bulk = self.bulk
        assert bulk is not None and self.sessions is not None
        for _ in range(1024):
            if bulk.closed or not _readable(bulk):
                return
            msg = bulk.recv_multipart(copy=False)
            sess = self.sessions.get(session_id(msg[1].bytes)) if len(msg) > 1 else None
            if sess is None:
                err = plain_error(ProtocolError("unknown sealed session"), unknown_session=True)
                bulk.send_multipart([msg[0], *err])
                continue
            try:
                if connection_session(msg[1]) != sess.sid:  # a connection carries its own only
                    raise IntegrityError(
                        "a sealed message of another session than its connection's"
                    )
                frames = sess.opener.open(msg[1:])
            except IntegrityError as exc:  # refused before anything of it is used
                bulk.send_multipart([msg[0], *plain_error(exc)])
                continue
            self._request([_SealedRoute(msg[0], sess), *frames], caller_key=sess.client_key)

    def _reply(self, ident: Any, header: dict[str, Any], frames: Sequence[Any] = ()) -> None:
        self._last_answer = time.monotonic()
        if isinstance(ident, EdgeCall):
            try:
                ident.reply(header, frames)
            except Exception as exc:  # a door's callback must never stop the loop
                self.log("edge_reply_failed", level="error", error=type(exc).__name__)
            return
        try:
            if isinstance(ident, _SealedRoute):
                assert self.bulk is not None
                sealed_msg = ident.session.sealer.seal([pack_header(header), *frames])
                self.bulk.send_multipart([ident.ident, *sealed_msg], copy=False)
            else:
                self.front.send_multipart([ident, pack_header(header), *frames], copy=False)
        except zmq.ZMQError:  # the caller is gone
            pass

    def _session(self, ident: Any, rid: Any, header: dict[str, Any], frame: Any) -> None:
        """``{"op": "session"}`` on the CURVE front: a sealed session for the
        caller's authenticated key (the frame carries it)."""
        key = _user_id(frame)
        if self.sessions is None or self.bulk_port is None or key is None:
            raise ProtocolError("unknown op 'session': this service offers no sealed calls")
        fields = self.sessions.create(key, header.get("rand"), prev=header.get("prev"),
                                      prev_seq=header.get("prev_seq"))  # fmt: skip
        self._reply(ident, ok_reply(rid, **fields, port=self.bulk_port))

    def _request(self, msg: list[Any], *, caller_key: str | None = None) -> None:
        ident = msg[0]
        rid: Any = None
        try:
            if len(msg) < 2:
                raise ProtocolError("empty request")
            header = unpack_header(msg[1])
            rid = header.get("id")
            if not isinstance(rid, (int, str)) or isinstance(rid, bool):
                rid = None
            op = header.get("op")
            if op == "session" and not isinstance(ident, _SealedRoute) and len(msg) == 2:
                self._session(ident, rid, header, msg[1])
                return
            m = self._model_for(header.get("model"))
            if op == "compute":
                key = caller_key if isinstance(ident, _SealedRoute) else _user_id(msg[1])
                self._admit_compute(ident, rid, header, msg[2:], m, key)
                return
            if len(msg) != 2:
                raise ProtocolError(f"op {op!r} takes no tensor frames")
            if op == "stats":
                # how a model is used (its callers' calls and latencies) is for
                # the callers it serves; its signature and health are public
                # (the Open Inference Protocol's metadata and readiness, no token)
                key = caller_key if isinstance(ident, _SealedRoute) else _user_id(msg[1])
                self.cfg.policy.sees(key, m.model_id)
            if op == "info":
                assert m.info is not None
                self._reply(ident, ok_reply(rid, **m.info))
            elif op == "health":
                self._reply(ident, ok_reply(rid, **self._health(m)))
            elif op == "stats":
                self._reply(ident, ok_reply(rid, **self._stats(m, key)))
            else:
                raise ProtocolError(f"unknown op {op!r}; ops are compute, info, health, stats")
        except VaultError as exc:
            self._reply(ident, error_reply(rid, exc))

    def _edge(self, call: EdgeCall) -> None:
        """A call from the REST or gRPC door: the same admission, queue and
        answer as :meth:`_request`'s ``compute`` (``ident`` is the call itself)."""
        if call.vet:
            self._vet(call)
            return
        try:
            if not isinstance(call.model, str) or not call.model:
                raise UnknownModelError("name a model")
            header: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": "compute", "id": 0,
                                      "tensors": call.tensors}  # fmt: skip
            if call.outputs is not None:
                header["outputs"] = call.outputs
            if call.timeout is not None:
                header["timeout"] = call.timeout
            m = self._model_for(call.model)
            self._admit_compute(call, None, header, call.frames, m, None, token=call.token)
        except VaultError as exc:
            self._reply(call, error_reply(None, exc))

    def _vet(self, call: EdgeCall, arrived: float | None = None) -> None:
        """A door's question before it reads a request: is the token genuine
        and its licence in force (and the model, when named, served here)?
        Parked, as a call is, while the licence's probe is fetched."""
        now = time.monotonic()
        try:
            if call.token is None:
                raise TokenError()
            self._vet_checks(call.token, call.model, fetch=True, address=call.address)
        except AdmissionPending:
            assert call.token is not None
            start = now if arrived is None else arrived
            timeout = min(self.cfg.request_timeout, call.timeout or self.cfg.request_timeout)
            parked = (call, None, None, None, None, None, start, start + timeout, call.token)
            self._parked.setdefault((call.token.licence_key, VET), []).append(parked)
            return
        except VaultError as exc:
            self._reply(call, error_reply(None, exc))
            return
        self._reply(call, ok_reply(None))

    def _vet_checks(self, token: Token, model: str | None, *, fetch: bool,
                    address: str | None = None) -> None:  # fmt: skip
        """What vetting asks, from any thread: the service not draining, the
        model (when named) served and available, the token genuine and its
        licence in force (CallPolicy.vet, which locks what it reads)."""
        try:
            if self.draining:
                raise ServiceUnavailableError("the service is draining; use another endpoint")
            if model is not None:
                self._model_for(model)
            self.cfg.policy.vet(token, model, fetch=fetch, address=address)
        except VaultError as exc:
            # counted as the ZeroMQ front's refusals are (a door's request refused
            # before it was read was in no metric: a revoked caller's refusals
            # showed nowhere); labelled by a model served here only
            served = model if isinstance(model, str) and model in self.models else "-"
            self.metrics.answered(served, "refused", exc.code)
            raise

    def vet_now(self, token: Token, model: str | None) -> bool:
        """A door's vetting without a trip through the loop (thread-safe):
        True when the token holds on what the policy knows fresh now (the
        licence's decision or probe, within their ages: a revocation is seen
        exactly as soon as by the loop), a typed error to refuse, False when
        nothing fresh is at hand and the door must post ``EdgeCall(vet=True)``,
        which fetches and parks. Nothing is admitted, counted or cached."""
        try:
            self._vet_checks(token, model, fetch=False)
        except AdmissionPending:
            return False
        return True

    def _model_for(self, name: Any) -> _Model:
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise UnknownModelError(
                f"this service serves {len(self.models)} models: name one (model=...)"
            )
        m = self.models.get(name) if isinstance(name, str) else None
        if m is None or m.removing:
            raise UnknownModelError(f"no model {shown(name)} is served here")
        if m.info is None or (not m.instances and m.reason is not None):
            # the caller learns that it cannot run here now, not why (the reason
            # is the vendor's business: its log and /v2/models/{m}/ready)
            raise ServiceUnavailableError(
                f"model {shown(name)} is not available on this service now (loading, or it could "
                "not load); try again later or another replica"
            )
        return m

    def _admit_compute(
        self, ident: Any, rid: Any, header: dict[str, Any], frames: list[Any], m: _Model,
        caller_key: str | None, arrived: float | None = None, token: Token | None = None,
    ) -> None:  # fmt: skip
        now = time.monotonic()
        if self.draining:
            raise ServiceUnavailableError("the service is draining; use another endpoint")
        if header.get("shm") is not None:
            raise ProtocolError("a service takes tensors as frames, not shared memory")
        timeout = self.cfg.request_timeout
        asked = header.get("timeout")
        if isinstance(asked, (int, float)) and not isinstance(asked, bool) and asked > 0:
            timeout = min(timeout, float(asked))
        deadline = now + timeout if arrived is None else arrived + timeout
        try:
            admission = self.cfg.policy.admit(caller_key, m.model_id, token)
        except AdmissionPending:
            # the caller's licence decision is being fetched: park the call
            parked = (ident, rid, header, frames, m.model_id, caller_key,
                      now if arrived is None else arrived, deadline, token)  # fmt: skip
            key = token.licence_key if token is not None else caller_key
            self._parked.setdefault((key or "", m.model_id), []).append(parked)
            return
        except VaultError as exc:
            self.metrics.answered(m.model_id, "refused", exc.code)
            raise
        call = _Call(ident, rid, m.model_id, admission, header, frames,
                     now if arrived is None else arrived, deadline)  # fmt: skip
        if self.cfg.max_batch > 1 and m.batchable:
            try:
                call.feeds = decode_tensors(header.get("tensors"), frames)
            except ProtocolError:
                call.feeds = None  # the worker answers it with the exact error
            if call.feeds:
                call.rows = batching.rows_of(call.feeds)
                if call.rows is not None:
                    call.key = batching.compat_key(call.feeds, header.get("outputs"))
            if call.rows is None:
                call.feeds = None
        m.queue.append(call)
        self.metrics.per_model(m.model_id)[3].inc()

    def _unpark(self, key: str, model_id: str) -> None:
        for parked in self._parked.pop((key, model_id), []):
            ident, rid, header, frames, mid, caller_key, arrived, deadline, token = parked
            try:
                if time.monotonic() >= deadline:
                    raise WorkerTimeoutError(_NO_DECISION_IN_TIME)
                if header is None:  # a door's vetting
                    self._vet(ident, arrived)
                    continue
                m = self._model_for(mid)
                self._admit_compute(ident, rid, header, frames, m, caller_key, arrived, token)
            except VaultError as exc:
                self._reply(ident, error_reply(rid, exc))

    def _expire_parked(self, now: float, *, all_of_them: bool = False) -> None:
        for pair, calls in list(self._parked.items()):
            keep = []
            for item in calls:
                if all_of_them or now >= item[7]:
                    err: VaultError = (
                        ServiceUnavailableError("the service stopped before this call ran")
                        if all_of_them
                        else WorkerTimeoutError(_NO_DECISION_IN_TIME)
                    )
                    self._reply(item[0], error_reply(item[1], err))
                else:
                    keep.append(item)
            if keep:
                self._parked[pair] = keep
            else:
                del self._parked[pair]

    # -- dispatch -----------------------------------------------------------------------

    def _pick(self, m: _Model) -> Instance | None:
        best: Instance | None = None
        for inst in m.instances:
            if (
                not inst.lease_ended
                and not inst.stuck
                and not inst.ending
                and inst.inflight < self.cfg.instance_inflight
                and (best is None or inst.inflight < best.inflight)
            ):
                best = inst
        return best

    def _pump(self, m: _Model, now: float) -> None:
        while m.queue:
            head = m.queue[0]
            if head.done:
                m.queue.popleft()
                continue
            if head.deadline <= now:  # never send a call its caller gave up on
                m.queue.popleft()
                self._fail(head, WorkerTimeoutError("no worker answered this call in time"))
                continue
            inst = self._pick(m)
            if inst is None:
                return
            if head.feeds is None or head.solo or self.cfg.max_batch <= 1:
                m.queue.popleft()
                self._send(m, inst, [head], joined=False, now=now)
                continue
            batch = [head]
            rows = head.rows or 0
            for c in itertools.islice(m.queue, 1, _MAX_SCAN):
                if rows >= self.cfg.max_batch:
                    break
                if (not c.done and not c.solo and c.feeds is not None and c.key == head.key
                        and c.deadline > now
                        and rows + (c.rows or 0) <= self.cfg.max_batch):  # fmt: skip
                    batch.append(c)
                    rows += c.rows or 0
            delay = self.cfg.max_queue_delay_us / 1e6
            if rows < self.cfg.max_batch and delay > 0 and now < head.arrived + delay:
                m.batch_timer = head.arrived + delay
                return
            m.batch_timer = None
            taken = set(map(id, batch))
            m.queue = deque(c for c in m.queue if id(c) not in taken)
            self._send(m, inst, batch, joined=len(batch) > 1, now=now)

    def _send(self, m: _Model, inst: Instance, calls: list[_Call], *, joined: bool,
              now: float) -> None:  # fmt: skip
        did = next(self._ids)
        if joined:
            feeds = batching.join([c.feeds for c in calls if c.feeds is not None])
            descs, frames = encode_tensors(feeds)
            hdr: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": "compute", "id": did,
                                   "tensors": descs}  # fmt: skip
            outputs = calls[0].header.get("outputs")
            if outputs is not None:
                hdr["outputs"] = outputs
        else:
            c = calls[0]
            hdr = {k: v for k, v in c.header.items() if k not in ("model", "timeout")}
            hdr["id"] = did
            frames = c.frames
        assert inst.sock is not None
        inst.sock.send_multipart([pack_header(hdr), *frames], copy=False)
        inst.inflight += 1
        rows = sum(c.rows or _header_rows(c.header) for c in calls)
        queue_h = self.metrics.per_model(m.model_id)[0]
        for c in calls:
            queue_h.observe(now - c.arrived)
        stuck = max(c.deadline for c in calls) + self.cfg.request_timeout
        self.dispatches[did] = _Dispatch(did, inst, calls, now, joined, stuck, rows)
        if joined:
            m.batches += 1
            mine = Counter(c.admission.caller_key or "" for c in calls)
            for key, n in mine.items():
                if n > 1:  # a caller's stats count the worker calls its own calls shared
                    m.caller(key).batches += 1

    # -- workers ------------------------------------------------------------------------

    def _from_worker(self, inst: Instance) -> None:
        assert inst.sock is not None
        sock = inst.sock
        for _ in range(1024):
            if sock.closed or not _readable(sock):
                return
            frames = sock.recv_multipart(copy=False)
            try:
                hdr = unpack_header(frames[0])
            except VaultError:
                continue  # not from our worker's protocol: nothing to match it to
            d = self.dispatches.pop(hdr.get("id"), None)  # type: ignore[arg-type]
            if d is None or d.inst is not inst:
                continue  # a late answer to a call already abandoned
            inst.inflight -= 1
            now = time.monotonic()
            m = self._model_of(inst)
            code = None if hdr.get("ok") else (hdr.get("error") or {}).get("code")
            self._settle(d, ran=bool(hdr.get("ok")))
            if code in _LEASE_ENDED and m is not None:
                self._lease_ended(inst, m, d, hdr)
                continue
            if m is not None:
                per = self.metrics.per_model(m.model_id)
                per[1].observe(now - d.sent)
                if hdr.get("ok"):  # rows a worker computed; a refused call computed none
                    per[2].observe(d.rows)
            self._answered(d, hdr, frames[1:], m)

    def _lease_ended(self, inst: Instance, m: _Model, d: _Dispatch, hdr: dict[str, Any]) -> None:
        """A worker refused a call because its own key lease ended (the key
        server was away past the lease, or the service's licence ended): it
        has dropped its key and will never serve again. Before, it stayed,
        refusing every call until the service was restarted, while readiness
        said ready. It is sent nothing more and exits by itself (killed if it
        has not after a few seconds), so the crash path restarts it (with its
        backoff; a worker that cannot get its key leaves the model
        unavailable, with the reason, and is retried); the calls it refused
        or still held, which it never ran, go back to the queue once."""
        for c in reversed(d.calls):
            if c.done:
                continue
            if c.lease_retried:
                self._finish(c, {**hdr, "id": c.rid}, [])
            else:
                c.lease_retried = True
                m.queue.appendleft(c)
        if inst.alive() and not inst.lease_ended:
            inst.lease_ended = True  # sent nothing more; it exits by itself (status 75)
            self.log("worker_lease_ended", level="error", model=m.model_id, index=inst.index,
                     pid=inst.pid, code=(hdr.get("error") or {}).get("code"))  # fmt: skip
            inst.kill_after(_LEASE_EXIT_GRACE_S)  # one that does not

    def _answered(self, d: _Dispatch, hdr: dict[str, Any], frames: list[Any],
                  m: _Model | None) -> None:  # fmt: skip
        if not d.joined:
            c = d.calls[0]
            hdr["id"] = c.rid
            self._finish(c, hdr, frames)
            return
        code = (hdr.get("error") or {}).get("code") if not hdr.get("ok") else "ok"
        parts = None
        if code == "ok":
            try:
                parts = batching.split(decode_tensors(hdr.get("tensors"), frames),
                                       [c.rows or 0 for c in d.calls])  # fmt: skip
            except VaultError:
                parts = None
        if parts is None and code in ("ok", "compute", "bad_input") and m is not None:
            # the batch did not split back, or one caller's rows failed it: each
            # call runs alone, so nobody gets an error that another caller caused
            for c in reversed(d.calls):
                if not c.done:
                    c.solo = True
                    m.queue.appendleft(c)
            return
        for i, c in enumerate(d.calls):
            if parts is None and code == "ok":
                self._fail(c, WorkerCrashedError("the batch's answer was lost"))
            elif parts is None:
                self._finish(c, {**hdr, "id": c.rid}, [])
            else:
                descs, out = encode_tensors(parts[i])
                self._finish(c, ok_reply(c.rid, tensors=descs), out)

    def _finish(self, c: _Call, hdr: dict[str, Any], frames: Sequence[Any] = ()) -> None:
        """Answer one caller (once) and account for it (a call answered ok
        counts against its licence; one answered while its worker still runs
        it is counted when the worker is done, :meth:`_settle`)."""
        if c.done:
            return
        c.done = True
        # Accounted before the answer goes: a caller that has its answer and
        # then reads /metrics or its stats finds the call there.
        code = "ok" if hdr.get("ok") else str((hdr.get("error") or {}).get("code", "error"))
        dt = time.monotonic() - c.arrived
        self.metrics.answered(c.model, c.admission.licence, code)
        self.metrics.per_model(c.model)[3].dec()
        if not c.unsettled:
            self.cfg.policy.record(c.admission, ok=code == "ok")
        m = self.models.get(c.model)
        if m is not None:
            m.calls += 1
            m.errors += code != "ok"
            m.latencies.append(dt)
            cs = m.caller(c.admission.caller_key)
            cs.calls += 1
            cs.errors += code != "ok"
            cs.latencies.append(dt)
        self._reply(c.ident, hdr, frames)
        self.log("call", level="debug" if code == "ok" else "info", model=c.model,
                 licence=c.admission.licence, code=code, ms=round(dt * 1e3, 3))  # fmt: skip

    def _fail(self, c: _Call, exc: VaultError) -> None:
        self._finish(c, error_reply(c.rid, exc), ())

    def _settle(self, d: _Dispatch, ran: bool) -> None:
        """A dispatch is over (its worker answered, or died): the calls in it
        that were answered a timeout meanwhile count if the worker ran them
        (answered ok), and not if it did not (an error, a crash, a kill).
        Before, such a call was never counted: 15 s of compute sent with a
        0.3 s timeout was answered at once and free, 41 times in 45 s."""
        unsettled = [c for c in d.calls if c.unsettled]
        if not unsettled:  # every answer passes here: nothing more to do for most
            return
        # a joined batch's time is all its callers' rows: one caller's rows may
        # be what made another's call time out, so none of them counts (a
        # victim's row, joined with an attacker's 31 and killed as stuck, was
        # billed as the oldest call), unless they are all one licence's
        ran = ran and (not d.joined or len({c.admission.licence for c in d.calls}) == 1)
        for c in unsettled:
            c.unsettled = False
            self.cfg.policy.record(c.admission, ok=ran)

    def _model_of(self, inst: Instance) -> _Model | None:
        for m in self._all_models():
            if inst in m.instances:
                return m
        return None

    def _crashed(self, inst: Instance) -> None:
        if inst.sock is not None:
            self._from_worker(inst)  # answers it sent before it died still count
        m = self._model_of(inst)
        self._detach(inst)
        lived = time.monotonic() - inst.started
        rc = inst.proc.poll()
        lost = [d for d in self.dispatches.values() if d.inst is inst]
        now = time.monotonic()
        for d in lost:
            del self.dispatches[d.did]
            # never completed; but a call on a worker the service ended as stuck
            # that ran a full timeout past its own deadline counts, or each
            # over-long call would be free (each such kill answered its call a
            # timeout, and billed nothing, 64 times in 90 s); a worker runs two
            # side by side, so each is judged by its own time, not by order
            self._settle(d, ran=inst.ending and now >= d.stuck_at)
            for c in d.calls:
                if inst.lease_ended and m is not None and not c.done and not c.lease_retried:
                    # it exited because its lease ended, refusing what it had: never
                    # run, so sent again once, as the calls it refused were
                    c.lease_retried = True
                    m.queue.appendleft(c)
                    continue
                self._fail(c, WorkerCrashedError(
                    "the worker running this call died; the call was not completed"))  # fmt: skip
        threading.Thread(target=inst.stop, daemon=True).start()
        if m is None:
            return
        self.log("worker_died", level="error", model=m.model_id, index=inst.index, pid=inst.pid,
                 status=rc, calls_failed=sum(len(d.calls) for d in lost))  # fmt: skip
        # a replacement serves or starts in its place, or a failed one's retry is
        # due (with its backoff): nothing more to start
        held = (
            inst.index in m.starting
            or inst.index in m.restart_at
            or any(o.index == inst.index and not o.replaced for o in m.instances)
        )
        if not self.draining and not m.removing and not held:
            self.metrics.restarts.labels(m.model_id).inc()
            # a worker killed as stuck was sound: restarted at once, its backoff
            # left as it was (one caller's over-long calls, one a restart, held
            # the model's only worker down 0.5, 1, 2 ... 16 s a time)
            delay = 0.0 if inst.ending else \
                m.backoff.setdefault(inst.index, Backoff()).next_delay(lived)  # fmt: skip
            m.restart_at[inst.index] = time.monotonic() + delay
        self._gauge(m)

    def _replace(self, inst: Instance) -> None:
        """Start a worker in the place of one found stuck (``replace_stuck``):
        the stuck one is sent nothing more, finishes the calls still waited
        for on it, and is ended once none is left and its replacement serves
        (housekeeping). Before, its model served nobody on that slot until it
        went: another caller's call on it kept it up to a full timeout, and
        its restart came after."""
        m = self._model_of(inst)
        if m is None or inst.replaced or not self.cfg.replace_stuck or self.draining \
                or m.removing or inst.index in m.starting:  # fmt: skip
            return
        inst.replaced = True
        self.metrics.restarts.labels(m.model_id).inc()
        self.log("worker_replacing", level="warning", model=m.model_id, index=inst.index,
                 pid=inst.pid)  # fmt: skip
        self._launch(m, inst.index)

    @staticmethod
    def _successor(m: _Model, inst: Instance) -> bool:
        """Whether a replacement of ``inst`` serves its slot now."""
        return any(
            o is not inst and o.index == inst.index and o.alive()
            and not (o.replaced or o.stuck or o.ending or o.lease_ended)
            for o in m.instances
        )  # fmt: skip

    def _detach(self, inst: Instance) -> None:
        if inst.sock is not None:
            self._poller.unregister(inst.sock)
            self._by_sock.pop(inst.sock, None)
            inst.sock.close(linger=0)
            inst.sock = None
        if inst.pidfd is not None and inst.pidfd in self._by_pidfd:
            self._poller.unregister(inst.pidfd)
            del self._by_pidfd[inst.pidfd]
        for m in self._all_models():
            if inst in m.instances:
                m.instances.remove(inst)

    # -- time ------------------------------------------------------------------------------

    def _housekeeping(self, now: float) -> None:
        if self._parked:
            self._expire_parked(now)
        for m in self._all_models():
            if m.queue and any(c.deadline <= now or c.done for c in m.queue):
                keep: deque[_Call] = deque()
                for c in m.queue:
                    if c.done:
                        continue
                    if c.deadline <= now:
                        self._fail(c, WorkerTimeoutError("no worker answered this call in time"))
                    else:
                        keep.append(c)
                m.queue = keep
            for index, when in list(m.restart_at.items()):
                if any(o.index == index and not o.replaced for o in m.instances):
                    del m.restart_at[index]  # a worker serves that slot (a stuck one recovered)
                elif now >= when and not self.draining and not m.removing:
                    del m.restart_at[index]
                    self._launch(m, index)
            if m.retry_at is not None and now >= m.retry_at and not self.draining \
                    and not m.removing and not m.starting:  # fmt: skip
                m.retry_at = None
                self._launch(m, 0)  # one worker tries; once it is ready, _fill starts the rest
        pending: dict[Instance, bool] = {}  # a worker's unanswered dispatches: any waited for?
        fresh: set[Instance] = set()  # a dispatch on it not yet a full timeout past its deadline
        for d in list(self.dispatches.values()):
            for c in d.calls:
                if not c.done and c.deadline <= now:
                    # its worker runs it to its end: counted if it does (_settle),
                    # or a caller whose timeout is shorter than its compute would
                    # have the service's workers for free
                    c.unsettled = True
                    self._fail(c, WorkerTimeoutError(
                        "no worker answered this call in time (a worker runs a call to its "
                        "end: one it completes counts as a call; give a longer timeout)"))  # fmt: skip
            pending[d.inst] = pending.get(d.inst, False) or any(not c.done for c in d.calls)
            if now < d.stuck_at:
                fresh.add(d.inst)
            if now >= d.stuck_at and d.inst.alive() and not d.inst.stuck:
                # still busy a full timeout past its call's deadline: sent nothing more
                d.inst.stuck = True
                self.log("worker_stuck", level="error", model=d.inst.model_id, pid=d.inst.pid)
                self._replace(d.inst)
        for m in self._all_models():
            for inst in m.instances:
                if inst.replaced and not inst.stuck and not inst.ending:  # it recovered
                    if self._successor(m, inst):
                        # its place is taken: sent nothing more, and ended once
                        # what it holds is answered (or past its time)
                        inst.stuck = inst.drained = True
                    elif inst.index not in m.starting:
                        # its replacement never came (a failed start, or it went): it
                        # keeps its slot (a retry scheduled for it is dropped by the
                        # restart loop), and may be replaced again
                        inst.replaced = False
                if not inst.stuck:
                    continue
                if inst.ending:
                    continue  # going: the crash path takes it from here
                if inst not in pending:
                    if inst.replaced and self._successor(m, inst):
                        inst.end()  # nothing left on it, and its replacement serves
                    else:  # it answered everything: it serves again (see above)
                        inst.stuck = inst.drained = False
                elif not pending[inst] and inst.alive() and not (inst.drained and inst in fresh):
                    # only abandoned calls left on it (another caller's call on the
                    # same worker is answered first): ended (it reports its usage
                    # first), and the crash path frees its slots and restarts it.
                    # A drained one ends with its abandoned calls answered or run a
                    # full timeout past their deadline (so counted), not before
                    inst.end()
        for m in list(self.retiring):
            if not m.busy(self.dispatches):
                self._retire(m)
        if self.repo is not None and self.cfg.poll_interval and now >= self._next_poll:
            self._next_poll = now + self.cfg.poll_interval
            self._rescan()

    # -- repository ------------------------------------------------------------------------

    def _rescan(self) -> None:
        if self.draining:
            return
        self._reload_licences()
        if self.repo is None:
            return
        found = {model_id: (path, stamp) for model_id, path, stamp in self.repo.scan(self.log)}
        for model_id, m in list(self.models.items()):
            now_at = found.get(model_id)
            if now_at is None or now_at[0] != m.path or now_at[1] != m.stamp:
                del self.models[model_id]
                m.removing = True
                self.retiring.append(m)
                self.log("model_removed", model=model_id)
        for model_id, (path, stamp) in found.items():
            if model_id not in self.models:
                m = _Model(model_id, path, stamp)
                self.models[model_id] = m
                self.log("model_added", model=model_id)
                for i in range(self.cfg.instances):
                    self._launch(m, i)
        self._publish()

    def _reload_licences(self) -> None:
        """Read the service's licence files again; if they changed, every
        model that is unavailable tries again now (an operator who replaced a
        licence does not wait for the backoff)."""
        if self.cfg.reload_licences is None:
            return
        try:
            new = self.cfg.reload_licences()
        except VaultError as exc:
            code, message = reason(exc)
            self.log("licences_not_reloaded", level="error", code=code, message=message)
            return
        old = self.cfg.launch.licence
        if _licence_bytes(new) == _licence_bytes(old):
            return
        self.cfg.launch.licence = new
        self.log("licences_reloaded", licences=len(list(new)) if isinstance(new, list) else 1)
        now = time.monotonic()
        for m in self.models.values():
            if m.retry_at is not None:
                m.retry_at = now

    def _retire(self, m: _Model) -> None:
        self.retiring.remove(m)
        for c in m.queue:
            self._fail(c, UnknownModelError(f"model {m.model_id!r} was removed"))
        for inst in list(m.instances):
            self._detach(inst)
            threading.Thread(target=inst.stop, daemon=True).start()
        m.instances.clear()
        self.metrics.instances.labels(m.model_id, "ready").set(0)
        self.log("model_retired", model=m.model_id)

    # -- drain and close -----------------------------------------------------------------

    def _start_drain(self, why: str) -> None:
        if self.draining:
            return
        self.draining = True
        self._drain_deadline = time.monotonic() + self.cfg.drain_timeout
        n = len(self.dispatches) + sum(len(m.queue) for m in self._all_models())
        self.log("drain_started", reason=why, pending=n, timeout_s=self.cfg.drain_timeout)

    def _finish_drain(self) -> None:
        self._expire_parked(time.monotonic(), all_of_them=True)
        left = 0
        for m in self._all_models():
            for c in m.queue:
                left += not c.done
                self._fail(c, ServiceUnavailableError("the service stopped before this call ran"))
            m.queue.clear()
        for d in list(self.dispatches.values()):
            self._settle(d, ran=False)  # its worker is stopped before it completes
            for c in d.calls:
                left += not c.done
                self._fail(c, ServiceUnavailableError("the service stopped during this call"))
        self.dispatches.clear()
        self.log("drain_finished", unfinished=left)

    def _flush_front(self, stoppers: list[threading.Thread]) -> None:
        """Keep the front open while the workers stop, and for at least
        ``_FLUSH_S`` after the last answer, refusing whatever arrives, then
        close it. libzmq's linger does not hold a CURVE connection open until
        a large answer has left (measured: a 4 MiB reply lost in 1 of 3 closes
        with linger 5 s, none with a 0.5 s wait), so the wait is ours; and a
        request that arrives meanwhile is answered, never left unread."""
        if not self.front.closed:
            until = self._last_answer + _FLUSH_S
            give_up = time.monotonic() + _FLUSH_MAX_S
            while time.monotonic() < give_up and (
                time.monotonic() < until or any(t.is_alive() for t in stoppers)
            ):
                self._refuse_waiting()
                self.front.poll(20)
            self._refuse_waiting()
            self.front.close(linger=_CLOSE_LINGER_MS)
            if self.bulk is not None:
                self.bulk.close(linger=_CLOSE_LINGER_MS)

    def _refuse_waiting(self) -> None:
        if self.bulk is not None and not self.bulk.closed:
            self._from_sealed()  # draining: their computes are refused, sealed
        self._refuse_waiting_front()

    def _refuse_waiting_front(self) -> None:
        """Answer every request already received by the front socket but not
        yet read: a drain that ends must not leave a caller waiting for its
        timeout on a request the service never looked at."""
        front = self.front
        for _ in range(100_000):
            if front.closed or not _readable(front):
                return
            msg = front.recv_multipart(copy=False)
            rid: Any = None
            try:
                rid = unpack_header(msg[1]).get("id") if len(msg) > 1 else None
            except VaultError:
                pass
            if not isinstance(rid, (int, str)) or isinstance(rid, bool):
                rid = None
            self._reply(msg[0], error_reply(rid, ServiceUnavailableError(
                "the service is draining; use another endpoint")))  # fmt: skip

    def close(self) -> None:
        """Stop every worker and close every socket (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._edge_closed = True  # from now on submit() answers at once
        self._events_at_close()  # edge calls posted after the drain: answered
        if self._oip is not None:
            self._oip.stop()
        stoppers = []
        for m in self._all_models():
            for inst in list(m.instances):
                self._detach(inst)
                t = threading.Thread(target=inst.stop, daemon=True)
                t.start()
                stoppers.append(t)
        self._flush_front(stoppers)
        for t in stoppers:
            t.join(10)
        if self._peercap is not None:  # after the watched sockets closed (_flush_front)
            self._peercap.close()
        if self._http is not None:
            self._http.stop()
        self.cfg.policy.close()  # reports usage, gives unused reserves back
        left = self.cfg.policy.pending_reports()
        if left:  # the key server did not answer in time: say what it has not had
            self.log("usage_unreported", level="warning", reports=left,
                     message="the key server did not take the last usage reports; their "
                             "reserves return when the grants lapse, the calls in them "
                             "are not counted")  # fmt: skip
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.ctx.term()
        self._release_signals()
        with self._wake_lock:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_w = -1
        self._events_at_close()
        self.log("service_stopped")

    def _events_at_close(self) -> None:
        while True:  # a worker that became ready while we stopped; a call from a door
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                break
            if ev[0] == "started":
                ev[3].stop()
            elif ev[0] == "edge":
                ev[1].reply(error_reply(None, ServiceUnavailableError("the service stopped")), ())

    # -- ops answered by the service itself ---------------------------------------------------

    def _health(self, m: _Model) -> dict[str, Any]:
        # a remote caller learns liveness and the tier, nothing about the host
        return {"serving": bool(m.instances) and not self.draining, "model_id": m.model_id,
                "tier": 2, "provider": (m.info or {}).get("provider")}  # fmt: skip

    def _stats(self, m: _Model, key: str | None) -> dict[str, Any]:
        """The asking caller's own calls, errors, shared worker calls and
        latencies on ``m`` (its licence's), and the model's instances: how
        others use the model is theirs (bob read alice's call count going up
        by hers); the vendor sees everyone's on /metrics."""
        cs = m.by_caller.get(key or "") or _CallerStats()
        lat = sorted(cs.latencies)

        def q(p: float) -> float | None:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3 if lat else None

        return {"calls": cs.calls, "errors": cs.errors, "batches": cs.batches,
                "instances": len(m.instances),
                "latency_ms": {"p50": q(0.5), "p99": q(0.99), "window": len(lat)}}  # fmt: skip


_MAX_CALLER_STATS = 1024  # callers whose statistics a model keeps (the longest unseen go)


class _CallerStats:
    __slots__ = ("calls", "errors", "batches", "latencies")

    def __init__(self) -> None:
        self.calls = self.errors = self.batches = 0
        self.latencies: deque[float] = deque(maxlen=256)


class _SealedRoute:
    """Where a sealed call's answer goes: the caller's identity on the sealed
    socket and its session (whose key seals the answer)."""

    __slots__ = ("ident", "session")

    def __init__(self, ident: Any, session: ServerSession) -> None:
        self.ident, self.session = ident, session


def _licence_bytes(lics: Any) -> list[bytes]:
    items = lics if isinstance(lics, (list, tuple)) else [lics] if lics is not None else []
    return [lic.dumps() for lic in items]


def _readable(sock: zmq.Socket[Any]) -> bool:
    return bool(int(sock.get(zmq.EVENTS)) & zmq.POLLIN)


def _wake_only(signum: int, frame: Any) -> None:
    """Python-level handler: the wakeup fd already carries the signal number."""
    del signum, frame


def _header_rows(header: dict[str, Any]) -> int:
    """Rows of a call not decoded here: dim 0 of its first tensor (1 if none)."""
    try:
        d0 = header["tensors"][0]["shape"][0]
    except (KeyError, IndexError, TypeError):
        return 1
    return d0 if isinstance(d0, int) and not isinstance(d0, bool) and d0 >= 0 else 1


def _user_id(frame: Any) -> str | None:
    """The caller's CURVE public key (Z85), as the ZAP handler authenticated it."""
    try:
        uid = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError, KeyError):
        return None
    return str(uid) if uid else None
