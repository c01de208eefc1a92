"""Where the ZeroMQ front runs a call (worker/server.py, ``Server._dispatch``):
on the router thread itself (no thread hop) or on the compute pool.

A call that is not fast (over ``inline_below``) still runs on the router
thread while one caller calls at a time: the pool's two hops would only add
to its time. Once a request has had to wait for such a call, callers overlap,
and such calls go to the pool, side by side, for ``OVERLAP_HOLD_S``.

No test depends on this machine's speed: the handler records the thread it
ran on, its calls take 20 ms (far over the 1 ms ``inline_below`` set here),
and the overlapping request is sent only once the first call is known to be
running (an event the handler sets)."""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

import worker.server as server_mod
from vault.core.protocol import pack_header, unpack_header
from worker.server import Server


class _Handler:
    def __init__(self) -> None:
        self.threads: list[str] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, frames: list[Any]) -> list[Any]:
        self.threads.append(threading.current_thread().name)
        self.started.set()
        self.release.wait(30)
        threading.Event().wait(0.02)  # a call well over inline_below
        return [pack_header({"v": 1, "id": unpack_header(frames[0])["id"], "ok": True})]


@contextlib.contextmanager
def _server(handler: _Handler, **kw: Any) -> Iterator[tuple[zmq.Context[Any], str, Server]]:
    ctx: zmq.Context[Any] = zmq.Context()
    d = tempfile.mkdtemp(prefix="vault-inline-")
    srv = Server(ctx, f"ipc://{d}/w.sock", handler=handler, threads=2, inline_below=0.001, **kw)
    endpoint = srv.bind()
    srv.start()
    try:
        yield ctx, endpoint, srv
    finally:
        srv.stop()
        ctx.destroy(linger=0)  # the pool threads' idle result sockets too
        import shutil

        shutil.rmtree(d, ignore_errors=True)


def _caller(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.rcvtimeo = 30_000
    s.connect(endpoint)
    return s


def _call(s: zmq.Socket[Any], n: int) -> None:
    s.send_multipart([pack_header({"v": 1, "id": n, "op": "compute"})])
    assert unpack_header(s.recv_multipart()[0])["id"] == n


@pytest.mark.parametrize("alone_below", [1.0, 0.0], ids=["alone-rule", "control-ewma-only"])
def test_one_caller_runs_longer_calls_on_the_router_thread(alone_below: float) -> None:
    h = _Handler()
    with _server(h, inline_alone_below=alone_below) as (ctx, endpoint, _):
        s = _caller(ctx, endpoint)
        try:
            for n in range(5):
                _call(s, n)
        finally:
            s.close(linger=0)
    # the first call runs inline either way (no call measured yet); after it
    # the estimate is 20 ms: only the alone rule keeps them on the router
    assert h.threads[0] == "vault-router"
    later = set(h.threads[1:])
    if alone_below:
        assert later == {"vault-router"}, h.threads
    else:  # the control: the EWMA rule alone sends every later call to the pool
        assert all(t.startswith("vault-compute") for t in later), h.threads


def test_a_request_that_waited_sends_longer_calls_to_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server_mod, "OVERLAP_HOLD_S", 3600.0)
    h = _Handler()
    with _server(h, inline_alone_below=1.0) as (ctx, endpoint, srv):
        a, b = _caller(ctx, endpoint), _caller(ctx, endpoint)
        try:
            _call(a, 1)  # inline, and the estimate is now 20 ms
            _call(a, 2)  # still inline: alone
            assert h.threads == ["vault-router", "vault-router"]
            # a's third call runs on the router thread; b's request arrives
            # while it runs (sent once the handler has started, held until then)
            h.started.clear()
            h.release.clear()
            a.send_multipart([pack_header({"v": 1, "id": 3, "op": "compute"})])
            assert h.started.wait(30)
            b.send_multipart([pack_header({"v": 1, "id": 4, "op": "compute"})])
            # a's call ends only once b's request is queued at the front (the
            # router thread is parked in the handler meanwhile: the socket is
            # not in use while this thread asks it)
            for _ in range(30_000):
                if srv._waiting():
                    break
                threading.Event().wait(0.001)
            assert srv._waiting()
            h.release.set()
            assert unpack_header(a.recv_multipart()[0])["id"] == 3
            assert unpack_header(b.recv_multipart()[0])["id"] == 4
            _call(a, 5)
        finally:
            h.release.set()
            a.close(linger=0)
            b.close(linger=0)
    assert h.threads[2] == "vault-router"  # a's call, during which b waited
    # from then on the callers overlap: longer calls run on the pool
    assert h.threads[3].startswith("vault-compute"), h.threads
    assert h.threads[4].startswith("vault-compute"), h.threads
