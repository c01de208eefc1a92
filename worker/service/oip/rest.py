"""The Open Inference Protocol's REST door: an ASGI application (served by
uvicorn, see :mod:`.server`).

=======  ==============================================  ===========================
method   path                                            answer
=======  ==============================================  ===========================
GET      ``/v2/health/live``, ``/v2/health/ready``       200, or 400 when not
GET      ``/v2``                                         server metadata
GET      ``/v2/models/M[/versions/V]``                   model metadata
GET      ``/v2/models/M[/versions/V]/ready``             200, or 400 when not ready
GET      ``/v2/models/M[/versions/V]/config``            Triton's model configuration
POST     ``/v2/models/M[/versions/V]/infer``             outputs (needs a token)
=======  ==============================================  ===========================

Infer takes the JSON tensor encoding and the binary tensor data extension
(``Inference-Header-Content-Length``, ``binary_data_size``), and answers in
binary for the outputs asked so (``parameters.binary_data_output``, or an
output's ``binary_data``). An error is ``{"error": "[code] message", "code":
code}`` with the status of :func:`.door.http_status`.

An infer request is taken in this order: its headers (the token parsed, the
sizes they declare checked), the token vetted by the service
(:meth:`.door.DataPlane.vet`: signature, expiry, scope, the licence in
force), and only then its body, which must arrive within ``body_timeout``
(408 otherwise). uvicorn reads no more than 64 KiB of a body the app has not
asked for, so a refused request costs no body in memory; its refusal closes
the connection (``Connection: close``) so nothing more of it is read. At
most ``max_inflight`` infer requests are held at once (503 ``unavailable``
past it, with ``Retry-After: 1``).

Example::

    app = RestApp(DataPlane(service), max_body=1 << 30, max_inflight=64, body_timeout=30.0)
    # uvicorn.Config(app, ...)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import secrets
import zlib
from collections.abc import AsyncIterator
from typing import Any

from vault.core.errors import InputError, ProtocolError, VaultError

from . import tensors as T
from .door import (
    MAX_DECODED,
    MAX_DECODED_VALUES,
    DataPlane,
    Gate,
    bearer,
    error_text,
    http_status,
    retry_after,
    rows_of,
    timeout_of,
    within,
)

__all__ = ["RestApp"]

# "not live" / "not ready": the protocol's health APIs answer 200 for true and
# 4xx for false, and Triton's HTTP endpoints answer 400 (the metrics port's
# probes answer the same: worker/service/metrics.py)
NOT_READY = 400
MAX_JSON = MAX_DECODED  # the JSON part of a request (see door.MAX_DECODED)
# An answer's JSON outputs: the same count of values as a request's (a value
# becomes about a hundred bytes of Python objects and text while it is
# written: a licensed caller's 82 MB output asked for as JSON took a service
# from 880 MB to 2.2 GB and held the event loop, every tenant's REST calls
# with it, for 11.6 s). Past this many, written in a thread, one at a time.
MAX_JSON_OUT_VALUES = MAX_DECODED_VALUES
# ... and its text, bounded before it is written: a 250 MB string of control
# characters became 1.5 GB of JSON (each escaped in six bytes) and took the
# service from 0.2 to 4 GB
MAX_JSON_OUT_BYTES = 128 << 20
_JSON_OUT_INLINE = 1 << 16
_JSON_OUT_INLINE_BYTES = 1 << 20  # a few long strings are as slow to write as many values
# answers compressed when the client accepts it (Accept-Encoding: gzip or
# deflate, tritonclient's response_compression_algorithm), as Triton does:
# from this size, at zlib's fastest level, in a thread past _COMPRESS_INLINE
_COMPRESS_FROM = 1 << 10
_COMPRESS_INLINE = 1 << 16
_SEND_SLICE = 4 << 20  # a large answer goes to the transport this much at a time
_DECODE_INLINE = 64 << 10  # a JSON part past this waits its licence's turn to be decoded
_JSON_OUT_AT_ONCE = 2  # large JSON answers being written at once (each its licence's only one)
_MODEL = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/config|/infer)?/?$")
_JSON = [(b"content-type", b"application/json")]


# Content-Encoding of a request body (tritonclient's request_compression_algorithm):
# zlib's window bits, None for none
_ENCODINGS: dict[bytes, int | None] = {b"": None, b"identity": None, b"gzip": 16 + 15,
                                       b"deflate": 15}  # fmt: skip


def _inflate(body: bytes, encoding: bytes, limit: int) -> bytes:
    """A compressed body, decompressed to at most ``limit`` bytes (the limit
    its uncompressed size would have had), a megabyte at a time: a few
    kilobytes of a compression bomb never become more than a request may be.
    ``deflate``: zlib's format, or a raw deflate stream."""
    import zlib

    bits = _ENCODINGS[encoding]
    assert bits is not None
    name = encoding.decode()
    for wbits in (bits, -15) if encoding == b"deflate" else (bits,):
        d = zlib.decompressobj(wbits)
        chunks: list[bytes] = []
        total, data = 0, body
        try:
            while True:
                part = d.decompress(data, 1 << 20)
                total += len(part)
                if total > limit:
                    raise ProtocolError(
                        f"a request exceeds the limit of {limit} bytes once decompressed"
                    )
                chunks.append(part)
                data = d.unconsumed_tail
                if d.eof:
                    if d.unused_data:  # a second gzip member, or junk after the stream
                        raise InputError(f"the {name} body has data after its compressed stream")
                    return b"".join(chunks)
                if not data and not part:
                    raise InputError(f"the {name} body ends before its compressed data")
        except zlib.error:
            continue  # deflate: perhaps the raw stream
    raise InputError(f"the body is not valid {name} data")


