"""The caller's side: open a sealed model and compute with it.

:func:`open` gets an isolated worker (``python -m worker``) that alone
decrypts and runs the pipeline, and reports ready only once the key server
released the key and the sessions exist. By default it asks the local daemon
(tier 1: ``vault daemon`` at ``daemon=PATH``, ``$VAULT_DAEMON`` or
``/run/vault/daemon.sock``), which spawns the worker under its own dedicated
uid and releases the key as its enrolled device, with this process's proof of
the licence; the worker listens on ``ipc://`` with CURVE and accepts only the
key this Model made. Without a daemon, only a licence issued ``--same-user``
spawns the worker as the caller's own user (tier 0: that user can extract
the model), in a fresh 0700 directory. :func:`connect` reaches a remote worker over
``tcp://`` with CURVE (client keys from the licence). Both return a
:class:`Model`.

A :class:`Model` is safe to use from many threads at once: each thread gets
its own DEALER socket, so calls never wait on a lock. Errors arrive as the
worker's typed exceptions. If a local worker dies, the call in flight raises
:class:`~vault.core.errors.WorkerCrashedError` and the next call starts a fresh
worker; a call with no answer in time raises
:class:`~vault.core.errors.WorkerTimeoutError`. ``close()`` (and ``atexit``) stop
the worker and remove its directory.

Example::

    import vault
    with vault.open("model.vault", licence="alice.licence") as model:
        model.inputs                              # {"image": ("uint8", ("N", 8))}
        out = model.compute({"image": arr})       # {"probs": ndarray, ...}
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import zmq

from .core import sealed, standby
from .core.channel import Channel, ZmqChannel, check_endpoint
from .core.curvekeys import read_public_key
from .core.daemonwire import (
    DAEMON_USER_VAR,
    ENV_VAR,
    daemon_socket,
    peer_credentials,
    recv_message,
    send_message,
    trusted_daemon_uids,
)
from .core.errors import (
    ConfigError,
    FormatError,
    InputError,
    IntegrityError,
    KeyServerUnavailableError,
    LicenceExpiredError,
    PermissionDeniedError,
    ProtocolError,
    ServiceUnavailableError,
    UnknownLicenceError,
    UntrustedDaemonError,
    VaultError,
    WorkerCrashedError,
    WorkerTimeoutError,
    from_wire,
)
from .core.files import open_regular
from .core.launch import WorkerPipes, read_ready_line, spawn_worker
from .core.licence import Licence
from .core.localwire import TOKEN_BYTES, LocalChannel, listen_socket
from .core.process import stop_process
from .core.protocol import (
    DEFAULT_MAX_MESSAGE,
    PROTOCOL_VERSION,
    RepeatPlans,
    decode_tensors,
    encode_tensors,
    pack_header,
    raise_for_reply,
    shm_threshold,
    unpack_header,
)
from .core.shm import ShmArena

__all__ = ["Model", "connect", "open", "open_with_unsafe_test_key"]

DEFAULT_TIMEOUT = 60.0
START_TIMEOUT = 60.0
# Shared memory with a local worker, for tensors of 256 KiB or more (or calls
# whose tensors together reach protocol.SHM_GROUP_BYTES): four
# slots of 16 MiB (inputs and the outputs that fit share one slot per call).
DEFAULT_SHM_BYTES = 64 << 20
SHM_SLOTS = 4


# --- connectors: how a Model reaches its worker ----------------------------------------


class _LocalWorker:
    """A spawned worker process, its private directory and its lifeline pipe."""

    def __init__(
        self,
        package: str,
        licence: Licence | None,
        *,
        providers: Sequence[str] | None,
        device: str | None,
        start_timeout: float,
        unsafe_key: bytes | None = None,
        publisher: str | None = None,
        worker_args: Sequence[str] = (),
        python: str | None = None,
        shm_bytes: int = DEFAULT_SHM_BYTES,
        prepack: bool = True,
    ) -> None:
        self.package = os.path.abspath(package)
        self.licence = licence
        self.prepack = prepack
        self.providers = providers
        self.device = device
        self.start_timeout = start_timeout
        self.unsafe_key = unsafe_key
        self.publisher = os.path.abspath(publisher) if publisher else None
        self.worker_args = list(worker_args)
        self.python = python or sys.executable
        self.dir = tempfile.mkdtemp(prefix="vault-")  # mode 0700
        self.proc: subprocess.Popen[bytes] | None = None
        self._lifeline: int | None = None
        self._count = itertools.count()
        self.ready: dict[str, Any] = {}
        self.shm_bytes = shm_bytes
        self.arena: ShmArena | None = None
        self.local_path: str | None = None  # the direct local channel's socket
        self.local_token = os.urandom(TOKEN_BYTES)  # what each of its connections sends first
        self._owner = os.getpid()  # a forked child never stops our worker nor removes our directory

    def _new_arena(self) -> None:
        if self.arena is not None:  # a restart: the new worker gets a new arena
            self.arena.close(unmap=False)
            self.arena = None
        if self.shm_bytes > 0:
            try:
                self.arena = ShmArena(self.shm_bytes, slots=SHM_SLOTS)
            except OSError:
                self.arena = None  # no memfd here: every tensor travels as frames

    @property
    def _standby_key(self) -> standby.Key | None:
        """Which pre-started worker fits this open; None: spawn cold (the
        unsafe key and its publisher file are known only now; CUDA's
        hardening differs)."""
        if self.unsafe_key is not None or self.publisher or self.licence is None:
            return None
        return standby.key_for(self.python, self.worker_args, self.device, self.providers)

    def start(self) -> str:
        self._new_arena()
        key = self._standby_key
        waiting = standby.POOL.take(key) if key is not None else None
        endpoint = None
        if waiting is not None:
            try:
                endpoint = self._assign(waiting)
            except standby.StandbyGone:
                endpoint = None  # it died waiting: spawn cold
        if endpoint is None:
            endpoint = self._spawn()
        if key is not None:
            standby.POOL.refill(key)  # the next open's worker, now that this one is answered
        return endpoint

    def _assign(self, w: standby.Standby) -> str:
        """Hand a pre-started worker this open: the package, the licence, the
        arena and our listening socket, by descriptor (vault/core/standby.py)."""
        assert self.licence is not None
        listener, local_path = (None, None)
        pipes: list[int] = []
        pkg_fd = -1
        try:
            try:
                # the package first, as a cold spawn's worker reads it: a
                # missing file, a FIFO or a device is the same typed error
                pkg_fd = open_regular(self.package, what="vault package", error=FormatError)
                if local_channel_enabled():
                    try:
                        listener, local_path = listen_socket(w.dir, "c0.sock")
                    except OSError as exc:  # its directory is gone: spawn cold instead
                        raise standby.StandbyGone() from exc
                lic_r = _filled_pipe(self.licence.dumps(), pipes)
                fds = [pkg_fd, lic_r]
                msg: dict[str, Any] = {"op": "assign", "package_fd": 0, "licence_fd": 1}
                if listener is not None:
                    msg.update(listen_fd=len(fds), listen_token_fd=len(fds) + 1)
                    fds += [listener.fileno(), _filled_pipe(self.local_token, pipes)]
                if self.arena is not None:
                    msg.update(shm_fd=len(fds), shm_size=self.arena.size)
                    fds.append(self.arena.fd)
                if self.providers:
                    msg["providers"] = ",".join(self.providers)
                if not self.prepack:
                    msg["no_prepack"] = True
            except BaseException:
                w.discard()  # not handed over: stopped, its directory removed
                raise
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = w.dir  # ours now, 0700, with its endpoint in it
            self.proc, self._lifeline = w.proc, w.lifeline_w
            w.lifeline_w = None  # the lifeline is this worker's now
            try:
                self.ready = w.assign(msg, fds, timeout=self.start_timeout)
            except standby.StandbyGone:
                self.proc, self._lifeline = None, None
                self.dir = tempfile.mkdtemp(prefix="vault-")  # its directory went with it
                raise
            except BaseException:
                self.kill()
                raise
        finally:
            for fd in (*pipes, pkg_fd):
                if fd >= 0:
                    os.close(fd)
            if listener is not None:
                listener.close()  # only the worker holds it now
        self.local_path = local_path if self.ready.get("local") else None
        return str(self.ready.get("endpoint") or w.endpoint)

    def _spawn(self) -> str:
        n = next(self._count)
        endpoint = f"ipc://{self.dir}/w{n}.sock"
        pipes = WorkerPipes()
        args = [self.package, "--endpoint", endpoint]
        pass_fds: list[int] = []
        if self.licence is not None:
            pipes.secret("--licence-fd", self.licence.dumps())
        if self.unsafe_key is not None:
            pipes.secret("--unsafe-test-key-fd", bytes(self.unsafe_key))
        if self.publisher:
            args += ["--publisher", self.publisher]
        if self.providers:
            args += ["--providers", ",".join(self.providers)]
        if self.device:
            args += ["--device", self.device]
        if not self.prepack:
            args += ["--no-prepack"]
        if self.arena is not None:
            args += ["--shm-fd", str(self.arena.fd), "--shm-size", str(self.arena.size)]
            pass_fds.append(self.arena.fd)
        # the direct local channel: our listening socket, in our 0700 directory;
        # the worker only accepts on it (vault/core/localwire.py)
        listener, local_path = (None, None)
        if local_channel_enabled():
            listener, local_path = listen_socket(self.dir, f"c{n}.sock")
            args += ["--listen-fd", str(listener.fileno())]
            pass_fds.append(listener.fileno())
            pipes.secret("--listen-token-fd", self.local_token)
        args += [*pipes.args, *self.worker_args]
        try:
            self.proc = spawn_worker(
                args, pass_fds=[*pass_fds, *pipes.pass_fds], cwd=self.dir, python=self.python
            )
        except BaseException:
            pipes.failed()
            raise
        finally:
            # only the worker holds it now: once it dies, a connect is refused at once
            if listener is not None:
                listener.close()
        pipes.spawned()
        self._lifeline = pipes.lifeline_w
        try:
            self.ready = read_ready_line(pipes.status_r, timeout=self.start_timeout, proc=self.proc)
        except BaseException:
            self.kill()
            raise
        finally:
            pipes.close_status()
        self.local_path = local_path if self.ready.get("local") else None
        return str(self.ready.get("endpoint") or endpoint)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    configure = None  # a same-user worker's socket sits in a 0700 directory: no CURVE

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if self._lifeline is not None:
            os.close(self._lifeline)  # EOF on the lifeline: the worker stops by itself
            self._lifeline = None
        if proc is not None and os.getpid() == self._owner:
            stop_process(proc, 5)

    def close(self) -> None:
        self.kill()
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        if os.getpid() == self._owner:  # in a forked child: the parent's, still in use
            shutil.rmtree(self.dir, ignore_errors=True)


# A package's digest by its header, manifest and signature, in this process:
# hashing the payload (what the daemon's proof binds) took a 500 MB open 150
# ms of the client's own before the daemon's worker began, again at every
# open and every restart of the worker. For a package whose signature holds,
# these three bytes decide the digest (the signature covers the payload's
# chunk-hash digest); a package whose does not is refused by its worker
# whatever digest the proof names, and one re-sealed in place has a new
# signature, so it is hashed anew.
_DIGESTS: dict[tuple[bytes, bytes, bytes], str] = {}
_DIGESTS_KEPT = 16
_DIGESTS_LOCK = threading.Lock()  # opens on several threads remember at once


def _package_digest(pkg: Any) -> tuple[str, tuple[bytes, bytes, bytes]]:
    """The package's digest (remembered, or computed) and its name parts.
    Computed here, a digest is remembered only once an open succeeds with
    it (:func:`_remember_digest`): the digest of a file whose signature this
    process never checked (a package tampered with) must not outlive its
    refused open."""
    key = pkg.name_parts()
    with _DIGESTS_LOCK:
        got = _DIGESTS.get(key)
    return (got if got is not None else pkg.digest), key


def _remember_digest(key: tuple[bytes, bytes, bytes], digest: str) -> None:
    with _DIGESTS_LOCK:
        while len(_DIGESTS) >= _DIGESTS_KEPT:
            del _DIGESTS[next(iter(_DIGESTS))]
        _DIGESTS[key] = digest


class _DaemonWorker:
    """A worker spawned by the local daemon (tier 1) for this Model.

    One Unix connection to the daemon lives as long as the Model: the daemon
    ties the worker to it (a caller that goes away takes its workers with
    it). The package travels as an open descriptor and so does the
    shared-memory arena; the licence's secrets stay here: the daemon gets the
    licence's public part and a proof signed for its device and for this
    Model's CURVE key (the only key its worker answers). Before anything is
    sent, the socket's listener must be root or ``$VAULT_DAEMON_USER``
    (``SO_PEERCRED``): a relay in the daemon's place is refused.
    """

    def __init__(
        self,
        package: str,
        licence: Licence,
        *,
        socket_path: str,
        providers: Sequence[str] | None,
        device: str | None,
        start_timeout: float,
        shm_bytes: int = DEFAULT_SHM_BYTES,
        prepack: bool = True,
    ) -> None:
        self.package = os.path.abspath(package)
        self.licence = licence
        self.prepack = prepack
        self.socket_path = socket_path
        self.providers = providers
        self.device = device
        self.start_timeout = start_timeout
        self.shm_bytes = shm_bytes
        self.arena: ShmArena | None = None
        self.ready: dict[str, Any] = {}
        self.hello: dict[str, Any] = {}
        self.wid: str | None = None
        self.worker_pid: int | None = None
        self.server_key = ""
        public, secret = zmq.curve_keypair()
        self._client_public, self._client_secret = public, secret
        # the direct local channel: our listening socket in our own 0700
        # directory, its descriptor and token handed to the worker in the open
        self.dir: str | None = None
        self.local_path: str | None = None
        self.local_token = os.urandom(TOKEN_BYTES)
        self._count = itertools.count()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._endpoint_fd: int | None = None  # O_PATH: the worker's socket, for this process only
        self._owner = os.getpid()  # whose daemon connection ``_sock`` is

    def _call(
        self, msg: dict[str, Any], fds: Sequence[int] = (), *, max_fds: int = 0
    ) -> tuple[dict[str, Any], list[int]]:
        if os.getpid() != self._owner:
            # a forked child: the daemon connection is the parent's (the two
            # would read each other's answers), and so are the workers on it
            self._lock = threading.Lock()
            if self._sock is not None:
                self._sock.close()  # our copy only: the parent's connection goes on
                self._sock = None
            self.wid, self.dir = None, None
            self._owner = os.getpid()
        with self._lock:
            if self._sock is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(self.start_timeout + 5)
                try:
                    s.connect(self.socket_path)
                    _pid, uid, _gid = peer_credentials(s)
                    trusted = trusted_daemon_uids()
                except OSError as exc:
                    s.close()
                    raise ConfigError(
                        f"cannot reach the vault daemon at {self.socket_path} ({exc.strerror})"
                    ) from None
                except VaultError:
                    s.close()
                    raise
                if uid not in trusted:
                    s.close()
                    raise UntrustedDaemonError(
                        f"{self.socket_path} is served by uid {uid}, which is neither root nor "
                        f"the daemon's user (${DAEMON_USER_VAR}): not sending it a licence"
                    )
                self._sock = s
            try:
                try:
                    send_message(self._sock, msg, fds)
                except (BrokenPipeError, ConnectionResetError):
                    # a connection the daemon refuses (its uid at a cap) is
                    # answered unasked and closed: read why, if it is there
                    pass
                reply, extra = recv_message(self._sock, max_fds=max_fds)
            except (OSError, ConnectionError) as exc:
                self._sock.close()
                self._sock = None
                raise WorkerCrashedError(f"lost the vault daemon ({exc})") from None
        if not reply.get("ok"):
            for fd in extra:
                os.close(fd)
            raise from_wire(reply.get("error"))
        return reply, extra

    def start(self) -> str:
        from .core.package import Package

        if not self.hello:
            self.hello = self._call({"op": "hello"})[0]
        pkg = Package.load(self.package)
        try:
            digest, name_parts = _package_digest(pkg)
            proof = self.licence.prove(
                device_id=str(self.hello.get("device_id")), model_id=pkg.model_id,
                key_id=pkg.key_id, package_digest=digest,
                client_key=self._client_public.decode(),
            )  # fmt: skip
        finally:
            pkg.close()
        if self.arena is not None:  # a restart: the new worker gets a new arena
            self.arena.close(unmap=False)
            self.arena = None
        if self.shm_bytes > 0:
            try:
                self.arena = ShmArena(self.shm_bytes, slots=SHM_SLOTS)
            except OSError:
                self.arena = None
        msg: dict[str, Any] = {
            "op": "open",
            "licence": self.licence.public_copy().to_json(),
            "proof": proof.to_wire(),
            "client_key": self._client_public.decode(),
            "package_digest": digest,
            "shm_size": self.arena.size if self.arena is not None else 0,
        }
        if self.providers:
            msg["providers"] = list(self.providers)
        if self.device:
            msg["device"] = self.device
        if not self.prepack:
            msg["prepack"] = False
        self._drop_endpoint()  # the previous worker's: its channel is closed by now
        listener, local_path = (None, None)
        if local_channel_enabled():
            if self.dir is None:
                self.dir = tempfile.mkdtemp(prefix="vault-")  # mode 0700
            listener, local_path = listen_socket(self.dir, f"c{next(self._count)}.sock")
            msg["listen_token"] = self.local_token.hex()
        fd = os.open(self.package, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fds = [fd] if self.arena is None else [fd, self.arena.fd]
            if listener is not None:
                fds.append(listener.fileno())  # the last one
            reply, got = self._call(msg, fds, max_fds=1)
        finally:
            os.close(fd)
            if listener is not None:
                listener.close()  # only the worker holds it now
        # The worker's ZeroMQ socket sits in a directory only the workers' uid
        # and root can enter (no other user can reach it, or flood it): the
        # daemon sends an O_PATH descriptor of it, and this process connects
        # through its own /proc/self/fd entry.
        if len(got) != 1 or not stat.S_ISSOCK(os.fstat(got[0]).st_mode):
            for extra in got:
                os.close(extra)
            raise ProtocolError("the vault daemon sent no socket for the worker")
        self._endpoint_fd = got[0]
        self.wid = str(reply["worker"])
        self.worker_pid = int(reply["pid"])
        self.server_key = str(reply["server_key"])
        self.ready = dict(reply.get("ready") or {})
        _remember_digest(name_parts, digest)  # its worker checked the signature and the digest
        self.local_path = local_path if self.ready.get("local") else None
        return f"ipc:///proc/self/fd/{self._endpoint_fd}"

    def _drop_endpoint(self) -> None:
        fd, self._endpoint_fd = self._endpoint_fd, None
        if fd is not None:
            os.close(fd)

    def configure(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_serverkey = self.server_key.encode()
        sock.curve_publickey = self._client_public
        sock.curve_secretkey = self._client_secret

    def alive(self) -> bool:
        if self.wid is None:
            return False
        try:
            return bool(self._call({"op": "status", "worker": self.wid})[0].get("alive"))
        except (PermissionDeniedError, WorkerCrashedError):
            return False

    @property
    def pid(self) -> int | None:
        return self.worker_pid if self.wid is not None else None

    def daemon_health(self) -> dict[str, Any]:
        reply = self._call({"op": "health"})[0]
        return {k: v for k, v in reply.items() if k not in ("ok", "id")}

    def kill(self) -> None:
        wid, self.wid = self.wid, None
        if wid is not None and os.getpid() == self._owner:
            try:
                self._call({"op": "close", "worker": wid})
            except (ConfigError, PermissionDeniedError, WorkerCrashedError):
                pass  # already gone: the daemon drops a dead worker with its connection

    def close(self) -> None:
        self.kill()
        with self._lock:
            if self._sock is not None:
                self._sock.close()  # the daemon stops anything left of ours
                self._sock = None
        self._drop_endpoint()
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        if self.dir is not None and os.getpid() == self._owner:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


class _Remote:
    """A worker service reached over tcp:// with CURVE; ``model`` picks one of
    the service's models (sent in every request header). With several
    addresses (replicas of one service), calls take turns among them and a
    call whose service went away is sent to another."""

    def __init__(
        self, addresses: Sequence[str], licence: Licence, server_key: str, model: str | None = None
    ) -> None:
        self.addresses = list(addresses)
        self.address = ",".join(self.addresses)
        self.licence = licence
        self.server_key = server_key
        self.model = model

    def channel(self, ctx: zmq.Context[Any], max_message: int) -> Channel:
        keys = (self.licence.client_public_key.encode(), self.server_key.encode())
        if len(self.addresses) == 1:
            return _WatchedChannel(ctx, self.addresses[0], configure=self.configure,
                                   max_message=max_message, send_timeout_ms=5000,
                                   sealed_keys=keys, expires_at=self.licence.expires_at)  # fmt: skip
        return _FailoverChannel([_WatchedChannel(ctx, a, configure=self.configure,
                                                 max_message=max_message, sealed_keys=keys,
                                                 wait_handshake=False,
                                                 expires_at=self.licence.expires_at)
                                 for a in self.addresses])  # fmt: skip

    def configure(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_serverkey = self.server_key.encode()
        sock.curve_publickey = self.licence.client_public_key.encode()
        sock.curve_secretkey = self.licence.client_secret_key.encode()


def _handshake_failed(message: str) -> ConfigError:
    """A CURVE handshake that failed (a wrong server key, or a connection the
    service cut): a :class:`ConfigError`, as documented, marked as about the
    connection, not an answer of the service's (see :func:`_is_handshake`)."""
    exc = ConfigError(message)
    exc._vault_handshake = True  # type: ignore[attr-defined]
    return exc


