"""The key server process: a ZeroMQ ROUTER with CURVE and a ZAP allow-list.

One thread does everything, on purpose: the ZAP handler and the request
loop share one store connection, so a licence issued in one batch admits
its holder's very next handshake, and there are no locks to get wrong.
Requests that arrive together are processed as one batch (one transaction,
one fsync: group commit) and answered after the commit.

Example::

    $ python -m keyserver serve ks --bind tcp://127.0.0.1:0 --lease-ttl 2
    {"ready": true, "address": "tcp://127.0.0.1:41234", "pid": 4242, ...}

That ready line (JSON, read by :func:`vault.core.launch.read_ready_line`)
is all the server writes on stdout; its log lines go to stderr
(:class:`vault.core.logs.Log`: JSON by default, ``--log-format text``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import zmq
from zmq.utils import z85

from vault.core.errors import ProtocolError, VaultError
from vault.core.logs import Log
from vault.core.peercap import PeerCap, prepare, raise_open_files
from vault.core.protocol import MAX_HEADER, pack_header, unpack_header

from . import audit
from .anchor import AnchorWriter
from .layout import Paths, exclusive_lock, load_audit_key, load_master, load_server_keys
from .policy import Policy
from .service import DEFAULT_COALESCE, DEFAULT_LEASE_TTL, KeyService, Request, RequestLimits
from .store import SqliteStore, Store, open_store

__all__ = ["MAX_HEADER", "MAX_MESSAGE", "REQUEST_HEADER_LIMIT", "serve"]

# libzmq drops a peer that sends more than this (no reply is possible);
# between REQUEST_HEADER_LIMIT and MAX_MESSAGE the peer gets a typed
# ProtocolError from unpack_header, the one place header sizes are checked
# (its MAX_HEADER, 1 MiB, is the ceiling for every process; key server
# requests are small, so they get less).
MAX_MESSAGE = 256 * 1024
REQUEST_HEADER_LIMIT = 64 * 1024
MAX_BATCH = 256
ZAP_DOMAIN = b"vault-keyserver"
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP RFC (27/ZAP)
# connections one peer address holds at the key server's port: its callers
# are every service, worker, device and tier-0 caller, many of them behind one
# address (a NAT, a node's pods), each process one connection
KEYSERVER_PER_ADDRESS = 1024


def _zap_reply(zap: zmq.Socket[Any], service: KeyService) -> None:
    """Answer one ZAP request (RFC 27): 200 for a known CURVE key, 400 else."""
    msg = zap.recv_multipart()
    version, request_id = (msg[0], msg[1]) if len(msg) >= 2 else (b"1.0", b"")
    status, text, user = b"400", b"denied", b""
    if len(msg) >= 7 and msg[0] == b"1.0" and msg[5] == b"CURVE" and len(msg[6]) == 32:
        key = z85.encode(msg[6]).decode()
        try:
            ok = service.admits(key)
        except Exception:  # a DB hiccup must not admit anyone
            ok = False
        if ok:
            status, text, user = b"200", b"OK", key.encode()
    zap.send_multipart([version, request_id, status, text, user, b""])


def _parse(frames: list[zmq.Frame]) -> tuple[list[bytes], Request]:
    """Split a ROUTER message into its envelope and a Request (never raises)."""
    rid = frames[0].bytes
    rest = frames[1:]
    envelope = [rid]
    if len(rest) >= 2 and len(rest[0]) == 0:  # a REQ client's empty delimiter
        envelope.append(b"")
        rest = rest[1:]
    identity: str | None = None
    if rest:
        try:
            user = rest[-1].get("User-Id")
            identity = user if isinstance(user, str) and user else None
        except zmq.ZMQError:
            identity = None
    if len(rest) != 1:
        err = ProtocolError(f"expected exactly one header frame, got {len(rest)}")
        return envelope, Request(identity, None, err)
    try:
        header = unpack_header(rest[0], limit=REQUEST_HEADER_LIMIT)
    except VaultError as exc:
        return envelope, Request(identity, None, exc)
    return envelope, Request(identity, header)


class _Checkpointer(threading.Thread):
    """Moves WAL pages into the main DB file off the request path.

    SQLite's automatic checkpoint runs inside whichever commit crosses the
    threshold, fsyncing the main file there: a latency spike of tens of ms
    for that batch. A PASSIVE checkpoint from its own connection never blocks
    the writer (WAL allows it), and sqlite releases the GIL while it works.
    """

    def __init__(self, db: str, every: float = 0.5) -> None:
        super().__init__(name="wal-checkpoint", daemon=True)
        self._db, self._every = db, every
        self._stop_event = threading.Event()

    def run(self) -> None:
        st = SqliteStore.open(self._db)
        try:
            while not self._stop_event.wait(self._every):
                try:
                    st.checkpoint("PASSIVE")
                except st.errors:
                    pass  # busy or I/O trouble: the next round retries
        finally:
            st.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


class _Stop:
    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def _port(address: str) -> str:
    return address.rsplit(":", 1)[-1]


def default_bind(recorded: str | None) -> str:
    """Where a key server listens when not told: the port of the address
    recorded at ``init``, on that host when it is a loopback address (what
    ``init --address tcp://127.0.0.1:7701`` means on one machine), else on
    127.0.0.1 (a name such as ``tcp://vault-keyserver:7700`` is for other
    hosts, which a server reaches only with an explicit ``--bind``)."""
    if not recorded or not recorded.startswith("tcp://"):
        return "tcp://127.0.0.1:7700"
    host, _, port = recorded[len("tcp://") :].rpartition(":")
    if not port.isdigit():
        return "tcp://127.0.0.1:7700"
    if host == "localhost" or host.startswith("127.") or host in ("[::1]", "::1"):
        return recorded
    return f"tcp://127.0.0.1:{port}"


def serve(
    root: str | os.PathLike[str],
    *,
    bind: str | None = None,
    lease_ttl: float = DEFAULT_LEASE_TTL,
    advertise: str | None = None,
    clock: Callable[[], float] = time.time,
    release_policy: Policy | None = None,
    renew_policy: Policy | None = None,
    database: str | None = None,
    anchor: str | os.PathLike[str] | None = None,
    out: Any = None,
    log: Log | None = None,
    limits: RequestLimits | None = None,
    coalesce: float = DEFAULT_COALESCE,
) -> None:
    """Run the key server until SIGTERM or Ctrl-C.

    ``bind`` is where it listens; by default the port of the address recorded
    at ``init`` (``init --address``), on that address when it is a loopback
    one, else on 127.0.0.1 (a server for other hosts binds explicitly).
    ``advertise`` is the address written into licences it issues; by default
    the address recorded at ``init``, or the real bound endpoint when
    ``bind`` asks for a random port (``:0``). ``database`` is a PostgreSQL
    URL (several replicas may serve one database); by default the SQLite
    file ``DIR/keyserver.db``, one server per directory. ``anchor`` is the
    file that receives the signed audit checkpoints (:mod:`keyserver.anchor`).
    ``log`` gets the server's events (default: JSON lines on stderr).
    """
    out = out or sys.stdout
    log = log or Log(sys.stderr, component="keyserver")
    paths = Paths(os.fspath(root))
    # A SQLite file has one writer: the directory lock says so early. Replicas
    # of a PostgreSQL store share one directory of keys, so no lock there.
    with exclusive_lock(paths.root) if database is None else _no_lock():
        st: Store = open_store(database or paths.db)
        with st.transaction():  # a database made before the table existed gets it
            st.ensure_metering_ids()
        checkpointer: _Checkpointer | None = None
        if isinstance(st, SqliteStore):
            st.disable_autocheckpoint()  # see _Checkpointer
            checkpointer = _Checkpointer(paths.db)
        master = load_master(paths.root, st)
        writer = AnchorWriter(anchor, load_audit_key(paths.root)) if anchor is not None else None
        public, secret = load_server_keys(paths.root)
        ctx = zmq.Context()
        stop = _Stop()
        old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        zap = ctx.socket(zmq.REP)
        router = ctx.socket(zmq.ROUTER)
        cap: PeerCap | None = None
        try:
            zap.linger = 0
            zap.bind(_ZAP_ENDPOINT)  # before the ROUTER binds: no unauthenticated window
            router.linger = 0
            router.curve_server = True
            router.curve_secretkey = secret
            router.curve_publickey = public
            router.zap_domain = ZAP_DOMAIN
            router.maxmsgsize = MAX_MESSAGE
            router.sndhwm = 10_000
            router.rcvhwm = 10_000
            router.router_mandatory = False  # a vanished client's reply is dropped, not an error
            recorded = st.get_meta("address")
            if bind is None:
                bind = default_bind(recorded)
            prepare(router)  # handshakes bounded: before the bind (vault/core/peercap.py)
            try:
                router.bind(bind)
            except zmq.ZMQError as exc:
                from vault.core.errors import ConfigError

                raise ConfigError(f"cannot bind {bind}: {exc}") from exc
            endpoint = router.get_string(zmq.LAST_ENDPOINT)
            if endpoint.startswith("tcp://"):
                # a descriptor per connection: the soft limit up to the hard one;
                # a stranger's silent connections bounded per address, handshakes
                # within 10 s (vault/core/peercap.py): every worker's lease
                # renewal comes here
                before, after = raise_open_files()
                if after != before:
                    log("open_files_raised", before=before, after=after)
                cap = PeerCap(per_address=KEYSERVER_PER_ADDRESS, log=log)
                cap.watch(router, "keyserver")
                cap.start()
            if advertise is None:
                advertise = endpoint if bind.endswith(":0") else recorded
                if recorded and not bind.endswith(":0") and _port(recorded) != _port(endpoint):
                    log("address_mismatch", level="warning", listening=endpoint,
                        licences_name=recorded,
                        hint="licences and devices will dial the address recorded at init; give "
                             "--advertise, or bind its port")  # fmt: skip
            service = KeyService(
                st,
                master,
                server_public_key=public.decode(),
                publisher_key=st.get_meta("publisher_key") or "",
                address=advertise or endpoint,
                lease_ttl=lease_ttl,
                clock=clock,
                release_policy=release_policy,
                renew_policy=renew_policy,
                checkpoint=writer,
                log=log,
                limits=limits,
                coalesce=coalesce,
            )
            if writer is not None:  # everything so far, rotations included
                seq, head = audit.head(st)
                writer(seq, head, clock())
            if checkpointer is not None:
                checkpointer.start()
            ready = {
                "ready": True,
                "address": endpoint,
                "advertised": advertise or endpoint,
                "pid": os.getpid(),
                "server_key": public.decode(),
                "database": st.kind,
            }
            log(
                "started",
                endpoint=endpoint,
                advertised=advertise or endpoint,
                database=st.kind,
                lease_ttl=lease_ttl,
                anchor=os.fspath(anchor) if anchor else None,
            )
            print(json.dumps(ready, sort_keys=True), file=out, flush=True)
            try:
                _loop(router, zap, service, stop)
            finally:
                try:  # refusals counted and not yet written get their record
                    service.flush_refusals()
                except Exception as exc:  # noqa: BLE001 - stopping anyway: say so
                    print(f"keyserver: could not write the last refusal counts "
                          f"({type(exc).__name__})", file=sys.stderr, flush=True)  # fmt: skip
        finally:
            if checkpointer is not None and checkpointer.is_alive():
                checkpointer.stop()
            router.close(0)
            if cap is not None:  # after the watched socket
                cap.close()
            zap.close(0)
            ctx.term()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            from vault.core import crypto as _crypto

            _crypto.zeroize(master)
            st.close()
            if writer is not None:
                writer.close()
        log("stopped")


@contextlib.contextmanager
def _no_lock() -> Iterator[None]:
    yield


def _loop(router: zmq.Socket[Any], zap: zmq.Socket[Any], service: KeyService, stop: _Stop) -> None:
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(zap, zmq.POLLIN)
    while not stop.requested:
        try:
            events = dict(poller.poll(200))  # wake up now and then to see a stop
        except zmq.ZMQError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        if zap in events:
            while zap.poll(0, zmq.POLLIN):
                try:
                    _zap_reply(zap, service)
                except zmq.ZMQError:
                    pass  # REP socket state is reset by the next recv
        if router not in events:
            service.tick()  # intervals of counted refusals that ended get their record
            continue
        envelopes: list[list[bytes]] = []
        batch: list[Request] = []
        while len(batch) < MAX_BATCH:
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            env, req = _parse(frames)
            envelopes.append(env)
            batch.append(req)
        if not batch:
            continue
        replies = service.process_batch(batch)
        for env, reply in zip(envelopes, replies):
            try:
                router.send_multipart([*env, pack_header(reply)], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # peer gone or its queue full: it will time out and retry
        del replies
