"""The sealed package format (``.vault``): the one module that writes it
(:func:`write_package`) and reads, verifies and decrypts it (:class:`Package`).

Layout (all integers big-endian)::

    0   magic     8  b"\\x89VAULT\\r\\n"  (PNG-style: catches text-mode mangling)
    8   version   2  FORMAT_VERSION
    10  reserved  2  0
    12  mlen      4  manifest length
    16  manifest  mlen  canonical JSON, public (model id, key id, signature of
                        the pipeline, payload layout; nothing of the graph)
    ..  payload   manifest.payload.ciphertext_size  (STREAM AES-256-GCM chunks)
    ..  signature 64  Ed25519 over SIG_CONTEXT || header || manifest || D

where ``D = SHA-256(SHA-256(chunk_0) || ... || SHA-256(chunk_n))`` over the
ciphertext chunks: the chunk hashes run on every core (hashlib drops the GIL),
so verifying a 500 MB package costs a fraction of a second, and it binds every
ciphertext byte as a flat hash would.

Failure rules: a path that is not a regular file (a FIFO, ``/dev/zero``, a
directory), a file with holes (a sparse file: ciphertext never has any) or a
file that does not start with the magic is a
:class:`~vault.core.errors.FormatError`; a newer version is an
:class:`~vault.core.errors.UnsupportedVersionError`; anything after that (damaged
manifest, a chunk size outside ``[MIN_CHUNK_SIZE, MAX_CHUNK_SIZE]``, sizes that
disagree with each other or with the file's, bad signature, wrong key,
reordered or truncated chunks) is one opaque
:class:`~vault.core.errors.IntegrityError`.

What reading a package may cost is bounded by the file before anything is
allocated: the header and manifest (at most 1 MiB) are read with bounded
reads (:func:`read_header`, what ``vault inspect`` and the daemon use), every
size the manifest claims is checked against the file's own size and the chunk
bounds, and the chunk hashes are folded into one running hash, so memory does
not grow with the chunk count (a 4 KiB sparse file claiming 30 million 1-byte
chunks once made a worker allocate 7 GB).

Decrypted payload (lives only in the worker's memory)::

    u32 index length | index JSON | blobs (64-byte aligned)

The index lists the stage graphs (ONNX ``ModelProto`` bytes, weights
externalised) and the weight "files" their external-data references name, so
onnxruntime takes the weights straight from memory.

Example::

    pkg = Package.load("model.vault")
    pkg.verify(publisher_raw_key)
    plain = pkg.decrypt(key)        # in memory only
    try:
        graphs, files = plain.graphs, plain.files
    finally:
        plain.wipe()
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
import stat
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import crypto as _crypto
from .errors import ConfigError, FormatError, IntegrityError, UnsupportedVersionError
from .files import open_regular

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "Header",
    "Package",
    "Plaintext",
    "canonical_json",
    "inspect",
    "memory_limit",
    "package_digest",
    "read_header",
    "signed_message",
    "write_package",
]

MAGIC = b"\x89VAULT\r\n"
FORMAT_VERSION = 1
HEADER = struct.Struct(">8sHHI")
SIG_SIZE = 64
SIG_CONTEXT = b"vault-package-signature/v1\x00"
MAX_MANIFEST = 1 << 20
ALIGN = 64
# Chunk bounds, checked before anything is allocated: a chunk of at least
# 1 KiB keeps the per-chunk work (a hash, a cipher context) small against the
# bytes it covers; 64 MiB bounds the scratch a chunk may need. `vault seal`
# writes 1 MiB chunks.
MIN_CHUNK_SIZE = 1 << 10
MAX_CHUNK_SIZE = 64 << 20
MAX_CHUNKS = 1 << 32  # the STREAM nonce's counter
# A worker's memory limit (RLIMIT_DATA) from the package's declared plaintext
# size: the decrypted buffer, onnxruntime's own copies (pre-packed and folded
# weights, graph protobufs) and request buffers within PLAINTEXT_FACTOR x the
# plaintext, plus the headroom (interpreter, onnxruntime, thread stacks and
# malloc arenas: 165 MB of VmData measured for a small model's worker with 8
# threads on 2 cores).
PLAINTEXT_FACTOR = 4
HEADROOM_BASE = 1 << 30
HEADROOM_PER_CPU = 64 << 20


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a manifest: sorted keys, no spaces, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def payload_aad(header: bytes, manifest: bytes) -> bytes:
    """Associated data bound into every chunk: header and manifest."""
    return _crypto.sha256(b"vault-payload-aad/v1\x00", header, manifest)


def chunk_hashes_digest(
    ciphertext: Any,
    chunk_size: int,
    *,
    threads: int | None = None,
    consumed: Callable[[int, int], None] | None = None,
) -> bytes:
    """D: SHA-256 over the per-chunk SHA-256s of the ciphertext (each chunk is
    ``chunk_size + 16`` bytes with its tag). Slices of ~16 MiB are hashed in
    parallel threads (hashlib drops the GIL) and folded, in order, into one
    running hash with a few slices in flight: memory stays flat whatever the
    chunk count. ``consumed(lo, hi)`` is told of byte ranges as they are
    hashed (a few MiB at a time)."""
    view = memoryview(ciphertext).cast("B")
    step = chunk_size + _crypto.TAG_SIZE
    total = len(view)
    n = len(range(0, max(total, 1), step))  # an empty payload still hashes one chunk
    per_job = max(1, (16 << 20) // step)

    def job(first: int) -> bytes:
        last = min(n, first + per_job)
        out = bytearray()
        for i in range(first, last):
            s = i * step
            out += _crypto.sha256(view[s : s + step])
            if consumed is not None and (i - first) % 4 == 3:  # a few MiB resident at a time
                consumed(s - 3 * step, min(total, s + step))
        if consumed is not None:
            consumed(first * step, min(total, last * step))
        return bytes(out)

    outer = hashlib.sha256()
    jobs = range(0, n, per_job)
    workers = threads or min(4, os.cpu_count() or 1)
    if len(jobs) <= 1 or workers <= 1:
        for first in jobs:
            outer.update(job(first))
        return outer.digest()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        todo = iter(jobs)
        pending = deque(pool.submit(job, first) for first in itertools.islice(todo, 2 * workers))
        while pending:
            outer.update(pending.popleft().result())
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(job, nxt))
    return outer.digest()


def signed_message(header: bytes, manifest: bytes, chunk_digest: bytes) -> bytes:
    """What the publisher signs: context, header, manifest and the chunk-hash digest D."""
    return SIG_CONTEXT + header + manifest + chunk_digest


def package_digest(signed: bytes, signature: bytes) -> str:
    """``sha256:<hex>`` naming one exact package (what the key server binds)."""
    return "sha256:" + _crypto.sha256(signed, signature).hex()


def write_package(
    output: str | os.PathLike[str],
    manifest: dict[str, Any],
    plaintext: bytearray,
    key: bytes | bytearray,
    sign: Any,
    *,
    chunk_size: int,
    progress: Any = None,
) -> str:
    """Encrypt ``plaintext`` (overwritten afterwards) under ``key``, sign with
    ``sign(message) -> signature`` and write the package atomically.

    Fills ``manifest["payload"]`` (cipher, chunking, nonce prefix, sizes) and
    returns the package digest. The only writer of the format; :class:`Package`
    is its only reader.
    """
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ConfigError(f"chunk_size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes")
    prefix = _crypto.random_bytes(_crypto.NONCE_PREFIX_SIZE)
    manifest["payload"] = {
        "cipher": "AES-256-GCM-STREAM/1",
        "chunk_size": chunk_size,
        "nonce_prefix": prefix.hex(),
        "plaintext_size": len(plaintext),
        "ciphertext_size": _crypto.ciphertext_size(len(plaintext), chunk_size),
        "signature": "ed25519(chunked-sha256)",
    }
    manifest_bytes = canonical_json(manifest)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(manifest_bytes))
    total = len(plaintext)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    try:
        ciphertext = _crypto.stream_encrypt(
            key, prefix, payload_aad(header, manifest_bytes), plaintext,
            chunk_size=chunk_size, progress=tick,
        )  # fmt: skip
    finally:
        _crypto.zeroize(plaintext)
    signed = signed_message(header, manifest_bytes, chunk_hashes_digest(ciphertext, chunk_size))
    signature = sign(signed)
    out = os.fspath(output)
    tmp = f"{out}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(header)
            fh.write(manifest_bytes)
            fh.write(ciphertext)
            fh.write(signature)
        os.replace(tmp, out)
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return package_digest(signed, signature)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Plaintext:
    """The decrypted payload: one buffer, views into it, and ``wipe()``."""

    def __init__(self, buf: Any, index: dict[str, Any], *, size: int | None = None) -> None:
        self._buf = buf
        self._size = len(buf) if size is None else size
        self._view = memoryview(buf)
        self.index = index
        self.graphs: list[memoryview] = [
            self._view[g["offset"] : g["offset"] + g["length"]] for g in index["graphs"]
        ]
        self.stages: list[str] = [str(g.get("stage", "pipeline")) for g in index["graphs"]]
        self.files: dict[str, memoryview] = {
            f["location"]: self._view[f["offset"] : f["offset"] + f["length"]]
            for f in index["files"]
        }

    @property
    def nbytes(self) -> int:
        return self._size

    def wipe(self) -> None:
        """Overwrite the plaintext; views stay valid but read zeros."""
        if self._buf is not None:
            _crypto.zeroize(self._buf)

    def wipe_graphs(self) -> None:
        """Overwrite the index and the graphs (the architecture), keeping the
        weight files: for a reader that uses the weights in place."""
        if self._buf is None:
            return
        first = min([f["offset"] for f in self.index["files"]], default=len(self._buf))
        _crypto.zeroize(self._view[:first])  # the index header and alignment padding
        for g in self.graphs:
            _crypto.zeroize(g)
            g.release()
        self.graphs = []

    def release(self) -> None:
        """Wipe, then drop every view so the buffer can be freed."""
        self.wipe()
        for v in self.graphs:
            v.release()
        for v in self.files.values():
            v.release()
        self.graphs = []
        self.files = {}
        self._view.release()
        buf, self._buf = self._buf, None
        _crypto.release_buffer(buf)  # an mmap'd buffer is unmapped now

    def __enter__(self) -> Plaintext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Plaintext({len(self.graphs)} graphs, {len(self.files)} files)"

    def __reduce__(self) -> Any:
        raise TypeError("Plaintext cannot be pickled")


def build_plaintext(graphs: list[tuple[str, bytes]], files: list[tuple[str, Any]]) -> bytearray:
    """Lay out stage graphs and weight files into one buffer (seal side)."""
    entries_g: list[dict[str, Any]] = []
    entries_f: list[dict[str, Any]] = []
    # index size depends on offsets: compute with a fixed-width placeholder pass
    sizes = [len(b) for _, b in graphs] + [len(memoryview(b).cast("B")) for _, b in files]
    names = [("g", s) for s, _ in graphs] + [("f", loc) for loc, _ in files]
    guess = 4096 + 128 * len(names)
    while True:
        off = _align(4 + guess)
        entries_g, entries_f = [], []
        for (kind, name), size in zip(names, sizes):
            entry: dict[str, Any] = {"offset": off, "length": size}
            if kind == "g":
                entries_g.append({"stage": name, **entry})
            else:
                entries_f.append({"location": name, **entry})
            off = _align(off + size)
        index = canonical_json({"graphs": entries_g, "files": entries_f})
        if len(index) <= guess:
            break
        guess = len(index) * 2
    total = off
    buf = bytearray(total)
    struct.pack_into(">I", buf, 0, guess)
    buf[4 : 4 + len(index)] = index
    buf[4 + len(index) : 4 + guess] = b" " * (guess - len(index))
    view = memoryview(buf)
    for entry, (_, data) in zip(entries_g + entries_f, list(graphs) + list(files)):
        src = memoryview(data).cast("B")
        view[entry["offset"] : entry["offset"] + entry["length"]] = src
    return buf


def _parse_index(buf: bytearray) -> dict[str, Any]:
    try:
        (n,) = struct.unpack_from(">I", buf, 0)
        index = json.loads(bytes(buf[4 : 4 + n]))
        for g in index["graphs"]:
            if g["offset"] + g["length"] > len(buf):
                raise ValueError
        for f in index["files"]:
            if f["offset"] + f["length"] > len(buf):
                raise ValueError
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        # authenticated but unparseable: still reported opaquely
        raise IntegrityError() from exc
    return index  # type: ignore[no-any-return]


def _validate_manifest(m: Any) -> None:
    """Every field a reader relies on, with its type (ValueError otherwise)."""
    if not isinstance(m, dict):
        raise ValueError("manifest is not an object")
    for key in ("format", "model_id", "key_id", "created"):
        if not isinstance(m.get(key), str):
            raise ValueError(key)
    pub = m.get("publisher")
    if not isinstance(pub, dict) or not isinstance(pub.get("fingerprint"), str):
        raise ValueError("publisher")
    for key in ("inputs", "outputs", "stages", "split_points"):
        if not isinstance(m.get(key), list):
            raise ValueError(key)
    for t in m["inputs"] + m["outputs"]:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise ValueError("tensor")
        if not isinstance(t.get("dtype"), str) or not isinstance(
            t.get("shape"), (list, type(None))
        ):
            raise ValueError("tensor")
    if not isinstance(m.get("batchable", False), bool):
        raise ValueError("batchable")
    p = m.get("payload")
    if not isinstance(p, dict) or not isinstance(p.get("nonce_prefix"), str):
        raise ValueError("payload")
    for key in ("chunk_size", "plaintext_size", "ciphertext_size"):
        if not isinstance(p.get(key), int) or isinstance(p.get(key), bool):
            raise ValueError(key)


@dataclass(frozen=True)
class Header:
    """A package's header and public manifest, checked against the file's size
    (what :func:`read_header` returns and :class:`Package` maps behind)."""

    header: bytes
    manifest_bytes: bytes
    manifest: dict[str, Any]
    payload_start: int
    payload_end: int
    file_size: int

    @property
    def model_id(self) -> str:
        return str(self.manifest["model_id"])

    @property
    def key_id(self) -> str:
        return str(self.manifest["key_id"])

    @property
    def plaintext_size(self) -> int:
        return int(self.manifest["payload"]["plaintext_size"])

    @property
    def chunk_size(self) -> int:
        return int(self.manifest["payload"]["chunk_size"])


def _parse_header(head: Any, file_size: int, source: str) -> Header:
    """The header and manifest at the start of ``head`` (at least the header
    and manifest bytes of a file of ``file_size`` bytes), every size checked
    before anything is allocated."""
    v = memoryview(head).cast("B")
    if len(v) < HEADER.size or bytes(v[:8]) != MAGIC:
        raise FormatError(f"{source}: not a vault package (bad magic)")
    _magic, version, reserved, mlen = HEADER.unpack_from(v, 0)
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"{source}: package format version {version} is not supported "
            f"(this vault reads version {FORMAT_VERSION}); upgrade vault"
        )
    if reserved != 0 or mlen > MAX_MANIFEST or HEADER.size + mlen > min(len(v), file_size):
        raise IntegrityError()
    header = bytes(v[: HEADER.size])
    manifest_bytes = bytes(v[HEADER.size : HEADER.size + mlen])
    try:
        manifest = json.loads(manifest_bytes)
        if canonical_json(manifest) != manifest_bytes:
            raise ValueError("manifest is not canonical")
        _validate_manifest(manifest)
        payload = manifest["payload"]
        ct_size = int(payload["ciphertext_size"])
        pt_size = int(payload["plaintext_size"])
        chunk = int(payload["chunk_size"])
        prefix = bytes.fromhex(payload["nonce_prefix"])
    except (ValueError, KeyError, TypeError, RecursionError):
        # a deeply nested manifest included: one opaque error, no traceback
        raise IntegrityError() from None
    start = HEADER.size + mlen
    end = start + ct_size
    if (
        not MIN_CHUNK_SIZE <= chunk <= MAX_CHUNK_SIZE
        or pt_size < 0
        or len(prefix) != _crypto.NONCE_PREFIX_SIZE
        or end + SIG_SIZE != file_size  # truncated, extended, or a claim the file cannot hold
        or _crypto.chunk_count(pt_size, chunk) > MAX_CHUNKS
        or _crypto.ciphertext_size(pt_size, chunk) != ct_size
    ):
        raise IntegrityError()
    return Header(header, manifest_bytes, manifest, start, end, file_size)


def _check_dense(fd: int, size: int, source: str) -> None:
    """A package is ciphertext, which has no holes: a sparse file (its size
    claimed, its bytes never written) is refused before any byte is hashed."""
    try:
        hole = os.lseek(fd, 0, getattr(os, "SEEK_HOLE", 4))
    except OSError:  # a file system that cannot say: the other bounds still hold
        return
    if hole < size:
        raise FormatError(f"{source}: a sparse file (a hole at byte {hole}), not a vault package")


def read_header(fd: int, *, source: str = "<fd>") -> Header:
    """The header and manifest of the package open on ``fd`` (a regular file),
    with bounded reads (at most ``16 + MAX_MANIFEST`` bytes, nothing mapped):
    what ``vault inspect`` shows and what the local daemon checks before it
    starts a worker. The descriptor stays open; its offset is not used."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{source}: not a regular file, not a vault package")
    _check_dense(fd, st.st_size, source)
    head = os.pread(fd, HEADER.size, 0)
    if len(head) == HEADER.size and head[:8] == MAGIC:
        (mlen,) = struct.unpack_from(">I", head, 12)
        head += os.pread(fd, min(mlen, MAX_MANIFEST), HEADER.size)
    return _parse_header(head, st.st_size, source)


