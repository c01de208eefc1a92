"""Shared memory between a caller and its *local* worker, for large tensors.

ZeroMQ copies a tensor into the kernel and out again on each side; for a
6 MiB tensor that is about 3× a plain copy per direction. A local worker
instead shares one anonymous ``memfd`` with its caller (never a file: the
worker's Landlock rules forbid writes, and nothing lands on disk). The arena
is cut into equal slots; a call that carries a large tensor takes a slot,
copies the tensor in, and names ``[offset, nbytes]`` in its header instead of
sending a frame. The worker reads inputs in place and writes outputs that fit
into the rest of the same slot; everything else still travels as frames.
ZeroMQ carries only the small header.

What is shared is a caller's own inputs and outputs, never the model. The
worker checks every offset against the slot the header names and the arena.

Example::

    arena = ShmArena(64 << 20, slots=4)
    slot = arena.acquire()          # None when all are busy: use frames
    descs, frames = encode_tensors(inputs, arena.region(slot))
    ...
    arena.release(slot)
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
from typing import Any

from .errors import ConfigError
from .protocol import SHM_MIN_BYTES, SharedRegion

__all__ = ["SHM_MIN_BYTES", "ShmArena", "map_arena"]

# no shrinking, no growing, and no removing these seals (F_SEAL_SEAL)
F_SEAL_SEAL_SET = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class ShmArena:
    """The caller's side: a memfd, its mapping, and a free list of slots."""

    def __init__(self, size: int, *, slots: int = 4) -> None:
        if not hasattr(os, "memfd_create"):
            raise OSError("memfd_create is not available on this platform")
        self.slot_size = (size // max(1, slots)) // mmap.PAGESIZE * mmap.PAGESIZE
        self.size = self.slot_size * max(1, slots)
        self.fd = os.memfd_create("vault-tensors", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            # sealed before it is shared: neither side can shrink the arena
            # under the other's mapping (a SIGBUS) or grow it
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, F_SEAL_SEAL_SET)
            self.map = mmap.mmap(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise
        self._free = list(range(max(1, slots)))
        self._lock = threading.Lock()

    def acquire(self) -> int | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def region(self, slot: int) -> SharedRegion:
        start = slot * self.slot_size
        return SharedRegion(self.map, start, start + self.slot_size)

    def close(self, *, unmap: bool = True) -> None:
        """Close the fd and, with ``unmap``, the mapping. A restart keeps the
        old mapping alive until the GC takes it: a thread may still be copying
        into its slot when the worker it was meant for has died."""
        if unmap:
            try:
                self.map.close()
            except BufferError:  # a caller still holds a view; the GC unmaps it later
                pass
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def __repr__(self) -> str:
        return f"ShmArena({self.size} bytes, {self.size // self.slot_size} slots)"


def map_arena(fd: int, size: int) -> Any:
    """The worker's side: map the inherited memfd, only if it is sealed
    against shrinking and growing and holds exactly ``size`` bytes (otherwise
    the caller could truncate it under the mapping: a SIGBUS in the worker)."""
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    if seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) != fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW:
        raise ConfigError("the shared-memory arena is not sealed against shrinking and growing")
    if os.fstat(fd).st_size != size:
        raise ConfigError("the shared-memory arena has another size than announced")
    return mmap.mmap(fd, size)
