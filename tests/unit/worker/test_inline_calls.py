"""Where the ZeroMQ front runs a call (worker/server.py, ``Server._dispatch``):
on the router thread itself (no thread hop) or on the compute pool.

A call that is not fast (over ``inline_below``) still runs on the router
thread while one caller has the worker to itself: the pool's two hops would
only add to its time. Another caller's request (one sent after it, or one
found waiting behind such a call), or a request far larger than the recent
ones, sends such calls to the pool, where callers run side by side and none
waits for another's call.

No test depends on this machine's speed: the handler records the thread it
ran on, its calls take 20 ms (far over the 1 ms ``inline_below`` set here,
far under the 1 s ``inline_alone_below``), and an overlapping request is
sent only once the call it overlaps is known to be running."""

from __future__ import annotations

import contextlib
import os
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


def _call(s: zmq.Socket[Any], n: int, pad: int = 0) -> None:
    frames = [pack_header({"v": 1, "id": n, "op": "compute"})]
    s.send_multipart(frames + ([b"\0" * pad] if pad else []))
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


@pytest.mark.parametrize("hold", [3600.0, 0.0], ids=["hold", "control-no-hold"])
def test_another_callers_call_goes_to_the_pool(
    hold: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alice has the worker to herself; bob calls after her, not during her
    call: his call, and alice's next, go to the pool (neither waits for the
    other's). Control: with no hold, bob's call would run on the router
    thread, where alice's next request would wait for it."""
    monkeypatch.setattr(server_mod, "OVERLAP_HOLD_S", hold)
    h = _Handler()
    with _server(h, inline_alone_below=1.0) as (ctx, endpoint, _):
        alice, bob = _caller(ctx, endpoint), _caller(ctx, endpoint)
        try:
            _call(alice, 1)
            _call(alice, 2)
            _call(bob, 3)
            _call(alice, 4)
        finally:
            alice.close(linger=0)
            bob.close(linger=0)
    assert h.threads[:2] == ["vault-router", "vault-router"], h.threads
    if hold:
        assert all(t.startswith("vault-compute") for t in h.threads[2:]), h.threads
    else:
        assert h.threads[2:] == ["vault-router", "vault-router"], h.threads


@pytest.mark.parametrize("factor", [100, 1], ids=["far-larger", "control-same-size"])
def test_a_far_larger_request_goes_to_the_pool(factor: int) -> None:
    """One caller alone: a request 100 times the size of its recent ones is
    estimated at 100 times their average (about 1.3 s, over the 1 s limit) and goes to
    the pool, where a caller arriving meanwhile would not wait for it."""
    h = _Handler()
    with _server(h, inline_alone_below=1.0) as (ctx, endpoint, _):
        s = _caller(ctx, endpoint)
        try:
            for n in range(3):
                _call(s, n, pad=1000)
            _call(s, 3, pad=1000 * factor)
        finally:
            s.close(linger=0)
    assert h.threads[:3] == ["vault-router"] * 3, h.threads
    if factor > 1:
        assert h.threads[3].startswith("vault-compute"), h.threads
    else:
        assert h.threads[3] == "vault-router", h.threads


def test_a_request_that_waited_sends_longer_calls_to_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same caller's second request, sent while its first runs on the
    router thread (two requests in flight on one connection): found waiting
    behind it, it and the calls after it go to the pool."""
    monkeypatch.setattr(server_mod, "OVERLAP_HOLD_S", 3600.0)
    h = _Handler()
    with _server(h, inline_alone_below=1.0) as (ctx, endpoint, srv):
        a = _caller(ctx, endpoint)
        try:
            _call(a, 1)  # inline, and the estimate is now 20 ms
            _call(a, 2)  # still inline: alone
            assert h.threads == ["vault-router", "vault-router"]
            # the third call runs on the router thread; the fourth arrives
            # while it runs (sent once the handler has started, held until then)
            h.started.clear()
            h.release.clear()
            a.send_multipart([pack_header({"v": 1, "id": 3, "op": "compute"})])
            assert h.started.wait(30)
            a.send_multipart([pack_header({"v": 1, "id": 4, "op": "compute"})])
            # the call ends only once the fourth request is queued at the front
            # (the router thread is parked in the handler meanwhile: the socket
            # is not in use while this thread asks it)
            for _ in range(30_000):
                if srv._waiting():
                    break
                threading.Event().wait(0.001)
            assert srv._waiting()
            h.release.set()
            assert unpack_header(a.recv_multipart()[0])["id"] == 3
            assert unpack_header(a.recv_multipart()[0])["id"] == 4
            _call(a, 5)
        finally:
            h.release.set()
            a.close(linger=0)
    assert h.threads[2] == "vault-router"  # the call the fourth request waited for
    assert h.threads[3].startswith("vault-compute"), h.threads
    assert h.threads[4].startswith("vault-compute"), h.threads


def test_a_sealed_calls_caller_is_its_session_key() -> None:
    """Sealed calls name their caller by the CURVE key their session was
    keyed to (every sealed request has a fresh route), so the same caller's
    sealed computes and front requests (info, stats) count as one caller."""

    class _Session:
        def __init__(self, key: str) -> None:
            self.client_key, self.sid = key, os.urandom(16)

    h = _Handler()
    with _server(h) as (_, _e, srv):
        srv._routes[b"r1"] = (b"ident", _Session("alice-key"))
        srv._routes[b"r2"] = (b"other-ident", _Session("alice-key"))
        srv._routes[b"r3"] = (b"third-ident", _Session("bob-key"))
        assert srv._caller([b"r1"]) == srv._caller([b"r2"]) == "alice-key"
        assert srv._caller([b"r3"]) == "bob-key"
        # a front without CURVE (ipc://): the connection's identity
        assert srv._caller([zmq.Frame(b"peer"), zmq.Frame(b"{}")]) == b"peer"
        srv._routes.clear()


class _TwoKinds(_Handler):
    """``info`` answered at once (the pipeline never runs), ``compute`` 20 ms."""

    def __init__(self) -> None:
        super().__init__()
        self._ran = threading.local()

    def __call__(self, frames: list[Any]) -> list[Any]:
        header = unpack_header(frames[0])
        self._ran.flag = header["op"] == "compute"
        if not self._ran.flag:
            return [pack_header({"v": 1, "id": header["id"], "ok": True})]
        return super().__call__(frames)

    def ran(self) -> bool:
        return bool(getattr(self._ran, "flag", False))


@pytest.mark.parametrize("learn", ["ran-only", "control-every-request"])
def test_requests_answered_at_once_do_not_make_a_long_call_look_fast(learn: str) -> None:
    """A caller sends many large requests that are answered at once (an
    ``info`` with a 100 KB frame: a refusal does the same), then a 20 ms
    compute of the same size. Learned from, they would pull the estimate
    under the 2 ms rule and the long call would run on the router thread,
    where every other caller waits for it (a review measured 302 ms that
    way); the estimate learns from calls that ran the pipeline only. The
    alone rule is off here (``--inline-max-ms 0``, the service's workers)."""
    h = _TwoKinds()
    ran = h.ran if learn == "ran-only" else None
    with _server(h, inline_alone_below=0.0, ran=ran) as (ctx, endpoint, _):
        s = _caller(ctx, endpoint)
        try:
            _call(s, 0, pad=100_000)  # the first compute: nothing known yet, inline
            for n in range(1, 30):
                s.send_multipart([pack_header({"v": 1, "id": n, "op": "info"}), b"\0" * 100_000])
                assert unpack_header(s.recv_multipart()[0])["id"] == n
            _call(s, 99, pad=100_000)
        finally:
            s.close(linger=0)
    assert h.threads[0] == "vault-router"
    if learn == "ran-only":
        assert h.threads[1].startswith("vault-compute"), h.threads
    else:  # the control: the answered-at-once requests made it look fast
        assert h.threads[1] == "vault-router", h.threads


def test_the_service_says_which_calls_ran_the_pipeline() -> None:
    """What the front learns from: a compute that ran (``ran`` True), not an
    ``info`` nor a compute refused before the run."""
    import numpy as np
    from onnx import TensorProto, helper

    from vault.core.protocol import encode_tensors
    from worker.lease import LeaseKeeper
    from worker.ops import Service
    from worker.runtime import Pipeline

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    keeper = LeaseKeeper(None, renew=None, on_end=lambda: None, unsafe_no_lease=True)
    svc = Service(Pipeline([model.SerializeToString()]), keeper, info={}, hardening={})

    def compute(arr: Any) -> list[Any]:
        descs, frames = encode_tensors({"x": arr})
        return [pack_header({"v": 1, "id": 1, "op": "compute", "tensors": descs}), *frames]

    assert unpack_header(svc.handle(compute(np.ones((2, 4), np.float32)))[0])["ok"]
    assert svc.ran()
    svc.handle([pack_header({"v": 1, "id": 2, "op": "info"})])
    assert not svc.ran()
    bad = svc.handle(compute(np.ones((2, 5), np.float32)))  # refused from the header
    assert not unpack_header(bad[0])["ok"]
    assert not svc.ran()
