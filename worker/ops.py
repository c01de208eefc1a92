"""The worker's operations: ``info``, ``compute``, ``health``, ``stats``.

:meth:`Service.handle` takes one request (header frame plus tensor frames)
and returns the reply frames. It never raises: every failure, from a
malformed header to an onnxruntime error, becomes a typed error reply, so one
bad caller cannot stop the worker. Input tensors are numpy views over the
received zmq frames and output tensors are sent as views over onnxruntime's
arrays: no copies on either side.

Example::

    svc = Service(pipeline, keeper, info={"model_id": "m"}, hardening=report)
    reply = svc.handle([pack_header({"v": 1, "op": "info", "id": 1})])
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from typing import Any

from vault.core.errors import ComputeError, ProtocolError, VaultError
from vault.core.localwire import MAX_FRAMES
from vault.core.protocol import (
    MAX_HEADER,
    RepeatPlans,
    SharedRegion,
    decode_tensors,
    encode_tensors,
    error_reply,
    frame_len,
    is_tensor_type,
    ok_reply,
    pack_header,
    unpack_header,
)

from . import hardening as _hardening
from .lease import LeaseKeeper
from .runtime import Pipeline

__all__ = ["Service"]


# A serving thread keeps the descriptors of its caller's last request (to
# build a plan when the next has the same) only from a header this small: it
# holds them until that caller's next request (a request may pad its
# descriptors with keys the decoder ignores, up to a header's 1 MiB).
_REMEMBERED_HEADER = 64 << 10


def _request_id(header: dict[str, Any]) -> Any:
    rid = header.get("id")
    return rid if isinstance(rid, (int, str)) and not isinstance(rid, bool) else None


class Service:
    """Dispatches requests to the pipeline; keeps call statistics."""

    def __init__(
        self,
        pipeline: Pipeline,
        lease: LeaseKeeper,
        *,
        info: dict[str, Any],
        hardening: dict[str, Any],
        max_request: int = 1 << 30,
        shm: Any = None,
        remote: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.lease = lease
        self.info = info
        self.hardening = hardening
        self.max_request = max_request
        self.shm = shm  # the caller's shared arena (local workers only), or None
        # remote callers (tcp://) learn liveness and the tier, nothing about the host
        self.remote = remote
        self._lock = threading.Lock()
        self._plans = RepeatPlans()  # each serving thread's plan
        self._calls = 0
        self._errors = 0
        self._latencies: deque[float] = deque(maxlen=4096)
        self._ran = threading.local()  # whether this thread's last call ran the pipeline
        self._started = time.time()

    def handle(self, frames: list[Any], *, own_thread: bool = False) -> list[Any]:
        """One request's reply frames. ``own_thread``: the calling thread serves
        one caller's connection alone (the local channel), so it may keep a
        :class:`RepeatPlan` of that caller's requests; a thread that serves
        many callers (the ZeroMQ fronts, and so the service's tenants) keeps
        none: whether a request took the plan would show in its timing whether
        the request before it, another caller's, had the same shapes."""
        req_id = None
        self._ran.flag = False
        try:
            if not frames:
                raise ProtocolError("empty request")
            header = unpack_header(frames[0])
            req_id = _request_id(header)
            op = header.get("op")
            if op == "compute":
                return self._compute(req_id, header, frames, own_thread)
            if len(frames) != 1:
                raise ProtocolError(f"op {op!r} takes no tensor frames, got {len(frames) - 1}")
            if op == "info":
                body = ok_reply(req_id, **self.info, provider=self.pipeline.provider)
            elif op == "health":
                body = ok_reply(req_id, **self._health())
            elif op == "stats":
                body = ok_reply(req_id, **self._stats())
            else:
                raise ProtocolError(f"unknown op {op!r}; ops are compute, info, health, stats")
            return [pack_header(body)]
        except VaultError as exc:
            return self._error(req_id, exc)
        except Exception as exc:  # a bug: say which class, never the text (it may name nodes)
            print(f"vault-worker: internal error {type(exc).__name__}", file=sys.stderr)
            return self._error(
                req_id, ComputeError(f"internal worker error ({type(exc).__name__})")
            )

    def _error(self, req_id: Any, exc: VaultError) -> list[Any]:
        with self._lock:
            self._errors += 1
        return [pack_header(error_reply(req_id, exc))]

    def ran(self) -> bool:
        """Whether this thread's last :meth:`handle` ran the pipeline (a
        compute that passed every check, whether or not the run then failed):
        the ZeroMQ front learns a call's time from these only, not from
        requests answered at once (worker/server.py)."""
        return bool(getattr(self._ran, "flag", False))

    def handle_own(self, frames: list[Any]) -> list[Any]:
        """:meth:`handle` for a thread that serves one caller's connection alone."""
        return self.handle(frames, own_thread=True)

    def _compute(
        self, req_id: Any, header: dict[str, Any], request: list[Any], own_thread: bool = False
    ) -> list[Any]:
        t0 = time.perf_counter()
        frames = request[1:]
        total = sum(frame_len(f) for f in frames)
        if total > self.max_request:
            raise ProtocolError(f"request of {total} bytes exceeds the limit of {self.max_request}")
        outputs = header.get("outputs")
        if outputs is not None and (
            not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs)
        ):
            raise ProtocolError("outputs must be a list of names")
        region = None
        region_wire = header.get("shm")
        if region_wire is not None:
            if self.shm is None:
                raise ProtocolError("this worker has no shared memory (remote callers send frames)")
            region = SharedRegion.from_wire(self.shm, region_wire)
        descs = header.get("tensors")
        plans = self._plans
        plan = plans.plan if own_thread else None
        # the same descriptors as this caller's last requests: checked then
        feeds = plan.decode(descs, region_wire, frames) if plan is not None else None
        if feeds is not None:
            if region is not None and plan is not None:
                region.cursor = plan.cursor  # outputs go after the inputs, as before
        else:
            # inputs in the slot are read in place; outputs that fit go after them
            # names, dtypes, declared sizes and the memory decoding would cost are
            # checked from the header before a single frame is decoded
            self.pipeline.check_declared_shapes(descs)
            feeds = decode_tensors(descs, frames, region, expect=self.pipeline.input_types)
            if own_thread:
                plans.learn(descs, region_wire, feeds, region.cursor if region else 0,
                            remember=frame_len(request[0]) <= _REMEMBERED_HEADER)  # fmt: skip
        self.lease.check()
        # names, dtypes and dimensions were checked above, from the header
        self._ran.flag = True  # what the front's estimate of a call's time learns from
        result = self.pipeline.run(feeds, outputs, checked=True)
        descs, out_frames = encode_tensors(result, region, types=self.pipeline.output_types)
        reply = [pack_header(ok_reply(req_id, tensors=descs)), *out_frames]
        if (
            len(out_frames) >= MAX_FRAMES
            or len(reply[0]) > MAX_HEADER
            or (self._nested_outputs() and _unreadable(reply[0]))
        ):
            # a sequence or map output of very many items (skl2onnx's ZipMap over
            # 20,000 rows: a descriptor and two frames a row) is past what a
            # receiver takes: said now, not left for the caller to time out on
            raise ComputeError(
                f"the answer does not fit the protocol: {len(out_frames)} frames and a "
                f"{len(reply[0])}-byte header (at most {MAX_FRAMES - 1} and {MAX_HEADER}); "
                "a sequence or map output this long cannot be returned: send fewer rows a call"
            )
        self.lease.record_call()  # served: its answer goes
        dt = time.perf_counter() - t0
        with self._lock:
            self._calls += 1
            self._latencies.append(dt)
        return reply

    def _nested_outputs(self) -> bool:
        """Whether an output is a sequence, map or optional (whose items each
        take a descriptor, so whose header can pass a receiver's limits)."""
        nested = getattr(self, "_nested", None)
        if nested is None:
            types = getattr(self.pipeline, "output_types", {}) or {}
            nested = self._nested = any(not is_tensor_type(t) for t in types.values())
        return bool(nested)

    def _tier(self) -> int:
        if self.remote:
            return 2  # vendor-hosted: only inputs and outputs cross
        declared = self.hardening.get("tier", {})  # what the launcher said (--tier)
        if isinstance(declared, dict) and str(declared.get("status", "")).isdigit():
            return int(declared["status"])
        user = self.hardening.get("user", {})
        return 1 if isinstance(user, dict) and user.get("status") == "on" else 0

    def _health(self) -> dict[str, Any]:
        if self.remote:
            return {
                "model_id": self.info.get("model_id"),
                "serving": not self.pipeline.closed,
                "tier": self._tier(),
                "provider": self.pipeline.provider,  # as the service answers (docs/service.md)
            }
        return {
            "tier": self._tier(),
            "pid": os.getpid(),
            "model_id": self.info.get("model_id"),
            "provider": self.pipeline.provider,
            "prepack": self.pipeline.prepack,
            "weights": self.pipeline.weights(),
            "serving": not self.pipeline.closed,
            "hardening": self.hardening,
            # read back from the kernel in this handler thread: proves the
            # per-thread protections (seccomp, no_new_privs) reached it
            "kernel": _hardening.verify(),
            "lease": self.lease.snapshot(),
        }

    def _stats(self) -> dict[str, Any]:
        with self._lock:
            lat = sorted(self._latencies)
            calls, errors = self._calls, self._errors

        def q(p: float) -> float | None:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3 if lat else None

        return {
            "calls": calls,
            "errors": errors,
            "uptime_s": time.time() - self._started,
            "latency_ms": {"p50": q(0.5), "p99": q(0.99), "window": len(lat)},
        }


def _unreadable(header: bytes) -> bool:
    """Whether a receiver's header decoder refuses this header (its limits on
    arrays and maps: only a header of sequences or maps can reach them)."""
    try:
        unpack_header(header)
    except VaultError:
        return True
    return False
