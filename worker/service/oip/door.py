"""What the REST and gRPC doors share: the data plane they open onto, and
one mapping from the vault's typed errors to the protocol's status codes.

A door parses the bearer token and has it vetted by the service before it
reads the request's body or decodes its message (:meth:`DataPlane.vet`: the
token's signature against the licence's proof key, its expiry and scope, the
licence in force: a stranger's request costs no body in memory); then it
converts the request into the vault's tensor frames and posts an
:class:`~worker.service.service.EdgeCall` into the service's loop
(:meth:`DataPlane.infer`); the loop routes, admits (licence, quota, rate,
revocation, the token's own budget), batches, meters, logs and answers it
exactly as a ZeroMQ call, and the door converts the answer back. Nothing
about a call's policy is decided in a door. Each door bounds the requests it
holds at once (:class:`Gate`: a typed 503 / ``UNAVAILABLE`` past it).

=====================================  ======  ===================
vault error (code)                     HTTP    gRPC
=====================================  ======  ===================
token_invalid, token_expired,          401     UNAUTHENTICATED
licence_unknown
licence_revoked, licence_expired,      403     PERMISSION_DENIED
wrong_model, permission_denied, ...
quota_exhausted, token_spent,          429     RESOURCE_EXHAUSTED
rate_limited (with Retry-After, seconds rounded up)
bad_input, protocol                    400     INVALID_ARGUMENT
unknown_model                          404     NOT_FOUND
unavailable, worker_crashed,           503     UNAVAILABLE
keyserver, keyserver_unavailable
timeout                                504     DEADLINE_EXCEEDED
compute and anything else              500     INTERNAL
=====================================  ======  ===================
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import grpc

from vault.core.errors import (
    ConfigError,
    InputError,
    KeyServerError,
    LicenceError,
    ProtocolError,
    QuotaExhaustedError,
    RateLimitedError,
    ServiceUnavailableError,
    TokenError,
    UnknownLicenceError,
    UnknownModelError,
    VaultError,
    WorkerCrashedError,
    WorkerTimeoutError,
    from_wire,
    shown,
)
from vault.core.protocol import SUPPORTED_DTYPES
from vault.core.token import Token, parse_token

from ..service import EdgeCall
from .tensors import VAULT_TO_OIP

__all__ = ["DataPlane", "Gate", "Plane", "grpc_status", "http_status", "retry_after"]

SERVER_NAME = "vault"
_CODE = re.compile(r"[a-z_0-9]{1,40}")  # a metric label from the vault's own codes
T_ = TypeVar("T_")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vault-sandbox")
    except PackageNotFoundError:  # pragma: no cover - a source tree not installed
        return "0"


EXTENSIONS = ["binary_tensor_data", "model_configuration"]

# Triton's model configuration names a datatype TYPE_<the protocol's>, but for
# BYTES (model_config.proto's DataType)
_CONFIG_TYPE = {"BYTES": "TYPE_STRING"}

# Tensors in a form that takes Python objects to decode (REST's JSON, gRPC's
# typed ``contents``) grow about 12-13 times once decoded (measured: 30 MiB of
# floats, 370-390 MiB at peak, either door), which a vetted token's holder
# may still ask of the service. So that part of a request has its own limit, Triton's
# default input size; binary tensors (REST's extension, gRPC's
# ``raw_input_contents``) cross without expansion and keep the whole limit.
MAX_DECODED = 64 << 20
# ... and the values in it: a value costs about a hundred bytes of Python
# objects while it is decoded whatever its text (a licensed caller's 16 MiB
# of JSON "0," values, 16 KB gzipped, took the service up 1.4 GB), so a
# request's JSON or typed values are counted before they are decoded
MAX_DECODED_VALUES = 4 << 20


class Plane(Protocol):
    """The service as a door sees it (:class:`~worker.service.WorkerService`)."""

    def submit(self, call: EdgeCall) -> None: ...

    def vet_now(self, token: Token, model: str | None) -> bool: ...

    def live(self) -> bool: ...

    def ready(self) -> bool: ...

    def model_ready(self, model: str, version: str | None = None) -> bool: ...

    def model_state(self, model: str) -> tuple[str, tuple[str, str] | None] | None: ...

    def model_signature(self, model: str) -> dict[str, Any] | None: ...

    def model_info(self, model: str) -> dict[str, Any] | None: ...

    def door_error(self, door: str, code: str) -> None: ...


def http_status(exc: VaultError) -> int:
    if isinstance(exc, (TokenError, UnknownLicenceError)):
        return 401
    if isinstance(exc, (QuotaExhaustedError, RateLimitedError)):
        return 429
    if isinstance(exc, LicenceError):
        return 403
    if isinstance(exc, UnknownModelError):
        return 404
    if isinstance(exc, (InputError, ProtocolError, ConfigError)):
        return 400
    if isinstance(exc, (ServiceUnavailableError, WorkerCrashedError, KeyServerError)):
        return 503
    if isinstance(exc, WorkerTimeoutError):
        return 504
    return 500


_GRPC = {
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    500: grpc.StatusCode.INTERNAL,
}


def grpc_status(exc: VaultError) -> grpc.StatusCode:
    return _GRPC[http_status(exc)]


def retry_after(exc: VaultError) -> int | None:
    """Whole seconds a refused caller should wait (the rate limit's refill,
    rounded up, at least 1; 1 for a service or door that is full or away), or None."""
    if isinstance(exc, ServiceUnavailableError):
        return 1
    if not isinstance(exc, RateLimitedError):
        return None
    wait = getattr(exc, "retry_after", None)
    return max(1, math.ceil(wait)) if isinstance(wait, (int, float)) and wait > 0 else 1


def error_text(exc: VaultError) -> str:
    """The message a client shows: the vault's code first, then its text."""
    return f"[{exc.code}] {exc.message}"


