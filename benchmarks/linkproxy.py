"""An emulated network link on loopback: a delaying, rate-limiting TCP proxy.

These machines have no ``netem`` (see shared/ENVIRONMENT.md), so delay and
bandwidth are emulated in user space. Each direction of each connection is a
queue: a chunk read at time ``t`` leaves the "wire" at
``max(t, busy_until) + len * 8 / rate`` (the link serialises bytes at
``mbit``) and is delivered ``rtt / 2`` later. One reader and one writer thread
per direction; the writer sleeps until each chunk's delivery time, which is
non-decreasing, so order is kept. :meth:`LinkProxy.set` changes the link
while connections are open (for re-planning experiments).

Example::

    with LinkProxy("127.0.0.1", 7701, rtt_ms=20, mbit=100) as link:
        vault.connect(link.address, ...)      # tcp://127.0.0.1:PORT
        link.set(rtt_ms=100, mbit=2)
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from typing import Any

__all__ = ["LinkProxy"]

_CHUNK = 16384


class LinkProxy:
    """``sealed_port``: the server's second socket (sealed calls, which a
    caller reaches at the port the server names, on the host it called):
    then the proxy listens on another loopback address, ``127.0.0.2``, at
    an OS-chosen port for the front and at that very port for the sealed
    socket, and both go through the same emulated link."""

    def __init__(
        self, host: str, port: int, *, rtt_ms: float, mbit: float, sealed_port: int | None = None
    ) -> None:
        self.upstream = (host, port)
        self.rtt_ms = rtt_ms
        self.mbit = mbit
        self.bind_host = "127.0.0.2" if sealed_port else "127.0.0.1"
        self._closed = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._listeners: list[socket.socket] = []
        self.port = self._listen(0, (host, port))
        if sealed_port:
            self._listen(sealed_port, (host, sealed_port))

    def _listen(self, port: int, upstream: tuple[str, int]) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.bind_host, port))
        listener.listen(16)
        self._listeners.append(listener)
        t = threading.Thread(target=self._accept, args=(listener, upstream),
                             name="linkproxy-accept", daemon=True)  # fmt: skip
        t.start()
        self._threads.append(t)
        return int(listener.getsockname()[1])

    @property
    def address(self) -> str:
        return f"tcp://{self.bind_host}:{self.port}"

    def set(self, *, rtt_ms: float, mbit: float) -> None:
        self.rtt_ms, self.mbit = rtt_ms, mbit

    def _accept(self, listener: socket.socket, upstream: tuple[str, int]) -> None:
        while not self._closed.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(upstream)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [client, server]
            self._pipe(client, server)
            self._pipe(server, client)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        q: queue.Queue[tuple[float, bytes] | None] = queue.Queue()

        def read() -> None:
            busy_until = 0.0
            while True:
                try:
                    data = src.recv(_CHUNK)
                except OSError:
                    data = b""
                if not data:
                    q.put(None)
                    return
                now = time.perf_counter()
                tx = len(data) * 8 / (self.mbit * 1e6) if self.mbit > 0 else 0.0
                busy_until = max(now, busy_until) + tx
                q.put((busy_until + self.rtt_ms / 2000.0, data))

        def write() -> None:
            while True:
                item = q.get()
                if item is None:
                    break
                at, data = item
                wait = at - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                try:
                    dst.sendall(data)
                except OSError:
                    break
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        for fn in (read, write):
            t = threading.Thread(target=fn, name="linkproxy-pipe", daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        self._closed.set()
        for listener in self._listeners:
            listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self) -> LinkProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
