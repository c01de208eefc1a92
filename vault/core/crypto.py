"""All cryptography of the vault, and the only module that imports ``cryptography``.

- :func:`stream_encrypt` / :func:`stream_decrypt_into`: AES-256-GCM in the
  STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015; as in Tink's
  streaming AEAD and age): the payload is cut into fixed-size chunks, chunk
  ``i`` is sealed under nonce ``prefix(7) || i(4, big-endian) || last(1)`` with
  the manifest digest as associated data. Reordering, truncation, extension
  and chunk swapping between packages all fail authentication. Decryption
  writes straight into a caller-owned buffer (``update_into``): one plaintext
  copy, no page-faulting temporaries.
- Ed25519 publisher signatures.
- HPKE (RFC 9180) key release: X25519 by default, ML-KEM-768 + X25519 hybrid
  as an option.
- Key wrapping under the key server's master key (AES-256-GCM, the key id and
  model id bound as associated data); sub-keys derived from it (HKDF-SHA256)
  and HMAC-SHA256 tags (the key server's authenticated rows).

Every failure to authenticate raises :class:`vault.core.errors.IntegrityError`,
with no detail of which check failed.

Example::

    key = generate_key()
    ct = stream_encrypt(key, prefix, aad, b"hello" * 1000, chunk_size=4096)
    out = bytearray(5000)
    stream_decrypt_into(key, prefix, aad, ct, out, chunk_size=4096)
"""

from __future__ import annotations

import base64
import ctypes
import functools
import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ConfigError, IntegrityError
from .files import read_secret_file, write_private_file

KEY_SIZE = 32
TAG_SIZE = 16
NONCE_PREFIX_SIZE = 7
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: large enough for full AES-NI speed, small enough to stream

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "EphemeralKey",
    "HPKE_SUITES",
    "KEY_SIZE",
    "PublisherKey",
    "ciphertext_size",
    "decrypt_chunk",
    "derive_key",
    "fingerprint",
    "generate_key",
    "hpke_seal",
    "key_release_info",
    "licence_proof_message",
    "load_public_key",
    "mac",
    "mac_ok",
    "release_buffer",
    "secret_buffer",
    "sha256",
    "stream_decrypt_into",
    "stream_encrypt",
    "unwrap_key",
    "verify_signature",
    "wrap_key",
    "zeroize",
]


def generate_key() -> bytearray:
    """A fresh 256-bit key, in a mutable buffer so it can be overwritten."""
    return bytearray(os.urandom(KEY_SIZE))


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def sha256(*parts: bytes | bytearray | memoryview) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def derive_key(master: bytes | bytearray, label: bytes) -> bytearray:
    """A 256-bit sub-key of ``master`` for one purpose (HKDF-SHA256, ``label``
    as info): knowing the sub-key tells nothing of the master or of another
    label's sub-key."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=label)
    return bytearray(hkdf.derive(bytes(master)))


def mac(key: bytes | bytearray, message: bytes) -> bytes:
    """HMAC-SHA256 of ``message``."""
    return hmac.new(bytes(key), message, hashlib.sha256).digest()


def mac_ok(key: bytes | bytearray, message: bytes, tag: bytes | None) -> bool:
    """Whether ``tag`` is the HMAC of ``message`` (constant-time compare)."""
    return tag is not None and hmac.compare_digest(mac(key, message), bytes(tag))


def zeroize(buf: bytearray | memoryview | None) -> None:
    """Overwrite a mutable buffer in place with ``memset`` (best effort: Python
    may hold copies of immutable ``bytes`` we never see; we keep secrets in
    bytearrays). No temporary: wiping a 500 MB plaintext must not allocate
    another 500 MB of zeros, which would raise the worker's peak memory."""
    if buf is None:
        return
    mv = memoryview(buf).cast("B")
    n = len(mv)
    if n == 0:
        return
    if mv.readonly:
        raise TypeError("cannot wipe a read-only buffer")
    ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(mv)), 0, n)


# --- STREAM ----------------------------------------------------------------


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index >= 1 << 32:
        raise ConfigError("payload has too many chunks")
    return prefix + struct.pack(">IB", index, 1 if last else 0)