def _is_handshake(exc: BaseException) -> bool:
    return bool(getattr(exc, "_vault_handshake", False))


def _listens(endpoint: str, timeout: float = 1.0) -> bool:
    """Whether something accepts a TCP connection at ``tcp://HOST:PORT`` now
    (a connection made and closed at once; True where it cannot be told)."""
    import socket

    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except ConnectionRefusedError:
        return False
    except (OSError, ValueError):
        return True


class _WatchedChannel(ZmqChannel):
    """One service (or one replica of it), watched through a ZeroMQ socket
    monitor, so that a call never waits for its timeout on a service that is
    not there: a connection that drops (the host or its service died) ends the
    waiting call at once, and a send that finds no connection says why,
    within ``send_timeout_ms``:

    - nothing listens at the address (a connection refused, or none made
      within the send timeout): :class:`ServiceUnavailableError`;
    - the CURVE handshake failed (the server key is not the service's):
      :class:`ConfigError`;
    - the service refused this caller's key (ZAP: not on its allow-list, or
      not a live call licence): :class:`UnknownLicenceError`;
    - the service could not check it (ZAP status 500: its key server is
      unavailable): :class:`KeyServerUnavailableError`.
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        endpoint: str,
        *,
        configure: Callable[[zmq.Socket[Any]], None],
        max_message: int,
        send_timeout_ms: int = 1000,
        sealed_keys: tuple[bytes, bytes] | None = None,
        wait_handshake: bool = True,
        expires_at: float | None = None,
    ) -> None:
        # the caller's licence's own expiry: what a refusal means once it is past
        self._expires_at = expires_at
        # computes travel sealed (AES-256-GCM on a second connection, keys
        # agreed over this CURVE one: vault/core/sealed.py) when the service
        # offers it; ``sealed_keys`` = (our CURVE public key, the server's)
        self._sealed_keys = sealed_keys if sealed_enabled() else None
        self._sealed = threading.local()
        self._sealed_socks: list[zmq.Socket[Any]] = []
        self._sealed_lock = threading.Lock()
        self._send_timeout_ms = send_timeout_ms
        # a connection up whose handshake is not done (a busy service) is waited
        # for up to the call's timeout; not where other replicas could answer
        self._wait_handshake = wait_handshake
        self._mon = threading.local()
        self._monitors: list[zmq.Socket[Any]] = []
        self._mon_lock = threading.Lock()

        def setup(sock: zmq.Socket[Any]) -> None:
            configure(sock)
            # queue nothing for a replica that is not connected (a message
            # queued for a dead one would wait for its return): the send
            # fails instead, and the call goes to another replica
            sock.immediate = True
            mon = sock.get_monitor_socket(
                zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CONNECT_RETRIED
                | zmq.EVENT_CONNECTED
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            )  # fmt: skip
            with self._mon_lock:
                self._monitors.append(mon)
            self._mon.sock = mon
            self._mon.lost = False
            self._mon.refused = None
            self._mon.listening = False  # a connection is up, its handshake maybe not yet

        super().__init__(ctx, endpoint, alive=self._connected, configure=setup,
                         max_message=max_message)  # fmt: skip

    def _events(self) -> None:
        mon: zmq.Socket[Any] | None = getattr(self._mon, "sock", None)
        # one getsockopt, not Socket.poll(0): poll builds a Poller, and this
        # runs before every call
        while mon is not None and int(mon.get(_EVENTS)) & _POLLIN:
            from zmq.utils.monitor import recv_monitor_message

            msg = recv_monitor_message(mon)
            ev = msg["event"]
            if ev == zmq.EVENT_DISCONNECTED:
                self._mon.lost = True
                self._mon.listening = False
            elif ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._mon.refused = None
            elif ev == zmq.EVENT_CONNECTED:  # something listens; its handshake says the rest
                self._mon.listening = True
                if self._mon.refused == "unreachable":
                    self._mon.refused = None
            elif ev == zmq.EVENT_CONNECT_RETRIED:
                self._mon.listening = False
                # a retry after a refused connection means nothing listens; after a
                # failed handshake, that failure is the reason
                if self._mon.refused is None:
                    self._mon.refused = "unreachable"
            elif ev == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                # the ZAP status code, all the service tells: 400 refused, 500
                # "could not check it" (its key server unavailable)
                self._mon.refused = "unchecked" if int(msg["value"]) == 500 else "auth"
            else:
                self._mon.refused = "handshake"

    def _send(self, sock: zmq.Socket[Any], parts: list[Any], timeout: float) -> None:
        """Send once a connection is up, watching the monitor meanwhile: a
        handshake the service refuses (a wrong server key, a caller's key it
        does not know) ends the wait at once; no connection within the send
        timeout means nothing listens (``zmq.Again``: see :meth:`_gone`). A
        connection made whose handshake is still under way (a service busy
        answering other handshakes) is waited for up to the call's timeout:
        something listens there, and its handshake will say the rest (not
        for a replica among others: the call goes to the next one)."""
        start = time.monotonic()
        deadline = start + self._send_timeout_ms / 1000
        mon: zmq.Socket[Any] | None = getattr(self._mon, "sock", None)
        first = True
        while True:
            try:
                sock.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
                self._mon.lost = False  # what happened before the send is not this call's
                return
            except zmq.Again:
                pass
            self._events()
            if first:  # a refusal seen before this call (a service since restarted, a key
                self._mon.refused = None  # since allowed) says nothing: the next attempt does
                first = False
            if self._wait_handshake and getattr(self._mon, "listening", False):
                deadline = max(deadline, start + timeout)
            left_ms = int((deadline - time.monotonic()) * 1000)
            if getattr(self._mon, "refused", None) is not None or left_ms <= 0:
                raise zmq.Again()
            if mon is not None:
                mon.poll(min(left_ms, 50))
            else:  # pragma: no cover - every socket of this channel has a monitor
                time.sleep(0.01)

    def _lost(self) -> bool:
        self._events()
        lost = bool(getattr(self._mon, "lost", False))
        self._mon.lost = False
        return lost

    def _connected(self) -> bool:
        return not self._lost()

    def _gone(self, why: str) -> VaultError:
        self._events()
        refused = getattr(self._mon, "refused", None)
        if refused == "unchecked":
            return KeyServerUnavailableError(
                f"the service at {self.endpoint} could not check this caller's licence: its key "
                "server is unavailable (nobody new gets in until it answers): retry later"
            )
        if refused == "auth":
            # the service says "refused" and nothing more, the same for each
            # reason (a stranger learns nothing of a key); its log says which.
            # A licence whose own record says it has expired: that is why
            if self._expires_at is not None and time.time() >= self._expires_at:
                return LicenceExpiredError(
                    f"the service at {self.endpoint} refused this caller's key: its licence "
                    f"expired at {_utc(self._expires_at)}: ask the vendor for a new one"
                )
            return UnknownLicenceError(
                f"the service at {self.endpoint} refused this caller's key: it is not on the "
                "service's allow-list, or not a live call licence (unknown to its key server, "
                "revoked, expired or spent; the service's log says which), or, for a moment, "
                "this address has tried more unknown keys than the service asks the key server "
                "about: retry"
            )
        if refused == "handshake":
            # the service dropped the connection mid-handshake: a wrong server
            # key looks the same, on the wire, as a service that stopped then
            if self.endpoint.startswith("tcp://") and not _listens(self.endpoint):
                return ServiceUnavailableError(
                    f"the service at {self.endpoint} closed the connection during the CURVE "
                    "handshake and no longer listens: it stopped (retry when it is back, or "
                    "another replica)"
                )
            return _handshake_failed(
                f"the CURVE handshake with {self.endpoint} failed: the server key given is not "
                "this service's (get its current key from the vendor), or the service cut the "
                "connection (too many from this address, or a handshake that took too long: "
                "retry)"
            )
        if getattr(self._mon, "listening", False) and "cannot send" in why:
            return ServiceUnavailableError(
                f"the service at {self.endpoint} took the connection but did not finish its "
                "handshake within the call's timeout: it is busy, or what listens there is not "
                "a vault service"
            )
        return ServiceUnavailableError(
            f"the service at {self.endpoint} is not reachable ({why.split(';')[0]}): it stopped, "
            "or nothing listens there"
        )

    def request(
        self, header: Mapping[str, Any], frames: Sequence[Any] = (), *, timeout: float
    ) -> tuple[dict[str, Any], list[Any]]:
        self._lost()  # a drop before this call says nothing about it
        size = sum(memoryview(f).nbytes for f in frames)
        if size > self._max_message:
            # refused here, as a local worker's channel does: past the service's
            # message limit it drops the connection unanswered (the call waited out
            # its timeout)
            raise ProtocolError(f"request of {size} bytes exceeds the limit of {self._max_message}")
        if self._sealed_keys is not None and header.get("op") == "compute":
            prev: tuple[bytes, int] | None = None
            last_sent = True
            for _attempt in range(2):
                state = self._sealed_session(timeout, prev)
                if state is None:
                    break  # the service offers no sealed calls: CURVE it is
                try:
                    return self._sealed_request(state, header, frames, timeout)
                except _UnknownSession as gone:
                    # the service forgot it (restart, eviction), or a party on the
                    # wire says so: the next session's request asks, over CURVE,
                    # whether this call was accepted before it is sent again
                    prev = (gone.sid, gone.seq)
                    self._drop_sealed()
                    last_sent = gone.sent
                except _NoSealedRoute:
                    # its port cannot be reached from here (a firewall that lets
                    # only the service's port through): this thread stays on CURVE
                    self._drop_sealed()
                    self._sealed.refused = True
                    break
            else:
                if last_sent:
                    raise IntegrityError("the service did not recognise a fresh sealed session")
                # Two fresh sessions, each refused by the sealed port at its
                # handshake: that port reaches another server than the one that
                # made them (replicas behind one address, each connection
                # balanced on its own). Nothing of this call was sent there, and
                # the session answer said the first attempt was not accepted:
                # it goes over CURVE, as this thread's calls will from now on.
                self._sealed.refused = True
        return super().request(header, frames, timeout=timeout)

    # -- sealed calls --------------------------------------------------------------

    def _sealed_session(
        self, timeout: float, prev: tuple[bytes, int] | None = None
    ) -> _SealedState | None:
        """This thread's session with the service: made over CURVE on first use.
        ``prev``: the session and message number of a call whose answer was a
        plain "unknown session"; the service ends that session and says
        whether it accepted the call, which is then sent again only if not."""
        state: _SealedState | None = getattr(self._sealed, "state", None)
        if state is not None or getattr(self._sealed, "refused", False):
            return state
        assert self._sealed_keys is not None
        rand = os.urandom(sealed.RAND_BYTES)
        ask: dict[str, Any] = {"op": "session", "rand": rand}
        if prev is not None:
            ask.update(prev=prev[0], prev_seq=prev[1])
        try:
            hdr, _ = super().request(ask, timeout=timeout)
        except (ProtocolError, ConfigError) as exc:  # a service that offers none ("unknown op")
            if _is_handshake(exc):  # the connection, not the service's answer: not a "no"
                raise
            self._sealed.refused = True
            return None
        sid, srand, port = hdr.get("sid"), hdr.get("rand"), hdr.get("port")
        if not isinstance(sid, bytes) or not isinstance(srand, bytes) or not isinstance(port, int):
            raise ProtocolError("malformed sealed session answer")
        c2s, s2c, password = sealed.derive_session(rand, srand, sid, *self._sealed_keys)
        host = self.endpoint[len("tcp://") :].rpartition(":")[0]
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.maxmsgsize = self._max_message
        sock.copy_threshold = sealed.CHUNK + 4096  # chunks are copied: no gc-thread wake-ups
        # nothing queued for a connection that is not up: a send waits for the
        # handshake (see _sealed_send), and one that cannot be made goes over CURVE
        sock.immediate = True
        sock.plain_username = sid.hex().encode()  # the sealed port admits a session's holder only
        sock.plain_password = password.encode()
        mon = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED
        )
        sock.connect(f"tcp://{host}:{port}")
        with self._sealed_lock:
            self._sealed_socks += [sock, mon]
        state = _SealedState(sock, sealed.Sealer(c2s, sid), sealed.Opener(s2c, sid), mon)
        self._sealed.state = state
        if prev is not None and hdr.get("prev") == "accepted":
            # the service ran that call: its answer was replaced on the way by a
            # plain refusal nobody can authenticate; it is not sent twice
            raise IntegrityError(
                "the service ran this call but its answer did not arrive intact "
                "(replaced on the way); it was not sent again"
            )
        return state

    def _drop_sealed(self) -> None:
        state: _SealedState | None = getattr(self._sealed, "state", None)
        self._sealed.state = None
        if state is not None:
            with self._sealed_lock:
                for s in (state.sock, state.mon):
                    if s in self._sealed_socks:
                        self._sealed_socks.remove(s)
            state.sock.disable_monitor()
            state.mon.close(linger=0)
            state.sock.close(linger=0)

    @staticmethod
    def _sealed_send(state: _SealedState, parts: list[Any]) -> None:
        """Send a sealed message once the sealed connection is up. A handshake
        the sealed port refuses means it knows no such session (a restart):
        :class:`_UnknownSession` (nothing was sent); no connection within
        ``_SEALED_CONNECT_MS``: :class:`_NoSealedRoute`."""
        sock = state.sock
        try:
            sock.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
            return
        except zmq.Again:
            pass
        from zmq.utils.monitor import recv_monitor_message

        deadline = time.monotonic() + _SEALED_CONNECT_MS / 1000
        while True:
            # woken by the handshake's outcome, not by a clock: a first call
            # pays the connection, nothing more
            while state.mon.poll(min(50, max(1, int((deadline - time.monotonic()) * 1000)))):
                if recv_monitor_message(state.mon)["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    raise _UnknownSession(state.sealer.sid, state.sealer.seq, sent=False)
                break  # a handshake succeeded: send
            try:
                sock.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
            if time.monotonic() >= deadline:
                raise _NoSealedRoute()

    def _sealed_request(
        self, state: _SealedState, header: Mapping[str, Any], frames: Sequence[Any], timeout: float
    ) -> tuple[dict[str, Any], list[Any]]:
        rid = next(self._ids)
        msg = {**header, "v": PROTOCOL_VERSION, "id": rid}
        sock = state.sock
        self._sealed_send(state, state.sealer.seal([pack_header(msg), *frames]))
        deadline = time.monotonic() + timeout
        try:
            while True:
                # a receive timeout, not Socket.poll() (a Poller per call): the
                # socket keeps its last slice, so this is a setsockopt per change
                slice_ms = max(1, min(_POLL_SLICE_MS, int((deadline - time.monotonic()) * 1000)))
                if slice_ms != state.rcvtimeo:
                    sock.rcvtimeo = state.rcvtimeo = slice_ms
                try:
                    reply = sock.recv_multipart(copy=False)
                    break
                except zmq.Again:
                    pass
                if not self._connected():  # the service went away (its CURVE connection did)
                    self._drop_sealed()
                    raise self._gone("the connection dropped")
                if time.monotonic() >= deadline:
                    self._drop_sealed()  # a late answer must never meet the next call
                    raise WorkerTimeoutError(f"no answer from the service within {timeout:g}s")
        except zmq.ZMQError as exc:
            self._drop_sealed()
            raise self._gone(f"the sealed channel failed: {exc.strerror}") from None
        if reply and reply[0].bytes == sealed.ERROR_TAG:
            # not sealed: whatever it claims, it can only ever be an error
            try:
                plain = unpack_header(reply[1]) if len(reply) == 2 else {}
            except VaultError:
                plain = {}
            if plain.get("session") == "unknown":
                raise _UnknownSession(state.sealer.sid, state.sealer.seq)
            err = plain.get("error")
            why = err.get("message") if isinstance(err, dict) else None
            raise IntegrityError(
                f"the service could not authenticate this call ({str(why or 'no reason')[:200]})"
            )
        out = state.opener.open(reply)  # IntegrityError: tampered, replayed, reordered, cut
        hdr = unpack_header(out[0])
        if hdr.get("id") != rid:
            self._drop_sealed()
            if hdr.get("id") is None:  # refused before its id was read (a header too large)
                raise_for_reply(hdr)
            raise ProtocolError("the service answered another call")
        raise_for_reply(hdr)
        return hdr, out[1:]

    def close(self) -> None:
        super().close()
        with self._mon_lock:
            mons, self._monitors = self._monitors, []
        for m in mons:
            m.close(linger=0)
        with self._sealed_lock:
            socks, self._sealed_socks = self._sealed_socks, []
        for s in socks:
            s.close(linger=0)


_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: no enum arithmetic per call
_SEALED_CONNECT_MS = 5000  # how long a first sealed call waits for its connection
_POLL_SLICE_MS = 100  # how often a waiting sealed call checks that its service is there


class _NoSealedRoute(Exception):
    """The sealed port could not be reached: nothing was sent."""


class _UnknownSession(Exception):
    """The service answered (plainly, so maybe not the service) that it knows
    no such sealed session, or its sealed port refused the session at the
    handshake (``sent`` False: nothing of the call left this caller);
    ``sid`` and ``seq``: the message that got no sealed answer."""

    def __init__(self, sid: bytes, seq: int, *, sent: bool = True) -> None:
        super().__init__("unknown sealed session")
        self.sid, self.seq, self.sent = sid, seq, sent


class _SealedState:
    """One thread's sealed session: its socket, the two directions, and the
    socket's monitor (a refused handshake)."""

    __slots__ = ("sock", "sealer", "opener", "mon", "rcvtimeo")

    def __init__(
        self, sock: zmq.Socket[Any], sealer: sealed.Sealer, opener: sealed.Opener,
        mon: zmq.Socket[Any],
    ) -> None:  # fmt: skip
        self.sock, self.sealer, self.opener, self.mon = sock, sealer, opener, mon
        self.rcvtimeo = -1  # the socket's receive timeout as last set (-1: libzmq's default)


