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
  messages arrive in order, one at a time: a server that opens into a reused
  buffer refuses, unopened, any message of a session whose previous one it
  is still serving (the buffer is lent until the answer is sent).
* **Only a session's holder gets a connection.** The same HKDF gives a third
  secret, the session's *password*: the sealed port speaks ZeroMQ's PLAIN
  mechanism, and its ZAP handler admits a connection only under a live
  session's id and password (:meth:`SessionTable.admits`), so a stranger's
  bytes are refused at the handshake, before libzmq buffers any message.
* **A lost answer is never paid for twice.** A plain "unknown session"
  answer cannot be authenticated; before a caller sends a call again under a
  new session, it asks over CURVE what became of the old one
  (:meth:`SessionTable.create` with ``prev``): the server ends that session
  (a copy held back on the wire can no longer be accepted) and says whether
  it accepted the call. Only a call it never accepted is sent again.

Any failure is an :class:`~vault.core.errors.IntegrityError` and nothing of
the message is used. A receiver answers what it cannot authenticate with a
plain error message (``ERROR_TAG``) that a caller only ever raises as an
error: a party on the wire can make a call fail (as it could by dropping
it), never make it succeed with other data.

Example::

    c2s, s2c, password = derive_session(c_rand, s_rand, sid, client_pub, server_pub)
    wire = Sealer(c2s, sid).seal([header, frame])     # caller
    header, frame = Opener(c2s, sid).open(wire)       # server