def chunk_count(plaintext_size: int, chunk_size: int) -> int:
    return max(1, -(-plaintext_size // chunk_size))


def ciphertext_size(plaintext_size: int, chunk_size: int) -> int:
    return plaintext_size + TAG_SIZE * chunk_count(plaintext_size, chunk_size)


def stream_encrypt(
    key: bytes | bytearray,
    prefix: bytes,
    aad: bytes,
    plaintext: bytes | bytearray | memoryview,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    out: Any = None,
    progress: Callable[[int], None] | None = None,
) -> bytearray:
    """Encrypt ``plaintext`` chunk by chunk into one preallocated buffer."""
    if len(prefix) != NONCE_PREFIX_SIZE:
        raise ConfigError("nonce prefix must be 7 bytes")
    src = memoryview(plaintext).cast("B")
    n = chunk_count(len(src), chunk_size)
    total = ciphertext_size(len(src), chunk_size)
    buf = out if out is not None else bytearray(total)
    dst = memoryview(buf)
    k = bytes(key)
    pos = 0
    for i in range(n):
        piece = src[i * chunk_size : (i + 1) * chunk_size]
        enc = Cipher(algorithms.AES(k), modes.GCM(_nonce(prefix, i, i == n - 1))).encryptor()
        enc.authenticate_additional_data(aad)
        if len(piece):
            # update_into needs len(out) >= len(in) + block_size - 1
            written = enc.update_into(piece, dst[pos : pos + len(piece) + 15])
            assert written == len(piece)
        enc.finalize()
        dst[pos + len(piece) : pos + len(piece) + TAG_SIZE] = enc.tag
        pos += len(piece) + TAG_SIZE
        if progress is not None:
            progress(len(piece))
    return buf


def secret_buffer(size: int) -> Any:
    """A zeroed, writable buffer for secret plaintext: an anonymous private
    mapping that stays out of core dumps (``MADV_DONTDUMP``; advice the
    kernel refuses is ignored) and that :func:`release_buffer` unmaps at once.
    It behaves like a ``bytearray`` of ``size`` bytes (buffer protocol,
    slicing). Its pages are the kernel's default size: until stop 33 it asked
    for transparent huge pages, which on a VM with free page reporting cost
    4x (500 MB decrypted into memory idle 3 s: 674-719 ms with 2 MiB pages
    against 184-200 ms with 4 KiB ones, two threads, with and without
    ``mlockall``; even when the memory was just freed, 211 against 192 ms)."""
    import mmap

    if size < (2 << 20) or not hasattr(mmap, "MAP_ANONYMOUS"):  # small, or no POSIX mmap
        return bytearray(size)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_DONTDUMP)
    except (OSError, AttributeError):  # advice only
        pass
    return buf


def release_buffer(buf: Any) -> None:
    """Unmap a :func:`secret_buffer` now (after wiping it): its memory goes
    back at once. A buffer something still views is left to the collector."""
    close = getattr(buf, "close", None)
    if close is not None:
        try:
            close()
        except BufferError:
            pass


# Decrypting threads: one per 64 MiB of plaintext, at most one per core (and
# 8). Measured on this project's 2-vCPU VM (stop 34, fresh processes under
# mlockall, medians of 5): into fresh memory a second thread cost more than it
# saved at 16 MB (12.3 against 10.4 ms), tied at 64 MB (pages mapped in as
# below: 33.4 against 31.9 ms) and paid at 500 MB (148 against 217 ms), so
# the second one starts at 128 MiB:
# starting a thread and waking an idle core is dear here, and below ~60 ms of
# work it is not won back.
_THREAD_BYTES = 64 << 20
MADV_POPULATE_WRITE = 23  # Linux 5.14+: map a range in writable, without touching it


def _decrypt_threads(plaintext_size: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8, plaintext_size // _THREAD_BYTES))


@functools.cache
def _madvise() -> Any:
    """libc's ``madvise``, called without the GIL (ctypes drops it), so two
    decrypting threads map their pages in at once."""
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _prefaulter(buf: Any) -> Callable[[int, int], None] | None:
    """For a :func:`secret_buffer` mapping: a function that maps the pages of
    ``buf[lo:hi]`` in with one ``madvise(MADV_POPULATE_WRITE)`` before the
    decryption writes them; None for anything else. The kernel then faults
    the range in one loop instead of one trap per 4 KiB page from inside
    the cipher: 16 MB decrypted into fresh memory in 9.0 against 11.2 ms,
    500 MB in 148 against 182 ms (stop 34, medians of 5 fresh processes).
    Pages already there are left as they are (it never zeroes), so ranges
    of two threads may overlap. Where the kernel has no such advice (before
    5.14: EINVAL) it stops asking and the writes fault the pages in."""
    import mmap

    if not isinstance(buf, mmap.mmap):
        return None
    try:
        madvise = _madvise()
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except (OSError, AttributeError, TypeError, ValueError):
        return None
    page, size = mmap.PAGESIZE, len(buf)
    refused = False

    def populate(lo: int, hi: int) -> None:
        nonlocal refused
        if refused:
            return
        lo = lo // page * page
        hi = -(-min(hi, size) // page) * page  # the mapping runs to its page's end
        if hi > lo and madvise(base + lo, hi - lo, MADV_POPULATE_WRITE) != 0:
            refused = True

    return populate


def decrypt_chunk(
    key: Any, prefix: bytes, aad: bytes, index: int, n_chunks: int, piece: Any, out: Any
) -> int:
    """Decrypt STREAM chunk ``index`` of ``n_chunks``: ``piece`` is its
    ciphertext and tag, ``out`` takes the plaintext and must have 15 spare
    bytes past it (``update_into``'s rule). IntegrityError when it does not
    authenticate; ``out`` then holds unauthenticated bytes the caller wipes.
    Returns the plaintext length."""
    size = len(piece) - TAG_SIZE
    if size < 0:
        raise IntegrityError()
    dec = Cipher(
        algorithms.AES(key),
        modes.GCM(_nonce(prefix, index, index == n_chunks - 1), bytes(piece[size:])),
    ).decryptor()
    dec.authenticate_additional_data(aad)
    if size:
        dec.update_into(piece[:size], out)
    try:
        dec.finalize()
    except InvalidTag as exc:
        raise IntegrityError() from exc
    return size


def stream_decrypt_into(
    key: bytes | bytearray,
    prefix: bytes,
    aad: bytes,
    ciphertext: bytes | bytearray | memoryview,
    out: Any,
    *,
    plaintext_size: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    threads: int | None = None,
    consumed: Callable[[int, int], None] | None = None,
) -> None:
    """Decrypt into ``out`` (exactly the plaintext size, plus 15 spare bytes
    allowed). Chunks are independent (each its own nonce and tag), so
    contiguous runs of them decrypt in parallel threads (``threads``; default:
    one per 64 MiB of plaintext, at most one per core and 8; a real speed-up
    where ``cryptography`` drops the GIL in ``update_into``, as 50.x does).
    Into a :func:`secret_buffer` mapping, each chunk's pages are mapped in
    just before it is decrypted (:func:`_prefaulter`). On any failure the whole buffer is wiped and one
    IntegrityError raised: nothing decrypted is left behind. ``consumed(lo,
    hi)`` is told of ciphertext byte ranges as each thread finishes them (every
    4 chunks), so a mapped file's pages can leave the resident set."""
    ct = memoryview(ciphertext).cast("B")
    dst = memoryview(out).cast("B")
    if len(prefix) != NONCE_PREFIX_SIZE or len(key) != KEY_SIZE:
        raise IntegrityError()
    plain_size = plaintext_size
    n = chunk_count(plain_size, chunk_size)
    if plain_size < 0 or chunk_size <= 0 or ciphertext_size(plain_size, chunk_size) != len(ct):
        raise IntegrityError()
    if len(dst) < plain_size:
        raise ConfigError("output buffer too small")
    k = bytes(key)
    failed: list[BaseException] = []
    populate = _prefaulter(out)

    def run(first: int, last: int) -> None:
        # update_into wants 15 spare bytes past each piece; where the next
        # piece (or the buffer's end) leaves none, a small scratch buffer does.
        step = chunk_size + TAG_SIZE
        done = first
        try:
            for i in range(first, last):
                if failed:
                    return
                if consumed is not None and i - done >= 4:
                    consumed(done * step, i * step)
                    done = i
                pos_out = i * chunk_size
                pos_in = i * (chunk_size + TAG_SIZE)
                size = min(chunk_size, plain_size - pos_out)
                piece = ct[pos_in : pos_in + size + TAG_SIZE]
                if populate is not None:
                    populate(pos_out, pos_out + size)
                if pos_out + size + 15 <= len(dst) and (i < last - 1 or last == n):
                    decrypt_chunk(k, prefix, aad, i, n, piece, dst[pos_out : pos_out + size + 15])
                else:  # the buffer's end, or a run's last chunk (the spare bytes are
                    # the next run's, written by another thread): a scratch buffer
                    scratch = bytearray(size + 15)
                    decrypt_chunk(k, prefix, aad, i, n, piece, scratch)
                    dst[pos_out : pos_out + size] = memoryview(scratch)[:size]
                    zeroize(scratch)
            if consumed is not None:
                consumed(done * step, min(last * step, len(ct)))
        except BaseException as exc:  # a bad tag, or anything else: never a silent gap
            failed.append(exc)

    workers = threads if threads is not None else _decrypt_threads(plain_size)
    workers = max(1, min(workers, n))
    bounds = [n * j // workers for j in range(workers + 1)]
    if workers == 1:
        run(0, n)
    else:
        import threading

        pool = [
            threading.Thread(target=run, args=(bounds[j], bounds[j + 1]), name="vault-decrypt")
            for j in range(workers)
        ]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    if failed:
        zeroize(dst)
        if not isinstance(failed[0], (InvalidTag, ValueError)):
            raise failed[0]  # not the package's fault (memory, a callback): as it is
        raise IntegrityError() from failed[0]


# --- Ed25519 publisher keys --------------------------------------------------


def fingerprint(public_raw: bytes) -> str:
    """``sha256:`` + hex of the raw 32-byte public key."""
    return "sha256:" + hashlib.sha256(public_raw).hexdigest()


class PublisherKey:
    """A publisher's Ed25519 signing key. Refuses pickling; no secret in repr."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._key = private

    @classmethod
    def generate(cls) -> PublisherKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PublisherKey:
        data = read_secret_file(path, limit=64 << 10, what="private signing key")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except ValueError as exc:
            raise ConfigError(f"{os.fspath(path)}: not a PEM Ed25519 private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{os.fspath(path)}: not an Ed25519 key")
        return cls(key)

    def save(self, path: str | os.PathLike[str], public_path: str | os.PathLike[str]) -> None:
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private_file(path, pem)
        with open(public_path, "wb") as fh:
            fh.write(self.public_pem())

    @property
    def public_raw(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def public_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_raw)

    def sign(self, *parts: bytes | bytearray | memoryview) -> bytes:
        return self._key.sign(b"".join(bytes(p) for p in parts))

    @classmethod
    def from_private_raw(cls, raw: bytes | bytearray) -> PublisherKey:
        """The key from its raw 32-byte seed (a licence file keeps its
        proof-of-possession key this way)."""
        try:
            return cls(Ed25519PrivateKey.from_private_bytes(bytes(raw)))
        except ValueError as exc:
            raise ConfigError("not a raw Ed25519 private key") from exc

    def export_private_raw(self) -> bytes:
        """The raw 32-byte seed: secret material, for writing a licence file only."""
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        return f"PublisherKey({self.fingerprint})"

    def __reduce__(self) -> Any:
        raise TypeError("PublisherKey holds a secret and cannot be pickled")


def load_public_key(data: bytes | str) -> bytes:
    """Raw 32-byte Ed25519 public key from PEM, base64 or raw bytes."""
    if isinstance(data, str):
        data = data.encode()
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise ConfigError("not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError("not an Ed25519 public key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if len(data) == 32:
        return bytes(data)
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except ValueError as exc:
        raise ConfigError("not an Ed25519 public key") from exc
    if len(raw) != 32:
        raise ConfigError("not an Ed25519 public key")
    return raw


def verify_signature(public_raw: bytes, signature: bytes, *parts: bytes | memoryview) -> None:
    """Raise IntegrityError unless ``signature`` is valid over ``parts``."""
    try:
        key = Ed25519PublicKey.from_public_bytes(public_raw)
        # Ed25519 needs the whole message; join once (signature covers manifest
        # and ciphertext, hashed inside OpenSSL).
        key.verify(signature, b"".join(bytes(p) for p in parts) if len(parts) != 1 else parts[0])
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise IntegrityError() from exc


# --- HPKE key release -------------------------------------------------------

HPKE_SUITES = ("x25519", "mlkem768-x25519")


def _suite(name: str) -> Any:
    if name == "x25519":
        kem = hpke.KEM.X25519
    elif name == "mlkem768-x25519":
        if not hasattr(hpke, "MLKEM768X25519PrivateKey"):
            raise ConfigError("this cryptography build lacks ML-KEM-768 + X25519 HPKE")
        kem = hpke.KEM.MLKEM768_X25519
    else:
        raise ConfigError(f"unknown HPKE suite {name!r}; choose one of {HPKE_SUITES}")
    return hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


class EphemeralKey:
    """A one-shot HPKE recipient key pair, made fresh for each key request."""

    def __init__(self, suite: str = "x25519") -> None:
        self.suite = suite
        self._suite = _suite(suite)
        if suite == "x25519":
            self._private: Any = x25519.X25519PrivateKey.generate()
            self.public_bytes = self._private.public_key().public_bytes_raw()
        else:
            from cryptography.hazmat.primitives.asymmetric import mlkem

            mk = mlkem.MLKEM768PrivateKey.generate()
            xk = x25519.X25519PrivateKey.generate()
            self._private = hpke.MLKEM768X25519PrivateKey(mk, xk)
            self.public_bytes = (
                mk.public_key().public_bytes_raw() + xk.public_key().public_bytes_raw()
            )

    def open(self, sealed: bytes, info: bytes) -> bytearray:
        try:
            return bytearray(self._suite.decrypt(sealed, self._private, info=info))
        except Exception as exc:  # cryptography raises several types here
            raise IntegrityError() from exc
        finally:
            self._private = None  # one use only

    def __reduce__(self) -> Any:
        raise TypeError("EphemeralKey holds a secret and cannot be pickled")

    def __repr__(self) -> str:
        return f"EphemeralKey({self.suite})"


def hpke_seal(
    suite: str, recipient_public: bytes, plaintext: bytes | bytearray, info: bytes
) -> bytes:
    """Seal ``plaintext`` to a recipient's public key (base mode, RFC 9180)."""
    s = _suite(suite)
    try:
        if suite == "x25519":
            pub: Any = x25519.X25519PublicKey.from_public_bytes(recipient_public)
        else:
            from cryptography.hazmat.primitives.asymmetric import mlkem

            if len(recipient_public) != 1184 + 32:
                raise ValueError("bad hybrid public key length")
            pub = hpke.MLKEM768X25519PublicKey(
                mlkem.MLKEM768PublicKey.from_public_bytes(recipient_public[:1184]),
                x25519.X25519PublicKey.from_public_bytes(recipient_public[1184:]),
            )
    except ValueError as exc:
        raise ConfigError("malformed HPKE public key") from exc
    return bytes(s.encrypt(bytes(plaintext), pub, info=info))


def key_release_info(
    model_id: str, package_digest: str, licence_id: str, device_id: str = ""
) -> bytes:
    """The HPKE ``info`` string binding a released key to its context: the
    model, the package, the licence and the device that asked ("" for a
    same-user licence, which has no device)."""
    return b"vault-key-release/v2\x00" + b"\x00".join(
        s.encode() for s in (model_id, package_digest, licence_id, device_id)
    )


def licence_proof_message(
    *,
    licence_id: str,
    device_id: str,
    model_id: str,
    key_id: str,
    package_digest: str,
    nonce: bytes,
    ts: float,
    client_key: str = "",
) -> bytes:
    """What a licence holder signs to prove, at this moment, that it holds the
    licence's secret key: the request it authorises, for one device, with a
    fresh nonce and time (the key server refuses a replay), and the CURVE
    public key (Z85) of the caller the worker will answer: a relay that puts
    its own key in the open gets a proof that does not verify. ``client_key``
    is "" only where no caller is answered over CURVE (a worker service's own
    workers, whose sockets are private to it)."""
    parts = (licence_id, device_id, model_id, key_id, package_digest, nonce.hex(),
             repr(float(ts)), client_key)  # fmt: skip
    return b"vault-licence-proof/v2\x00" + b"\x00".join(p.encode() for p in parts)


# --- master-key wrapping ------------------------------------------------------


def _wrap_aad(key_id: str, model_id: str) -> bytes:
    return b"vault-key-wrap/v1\x00" + key_id.encode() + b"\x00" + model_id.encode()


def wrap_key(
    master: bytes | bytearray, key: bytes | bytearray, *, key_id: str, model_id: str
) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(bytes(master)).encrypt(nonce, bytes(key), _wrap_aad(key_id, model_id))


def unwrap_key(
    master: bytes | bytearray, wrapped: bytes, *, key_id: str, model_id: str
) -> bytearray:
    try:
        return bytearray(
            AESGCM(bytes(master)).decrypt(wrapped[:12], wrapped[12:], _wrap_aad(key_id, model_id))
        )
    except (InvalidTag, ValueError) as exc:
        raise IntegrityError("wrapped key failed to authenticate") from exc
