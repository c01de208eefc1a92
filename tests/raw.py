"""Raw access to a local worker's two fronts, for tests that send what the
client would never build: its ZeroMQ endpoint, and the direct local channel
(vault/core/localwire.py). Each is a context manager giving one function,
frames in, reply frames out."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from vault.client import Model
from vault.core.localwire import LocalChannel

Raw = Callable[[list[bytes]], list[bytes]]


@contextlib.contextmanager
def raw_zmq(model: Model) -> Iterator[Raw]:
    import zmq

    assert model._endpoint is not None and model._ctx is not None
    sock = model._ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(model._endpoint)

    def call(frames: list[bytes]) -> list[bytes]:
        sock.send_multipart(frames)
        assert sock.poll(5000)
        return list(sock.recv_multipart())

    try:
        yield call
    finally:
        sock.close()


@contextlib.contextmanager
def raw_local(model: Model) -> Iterator[Raw]:
    import socket

    from vault.core.localwire import RecordReader, send_record

    assert isinstance(model._channel, LocalChannel)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(model._channel.path)
    sock.sendall(model._channel._token)  # who we are: the caller's token
    reader = RecordReader(sock, max_message=1 << 20, owned=True)

    def call(frames: list[bytes]) -> list[bytes]:
        send_record(sock, frames)
        return [bytes(f) for f in reader.read()]

    try:
        yield call
    finally:
        sock.close()
