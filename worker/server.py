"""The worker's ZeroMQ loop: a ROUTER front, inline fast calls, a compute pool.

Requests arrive on a ROUTER socket (``ipc://`` in a private directory, or
``tcp://`` with CURVE and a ZAP allow-list). Fast calls are answered by the
router thread itself (no thread hop); slow ones go to a pool of ``threads``
threads, so several callers' computes run at once. The handler turns every
malformed request into a typed error reply, so the worker goes on serving.

Example::

    server = Server(ctx, "ipc:///tmp/vault-x/w.sock", handler=handler, threads=2)
    server.bind()
    server.start()          # returns at once; server.stop() ends it
"""

from __future__ import annotations

import hmac
import itertools
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from vault.core.errors import ConfigError, IntegrityError, ProtocolError, VaultError
from vault.core.localwire import (
    MAX_FRAMES,
    TOKEN_BYTES,
    ByteBudget,
    Closed,
    RecordReader,
    send_record,
)
from vault.core.protocol import (
    SHM_MIN_BYTES,
    error_reply,
    frame_len,
    ok_reply,
    pack_header,
    unpack_header,
)
from vault.core.sealed import (
    CHUNK,
    ZAP_DOMAIN,
    ServerSession,
    SessionTable,
    plain_error,
    session_id,
)

_TOKEN_WAIT_S = 5.0  # how long a new local connection may take to say who it is
_BULK_ROUTE = b"\xffB"  # a sealed request's route (a ROUTER's own identities start with 0)

__all__ = [
    "ZAP_KEYSERVER_UNAVAILABLE",
    "LocalServer",
    "Server",
    "connection_session",
    "load_allowed_keys",
    "sealed_authenticator",
    "sealed_socket",
]

Handler = Callable[[list[Any]], list[Any]]

# a CURVE credentials provider's reason for a key it could not check (its key
# server unavailable): the ZAP handler answers it 500, not 400 (see
# sealed_authenticator), so the caller hears "key server unavailable"
ZAP_KEYSERVER_UNAVAILABLE = "keyserver_unavailable"


def load_allowed_keys(directory: str) -> set[bytes]:
    """Client CURVE public keys from ``directory``: ``*.key``/``*.pub`` files,
    each either a zmq certificate (``public-key = "..."``) or one bare Z85 key."""
    import os

    import zmq.auth

    keys: set[bytes] = set()
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise ConfigError(
            f"{directory}: cannot read the allow-list directory ({exc.strerror})"
        ) from exc
    for name in names:
        if not name.endswith((".key", ".pub")) or name.endswith("_secret"):
            continue
        path = os.path.join(directory, name)
        with open(path, "rb") as fh:
            text = fh.read().strip()
        if len(text) == 40 and b"\n" not in text:
            keys.add(text)
            continue
        try:
            public, _secret = zmq.auth.load_certificate(path)
        except (ValueError, OSError):
            raise ConfigError(f"{path}: neither a Z85 public key nor a zmq certificate") from None
        if public:
            keys.add(public)
    return keys


class _AllowList:
    """ZAP credentials provider for pyzmq's authenticator: one membership test."""

    def __init__(self, keys: Iterable[bytes]) -> None:
        self.keys = frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        del domain
        return key in self.keys


