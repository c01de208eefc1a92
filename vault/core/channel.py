"""The request/reply channel between a caller and a worker.

A :class:`Channel` has one job: send a header and raw frames, return the
reply's header and frames within a timeout, or raise a typed
:class:`~vault.core.errors.VaultError`. Everything a ``Model`` does on top
(restarts, shared memory, result decoding) is written once against this
interface, and runs over:

* :class:`ZmqChannel`: the real transport (``ipc://`` to a local worker,
  ``tcp://`` with CURVE to a remote one). It is the one place where ZeroMQ
  errors become ``VaultError``\\ s: an endpoint ZeroMQ refuses is a
  :class:`ConfigError` at once, a silent peer a :class:`WorkerTimeoutError`,
  a local worker that died a :class:`WorkerCrashedError`.
* :class:`InProcessChannel`: a worker's request handler called directly
  (``worker.ops.Service.handle``, or any function of frames to frames), as
  httpx's ``MockTransport`` does for its client: the client's logic is
  tested in milliseconds, with no process and no socket.

Both are safe to use from many threads at once.

Example::

    ch = ZmqChannel(ctx, "ipc:///tmp/vault-x/w.sock", alive=proc_is_alive)
    header, frames = ch.request({"op": "info"}, timeout=5.0)
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import zmq

from .errors import ConfigError, VaultError, WorkerCrashedError, WorkerTimeoutError
from .protocol import (
    DEFAULT_MAX_MESSAGE,
    PROTOCOL_VERSION,
    SHM_MIN_BYTES,
    pack_header,
    raise_for_reply,
    unpack_header,
)

__all__ = ["Channel", "InProcessChannel", "ZmqChannel", "check_endpoint"]

Reply = tuple[dict[str, Any], list[Any]]

# how often a waiting call checks that a local worker still lives
_POLL_SLICE_MS = 100
# how long a call whose peer went away still waits for an answer already on its way
_LAST_REPLY_MS = 50
# frames smaller than this are copied when sent (see ``ZmqChannel._socket``);
# a local worker's larger tensors travel in shared memory above this size
COPY_BELOW = SHM_MIN_BYTES


def check_endpoint(endpoint: str) -> str:
    """``ipc://PATH`` or ``tcp://HOST:PORT``; anything else is a ConfigError."""
    if not isinstance(endpoint, str):
        raise ConfigError("an endpoint is a string: ipc://PATH or tcp://HOST:PORT")
    if endpoint.startswith("ipc://") and len(endpoint) > len("ipc://"):
        return endpoint
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint[len("tcp://") :].rpartition(":")
        if sep and host and port.isdigit() and 0 < int(port) < 65536:
            return endpoint
    raise ConfigError(f"not an endpoint: {endpoint!r} (expected ipc://PATH or tcp://HOST:PORT)")


class Channel:
    """Send one request, get its reply: the interface every transport implements."""

    def request(
        self, header: Mapping[str, Any], frames: Sequence[Any] = (), *, timeout: float
    ) -> Reply:
        """Send ``header`` (never modified) and ``frames``; return the reply's
        header and frames, or raise the worker's typed error."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the channel's resources; later requests raise ConfigError."""
        raise NotImplementedError


