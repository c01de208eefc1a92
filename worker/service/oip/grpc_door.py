"""The Open Inference Protocol's gRPC door: ``inference.GRPCInferenceService``
(the messages of :file:`inference.proto`), on a ``grpc.aio`` server (see
:mod:`.server`).

Each RPC converts protobuf to the data plane's types and back; ``ModelInfer``
takes typed ``contents`` or ``raw_input_contents`` and answers with
``raw_output_contents`` (as Triton does). The bearer token travels as the
``authorization`` metadata (``Bearer TOKEN``). A refusal is the status of
:func:`.door.grpc_status` with ``[code] message`` as details and the vault's
code in the trailing metadata ``vault-error-code`` (and ``retry-after`` when
the rate limit refused it).

``ModelInfer`` is registered (:func:`register`) as a stream-unary method
whose request stays raw bytes: on the wire a unary call is the same (one
message, then the end of the stream), but gRPC core receives a streaming
method's message only when the handler reads it. So the handler vets the
token from the metadata first (:meth:`.door.DataPlane.vet`), then reads the
message (within ``body_timeout``), then decodes it: a stranger's request
costs neither the message in memory (up to the 1 GiB limit) nor its
decoding. The server bounds the RPCs it runs at once (``server.py``:
``maximum_concurrent_rpcs``, ``RESOURCE_EXHAUSTED`` past it) and each door
the inference requests it holds (:class:`.door.Gate`, ``UNAVAILABLE``).

Example::

    servicer = InferenceServicer(DataPlane(service), gate=Gate(64), body_timeout=30.0)
    register(servicer, server)
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from vault.core.errors import (
    InputError,
    ProtocolError,
    ServiceUnavailableError,
    UnknownModelError,
    VaultError,
)
from vault.core.peercap import address_key

from . import inference_pb2 as _pb
from . import tensors as T
from .door import (
    GRPC_HOW,
    MAX_DECODED,
    MAX_DECODED_VALUES,
    DataPlane,
    Gate,
    bearer,
    counted,
    error_text,
    grpc_status,
    retry_after,
    rows_of,
    timeout_of,
    within,
)

__all__ = ["InferenceServicer", "register"]

pb: Any = _pb  # generated code: untyped

# how long a token-free RPC's message (a model's name and version: a few
# bytes, sent with the call) may take to arrive once the door reads it, and
# how many such messages are read at once
FREE_READ_S = 2.0
FREE_READS = 4
LICENCE_READS = 2  # one licence's ModelInfer messages read at once, at a door
# one licence's ModelStreamInfer streams open at once, at a door (each reads
# its messages one at a time, so at most this many more of the licence's
# messages are read at once)
LICENCE_STREAMS = 2

# InferTensorContents field that holds each datatype's typed elements
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "FP16": "fp32_contents",  # not in the protocol's table; taken as fp32 values
    "BYTES": "bytes_contents",
}
# what each field's elements are, on the wire
_NATURAL: dict[str, Any] = {
    "bool_contents": np.dtype(bool),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: VaultError) -> None:
    """End the RPC with ``exc`` as its status. The error is stripped of its
    traceback and the errors it was raised from first: ``context.abort``
    raises inside the handler's ``except`` block, and the traceback held the
    frames that decoded the request, in a cycle through the error itself, so
    a refused call's message and the Python values made of it lived until
    the cycle collector happened to run (10 refused 16 MB calls left 1.4 GB
    behind, 128 of them 19 GB)."""
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    meta: list[tuple[str, str]] = [("vault-error-code", exc.code)]
    wait = retry_after(exc)
    if wait is not None:
        meta.append(("retry-after", str(wait)))
    context.set_trailing_metadata(tuple(meta))
    await context.abort(grpc_status(exc), error_text(exc))


def peer_address(peer: str) -> str:
    """What a gRPC peer (``ipv4:1.2.3.4:5678``, ``ipv6:%5B::1%5D:5678``) is
    counted as: :func:`vault.core.peercap.address_key` of its host, as the REST door
    counts connections."""
    kind, _, rest = urllib.parse.unquote(peer or "").partition(":")
    if kind in ("ipv4", "ipv6"):
        return address_key(rest.rpartition(":")[0])
    return peer or ""


class Peers:
    """The RPCs each peer address holds at a door at once (at most
    ``limit``; UNAVAILABLE past it): one address never holds the whole
    server's ``maximum_concurrent_rpcs``. Used from the door's event loop
    only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: dict[str, int] = {}

    def hold(self, address: str) -> contextlib.AbstractContextManager[None]:
        return counted(self.held, address, self.limit,
                       f"this address holds {self.limit} calls at this door already; "
                       "try again when one is answered")  # fmt: skip


