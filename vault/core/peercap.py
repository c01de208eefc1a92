"""Bounds on what a peer address holds at a ZeroMQ TCP port (the service's
CURVE front and its sealed port, a TCP worker's).

libzmq accepts every TCP connection and keeps it, one file descriptor and a
stream engine each, until its handshake ends; a connection that never sends
its greeting was kept for the 30 s handshake timeout, and nothing counted
them per peer. A stranger with nothing opened plain TCP connections to the
sealed port and never wrote a byte: the service sat at its open-file limit
(4,096 there), and licensed callers' calls failed or waited 7-15 s (found by
the attack round of stop 31). ZAP cannot help: it runs after the greeting.

So, for each port watched here:

- a handshake must finish within :data:`HANDSHAKE_S` (``ZMQ_HANDSHAKE_IVL``);
- one peer address (:func:`address_key`: an IPv4 address, an
  IPv6 /64) holds at most :data:`PER_ADDRESS` connections: past it, a new
  connection is shut down as soon as it is seen (``shutdown(2)`` on a
  duplicate of its descriptor: libzmq reads the end of the stream and closes
  its own), so a stranger's flood costs the service a bounded number of
  descriptors per address;
- an accept that fails (``EMFILE``: out of descriptors) is logged, at most
  once per :data:`LOG_EVERY_S`, with how many failed.

How: libzmq's socket monitor reports each accepted connection's descriptor
(``EVENT_ACCEPTED``) and each end (``EVENT_DISCONNECTED``); one thread reads
the monitors and keeps the count. The monitor's events wait in a pipe that
holds 1,000 events: the thread never blocks on anything else, so libzmq's I/O
thread never waits on it for long. A descriptor reported accepted that is
already closed (the connection ended before its event was read) is not
counted, and its end is ignored; one reused by a newer connection counts the
newer one's address until its own events come, so the counts stay balanced.

:func:`raise_open_files` lifts the process's soft open-file limit to its
hard limit: a service holds a descriptor per connection, and 1,024 (a shell's
usual soft limit) is what a few hundred callers' threads already take.

Example::

    cap = PeerCap(log=print)
    cap.watch(front, "front")          # after bind, from the socket's own thread
    cap.start()
    ...
    front.close(); cap.close()         # the watched sockets first
"""

from __future__ import annotations

import os
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

__all__ = ["HANDSHAKE_S", "PER_ADDRESS", "PeerCap", "address_key", "raise_open_files"]

HANDSHAKE_S = 10.0  # a connection's ZMTP handshake (greeting, CURVE/PLAIN, ZAP)
PER_ADDRESS = 256  # connections one peer address holds at one port (a caller: one a thread)
LOG_EVERY_S = 10.0

_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPT_FAILED
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
        self._monitors: list[tuple[zmq.Socket[Any], str]] = []
        self.held: dict[tuple[str, str], int] = {}  # (port name, address) -> connections
        self._fds: dict[tuple[str, int], str] = {}  # (port name, descriptor) -> address
        self.refused = 0  # connections shut down past an address's count
        self.accept_failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, sock: zmq.Socket[Any], name: str) -> None:
        """Bound ``sock``'s handshakes and watch its connections (call from the
        thread that uses ``sock``, before :meth:`start`)."""
        sock.handshake_ivl = int(HANDSHAKE_S * 1000)
        self._monitors.append((sock.get_monitor_socket(_EVENTS), name))

    def start(self) -> None:
        if self._monitors and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vault-peercap", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop watching (close the watched sockets first: libzmq then sends
        no more events) and close the monitors."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for mon, _ in self._monitors:
            mon.close(linger=0)
        self._monitors = []

    # -- the monitor thread ------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        for mon, _ in self._monitors:
            poller.register(mon, zmq.POLLIN)
        names = {mon: name for mon, name in self._monitors}
        last_log, failed_since = 0.0, 0
        while not self._stop.is_set():
            try:
                ready = poller.poll(200)
            except zmq.ZMQError:
                return
            for mon, _ in ready:
                while True:
                    try:
                        frames = mon.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except zmq.ZMQError:
                        return
                    try:
                        event, value = _HEAD.unpack(frames[0][: _HEAD.size])
                    except (struct.error, IndexError):
                        continue
                    try:
                        if event == zmq.EVENT_ACCEPT_FAILED:
                            self.accept_failures += 1
                            failed_since += 1
                        else:
                            self._note(names[mon], event, value)
                    except Exception:  # noqa: BLE001 - the thread must keep draining
                        pass
            now = time.monotonic()
            if failed_since and self._log is not None and now - last_log >= LOG_EVERY_S:
                self._log("accept_failed", level="error", count=failed_since,
                          message="connections could not be accepted (out of file descriptors?)")  # fmt: skip
                last_log, failed_since = now, 0

    def _note(self, name: str, event: int, fd: int) -> None:
        if event == zmq.EVENT_ACCEPTED:
            address = _peer(fd)
            if address is None:  # ended before its event was read
                return
            old = self._fds.pop((name, fd), None)
            if old is not None:  # its end's event is lost to a reuse: counted once
                self._drop(name, old)
            key = (name, address)
            n = self.held.get(key, 0) + 1
            self.held[key] = n
            self._fds[(name, fd)] = address
            if n > self.per_address:
                self.refused += 1
                _shut(fd)
        elif event == zmq.EVENT_DISCONNECTED:
            address = self._fds.pop((name, fd), None)
            if address is not None:
                self._drop(name, address)

    def _drop(self, name: str, address: str) -> None:
        key = (name, address)
        n = self.held.get(key, 0) - 1
        if n > 0:
            self.held[key] = n
        else:
            self.held.pop(key, None)


def _peer(fd: int) -> str | None:
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        host = s.getpeername()[0]
    except OSError:
        return None
    finally:
        s.close()
    return address_key(host)


def _shut(fd: int) -> None:
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:  # already ended
        pass
    finally:
        s.close()