class _HttpError(Exception):
    """A refusal of HTTP's own (no such endpoint, method, encoding; a body
    too slow), with a code as stable as the vault's (docs/protocol.md)."""

    CODES = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
             415: "unsupported_encoding"}  # fmt: skip

    def __init__(self, status: int, message: str, *, allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = self.CODES[status]
        self.allow = allow


class RestApp:
    """See the module docstring."""

    def __init__(self, plane: DataPlane, *, max_body: int, max_inflight: int = 64,
                 body_timeout: float = 30.0) -> None:  # fmt: skip
        self.plane = plane
        self.max_body = max_body
        self.gate = Gate(max_inflight, bytes_per_licence=max_body)
        self.body_timeout = body_timeout
        self._json_out: asyncio.Semaphore | None = None  # made on the door's own loop
        self._json_out_by: dict[str, list[Any]] = {}  # per licence: [its semaphore, users]
        self._decode_by: dict[str, list[Any]] = {}  # the same, for decoding large JSON
        self._decode_one: asyncio.Semaphore | None = None  # one large decode at a time

    @contextlib.asynccontextmanager
    async def _decoding(self, licence: str) -> AsyncIterator[None]:
        """A licence's large JSON requests decoded one at a time, each after
        what is ready on the loop has run. Decoding JSON holds the GIL (no
        thread helps) for up to a few tenths of a second: one token's 64
        requests of 8 KB that gzip inflated to 4M values each, decoded side
        by side on the loop, held every other caller's answers up to 8.9 s;
        spread over four licences, 6.4 s. Now one is decoded at a time on the
        door, the licences that have some taking turns (each waits for the
        door's turn only once its own earlier one is done): a small request
        waits for at most one of them."""
        if self._decode_one is None:
            self._decode_one = asyncio.Semaphore(1)  # made on the door's own loop
        entry = self._decode_by.setdefault(licence, [asyncio.Semaphore(1), 0])
        entry[1] += 1
        try:
            async with entry[0], self._decode_one:
                await asyncio.sleep(0)  # what is ready runs before this decode takes the loop
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                self._decode_by.pop(licence, None)

    def _free_slot(self, state: dict[str, bool]) -> None:
        if state.pop("slot", False):
            self.gate.__exit__(None, None, None)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        state = {"body_unread": scope.get("method") == "POST"}
        try:
            await self._route(scope, receive, send, state)
        except _NotTaken:
            return  # its response is incomplete: uvicorn drops the connection
        except VaultError as exc:
            await self._error(send, exc, close=state["body_unread"])
        except _HttpError as exc:
            headers = list(_JSON) + ([(b"connection", b"close")] if state["body_unread"] else [])
            if exc.allow:
                headers.append((b"allow", exc.allow.encode()))
            body = {"error": f"[{exc.code}] {exc}", "code": exc.code}
            self.plane.error_sent("rest", exc.code)
            await _send(send, exc.status, headers, json.dumps(body).encode())

    async def _error(self, send: Any, exc: VaultError, *, close: bool = False) -> None:
        status = http_status(exc)
        headers = list(_JSON)
        if close:  # refused before its body was read: read none of it
            headers.append((b"connection", b"close"))
        wait = retry_after(exc)
        if wait is not None:
            headers.append((b"retry-after", str(wait).encode()))
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="vault"'))
        body = json.dumps({"error": error_text(exc), "code": exc.code}).encode()
        self.plane.error_sent("rest", exc.code)
        await _send(send, status, headers, body)

    async def _route(self, scope: dict[str, Any], receive: Any, send: Any,
                     state: dict[str, bool]) -> None:  # fmt: skip
        method, path = scope["method"], scope["path"]
        svc = self.plane.service
        if path in ("/v2/health/live", "/v2/health/ready"):
            _only(method, "GET")
            key = "live" if path.endswith("live") else "ready"
            ok = svc.live() if key == "live" else svc.ready()
            await _json(send, 200 if ok else NOT_READY, {key: ok})
            return
        if path in ("/v2", "/v2/"):
            _only(method, "GET")
            await _json(send, 200, self.plane.server_metadata())
            return
        m = _MODEL.match(path)
        # a slash sent as %2F is a model name's character, not the path's: not
        # routed as one (it would pass a proxy's rules written on paths)
        if m is None or b"%2f" in bytes(scope.get("raw_path") or b"").lower():
            if path == "/v1" or path.startswith("/v1/"):
                # KServe's InferenceRESTClient speaks v1 unless told otherwise
                raise _HttpError(404, f"no such endpoint: {path[:200]}: this server speaks only "
                                      "the Open Inference Protocol v2 (/v2/...); KServe's "
                                      "InferenceRESTClient needs RESTConfig(protocol=\"v2\")")  # fmt: skip
            raise _HttpError(404, f"no such endpoint: {path[:200]}")
        model, version, action = m.group(1), m.group(2), m.group(3)
        if (model == "stats" and version is None and action is None
                and self.plane.service.model_state(model) is None):  # fmt: skip
            # Triton's statistics extension (all models), not a model named stats
            raise _HttpError(404, f"no such endpoint: {path[:200]} (Triton's statistics "
                                  "extension is not served)")  # fmt: skip
        if action is None:
            _only(method, "GET")
            await _json(send, 200, self.plane.model_metadata(model, version))
        elif action == "/config":
            _only(method, "GET")
            await _json(send, 200, self.plane.model_config(model, version))
        elif action == "/ready":
            _only(method, "GET")
            ok = self.plane.model_ready(model, version)
            await _json(send, 200 if ok else NOT_READY, {"name": model, "ready": ok})
        else:
            _only(method, "POST")
            # one of the door's requests until its answer is in hand: writing
            # it holds none (a client that reads slowly, or never, holds only
            # its licence's bytes, and each slice within body_timeout)
            self.gate.__enter__()
            state["slot"] = True
            try:
                await self._infer(scope, receive, send, model, version, state)
            finally:
                self._free_slot(state)

    def _limit(self, scope: dict[str, Any], json_part: int | None) -> int:
        """The body's limit, checked against what its headers declare (before
        anything else): the whole (``max_body``) or its JSON part
        (``MAX_JSON``; the whole body when ``json_part``, the binary
        extension's header length, is None)."""
        limit = self.max_body if json_part is not None else min(self.max_body, MAX_JSON)
        if json_part is not None and json_part > MAX_JSON:
            raise ProtocolError(f"the JSON part of a request ({json_part} bytes) exceeds the "
                                f"limit of {MAX_JSON}: send tensors as binary data")  # fmt: skip
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            raise ProtocolError(
                    f"a request of {declared} bytes exceeds the limit of {limit}"
                    + ("" if json_part is not None else
                       " for JSON: send tensors as binary data (Inference-Header-Content-Length)")
                )  # fmt: skip
        return limit

    async def _body(self, receive: Any, limit: int, account: Any = None) -> bytes:
        """The body, at most ``limit`` bytes, all of it within ``body_timeout``;
        ``account`` ``(licence, [bytes held])``: bytes past those held are
        taken from the licence's as they arrive."""
        try:
            return await within(self._read(receive, limit, account), self.body_timeout)
        except asyncio.TimeoutError:
            raise _HttpError(408, f"the request body did not arrive within "
                                  f"{self.body_timeout:g} s") from None  # fmt: skip

    async def _read(self, receive: Any, limit: int, account: Any = None) -> bytes:
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ProtocolError("the client went away")
            part = msg.get("body", b"")
            size += len(part)
            if size > limit:
                raise ProtocolError(f"a request exceeds the limit of {limit} bytes")
            if account is not None and size > account[1][0]:
                self.gate.take_bytes(account[0], size - account[1][0])
                account[1][0] = size
            chunks.append(part)
            if not msg.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _infer(self, scope: dict[str, Any], receive: Any, send: Any, model: str,
                     version: str | None, state: dict[str, bool]) -> None:  # fmt: skip
        auth: str | None = None
        header_len: int | None = None
        encoding = b""
        for k, v in scope["headers"]:
            if k == b"authorization":
                auth = v.decode("latin-1")
            elif k == b"content-encoding":
                encoding = v.strip().lower()
            elif k == b"inference-header-content-length":
                try:
                    header_len = int(v)
                except ValueError:
                    raise InputError("Inference-Header-Content-Length is not a number") from None
        token = bearer(auth)  # before the body is read: no token, no work
        limit = self._limit(scope, header_len)
        client = scope.get("client")
        address = str(client[0]) if client else None
        # genuine and in force, or refused
        await self.plane.vet(model, version, token, address=address)
        if encoding not in _ENCODINGS:
            raise _HttpError(415, f"Content-Encoding {encoding.decode('latin-1')!r} is not "
                                  "supported: gzip, deflate or none")  # fmt: skip
        # while its body arrives a request holds a share of its licence's: one
        # licence's requests that never send their body hold at most a quarter
        # of the door (computing ones are paid for, and bounded by the gate);
        # and until it is answered its body's bytes count against the
        # licence's: up to a quarter of them at once from the declared length
        # (one token holder's single request never holds a licence's whole
        # budget before it sends a byte), the rest as they come
        lic = token.licence_id
        held = [0]
        try:
            with self.gate.licence(lic):
                declared = min(_content_length(scope) or 0, self.gate.bytes_per_licence // 4)
                if declared:
                    self.gate.take_bytes(lic, declared)
                    held[0] = declared
                body = await self._body(receive, limit, (lic, held))
            state["body_unread"] = False
            await self._infer_vetted(send, model, version, token, header_len, body, limit,
                                     encoding, receive=receive, accept=_accepted(scope),
                                     state=state)  # fmt: skip
        finally:
            self.gate.give_bytes(lic, held[0])

    async def _infer_vetted(self, send: Any, model: str, version: str | None, token: Any,
                            header_len: int | None, body: bytes, limit: int,
                            encoding: bytes = b"", *, receive: Any = None,
                            accept: str | None = None,
                            state: dict[str, bool] | None = None) -> None:  # fmt: skip
        received = len(body)
        if _ENCODINGS.get(encoding) is not None:
            # at most MAX_JSON once decompressed (a gzip of 1 GiB of zeros is
            # 1 MB), in a thread: zlib lets the event loop serve the others
            body = await asyncio.to_thread(_inflate, body, encoding, min(limit, MAX_JSON))
        if header_len is not None and not 0 <= header_len <= len(body):
            raise InputError("Inference-Header-Content-Length is past the end of the body")
        head = body if header_len is None else body[:header_len]
        binary = memoryview(body)[len(head) :] if header_len is not None else memoryview(b"")
        # a comma or more per value: counted before one is decoded (C speed)
        values = head.count(b",") + 1
        if values > MAX_DECODED_VALUES:
            raise InputError(f"the JSON part of the request holds about {values} values, more "
                             f"than {MAX_DECODED_VALUES}: send tensors as binary data")  # fmt: skip
        large = len(head) > _DECODE_INLINE
        async with self._decoding(token.licence_id) if large else contextlib.nullcontext():
            req, params, descs, frames = _decoded(head, header_len, binary, received)
        rid, timeout = req.get("id"), params.get("timeout")
        outputs, binary_out = _outputs(req, params)
        lic = token.licence_id
        async with self.gate.answer_room(lic, model, rows_of(descs), self.body_timeout) as room:
            out_descs, out_frames = await self.plane.infer(
                model, version, token, descs, frames, outputs, timeout_of(timeout)
            )
            # until it is written, the answer counts against the licence's bytes
            room.arrived(out_frames)
            if state is not None:
                self._free_slot(state)
            await self._answer(send, model, rid, out_descs, out_frames, binary_out,
                               licence=lic, receive=receive, accept=accept)  # fmt: skip

    async def _answer(self, send: Any, model: str, rid: Any, descs: list[dict[str, Any]],
                      frames: list[Any], binary_out: Any, *, licence: str = "",
                      receive: Any = None, accept: str | None = None) -> None:  # fmt: skip
        values = size = text = 0
        for d, f in zip(descs, frames):
            if not binary_out(str(d.get("name"))):
                n = len(f.buffer) if hasattr(f, "buffer") else len(f)
                values += _values(d)
                size += n
                # the most its JSON text can take: a string byte escaped takes
                # 6 (a control character as \u0001), a number 25 with its comma
                text += 6 * n if d.get("dtype") == "string" else 25 * _values(d)
        too_many = values > MAX_JSON_OUT_VALUES
        if too_many or text > MAX_JSON_OUT_BYTES:
            held = f"{values} values" if too_many else f"up to {text} bytes of JSON text"
            limit = MAX_JSON_OUT_VALUES if too_many else MAX_JSON_OUT_BYTES
            raise InputError(
                f"the answer holds {held} to write as JSON, more than {limit}: ask for "
                "binary outputs (parameters.binary_data_output true, or binary_data on each "
                "output); the call was served and counts"
            )
        if values <= _JSON_OUT_INLINE and size <= _JSON_OUT_INLINE_BYTES:
            headers, parts = _answer_body(model, rid, descs, frames, binary_out)
            length = sum(len(p) for p in parts)
            if not accept or length < _COMPRESS_FROM:
                await _send(send, 200, headers, parts, stall=self.body_timeout)
                return
            if length <= _COMPRESS_INLINE:
                await _send(send, 200, *_compressed(headers, parts, accept),
                            stall=self.body_timeout)  # fmt: skip
                return
            # a large binary answer to compress: queued as a large JSON one is
            work: Any = functools.partial(_compressed, headers, parts, accept)
            del parts
        else:
            work = functools.partial(_encode_answer, model, rid, descs, frames, binary_out, accept)
        # off the event loop (JSON in slices); a licence's answers one at a time
        # (its own queue: one licence's many answers once queued every other
        # licence's behind them, 32 s), and two licences' at once. One whose
        # client goes away while it waits is not written (before, each was
        # encoded and held in full for a connection nobody read any more; it
        # leaves the queue at once): its call was served and counts all the same
        gone = asyncio.ensure_future(_disconnected(receive)) if receive is not None else None
        try:
            if self._json_out is None:
                self._json_out = asyncio.Semaphore(_JSON_OUT_AT_ONCE)
            entry = self._json_out_by.setdefault(licence, [asyncio.Semaphore(1), 0])
            entry[1] += 1
            try:
                if not await _turn(entry[0], gone):
                    return
                try:
                    if not await _turn(self._json_out, gone):
                        return
                    try:
                        headers, body = await asyncio.to_thread(work)
                    finally:
                        self._json_out.release()
                finally:
                    entry[0].release()
            finally:
                entry[1] -= 1
                if not entry[1]:
                    self._json_out_by.pop(licence, None)
            if gone is not None and gone.done():
                return
            # until the client has read it, a large JSON answer's bytes count
            # against its licence's share of the door as a request's do (40 such
            # answers nobody read held 3.4 GB): counted, never refused (the call
            # is served and counts), so the licence's next requests wait for room
            self.gate.hold_bytes(licence, len(body))
            try:
                await _send(send, 200, headers, body, stall=self.body_timeout)
            finally:
                self.gate.give_bytes(licence, len(body))
        finally:
            if gone is not None:
                gone.cancel()


def _decoded(head: bytes, header_len: int | None, binary: memoryview, received: int
             ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], list[Any]]:  # fmt: skip
    """A request's JSON part decoded and checked: the request, its
    parameters, its input descriptors and frames; or the typed refusal."""
    try:
        req = json.loads(head)
    except (ValueError, UnicodeDecodeError):
        if header_len is None:
            raise InputError("the request is not JSON") from None
        # tritonclient writes this header into the caller's own headers
        # dict: reused for a JSON request, it cuts the JSON short
        raise InputError(f"the first {header_len} bytes of the body, as "
                         "Inference-Header-Content-Length says, are not JSON (a request "
                         "without binary data sends no such header)") from None  # fmt: skip
    except RecursionError:  # "[[[[..." deeper than the decoder goes: not a tensor
        raise InputError("the request's JSON is nested too deeply") from None
    if not isinstance(req, dict):
        raise InputError("the request must be a JSON object")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):  # Triton refuses it too
        raise InputError("the request's id must be a string")
    params = _params(req.get("parameters"), "the request's")
    T.refuse_sequence(params)
    timeout = params.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0
    ):
        raise InputError("parameter 'timeout' is a number of microseconds")
    # the memory rule on what the caller sent (compressed, if it was), not on
    # what it asked the door to inflate
    # (a JSON that is not UTF-8, which json.loads also reads: looked at too)
    bools = b"true" in head or b"false" in head or b"\x00" in head[:4]
    descs, frames = _inputs(req.get("inputs"), binary, received, bools=bools)
    return req, params, descs, frames