class Turns:
    """At most ``n`` holders at once per key (a peer address, a licence),
    waiting their turn in order; a key's semaphore goes with its last user.
    Used from the door's event loop only."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.keys: dict[str, list[Any]] = {}  # key -> [its semaphore, users]

    @contextlib.asynccontextmanager
    async def turn(self, key: str, timeout: float, refusal: str = "") -> Any:
        entry = self.keys.get(key)
        if entry is None:
            entry = self.keys[key] = [asyncio.Semaphore(self.n), 0]
        entry[1] += 1
        try:
            try:
                await within(entry[0].acquire(), timeout)
            except asyncio.TimeoutError:
                raise ServiceUnavailableError(refusal or "this door is reading other requests; "
                                              "try again in a moment") from None  # fmt: skip
            try:
                yield
            finally:
                entry[0].release()
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self.keys[key]


def _token(context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    value = None
    for k, v in context.invocation_metadata() or ():
        if k == "authorization":
            value = v if isinstance(v, str) else bytes(v).decode("latin-1")
    return bearer(value, GRPC_HOW)


class InferenceServicer:
    """See the module docstring."""

    def __init__(self, plane: DataPlane, *, gate: Gate | None = None,
                 body_timeout: float = 30.0, head_timeout: float = 10.0,
                 per_address: int = 64) -> None:  # fmt: skip
        self.plane = plane
        self.gate = gate or Gate(64)
        self.body_timeout = body_timeout
        self.head_timeout = head_timeout
        self.peers = Peers(per_address)
        # the messages of the RPCs that need no token: gRPC takes a message
        # whole (up to the door's 1 GiB) before anything can look at it, and a
        # stranger may send one to any of these; so at most FREE_READS are
        # read at once, one per peer address
        self._reading = asyncio.Semaphore(FREE_READS)
        self._reading_from = Turns(1)  # one per peer address
        # a licence's messages read at once (each up to 1 GiB, held until
        # answered and counted against the licence's bytes at the door)
        self._licence_reads = Turns(LICENCE_READS)
        # a licence's ModelInfer calls between their vetting and their message
        # read (a quarter of the door's requests): past it a call waits for
        # one, holding none of the door's requests meanwhile
        self._shares = Turns(self.gate.per_licence)
        self._streams: dict[str, int] = {}  # licence -> its open ModelStreamInfer streams

    async def free(self, name: str, requests: Any, context: Any) -> Any:
        """An RPC that needs no token (health, metadata, configuration),
        registered on raw bytes (:func:`register`): counted against its peer
        address; its message (the name and version it asks about; health
        has none to read) read within :data:`FREE_READ_S` in its address's
        turn and one of the door's :data:`FREE_READS` slots, each waited for
        at most ``head_timeout``; then answered. A stranger's RPC that sends no message, or a
        huge one, holds neither a server slot nor memory for long."""
        try:
            address = peer_address(context.peer())
            with self.peers.hold(address):
                request = getattr(pb, f"{name}Request")()
                if name not in ("ServerLive", "ServerReady"):  # empty requests: nothing to read
                    request = await self._read_free(name, context, address)
                return await getattr(self, name)(request, context)
        except VaultError as exc:
            self.plane.error_sent("grpc", exc.code)
            await _abort(context, exc)
            raise

    async def _read_free(self, name: str, context: Any, address: str) -> Any:
        # the address's own turn, then one of the door's: what a stranger's
        # silent or huge messages hold up is, first of all, its own address's
        async with self._reading_from.turn(address, self.head_timeout):
            try:
                await within(self._reading.acquire(), self.head_timeout)
            except asyncio.TimeoutError:
                raise ServiceUnavailableError("this door is reading other requests; "
                                              "try again in a moment") from None  # fmt: skip
            try:
                raw = await within(context.read(), FREE_READ_S)
            except asyncio.TimeoutError:
                raise ProtocolError(f"the {name} message did not arrive within "
                                    f"{FREE_READ_S:g} s") from None  # fmt: skip
            finally:
                self._reading.release()
        if not isinstance(raw, bytes):  # grpc.aio.EOF: a stream with no message
            raise ProtocolError(f"{name} needs one {name}Request message")
        try:
            return getattr(pb, f"{name}Request").FromString(raw)
        except DecodeError:
            raise ProtocolError(f"the request is not a {name}Request") from None

    # the token-free RPCs, called by :meth:`free` (which turns a VaultError
    # into the call's status)

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerLiveResponse(live=self.plane.service.live())

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.plane.service.ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        # a model (or version) not served here is not ready: false, as Triton
        # answers, not an error (tritonclient's is_model_ready raised on this door
        # where its HTTP client returns False)
        try:
            ready = self.plane.model_ready(request.name, request.version or None)
        except UnknownModelError:
            ready = False
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerMetadataResponse(**self.plane.server_metadata())

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        md = self.plane.model_metadata(request.name, request.version or None)
        return pb.ModelMetadataResponse(
            name=md["name"], versions=md["versions"], platform=md["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in md["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in md["outputs"]],
        )  # fmt: skip

    async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        """Triton's ``model_configuration`` extension (:meth:`.door.DataPlane.model_config`)."""
        cfg = self.plane.model_config(request.name, request.version or None)

        def io(kind: Any, t: dict[str, Any]) -> Any:
            return kind(name=t["name"], data_type=pb.DataType.Value(t["data_type"]),
                        dims=t["dims"])  # fmt: skip

        return pb.ModelConfigResponse(config=pb.ModelConfig(
            name=cfg["name"], platform=cfg["platform"], max_batch_size=cfg["max_batch_size"],
            input=[io(pb.ModelInput, t) for t in cfg["input"]],
            output=[io(pb.ModelOutput, t) for t in cfg["output"]],
        ))  # fmt: skip

    async def ModelInfer(self, requests: Any, context: Any) -> Any:  # noqa: N802
        """Vet the token, then read the message, then decode it (:func:`register`).

        Between its vetting and its message, a call holds one of its
        licence's share (a quarter of the door's requests), waited for up to
        ``head_timeout`` (past it: UNAVAILABLE, naming the share) without
        holding one of the door's requests (its vetting holds one, and its
        read and answer another, taken once it has its share; a door full by
        then refuses it, UNAVAILABLE): one token holder's calls that
        never send their message hold at most the share and never the door,
        and a licence's burst of calls waits its turn instead of being
        refused (before, 32 callers of one licence at once had some of their
        calls refused while the licence's messages were read two at a time)."""
        try:
            address = peer_address(context.peer())
            with self.peers.hold(address):
                token = _token(context)
                with self.gate:  # its vetting is one of the door's requests
                    # the model is in the message
                    await self.plane.vet(None, None, token, address=address)
                lic, size, held = token.licence_id, 0, False
                try:
                    share = (f"this licence holds {self.gate.per_licence} requests at this "
                             "door already; try again when one is answered")  # fmt: skip
                    async with self._shares.turn(lic, self.head_timeout, share):
                        self.gate.__enter__()  # one of the door's, until the answer
                        held = True
                        # a turn among the licence's messages being read; none
                        # starts while its requests hold their bytes' budget (the
                        # message's size is known only once it is in)
                        async with self._licence_reads.turn(lic, self.body_timeout):
                            self.gate.check_room(lic)
                            try:
                                raw = await within(context.read(), self.body_timeout)
                            except asyncio.TimeoutError:
                                raise ProtocolError(
                                    f"the request message did not arrive within "
                                    f"{self.body_timeout:g} s") from None  # fmt: skip
                            if isinstance(raw, bytes):
                                size = len(raw)
                                self.gate.hold_bytes(lic, size)
                    if not isinstance(raw, bytes):  # grpc.aio.EOF: a stream with no message
                        raise ProtocolError("ModelInfer needs one ModelInferRequest message")
                    message = [raw]  # handed on: no frame left here holds it (_infer)
                    del raw
                    return await self._infer(message, token, context)
                finally:
                    self.gate.give_bytes(lic, size)
                    if held:
                        self.gate.__exit__(None, None, None)
        except VaultError as exc:
            self.plane.error_sent("grpc", exc.code)
            await _abort(context, exc)
            raise

    async def _infer(self, message: list[bytes], token: Any, context: Any) -> Any:
        """Decode and answer the one message in ``message`` (taken out of the
        list, so that once it is answered or refused no frame on the way to
        the refusal holds it: ``context.abort`` raises an error that gRPC
        keeps in the call's state, whose traceback holds these frames and,
        through their ``context``, itself; a refused 192 MiB message lived
        on in that cycle until the cycle collector ran)."""
        try:
            return await self._answer(self._decode(message.pop()), token, context)
        except VaultError as exc:
            self.plane.error_sent("grpc", exc.code)
            await _abort(context, exc)
            raise

    @staticmethod
    def _decode(raw: bytes) -> Any:
        try:
            return pb.ModelInferRequest.FromString(raw)
        except DecodeError:
            raise ProtocolError("the request is not a ModelInferRequest") from None

    async def _answer(self, request: Any, token: Any, context: Any = None,
                      kept: list[int] | None = None) -> Any:  # fmt: skip
        """The ModelInferResponse to one decoded request, or its typed error.
        Room for the answer is reserved against the licence's bytes at the
        door before the call is computed (:meth:`.door.Gate.reserve_answer`),
        and the answer counts there until the RPC ends (``context``: a unary
        call's answer is written after this returns) or, on a stream, until
        the reply is made."""
        descs, frames = _inputs(request)
        for o in request.outputs:
            T.refuse_extensions(o.name, o.parameters)
        T.refuse_sequence(request.parameters, _param_value)
        outputs = [o.name for o in request.outputs] or None
        p = request.parameters.get("timeout")
        timeout = timeout_of(p.double_param or p.int64_param) if p is not None else None
        lic, model = token.licence_id, request.model_name
        async with self.gate.answer_room(lic, model, rows_of(descs), self.body_timeout) as room:
            out_descs, out_frames = await self.plane.infer(
                model, request.model_version or None, token, descs, frames, outputs, timeout,
            )  # fmt: skip
            room.arrived(out_frames)
            reply = pb.ModelInferResponse(model_name=model, model_version="1", id=request.id)
            for d, f in zip(out_descs, out_frames):
                name, dt, shape, raw = T.to_raw(d, f)
                reply.outputs.add(name=name, datatype=dt, shape=shape)
                reply.raw_output_contents.append(bytes(raw))
            done = getattr(context, "add_done_callback", None)
            if done is not None:  # a unary call's answer: given back once the RPC has ended
                size = room.keep()
                done(lambda _: self.gate.give_answer(lic, size))
            elif kept is not None:  # a stream's: given back once written (ModelStreamInfer)
                kept.append(room.keep())
            return reply

    async def ModelStreamInfer(self, requests: Any, context: Any) -> None:  # noqa: N802
        """Triton's streaming inference (tritonclient's ``start_stream`` and
        ``async_stream_infer``): each message a ModelInferRequest, each
        answered in order by a ModelStreamInferResponse; a request's own
        error (a bad input, its quota, another model's refusal) is that
        answer's ``error_message`` and the stream goes on, as Triton's does
        (and ``triton_final_response`` is set on an answer whose request asks
        for ``triton_enable_empty_final_response``: each request has one).

        The stream is held to ModelInfer's rules, message by message: the
        token is vetted when the stream opens, before each further message
        is read and again before it is decoded (a revoked licence or an
        expired token ends the stream with its status); each message waits
        at most ``body_timeout`` to arrive (an idle stream is ended: open a
        new one), is read only while the licence's byte budget at the door
        has room (waited for, up to ``body_timeout``) and counts against it
        until answered. A stream holds one of the door's requests, one of its
        licence's share and one of its peer address's calls for as long as
        it is open, and a licence has at most :data:`LICENCE_STREAMS` open at
        a door. An answer the caller does not take within ``body_timeout``
        ends the stream."""
        try:
            address = peer_address(context.peer())
            with self.peers.hold(address), self.gate:
                token = _token(context)
                await self.plane.vet(None, None, token, address=address)
                lic = token.licence_id
                with self.gate.licence(lic), counted(
                    self._streams, lic, LICENCE_STREAMS,
                    f"this licence has {LICENCE_STREAMS} streams open at this door already; "
                    "send on one of them, or close one",
                ):  # fmt: skip
                    first = True
                    kept: list[int] = []  # the answer being written: its bytes, held
                    try:
                        while True:
                            if not first:  # the stream's opening vetted the first
                                await self.plane.vet(None, None, token, address=address)
                            first = False
                            await self._room(lic)
                            try:
                                raw = await within(context.read(), self.body_timeout)
                            except asyncio.TimeoutError:
                                raise ProtocolError(
                                    f"no request on this stream for {self.body_timeout:g} s: it is "
                                    "ended (open a new one)") from None  # fmt: skip
                            if not isinstance(raw, bytes):  # grpc.aio.EOF: the caller is done
                                return
                            size = len(raw)
                            self.gate.hold_bytes(lic, size)
                            try:
                                # a revocation while the message was awaited: refused now
                                # (the message left out of this frame first: a refusal's
                                # traceback keeps it, see _infer)
                                try:
                                    await self.plane.vet(None, None, token, address=address)
                                except BaseException:
                                    raw = b""
                                    raise
                                try:
                                    request = pb.ModelInferRequest.FromString(raw)
                                except DecodeError:
                                    request = None
                                del raw  # the message lives on in its decoded tensors only
                                answer = await self._stream_answer(request, token, kept)
                            finally:
                                self.gate.give_bytes(lic, size)
                            try:
                                await within(context.write(answer), self.body_timeout)
                            except asyncio.TimeoutError:
                                raise ProtocolError(
                                    f"an answer on this stream was not taken within "
                                    f"{self.body_timeout:g} s: it is ended") from None  # fmt: skip
                            finally:
                                # nothing of it stays in this frame, which a refusal's
                                # traceback keeps (_infer); its bytes counted until now
                                request = answer = None
                                while kept:
                                    self.gate.give_answer(lic, kept.pop())
                    finally:  # a call cancelled with its answer kept: given back too
                        while kept:
                            self.gate.give_answer(lic, kept.pop())
        except VaultError as exc:
            self.plane.error_sent("grpc", exc.code)
            await _abort(context, exc)
            raise

    async def _room(self, lic: str) -> None:
        """Until the licence's byte budget at this door has room (its other
        requests answered), at most ``body_timeout``: a stream waits for its
        licence's other calls rather than ending."""
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        while True:
            try:
                self.gate.check_room(lic)
                return
            except ServiceUnavailableError:
                if asyncio.get_running_loop().time() >= deadline:
                    raise
            await asyncio.sleep(0.05)

    async def _stream_answer(self, request: Any, token: Any, kept: list[int]) -> Any:
        try:
            if request is None:
                raise ProtocolError("the request is not a ModelInferRequest")
            answer = pb.ModelStreamInferResponse(
                infer_response=await self._answer(request, token, kept=kept)
            )
        except VaultError as exc:
            self.plane.error_sent("grpc", exc.code)
            answer = pb.ModelStreamInferResponse(error_message=error_text(exc))
            if request is not None:  # which request it answers
                answer.infer_response.model_name = request.model_name
                answer.infer_response.id = request.id
        if request is not None:
            final = request.parameters.get("triton_enable_empty_final_response")
            if final is not None and final.bool_param:
                answer.infer_response.parameters["triton_final_response"].bool_param = True
        return answer


