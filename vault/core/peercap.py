"""Bounds on what a peer address holds at a ZeroMQ TCP port (the service's
CURVE front and its sealed port, a TCP worker's, the key server's).

libzmq accepts every TCP connection and keeps it, one file descriptor and a
stream engine each, until its handshake ends; a connection that never sends
its greeting was kept for the 30 s handshake timeout, and nothing counted
them per peer. A stranger with nothing opened plain TCP connections to the
sealed port and never wrote a byte: the service sat at its open-file limit
(4,096 there), and licensed callers' calls failed or waited 7-15 s (found by
the attack round of stop 31). ZAP cannot help: it runs after the greeting.

So, for each port watched here:

- a handshake must finish within :data:`HANDSHAKE_S` (``ZMQ_HANDSHAKE_IVL``,
  set by :func:`prepare` *before* the socket binds: libzmq copies a socket's
  options into its listener at bind);
- one peer address (:func:`address_key`: an IPv4 address, an IPv6 /64)
  holds at most ``per_address`` connections (:data:`PER_ADDRESS` by
  default): past it, a new connection is shut down as soon as it is seen
  (``shutdown(2)`` on a duplicate of its descriptor: libzmq reads the end of
  the stream and closes its own), so a stranger's flood costs the service a
  bounded number of descriptors per address;
- the connections shut down are logged (``connections_cut``: the port, the
  address, how many; the first at once, then at most once per
  :data:`LOG_EVERY_S`), and a process near its open-file limit says so, at
  most once per :data:`LOG_EVERY_S` (``open_files_low``).

How: libzmq's socket monitor reports each accepted connection's descriptor
(``EVENT_ACCEPTED``) and each end (``EVENT_DISCONNECTED``); one thread reads
the monitors and keeps the count. libzmq's I/O thread writes those events
into a pipe of 1,000 and waits when it is full, so the thread never stops
reading: every error is caught, and only :meth:`PeerCap.close` ends it.

A descriptor is a number libzmq may close and reuse before its event is
read. So each event's descriptor is duplicated once, and that duplicate is
looked at: counted and shut down only if it is a TCP connection to the
watched port itself (a reused number that now names anything else, a
caller's connection elsewhere or a pipe, is left alone); one reported
accepted that is already closed is not counted, and its end is ignored.

:func:`raise_open_files` lifts the process's soft open-file limit to its
hard limit: a service holds a descriptor per connection, and 1,024 (a shell's
usual soft limit) is what a few hundred callers' threads already take.

Example::

    prepare(front)                     # before it binds
    front.bind("tcp://0.0.0.0:7701")
    cap = PeerCap(log=print)
    cap.watch(front, "front")          # from the socket's own thread
    cap.start()
    ...
    front.close(); cap.close()         # the watched sockets first
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import zmq

__all__ = [
    "HANDSHAKE_S",
    "PER_ADDRESS",
    "PeerCap",
    "address_key",
    "prepare",
    "raise_open_files",
]

HANDSHAKE_S = 10.0  # a connection's ZMTP handshake (greeting, CURVE/PLAIN, ZAP)
PER_ADDRESS = 256  # connections one peer address holds at one port (a caller: one a thread)
LOG_EVERY_S = 10.0
LOW_FILES = 0.9  # of the soft open-file limit in use: said in the log

_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
_HEAD = struct.Struct("=HI")  # a monitor event's first frame: event, value


def address_key(host: str) -> str:
    """What one peer is counted as: its IPv4 address, or its IPv6 /64 (one
    host holds a whole /64; an IPv4-mapped address as the IPv4 one)."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv6Address) and not ip.is_loopback:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def prepare(sock: zmq.Socket[Any], handshake_s: float = HANDSHAKE_S) -> None:
    """Bound ``sock``'s handshakes; call before it binds (libzmq's listener
    takes the socket's options at bind, and ignores later ones)."""
    sock.handshake_ivl = int(handshake_s * 1000)