async def _turn(sem: asyncio.Semaphore, gone: Any) -> bool:
    """Acquire ``sem`` (True), unless the client is ``gone`` first (False,
    ``sem`` not held)."""
    if gone is None:
        await sem.acquire()
        return True
    if gone.done():
        return False
    get = asyncio.ensure_future(sem.acquire())
    try:
        await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not get.done():
            get.cancel()
    if get.done() and not get.cancelled():
        if not gone.done():
            return True
        sem.release()
    return False


async def _disconnected(receive: Any) -> None:
    """Returns once the client of a request whose body has been read goes
    away (ASGI's ``http.disconnect``)."""
    try:
        while (await receive()).get("type") != "http.disconnect":
            await asyncio.sleep(0.01)  # no more body comes: anything else, look again
    except Exception:  # noqa: BLE001 - cannot tell: never reads as gone (cancelled with it)
        await asyncio.Event().wait()


def _values(desc: dict[str, Any]) -> int:
    """How many values an output descriptor declares (0 for one it cannot carry)."""
    n = 1
    for d in desc.get("shape") or ():
        n *= int(d) if isinstance(d, int) and d > 0 else 0
    return n


def _accepted(scope: dict[str, Any]) -> str | None:
    """The compression a request's ``Accept-Encoding`` takes for its answer:
    "gzip", else "deflate", else None (absent, or refused with ``q=0``)."""
    ok: set[str] = set()
    for k, v in scope["headers"]:
        if k != b"accept-encoding":
            continue
        for item in v.decode("latin-1").lower().split(","):
            name, _, params = item.partition(";")
            q = params.strip()
            if q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"):
                continue
            ok.add(name.strip())
    for name in ("gzip", "deflate"):
        if name in ok:
            return name
    return None