REST_HOW = "send the header Authorization: Bearer TOKEN"
# gRPC metadata keys are lowercase: a client sending "Authorization" is
# refused by its own library ("Invalid metadata")
GRPC_HOW = "send the metadata authorization: Bearer TOKEN (the key in lowercase)"


def bearer(value: str | None, how: str = REST_HOW) -> Token:
    """The token of an ``Authorization: Bearer ...`` value (TokenError if
    none, saying ``how`` to send one: the door's own way)."""
    if not value:
        raise TokenError(f"no bearer token: {how}")
    scheme, _, text = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not text.strip():
        raise TokenError(f"no bearer token: {how}")
    return parse_token(text.strip())


def _meta_shape(shape: Any) -> list[int]:
    return [d if isinstance(d, int) and not isinstance(d, bool) and d >= 0 else -1
            for d in (shape or [])]  # fmt: skip


def tensor_meta(specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The declared tensors the protocol can carry, as model metadata lists them."""
    out = []
    for s in specs:
        dt = str(s.get("dtype"))
        if dt in SUPPORTED_DTYPES and dt in VAULT_TO_OIP:
            out.append({"name": s["name"], "datatype": VAULT_TO_OIP[dt],
                        "shape": _meta_shape(s.get("shape"))})  # fmt: skip
    return out


class DataPlane:
    """One door's handle on the service (see the module docstring)."""

    def __init__(self, service: Plane) -> None:
        self.service = service

    def error_sent(self, door: str, code: str) -> None:
        """Count an error answer of ``door`` (the service's metric; a stand-in
        service without one counts nothing)."""
        count = getattr(self.service, "door_error", None)
        if count is not None:
            count(door, code if _CODE.fullmatch(code) else "other")

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": _version(), "extensions": list(EXTENSIONS)}

    def _served(self, model: str, version: str | None) -> None:
        """UnknownModelError unless ``model`` (and ``version``) is served here,
        ready or not (a model that cannot load is served, and not ready)."""
        if self.service.model_state(model) is None:
            # not the names that are served: metadata needs no token, and the
            # list would tell anyone every model here, other tenants' too (the
            # repository extension, which lists them, is not served either)
            raise UnknownModelError(f"no model {shown(model)} is served here")
        if version not in (None, "", "1"):
            raise UnknownModelError(
                f"model {shown(model)} has no version {shown(version)} (only 1)"
            )

    def model_ready(self, model: str, version: str | None) -> bool:
        """Whether a model served here takes calls now; UnknownModelError for
        one that is not served (the same rule as the metrics port's probes)."""
        self._served(model, version)
        return self.service.model_ready(model, version)

    def model_metadata(self, model: str, version: str | None) -> dict[str, Any]:
        """The public signature, from the manifest while no worker has started."""
        self._served(model, version)
        info = self.service.model_signature(model)
        if info is None:  # removed meanwhile
            raise UnknownModelError(f"no model {shown(model)} is served here")
        return {
            "name": model,
            "versions": ["1"],
            "platform": "vault",
            "inputs": tensor_meta(info.get("inputs") or []),
            "outputs": tensor_meta(info.get("outputs") or []),
        }

    def model_config(self, model: str, version: str | None) -> dict[str, Any]:
        """Triton's model configuration (its ``model_configuration``
        extension: tritonclient's ``get_model_config``), made from the model
        metadata and saying nothing more: ``max_batch_size`` 0, so each
        input's ``dims`` are its whole shape (``-1`` for a free dimension),
        sent as they are. The service's own batching (``--max-batch``) is
        not the caller's to do (docs/protocol.md)."""
        md = self.model_metadata(model, version)

        def io(t: dict[str, Any]) -> dict[str, Any]:
            dt = _CONFIG_TYPE.get(t["datatype"], "TYPE_" + t["datatype"])
            return {"name": t["name"], "data_type": dt, "dims": t["shape"]}

        return {
            "name": model,
            "platform": md["platform"],
            "max_batch_size": 0,
            "input": [io(t) for t in md["inputs"]],
            "output": [io(t) for t in md["outputs"]],
        }

    def default_outputs(self, model: str) -> list[str] | None:
        """Every declared output the protocol can carry (a sequence or map
        output is left out: the protocol has no way to send it)."""
        info = self.service.model_info(model)
        if info is None:
            return None
        return [t["name"] for t in tensor_meta(info.get("outputs") or [])]

    def _check_outputs(self, model: str, outputs: list[str]) -> None:
        """A declared output the protocol cannot carry (a sequence, a map) is
        refused before the call runs, so no call is billed and then not
        delivered; an unknown name is the worker's to refuse (not billed)."""
        seen: set[str] = set()
        for n in outputs:  # Triton refuses one asked twice: one answer each, in order
            if n in seen:
                raise InputError(f"output {n!r} is asked for twice")
            seen.add(n)
        info = self.service.model_info(model) or {}
        carried = {t["name"] for t in tensor_meta(info.get("outputs") or [])}
        for spec in info.get("outputs") or []:
            if spec.get("name") in outputs and spec["name"] not in carried:
                raise InputError(f"output {spec['name']!r} is a {spec.get('dtype')}, which the "
                                 "Open Inference Protocol cannot carry")  # fmt: skip

    async def vet(self, model: str | None, version: str | None, token: Token,
                  timeout: float | None = None, address: str | None = None) -> None:  # fmt: skip
        """The token genuine and its licence in force (and ``model``, when
        given, served here), or the typed error: asked before the door reads
        the request; nothing admitted or counted (``EdgeCall.vet``)."""
        if model is not None:
            self._served(model, version)
        # decided here from what the policy knows fresh (the common case: a
        # caller's second request within a lease); else one trip through the
        # service's loop, which fetches the licence's probe and parks
        if self.service.vet_now(token, model):
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[dict[str, Any], Sequence[Any]]] = loop.create_future()

        def reply(header: dict[str, Any], out: Sequence[Any]) -> None:  # the loop's thread
            try:
                loop.call_soon_threadsafe(_settle, fut, header, out)
            except RuntimeError:  # this door's loop has closed: nobody waits any more
                pass

        self.service.submit(EdgeCall(model, token, [], [], None, reply, timeout, vet=True,
                                     address=address))  # fmt: skip
        header, _ = await fut
        if not header.get("ok"):
            raise from_wire(header.get("error"))

    async def infer(
        self,
        model: str,
        version: str | None,
        token: Token,
        tensors: list[dict[str, Any]],
        frames: list[Any],
        outputs: list[str] | None,
        timeout: float | None = None,
    ) -> tuple[list[dict[str, Any]], list[Any]]:
        """Post one call into the loop and wait for its answer: the output
        descriptors and frames, or the typed error the loop answered."""
        if version not in (None, "", "1"):
            raise UnknownModelError(f"model {shown(model)} has no version {shown(version)} "
                                    "(only 1)")  # fmt: skip
        if outputs is None:
            outputs = self.default_outputs(model)
        else:
            self._check_outputs(model, outputs)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[dict[str, Any], Sequence[Any]]] = loop.create_future()

        def reply(header: dict[str, Any], out: Sequence[Any]) -> None:  # the loop's thread
            try:
                loop.call_soon_threadsafe(_settle, fut, header, out)
            except RuntimeError:  # this door's loop has closed: nobody waits any more
                pass

        self.service.submit(EdgeCall(model, token, tensors, frames, outputs, reply, timeout))
        header, out = await fut
        return _result(header, out)