def _param_value(p: Any) -> Any:
    """The value an InferParameter holds (None when it holds none)."""
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _inputs(request: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InputError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    typed = sum(t.contents.ByteSize() for t in request.inputs)
    if typed > MAX_DECODED:  # a protobuf size, before a Python object is made of it
        raise InputError(f"typed contents of {typed} bytes exceed the limit of {MAX_DECODED}: "
                         "send tensors as raw_input_contents")  # fmt: skip
    values = sum(len(getattr(t.contents, f.name)) for t in request.inputs
                 for f, _ in t.contents.ListFields())  # fmt: skip
    if values > MAX_DECODED_VALUES:  # counted in protobuf's containers, none made yet
        raise InputError(f"typed contents of {values} values exceed the limit of "
                         f"{MAX_DECODED_VALUES}: send tensors as raw_input_contents")  # fmt: skip
    T.check_strings([(t.name, t.datatype, list(t.shape)) for t in request.inputs],
                    sum(len(r) for r in raw) + typed)  # fmt: skip
    descs, frames = [], []
    for i, t in enumerate(request.inputs):
        T.refuse_extensions(t.name, t.parameters)
        shape = list(t.shape)
        if raw:
            if t.HasField("contents"):
                raise InputError(f"{t.name!r}: both contents and raw_input_contents")
            d, f = T.from_raw(t.name, t.datatype, shape, raw[i])
        elif t.datatype == "BYTES":
            d, f = T.from_bytes_list(t.name, t.datatype, shape, list(t.contents.bytes_contents))
        else:
            field = _CONTENTS.get(t.datatype)
            if field is None:
                raise InputError(f"{t.name!r}: datatype {t.datatype!r} needs raw_input_contents")
            other = [f.name for f, _ in t.contents.ListFields() if f.name != field]
            if other:  # a second contents field was ignored; it may be what was meant
                raise InputError(f"{t.name!r}: {t.datatype} data goes in {field}, not {other[0]}")
            d, f = T.from_typed(t.name, t.datatype, shape, getattr(t.contents, field),
                                _NATURAL[field])  # fmt: skip
        descs.append(d)
        frames.append(f)
    return descs, frames


def register(servicer: InferenceServicer, server: Any) -> None:
    """Add ``inference.GRPCInferenceService`` to a ``grpc.aio`` server, every
    method stream-unary on raw bytes (see the module docstring; a unary
    client sees no difference): ``ModelInfer`` vets its token before it
    reads its message, the others read theirs as :meth:`InferenceServicer.free`
    says. (Registered unary, gRPC read each message whole before the
    handler ran: a stranger's RPC that never sent it held one of the
    server's RPCs for good, 512 of them shut the door, and four of 256 MiB
    took the service to 3.2 GB.)"""
    names = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
             "ModelConfig")  # fmt: skip

    def free(name: str) -> Any:
        async def handler(requests: Any, context: Any) -> Any:
            return await servicer.free(name, requests, context)

        return handler

    handlers: dict[str, Any] = {
        name: grpc.stream_unary_rpc_method_handler(
            free(name),
            request_deserializer=None,  # bytes, read by the handler (InferenceServicer.free)
            response_serializer=getattr(pb, f"{name}Response").SerializeToString,
        )
        for name in names
    }
    handlers["ModelInfer"] = grpc.stream_unary_rpc_method_handler(
        servicer.ModelInfer,
        request_deserializer=None,  # bytes, decoded by the handler once the token holds
        response_serializer=pb.ModelInferResponse.SerializeToString,
    )
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer,
        request_deserializer=None,  # bytes, decoded by the handler once the token holds
        response_serializer=pb.ModelStreamInferResponse.SerializeToString,
    )
    service = "inference.GRPCInferenceService"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