def _compressed(
    headers: list[tuple[bytes, bytes]], parts: list[Any], accept: str
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The body ``parts`` make, compressed as ``accept`` names ("deflate" is
    zlib's format, as HTTP means it), with its Content-Encoding header (an
    Inference-Header-Content-Length keeps the uncompressed JSON's length, as
    Triton and tritonclient read it). The parts are compressed one after the
    other, never joined."""
    c = zlib.compressobj(1, zlib.DEFLATED, 31 if accept == "gzip" else 15)
    out = [c.compress(p) for p in parts]
    out.append(c.flush())
    return [*headers, (b"content-encoding", accept.encode())], b"".join(out)


def _encode_answer(model: str, rid: Any, descs: list[dict[str, Any]], frames: list[Any],
                   binary_out: Any, accept: str | None = None,
                   ) -> tuple[list[tuple[bytes, bytes]], bytes]:  # fmt: skip
    """The answer's headers and body (compressed as ``accept`` names, from
    :data:`_COMPRESS_FROM` bytes)."""
    headers, parts = _answer_body(model, rid, descs, frames, binary_out)
    if accept and sum(len(p) for p in parts) >= _COMPRESS_FROM:
        return _compressed(headers, parts, accept)
    return headers, b"".join(parts) if len(parts) > 1 else parts[0]


def _answer_body(model: str, rid: Any, descs: list[dict[str, Any]], frames: list[Any],
                 binary_out: Any) -> tuple[list[tuple[bytes, bytes]], list[Any]]:  # fmt: skip
    """The answer's headers and its body as parts: the JSON, then each binary
    output as it is (the output's own buffer, not copied: an answer of 500 MB
    once took 1 GB while it waited for its client, the outputs and the body
    joined from them)."""
    outs: list[dict[str, Any]] = []
    blobs: list[Any] = []
    texts: list[tuple[str, str]] = []
    token = secrets.token_hex(8)
    for d, f in zip(descs, frames):
        name = str(d.get("name"))
        if binary_out(name):
            _, dt, shape, raw = T.to_raw(d, f)
            blobs.append(raw)
            outs.append({"name": name, "datatype": dt, "shape": shape,
                         "parameters": {"binary_data_size": len(raw)}})  # fmt: skip
        else:  # its data written in slices, then put in the place held for it
            _, dt, shape, text = T.to_json_text(d, f)
            mark = f"\x00vault-data-{token}-{len(texts)}\x00"
            texts.append((json.dumps(mark), text))
            outs.append({"name": name, "datatype": dt, "shape": shape, "data": mark})
    reply: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": outs}
    if isinstance(rid, str) and rid:
        reply["id"] = rid
    skeleton = json.dumps(reply, separators=(",", ":"))
    parts = []
    for mark, text in texts:  # a mark with a random token: no caller's text is one
        before, skeleton = skeleton.split(mark, 1)
        parts += [before, text]
    head = "".join([*parts, skeleton]).encode()
    if not blobs:
        return _JSON, [head]
    headers = [(b"content-type", b"application/octet-stream"),
               (b"inference-header-content-length", str(len(head)).encode())]  # fmt: skip
    return headers, [head, *(b for b in blobs if len(b))]


def _params(value: Any, whose: str) -> dict[str, Any]:
    """A ``parameters`` object (absent: empty); anything else is refused."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{whose} parameters must be a JSON object")
    return value