def sealed_authenticator(ctx: zmq.Context[Any], sessions: SessionTable | None = None) -> Any:
    """pyzmq's ZAP thread (``ThreadAuthenticator``, not started), which also
    answers for the sealed port: a PLAIN connection there is admitted only
    under a live session's id and password (``sessions.admits``), so a
    stranger is refused at the handshake, before libzmq reads a single
    message of it (a sealed port without this buffered whatever a stranger
    sent: 300 MB of one unfinished message took a worker from 83 to 383 MB).
    Set ``.sessions`` once the table exists. (zmq.auth.thread is imported
    here: it pulls in asyncio, which an ipc:// worker never needs.)"""
    import inspect

    from zmq.auth.thread import ThreadAuthenticator

    class SealedAuthenticator(ThreadAuthenticator):
        zap_address = ""

        if inspect.iscoroutinefunction(ThreadAuthenticator._authenticate_curve):
            # pyzmq's ZAP handler, which tells a CURVE credentials provider only
            # the key: one with ``admit_from`` (the service's call licences)
            # also learns the peer's address, to budget the key-server
            # requests a stranger's fresh keys would cost (one ZAP thread:
            # handshakes are answered one at a time)
            async def handle_zap_message(self, msg: list[bytes]) -> None:
                self.zap_address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else ""
                await super().handle_zap_message(msg)

            async def _authenticate_curve(
                self, domain: str, client_key: bytes
            ) -> tuple[bool, bytes]:
                from zmq.utils import z85

                provider = self.credentials_providers.get(domain or "*")
                refusal = getattr(provider, "refusal_from", None)
                if refusal is None:
                    ok, text = await super()._authenticate_curve(domain, client_key)
                    why = None if ok else "not_allowed"
                else:
                    why = refusal(self.zap_address, z85.encode(client_key))
                    ok, text = why is None, (why or "OK").encode()
                if why is not None and self.on_refused is not None:
                    self.on_refused(why, self.zap_address)
                return ok, text

        # why a key was refused (reason, peer address), told to the service
        # for its log and metric; set by it (None: nobody listens)
        on_refused: Callable[[str, str], None] | None = None

        def _send_zap_reply(
            self, request_id: bytes, status_code: bytes, status_text: bytes,
            user_id: str = "anonymous",
        ) -> None:  # fmt: skip
            # the client learns only the status code (libzmq sends it, not the
            # text, in its ERROR command): 400 is "refused", the same for an
            # unknown, revoked or expired licence, so a stranger learns nothing
            # of a key; 500 (internal error) is "could not check it: the key
            # server is unavailable", whatever the key (300, a temporary
            # failure, is a silent disconnect the client never sees)
            if status_code == b"400" and status_text == ZAP_KEYSERVER_UNAVAILABLE.encode():
                status_code = b"500"
            super()._send_zap_reply(request_id, status_code, status_text, user_id)

        def _authenticate_plain(
            self, domain: str, username: str, password: str
        ) -> tuple[bool, bytes]:
            if domain != ZAP_DOMAIN:
                return False, b"PLAIN is for sealed sessions only"
            table: SessionTable | None = getattr(self, "sessions", None)
            if table is not None and table.admits(username, password):
                return True, b"OK"
            return False, b"unknown sealed session"

    auth = SealedAuthenticator(ctx)
    auth.sessions = sessions  # type: ignore[attr-defined]
    return auth


def sealed_socket(ctx: zmq.Context[Any], *, hwm: int) -> zmq.Socket[Any]:
    """The sealed port's ROUTER: PLAIN under the sessions' ZAP check, sealed
    chunks only (each frame at most one chunk)."""
    b: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
    b.setsockopt(zmq.LINGER, 0)
    b.setsockopt(zmq.MAXMSGSIZE, CHUNK + 4096)  # sealed chunks only
    b.setsockopt(zmq.SNDHWM, hwm)
    b.setsockopt(zmq.RCVHWM, hwm)
    b.plain_server = True
    b.zap_domain = ZAP_DOMAIN.encode()
    b.copy_threshold = CHUNK + 4096
    return b


def connection_session(frame: Any) -> bytes | None:
    """The session id a sealed-port connection authenticated as (its PLAIN
    user name, as the ZAP handler admitted it)."""
    try:
        return bytes.fromhex(frame.get("User-Id"))
    except (zmq.ZMQError, AttributeError, KeyError, TypeError, ValueError):
        return None


_TOOK = struct.Struct("<dQ?")  # a pooled call's time, its request's bytes, whether it ran


# How long, after another caller's request (or one that waited behind a
# longer call run on the router thread), such calls go to the pool
# instead (see Server._estimate).
OVERLAP_HOLD_S = 1.0