@contextlib.contextmanager
def counted(counts: dict[str, int], key: str, limit: int, refusal: str) -> Iterator[None]:
    """Hold one of ``key``'s ``limit`` in ``counts`` (its entry gone with its
    last holder), or ``ServiceUnavailableError(refusal)``."""
    n = counts.get(key, 0)
    if n >= limit:
        raise ServiceUnavailableError(refusal)
    counts[key] = n + 1
    try:
        yield
    finally:
        left = counts[key] - 1
        if left:
            counts[key] = left
        else:
            del counts[key]


_ANSWER_SIZES_KEPT = 4096  # (licence, model) answer sizes a door remembers


class AnswerRoom:
    """One call's answer bytes at a door (:meth:`Gate.answer_room`)."""

    def __init__(self, gate: Gate, licence_id: str, model: str, rows: int,
                 learner: asyncio.Event | None = None) -> None:  # fmt: skip
        self.gate, self.licence_id, self.model, self.rows = gate, licence_id, model, rows
        self._learner = learner
        self.reserved = 0
        self.size: int | None = None
        self._kept = False

    def arrived(self, frames: Sequence[Any]) -> int:
        """The answer is in: its bytes held instead of the reservation."""
        self.size = answer_bytes(frames)
        self.gate.answer_arrived(self.licence_id, self.model, self.reserved, self.size,
                                 self.rows)  # fmt: skip
        self._learn()
        return self.size

    def _learn(self) -> None:
        if self._learner is not None:
            self.gate._learned((self.licence_id, self.model), self._learner)
            self._learner = None

    def keep(self) -> int:
        """The answer's bytes stay held past the room: the caller gives them
        back (:meth:`Gate.give_answer`) once it is written."""
        self._kept = True
        return self.size or 0

    def close(self) -> None:
        self._learn()
        if self.size is None:
            self.gate.give_answer(self.licence_id, self.reserved)
        elif not self._kept:
            self.gate.give_answer(self.licence_id, self.size)