def _flag(params: dict[str, Any], key: str, default: bool, whose: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InputError(f"{whose} parameter {key!r} must be true or false")
    return value


def _content_length(scope: dict[str, Any]) -> int | None:
    for k, v in scope["headers"]:
        if k == b"content-length" and v.isdigit():
            return int(v)
    return None


def _only(method: str, allowed: str) -> None:
    if method != allowed:
        raise _HttpError(405, f"use {allowed} here", allow=allowed)


def _inputs(
    items: Any, binary: memoryview, wire: int, *, bools: bool = True
) -> tuple[list[dict[str, Any]], list[Any]]:
    if not isinstance(items, list):  # empty for a model without inputs
        raise InputError("the request needs a list of inputs")
    T.check_strings(
        [(it.get("name"), it.get("datatype"), it.get("shape")) for it in items
         if isinstance(it, dict)], wire,
    )  # fmt: skip
    descs, frames, at = [], [], 0
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("name"), str):
            raise InputError("each input is an object with a name")
        name, dt, shape = it["name"], it.get("datatype"), it.get("shape")
        params = _params(it.get("parameters"), f"input {name!r}:")
        T.refuse_extensions(name, params)
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InputError(f"{name!r}: binary_data_size is a byte count")
            if it.get("data") is not None:  # which one is the input? neither is guessed
                # (KServe's client sends "data": null beside an empty tensor's size)
                raise InputError(f"{name!r}: give data or binary_data_size, not both")
            if at + size > len(binary):
                raise InputError(f"{name!r}: binary data runs past the end of the body")
            d, f = T.from_raw(name, dt, shape, binary[at : at + size])
            at += size
        elif "data" in it:
            d, f = T.from_json(name, dt, shape, it["data"], bools=bools)
        else:
            raise InputError(f"{name!r}: give data, or binary_data_size with binary data")
        descs.append(d)
        frames.append(f)
    if at != len(binary):
        raise InputError(f"{len(binary) - at} bytes of binary data belong to no input")
    return descs, frames


