"""uvicorn's HTTP protocol with the bounds it lacks: a deadline and a size
for each request's head, and a cap on the connections of one peer address.

Why. uvicorn waits for a request's headers without a deadline (its
keep-alive timeout runs only between requests, and stops at the first byte),
and its ``limit_concurrency`` counts every open connection: a stranger with
no token that opened 600 connections and sent 17 bytes of a request line on
each had every other caller answered 503, for as long as it kept them open.

Nor does it bound a head's size: uvicorn keeps every header line httptools
hands it, and httptools sets no limit, so one connection that streamed 8 KB
header lines for the whole head deadline, never ending its head, took a
service from 78 MB to 5.5 GB (two connections, 8 s; 64 are allowed per
address). Here a head of more than ``max_head`` bytes (request line and
headers) is answered 431 and its connection closed, before any of it reaches
the door.

Here a connection must deliver each request's head within ``head_timeout``
seconds of being opened or of its previous answer, or it is closed; and one
peer address holds at most ``per_address`` connections at once (an IPv4
address, or an IPv6 /64: one host holds a whole /64); past it a new one is
closed as soon as it is made. What the head carries (a token) is checked by
the door after that, as before.

Over TLS both bounds start at the TCP connection, not at the end of the
handshake (asyncio tells the HTTP protocol of a connection only once its
handshake is done, and waits up to 60 s for one): :func:`gated_loop` makes
an event loop whose TLS servers count a connection against its address as
it is made and give its handshake ``head_timeout`` seconds. Before, a
stranger could hold any number of connections that never sent a
ClientHello, each for 60 s, uncounted: enough of them run the process out
of file descriptors, and every door with it.

Example::

    http = bounded_protocol(10.0, 64)
    config = uvicorn.Config(app, http=http, ssl_certfile=..., ...)
    loop = gated_loop(uvloop.Loop, http)()   # the loop uvicorn serves on
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from vault.core.peercap import address_key

__all__ = ["bounded_protocol", "gated_loop"]


def _peer_key(transport: Any) -> str:
    peer = transport.get_extra_info("peername")
    return address_key(str(peer[0])) if peer else ""


# What a request's head may take: nginx's default is 4 buffers of 8 KiB for
# the headers, h11's (uvicorn's other parser) 16 KiB; a token is a few
# hundred bytes. Refused past it: 431, as RFC 6585 names it.
DEFAULT_MAX_HEAD = 64 << 10
_TOO_LARGE = b"the request's head (request line and headers) is larger than %d bytes"


def bounded_protocol(
    head_timeout: float, per_address: int, max_head: int = DEFAULT_MAX_HEAD
) -> type[Any]:
    """An ``HttpToolsProtocol`` subclass for one server (its own counts)."""
    counts: Counter[str] = Counter()  # the server's one event loop: no lock

    class Bounded(HttpToolsProtocol):
        _vault_timer: Any = None
        _vault_head = 0  # bytes fed while this request's head was unfinished
        _vault_parsed = 0  # bytes of this request's line and headers, as parsed
        _vault_in_head = False  # a request's head has begun and not ended
        _vault_began = False  # ... and began in the read being parsed
        _vault_in_body = False  # its head ended and the message has not
        _vault_fed_body = False  # the read being parsed carried body bytes
        _vault_gap = 0  # bytes of reads in a row that carried none
        _vault_big = False
        _vault_peer: str | None = None
        _vault_counted: str | None = None  # counted by the TLS gate already
        vault_head_timeout = head_timeout

        @staticmethod
        def vault_take(key: str) -> bool:
            """Count one more connection of this address, if it has room."""
            if counts[key] >= per_address:
                return False
            counts[key] += 1
            return True

        @staticmethod
        def vault_give(key: str) -> None:
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            key = self._vault_counted
            if key is None:
                key = _peer_key(transport)
                if not self.vault_take(key):
                    # aborted, not closed: a TLS close waits up to 30 s for the
                    # peer's close_notify, the connection counted by uvicorn all along
                    self.connections.discard(self)
                    transport.abort()  # its connection_lost follows; it was never counted
                    return
            self._vault_peer = key
            self._vault_arm()

        def _vault_arm(self) -> None:
            self._vault_cancel()
            self._vault_timer = self.loop.call_later(head_timeout, self._vault_late)

        def data_received(self, data: bytes) -> None:
            self._vault_began = self._vault_fed_body = False
            super().data_received(data)
            # a head still unfinished after this read: what httptools was fed
            # of it is held (a header line is handed over only once it ends),
            # so the bytes fed bound the memory. Counted from the read after
            # the one it began in (that one may end the request before it; at
            # most one read uncounted), whether or not a request before it is
            # still being served (a pipelined head is no less held)
            if self.transport.is_closing():
                return
            if self._vault_in_body and not self._vault_in_head:
                # a chunked body's trailer is header lines again, held the same
                # way, after the head was counted (an endless trailer line grew a
                # door by 150 MB from two connections, no token needed): reads
                # that carry no body byte count, and a body byte starts again
                self._vault_gap = 0 if self._vault_fed_body else self._vault_gap + len(data)
                if self._vault_gap > max_head:
                    self.transport.close()  # its answer may be out already: no other
                return
            if not self._vault_in_head or self._vault_began:
                return
            self._vault_head += len(data)
            if self._vault_head > max_head:
                self._vault_refuse()

        def on_body(self, body: bytes) -> None:
            self._vault_fed_body = True
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._vault_in_body = False
            super().on_message_complete()

        # a head that ends within one read is measured as httptools hands it over
        def on_message_begin(self) -> None:
            self._vault_parsed = self._vault_head = 0
            self._vault_in_head = self._vault_began = True
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._vault_count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._vault_count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def _vault_count(self, n: int) -> None:
            self._vault_parsed += n
            if self._vault_parsed > max_head:
                self._vault_big = True
                raise ValueError("head too large")  # httptools stops; uvicorn answers 400

        def send_400_response(self, msg: str) -> None:
            if self._vault_big:
                self._vault_refuse()
            else:
                super().send_400_response(msg)

        def _vault_refuse(self) -> None:
            self._vault_cancel()
            body = _TOO_LARGE % max_head
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
            self.transport.close()
            self.headers = []  # what was kept of it goes now, not at the close
            self.url = b""

        def _vault_cancel(self) -> None:
            if self._vault_timer is not None:
                self._vault_timer.cancel()
                self._vault_timer = None

        def _vault_late(self) -> None:
            self._vault_timer = None
            if not self.transport.is_closing():
                self.transport.abort()  # no whole head in time: the connection goes, now

        def on_headers_complete(self) -> None:
            self._vault_in_head = False
            self._vault_in_body, self._vault_gap = True, 0
            self._vault_cancel()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            pipelined = bool(self.pipeline)  # its next request's head arrived already
            super().on_response_complete()
            if not pipelined and not self.transport.is_closing():
                self._vault_arm()  # the next request's head, on this keep-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._vault_cancel()
            key, self._vault_peer = self._vault_peer, None
            if key is not None:
                self.vault_give(key)
            super().connection_lost(exc)

    return Bounded


class _TlsGate(asyncio.Protocol):
    """A new TLS connection's first protocol: it counts the connection
    against its address (or aborts it past the address's share) and puts
    the loop's own TLS layer in its place at once, with ``head_timeout``
    for the handshake; the HTTP protocol keeps the count from the end of
    the handshake, and a handshake that never ends gives it back."""

    def __init__(self, loop: Any, factory: Any, ctx: Any, http: Any, tls: Any,
                 gates: set[Any]) -> None:  # fmt: skip
        self._loop = loop
        self._factory = factory
        self._ctx = ctx
        self._http = http
        self._tls = tls  # the loop's SSLProtocol class
        self._gates = gates
        self._transport: Any = None

    def connection_made(self, transport: Any) -> None:
        key = _peer_key(transport)
        try:
            app = self._factory()
            done = self._loop.create_future()
            tls = self._tls(self._loop, app, self._ctx, done, server_side=True,
                            ssl_handshake_timeout=self._http.vault_head_timeout)  # fmt: skip
        except Exception:  # noqa: BLE001 - nothing to serve it with: it goes, uncounted
            transport.abort()
            raise
        if not self._http.vault_take(key):
            transport.abort()  # past the address's connections: closed as it is made
            return
        app._vault_counted = key  # the HTTP protocol releases it when it goes
        self._transport = transport
        self._gates.add(self)

        def ended(fut: Any) -> None:
            if not fut.cancelled():
                fut.exception()  # a failed handshake is the stranger's, not an error to log
            self._gates.discard(self)
            if getattr(app, "_vault_peer", None) is None:  # no handshake: never handed over
                self._http.vault_give(key)

        done.add_done_callback(ended)
        # in place before the loop starts reading: the ClientHello goes to TLS
        transport.set_protocol(tls)
        tls.connection_made(transport)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def _tls_protocol(base: type[Any]) -> type[Any]:
    """The TLS protocol class of ``base``'s own TLS servers."""
    try:
        import uvloop
        import uvloop.loop

        if issubclass(base, uvloop.Loop):
            return getattr(uvloop.loop, "SSLProtocol")  # type: ignore[no-any-return]  # noqa: B009 - not in its stubs
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    from asyncio.sslproto import SSLProtocol

    return SSLProtocol


def gated_loop(base: type[Any], http: Any) -> type[Any]:
    """An event loop class (``base``: uvloop's, or asyncio's selector loop)
    whose TLS servers hand each new connection to a :class:`_TlsGate` for
    ``http`` (a :func:`bounded_protocol` class) before its handshake;
    :meth:`abort_handshakes` drops those still shaking hands."""
    tls = _tls_protocol(base)

    class Gated(base):  # type: ignore[misc]
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self._vault_gates: set[_TlsGate] = set()  # connections shaking hands

        async def create_server(self, protocol_factory: Any, *args: Any, ssl: Any = None,
                                **kw: Any) -> Any:  # fmt: skip
            if ssl is None:
                return await super().create_server(protocol_factory, *args, **kw)

            def gate() -> _TlsGate:
                return _TlsGate(self, protocol_factory, ssl, http, tls, self._vault_gates)

            return await super().create_server(gate, *args, **kw)

        def abort_handshakes(self) -> None:
            for g in list(self._vault_gates):
                g.abort()

    return Gated