def rows_of(descs: Sequence[dict[str, Any]]) -> int:
    """The rows of a request: its first input's first dimension (1 for a
    scalar, or no input)."""
    shape = descs[0].get("shape") if descs else None
    first = shape[0] if shape else 1
    return first if isinstance(first, int) and first > 0 else 1


def answer_bytes(frames: Sequence[Any]) -> int:
    """The bytes an answer's output frames take."""
    return sum(memoryview(f).nbytes for f in frames)


class Gate:
    """At most ``limit`` requests held at once by one door (vetting, reading,
    waiting for the service); past it a typed refusal, at once, before
    anything of the request is read: ``ServiceUnavailableError`` (503 /
    ``UNAVAILABLE``, with ``Retry-After: 1``). Used from the door's own event
    loop only."""

    def __init__(self, limit: int, *, bytes_per_licence: int = 1 << 30) -> None:
        self.limit = max(1, limit)
        self.held = 0
        # the request bytes one licence's requests hold at the door until
        # they are answered (what their bodies or messages take in memory);
        # before, licensed bob's 16 requests declaring 256 MiB bodies each held
        # 1 GiB of the service's memory for the 30 s body timeout, per door
        self.bytes_per_licence = bytes_per_licence
        self.bytes_by_licence: dict[str, int] = {}
        # what one licence's requests may hold of it while their body arrives:
        # a quarter. Before, one token holder's 64 requests that never sent
        # their body held the whole door for its 30 s body timeout, again and
        # again (requests computing are paid for, and bounded by the gate)
        self.per_licence = max(1, self.limit // 4)
        self.by_licence: dict[str, int] = {}
        # (licence, model) -> the largest answer it got here (reserve_answer)
        self._answers: dict[tuple[str, str], int] = {}
        self._answer_bytes: dict[str, int] = {}  # licence -> of its bytes, its answers'
        # (licence, model) -> set once the first call, computing, has its answer
        self._learning: dict[tuple[str, str], asyncio.Event] = {}

    @contextlib.asynccontextmanager
    async def answer_room(
        self, licence_id: str, model: str, rows: int, wait: float
    ) -> AsyncIterator[AnswerRoom]:
        """Room for one call's answer, around its computation (both doors):
        :meth:`reserve_answer` before, :meth:`answer_arrived` when the
        answer is in (``room.arrived(frames)``), and the answer's bytes given
        back on leaving, unless ``room.keep()`` hands them to whoever writes
        the answer later (gRPC's done callback: :meth:`give_answer`). A
        licence's first call of a model, whose answer's size nothing tells
        yet, is computed alone: its other calls of that model wait for its
        answer, up to ``wait`` seconds (16 concurrent first calls of 524 MB
        answers held 8.4 GB of one licence's 1 GiB)."""
        key = (licence_id, model)
        learner: asyncio.Event | None = None
        while key not in self._answers:
            pending = self._learning.get(key)
            if pending is None:
                learner = self._learning[key] = asyncio.Event()
                break
            try:
                await within(pending.wait(), wait)
            except asyncio.TimeoutError:
                raise ServiceUnavailableError(
                    "this licence's first call of this model is still being answered; try "
                    "again when it is"
                ) from None
        room = AnswerRoom(self, licence_id, model, rows, learner)
        try:
            room.reserved = self.reserve_answer(licence_id, model, rows)
            yield room
        finally:
            room.close()

    def _learned(self, key: tuple[str, str], learner: asyncio.Event) -> None:
        """The first call's answer is in (or it failed): the next may go."""
        if self._learning.get(key) is learner:
            del self._learning[key]
        learner.set()

    def __enter__(self) -> Gate:
        if self.held >= self.limit:
            raise ServiceUnavailableError(
                f"this door holds {self.limit} requests already; try again shortly"
            )
        self.held += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.held -= 1

    def licence(self, licence_id: str) -> contextlib.AbstractContextManager[None]:
        """Hold one of ``licence_id``'s share (a vetted token's licence)."""
        return counted(self.by_licence, licence_id, self.per_licence,
                       f"this licence holds {self.per_licence} requests at this door already; "
                       "try again when one is answered")  # fmt: skip

    def take_bytes(self, licence_id: str, n: int) -> None:
        """``n`` more request bytes held for ``licence_id`` (give them back
        with :meth:`give_bytes`), or a typed refusal past its budget."""
        have = self.bytes_by_licence.get(licence_id, 0)
        if have + n > self.bytes_per_licence:
            raise self._full(have)
        self.bytes_by_licence[licence_id] = have + n

    def check_room(self, licence_id: str) -> None:
        """The typed refusal unless the licence's budget has room left (before
        a read whose size is known only once it is in: gRPC's)."""
        have = self.bytes_by_licence.get(licence_id, 0)
        if have >= self.bytes_per_licence:
            raise self._full(have)

    def _full(self, have: int) -> ServiceUnavailableError:
        return ServiceUnavailableError(
            f"this licence's requests hold {have >> 20} MiB at this door already (at most "
            f"{self.bytes_per_licence >> 20} MiB); try again when one is answered"
        )

    def reserve_answer(self, licence_id: str, model: str, rows: int = 1) -> int:
        """Before a call of ``licence_id``'s is computed: room for its answer,
        refused (``ServiceUnavailableError``) when the licence's requests and
        unread answers fill its budget (its requests' own bytes aside: they
        were let in). As much is taken as the licence's
        largest answer from ``model`` so far (at most a quarter of its budget;
        0 for its first call): the answers its concurrent calls will hold are
        counted before they exist, per row of the request's first input
        (``rows``: a licence that learned its size on one row and then asks
        for a thousand reserves for a thousand, at most its whole budget: a
        licence whose answers are half its budget has two computed at once).
        Before, answers were not
        counted at all:
        eight calls of one token whose 524 MB answers nobody read held 9.3 GB.
        Give it back with :meth:`answer_arrived`, or :meth:`give_answer` when
        the call fails."""
        n = min(self._answers.get((licence_id, model), 0) * max(1, rows), self.bytes_per_licence)
        have = self._answer_bytes.get(licence_id, 0)  # its requests' own bytes aside
        if have + n > self.bytes_per_licence or have >= self.bytes_per_licence:
            raise ServiceUnavailableError(
                f"this licence's answers, being computed or not yet read, hold {have >> 20} MiB "
                f"at this door, and this call's would take about {n >> 20} MiB more (at most "
                f"{self.bytes_per_licence >> 20} MiB); try again when one is read, or make "
                "fewer such calls at once"
            )
        self.hold_bytes(licence_id, n)
        self._answer_bytes[licence_id] = have + n
        return n

    def answer_arrived(
        self, licence_id: str, model: str, reserved: int, size: int, rows: int = 1
    ) -> None:
        """The answer of a call that reserved ``reserved`` is in memory:
        ``size`` bytes, held against the licence's budget from now until it
        is written (:meth:`give_answer`), whatever the budget says (the call
        is served)."""
        self.give_answer(licence_id, reserved)
        self.hold_bytes(licence_id, size)
        self._answer_bytes[licence_id] = self._answer_bytes.get(licence_id, 0) + size
        key = (licence_id, model)
        # bytes per row: the largest seen, halved at each smaller one (one
        # large answer long ago does not hold the licence down for good)
        per_row, seen = -(-size // max(1, rows)), self._answers.pop(key, 0)
        self._answers[key] = max(per_row, seen // 2)
        while len(self._answers) > _ANSWER_SIZES_KEPT:  # the oldest first
            del self._answers[next(iter(self._answers))]

    def give_answer(self, licence_id: str, n: int) -> None:
        """An answer's ``n`` bytes (or its reservation's) given back: written,
        or its call failed."""
        self.give_bytes(licence_id, n)
        left = self._answer_bytes.get(licence_id, 0) - n
        if left > 0:
            self._answer_bytes[licence_id] = left
        else:
            self._answer_bytes.pop(licence_id, None)

    def hold_bytes(self, licence_id: str, n: int) -> None:
        """``n`` bytes already in memory (a message read whole), counted
        against the licence's whatever its budget says."""
        self.bytes_by_licence[licence_id] = self.bytes_by_licence.get(licence_id, 0) + n

    def give_bytes(self, licence_id: str, n: int) -> None:
        left = self.bytes_by_licence.get(licence_id, 0) - n
        if left > 0:
            self.bytes_by_licence[licence_id] = left
        else:
            self.bytes_by_licence.pop(licence_id, None)


def _result(header: dict[str, Any], out: Sequence[Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    if not header.get("ok"):
        raise from_wire(header.get("error"))
    descs = header.get("tensors")
    if not isinstance(descs, list) or len(descs) != len(out):
        raise WorkerCrashedError("the worker's answer was malformed")
    return descs, [f.buffer if hasattr(f, "buffer") else f for f in out]


def _settle(fut: asyncio.Future[Any], header: dict[str, Any], out: Sequence[Any]) -> None:
    if not fut.done():
        fut.set_result((header, out))


async def within(aw: Awaitable[T_], seconds: float) -> T_:
    """``await aw``, or ``TimeoutError`` after ``seconds``: in the caller's
    own task where Python has :func:`asyncio.timeout` (3.11+), which costs
    about half of :func:`asyncio.wait_for`'s extra task per call."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await aw
    return await asyncio.wait_for(aw, seconds)  # pragma: no cover - Python 3.10


def timeout_of(value: Any) -> float | None:
    """A client's own timeout (the request's ``timeout`` parameter, in
    microseconds as Triton and tritonclient define it), in seconds, if it
    sent a sane one."""
    if isinstance(value, bool):
        return None
    try:
        t = float(value) / 1e6
    except (TypeError, ValueError):
        return None
    return t if math.isfinite(t) and t > 0 else None
