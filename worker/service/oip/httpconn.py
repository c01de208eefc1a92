"""uvicorn's HTTP protocol with the two bounds it lacks: a deadline for each
request's head, and a cap on the connections of one peer address.

Why. uvicorn waits for a request's headers without a deadline (its
keep-alive timeout runs only between requests, and stops at the first byte),
and its ``limit_concurrency`` counts every open connection: a stranger with
no token that opened 600 connections and sent 17 bytes of a request line on
each had every other caller answered 503, for as long as it kept them open.

Here a connection must deliver each request's head within ``head_timeout``
seconds of being opened or of its previous answer, or it is closed; and one
peer address holds at most ``per_address`` connections at once (an IPv4
address, or an IPv6 /64: one host holds a whole /64); past it a new one is
closed as soon as it is made. What the head carries (a token) is checked by
the door after that, as before.

Example::

    config = uvicorn.Config(app, http=bounded_protocol(10.0, 64), ...)
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..calls import address_key

__all__ = ["bounded_protocol"]


def bounded_protocol(head_timeout: float, per_address: int) -> type[Any]:
    """An ``HttpToolsProtocol`` subclass for one server (its own counts)."""
    counts: Counter[str] = Counter()  # the server's one event loop: no lock

    class Bounded(HttpToolsProtocol):
        _vault_timer: Any = None
        _vault_peer: str | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            key = address_key(str(peer[0])) if peer else ""
            if counts[key] >= per_address:
                # aborted, not closed: a TLS close waits up to 30 s for the
                # peer's close_notify, the connection counted by uvicorn all along
                self.connections.discard(self)
                transport.abort()  # its connection_lost follows; it was never counted
                return
            counts[key] += 1
            self._vault_peer = key
            self._vault_arm()

        def _vault_arm(self) -> None:
            self._vault_cancel()
            self._vault_timer = self.loop.call_later(head_timeout, self._vault_late)

        def _vault_cancel(self) -> None:
            if self._vault_timer is not None:
                self._vault_timer.cancel()
                self._vault_timer = None

        def _vault_late(self) -> None:
            self._vault_timer = None
            if not self.transport.is_closing():
                self.transport.abort()  # no whole head in time: the connection goes, now

        def on_headers_complete(self) -> None:
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
                counts[key] -= 1
                if counts[key] <= 0:
                    del counts[key]
            super().connection_lost(exc)

    return Bounded