class Server:
    """ROUTER front end; cheap calls answered inline, slow ones on a thread pool.

    Why not a ``zmq.proxy`` to handler threads: every hop between threads costs
    a wake-up, and for a small model the hops cost more than the inference. So
    the router thread answers a request itself while nothing else is running
    and it is estimated fast (the calls' EWMA, scaled by the request's bytes,
    under ``inline_below`` seconds), or under ``inline_alone_below`` while
    its caller has the worker to itself (:meth:`_estimate`); otherwise it
    hands the request to a pool thread, which returns the reply
    over an ``inproc://`` PUSH socket (ZeroMQ sockets are single-threaded, so
    only the router thread touches the front socket). onnxruntime's ``run``
    drops the GIL, so pooled computes of several callers run at once.
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        endpoint: str,
        *,
        handler: Handler,
        threads: int = 2,
        max_message: int = 1 << 30,
        hwm: int = 1000,
        curve_secret: bytes | None = None,
        curve_public: bytes | None = None,
        allowed: Iterable[bytes] | None = None,
        inline_below: float = 0.002,
        inline_alone_below: float = 0.05,
        ran: Callable[[], bool] | None = None,
        local: LocalServer | None = None,
        log: Callable[..., None] | None = None,
    ) -> None:
        self.ctx = ctx
        self._log = log
        self.endpoint = endpoint
        self.handler = handler
        self.threads = max(1, threads)
        self.inline_below = inline_below
        self.inline_alone_below = inline_alone_below
        # whether the handler's last call on this thread ran the pipeline (what
        # the estimate learns from); without one, every call counts
        self.ran: Callable[[], bool] = ran or (lambda: True)
        # who sent the last request; when another caller's last came (or one
        # was found waiting behind a longer call run here); recent request sizes
        self._last_caller: Any = None
        self._other_at = -OVERLAP_HOLD_S
        self._ewma_bytes = 0.0
        self._results_addr = f"inproc://vault-results-{id(self)}"
        self._auth: Any = None
        self.front = ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.front.setsockopt(zmq.MAXMSGSIZE, max_message)  # per frame; larger drops the peer
        self.front.setsockopt(zmq.SNDHWM, hwm)
        self.front.setsockopt(zmq.RCVHWM, hwm)
        # small reply frames are copied: a zero-copy frame wakes pyzmq's
        # garbage-collector thread (and takes the GIL) when libzmq frees it
        self.front.copy_threshold = SHM_MIN_BYTES
        if endpoint.startswith("tcp://") or allowed is not None:
            if curve_secret is None or curve_public is None or allowed is None:
                raise ConfigError("a tcp:// worker needs CURVE keys and an allow-list")
            self._auth = sealed_authenticator(ctx)
            self._auth.start()
            self._auth.configure_curve_callback(
                domain="vault", credentials_provider=_AllowList(allowed)
            )
            self.front.curve_server = True
            self.front.curve_secretkey = curve_secret
            self.front.curve_publickey = curve_public
            self.front.zap_domain = b"vault"
        # remote callers' calls under AES-256-GCM on a second connection, keyed
        # over this CURVE one (vault/core/sealed.py); a local (ipc) worker has none
        self.sessions: SessionTable | None = None
        self.bulk: zmq.Socket[Any] | None = None
        self.bulk_port: int | None = None
        self._routes: dict[bytes, tuple[Any, ServerSession]] = {}
        self._route_ids = itertools.count(1)
        if endpoint.startswith("tcp://") and curve_public is not None:
            self.sessions = SessionTable(curve_public)
            self._auth.sessions = self.sessions  # the ZAP check of the sealed port
            self.bulk = sealed_socket(ctx, hwm=hwm)
        self._stop = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._pool: Any = None
        self._tls = threading.local()
        self._ewma = 0.0
        self.bound_endpoint = endpoint
        self.local = local
        self._peercap: Any = None

    def bind(self) -> str:
        tcp = self.endpoint.startswith("tcp://")
        if tcp:
            # as the service's ports (vault/core/peercap.py): handshakes bounded
            # (set before the bind: the listener takes the options then), a
            # peer address's connections counted
            from vault.core.peercap import PeerCap, prepare, raise_open_files

            prepare(self.front)
            if self.bulk is not None:
                prepare(self.bulk)
            before, after = raise_open_files()
            if after != before and self._log is not None:
                self._log("open_files_raised", before=before, after=after)
        self.front.bind(self.endpoint)
        self.bound_endpoint = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.bulk is not None:
            host = self.bound_endpoint[len("tcp://") :].rpartition(":")[0]
            self.bulk.bind(f"tcp://{host}:0")
            self.bulk_port = int(self.bulk.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2])
        if tcp:
            self._peercap = PeerCap(log=self._log)
            self._peercap.watch(self.front, "front")
            if self.bulk is not None:
                self._peercap.watch(self.bulk, "sealed")
        return self.bound_endpoint

    # -- sealed calls (remote callers) -------------------------------------------

    def _session_request(self, msg: list[Any]) -> bool:
        """Answer a ``{"op": "session"}`` on the CURVE front here (it needs the
        caller's authenticated key, which only the frame carries). False: not one."""
        if self.sessions is None or len(msg) != 2 or b"\xa7session" not in msg[1].bytes:
            return False
        try:
            header = unpack_header(msg[1])
        except VaultError:
            return False  # the handler answers it
        if header.get("op") != "session":
            return False
        rid = header.get("id") if isinstance(header.get("id"), int) else None
        try:
            key = msg[1].get("User-Id")
            if not key:
                raise ProtocolError("sealed sessions need a CURVE caller")
            fields = self.sessions.create(str(key), header.get("rand"), prev=header.get("prev"),
                                          prev_seq=header.get("prev_seq"))  # fmt: skip
            body = ok_reply(rid, **fields, port=self.bulk_port)
        except VaultError as exc:
            body = error_reply(rid, exc)
        self.front.send_multipart([msg[0], pack_header(body)])
        return True

    def _open_sealed(self, msg: list[Any]) -> list[Any] | None:
        """A sealed request from the bulk socket as ``[route, header, frames...]``
        (``route`` names the caller and its session), or None when it was
        answered with a plain error (unknown session, failed authentication)."""
        assert self.sessions is not None and self.bulk is not None
        ident = msg[0]
        sess = self.sessions.get(session_id(msg[1].bytes)) if len(msg) > 1 else None
        if sess is None:
            self.bulk.send_multipart(
                [ident, *plain_error(ProtocolError("unknown sealed session"), unknown_session=True)]
            )
            return None
        try:
            if connection_session(msg[1]) != sess.sid:  # a connection carries its own session only
                raise IntegrityError("a sealed message of another session than its connection's")
            frames = sess.opener.open(msg[1:])
        except IntegrityError as exc:
            self.bulk.send_multipart([ident, *plain_error(exc)])
            return None
        route = _BULK_ROUTE + next(self._route_ids).to_bytes(8, "little")
        self._routes[route] = (ident, sess)
        return [route, *frames]

    def _send(self, route: Any, reply: list[Any]) -> None:
        """Answer a request on the socket it came from (sealed for a sealed one)."""
        if isinstance(route, bytes):  # only a sealed request's route is bytes
            ident, sess = self._routes.pop(route)
            assert self.bulk is not None
            try:
                self.bulk.send_multipart([ident, *sess.sealer.seal(reply)], copy=False)
            finally:
                sess.opener.release()  # its request's frames are done with: the buffer is free
        else:
            self.front.send_multipart([route, *reply], copy=False)

    def _pooled(self, msg: list[Any], nbytes: int) -> None:
        push = getattr(self._tls, "push", None)
        if push is None:
            push = self.ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.setsockopt(zmq.SNDHWM, 0)
            push.copy_threshold = SHM_MIN_BYTES
            push.connect(self._results_addr)
            self._tls.push = push
        t0 = time.perf_counter()
        reply = self.handler(msg[1:])
        dt = time.perf_counter() - t0
        ran = self.ran()
        try:
            # which socket answers: a sealed request's route is bytes of ours, a
            # front caller's its ROUTER identity (which a caller may choose)
            kind = b"B" if isinstance(msg[0], bytes) else b"F"
            took = _TOOK.pack(dt, nbytes, ran)
            push.send_multipart([kind, msg[0], took, *reply], copy=False)
        except zmq.ContextTerminated:  # pragma: no cover - shutting down
            pass

    def _loop(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        results = self.ctx.socket(zmq.PULL)
        results.setsockopt(zmq.LINGER, 0)
        results.setsockopt(zmq.RCVHWM, 0)
        results.bind(self._results_addr)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vault-compute")
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(results, zmq.POLLIN)
        bulk = self.bulk
        if bulk is not None:
            poller.register(bulk, zmq.POLLIN)
        front = self.front
        inflight = 0
        front.rcvtimeo = 200  # wake up to notice stop()
        try:
            while not self._stop.is_set():
                if inflight == 0 and bulk is None:
                    # Nothing pooled is pending: wait on the front socket alone.
                    # A plain receive is cheaper than a Poller over two sockets,
                    # and this is the path every small call takes.
                    try:
                        msg = front.recv_multipart(copy=False)
                    except zmq.Again:
                        continue
                    inflight += self._dispatch(msg, inline=True)
                    continue
                for sock, _ in poller.poll(200):
                    if sock is results:
                        msg = results.recv_multipart(copy=False)
                        inflight -= 1
                        dt, nbytes, ran = _TOOK.unpack(msg[2].bytes)
                        if ran:
                            self._note(dt, nbytes)
                        self._send(msg[1].bytes if msg[0].bytes == b"B" else msg[1], msg[3:])
                        continue
                    if sock is bulk:
                        opened = self._open_sealed(bulk.recv_multipart(copy=False))
                        if opened is not None:
                            inflight += self._dispatch(opened, inline=inflight == 0)
                        continue
                    msg = front.recv_multipart(copy=False)
                    if self._session_request(msg):
                        continue
                    inflight += self._dispatch(msg, inline=inflight == 0)
        finally:
            results.close(linger=0)
            front.close(linger=0)
            if bulk is not None:
                bulk.close(linger=0)

    def _dispatch(self, msg: list[Any], *, inline: bool) -> int:
        """Answer ``msg`` here when allowed and it is estimated fast, or when
        one caller has the worker to itself (:meth:`_estimate`); else hand it
        to the pool. Returns how many pooled calls it added (0 or 1)."""
        nbytes = sum(frame_len(f) for f in msg[1:])
        est, alone = self._estimate(self._caller(msg), nbytes)
        fast = est < self.inline_below
        if inline and (fast or (alone and est < self.inline_alone_below)):
            t0 = time.perf_counter()
            reply = self.handler(msg[1:])
            if self.ran():
                self._note(time.perf_counter() - t0, nbytes)
            if not fast and self._waiting():
                # a request came while a longer call ran here (asked before
                # the answer goes: a caller's own next request cannot be
                # queued yet): longer calls go to the pool again
                self._other_at = time.monotonic()
            self._send(msg[0], reply)
            return 0
        self._pool.submit(self._pooled, msg, nbytes)
        return 1

    def _caller(self, msg: list[Any]) -> Any:
        """Who sent a request: the caller's CURVE key (a sealed call's
        session was keyed to it; the front's frames carry it), or, on a
        front without CURVE (a local ipc:// worker), the ROUTER identity
        (one per connection)."""
        route = msg[0]
        if isinstance(route, bytes):  # only a sealed request's route is bytes
            return str(self._routes[route][1].client_key)
        if self._auth is not None and len(msg) > 1 and hasattr(msg[1], "get"):
            try:
                key = msg[1].get("User-Id")
            except (zmq.ZMQError, AttributeError, KeyError, TypeError, ValueError):  # none on it
                key = None
            if key:
                return str(key)
        return getattr(route, "bytes", route)

    def _estimate(self, who: Any, nbytes: int) -> tuple[float, bool]:
        """This request's estimated time, and whether its caller has the
        worker to itself.

        The estimate is the recent computes' average time scaled by this
        request's bytes against theirs (one far larger request is not taken
        for a fast one); :meth:`_note` learns only from requests whose
        pipeline ran, so requests answered at once (an ``info``, a refusal)
        cannot pull it down. A caller has the worker to itself when it sent
        the requests before this one too and no other caller's request came
        for ``OVERLAP_HOLD_S`` (nor one found waiting behind a longer call
        run here). Such a caller's calls under ``inline_alone_below`` run
        here: calling back to back it never overlaps itself, and the pool's
        two thread hops cost it 0.1-0.4 ms a call and more (docs/worker.md);
        a caller that arrives after another had the worker alone for a
        second waits for one such call at most, then calls go to the pool."""
        now = time.monotonic()
        if who != self._last_caller:
            if self._last_caller is not None:
                self._other_at = now
            self._last_caller = who
        avg = self._ewma_bytes
        est = self._ewma * max(1.0, nbytes / avg) if avg else self._ewma
        return est, now - self._other_at >= OVERLAP_HOLD_S

    def _waiting(self) -> bool:
        """Whether a request is queued on a front socket (no receive)."""
        for sock in (self.front, self.bulk):
            if sock is not None and int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                return True
        return False

    def _note(self, dt: float, nbytes: int) -> None:
        # a fast estimate: one slow call moves it a lot, so long computes
        # leave the router thread quickly; fast ones bring it back
        self._ewma = 0.7 * self._ewma + 0.3 * dt
        avg = self._ewma_bytes
        self._ewma_bytes = 0.7 * avg + 0.3 * nbytes if avg else float(max(1, nbytes))

    def start(self) -> None:
        """Start the router thread; returns at once."""
        self._loop_thread = threading.Thread(target=self._loop, name="vault-router", daemon=True)
        self._loop_thread.start()
        if self._peercap is not None:
            self._peercap.start()
        if self.local is not None:
            self.local.start()

    def stop(self) -> None:
        """Stop the router thread (the front socket closes with it) and the authenticator."""
        self._stop.set()
        if self.local is not None:
            self.local.stop()
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=5)
        if self._peercap is not None:  # after the router thread closed the watched sockets
            self._peercap.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


# How long a connection's thread polls for the caller's next request before
# it sleeps in the kernel (docs/worker.md, "The local channel's short wait").
# Waking a thread that slept costs this VM tens of microseconds on each side
# of a call (by hand, perf: the wake-up and the task switch were 27 % of a
# small call's worker CPU); a caller that calls again at once is caught awake
# instead. Only while the caller's last request came that soon (a caller
# with longer gaps costs no polling), and only while one connection has the
# worker to itself (no request on another one for SOLE_S, none being served):
# with several callers the poll takes the GIL and a core from their runs
# (by hand, 8 callers of a tiny model: 30 % fewer calls a second when every
# idle connection polled).
DEFAULT_SPIN_US = 200
MAX_SPIN_US = 10_000
SOLE_S = 0.01


def _await_briefly(conn: socket.socket, seconds: float, busy: Callable[[], int]) -> bool:
    """Poll ``conn`` without blocking until a byte is there (True) or
    ``seconds`` pass or another call is being served (False)."""
    deadline = time.perf_counter() + seconds
    peek = socket.MSG_PEEK | socket.MSG_DONTWAIT
    while True:
        try:
            conn.recv(1, peek)
            return True  # a byte, or b"" at EOF: the blocking read sees it at once
        except BlockingIOError:
            pass
        except OSError:
            return True  # the blocking read reports it
        if busy() or time.perf_counter() >= deadline:
            return False


class LocalServer:
    """The direct local front (``vault/core/localwire.py``): the caller's
    listening socket, inherited; one thread per connection, which reads a
    request, runs it and writes the answer itself. No hand-off: a caller's
    thread and its worker thread take turns, and several callers' computes
    run at once (onnxruntime's ``run`` drops the GIL), as several threads
    sharing one session do in-process.

    A record that is malformed or over ``max_message`` gets a typed error
    answer and its connection is closed (its stream can no longer be read in
    step); past ``max_connections`` a new connection is closed at once. The
    records being received or served hold at most ``max_message`` (plus
    frame padding) of buffers in all (:class:`ByteBudget`): what a record's
    head claims is allocated only when the budget allows it."""

    def __init__(
        self,
        listener: socket.socket,
        *,
        token: bytes,
        handler: Handler,
        max_message: int = 1 << 30,
        max_connections: int = 256,
        spin_us: int | None = None,
    ) -> None:
        if len(token) != TOKEN_BYTES:
            raise ConfigError("the local channel needs a 32-byte token")
        if spin_us is None:
            spin_us = DEFAULT_SPIN_US
        if spin_us < 0 or spin_us > MAX_SPIN_US:
            raise ConfigError(f"--spin-us must be 0 to {MAX_SPIN_US}")
        self.spin_s = spin_us * 1e-6
        self._serving = 0  # connections between a request and their answer (under _lock)
        self._last_conn = 0  # the connection of the last request (its id)
        self._shared_at = 0.0  # when a request last came on another connection than the one before
        self.listener = listener
        self._token = bytes(token)
        self.handler = handler
        self.max_message = max_message
        self.max_connections = max_connections
        self.budget = ByteBudget(max_message + 72 * MAX_FRAMES)  # a largest record fits, padded
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept, name="vault-local", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                if self._stopped:
                    return
                time.sleep(0.05)  # out of descriptors: back off, keep serving
                continue
            with self._lock:
                if self._stopped or len(self._conns) >= self.max_connections:
                    conn.close()
                    continue
                self._conns.add(conn)
            try:
                threading.Thread(target=self._serve, args=(conn,), name="vault-conn",
                                 daemon=True).start()  # fmt: skip
            except RuntimeError:  # no thread to be had: refuse this one only
                self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)
        conn.close()

    def _busy(self) -> int:
        return self._serving

    def _serve(self, conn: socket.socket) -> None:
        reader = RecordReader(conn, max_message=self.max_message, owned=False, budget=self.budget)
        handler = self.handler
        try:
            # who it is, first: a connection without the caller's token gets
            # no answer at all, and a silent one is dropped after a while
            conn.settimeout(_TOKEN_WAIT_S)
            got = b""
            while len(got) < TOKEN_BYTES:
                chunk = conn.recv(TOKEN_BYTES - len(got))
                if not chunk:
                    return
                got += chunk
            if not hmac.compare_digest(got, self._token):
                return
            conn.settimeout(None)
            spin = self.spin_s
            soon = True  # whether the caller's last request came within ``spin``
            busy = self._busy
            answered = 0.0
            me = id(conn)
            while True:
                if spin:
                    answered = time.perf_counter()
                    if (
                        soon
                        and not self._serving
                        and answered - self._shared_at > SOLE_S
                        and reader.drained()
                    ):
                        soon = _await_briefly(conn, spin, busy)
                try:
                    frames = reader.read()
                    if spin and not soon:
                        soon = time.perf_counter() - answered < spin
                except ProtocolError as exc:
                    send_record(conn, [pack_header(error_reply(None, exc))])
                    return
                if spin:  # what the short wait reads: who else is being served, and when
                    with self._lock:
                        self._serving += 1
                        if self._last_conn != me:
                            if self._last_conn:  # another connection had the last request
                                self._shared_at = time.perf_counter()
                            self._last_conn = me
                try:
                    send_record(conn, handler(frames))
                finally:
                    if spin:
                        with self._lock:
                            self._serving -= 1
                    del frames
                    reader.release()
        except (Closed, OSError):
            return
        finally:
            reader.release()
            self._drop(conn)

    def stop(self) -> None:
        self._stopped = True
        self.budget.stop()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            conns, self._conns = set(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
