"""A party on the wire of a ZeroMQ tcp connection, for the attack tests.

ZMTP 3 (the protocol libzmq speaks) frames are plain on the wire under the
NULL and PLAIN mechanisms: a 64-byte greeting, then units of a flags byte
(MORE 1, LONG 2, COMMAND 4), a size (1 byte, or 8 when LONG) and a body. So
whoever relays the bytes can read, drop and add whole messages:
:class:`ZmtpProxy` does that with two hooks, one per direction, each given a
message (its frames) and returning the messages to pass on instead.
:func:`stranger` opens a connection as anyone on the network can, and
speaks the greeting by hand.

Example::

    proxy = ZmtpProxy(("127.0.0.2", port), ("127.0.0.1", port), up=lambda m: [m, m])
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from collections.abc import Callable

Message = list[bytes]
Hook = Callable[[Message], list[Message]]
GREETING = 64


def greeting(mechanism: bytes = b"NULL") -> bytes:
    """A ZMTP 3.0 client greeting for ``mechanism``."""
    return b"\xff" + bytes(8) + b"\x7f\x03\x00" + mechanism.ljust(20, b"\x00") + b"\x00" + bytes(31)


def unit(body: bytes, *, more: bool = False, command: bool = False) -> bytes:
    """One frame (or command) as it travels."""
    flags = (1 if more else 0) | (4 if command else 0)
    if len(body) < 256:
        return bytes([flags, len(body)]) + body
    return bytes([flags | 2]) + struct.pack(">Q", len(body)) + body


def message(frames: Message) -> bytes:
    return b"".join(unit(f, more=i < len(frames) - 1) for i, f in enumerate(frames))


def ready_command(socket_type: bytes = b"DEALER") -> bytes:
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    return unit(body, command=True)


def stranger(address: tuple[str, int]) -> socket.socket:
    """A connection as a stranger makes it: NULL greeting and READY sent."""
    s = socket.create_connection(address)
    s.sendall(greeting() + ready_command())
    return s


class _Stream:
    """Cuts one direction's bytes into the greeting, commands and messages."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.greeting = 0  # bytes of the greeting passed so far
        self.frames: Message = []

    def feed(self, data: bytes) -> list[tuple[str, bytes | Message]]:
        """``("raw", bytes)`` for the greeting and commands (passed as they
        are) and ``("msg", frames)`` for each complete message."""
        out: list[tuple[str, bytes | Message]] = []
        if self.greeting < GREETING:  # passed at once: libzmq waits for the peer's first 10 bytes
            n = min(GREETING - self.greeting, len(data))
            out.append(("raw", data[:n]))
            self.greeting += n
            data = data[n:]
        self.buf += data
        while len(self.buf) >= 2:
            flags = self.buf[0]
            if flags & 2 and len(self.buf) < 9:
                break
            head, size = (
                (9, struct.unpack_from(">Q", self.buf, 1)[0]) if flags & 2 else (2, self.buf[1])
            )
            if len(self.buf) < head + size:
                break
            body = bytes(self.buf[head : head + size])
            raw = bytes(self.buf[: head + size])
            del self.buf[: head + size]
            if flags & 4:
                out.append(("raw", raw))
                continue
            self.frames.append(body)
            if not flags & 1:
                out.append(("msg", self.frames))
                self.frames = []
        return out


class ZmtpProxy:
    """A TCP relay from ``listen`` to ``target`` that hands each message to
    ``up`` (caller to server) or ``down`` (server to caller); what a hook
    returns is sent on in its place (``[m]``: unchanged, ``[]``: dropped).
    ``inject_up``/``inject_down`` add a message to the newest connection;
    ``written(direction)``, when set, is called once a hook's messages are
    all written on."""

    def __init__(
        self, listen: tuple[str, int], target: tuple[str, int], *,
        up: Hook | None = None, down: Hook | None = None,
    ) -> None:  # fmt: skip
        self.target = target
        self.up, self.down = up, down
        self.written: Callable[[str], None] | None = None
        self.sock = socket.create_server(listen)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._lock = threading.Lock()
        self._last: tuple[socket.socket, socket.socket] | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            s = socket.create_connection(self.target)
            with self._lock:
                self._last = (c, s)
            threading.Thread(target=self._pump, args=(c, s), daemon=True).start()

    def inject_up(self, frames: Message) -> None:
        with self._lock:
            assert self._last is not None
            self._last[1].sendall(message(frames))

    def inject_down(self, frames: Message) -> None:
        with self._lock:
            assert self._last is not None
            self._last[0].sendall(message(frames))

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        ends = {client: (server, "up", _Stream()), server: (client, "down", _Stream())}
        try:
            while not self._stop:
                ready, _, _ = select.select(list(ends), [], [], 0.5)
                for r in ready:
                    data = r.recv(1 << 16)
                    if not data:
                        return
                    other, direction, stream = ends[r]
                    hook = self.up if direction == "up" else self.down
                    for kind, item in stream.feed(data):
                        if kind == "raw":
                            assert isinstance(item, bytes)
                            with self._lock:
                                other.sendall(item)
                            continue
                        assert isinstance(item, list)
                        for m in hook(item) if hook is not None else [item]:
                            with self._lock:
                                other.sendall(message(m))
                        if self.written is not None:
                            self.written(direction)
        except OSError:
            return
        finally:
            client.close()
            server.close()

    def close(self) -> None:
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone would not)
        except OSError:
            pass
        self.sock.close()
