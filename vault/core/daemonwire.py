"""The local daemon's wire format: JSON messages and file descriptors over a
Unix stream socket (the caller's side is in :mod:`vault.client`, the daemon in
:mod:`vault.app.daemon`).

One message is a 4-byte big-endian length and that many bytes of JSON (an
object); descriptors ride along with its first byte as ``SCM_RIGHTS``. A
caller passes the package it opened and its shared-memory arena this way, so
the daemon never opens a path on a caller's behalf (no confused deputy: a
caller can only hand over what it could read itself).

Requests (``op``), each answered by ``{"ok": true, ...}`` or
``{"ok": false, "error": {"code", "message"}}``:

- ``hello``: the daemon's device id and tier, and the uid it sees for the caller
- ``open``: fds ``[package, shm?]``; ``licence`` (the public part),
  ``proof`` (the caller's signature, :class:`~vault.core.licence.LicenceProof`),
  ``client_key`` (the caller's CURVE public key for this worker), ``shm_size``,
  ``providers``, ``device``, ``prepack`` (false: no packed weight copies);
  answered with the worker's id, pid, endpoint and CURVE server key
- ``close``: ``worker`` (only one this connection opened)
- ``health``: the daemon's tier, device, worker uid, this caller's workers

Example::

    send_message(sock, {"op": "hello"})
    reply, fds = recv_message(sock)
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

from .errors import ProtocolError

__all__ = [
    "DEFAULT_SOCKET",
    "ENV_VAR",
    "MAX_FDS",
    "MAX_MESSAGE",
    "recv_message",
    "send_message",
]

DEFAULT_SOCKET = "/run/vault/daemon.sock"
ENV_VAR = "VAULT_DAEMON"
MAX_MESSAGE = 1 << 20
MAX_FDS = 8  # an assignment: package, licence, proof, arena, listening socket, its token
_LEN = struct.Struct(">I")


def send_message(sock: socket.socket, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
    body = json.dumps(msg, sort_keys=True).encode()
    if len(body) > MAX_MESSAGE:
        raise ProtocolError("daemon message too large")
    data = _LEN.pack(len(body)) + body
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int, head: bytes = b"") -> bytes:
    buf = bytearray(head)
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def recv_message(
    sock: socket.socket, *, max_fds: int = MAX_FDS
) -> tuple[dict[str, Any], list[int]]:
    """One message and the descriptors that came with it (the caller owns
    them: close what you do not keep). ``ConnectionError`` at EOF;
    :class:`ProtocolError` for anything malformed (its fds already closed)."""
    first, fds, flags, _addr = socket.recv_fds(sock, _LEN.size, max_fds)
    if not first:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("peer closed the connection")
    try:
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("too many descriptors in one daemon message")
        (size,) = _LEN.unpack(_recv_exact(sock, _LEN.size, first))
        if size > MAX_MESSAGE:
            raise ProtocolError("daemon message too large")
        body = _recv_exact(sock, size)
        try:
            msg = json.loads(body)
        except (ValueError, RecursionError) as exc:  # nested past Python's limit included
            raise ProtocolError("malformed daemon message") from (
                None if isinstance(exc, RecursionError) else exc
            )
        if not isinstance(msg, dict):
            raise ProtocolError("malformed daemon message")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return msg, list(fds)
