"""The direct local channel: a caller's threads and a local worker's threads,
one Unix stream connection each, no ZeroMQ and no thread in between.

Why: over ZeroMQ a small call wakes four threads per direction (the
caller's, its I/O thread, the worker's I/O thread, the worker's router
thread). Here the calling thread writes the request with one ``sendmsg`` and
the worker thread that owns its connection reads it, runs it and writes the
answer: one wake-up per direction, the floor of any two-process design
(``unix_echo`` in the benchmarks).

Who may connect: the **caller** binds a listening socket in its own private
0700 directory and hands the listening descriptor to the worker (inherited at
spawn, or ``SCM_RIGHTS`` through the local daemon); the worker only
``accept``\\ s. So only processes that can reach the caller's directory (its
own uid, and root) can ever connect, and each connection must first send the
32-byte token the caller gave the worker on a pipe (:data:`TOKEN_BYTES`): a
process of the same uid that holds no token gets no answer, as on the
ZeroMQ path, where the caller's CURVE key plays that part. The worker needs
no file system access for it at all.

A message is a *record*: ``<I I Q`` (magic, frame count, payload bytes on
the wire), one ``<Q`` length per frame, then the frames, the head and each
frame padded with zeros to a multiple of 64 bytes (so every tensor a
receiver reads in place starts aligned); the frames are the ZeroMQ path's
(a msgpack header, then one frame per tensor), so the worker's handler is
the same function for both.

Example::

    listener, path = listen_socket(private_dir)       # caller
    token = os.urandom(TOKEN_BYTES)
    ... spawn the worker with listener.fileno(), the token on a pipe ...
    listener.close()
    ch = LocalChannel(path, token=token, alive=proc_is_alive)
    header, frames = ch.request({"op": "info"}, timeout=5.0)
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .channel import Channel
from .errors import (
    ConfigError,
    ProtocolError,
    VaultError,
    WorkerCrashedError,
    WorkerTimeoutError,
    from_wire,
)
from .protocol import (
    DEFAULT_MAX_MESSAGE,
    PROTOCOL_VERSION,
    pack_header,
    raise_for_reply,
    unpack_header,
)

__all__ = [
    "TOKEN_BYTES",
    "ByteBudget",
    "Closed",
    "LocalChannel",
    "RecordReader",
    "check_listener",
    "listen_socket",
    "send_record",
]

MAGIC = 0x564C5431  # "VLT1"
_HEAD = struct.Struct("<IIQ")
_LEN = struct.Struct("<Q")
MAX_FRAMES = (1 << 16) + 1  # a header names at most 65,536 tensors (protocol.MAX_HEADER)
_IOV_MAX = 512  # frames per sendmsg (Linux allows 1024)
_SCRATCH = 1 << 16  # a small message arrives in one recv into this
_GROW_FIRST = 1 << 20  # a larger one's buffer starts at this and doubles as its bytes arrive
ALIGN = 64  # every frame starts on such a boundary (a cache line; what numpy and MLAS like)
_ZEROS = bytes(ALIGN)
_EOF_GRACE_S = 1.0  # how long a closed connection waits to see whether the worker died
TOKEN_BYTES = 32  # what a connection sends first: the caller's secret for this worker
MAX_ANSWER = 1 << 40  # what a caller reads of its own worker's answer


def listen_socket(directory: str, name: str = "c.sock") -> tuple[socket.socket, str]:
    """A listening Unix socket at ``directory/name`` (the caller's private
    directory) and its path. Its descriptor is what a worker inherits."""
    path = os.path.join(directory, name)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        s.listen(64)
    except BaseException:
        s.close()
        raise
    return s, path


def check_listener(fd: int) -> socket.socket:
    """The worker's side: an inherited descriptor, only if it is a listening
    Unix stream socket (anything else is a ConfigError, and the fd is closed)."""
    try:
        s = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(f"--listen-fd {fd} is not a socket ({exc.strerror})") from None
    ok = (
        s.family == socket.AF_UNIX
        and s.type == socket.SOCK_STREAM
        and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    )
    if not ok:
        s.close()
        raise ConfigError("--listen-fd must be a listening Unix stream socket")
    return s


_MASK = ALIGN - 1
_LENS: dict[int, struct.Struct] = {}


def _pad(n: int) -> int:
    return (n + _MASK) & ~_MASK


def _lens(count: int) -> struct.Struct:
    """The ``<Q`` lengths of ``count`` frames (cached: a call's records have
    the same few frame counts)."""
    st = _LENS.get(count)
    if st is None:
        st = struct.Struct(f"<{count}Q")
        if len(_LENS) < 64:
            _LENS[count] = st
    return st


def _aligned(n: int) -> memoryview:
    """``n`` fresh bytes whose first one sits on an ``ALIGN`` boundary."""
    import ctypes

    raw = bytearray(n + ALIGN)
    off = -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % ALIGN
    return memoryview(raw)[off : off + n]


def send_record(sock: socket.socket, frames: Sequence[Any]) -> None:
    """Send ``frames`` as one record (no copy of the frames: one ``sendmsg``).
    The head and every frame are padded to ``ALIGN`` bytes on the wire, so a
    receiver's tensors start aligned (onnxruntime reads them in place)."""
    bufs: list[Any] = [b""]
    lens: list[int] = []
    body = 0
    for f in frames:
        v = f if type(f) is memoryview else memoryview(f)
        if v.ndim != 1 or v.format != "B":
            v = v.cast("B")
        n = v.nbytes
        lens.append(n)
        bufs.append(v)
        if n & _MASK:
            bufs.append(_ZEROS[: ALIGN - (n & _MASK)])
            n += ALIGN - (n & _MASK)
        body += n
    head = _HEAD.pack(MAGIC, len(lens), body) + _lens(len(lens)).pack(*lens)
    if len(head) & _MASK:
        head += _ZEROS[: ALIGN - (len(head) & _MASK)]
    bufs[0] = head
    sent = sock.sendmsg(bufs if len(bufs) <= _IOV_MAX else bufs[:_IOV_MAX])
    if sent != len(head) + body:  # a large record, a full socket buffer: the rest
        _send_rest(sock, bufs, sent)


