"""The local channel's short wait (worker/server.py): a connection's thread
polls for its caller's next request for a moment only while that caller
calls back to back and has the worker to itself.

No test here depends on how fast this machine is: each one counts the polls
the server makes (``polls``), and picks a wait that a loaded machine cannot
defeat (10 ms for a caller that calls at once; 1 us, shorter than any
round trip, for a caller with gaps; the sole-caller window set to an hour
where several callers take turns)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import worker.server as server_mod
from vault.core.errors import ConfigError
from vault.core.localwire import TOKEN_BYTES, RecordReader, listen_socket, send_record
from worker.server import MAX_SPIN_US, LocalServer


@pytest.fixture
def polls(monkeypatch: pytest.MonkeyPatch) -> list[bool | None]:
    """Every poll the server starts, with what it found (None while it polls)."""
    seen: list[bool | None] = []
    real = server_mod._await_briefly

    def counted(conn: socket.socket, seconds: float, busy: Any) -> bool:
        seen.append(None)
        at = len(seen) - 1
        found = real(conn, seconds, busy)
        seen[at] = found
        return found

    monkeypatch.setattr(server_mod, "_await_briefly", counted)
    return seen


class _Caller:
    def __init__(self, path: str, token: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.sock.sendall(token)
        self.reader = RecordReader(self.sock, max_message=1 << 20, owned=True)

    def call(self, n: int) -> None:
        msg = n.to_bytes(8, "little")
        send_record(self.sock, [msg])
        assert bytes(self.reader.read()[0]) == msg


@contextlib.contextmanager
def _callers(directory: Path, spin_us: int, count: int = 1) -> Iterator[list[_Caller]]:
    """An echoing LocalServer with this wait, and ``count`` connected callers."""
    listener, path = listen_socket(str(directory))
    token = os.urandom(TOKEN_BYTES)
    srv = LocalServer(listener, token=token, handler=lambda frames: [bytes(frames[0])],
                      spin_us=spin_us)  # fmt: skip
    srv.start()
    callers: list[_Caller] = []
    try:
        callers += [_Caller(path, token) for _ in range(count)]
        yield callers
    finally:
        for c in callers:
            c.sock.close()
        srv.stop()


def test_a_caller_calling_back_to_back_is_awaited(tmp_path: Path, polls: list[bool | None]) -> None:
    with _callers(tmp_path, MAX_SPIN_US) as (c,):
        for i in range(50):
            c.call(i)
    assert any(polls), f"no poll found a request sent at once: {polls}"


_CALLER = """
import socket, sys
from vault.core.localwire import RecordReader, send_record
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(60)
s.connect(sys.argv[1])
s.sendall(bytes.fromhex(sys.argv[2]))
r = RecordReader(s, max_message=1 << 20, owned=True)
for i in range(50):
    send_record(s, [i.to_bytes(8, "little")])
    assert bytes(r.read()[0]) == i.to_bytes(8, "little")
"""


def test_a_caller_with_gaps_longer_than_the_wait_costs_no_polling(
    tmp_path: Path, polls: list[bool | None]
) -> None:
    """A caller in another process (in this one, the GIL hands the caller
    its turn while the server sends, and the next request is there before
    the server looks): with a wait of 1 us, shorter than any round trip,
    the first poll that finds nothing is the last one made."""
    listener, path = listen_socket(str(tmp_path))
    token = os.urandom(TOKEN_BYTES)
    srv = LocalServer(listener, token=token, handler=lambda frames: [bytes(frames[0])],
                      spin_us=1)  # fmt: skip
    srv.start()
    try:
        subprocess.run([sys.executable, "-c", _CALLER, path, token.hex()], check=True,
                       timeout=120)  # fmt: skip
    finally:
        srv.stop()
    assert False in polls, polls
    assert polls.index(False) == len(polls) - 1, polls  # no poll after the first miss


def test_no_polling_while_several_callers_share_the_worker(
    tmp_path: Path, polls: list[bool | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_mod, "SOLE_S", 3600.0)  # shared for the whole test
    with _callers(tmp_path, MAX_SPIN_US, 3) as callers:
        callers[0].call(0)
        callers[1].call(1)  # a second connection: the worker is shared from now on
        before = len(polls)
        for i in range(60):  # taking turns
            callers[i % 3].call(i)
        assert len(polls) == before, polls[before:]


def test_spin_off_never_polls(tmp_path: Path, polls: list[bool | None]) -> None:
    with _callers(tmp_path, 0) as (c,):
        for i in range(20):
            c.call(i)
    assert polls == []


def test_the_wait_ends_on_a_byte_on_eof_on_another_call_or_at_its_deadline() -> None:
    a, b = socket.socketpair()
    try:
        assert server_mod._await_briefly(a, 1e-6, lambda: 0) is False  # nothing: its deadline
        assert server_mod._await_briefly(a, 3600.0, lambda: 1) is False  # another call: stop
        b.sendall(b"x")
        assert server_mod._await_briefly(a, 3600.0, lambda: 0) is True
        assert a.recv(1) == b"x"  # peeked, not taken
        b.close()
        assert server_mod._await_briefly(a, 3600.0, lambda: 0) is True  # EOF: the read sees it
    finally:
        a.close()


def test_the_wait_is_configured_within_bounds(tmp_path: Path) -> None:
    listener, _ = listen_socket(str(tmp_path))
    try:
        for bad in (-1, MAX_SPIN_US + 1):
            with pytest.raises(ConfigError, match="--spin-us"):
                LocalServer(listener, token=bytes(TOKEN_BYTES), handler=lambda f: f, spin_us=bad)
    finally:
        listener.close()