def memory_limit(plaintext_size: int, *, headroom: int | None = None) -> int:
    """The memory (``RLIMIT_DATA``, bytes) a worker of a package whose
    plaintext is ``plaintext_size`` bytes gets: ``PLAINTEXT_FACTOR`` times the
    plaintext plus ``headroom`` (default: 1 GiB + 64 MiB per CPU)."""
    if headroom is None:
        headroom = HEADROOM_BASE + HEADROOM_PER_CPU * (os.cpu_count() or 1)
    return headroom + PLAINTEXT_FACTOR * max(0, plaintext_size)


class Package:
    """A sealed package read from disk (memory-mapped, read-only)."""

    def __init__(self, data: Any, *, source: str = "<memory>", fd: int | None = None) -> None:
        self.source = source
        self._data = data
        self._fd = fd  # a descriptor of the mapped file (ours), for lazy weights
        self._view = (
            memoryview(data).cast("B") if not isinstance(data, mmap.mmap) else memoryview(data)
        )
        try:
            self._layout = _parse_header(self._view, len(self._view), source)
        except BaseException:
            self.close()
            raise
        self.manifest: dict[str, Any] = self._layout.manifest
        self._unlock()  # before any ciphertext page faults in
        self._digest: str | None = None
        self._chunk_digest: bytes | None = None

    # -- loading -------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Package:
        """Map the package at ``path``: a regular file only (a FIFO, a device or
        a directory is a :class:`~vault.core.errors.FormatError`, at once), and
        one without holes."""
        p = os.fspath(path)
        fd = open_regular(p, what="vault package", error=FormatError)
        try:
            data = cls._map(fd, p)
            own = os.dup(fd) if isinstance(data, mmap.mmap) else None
        finally:
            os.close(fd)
        return cls(data, source=p, fd=own)

    @classmethod
    def from_fd(cls, fd: int) -> Package:
        """Map the package from an open file descriptor (one the local daemon
        received from its caller: the caller's right to read the file is what
        opened it), then close the descriptor."""
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FormatError("package descriptor is not a regular file")
            data = cls._map(fd, "<fd>")
            own = os.dup(fd) if isinstance(data, mmap.mmap) else None
        except (OSError, ValueError) as exc:
            raise FormatError("package descriptor is not a readable file") from exc
        finally:
            os.close(fd)
        return cls(data, source="<fd>", fd=own)

    @staticmethod
    def _map(fd: int, source: str) -> Any:
        size = os.fstat(fd).st_size
        if size < HEADER.size:
            return os.pread(fd, HEADER.size, 0)
        _check_dense(fd, size, source)
        if os.pread(fd, len(MAGIC), 0) != MAGIC:  # a text file is not mapped
            raise FormatError(f"{source}: not a vault package (bad magic)")
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> Package:
        return cls(bytes(data))

    # -- public facts ----------------------------------------------------------

    @property
    def model_id(self) -> str:
        return str(self.manifest["model_id"])

    @property
    def key_id(self) -> str:
        return str(self.manifest["key_id"])

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return list(self.manifest["inputs"])

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return list(self.manifest["outputs"])

    @property
    def batchable(self) -> bool:
        """Whether the publisher declared dim 0 a batch of independent rows
        (``vault seal --batchable``; absent in older packages: False)."""
        return self.manifest.get("batchable") is True

    @property
    def publisher_fingerprint(self) -> str:
        return str(self.manifest["publisher"]["fingerprint"])

    @property
    def ciphertext(self) -> memoryview:
        return self._view[self._layout.payload_start : self._layout.payload_end]

    @property
    def signature(self) -> bytes:
        return bytes(self._view[self._layout.payload_end :])

    def name_parts(self) -> tuple[bytes, bytes, bytes]:
        """The header, manifest and signature: what, for a package whose
        signature holds, determines its :attr:`digest` without reading the
        payload (the signature covers the payload's chunk-hash digest, and
        one Ed25519 signature holds for one message only)."""
        return bytes(self._layout.header), bytes(self._layout.manifest_bytes), self.signature

    def _signed_message(self) -> bytes:
        if self._chunk_digest is None:
            self._chunk_digest = chunk_hashes_digest(
                self.ciphertext,
                int(self.manifest["payload"]["chunk_size"]),
                consumed=self._drop_ciphertext,
            )
        return signed_message(self._layout.header, self._layout.manifest_bytes, self._chunk_digest)

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` naming this exact package (what the key server binds)."""
        if self._digest is None:
            self._digest = package_digest(self._signed_message(), self.signature)
        return self._digest

    # -- checks ----------------------------------------------------------------

    def verify(self, publisher_key: bytes | str) -> None:
        """Check the Ed25519 signature; needs no secret. IntegrityError if bad.

        A package that names another publisher key than ``publisher_key`` says
        so, with both fingerprints (public: ``vault inspect`` shows the
        package's): sealed with one key server's publisher key and opened
        under another's is a mix-up to fix, not an attack to keep opaque.
        A package that names this key but fails its signature (tampered, or
        forged) gets the one opaque IntegrityError."""
        raw = _crypto.load_public_key(publisher_key)
        given = _crypto.fingerprint(raw)
        if given != self.publisher_fingerprint:
            raise IntegrityError(
                f"the package is not signed by this publisher key: it names publisher "
                f"{self.publisher_fingerprint}, the key given is {given}"
            )
        _crypto.verify_signature(raw, self.signature, self._signed_message())

    def decrypt(self, key: bytes | bytearray, *, lazy: bool = False) -> Plaintext:
        """Decrypt the payload into one fresh buffer (the only plaintext copy).

        ``lazy``: where this system allows it, the weights are decrypted when
        first read and can be given back once onnxruntime has packed them
        (:mod:`vault.core.lazyplain`); elsewhere, and for small payloads, the
        whole payload is decrypted now, as without it."""
        p = self.manifest["payload"]
        size = int(p["plaintext_size"])
        if lazy and self._fd is not None:
            from .lazyplain import decrypt_lazily

            plain = decrypt_lazily(
                os.dup(self._fd),
                self._layout.payload_start,
                key,
                bytes.fromhex(p["nonce_prefix"]),
                payload_aad(self._layout.header, self._layout.manifest_bytes),
                plaintext_size=size,
                chunk_size=int(p["chunk_size"]),
            )
            if plain is not None:
                return plain
        buf = _crypto.secret_buffer(size)
        _crypto.stream_decrypt_into(
            key,
            bytes.fromhex(p["nonce_prefix"]),
            payload_aad(self._layout.header, self._layout.manifest_bytes),
            self.ciphertext,
            buf,
            plaintext_size=size,
            chunk_size=int(p["chunk_size"]),
            consumed=self._drop_ciphertext,
        )
        try:
            index = _parse_index(buf)
        except BaseException:
            _crypto.zeroize(buf)
            _crypto.release_buffer(buf)
            raise
        return Plaintext(buf, index)

    def _unlock(self) -> None:
        """``munlock`` the mapping: under a worker's ``mlockall`` its pages
        would be locked as they fault in, and locked pages cannot be dropped.
        The ciphertext is not secret; only the plaintext needs locking."""
        if not isinstance(self._data, mmap.mmap):
            return
        try:
            import ctypes

            import numpy as np

            addr = np.frombuffer(self._data, np.uint8).ctypes.data
            libc = ctypes.CDLL(None, use_errno=True)
            libc.munlock(ctypes.c_void_p(addr), ctypes.c_size_t(len(self._data)))
        except (OSError, ValueError, AttributeError, ImportError):  # advice only
            pass

    def _drop_ciphertext(self, lo: int, hi: int) -> None:
        """Ciphertext bytes ``[lo, hi)`` are read: let their pages leave this
        process's resident set (they stay in the page cache), so hashing and
        decrypting a 500 MB package never holds it and the plaintext at once."""
        if not isinstance(self._data, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = self._layout.payload_start + lo
        end = self._layout.payload_start + hi
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the range
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last <= first:
            return
        try:
            self._data.madvise(mmap.MADV_DONTNEED, first, last - first)
        except (OSError, ValueError):  # advice only; a locked page refuses it
            pass

    def drop_resident_pages(self) -> None:
        """Tell the kernel this process no longer needs the mapped file's pages:
        they stay in the page cache but leave our resident set, so ciphertext
        does not add to the worker's peak memory. A worker under ``mlockall``
        unlocks the range first (``MADV_DONTNEED`` refuses locked pages; the
        ciphertext is not secret, so it need not be locked)."""
        if not isinstance(self._data, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
            return
        self._unlock()
        try:
            self._data.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # advice only: never fatal
            pass

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)
        try:
            self._view.release()
            if isinstance(self._data, mmap.mmap):
                self._data.close()
        except BufferError:  # a caller still holds a view: the GC closes it later
            pass

    def __enter__(self) -> Package:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Package({self.source!r}, model_id={self.manifest.get('model_id')!r})"


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The public manifest of a package; needs no key. Bounded reads of the
    header and manifest only (the payload is neither read nor mapped)."""
    p = os.fspath(path)
    fd = open_regular(p, what="vault package", error=FormatError)
    try:
        return dict(read_header(fd, source=p).manifest)
    finally:
        os.close(fd)
