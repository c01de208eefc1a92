"""Payload decryption speed: STREAM AES-256-GCM into one preallocated buffer.

Measures, for a payload of ``size`` bytes, the signature check (parallel
chunk hashing + Ed25519) and the decryption into a fresh buffer, as the
worker does them, against a plain ``memcpy`` of the same bytes. Two more rows
split the fresh decrypt into its parts: the first touch of a fresh mapping
alone (one byte written per 4 KiB page, on the same threads; what the kernel,
and on a VM the host, charge for new memory) and the decryption into a
mapping already touched (the cipher's own rate). A fresh decrypt cannot run
faster than the slower of the two.

Example::

    python -m benchmarks.decrypt_bench --size-mb 200
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import Context

import argparse
import os
import statistics
import time
from typing import Any

import numpy as np

from vault.core import crypto as _crypto
from vault.core.package import chunk_hashes_digest


def run(quick: bool = False, size_mb: int = 200, repeats: int | None = None) -> dict[str, Any]:
    size = size_mb << 20
    repeats = repeats or (3 if quick else 7)
    key = _crypto.generate_key()
    prefix = os.urandom(7)
    plain = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    ct = _crypto.stream_encrypt(key, prefix, b"aad", memoryview(plain))
    dec, dec1, ver, flat, cpy, touch, warm = [], [], [], [], [], [], []
    for _ in range(repeats):
        # as the worker does it: a fresh mapping (secret_buffer), its page
        # faults timed, the chunks decrypted on every core
        t = time.perf_counter()
        out = _crypto.secret_buffer(size)
        _crypto.stream_decrypt_into(key, prefix, b"aad", ct, out, plaintext_size=size)
        dec.append(time.perf_counter() - t)
        assert out[:64] == plain[:64].tobytes()
        _crypto.release_buffer(out)
        # the previous way: a zero-filled bytearray (4 KiB faults), one thread
        t = time.perf_counter()
        out = bytearray(size)
        _crypto.stream_decrypt_into(key, prefix, b"aad", ct, out, plaintext_size=size, threads=1)
        dec1.append(time.perf_counter() - t)
        del out
        # the parts: a fresh mapping's first touch alone, then the decryption
        # into that same mapping, now touched
        t = time.perf_counter()
        out = _crypto.secret_buffer(size)
        _touch(out)
        touch.append(time.perf_counter() - t)
        t = time.perf_counter()
        _crypto.stream_decrypt_into(key, prefix, b"aad", ct, out, plaintext_size=size)
        warm.append(time.perf_counter() - t)
        _crypto.release_buffer(out)
        t = time.perf_counter()
        chunk_hashes_digest(ct, _crypto.DEFAULT_CHUNK_SIZE)
        ver.append(time.perf_counter() - t)
        t = time.perf_counter()
        _crypto.sha256(ct)  # one flat hash on one core: what the chunked digest replaces
        flat.append(time.perf_counter() - t)
        t = time.perf_counter()
        dst = bytearray(size)
        np.copyto(np.frombuffer(dst, np.uint8), plain)
        cpy.append(time.perf_counter() - t)
        del dst
    med = statistics.median
    return {
        "size_bytes": size,
        "repeats": repeats,
        "decrypt_s": med(dec),
        "decrypt_gbps": size / med(dec) / 1e9,
        "decrypt_bytearray_1thread_gbps": size / med(dec1) / 1e9,
        "verify_hash_s": med(ver),
        "verify_hash_gbps": size / med(ver) / 1e9,
        "flat_sha256_gbps": size / med(flat) / 1e9,
        "memcpy_fresh_s": med(cpy),
        "memcpy_fresh_gbps": size / med(cpy) / 1e9,
        "decrypt_over_memcpy": med(dec) / med(cpy),
        "first_touch_gbps": size / med(touch) / 1e9,
        "decrypt_touched_gbps": size / med(warm) / 1e9,
    }


def _touch(buf: Any) -> None:
    """Write one byte of every 4 KiB page of ``buf``, split over the threads
    the decryption uses (each faults in its own half, as the decrypting
    threads do)."""
    import threading

    arr = np.frombuffer(buf, np.uint8)
    n = _crypto._decrypt_threads(len(arr))
    bounds = [len(arr) * j // n // 4096 * 4096 for j in range(n + 1)]
    bounds[-1] = len(arr)

    def run(lo: int, hi: int) -> None:
        arr[lo:hi:4096] = 1

    pool = [threading.Thread(target=run, args=(bounds[j], bounds[j + 1])) for j in range(n)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    r = run(args.quick, args.size_mb)
    print(f"payload {r['size_bytes'] / 2**20:.0f} MiB, median of {r['repeats']}")
    print(
        f"  decrypt into fresh mapping {r['decrypt_gbps']:6.2f} GB/s  ({r['decrypt_s'] * 1e3:.0f} ms)"
    )
    print(f"  bytearray, one thread      {r['decrypt_bytearray_1thread_gbps']:6.2f} GB/s")
    print(
        f"  signature chunk hashing    {r['verify_hash_gbps']:6.2f} GB/s  ({r['verify_hash_s'] * 1e3:.0f} ms)"
    )
    print(f"  one flat SHA-256 (1 core)  {r['flat_sha256_gbps']:6.2f} GB/s")
    print(
        f"  memcpy into fresh buffer   {r['memcpy_fresh_gbps']:6.2f} GB/s  ({r['memcpy_fresh_s'] * 1e3:.0f} ms)"
    )
    print(f"  decrypt / memcpy           {r['decrypt_over_memcpy']:6.2f}x")
    print(f"  parts: first touch alone   {r['first_touch_gbps']:6.2f} GB/s")
    print(f"  parts: decrypt, touched    {r['decrypt_touched_gbps']:6.2f} GB/s")


if __name__ == "__main__":
    main()


def section(ctx: Context) -> dict[str, Any]:
    return run(quick=ctx.quick, size_mb=100 if ctx.quick else 500)
