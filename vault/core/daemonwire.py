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
  ``proof`` (the caller's signature, :class:`~vault.core.licence.LicenceProof`,
  over the request and ``client_key``), ``client_key`` (the caller's CURVE
  public key for this worker), ``package_digest`` (the digest the proof
  signs), ``shm_size``, ``providers``, ``device``, ``prepack`` (false: no
  packed weight copies); answered with the worker's id, pid, endpoint and
  CURVE server key, and one descriptor: an ``O_PATH`` handle of the worker's
  socket, whose directory only the workers' uid may enter (the caller
  connects to ``ipc:///proc/self/fd/N``; no other user can connect)
- ``close``: ``worker`` (only one this connection opened)
- ``health``: the daemon's tier, device, worker uid, this caller's workers,
  the workers live and starting (this caller's uid, and in all), this
  caller's opens awaiting the key server (``authorizing``) and the caps

Who listens: a caller checks, with ``SO_PEERCRED``, that the socket's
listener is root or the configured daemon user (:func:`trusted_daemon_uids`:
``$VAULT_DAEMON_USER``, a name or a uid, for a daemon run as a service user)
before it sends anything: a relay listening in the daemon's place is refused
(:class:`~vault.core.errors.UntrustedDaemonError`).

Example::

    send_message(sock, {"op": "hello"})
    reply, fds = recv_message(sock)
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import struct
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError, ProtocolError

__all__ = [
    "DAEMON_USER_VAR",
    "DEFAULT_SOCKET",
    "ENV_VAR",
    "MAX_FDS",
    "MAX_MESSAGE",
    "peer_credentials",
    "daemon_socket",
    "recv_message",
    "send_message",
    "trusted_daemon_uids",
]

DEFAULT_SOCKET = "/run/vault/daemon.sock"
ENV_VAR = "VAULT_DAEMON"
DAEMON_USER_VAR = "VAULT_DAEMON_USER"  # the daemon's user, where it is not root
MAX_MESSAGE = 1 << 20
MAX_FDS = 8  # an assignment: package, licence, proof, arena, listening socket, its token
_LEN = struct.Struct(">I")


def daemon_socket(daemon: str | os.PathLike[str] | None) -> str | None:
    """The daemon's socket: the argument, ``$VAULT_DAEMON``, or the default
    path when something is there; None when no daemon is named or present
    (``vault.open`` is then tier 0, or refused)."""
    if daemon is not None:
        return os.fspath(daemon)
    env = os.environ.get(ENV_VAR)
    if env:
        return env
    return DEFAULT_SOCKET if os.path.exists(DEFAULT_SOCKET) else None


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a Unix socket
    (``SO_PEERCRED``: for a connected client, the creds of whoever called
    ``listen`` on the other side), from the kernel, not from the peer."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def trusted_daemon_uids(environ: dict[str, str] | None = None) -> set[int]:
    """The uids a caller accepts as its daemon: root, and the user named by
    ``$VAULT_DAEMON_USER`` (a name or a number) for a daemon run as a
    dedicated service user."""
    env = os.environ if environ is None else environ
    out = {0}
    name = env.get(DAEMON_USER_VAR, "").strip()
    if name:
        if name.isdigit():
            out.add(int(name))
        else:
            try:
                out.add(pwd.getpwnam(name).pw_uid)
            except KeyError:
                raise ConfigError(f"${DAEMON_USER_VAR}={name!r}: no such user") from None
    return out


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