def _send_rest(sock: socket.socket, bufs: list[Any], sent: int) -> None:
    """Go on after a ``sendmsg`` of ``bufs[:_IOV_MAX]`` that sent ``sent`` bytes."""
    while True:
        batch = bufs[:_IOV_MAX]
        i = 0
        while i < len(batch) and sent >= memoryview(batch[i]).nbytes:
            sent -= memoryview(batch[i]).nbytes
            i += 1
        bufs = bufs[i:]
        if sent and bufs:
            bufs[0] = memoryview(bufs[0])[sent:]
        if not bufs:
            return
        sent = sock.sendmsg(bufs[:_IOV_MAX])


class Closed(Exception):
    """The peer closed the connection (at a record boundary or inside one)."""


class ByteBudget:
    """Bytes that a worker's connections may hold in records being received
    or served, in all: what a record's head claims is taken from it before
    the record is read, and given back once its answer went, so the records
    in flight never hold more than one largest record's worth, however many
    connections claim. (Without it, and without growing buffers as bytes
    arrive, 12 connections that each sent a 64-byte head claiming 64 MiB
    took a worker from 81 to 850 MB.) A claim larger than the whole budget
    waits until nothing else is held. ``stop()`` wakes those waiting (they
    get ``Closed``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._cond = threading.Condition()
        self._stopped = False

    def take(self, n: int) -> None:
        with self._cond:
            while self.held and self.held + n > self.limit:
                if self._stopped:
                    raise Closed()
                self._cond.wait(0.5)
            if self._stopped:
                raise Closed()
            self.held += n

    def give(self, n: int) -> None:
        if n:
            with self._cond:
                self.held -= n
                self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


class RecordReader:
    """Reads records from one connection.

    ``owned``: every returned frame is a view into a fresh buffer of its own
    record (a caller's results outlive the next call); otherwise small records
    are views into a scratch buffer reused by the next :meth:`read` (a worker,
    which is done with a request before it reads the next). Either way each
    frame starts on an ``ALIGN``-byte boundary.

    ``budget`` (a worker's, shared by its connections): every buffer beyond
    the scratch is taken from it before it is allocated; :meth:`release`
    gives a record's back once the caller is done with its frames."""

    def __init__(
        self, sock: socket.socket, *, max_message: int, owned: bool,
        budget: ByteBudget | None = None,
    ) -> None:  # fmt: skip
        self.sock = sock
        self.max_message = max_message
        self.owned = owned
        self.budget = budget
        self._held = 0  # bytes of this reader's records taken from the budget
        self._view = _aligned(_SCRATCH)  # everything on the wire is ALIGN-sized: stays aligned
        self._start = 0  # first unread byte in the scratch buffer
        self._end = 0  # end of the bytes received into it

    def drained(self) -> bool:
        """Whether every byte received so far has been read (the next record
        is still in the socket, or not sent yet)."""
        return self._start == self._end

    def _fill(self, need: int) -> None:
        """Until ``need`` bytes past ``_start`` are in the scratch buffer."""
        if self._start == self._end:
            # all read: start over at the front (after a large record read past
            # the scratch, ``_end`` is wherever the socket's reads stopped, and
            # the next record's frames would start unaligned)
            self._start = self._end = 0
        elif self._start + need > len(self._view):  # move what is left to the front
            n = self._end - self._start
            self._view[:n] = self._view[self._start : self._end]
            self._start, self._end = 0, n
        while self._end - self._start < need:
            got = self.sock.recv_into(self._view[self._end :])
            if not got:
                raise Closed()
            self._end += got

    def read(self) -> list[Any]:
        """The next record's frames; ``Closed`` at EOF, ProtocolError for a
        record that is malformed or over the size limit (the connection is
        then unusable: the caller closes it)."""
        self._fill(_HEAD.size)
        magic, count, total = _HEAD.unpack_from(self._view, self._start)
        if magic != MAGIC:
            raise ProtocolError("not a vault record")
        if count < 1 or count > MAX_FRAMES:
            raise ProtocolError(f"a record holds 1 to {MAX_FRAMES} frames, not {count}")
        if total > self.max_message + ALIGN * count:
            raise ProtocolError(f"record of {total} bytes exceeds the limit of {self.max_message}")
        head = _pad(_HEAD.size + _LEN.size * count)
        claim = (0 if head <= len(self._view) else head) + (
            total if self.owned or total > len(self._view) else 0
        )
        if claim and self.budget is not None:
            # what the record may come to cost, taken whole before anything is
            # held (waiting while holding part could deadlock two readers)
            self.budget.take(claim)
            self._held += claim
        if head <= len(self._view):
            self._fill(head)
            lens = _lens(count).unpack_from(self._view, self._start + _HEAD.size)
            self._start += head
        else:  # very many frames: their lengths straight from the socket
            self._start += _HEAD.size
            raw = self._take(head - _HEAD.size, owned=True)
            lens = struct.unpack_from(f"<{count}Q", raw)
        if sum([(n + _MASK) & ~_MASK for n in lens]) != total:
            raise ProtocolError("a record's frame lengths do not add up to its size")
        if sum(lens) > self.max_message:
            raise ProtocolError(f"record exceeds the limit of {self.max_message} bytes")
        body = self._take(total, owned=self.owned)
        out: list[Any] = []
        pos = 0
        for n in lens:
            out.append(body[pos : pos + n])
            pos += (n + _MASK) & ~_MASK
        return out

    def release(self) -> None:
        """The frames of the records read so far are no longer used."""
        if self.budget is not None:
            self.budget.give(self._held)
        self._held = 0

    def _take(self, n: int, *, owned: bool) -> memoryview:
        """The next ``n`` bytes of the stream, as a view. Memory is committed
        as bytes arrive (doubling from ``_GROW_FIRST``), not as a head claims:
        a connection that claims 1 GiB and sends nothing costs 1 MiB."""
        have = self._end - self._start
        if not owned and n <= len(self._view):
            self._fill(n)
            v = self._view[self._start : self._start + n]
            self._start += n
            return v
        # a worker's large request: aligned for onnxruntime; a caller's own
        # copy of an answer: malloc's 16-byte alignment serves every dtype
        k = min(have, n)
        cap = min(n, max(_GROW_FIRST, k))
        ov = _aligned(cap) if not owned else memoryview(bytearray(cap))
        ov[:k] = self._view[self._start : self._start + k]
        self._start += k
        got = k
        while got < n:
            if got == cap:  # full, and more is coming: a buffer twice the size
                cap = min(n, cap * 2)
                grown = _aligned(cap) if not owned else memoryview(bytearray(cap))
                grown[:got] = ov[:got]
                ov = grown
            r = self.sock.recv_into(ov[got:cap], cap - got)
            if not r:
                raise Closed()
            got += r
        return ov


_FORKS = [0]  # how many forks this process is down from the one that imported this
_CHANNELS: weakref.WeakSet[LocalChannel] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # a forked child shares its parent's connections (the same sockets): were
    # it to use them, parent and child would read each other's answers (they
    # did: a call's answer went to the other process 22 times in 40 forks,
    # silently, both numbering their calls alike). The child makes its own.
    _FORKS[0] += 1
    for ch in list(_CHANNELS):
        ch._lock = threading.Lock()  # a lock held by a parent's thread is never released here


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Conn:
    """One calling thread's connection, its reader and its socket timeout;
    ``fork``: the process generation that made it (a child never uses its
    parent's)."""

    __slots__ = ("sock", "reader", "timeout", "fork", "__weakref__")

    def __init__(self, sock: socket.socket, reader: RecordReader) -> None:
        self.sock, self.reader = sock, reader
        self.timeout: float | None = None
        self.fork = _FORKS[0]


class LocalChannel(Channel):
    """The caller's side: one connection per calling thread to ``path``.

    ``alive`` says whether the worker process still runs: a connection that
    closes under a call is a :class:`WorkerCrashedError` when the worker died,
    a :class:`ProtocolError` when it lives (it refused something of ours).
    A call without an answer in time is a :class:`WorkerTimeoutError`, and its
    connection is dropped (a late answer must never reach the next call)."""

    def __init__(
        self,
        path: str,
        *,
        token: bytes,
        alive: Callable[[], bool] | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        if len(token) != TOKEN_BYTES:
            raise ConfigError("the local channel's token is 32 bytes")
        self.path = path
        self._token = bytes(token)
        self._alive = alive
        self._max_message = max_message
        self._lock = threading.Lock()
        self._tls = threading.local()
        self._conns: set[socket.socket] = set()
        self._ids = itertools.count(1)
        self._closed = False
        _CHANNELS.add(self)

    def _conn(self) -> _Conn:
        got: _Conn | None = getattr(self._tls, "conn", None)
        if got is not None:
            if got.fork == _FORKS[0]:
                return got
            # the parent's connection, inherited by fork: this process leaves
            # it to the parent (closing our copy of the descriptor ends nothing)
            self._tls.conn = None
        if self._closed:
            raise ConfigError("the channel is closed")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.path)
            s.sendall(self._token)  # first: who we are
        except OSError as exc:
            s.close()
            raise self._gone(f"cannot connect ({exc.strerror})") from None
        with self._lock:
            if self._closed:
                s.close()
                raise ConfigError("the channel is closed")
            self._conns.add(s)
        # answers are not bounded by the request limit: an output onnxruntime
        # made (an Expand to 1.2 GiB) was refused after it was computed, where
        # the same Model over the service returned it; the reader still holds
        # only what arrives, never what a head claims
        got = _Conn(s, RecordReader(s, max_message=MAX_ANSWER, owned=True))
        # a thread's connection ends with the thread (its thread-local goes):
        # callers that make a thread per call must not pile up connections
        weakref.finalize(got, self._forget, s)
        self._tls.conn = got
        return got

    def _forget(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.discard(s)
        s.close()

    def _discard(self, s: socket.socket) -> None:
        self._tls.conn = None
        self._forget(s)

    def _gone(self, why: str) -> VaultError:
        if self._alive is not None:
            deadline = time.monotonic() + _EOF_GRACE_S
            while self._alive():
                if time.monotonic() >= deadline:
                    return ProtocolError(f"the worker closed the connection ({why})")
                time.sleep(0.01)
        return WorkerCrashedError(
            f"the worker process died ({why}); the next call starts a new one"
        )

    def request(
        self, header: Mapping[str, Any], frames: Sequence[Any] = (), *, timeout: float
    ) -> tuple[dict[str, Any], list[Any]]:
        conn = self._conn()
        s, reader = conn.sock, conn.reader
        rid = next(self._ids)
        msg = {**header, "v": PROTOCOL_VERSION, "id": rid}
        if sum(memoryview(f).nbytes for f in frames) > self._max_message:
            raise ProtocolError(f"request exceeds the limit of {self._max_message} bytes")
        if timeout != conn.timeout:  # a syscall only when it changes
            s.settimeout(timeout)
            conn.timeout = timeout
        try:
            try:
                send_record(s, [pack_header(msg), *frames])
            except (BrokenPipeError, ConnectionResetError):
                # the worker refused the record (over its size limit) and
                # said why before it closed: that answer is ours to read
                refusal = self._refusal(reader)
                if refusal is not None:
                    self._discard(s)
                    raise refusal from None
                raise
            reply = reader.read()
        except TimeoutError:
            self._discard(s)
            raise WorkerTimeoutError(f"no answer from the worker within {timeout:g}s") from None
        except (Closed, ConnectionError, BrokenPipeError) as exc:
            self._discard(s)
            raise self._gone(type(exc).__name__.strip("_").lower()) from None
        except ProtocolError:
            self._discard(s)
            raise
        except OSError as exc:
            self._discard(s)
            raise self._gone(exc.strerror or type(exc).__name__) from None
        hdr = unpack_header(reply[0])
        if hdr.get("id") != rid:
            self._discard(s)
            if hdr.get("id") is None:  # the worker refused the record itself
                raise_for_reply(hdr)
            raise ProtocolError("the worker answered another call")
        raise_for_reply(hdr)
        return hdr, reply[1:]

    @staticmethod
    def _refusal(reader: RecordReader) -> VaultError | None:
        try:
            reader.sock.settimeout(_EOF_GRACE_S)
            hdr = unpack_header(reader.read()[0])
        except (Closed, OSError, VaultError):
            return None
        if hdr.get("ok") or hdr.get("id") is not None:
            return None
        return from_wire(hdr.get("error"))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, set()
        for s in conns:
            s.close()