class ZmqChannel(Channel):
    """DEALER sockets (one per calling thread) to a worker's ROUTER socket.

    ``alive``: for a local worker, a function that says whether its process
    still runs; a wait that finds it dead ends with WorkerCrashedError.
    ``configure``: called on each new socket (CURVE keys for a remote worker).
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        endpoint: str,
        *,
        alive: Callable[[], bool] | None = None,
        configure: Callable[[zmq.Socket[Any]], None] | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self.endpoint = check_endpoint(endpoint)
        self._ctx = ctx
        self._alive = alive
        self._configure = configure
        self._max_message = max_message
        self._lock = threading.Lock()
        self._tls = threading.local()
        self._sockets: list[zmq.Socket[Any]] = []
        self._ids = itertools.count(1)
        self._closed = False

    def _socket(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] | None = getattr(self._tls, "sock", None)
        if sock is not None and not sock.closed:
            return sock
        with self._lock:
            if self._closed:
                raise ConfigError("the channel is closed")
            sock = self._ctx.socket(zmq.DEALER)
            try:
                sock.linger = 0
                sock.maxmsgsize = self._max_message
                sock.sndhwm = sock.rcvhwm = 1000
                # frames below this are copied at send: a zero-copy frame costs a
                # wake-up of pyzmq's garbage-collector thread (and the GIL) when
                # libzmq lets it go, more than copying up to a few hundred KB
                # (measured: MLP batch 32, 128 KB in, 5.36 -> 5.14 ms a call)
                sock.copy_threshold = COPY_BELOW
                if self._configure is not None:
                    self._configure(sock)
                sock.connect(self.endpoint)
            except zmq.ZMQError as exc:
                sock.close(linger=0)  # never leave a socket behind: the context could not end
                raise ConfigError(f"cannot connect to {self.endpoint!r}: {exc.strerror}") from None
            self._sockets.append(sock)
        self._tls.sock = sock
        self._tls.rcvtimeo = None
        return sock

    def _discard(self, sock: zmq.Socket[Any]) -> None:
        sock.close(linger=0)  # a late reply must never reach the next call
        with self._lock:
            if sock in self._sockets:
                self._sockets.remove(sock)
        if getattr(self._tls, "sock", None) is sock:
            self._tls.sock = None

    def request(
        self, header: Mapping[str, Any], frames: Sequence[Any] = (), *, timeout: float
    ) -> Reply:
        sock = self._socket()
        rid = next(self._ids)
        msg = {**header, "v": PROTOCOL_VERSION, "id": rid}
        deadline = time.monotonic() + timeout  # the send's wait and the answer's, together
        try:
            self._send(sock, [pack_header(msg), *frames], timeout)
        except zmq.ZMQError as exc:
            self._discard(sock)
            raise self._gone(f"cannot send: {exc.strerror}") from None
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            reply = None
            if left_ms > 0:
                # a receive timeout, not Socket.poll(): poll() builds a Poller per
                # call, a measurable part of a small call's round trip
                slice_ms = min(left_ms, _POLL_SLICE_MS) if self._alive else left_ms
                if slice_ms != getattr(self._tls, "rcvtimeo", None):  # a setsockopt per change only
                    sock.rcvtimeo = self._tls.rcvtimeo = slice_ms
                try:
                    reply = sock.recv_multipart(copy=False)
                except zmq.Again:
                    reply = None
                except zmq.ZMQError as exc:
                    self._discard(sock)
                    raise self._gone(f"the channel failed: {exc.strerror}") from None
            if reply is not None:
                hdr = unpack_header(reply[0])
                if hdr.get("id") != rid:
                    continue  # a stale reply to an abandoned call
                raise_for_reply(hdr)
                return hdr, list(reply[1:])
            if self._alive is not None and not self._alive():
                # an answer sent before the peer went away still answers this
                # call (it can be queued behind the drop's notice)
                last = self._last_reply(sock, rid)
                if last is not None:
                    raise_for_reply(last[0])
                    return last
                self._discard(sock)
                raise self._gone("the worker process died; the next call starts a new one")
            if left_ms <= 0:
                self._discard(sock)
                raise WorkerTimeoutError(f"no answer from the worker within {timeout:g}s")

    def _send(self, sock: zmq.Socket[Any], parts: list[Any], timeout: float) -> None:
        """Send one request (a subclass may watch the connection meanwhile, for
        up to the call's ``timeout``)."""
        sock.send_multipart(parts, copy=False)

    def _last_reply(self, sock: zmq.Socket[Any], rid: int) -> Reply | None:
        sock.rcvtimeo = self._tls.rcvtimeo = _LAST_REPLY_MS
        while True:
            try:
                reply = sock.recv_multipart(copy=False)
            except zmq.ZMQError:
                return None
            hdr = unpack_header(reply[0])
            if hdr.get("id") == rid:
                return hdr, list(reply[1:])

    def _gone(self, why: str) -> VaultError:
        """The error for a peer that is no longer there (a local worker died)."""
        return WorkerCrashedError(why)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks, self._sockets = self._sockets, []
        for s in socks:
            s.close(linger=0)


class InProcessChannel(Channel):
    """A worker's handler (frames in, frames out) called in this process.

    The handler runs on a small thread pool so that a request's ``timeout``
    holds as it does over a socket: a handler that does not answer in time
    gives WorkerTimeoutError, and its late answer is dropped.
    """

    def __init__(self, handler: Callable[[list[Any]], list[Any]], *, threads: int = 4) -> None:
        self._handler = handler
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vault-inproc")
        self._ids = itertools.count(1)
        self._closed = False

    def request(
        self, header: Mapping[str, Any], frames: Sequence[Any] = (), *, timeout: float
    ) -> Reply:
        if self._closed:
            raise ConfigError("the channel is closed")
        rid = next(self._ids)
        msg = {**header, "v": PROTOCOL_VERSION, "id": rid}
        # bytes, as they would arrive off a socket: the handler may not keep our buffers
        wire = [pack_header(msg), *(bytes(memoryview(f)) for f in frames)]
        fut = self._pool.submit(self._handler, wire)
        try:
            reply = fut.result(timeout=timeout)
        except FutureTimeout:
            raise WorkerTimeoutError(f"no answer from the worker within {timeout:g}s") from None
        hdr = unpack_header(reply[0])
        raise_for_reply(hdr)
        return hdr, [bytearray(memoryview(f)) for f in reply[1:]]  # owned, like a received frame

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
