"""The hybrid's caller side: the head here, the sealed tail on a server worker.

``vault.open("model.split/", licence=..., server="tcp://host:7701")`` returns
a :class:`HybridModel` with the same ``inputs``, ``outputs`` and ``compute``
as a local model. Each call runs the head (in-process onnxruntime for a plain
``head-*.onnx``, a local worker for a sealed ``head-*.vault``), sends the
crossing tensors to the server worker over CURVE (:func:`vault.connect`),
and returns the tail's outputs. The caller's process never holds the tail's
key or weights: the tail is decrypted only by the server worker.

Consecutive calls pipeline: :meth:`HybridModel.compute_many` and concurrent
:meth:`HybridModel.compute_async` calls run the head of call i+1 while the
tail of call i is on the wire or the server. The client measures the link
(RTT from ``info`` pings, bandwidth from its own calls) and, when the vendor
shipped several cuts, moves between them with hysteresis
(:class:`vault.hybrid.plan.Replanner`).

``server`` is one address (a worker serving the tail, or a service routing
by model id) or a mapping ``{tail_model_id: address}``; ``server_key`` the
worker's CURVE public key (Z85 or a file), one or per tail, by default the
``server_key`` in ``split.json``.

Example::

    with vault.open("clf.split", licence="alice.licence", server="tcp://10.0.0.5:7701",
                    server_key="worker.pub") as m:
        m.compute({"image": arr})
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import inspect
import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..client import Model, check_feeds_mapping, connect
from ..client import open as open_package
from ..core.errors import (
    ComputeError,
    ConfigError,
    InputError,
    IntegrityError,
    ProtocolError,
    VaultError,
)
from ..core.licence import Licence
from ..core.ortvalues import run as ort_run
from ..core.protocol import dtype_from_name, is_tensor_type
from .plan import CutCost, Link, LinkEstimator, Replanner

__all__ = ["HybridModel", "open_split"]

SPLIT_FORMAT = "vault-split/1"
PING_EVERY_S = 2.0
# vault.connect routes by model id once the worker service serves several models
_CONNECT_ROUTES = "model" in inspect.signature(connect).parameters


def _signature(items: Any) -> dict[str, tuple[str, tuple[Any, ...]]]:
    return {str(d["name"]): (str(d["dtype"]), tuple(d.get("shape") or ())) for d in items or []}


def _check_tensor(name: str, value: Any, dtype: str, shape: tuple[Any, ...]) -> None:
    """One input against its declared dtype and shape (a dimension that is a
    name or None varies; an int must match). A sequence, map or optional input
    is the worker's to check (the head's onnxruntime, or the tail's): a list
    of tensors of different shapes is no array."""
    if not is_tensor_type(dtype):
        return
    try:
        want = None if dtype == "string" else dtype_from_name(dtype)  # bfloat16: ml_dtypes
    except (TypeError, ValueError, ProtocolError):
        return  # a dtype this vault does not know: the worker checks it
    try:
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    except (TypeError, ValueError):
        raise InputError(f"input {name!r} is not an array (the model takes {dtype})") from None
    if dtype == "string":
        if arr.dtype.kind not in "OUS":
            raise InputError(f"input {name!r} is {arr.dtype.name}; the model takes strings")
    elif arr.dtype.kind in "OUS":  # a str, bytes or objects: not numbers at all
        what = (type(value).__name__ if arr.ndim == 0
                else "strings" if arr.dtype.kind in "US" else "Python objects")  # fmt: skip
        raise InputError(f"input {name!r} is {what}; the model takes a {dtype} array")
    elif arr.dtype != want:
        assert want is not None
        how = (
            f"arr.astype(np.{want.name})"
            if want.kind != "V"
            else f"arr.astype(ml_dtypes.{want.name})"
        )
        raise InputError(
            f"input {name!r} is {arr.dtype.name}; the model takes {want.name} (convert it: {how})"
        )
    if shape and arr.ndim != len(shape):
        raise InputError(f"input {name!r} has rank {arr.ndim}; the model takes {list(shape)}")
    for i, (got, d) in enumerate(zip(arr.shape, shape)):
        if isinstance(d, int) and not isinstance(d, bool) and d >= 0 and got != d:
            raise InputError(f"input {name!r}: dimension {i} is {got}; the model takes {d}")


def _wire_nbytes(value: Any) -> int:
    """About the bytes ``value`` takes on the wire, whatever it is: an array (its
    data; strings by their UTF-8 length), a sequence of them, a map (a ZipMap's
    ``{class: score}``), a scalar, None (an absent optional). Before, the bandwidth
    estimate took ``.nbytes`` of every output, and a tail returning a sequence or
    a map lost its answer to an AttributeError."""
    if value is None:
        return 0
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "OUS":
            return sum(_wire_nbytes(x) for x in value.reshape(-1).tolist())
        return int(value.nbytes)
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_wire_nbytes(k) + _wire_nbytes(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_wire_nbytes(x) for x in value)
    return 8  # a number (a map's key or value)


def _per_tail(value: Any, tail_id: str, what: str) -> Any:
    if isinstance(value, Mapping):
        if tail_id not in value:
            raise ConfigError(f"{what} names no entry for tail {tail_id!r}")
        return value[tail_id]
    return value


class _Head:
    """A plain head in this process (onnxruntime) or a sealed one in a local worker."""

    def __init__(
        self, directory: str, entry: Mapping[str, Any], licence: Licence, threads: int | None
    ) -> None:
        self.session: Any = None
        self.model: Model | None = None
        path = os.path.join(directory, str(entry["head"]))
        if path.endswith(".vault"):
            head = open_package(path, licence=licence)  # a file: a local worker's Model
            assert isinstance(head, Model)
            self.model = head
            return
        with builtins.open(path, "rb") as fh:
            data = fh.read()
        want = entry.get("head_sha256")
        if want and "sha256:" + hashlib.sha256(data).hexdigest() != want:
            raise IntegrityError(f"{path}: the head does not match split.json")
        import onnxruntime as ort

        from .profile import session_options  # the profile measured the head this way

        try:
            self.session = ort.InferenceSession(
                data, session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise IntegrityError(f"{path}: not a loadable head model") from exc
        self.out_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        if self.model is not None:
            return self.model.compute(inputs)
        try:
            # bfloat16, float8 and int4 go through OrtValues (a cut tensor of those
            # dtypes failed here, "No corresponding Numpy type"), as ml_dtypes arrays
            # to the wire, which carries them
            return ort_run(self.session, inputs, self.out_names)
        except VaultError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own types; its text stays out
            text = str(exc)
            if "INVALID_ARGUMENT" in text or "input" in text.lower():
                raise InputError(
                    "the head refused this input (check it against model.inputs: names, dtypes, "
                    "shapes)"
                ) from None
            raise ComputeError("the head failed to run") from None

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
        self.session = None


class _Cut:
    def __init__(self, entry: Mapping[str, Any]) -> None:
        self.entry = entry
        self.name = str(entry["name"])
        self.all_server = entry.get("head") is None
        self.tail_id = str(entry["tail_model_id"])
        self.crossing = [str(c["wire_name"]) for c in entry.get("crossing", [])]
        self.cost = CutCost.from_json(entry["cost"]) if entry.get("cost") else None
        self.head: _Head | None = None
        self.tail: Model | None = None
        self.head_ms: float | None = None  # EWMA of the measured head time


class HybridModel:
    """A split model: see the module docstring. Same interface as :class:`vault.Model`."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        licence: str | os.PathLike[str] | Licence,
        *,
        server: str | Mapping[str, str],
        server_key: str | os.PathLike[str] | Mapping[str, str] | None = None,
        timeout: float = 60.0,
        cut: str | None = None,
        replan: bool = True,
        hysteresis: float = 0.15,
        head_threads: int | None = None,
        window: int = 2,
    ) -> None:
        self.directory = os.fspath(directory)
        path = os.path.join(self.directory, "split.json")
        try:
            with builtins.open(path, encoding="utf-8") as fh:
                desc = json.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"{self.directory}: no split.json (not a vault split)") from exc
        except ValueError as exc:
            raise ConfigError(f"{path}: not valid JSON") from exc
        if not isinstance(desc, dict) or desc.get("format") != SPLIT_FORMAT:
            raise ConfigError(f"{path}: not a vault split description ({SPLIT_FORMAT})")
        self.description = desc
        self.model_id = desc.get("model_id")
        self.inputs = _signature(desc.get("inputs"))
        self.outputs = _signature(desc.get("outputs"))
        self.info = {"model_id": self.model_id, "hybrid": True}
        self._licence = Licence.load(licence)
        self._server = server
        self._server_key = server_key if server_key is not None else desc.get("server_key")
        if self._server_key is None:
            raise ConfigError("the server's CURVE key is needed: server_key=... (or in split.json)")
        self.timeout = timeout
        self._head_threads = head_threads
        self._cuts = {c.name: c for c in (_Cut(e) for e in desc.get("cuts", []))}
        if not self._cuts:
            raise ConfigError(f"{path}: ships no cut")
        first = cut or str(desc.get("default") or next(iter(self._cuts)))
        if first not in self._cuts:
            raise ConfigError(f"no cut {first!r} in {path} (have {sorted(self._cuts)})")
        self._current = first
        self._lock = threading.Lock()
        self._plan_lock = threading.Lock()
        self._closed = False
        self.link = LinkEstimator()
        self._last_ping = 0.0
        costs = [c.cost for c in self._cuts.values() if c.cost is not None]
        self._replanner: Replanner | None = None
        if replan and len(costs) == len(self._cuts) > 1:
            self._replanner = Replanner(costs, first, hysteresis=hysteresis)
        self._head_pool = ThreadPoolExecutor(1, thread_name_prefix="vault-head")
        self._tail_pool = ThreadPoolExecutor(max(1, window), thread_name_prefix="vault-tail")
        self._in_flight = 0
        self._stop = threading.Event()
        try:
            self._ready(self._cuts[first])
        except BaseException:
            self.close()
            raise
        self._pinger = threading.Thread(target=self._ping_loop, name="vault-rtt", daemon=True)
        self._pinger.start()

    # -- the two sides ------------------------------------------------------------------------

    def _ready(self, c: _Cut) -> None:
        with self._lock:
            if self._closed:
                raise ConfigError("model is closed")
            if c.head is None and not c.all_server:
                c.head = _Head(self.directory, c.entry, self._licence, self._head_threads)
            if c.tail is None:
                address = str(_per_tail(self._server, c.tail_id, "server"))
                key = _per_tail(self._server_key, c.tail_id, "server_key")
                route = {"model": c.tail_id} if _CONNECT_ROUTES else {}  # a multi-model service
                c.tail = connect(address, licence=self._licence, server_key=key,
                                 timeout=self.timeout, **route)  # fmt: skip
                self._ping(c.tail)  # the connection exists now: one `info` is one round trip
                if c.tail.model_id not in (None, c.tail_id):
                    got = c.tail.model_id
                    c.tail.close()
                    c.tail = None
                    raise ConfigError(f"{address} serves {got!r}, not the tail {c.tail_id!r}")

    def _ping_loop(self) -> None:
        """RTT samples off the call path: an `info` round trip every PING_EVERY_S while
        no call is in flight (a ping inside a call would add a round trip to it)."""
        while not self._stop.wait(PING_EVERY_S):
            with self._lock:
                idle = self._in_flight == 0 and not self._closed
            tail = self._cuts[self._current].tail
            if idle and tail is not None:
                try:
                    self._ping(tail)
                except Exception:  # noqa: BLE001 - the next call reports a broken link
                    pass

    def _ping(self, tail: Model) -> None:
        t0 = time.perf_counter()
        tail._op("info")  # noqa: SLF001 - one small round trip
        self.link.observe_rtt((time.perf_counter() - t0) * 1e3)
        self._last_ping = time.monotonic()

    def _check_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Names, dtypes and ranks against the public signature, before the
        head runs: a wrong input is an :class:`InputError` in the vault's
        words, the same whichever side of the cut would have met it."""
        check_feeds_mapping(inputs, self.inputs)
        unknown = [k for k in inputs if k not in self.inputs]
        if unknown:
            raise InputError(f"unknown input {unknown[0]!r} (inputs: {sorted(self.inputs)})")
        missing = [k for k in self.inputs if k not in inputs]
        if missing:
            raise InputError(f"missing input {missing[0]!r}")
        for name, value in inputs.items():
            _check_tensor(name, value, *self.inputs[name])

    def _run_head(self, c: _Cut, inputs: Mapping[str, Any]) -> dict[str, Any]:
        self._check_inputs(inputs)
        if c.all_server:
            return dict(inputs)
        assert c.head is not None
        t0 = time.perf_counter()
        mid = c.head.run(inputs)
        ms = (time.perf_counter() - t0) * 1e3
        c.head_ms = ms if c.head_ms is None else 0.7 * c.head_ms + 0.3 * ms
        return {n: mid[n] for n in c.crossing}

    def _run_tail(
        self, c: _Cut, mid: Mapping[str, Any], outputs: Sequence[str] | None, timeout: float | None
    ) -> dict[str, np.ndarray[Any, Any]]:
        assert c.tail is not None
        with self._lock:
            self._in_flight += 1
            alone = self._in_flight == 1
        try:
            t0 = time.perf_counter()
            out = c.tail.compute(mid, outputs, timeout=timeout)
            wall = (time.perf_counter() - t0) * 1e3
        finally:
            with self._lock:
                self._in_flight -= 1
        if alone and c.cost is not None:
            nbytes = sum(_wire_nbytes(v) for v in mid.values())
            nbytes += sum(_wire_nbytes(v) for v in out.values())
            self.link.observe_call(wall_ms=wall, server_ms=c.cost.tail_ms, nbytes=nbytes)
        self._maybe_replan(c)
        return out

    def _maybe_replan(self, c: _Cut) -> None:
        link = self.link.link
        if self._replanner is None or link is None or c.name != self._current:
            return
        if not self._plan_lock.acquire(blocking=False):
            return  # another call is re-planning right now
        try:
            self._replan(c, link)
        finally:
            self._plan_lock.release()

    def _replan(self, c: _Cut, link: Link) -> None:
        assert self._replanner is not None
        # how much slower (or faster) this device is than the profile the cuts were
        # planned with, from the head in use; a head under 1 ms says nothing
        scale = 1.0
        if c.head_ms is not None and c.cost is not None and c.cost.head_ms >= 1.0:
            scale = c.head_ms / c.cost.head_ms
        choice = self._replanner.choose(link, head_scale=scale)
        if choice != self._current:
            try:
                self._ready(self._cuts[choice])
            except Exception:  # noqa: BLE001 - that tail is not reachable: stay where we are
                self._replanner.current = self._current
                return
            self._current = choice

    # -- public API ---------------------------------------------------------------------------------

    @property
    def cut(self) -> str:
        """The name of the cut in use (``c0``, ``c1``, ...)."""
        return self._current

    def compute(
        self,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Head here, tail on the server; returns the chosen (default: all) outputs."""
        c = self._cuts[self._current]
        return self._run_tail(c, self._run_head(c, inputs), outputs, timeout)

    def compute_many(
        self, batch: Sequence[Mapping[str, Any]], outputs: Sequence[str] | None = None
    ) -> list[dict[str, np.ndarray[Any, Any]]]:
        """Compute each of ``batch`` in order; the head of call i+1 overlaps the tail of call i."""
        futures = []
        for inputs in batch:
            c = self._cuts[self._current]
            mid = self._run_head(c, inputs)
            futures.append(self._tail_pool.submit(self._run_tail, c, mid, outputs, None))
        return [f.result() for f in futures]

    async def compute_async(
        self,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """:meth:`compute` for asyncio: concurrent calls pipeline head and tail."""
        loop = asyncio.get_running_loop()
        c = self._cuts[self._current]
        mid = await loop.run_in_executor(self._head_pool, self._run_head, c, inputs)
        return await loop.run_in_executor(self._tail_pool, self._run_tail, c, mid, outputs, timeout)

    def health(self) -> dict[str, Any]:
        """The tail worker's health report, with the cut in use and the measured link."""
        c = self._cuts[self._current]
        assert c.tail is not None
        link = self.link.link
        return {
            "cut": self._current,
            "link": None if link is None else {"rtt_ms": link.rtt_ms, "mbit": link.mbit},
            "head_ms": c.head_ms,
            "tail": c.tail.health(),
        }

    def stats(self) -> dict[str, Any]:
        """The tail worker's call statistics."""
        c = self._cuts[self._current]
        assert c.tail is not None
        return c.tail.stats()

    def link_estimate(self) -> Link | None:
        """The measured link (RTT ms, Mbit/s), once there is a sample of each."""
        return self.link.link

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        pinger = getattr(self, "_pinger", None)
        if pinger is not None:
            pinger.join()
        self._head_pool.shutdown(wait=True)
        self._tail_pool.shutdown(wait=True)
        for c in self._cuts.values():
            if c.head is not None:
                c.head.close()
            if c.tail is not None:
                c.tail.close()

    def __enter__(self) -> HybridModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"HybridModel({self.model_id!r}, cut={self._current!r}, "
            f"inputs={list(self.inputs)}, outputs={list(self.outputs)})"
        )

    def __reduce__(self) -> Any:
        raise TypeError("HybridModel is a live connection and cannot be pickled")


def open_split(
    directory: str | os.PathLike[str],
    licence: str | os.PathLike[str] | Licence,
    *,
    server: str | Mapping[str, str] | None,
    **kw: Any,
) -> HybridModel:
    """``vault.open`` of a split directory (see :class:`HybridModel`)."""
    if not server:
        raise ConfigError("a split model needs server='tcp://host:port' (where its tail is served)")
    return HybridModel(directory, licence, server=server, **kw)