def _filled_pipe(data: bytes, opened: list[int]) -> int:
    """A pipe holding ``data`` (a secret, a few KiB at most: it fits the pipe
    buffer), its write end closed; its read end, for an assignment. Both ends
    go into ``opened`` for the caller to close."""
    r, w = os.pipe()
    opened.append(r)
    try:
        os.set_blocking(w, False)
        if os.write(w, data) != len(data):
            raise ConfigError("a secret too large for its pipe")
    except BlockingIOError:
        raise ConfigError("a secret too large for its pipe") from None
    finally:
        os.close(w)
    return r


def local_channel_enabled() -> bool:
    """Whether a local worker is reached over the direct local channel
    (``VAULT_LOCAL_CHANNEL=0`` keeps its calls on ZeroMQ, as before)."""
    return os.environ.get("VAULT_LOCAL_CHANNEL", "1") != "0"


def sealed_enabled() -> bool:
    """Whether remote computes go sealed (``VAULT_SEALED=0`` keeps them on CURVE)."""
    return os.environ.get("VAULT_SEALED", "1") != "0"


class _FailoverChannel(Channel):
    """Replicas of one service: calls take turns; a call that a replica could
    not complete (its connection dropped, its worker crashed, it is draining)
    goes to the next one. Such a call was not counted by the replica that
    failed it, so it is never counted twice; errors about the call itself
    (licence, input) are not retried."""

    _RETRY = (WorkerCrashedError, ServiceUnavailableError)

    def __init__(self, channels: Sequence[Channel], *, down_for: float = 2.0) -> None:
        self.channels = list(channels)
        self._turn = itertools.count()
        self._down_until = [0.0] * len(self.channels)
        self._down_for = down_for

    def request(
        self, header: Mapping[str, Any], frames: Sequence[Any] = (), *, timeout: float
    ) -> tuple[dict[str, Any], list[Any]]:
        n = len(self.channels)
        first = next(self._turn) % n
        now = time.monotonic()
        order = sorted(range(n), key=lambda i: (self._down_until[i] > now, (i - first) % n))
        last: VaultError | None = None
        for i in order:
            try:
                return self.channels[i].request(header, frames, timeout=timeout)
            except self._RETRY as exc:
                self._down_until[i] = time.monotonic() + self._down_for
                last = exc
        assert last is not None
        raise last

    def close(self) -> None:
        for c in self.channels:
            c.close()


