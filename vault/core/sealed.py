"""Sealed frames: large remote tensors under AES-256-GCM, keyed by CURVE.

A remote caller reaches a worker over ``tcp://`` with ZeroMQ CURVE, whose
cipher (libsodium's XSalsa20-Poly1305, ~1.2 GB/s here, after libzmq copies
each message) was most of the cost of a 2.4 MB request: 3.8-6.2 ms, against
~0.5 ms for TLS's AES-GCM on the same bytes. So calls go over a second
connection instead, whose messages are sealed with AES-256-GCM (AES-NI:
8-15 GB/s here) under keys agreed on the CURVE connection. Nothing here is
new cryptography: CURVE (libzmq) authenticates both ends and keeps the
exchange secret, HKDF-SHA256 and AES-256-GCM come from ``cryptography``,
and this module only fixes how they are composed:

* **Keys.** Over the CURVE connection, the caller sends 32 random bytes and
  the server answers with 32 of its own and a 16-byte session id. Both
  derive, with HKDF-SHA256 (salt: the session id; info: this format's name
  and both CURVE public keys), two 256-bit keys: one per direction. A
  session belongs to the CURVE key that made it, which is what the server
  admits each call as (licence checks stay per call).
* **Nonces never repeat.** Each direction's sender numbers its messages
  1, 2, 3, ... (64 bits); a message is cut into chunks of at most
  :data:`CHUNK` bytes, and chunk *i* of message *n* is sealed with the nonce
  ``n || i`` (8 + 4 bytes). One key per direction, so no two chunks under a
  key share a nonce; a sender that would wrap refuses.
* **Everything is authenticated.** A message is ``[prefix, chunk...]``; the
  prefix (format tag, session id, message number, the frame layout: how many
  chunks each frame has) is the associated data of every chunk, and the
  message's first frame is its header (msgpack, the same as on every other
  path). A flipped bit, a dropped, added, cut or swapped chunk, or a chunk
  from another message fails its tag.
* **Replay and reordering are refused.** A receiver accepts a message only
  if its number is above the last one it accepted on that session, and
  moves the mark only once every chunk has verified (a forgery cannot burn
  numbers). One calling thread has one session and one connection, so its
  messages arrive in order.

Any failure is an :class:`~vault.core.errors.IntegrityError` and nothing of
the message is used. A receiver answers what it cannot authenticate with a
plain error message (``ERROR_TAG``) that a caller only ever raises as an
error: a party on the wire can make a call fail (as it could by dropping
it), never make it succeed with other data.

Example::

    c2s, s2c = derive_keys(c_rand, s_rand, sid, client_pub, server_pub)
    wire = Sealer(c2s, sid).seal([header, frame])     # caller
    header, frame = Opener(c2s, sid).open(wire)       # server
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.ciphers.algorithms import AES
from cryptography.hazmat.primitives.ciphers.modes import GCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import IntegrityError

__all__ = [
    "CHUNK",
    "ERROR_TAG",
    "Opener",
    "SEALED_TAG",
    "Sealer",
    "ServerSession",
    "SessionTable",
    "derive_keys",
    "plain_error",
    "session_id",
]

SEALED_TAG = b"VSF1"  # a sealed message's prefix starts with this
ERROR_TAG = b"VSE1"  # a plain error answer: [ERROR_TAG, msgpack header]
CHUNK = 256 << 10  # ciphertexts of this size stay in malloc's warm heap (no fresh pages)
SID_BYTES = 16
RAND_BYTES = 32
MAX_FRAMES = (1 << 16) + 1
_INFO = b"vault sealed frames v1"
_PREFIX = struct.Struct(">4s16sQI")  # tag, session id, message number, frame count
_MAX_SEQ = (1 << 64) - 1
_TAG = 16


def derive_keys(
    client_rand: bytes, server_rand: bytes, sid: bytes, client_public: bytes, server_public: bytes
) -> tuple[bytes, bytes]:
    """The (caller-to-server, server-to-caller) keys of one session."""
    if len(client_rand) != RAND_BYTES or len(server_rand) != RAND_BYTES or len(sid) != SID_BYTES:
        raise IntegrityError("malformed session key material")
    okm = HKDF(
        algorithm=hashes.SHA256(), length=64, salt=sid, info=_INFO + client_public + server_public
    ).derive(client_rand + server_rand)
    return okm[:32], okm[32:]


def session_id(prefix: Any) -> bytes | None:
    """The session id a sealed message names (unauthenticated until opened)."""
    p = memoryview(prefix)
    if p.nbytes < _PREFIX.size or bytes(p[:4]) != SEALED_TAG:
        return None
    return bytes(p[4:20])


def _bytes_view(f: Any) -> memoryview:
    v = memoryview(f)
    return v if v.format == "B" and v.ndim == 1 else v.cast("B")


def _aligned(n: int) -> memoryview:
    """``n`` fresh bytes starting on a 64-byte boundary."""
    import ctypes

    raw = bytearray(n + 64)
    off = -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % 64
    return memoryview(raw)[off : off + n]


def _nonce(seq: int, index: int) -> bytes:
    return seq.to_bytes(8, "big") + index.to_bytes(4, "big")


class Sealer:
    """One direction's sending side: numbers and seals messages."""

    def __init__(self, key: bytes, sid: bytes) -> None:
        self._aead = AESGCM(key)
        self.sid = sid
        self.seq = 0

    def seal(self, frames: Sequence[Any]) -> list[Any]:
        """``[prefix, chunk...]`` for ``frames`` (the first is the header)."""
        if self.seq >= _MAX_SEQ:
            raise IntegrityError("this session has sealed all the messages it may")
        self.seq += 1
        views = [_bytes_view(f) for f in frames]
        counts = [max(1, -(-v.nbytes // CHUNK)) for v in views]
        prefix = _PREFIX.pack(SEALED_TAG, self.sid, self.seq, len(views)) + struct.pack(
            f">{len(counts)}I", *counts
        )
        out: list[Any] = [prefix]
        idx = 0
        enc = self._aead.encrypt
        for v, n in zip(views, counts):
            for k in range(n):
                out.append(enc(_nonce(self.seq, idx), v[k * CHUNK : (k + 1) * CHUNK], prefix))
                idx += 1
        return out


class Opener:
    """One direction's receiving side: authenticates, decrypts, refuses
    replays and reordering.

    ``reuse``: the plaintext goes into one buffer kept by this opener and
    overwritten by the next message (a server, done with a request before its
    caller can send the next; a fresh buffer every time would cost the page
    faults of fresh memory on every call). Otherwise each message gets a
    buffer of its own (a caller, whose results outlive the call)."""

    def __init__(self, key: bytes, sid: bytes, *, reuse: bool = False) -> None:
        self._key = key
        self.sid = sid
        self.last = 0
        self._reuse = reuse
        self._buf = memoryview(bytearray(0))

    def open(self, msg: Sequence[Any]) -> list[memoryview]:
        """The plaintext frames of a sealed message ``[prefix, chunk...]``, or
        :class:`IntegrityError` (then nothing of it is used)."""
        if not msg:
            raise IntegrityError("empty sealed message")
        prefix = bytes(memoryview(msg[0]))
        if len(prefix) < _PREFIX.size:
            raise IntegrityError("malformed sealed message")
        tag, sid, seq, nframes = _PREFIX.unpack_from(prefix)
        if tag != SEALED_TAG or sid != self.sid:
            raise IntegrityError("not a message of this session")
        if not 0 < nframes <= MAX_FRAMES or len(prefix) != _PREFIX.size + 4 * nframes:
            raise IntegrityError("malformed sealed message")
        counts = struct.unpack_from(f">{nframes}I", prefix, _PREFIX.size)
        chunks = [memoryview(c) for c in msg[1:]]
        if sum(counts) != len(chunks):
            raise IntegrityError("a sealed message lost or gained chunks")
        if seq <= self.last:
            raise IntegrityError("a sealed message was replayed or arrived out of order")
        if any(c.nbytes < _TAG or c.nbytes > CHUNK + _TAG for c in chunks):
            raise IntegrityError("malformed sealed chunk")
        # each frame starts on a 64-byte boundary (onnxruntime reads tensors
        # in place); cryptography's update_into wants 15 spare bytes past
        # what it writes
        need = _TAG
        idx = 0
        for n in counts:
            need += -(-sum(c.nbytes - _TAG for c in chunks[idx : idx + n]) // 64) * 64
            idx += n
        if self._reuse and len(self._buf) >= need:
            out = self._buf
        else:
            out = _aligned(need)
            if self._reuse:
                self._buf = out  # views of the old one, if any, keep it alive
        frames: list[memoryview] = []
        pos = idx = 0
        try:
            for n in counts:
                pos = -(-pos // 64) * 64
                start = pos
                for k in range(n):
                    c = chunks[idx + k]
                    d = Cipher(AES(self._key), GCM(_nonce(seq, idx + k), bytes(c[-_TAG:])))
                    dec = d.decryptor()
                    dec.authenticate_additional_data(prefix)
                    m = c.nbytes - _TAG
                    dec.update_into(c[:-_TAG], out[pos : pos + m + _TAG])
                    dec.finalize()
                    pos += m
                frames.append(out[start:pos])
                idx += n
        except InvalidTag:
            out[:pos] = bytes(pos)  # nothing of a forgery stays readable
            raise IntegrityError("a sealed message failed authentication") from None
        self.last = seq  # only now: a forgery cannot move the mark
        return frames


class ServerSession:
    """A server's state for one caller thread's session."""

    __slots__ = ("sid", "client_key", "opener", "sealer")

    def __init__(
        self, sid: bytes, client_key: str, c2s: bytes, s2c: bytes, *, reuse: bool = True
    ) -> None:
        self.sid = sid
        self.client_key = client_key  # the CURVE key (Z85) that made it: what calls are admitted as
        self.opener = Opener(c2s, sid, reuse=reuse)
        self.sealer = Sealer(s2c, sid)


class SessionTable:
    """A server's sessions, made over its CURVE front. Bounded: at most
    ``per_client`` per CURVE key and ``total`` in all, the least recently
    used going first (a caller whose session went gets a plain "unknown
    session" answer and makes a new one)."""

    def __init__(
        self, server_public: bytes, *, per_client: int = 64, total: int = 4096, reuse: bool = True
    ) -> None:
        """``reuse``: open each session's messages into one buffer (a server
        done with a request before its caller sends the next); False for a
        server that may hold a request's frames longer (queued, batched)."""
        from collections import OrderedDict

        self.reuse = reuse
        self.server_public = server_public
        self.per_client = per_client
        self.total = total
        self._by_sid: OrderedDict[bytes, ServerSession] = OrderedDict()

    def create(self, client_key: str, client_rand: Any) -> dict[str, Any]:
        """A new session for ``client_key`` (authenticated by CURVE); the
        fields of the answer (``sid``, ``rand``)."""
        import os

        if not isinstance(client_rand, bytes) or len(client_rand) != RAND_BYTES:
            raise IntegrityError("a session request needs 32 random bytes")
        sid, rand = os.urandom(SID_BYTES), os.urandom(RAND_BYTES)
        c2s, s2c = derive_keys(client_rand, rand, sid, client_key.encode(), self.server_public)
        mine = [s for s in self._by_sid.values() if s.client_key == client_key]
        for old in mine[: max(0, len(mine) - self.per_client + 1)]:
            del self._by_sid[old.sid]
        while len(self._by_sid) >= self.total:
            self._by_sid.popitem(last=False)
        self._by_sid[sid] = ServerSession(sid, client_key, c2s, s2c, reuse=self.reuse)
        return {"sid": sid, "rand": rand}

    def get(self, sid: bytes | None) -> ServerSession | None:
        s = self._by_sid.get(sid) if sid is not None else None
        if s is not None:
            self._by_sid.move_to_end(sid)  # type: ignore[arg-type]
        return s

    def __len__(self) -> int:
        return len(self._by_sid)


def plain_error(exc: Exception, *, unknown_session: bool = False) -> list[bytes]:
    """A receiver's answer to a message it could not authenticate: ``[ERROR_TAG,
    header]``, never sealed (it has no session key to seal it with)."""
    from .errors import VaultError
    from .protocol import error_reply, pack_header

    err = exc if isinstance(exc, VaultError) else IntegrityError("not a sealed message")
    header = error_reply(None, err)
    if unknown_session:
        header["session"] = "unknown"
    return [ERROR_TAG, pack_header(header)]