"""

from __future__ import annotations

import hmac
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import IntegrityError

__all__ = [
    "CHUNK",
    "ERROR_TAG",
    "Opener",
    "RETAIN_BYTES",
    "Retained",
    "SEALED_TAG",
    "Sealer",
    "ServerSession",
    "SessionTable",
    "ZAP_DOMAIN",
    "derive_keys",
    "derive_session",
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
RETAIN_BYTES = 256 << 20  # reused buffers a server keeps across all its sessions, at most
ZAP_DOMAIN = "vault-sealed"  # the sealed port's ZAP domain (PLAIN: session id, password)


def derive_session(
    client_rand: bytes, server_rand: bytes, sid: bytes, client_public: bytes, server_public: bytes
) -> tuple[bytes, bytes, str]:
    """The caller-to-server key, the server-to-caller key, and the password
    (hex) that admits a connection to the sealed port under this session."""
    if len(client_rand) != RAND_BYTES or len(server_rand) != RAND_BYTES or len(sid) != SID_BYTES:
        raise IntegrityError("malformed session key material")
    okm = HKDF(
        algorithm=hashes.SHA256(), length=96, salt=sid, info=_INFO + client_public + server_public
    ).derive(client_rand + server_rand)
    return okm[:32], okm[32:64], okm[64:].hex()


def derive_keys(
    client_rand: bytes, server_rand: bytes, sid: bytes, client_public: bytes, server_public: bytes
) -> tuple[bytes, bytes]:
    """The (caller-to-server, server-to-caller) keys of one session."""
    c2s, s2c, _password = derive_session(client_rand, server_rand, sid, client_public,
                                         server_public)  # fmt: skip
    return c2s, s2c


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
    faults of fresh memory on every call). The buffer is *lent* from a
    successful :meth:`open` until :meth:`release`: a message that arrives
    meanwhile is refused before anything is written (a forgery naming this
    session, decrypted into the same buffer, used to overwrite the inputs of
    the call being computed). ``retained`` (shared by a server's sessions)
    bounds the bytes kept for reuse. Otherwise each message gets a buffer of
    its own (a caller, whose results outlive the call)."""

    def __init__(
        self, key: bytes, sid: bytes, *, reuse: bool = False, retained: Retained | None = None
    ) -> None:
        # one call per chunk, straight into our buffer (cryptography >= 47's
        # AESGCM.decrypt_into): a Cipher object per chunk cost 8.8 us against
        # 1.0 us for a 200-byte header
        self._into = AESGCM(key).decrypt_into
        self.sid = sid
        self.last = 0
        self._reuse = reuse
        self._retained = retained
        self._lent = False
        self._buf = memoryview(bytearray(0))

    def release(self) -> None:
        """The frames of the last message are no longer used (its answer went)."""
        self._lent = False

    def forget(self) -> None:
        """This opener's session ended: give its kept buffer's bytes back."""
        if self._retained is not None:
            self._retained.give(len(self._buf))
        self._buf = memoryview(bytearray(0))

    def open(self, msg: Sequence[Any]) -> list[memoryview]:
        """The plaintext frames of a sealed message ``[prefix, chunk...]``, or
        :class:`IntegrityError` (then nothing of it is used)."""
        if not msg:
            raise IntegrityError("empty sealed message")
        if self._lent:
            raise IntegrityError("a sealed message arrived while the session's last one is served")
        prefix = bytes(memoryview(msg[0]))
        if len(prefix) < _PREFIX.size:
            raise IntegrityError("malformed sealed message")
        tag, sid, seq, nframes = _PREFIX.unpack_from(prefix)
        if tag != SEALED_TAG or sid != self.sid:
            raise IntegrityError("not a message of this session")
        if not 0 < nframes <= MAX_FRAMES or len(prefix) != _PREFIX.size + 4 * nframes:
            raise IntegrityError("malformed sealed message")
        counts = struct.unpack_from(f">{nframes}I", prefix, _PREFIX.size)
        if 0 in counts:
            # every frame is sealed as one chunk at least (an empty one as its
            # tag alone): a frame of none would leave the prefix, and so the
            # message number, unauthenticated
            raise IntegrityError("malformed sealed message")
        chunks = [memoryview(c) for c in msg[1:]]
        if sum(counts) != len(chunks):
            raise IntegrityError("a sealed message lost or gained chunks")
        if seq <= self.last:
            raise IntegrityError("a sealed message was replayed or arrived out of order")
        if any(c.nbytes < _TAG or c.nbytes > CHUNK + _TAG for c in chunks):
            raise IntegrityError("malformed sealed chunk")
        # each frame starts on a 64-byte boundary (onnxruntime reads tensors
        # in place)
        need = 0
        idx = 0
        for n in counts:
            need += -(-sum(c.nbytes - _TAG for c in chunks[idx : idx + n]) // 64) * 64
            idx += n
        fresh = not (self._reuse and len(self._buf) >= need)
        out = _aligned(need) if fresh else self._buf
        frames: list[memoryview] = []
        pos = idx = written = 0
        into = self._into
        try:
            for n in counts:
                pos = -(-pos // 64) * 64
                start = pos
                for k in range(n):
                    c = chunks[idx + k]
                    m = c.nbytes - _TAG
                    written = pos + m
                    into(_nonce(seq, idx + k), c, prefix, out[pos : pos + m])
                    pos += m
                frames.append(out[start:pos])
                idx += n
        except InvalidTag:
            out[:written] = bytes(written)  # nothing of a forgery stays readable
            raise IntegrityError("a sealed message failed authentication") from None
        self.last = seq  # only now: a forgery cannot move the mark
        if self._reuse:
            self._lent = True
            if fresh and (self._retained is None or self._retained.take(need - len(self._buf))):
                self._buf = out  # kept for the next message (views of the old one keep it alive)
        return frames


class Retained:
    """Bytes of reused buffers a server keeps across its sessions, bounded:
    a caller with many sessions cannot make it keep one large buffer each."""

    def __init__(self, limit: int = RETAIN_BYTES) -> None:
        self.limit = limit
        self.bytes = 0

    def take(self, n: int) -> bool:
        if self.bytes + n > self.limit:
            return False
        self.bytes += n
        return True

    def give(self, n: int) -> None:
        self.bytes -= n


class ServerSession:
    """A server's state for one caller thread's session."""

    __slots__ = ("sid", "client_key", "password", "opener", "sealer")

    def __init__(
        self, sid: bytes, client_key: str, c2s: bytes, s2c: bytes, *, password: str = "",
        reuse: bool = True, retained: Retained | None = None,
    ) -> None:  # fmt: skip
        self.sid = sid
        self.client_key = client_key  # the CURVE key (Z85) that made it: what calls are admitted as
        self.password = password  # what admits a connection to the sealed port under it
        self.opener = Opener(c2s, sid, reuse=reuse, retained=retained)
        self.sealer = Sealer(s2c, sid)


GONE_PER_CLIENT = 16  # sessions that went, remembered per caller (SessionTable)


class SessionTable:
    """A server's sessions, made over its CURVE front. Bounded: at most
    ``per_client`` per CURVE key and ``total`` in all, the least recently
    used going first (a caller whose session went gets a plain "unknown
    session" answer and makes a new one). A session that went is remembered
    (its last accepted message number, under its caller: the last
    :data:`GONE_PER_CLIENT` of each caller's) so that a caller asking what
    became of it gets a true answer, whatever other callers do.

    :meth:`admits` is called from the ZAP handler's thread; everything else
    from the server's loop."""

    def __init__(
        self, server_public: bytes, *, per_client: int = 64, total: int = 4096, reuse: bool = True,
        retain_bytes: int = RETAIN_BYTES,
    ) -> None:  # fmt: skip
        """``reuse``: open each session's messages into one buffer (a server
        done with a request before its caller sends the next; it calls
        ``opener.release()`` once the answer went); False for a server that
        may hold a request's frames longer (queued, batched)."""
        self.reuse = reuse
        self.server_public = server_public
        self.per_client = per_client
        self.total = total
        self.retained = Retained(retain_bytes)
        self._lock = threading.Lock()
        self._by_sid: OrderedDict[bytes, ServerSession] = OrderedDict()
        self._by_key: dict[str, OrderedDict[bytes, None]] = {}
        # the sessions that went, per caller (at most GONE_PER_CLIENT each, the
        # callers least recently touched going first past ``total``): one
        # caller's churn forgets only its own. Before, one list of ``total``
        # for all: a licensed caller's 20,000 sessions in a second flushed
        # every other caller's, whose question "was my call accepted?" then
        # got "unknown" and its call was sent, and paid for, again
        self._gone: OrderedDict[str, OrderedDict[bytes, int]] = OrderedDict()

    def create(
        self, client_key: str, client_rand: Any, *, prev: Any = None, prev_seq: Any = None
    ) -> dict[str, Any]:
        """A new session for ``client_key`` (authenticated by CURVE); the
        fields of the answer (``sid``, ``rand``). With ``prev`` (a session id
        of this caller) and ``prev_seq`` (the number of a message sent on it
        that got no authenticated answer), that session ends here and the
        answer's ``prev`` says whether its message was ``"accepted"``,
        ``"not_accepted"``, or the session is ``"unknown"`` (a restart)."""
        import os

        if not isinstance(client_rand, bytes) or len(client_rand) != RAND_BYTES:
            raise IntegrityError("a session request needs 32 random bytes")
        verdict = None
        if prev is not None:
            if (not isinstance(prev, bytes) or len(prev) != SID_BYTES or not isinstance(prev_seq, int)
                    or isinstance(prev_seq, bool)):  # fmt: skip
                raise IntegrityError("prev needs a 16-byte session id and a message number")
            verdict = self._abandon(client_key, prev, prev_seq)
        sid, rand = os.urandom(SID_BYTES), os.urandom(RAND_BYTES)
        c2s, s2c, password = derive_session(client_rand, rand, sid, client_key.encode(),
                                            self.server_public)  # fmt: skip
        mine = self._by_key.setdefault(client_key, OrderedDict())
        while len(mine) >= self.per_client:
            self._remove(next(iter(mine)))
        while len(self._by_sid) >= self.total:
            self._remove(next(iter(self._by_sid)))
        sess = ServerSession(sid, client_key, c2s, s2c, password=password, reuse=self.reuse,
                             retained=self.retained)  # fmt: skip
        with self._lock:
            self._by_sid[sid] = sess
        self._by_key.setdefault(client_key, OrderedDict())[sid] = None
        fields: dict[str, Any] = {"sid": sid, "rand": rand}
        if verdict is not None:
            fields["prev"] = verdict
        return fields

    def _abandon(self, client_key: str, sid: bytes, seq: int) -> str:
        sess = self._by_sid.get(sid)
        if sess is not None and sess.client_key == client_key:
            self._remove(sid)  # a copy of that message held back on the wire now finds no session
            return "accepted" if sess.opener.last >= seq else "not_accepted"
        mine = self._gone.get(client_key)
        last = mine.get(sid) if mine is not None else None
        if last is not None:
            return "accepted" if last >= seq else "not_accepted"
        return "unknown"  # never ours, or forgotten (a restart, or this caller's own churn)

    def _remove(self, sid: bytes) -> None:
        with self._lock:
            sess = self._by_sid.pop(sid)
        mine = self._by_key.get(sess.client_key)
        if mine is not None:
            mine.pop(sid, None)
            if not mine:
                del self._by_key[sess.client_key]
        sess.opener.forget()
        gone = self._gone.get(sess.client_key)
        if gone is None:
            gone = self._gone[sess.client_key] = OrderedDict()
        else:
            self._gone.move_to_end(sess.client_key)
        gone[sid] = sess.opener.last
        while len(gone) > GONE_PER_CLIENT:
            gone.popitem(last=False)
        while len(self._gone) > self.total:
            self._gone.popitem(last=False)

    def get(self, sid: bytes | None) -> ServerSession | None:
        s = self._by_sid.get(sid) if sid is not None else None
        if s is not None:
            with self._lock:
                self._by_sid.move_to_end(s.sid)
            mine = self._by_key.get(s.client_key)
            if mine is not None:
                mine.move_to_end(s.sid)
        return s

    def admits(self, username: str, password: str) -> bool:
        """The ZAP handler's question (PLAIN on the sealed port): is this a
        live session's id (hex) and password? (Any thread.)"""
        try:
            sid = bytes.fromhex(username)
        except ValueError:
            return False
        with self._lock:
            sess = self._by_sid.get(sid)
        return sess is not None and hmac.compare_digest(sess.password.encode(), password.encode())

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