# --- the model ----------------------------------------------------------------------------


def check_feeds_mapping(inputs: Any, signature: Mapping[str, Any]) -> None:
    """A compute call takes a dict of input name -> array; a bare array (or a
    list) gets an :class:`InputError` that shows the call to make."""
    if isinstance(inputs, Mapping):
        return
    first = next(iter(signature), "x")
    raise InputError(
        f"compute takes a dict of input name -> array, e.g. compute({{{first!r}: arr}}), "
        f"not a {type(inputs).__name__} (inputs: {', '.join(signature) or 'none'})"
    )


_LIVE: weakref.WeakSet[Model] = weakref.WeakSet()


class _ZmqParts:
    """A Model's context and current channel, apart from the Model: what
    :func:`_release_zmq` closes when a Model is dropped without ``close()``."""

    __slots__ = ("ctx", "channel")

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self.ctx = ctx
        self.channel: Channel | None = None


def _release_zmq(parts: _ZmqParts) -> None:
    """A dropped Model's sockets, then its context. Left to the garbage
    collector, pyzmq's own finaliser hung the process: in a reference cycle
    the sockets' weak references are cleared before the context's ``__del__``
    runs, which then cannot close them and waits for them for ever in
    ``term()``. This runs first (``weakref.finalize`` keeps the parts alive)."""
    channel, parts.channel = parts.channel, None
    if channel is not None:
        try:
            channel.close()
        except Exception:  # noqa: BLE001 - best effort: nobody is left to tell
            pass
    if not parts.ctx.closed:
        parts.ctx.destroy(linger=0)


