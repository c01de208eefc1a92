"""Weights decrypted when onnxruntime first reads them, and given back after.

Why. The worker lends the decrypted weights to onnxruntime in place
(``worker/initializers.py``). With prepacking on (the default: MatMul and
Gemm run up to 3x faster), onnxruntime copies each packed weight into its
kernel's layout and never reads the original again; plain onnxruntime frees
that original, but ours is the caller's memory, so the worker held two
copies of every packed weight (peak 1.69x plain onnxruntime at 500 MB).
onnxruntime does not say which initializers it packed, and freeing the pages
of one it still reads would silently compute with zeros.

How. The weight part of the plaintext is an anonymous mapping registered
with ``userfaultfd(2)`` (``UFFD_USER_MODE_ONLY``: no privilege needed, kernel
5.11 or later). Nothing is decrypted into it up front. A thread of this
process answers each missing-page fault by decrypting the block the page
lies in (whole STREAM chunks, each authenticated by its GCM tag, read from
the package file with ``pread``) and copying it in (``UFFDIO_COPY``). While
the sessions are built only a bounded set of blocks stays resident (the
oldest filled are dropped with ``MADV_DONTNEED``; a block read again doubles
the bound), so a build never holds the packed copies and all the originals at
once. :meth:`LazyPlaintext.settle`, once the sessions exist, drops every
block the build read and decrypts the ones it never read. A block that a
session still reads after that is decrypted again on its first read and
stays. Correctness does not depend on guessing what onnxruntime packed: any
read of a dropped page is a fault, and a fault is answered with the
authenticated plaintext.

Failure. A block that cannot be decrypted again (the package file was
truncated or changed after it was opened) is answered with zero pages so no
thread hangs, and the plaintext is marked ``failed``: the pipeline checks
that after every run and refuses the result (and every later call) with an
IntegrityError, and :meth:`settle` raises it during start-up.

Limits. Linux on x86_64 or aarch64, a chunk size that is a whole number of
pages, a package read from a file. Elsewhere :func:`decrypt_lazily` returns
None and the caller decrypts everything up front, as before. The CUDA
provider is not given lazy weights (its copies to the device have not been
tried with a fault handler behind them). The mapping is ``MADV_DONTFORK``: a
forked child gets no mapping at all rather than an unregistered one that
reads zeros.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import queue
import select
import struct
import sys
import threading
import time
from typing import Any

from . import crypto as _crypto
from .errors import IntegrityError
from .package import Plaintext, _parse_index

__all__ = ["LazyPlaintext", "decrypt_lazily", "supported"]

PAGE = mmap.PAGESIZE
BLOCK_BYTES = 2 << 20  # what one fault decrypts (whole chunks, at least one)
BUILD_BUDGET = 16 << 20  # blocks kept resident while sessions are built (grows on re-reads)
LAZY_MIN_BYTES = 16 << 20  # below this the whole plaintext is decrypted up front
READ_AHEAD = 2  # blocks decrypted on a second thread after a fault during the build

_SYSCALL = {"x86_64": 323, "aarch64": 282}
_UFFD_USER_MODE_ONLY = 1
_UFFD_API = 0xAA


def _iowr(nr: int, size: int, read_only: bool = False) -> int:
    return ((2 if read_only else 3) << 30) | (size << 16) | (0xAA << 8) | nr


_UFFDIO_API = _iowr(0x3F, 24)
_UFFDIO_REGISTER = _iowr(0x00, 32)
_UFFDIO_UNREGISTER = _iowr(0x01, 16, read_only=True)
_UFFDIO_WAKE = _iowr(0x02, 16, read_only=True)
_UFFDIO_COPY = _iowr(0x03, 40)
_UFFDIO_ZEROPAGE = _iowr(0x04, 32)
_MODE_MISSING = 1
_EVENT_PAGEFAULT = 0x12
_MSG_SIZE = 32
_MADV_DONTNEED = 4
_MADV_DONTNEED_LOCKED = 24  # Linux 5.18: also drops pages an mlockall locked
_MADV_DONTFORK = 10
_MADV_NOHUGEPAGE = 15
_MADV_DONTDUMP = 16


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Api(ctypes.Structure):
    _fields_ = [
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64),
    ]  # fmt: skip


class _Zero(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


_libc: Any = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        lib.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc = lib
    return _libc


def _present(addr: int, n: int) -> bool:
    """Whether any page of ``[addr, addr + n)`` is in memory (``mincore``)."""
    pages = -(-n // PAGE)
    vec = (ctypes.c_ubyte * pages)()
    if _lib().mincore(ctypes.c_void_p(addr), ctypes.c_size_t(n), vec) != 0:
        return True  # cannot tell: assume the worst
    # bit 0 of each byte says "resident": tested all at once, not byte by byte
    # (a 16 MB range is 4,096 bytes: ~1 ms a byte at a time in Python)
    return int.from_bytes(bytes(vec), "little") & int.from_bytes(b"\x01" * pages, "little") != 0


def _open_uffd() -> int | None:
    """A userfaultfd for user-mode faults, or None where the kernel gives none."""
    nr = _SYSCALL.get(platform.machine())
    if not sys.platform.startswith("linux") or nr is None:
        return None
    lib = _lib()
    fd = lib.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY)
    if fd < 0:
        return None
    api = _Api(_UFFD_API, 0, 0)
    if lib.ioctl(fd, _UFFDIO_API, ctypes.byref(api)) != 0:
        os.close(fd)
        return None
    return int(fd)


# Decrypting buffers made ahead (:func:`keep_buffers`), taken by
# :meth:`_Source.buffers` when their sizes fit; a pair's plaintext buffer
# holds zeros whenever it is in here (its other one, ciphertext, is no secret).
_SPARE: list[tuple[bytearray, bytearray]] = []
_SPARE_LOCK = threading.Lock()


def _block_for(chunk_size: int) -> int:
    return max(chunk_size, BLOCK_BYTES // chunk_size * chunk_size)


def keep_buffers(count: int = 2, chunk_size: int = _crypto.DEFAULT_CHUNK_SIZE) -> None:
    """For a pre-started worker while it waits for its package: the buffers
    of the fault handler and the read-ahead thread (a block's plaintext and a
    chunk's ciphertext each, 3 MiB a pair), made and written now, so that an
    open does not fault their pages in. On this project's VM a fresh page
    costs about 2.5 us (the up-front part's 2 MiB of buffers: 1.3 ms); a 16
    MB package's decryption through a pre-started worker took 6.1 against
    16.4 ms with the buffers made ahead (stop 34, alternating A/B, together
    with :meth:`LazyPlaintext.settle` making buffers only for blocks left)."""
    block = _block_for(chunk_size)
    for _ in range(count):
        pair = (bytearray(block + 16), bytearray(chunk_size + _crypto.TAG_SIZE))
        for b in pair:
            _crypto.zeroize(b)  # a memset: every page in now
        with _SPARE_LOCK:
            _SPARE.append(pair)


def forget_buffers() -> None:
    """Free the buffers :func:`keep_buffers` made that no one took (a package
    decrypted up front uses none)."""
    with _SPARE_LOCK:
        _SPARE.clear()


def _give_back(pair: tuple[bytearray, bytearray]) -> None:
    """Put a pair whose plaintext buffer was wiped back for the next user."""
    with _SPARE_LOCK:
        _SPARE.append(pair)


def supported() -> bool:
    """Whether this process can have lazy weights (a userfaultfd opens)."""
    fd = _open_uffd()
    if fd is None:
        return False
    os.close(fd)
    return True


class LazyPlaintext(Plaintext):
    """A :class:`~vault.core.package.Plaintext` whose weight blocks are
    decrypted on first read (see the module's text). Made by
    :func:`decrypt_lazily`; the same views and ``wipe``/``release`` as an
    eager one, plus :meth:`settle`, ``failed`` and :meth:`stats`."""

    def __init__(
        self, buf: mmap.mmap, size: int, index: dict[str, Any], *, uffd: int, lazy_from: int,
        block: int, source: _Source,
    ) -> None:  # fmt: skip
        super().__init__(buf, index, size=size)
        self._uffd = uffd
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        self._lazy_from = lazy_from
        self._block = block
        self._span = len(buf) - lazy_from  # whole pages, registered
        self._blocks = -(-self._span // block)
        self._src = source
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._resident: dict[int, int] = {}  # block -> fill order
        self._filling: set[int] = set()  # claimed by a thread that is decrypting it
        self._filled: set[int] = set()  # every block decrypted at least once
        self._built: set[int] = set()  # blocks filled while the sessions were built
        self._order = 0
        self._budget = BUILD_BUDGET
        self._building = True
        self._dont_need = _MADV_DONTNEED_LOCKED
        self.faults = 0
        self.refills = 0
        self._decrypt_s = 0.0  # decrypting and copying blocks in, all told
        self._decrypted = 0
        self.failed: str | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._ahead: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name="vault-weights", daemon=True),
            threading.Thread(target=self._read_ahead, name="vault-weights-ahead", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- the fault handler --------------------------------------------------------

    def _serve(self) -> None:
        poll = select.poll()
        poll.register(self._uffd, select.POLLIN)
        poll.register(self._stop_r, select.POLLIN)
        # made at the first fault, not here: a new thread that fills megabytes
        # holding the GIL stalls the start-up thread that started it
        bufs: tuple[bytearray, bytearray] | None = None
        while True:
            events = dict(poll.poll())
            if self._stop_r in events:
                return
            try:
                data = os.read(self._uffd, _MSG_SIZE * 64)
            except BlockingIOError:
                continue
            except OSError:
                return
            for off in range(0, len(data) - _MSG_SIZE + 1, _MSG_SIZE):
                if data[off] != _EVENT_PAGEFAULT:
                    continue
                (addr,) = struct.unpack_from("<Q", data, off + 16)
                if bufs is None:
                    bufs = self._make_buffers()
                self._on_fault(addr, bufs)

    def _make_buffers(self) -> tuple[bytearray, bytearray] | None:
        """A thread's pair, or None where none can be had (out of memory):
        :meth:`_fill` then tries once more for the block and, failing,
        poisons it, so that this thread lives on and nothing waits for ever."""
        try:
            return self._src.buffers(self._block)
        except MemoryError:
            return None

    def _on_fault(self, addr: int, bufs: tuple[bytearray, bytearray] | None) -> None:
        b = (addr - self._base - self._lazy_from) // self._block
        if not 0 <= b < self._blocks:  # not ours: cannot happen for a registered range
            return
        with self._lock:
            self.faults += 1
            if b in self._filling:  # the thread filling it wakes the faulting one
                return
            if b in self._resident and _present(addr & ~(PAGE - 1), PAGE):
                self._wake(b)  # filled by another thread after this fault was raised
                return
            self._filling.add(b)  # (a resident block missing a page is completed)
            ahead = []
            if self._building:
                # onnxruntime packs a weight front to back: the next blocks are
                # decrypted on the other thread while it packs this one
                for nb in range(b + 1, min(b + 1 + READ_AHEAD, self._blocks)):
                    if nb not in self._filled and nb not in self._filling:
                        self._filling.add(nb)
                        ahead.append(nb)
        for nb in ahead:
            self._ahead.put(nb)
        self._fill(b, bufs, fault=True)

    def _read_ahead(self) -> None:
        bufs: tuple[bytearray, bytearray] | None = None  # at the first block (see _serve)
        while True:
            b = self._ahead.get()
            if b is None:
                return
            if bufs is None:
                bufs = self._make_buffers()
            self._fill(b, bufs, fault=False)

    def _range(self, b: int) -> tuple[int, int]:
        lo = self._lazy_from + b * self._block
        return lo, min(self._block, len(self._buf) - lo)

    def _wake(self, b: int) -> None:
        lo, n = self._range(b)
        _lib().ioctl(self._uffd, _UFFDIO_WAKE, ctypes.byref(_Range(self._base + lo, n)))

    def _fill(self, b: int, bufs: tuple[bytearray, bytearray] | None, *, fault: bool) -> None:
        """Decrypt block ``b`` (claimed: in ``_filling`` until its pages are
        in) and copy it in, without the lock. Never raises: a block that
        cannot be decrypted (nor buffers had for it) becomes zero pages and
        ``failed``."""
        lo, n = self._range(b)
        t0 = time.perf_counter()
        scratch: bytearray | None = None
        try:
            scratch, ct = bufs if bufs is not None else self._src.buffers(self._block)
            try:
                self._src.decrypt(lo, n, scratch, ct)
            finally:
                self._account(b, n, t0, fault)
            src = ctypes.addressof(ctypes.c_char.from_buffer(scratch))
            self._copy_in(self._base + lo, src, n)
        except BaseException as exc:  # noqa: BLE001 - a hung onnxruntime thread is worse
            self._poison(b, exc)
        finally:
            if scratch is not None:
                _crypto.zeroize(scratch)
            with self._lock:
                self._filling.discard(b)
                if self._building:
                    self._trim()
                self._changed.notify_all()

    def _copy_in(self, dst: int, src: int | None, n: int) -> None:
        """Every missing page of ``[dst, dst + n)`` filled from ``src`` (zero
        pages when None), waking whoever waits on them. A page already there
        (``EEXIST``) is stepped over, one page at a time, so a range that is
        partly present is completed, never only woken (a woken reader of a
        still-missing page would fault again, for ever)."""
        lib = _lib()
        off = 0
        stepped = False
        while off < n:
            if src is None:
                req: Any = _Zero(_Range(dst + off, n - off), 0, 0)
                rc = lib.ioctl(self._uffd, _UFFDIO_ZEROPAGE, ctypes.byref(req))
                done = req.zeropage
            else:
                req = _Copy(dst + off, src + off, n - off, 0, 0)
                rc = lib.ioctl(self._uffd, _UFFDIO_COPY, ctypes.byref(req))
                done = req.copy
            if rc == 0:
                break
            err = ctypes.get_errno()
            stepped = True
            if done > 0:  # a partial copy (EAGAIN): go on after it
                off += done
            elif err == errno.EEXIST:  # this page is in: the next one
                off += PAGE
            elif err != errno.EAGAIN:
                raise OSError(err, os.strerror(err))
        if stepped:  # the copies woke what they filled; wake the pages stepped over too
            lib.ioctl(self._uffd, _UFFDIO_WAKE, ctypes.byref(_Range(dst, n)))

    def _account(self, b: int, n: int, t0: float, fault: bool) -> None:
        """Block ``b`` is about to be in: count it, and during the build keep
        only the budget's worth of blocks (never one still being copied in)."""
        with self._lock:
            self._decrypt_s += time.perf_counter() - t0
            self._decrypted += n
            again = b in self._filled
            if again:
                self.refills += 1
            self._filled.add(b)
            self._order += 1
            self._resident[b] = self._order
            if self._building:
                if again and fault and self._budget < 1 << 62:
                    self._budget *= 2  # the build reads back what it let go: keep more
                self._built.add(b)
                self._trim()

    def _poison(self, b: int, exc: BaseException) -> None:
        with self._lock:
            if self.failed is None:
                self.failed = (
                    "the worker ran out of memory decrypting the package's weights"
                    if isinstance(exc, MemoryError)
                    else "the package's weights could not be decrypted again "
                    f"({type(exc).__name__}: the file changed or shrank after it was opened)"
                )
        lo, n = self._range(b)
        try:
            self._copy_in(self._base + lo, None, n)
        except OSError:  # nothing more to do: the readers are woken and fault again
            self._wake(b)

    def _drop(self, b: int) -> None:
        """Give block ``b``'s pages back (lock held)."""
        lo, n = self._range(b)
        lib = _lib()
        if lib.madvise(self._base + lo, n, self._dont_need) != 0:
            if self._dont_need == _MADV_DONTNEED_LOCKED:  # before Linux 5.18
                self._dont_need = _MADV_DONTNEED
                if lib.madvise(self._base + lo, n, self._dont_need) == 0:
                    del self._resident[b]
                    return
            self._budget = 1 << 62  # locked and cannot be dropped: keep everything
            return
        del self._resident[b]

    def _trim(self) -> None:
        while len(self._resident) * self._block > self._budget:
            done = [b for b in self._resident if b not in self._filling]
            if not done:
                return
            oldest = min(done, key=self._resident.__getitem__)
            self._drop(oldest)
            if oldest in self._resident:
                return

    # -- after the build ------------------------------------------------------------

    def settle(self) -> None:
        """The sessions are built: give back every block filled during the
        build (what onnxruntime packed or copied, and what was read ahead of
        it; one a session reads again is decrypted again, once) and decrypt,
        on two threads, every block the build did not touch. IntegrityError
        when a block could not be decrypted."""
        with self._changed:
            self._building = False
            self._changed.wait_for(lambda: not self._filling)  # a pread always returns
            for b in list(self._resident):
                if b in self._built:
                    self._drop(b)
        todo = iter(range(self._blocks))
        errors: list[BaseException] = []

        def prefill() -> None:
            bufs = None  # made at the first block left: often the build read them all
            try:
                for b in todo:  # a shared iterator: each block goes to one thread
                    if bufs is None:
                        with self._lock:
                            if b in self._filled or b in self._filling:
                                continue
                        # made before the block is claimed: a failure here (memory)
                        # leaves no block claimed that no thread will fill
                        bufs = self._src.buffers(self._block)
                    with self._lock:
                        if b in self._filled or b in self._filling:
                            continue
                        self._filling.add(b)
                    self._fill(b, bufs, fault=False)
            except BaseException as exc:  # noqa: BLE001 - raised by settle, after both threads
                errors.append(exc)

        helper = threading.Thread(target=prefill, name="vault-weights-prefill", daemon=True)
        helper.start()
        prefill()
        helper.join()
        if errors:  # a block left unfilled is decrypted when first read, as in the build
            raise errors[0]
        if self.failed:
            raise IntegrityError(self.failed)

    def stats(self) -> dict[str, Any]:
        """What the lazy weights did (for health and the benchmarks)."""
        with self._lock:
            return {
                "lazy_bytes": self._span,
                "blocks": self._blocks,
                "read_in_build": len(self._built),
                "resident_blocks": len(self._resident),
                "faults": self.faults,
                "refills": self.refills,
                "decrypted_bytes": self._decrypted,
                "decrypt_ms": round(self._decrypt_s * 1e3, 2),
                "build_budget": self._budget if self._budget < 1 << 62 else None,
                "failed": self.failed,
            }

    # -- end --------------------------------------------------------------------

    def _stop(self) -> None:
        if self._uffd < 0:
            return
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass
        self._ahead.put(None)
        for t in self._threads:  # a fill in flight ends (a pread always returns)
            if t is not threading.current_thread():
                t.join()
        with self._lock:
            _lib().ioctl(
                self._uffd,
                _UFFDIO_UNREGISTER,
                ctypes.byref(_Range(self._base + self._lazy_from, self._span)),
            )
            os.close(self._uffd)
            self._uffd = -1
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self._src.close()

    def wipe(self) -> None:
        """Overwrite what is decrypted (the eager part and every resident
        block) and drop the rest: no block is decrypted only to be wiped."""
        if self._buf is None:
            return
        self._stop()
        view = memoryview(self._buf)
        _crypto.zeroize(view[: self._lazy_from])
        with self._lock:
            for b in list(self._resident):
                lo, n = self._range(b)
                _crypto.zeroize(view[lo : lo + n])
            self._resident.clear()
        view.release()
        _lib().madvise(self._base + self._lazy_from, self._span, _MADV_DONTNEED)


class _Source:
    """The package's ciphertext chunks, read again with ``pread`` from a
    descriptor this object owns, and the key to open them."""

    def __init__(
        self, fd: int, payload_start: int, key: Any, prefix: bytes, aad: bytes, size: int,
        chunk: int,
    ) -> None:  # fmt: skip
        self.fd = fd
        self.payload_start = payload_start
        self.key = bytearray(key)
        self.prefix = prefix
        self.aad = aad
        self.size = size
        self.chunk = chunk
        self.n = _crypto.chunk_count(size, chunk)

    def buffers(self, block: int) -> tuple[bytearray, bytearray]:
        """One thread's buffers: a block's plaintext (with ``update_into``'s
        spare bytes) and one chunk's ciphertext."""
        want = (block + 16, self.chunk + _crypto.TAG_SIZE)
        with _SPARE_LOCK:
            for i, pair in enumerate(_SPARE):
                if (len(pair[0]), len(pair[1])) == want:
                    return _SPARE.pop(i)
        return bytearray(want[0]), bytearray(want[1])

    def decrypt(self, lo: int, n: int, out: bytearray, ct: bytearray) -> None:
        """Plaintext ``[lo, lo + n)`` into ``out`` (whole chunks: ``lo`` is a
        chunk boundary); what lies past the plaintext's end is zeros."""
        view = memoryview(out)
        end = min(lo + n, self.size)
        pos = lo
        while pos < end:
            i = pos // self.chunk
            size = min(self.chunk, self.size - pos)
            piece = memoryview(ct)[: size + _crypto.TAG_SIZE]
            at = self.payload_start + i * (self.chunk + _crypto.TAG_SIZE)
            if os.preadv(self.fd, [piece], at) != len(piece):
                raise OSError(errno.EIO, "short read")
            _crypto.decrypt_chunk(
                self.key, self.prefix, self.aad, i, self.n, piece,
                view[pos - lo : pos - lo + size + 15],
            )  # fmt: skip
            pos += size
        if end < lo + n:
            _crypto.zeroize(view[max(0, end - lo) : n])

    def close(self) -> None:
        _crypto.zeroize(self.key)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def decrypt_lazily(
    fd: int, payload_start: int, key: Any, prefix: bytes, aad: bytes, *, plaintext_size: int,
    chunk_size: int, min_bytes: int = LAZY_MIN_BYTES,
) -> LazyPlaintext | None:  # fmt: skip
    """A :class:`LazyPlaintext` over the package whose ciphertext ``fd`` holds
    (a descriptor this call takes: closed on None too), or None where lazy
    weights do not apply (small, unsupported, odd chunk size): the caller then
    decrypts up front. IntegrityError for a payload that does not open."""
    size = plaintext_size
    if size < min_bytes or chunk_size % PAGE or size <= 0:
        os.close(fd)
        return None
    uffd = _open_uffd()
    if uffd is None:
        os.close(fd)
        return None
    block = _block_for(chunk_size)
    src = _Source(fd, payload_start, key, prefix, aad, size, chunk_size)
    span = -(-size // PAGE) * PAGE
    buf: mmap.mmap | None = None
    try:
        buf = mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        bufs = src.buffers(block)  # one pair for every chunk decrypted up front
        spent: tuple[bytearray, bytearray] | None = bufs
    except BaseException:  # out of memory: nothing decrypted yet; the key copy and fds go
        if buf is not None:
            buf.close()
        os.close(uffd)
        src.close()
        raise
    keep = False
    try:
        # 4 KiB pages only: under THP "always" the up-front part's last write
        # fault could map a huge page reaching into the lazy range, whose
        # pages would then be present zeros that never fault
        for advice in (_MADV_NOHUGEPAGE, _MADV_DONTDUMP, _MADV_DONTFORK):
            buf.madvise(advice)
        # the index and the graphs are read by Python (which holds the GIL the
        # fault handler needs): those chunks are decrypted up front
        head = _decrypt_upto(src, buf, 0, 4, bufs)
        (n_index,) = struct.unpack_from(">I", buf, 0)
        head = _decrypt_upto(src, buf, head, min(size, 4 + n_index), bufs)
        index = _parse_index(buf)  # type: ignore[arg-type]  # reads the buffer protocol
        for entry in index["graphs"] + index["files"]:
            if entry["offset"] + entry["length"] > size:
                raise ValueError("an index entry past the plaintext")
        eager = max([4 + n_index] + [g["offset"] + g["length"] for g in index["graphs"]])
        lazy_from = -(-eager // block) * block
        if lazy_from >= span:
            return None
        _decrypt_upto(src, buf, head, lazy_from, bufs)
        _crypto.zeroize(bufs[0])  # the last chunk decrypted up front
        spent = None
        _give_back(bufs)  # for the fault handler or the read-ahead thread
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        reg = _Register(_Range(base + lazy_from, span - lazy_from), _MODE_MISSING, 0)
        if _lib().ioctl(uffd, _UFFDIO_REGISTER, ctypes.byref(reg)) != 0:
            return None
        if _present(base + lazy_from, span - lazy_from):
            # pages that are there already would never fault (an mlockall
            # without MCL_ONFAULT fills every new mapping at once; a huge
            # page): decrypted up front instead
            return None
        del base
        plain = LazyPlaintext(
            buf, size, index, uffd=uffd, lazy_from=lazy_from, block=block, source=src
        )
        keep = True
        return plain
    except (OSError, ValueError) as exc:
        raise IntegrityError() from exc
    finally:
        if spent is not None:
            _crypto.zeroize(spent[0])  # the last chunk decrypted up front
        if not keep:
            _crypto.zeroize(memoryview(buf))
            buf.close()
            os.close(uffd)
            src.close()


def _decrypt_upto(src: _Source, buf: mmap.mmap, done: int, upto: int,
                  bufs: tuple[bytearray, bytearray]) -> int:  # fmt: skip
    """Decrypt whole chunks into ``buf`` from ``done`` until ``upto`` is covered
    (``bufs``: a chunk's plaintext and ciphertext, made once for every call:
    in a fresh process their page faults cost more than the decryption)."""
    scratch, ct = bufs
    while done < min(upto, src.size):
        n = min(src.chunk, src.size - done)
        src.decrypt(done, n, scratch, ct)
        buf[done : done + n] = memoryview(scratch)[:n]
        done += n
    return done