def raise_open_files(ceiling: int = 1 << 20) -> tuple[int, int]:
    """Lift the soft ``RLIMIT_NOFILE`` to the hard one (at most ``ceiling``);
    returns (before, after). Never lowers it; a failure leaves it as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard if hard != resource.RLIM_INFINITY else ceiling, ceiling)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return soft, want
        except (OSError, ValueError):
            pass
    return soft, soft


class PeerCap:
    """See the module docstring."""

    def __init__(self, *, per_address: int = PER_ADDRESS,
                 log: Callable[..., None] | None = None) -> None:  # fmt: skip
        self.per_address = per_address
        self._log = log
        self._monitors: list[tuple[zmq.Socket[Any], str, int]] = []  # monitor, name, port
        self.held: dict[tuple[str, str], int] = {}  # (port name, address) -> connections
        self._fds: dict[tuple[str, int], str] = {}  # (port name, descriptor) -> address
        self.refused = 0  # connections shut down past an address's count
        self._cut: dict[tuple[str, str], int] = {}  # (port, address) -> shut down, not yet logged
        self._cut_logged: dict[tuple[str, str], float] = {}  # when each was last logged
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, sock: zmq.Socket[Any], name: str) -> None:
        """Watch ``sock``'s connections (bound, with :func:`prepare` called
        before; from the thread that uses ``sock``, before :meth:`start`)."""
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if not endpoint.startswith("tcp://"):
            raise ValueError(f"{name}: only a bound tcp:// socket is watched, not {endpoint!r}")
        if int(sock.getsockopt(zmq.HANDSHAKE_IVL)) > int(HANDSHAKE_S * 1000):
            raise ValueError(f"{name}: call prepare() before the socket binds")
        port = int(endpoint.rpartition(":")[2])
        self._monitors.append((sock.get_monitor_socket(_EVENTS), name, port))

    def start(self) -> None:
        if self._monitors and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vault-peercap", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop watching (close the watched sockets first: libzmq then sends
        no more events) and close the monitors."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(5)
            if thread.is_alive():  # never close a socket another thread still uses
                return
        for mon, _, _ in self._monitors:
            mon.close(linger=0)
        self._monitors = []

    # -- the monitor thread ------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        for mon, _, _ in self._monitors:
            poller.register(mon, zmq.POLLIN)
        where = {mon: (name, port) for mon, name, port in self._monitors}
        next_check = 0.0
        while not self._stop.is_set():
            try:
                ready = poller.poll(200)
            except zmq.ContextTerminated:
                return
            except Exception:  # noqa: BLE001 - only close() ends this loop
                time.sleep(0.01)
                continue
            for mon, _ in ready:
                self._drain(mon, *where[mon])
            now = time.monotonic()
            if self._cut or self._cut_logged:
                self._log_cut(now)
            if now >= next_check:
                next_check = now + LOG_EVERY_S
                self._check_files()

    def _drain(self, mon: zmq.Socket[Any], name: str, port: int) -> None:
        while True:
            try:
                frames = mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except Exception:  # noqa: BLE001 - the next poll tries again
                return
            try:
                event, fd = _HEAD.unpack(frames[0][: _HEAD.size])
                self._note(name, port, event, fd)
            except Exception:  # noqa: BLE001 - never stop reading events
                pass

    def _note(self, name: str, port: int, event: int, fd: int) -> None:
        if event == zmq.EVENT_ACCEPTED:
            old = self._fds.pop((name, fd), None)
            if old is not None:  # the end of its previous holder's was not seen
                self._drop(name, old)
            with _connection(fd, port) as conn:
                if conn is None:  # ended before its event was read, or the number reused
                    return
                address = address_key(conn.getpeername()[0])
                key = (name, address)
                n = self.held.get(key, 0) + 1
                self.held[key] = n
                self._fds[(name, fd)] = address
                if n > self.per_address:
                    self.refused += 1
                    self._cut[key] = self._cut.get(key, 0) + 1
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
        elif event == zmq.EVENT_DISCONNECTED:
            gone = self._fds.pop((name, fd), "")
            if gone:
                self._drop(name, gone)

    def _drop(self, name: str, address: str) -> None:
        key = (name, address)
        n = self.held.get(key, 0) - 1
        if n > 0:
            self.held[key] = n
        else:
            self.held.pop(key, None)

    def _log_cut(self, now: float) -> None:
        """Say which addresses had connections shut down past the bound: for
        each port and address the first at once, then at most every
        LOG_EVERY_S, counts summed."""
        for key, last in list(self._cut_logged.items()):
            if now - last >= LOG_EVERY_S and key not in self._cut:
                del self._cut_logged[key]
        for key in [
            k for k in self._cut if now - self._cut_logged.get(k, float("-inf")) >= LOG_EVERY_S
        ]:
            count = self._cut.pop(key)
            self._cut_logged[key] = now
            if self._log is None:
                continue
            name, address = key
            try:
                self._log("connections_cut", level="warning", port=name, address=address,
                          count=count, limit=self.per_address)  # fmt: skip
            except Exception:  # noqa: BLE001 - a log that fails must not stop the count
                pass

    def _check_files(self) -> None:
        if self._log is None:
            return
        try:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            used = len(os.listdir("/proc/self/fd"))
            if soft != resource.RLIM_INFINITY and used >= LOW_FILES * soft:
                self._log("open_files_low", level="error", open=used, limit=soft,
                          message="near the open-file limit: connections may be refused")  # fmt: skip
        except Exception:  # noqa: BLE001 - a log that fails must not stop the count
            pass


@contextlib.contextmanager
def _connection(fd: int, port: int) -> Iterator[socket.socket | None]:
    """One duplicate of ``fd``, if it is still a TCP connection to ``port``
    (a number libzmq has since closed, or reused for anything else, gives
    None); closed on the way out."""
    try:
        dup = os.dup(fd)
    except OSError:
        yield None
        return
    try:
        conn = socket.socket(fileno=dup)
    except OSError:  # not a socket any more
        os.close(dup)
        yield None
        return
    try:
        try:
            ok = conn.type == socket.SOCK_STREAM and conn.getsockname()[1] == port
            conn.getpeername()
        except (OSError, IndexError, TypeError):
            ok = False
        yield conn if ok else None
    finally:
        conn.close()
