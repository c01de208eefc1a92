"""The local channel's short wait (worker/server.py): a connection's thread
polls for its caller's next request for a moment only while that caller
calls back to back and has the worker to itself."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

import worker.server as server_mod
from vault.core.errors import ConfigError
from vault.core.localwire import TOKEN_BYTES, RecordReader, listen_socket, send_record
from worker.server import LocalServer


@pytest.fixture
def polls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every poll the server makes, with what it found."""
    seen: list[bool] = []
    real = server_mod._await_briefly

    def counted(conn: socket.socket, seconds: float, busy: Any) -> bool:
        found = real(conn, seconds, busy)
        seen.append(found)
        return found

    monkeypatch.setattr(server_mod, "_await_briefly", counted)
    return seen


def _serve(spin_us: int) -> Iterator[tuple[LocalServer, str, bytes]]:
    d = tempfile.mkdtemp()
    listener, path = listen_socket(d)
    token = os.urandom(TOKEN_BYTES)
    srv = LocalServer(listener, token=token, handler=lambda frames: [bytes(frames[0])],
                      spin_us=spin_us)  # fmt: skip
    srv.start()
    try:
        yield srv, path, token
    finally:
        srv.stop()


@pytest.fixture
def served() -> Iterator[tuple[LocalServer, str, bytes]]:
    yield from _serve(1000)  # 1 ms


class _Caller:
    def __init__(self, path: str, token: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.sock.sendall(token)
        self.reader = RecordReader(self.sock, max_message=1 << 20, owned=True)

    def call(self, n: int) -> None:
        msg = n.to_bytes(8, "little")
        send_record(self.sock, [msg])
        assert bytes(self.reader.read()[0]) == msg

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def _calling(path: str, token: bytes, count: int = 1) -> Iterator[list[_Caller]]:
    callers = [_Caller(path, token) for _ in range(count)]
    try:
        yield callers
    finally:
        for c in callers:
            c.close()


def test_a_caller_calling_back_to_back_is_awaited(
    served: tuple[LocalServer, str, bytes], polls: list[bool]
) -> None:
    _, path, token = served
    with _calling(path, token) as (c,):
        for i in range(50):
            c.call(i)
    assert polls, "no poll for a caller that calls again at once"
    assert any(polls), "every poll missed a request sent at once"


def test_a_caller_with_longer_gaps_costs_no_polling(
    served: tuple[LocalServer, str, bytes], polls: list[bool]
) -> None:
    _, path, token = served
    with _calling(path, token) as (c,):
        for i in range(6):
            c.call(i)
            time.sleep(0.03)  # 30 ms between calls, against a 1 ms wait
    # (the first request, sent with the token, may be caught) the first wait
    # after an answer finds nothing; from then on the gaps are measured, not polled
    assert polls[-1] is False and polls.count(False) == 1 and len(polls) <= 2, polls


def test_no_polling_while_several_callers_share_the_worker(
    served: tuple[LocalServer, str, bytes], polls: list[bool]
) -> None:
    _, path, token = served
    with _calling(path, token, 3) as callers:
        callers[0].call(0)
        callers[1].call(1)  # a second connection: the worker is shared from now on
        before = len(polls)
        for i in range(60):  # taking turns, each call within 10 ms of another's
            callers[i % 3].call(i)
        assert len(polls) == before, polls[before:]


def test_spin_off_never_polls(polls: list[bool]) -> None:
    for _, path, token in _serve(0):
        with _calling(path, token) as (c,):
            for i in range(20):
                c.call(i)
    assert polls == []


def test_the_wait_is_bounded() -> None:
    a, b = socket.socketpair()
    try:
        t0 = time.perf_counter()
        assert server_mod._await_briefly(a, 0.002, lambda: 0) is False
        assert time.perf_counter() - t0 < 5  # returns, whatever this machine's load
        assert server_mod._await_briefly(a, 5.0, lambda: 1) is False  # another call: stop
        b.sendall(b"x")
        assert server_mod._await_briefly(a, 5.0, lambda: 0) is True
        assert a.recv(1) == b"x"  # peeked, not taken
        b.close()
        assert server_mod._await_briefly(a, 5.0, lambda: 0) is True  # EOF: the read sees it
    finally:
        a.close()


def test_the_wait_is_configured_within_bounds() -> None:
    d = tempfile.mkdtemp()
    listener, _ = listen_socket(d)
    try:
        with pytest.raises(ConfigError, match="--spin-us"):
            LocalServer(listener, token=bytes(TOKEN_BYTES), handler=lambda f: f, spin_us=-1)
    finally:
        listener.close()