def _after_fork_in_child() -> None:
    # what the parent opened stays the parent's: the child's exit must not
    # close its models (they removed the parent's worker directory: its next
    # calls could not connect), and the parent's pre-started worker is not
    # the child's to take or stop (its directory went with it: the parent's
    # next open failed with FileNotFoundError)
    # (the pre-started worker's own hook is in vault/core/standby.py)
    _LIVE.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_all() -> None:
    for m in list(_LIVE):
        try:
            m.close()
        except Exception:  # pragma: no cover - best effort at exit
            pass
    # the waiting worker is stopped by vault/core/standby.py's own exit hook
    # (registered before this one: it runs after it)


def _signature(items: Any) -> dict[str, tuple[str, tuple[Any, ...]]]:
    return {str(d["name"]): (str(d["dtype"]), tuple(d.get("shape") or ())) for d in items or []}


class Model:
    """A sealed model served by a worker; see the module docstring.

    It talks to its worker through a :class:`~vault.core.channel.Channel`
    (ZeroMQ for real workers; :class:`~vault.core.channel.InProcessChannel`
    in unit tests, passed as ``channel=``)."""

    def __init__(
        self,
        *,
        local: _LocalWorker | _DaemonWorker | None = None,
        remote: _Remote | None = None,
        channel: Channel | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self._localw = local
        self._remote = remote
        self.timeout = timeout
        self._max_message = max_message
        self._ctx: zmq.Context[Any] | None = None
        self._lock = threading.Lock()
        self._channel: Channel | None = channel
        self._fixed_channel = channel is not None
        self._generation = 0
        self._endpoint: str | None = None
        self._dead = False
        self._closed = False
        self._plans = RepeatPlans(copy=True)  # each calling thread's plan for answers
        _LIVE.add(self)
        self._release: weakref.finalize[Any, Any] | None = None
        try:
            if not self._fixed_channel:
                self._ctx = zmq.Context()
                self._zmq = _ZmqParts(self._ctx)
                self._release = weakref.finalize(self, _release_zmq, self._zmq)
                self._start()
            info = self._request({"op": "info"})[0]
        except BaseException:
            self.close()
            raise
        self.info = {k: v for k, v in info.items() if k not in ("v", "id", "ok")}
        self.inputs = _signature(info.get("inputs"))
        self._input_types = {n: t for n, (t, _) in self.inputs.items()}
        self.outputs = _signature(info.get("outputs"))
        self.model_id = info.get("model_id")

    # -- plumbing ---------------------------------------------------------------

    def _start(self) -> None:
        assert self._ctx is not None
        if self._channel is not None:
            self._channel.close()
        if self._localw is not None:
            self._endpoint = self._localw.start()
            local_path = self._localw.local_path
            if local_path is not None:
                self._channel = LocalChannel(local_path, token=self._localw.local_token,
                                             alive=self._localw.alive,
                                             max_message=self._max_message)  # fmt: skip
            else:
                self._channel = ZmqChannel(
                    self._ctx,
                    self._endpoint,
                    alive=self._localw.alive,
                    configure=self._localw.configure,
                    max_message=self._max_message,
                )
        else:
            assert self._remote is not None
            self._endpoint = self._remote.address
            self._channel = self._remote.channel(self._ctx, self._max_message)
        self._zmq.channel = self._channel
        self._generation += 1
        self._dead = False

    def _current(self) -> tuple[int, Channel]:
        if self._closed:
            raise ConfigError("model is closed")
        if self._dead:
            with self._lock:  # one thread restarts; the others then use the new worker
                if self._closed:
                    raise ConfigError("model is closed")
                if self._dead:
                    assert self._localw is not None
                    self._localw.kill()
                    self._start()
        assert self._channel is not None
        return self._generation, self._channel

    def _request(
        self, header: Mapping[str, Any], frames: Sequence[Any] = (), timeout: float | None = None
    ) -> tuple[dict[str, Any], list[Any]]:
        gen, channel = self._current()
        limit = self.timeout if timeout is None else timeout
        if self._remote is not None:
            # a service routes by model id, and frees the call's slot when we give up
            extra: dict[str, Any] = {"timeout": limit}
            if self._remote.model is not None:
                extra["model"] = self._remote.model
            header = {**header, **extra}
        try:
            return channel.request(header, frames, timeout=limit)
        except WorkerCrashedError:
            if self._localw is not None:
                with self._lock:
                    if gen == self._generation:
                        self._dead = True
            raise

    # -- public API ---------------------------------------------------------------

    def compute(
        self,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Run the pipeline; returns the chosen (default: all) outputs by name.
        ``inputs`` is a dict of input name -> array (``model.inputs`` lists
        them); anything else is an :class:`InputError` saying so."""
        check_feeds_mapping(inputs, self.inputs)
        arena = self._localw.arena if self._localw is not None else None
        shm_from = shm_threshold(inputs) if arena is not None else None
        slot = arena.acquire() if arena is not None and shm_from is not None else None
        region = arena.region(slot) if arena is not None and slot is not None else None
        reusable = True
        try:
            descs, frames = encode_tensors(
                inputs, region, min_bytes=shm_from, types=self._input_types
            )
            header: dict[str, Any] = {"op": "compute", "tensors": descs}
            if region is not None:
                header["shm"] = region.to_wire()
            if outputs is not None:
                header["outputs"] = list(outputs)
            try:
                hdr, out_frames = self._request(header, frames, timeout)
            except WorkerTimeoutError:
                reusable = False  # the worker may still write into this slot: never reuse it
                raise
            # outputs in the slot are copied out: the next call reuses it
            answer = hdr.get("tensors")
            key = (region.start, region.end) if region is not None else None
            plan = self._plans.plan
            result = plan.decode(answer, key, out_frames, region) if plan is not None else None
            if result is None:
                result = decode_tensors(answer, out_frames, region, copy=True, bound=False)
                self._plans.learn(answer, key, result)
            return result
        finally:
            if arena is not None and slot is not None and reusable:
                arena.release(slot)

    async def compute_async(
        self,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """:meth:`compute` for asyncio code (runs in the loop's executor)."""
        import asyncio  # here: 30 ms of a first open's imports for code that never awaits

        loop = asyncio.get_running_loop()
        call = functools.partial(self.compute, inputs, outputs, timeout=timeout)
        return await loop.run_in_executor(None, call)

    def _op(self, op: str) -> dict[str, Any]:
        hdr, _ = self._request({"op": op})
        return {k: v for k, v in hdr.items() if k not in ("v", "id", "ok")}

    def health(self) -> dict[str, Any]:
        """Hardening report, provider and lease state of the worker."""
        return self._op("health")

    def stats(self) -> dict[str, Any]:
        """Calls served and latency percentiles (milliseconds)."""
        return self._op("stats")

    @property
    def startup_ms(self) -> dict[str, float]:
        """The local worker's own startup phases, in milliseconds (``imports``,
        ``verify``, ``key_release``, ``decrypt``, ``import_wait``, ``session``);
        empty for a remote worker."""
        w = self._localw
        return dict(w.ready.get("timings_ms") or {}) if w is not None else {}

    @property
    def pid(self) -> int | None:
        """The local worker's process id (None for a remote worker)."""
        w = self._localw
        return w.pid if w is not None else None

    @property
    def tier(self) -> int | None:
        """The protection tier the worker reports (0 same user, 1 local daemon,
        2 vendor-hosted), as read from its health; None if it does not say.
        (A remote worker or service says it at the top of its health, a local
        worker also in its hardening report.)"""
        health = self.health()
        top = health.get("tier")
        if isinstance(top, int) and not isinstance(top, bool):
            return top
        status = health.get("hardening", {}).get("tier", {}).get("status")
        return int(status) if isinstance(status, str) and status.isdigit() else None

    def close(self) -> None:
        """Stop the worker (local), close every socket, remove the private directory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._channel is not None:
            self._channel.close()
        if self._localw is not None:
            self._localw.close()
        if self._ctx is not None:
            self._ctx.term()
        if self._release is not None:
            self._release.detach()
        _LIVE.discard(self)

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "local" if self._localw is not None else self._endpoint
        return f"Model({self.model_id!r}, {where}, inputs={list(self.inputs)}, outputs={list(self.outputs)})"

    def __reduce__(self) -> Any:
        raise TypeError("Model is a live connection and cannot be pickled")


def _model_of(w: _LocalWorker | _DaemonWorker, timeout: float) -> Model:
    """A Model over a freshly made local worker; the worker goes if that fails."""
    try:
        return Model(local=w, timeout=timeout)
    except BaseException:
        w.close()
        raise


def open(  # noqa: A001 - the public contract is vault.open()
    path: str | os.PathLike[str],
    licence: str | os.PathLike[str] | Licence | None = None,
    *,
    license: str | os.PathLike[str] | Licence | None = None,  # noqa: A002 - US spelling
    providers: Sequence[str] | None = None,
    device: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    start_timeout: float = START_TIMEOUT,
    worker_args: Sequence[str] = (),
    shm_bytes: int = DEFAULT_SHM_BYTES,
    daemon: str | os.PathLike[str] | None = None,
    prepack: bool = True,
) -> Model:
    """Open the package at ``path`` with a worker and return its Model.

    The worker comes from the local daemon (tier 1) at ``daemon``, else
    ``$VAULT_DAEMON``, else ``/run/vault/daemon.sock`` when it exists. With no
    daemon, only a licence issued ``--same-user`` spawns the worker as this
    user (tier 0); any other licence fails with one line saying what to do.
    ``worker_args`` (tier 0 only) are passed to the worker; through the daemon
    its hardening is the daemon's configuration and such a request is refused.
    ``shm_bytes`` sizes the shared memory used for large tensors (0: frames only).
    ``prepack=False`` keeps the decrypted weights the worker's only copy
    (onnxruntime makes no packed copy of MatMul/Conv weights): about half the
    peak memory of a MatMul-heavy model, for slower MatMuls (docs/worker.md).
    (``vault.open`` also opens a ``vault split`` directory as a hybrid: see
    :func:`vault.open`.)"""
    lic_arg = licence if licence is not None else license
    if lic_arg is None:
        raise ConfigError("vault.open needs licence=...")
    lic = Licence.load(lic_arg)
    if lic.kind != "runtime":
        raise ConfigError(
            f"licence {lic.licence_id} is {'an' if lic.kind[:1] in 'aeiou' else 'a'} "
            f"{lic.kind} licence: it gives no key "
            "(a call licence is for vault.connect to a vendor's service)"
        )
    sock_path = daemon_socket(daemon)
    w: _LocalWorker | _DaemonWorker
    if sock_path is not None:
        if worker_args:
            raise ConfigError(
                "worker_args cannot be passed through the daemon: the worker's hardening "
                "is the daemon's configuration, not the caller's"
            )
        w = _DaemonWorker(
            os.fspath(path),
            lic,
            socket_path=sock_path,
            providers=providers,
            device=device,
            start_timeout=start_timeout,
            shm_bytes=shm_bytes,
            prepack=prepack,
        )
    elif lic.same_user:
        w = _LocalWorker(
            os.fspath(path),
            lic,
            providers=providers,
            device=device,
            start_timeout=start_timeout,
            worker_args=worker_args,
            shm_bytes=shm_bytes,
            prepack=prepack,
        )
    else:
        raise ConfigError(
            f"licence {lic.licence_id} needs the local daemon: start `vault daemon` "
            f"(or set ${ENV_VAR} / daemon=PATH to its socket), or ask the vendor for a "
            "--same-user licence (tier 0: your user could then extract the model)"
        )
    return _model_of(w, timeout)


def open_with_unsafe_test_key(
    path: str | os.PathLike[str],
    *,
    key: bytes | bytearray,
    publisher: str | os.PathLike[str],
    timeout: float = DEFAULT_TIMEOUT,
    worker_args: Sequence[str] = (),
    python: str | None = None,
    shm_bytes: int = DEFAULT_SHM_BYTES,
) -> Model:
    """UNSAFE, for tests and air-gapped debugging only: hand the raw package
    key to the worker over a pipe, bypassing the key server (no licence check,
    no lease, no audit). ``publisher`` is the publisher's public key file."""
    w = _LocalWorker(
        os.fspath(path),
        None,
        providers=None,
        device=None,
        start_timeout=START_TIMEOUT,
        unsafe_key=bytes(key),
        publisher=os.fspath(publisher),
        worker_args=worker_args,
        python=python,
        shm_bytes=shm_bytes,
    )
    return _model_of(w, timeout)


def connect(
    address: str | Sequence[str],
    licence: str | os.PathLike[str] | Licence | None = None,
    *,
    server_key: str | os.PathLike[str],
    license: str | os.PathLike[str] | Licence | None = None,  # noqa: A002
    model: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Model:
    """Use a remote worker service (``vault worker serve``) over tcp:// with CURVE.

    ``server_key`` is the service's Z85 CURVE public key, a file holding it
    (``vault worker serve --server-key-out worker.pub``), or the service's
    public certificate from ``vault worker keygen`` (``worker.key``; its
    ``worker.key_secret`` is refused: :class:`ConfigError`).
    A licence whose own file says it expired more than 5 minutes ago is
    refused before dialing (:class:`LicenceExpiredError`; the margin is for
    this machine's clock); one the service refuses after its own expiry
    raises the same.
    ``model`` names the model when the service serves several (its model id).
    ``address`` may name several replicas of one service (a list, or
    ``"tcp://a:7701,tcp://b:7701"``, same server key): calls take turns, and
    a call whose replica went away is sent to another.
    """
    addresses = (
        [a.strip() for a in address.split(",")] if isinstance(address, str) else list(address)
    )
    if not addresses:
        raise ConfigError("vault.connect needs an address")
    for a in addresses:
        check_endpoint(a)  # a malformed address fails here, at once
    lic = licence if licence is not None else license
    if lic is None:
        raise ConfigError("vault.connect needs licence=...")
    key = read_public_key(server_key)
    loaded = Licence.load(lic)
    if loaded.expires_at is not None and time.time() >= loaded.expires_at + _CLOCK_SKEW_S:
        # its own record says so: refused before dialing, as a connection
        # made before it expired is refused once it has (the service's ZAP
        # answer cannot say why: "refused" is all a stranger may learn); past
        # a margin for this machine's clock, the service being the judge
        raise LicenceExpiredError(
            f"licence {loaded.licence_id} has expired (at {_utc(loaded.expires_at)}): ask the "
            "vendor for a new one"
        )
    return Model(remote=_Remote(addresses, loaded, key, model), timeout=timeout)


_CLOCK_SKEW_S = 300.0  # how far ahead this machine's clock may run of the service's


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


if os.name != "posix":  # pragma: no cover
    raise ImportError("vault.client needs a POSIX system")