def _outputs(
    req: dict[str, Any], params: dict[str, Any] | None = None
) -> tuple[list[str] | None, Any]:
    if params is None:
        params = _params(req.get("parameters"), "the request's")
    all_binary = _flag(params, "binary_data_output", False, "the request's")
    items = req.get("outputs")
    if items is None or items == []:  # none named: all of them (as gRPC's empty list)
        return None, lambda name: all_binary
    if not isinstance(items, list):
        raise InputError("outputs is a list")
    names: list[str] = []
    binary: dict[str, bool] = {}
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("name"), str):
            raise InputError("each requested output is an object with a name")
        p = _params(it.get("parameters"), f"output {it['name']!r}:")
        T.refuse_extensions(it["name"], p)
        names.append(it["name"])
        binary[it["name"]] = _flag(p, "binary_data", all_binary, f"output {it['name']!r}:")
    return names, lambda name: binary.get(name, all_binary)


async def _json(send: Any, status: int, body: Any) -> None:
    await _send(send, status, _JSON, json.dumps(body, separators=(",", ":")).encode())


class _NotTaken(Exception):
    """An answer's client took none of a slice within the door's deadline:
    the connection is dropped (uvicorn closes one whose app returns before
    the response is complete)."""


async def _send(send: Any, status: int, headers: list[tuple[bytes, bytes]],
                body: bytes | list[Any], *, stall: float | None = None) -> None:  # fmt: skip
    """One response; a body given as parts goes out part by part, each sent
    once the client has taken enough of the one before (uvicorn waits for
    the transport to drain), in slices of :data:`_SEND_SLICE`: an unread
    answer holds its outputs and little more. ``stall``: how long the client
    may take nothing (:class:`_NotTaken` past it), as nginx's send_timeout."""
    parts = [body] if isinstance(body, (bytes, bytearray)) else body
    length = sum(len(p) for p in parts)
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(length).encode())]})  # fmt: skip
    pieces: list[Any] = []
    for p in parts:
        if isinstance(p, bytes) and len(p) <= _SEND_SLICE:
            pieces.append(p)
        else:  # an output's own buffer, a slice at a time (uvicorn writes any buffer)
            v = memoryview(p).cast("B")
            pieces += [v[i : i + _SEND_SLICE] for i in range(0, max(len(v), 1), _SEND_SLICE)]
    for i, piece in enumerate(pieces):
        msg = {"type": "http.response.body", "body": piece, "more_body": i < len(pieces) - 1}
        if stall is None:
            await send(msg)
            continue
        try:
            await within(send(msg), stall)
        except asyncio.TimeoutError:
            raise _NotTaken() from None
