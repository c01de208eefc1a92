"""Key release and key wrapping primitives: what binds a key to its context."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.prereq import require
from vault.core import crypto as _crypto
from vault.core.errors import ConfigError, IntegrityError


@pytest.mark.parametrize("suite", _crypto.HPKE_SUITES)
def test_hpke_release_opens_only_with_the_same_context(suite: str) -> None:
    key = _crypto.generate_key()
    info = _crypto.key_release_info("model-a", "sha256:aa", "lic-1")
    eph = _crypto.EphemeralKey(suite)
    sealed = _crypto.hpke_seal(suite, eph.public_bytes, key, info)
    assert bytes(key) not in sealed
    assert eph.open(sealed, info) == key
    for other in (
        _crypto.key_release_info("model-b", "sha256:aa", "lic-1"),
        _crypto.key_release_info("model-a", "sha256:bb", "lic-1"),
        _crypto.key_release_info("model-a", "sha256:aa", "lic-2"),
    ):
        eph2 = _crypto.EphemeralKey(suite)
        with pytest.raises(IntegrityError):
            eph2.open(_crypto.hpke_seal(suite, eph2.public_bytes, key, info), other)


def test_ephemeral_key_is_single_use() -> None:
    eph = _crypto.EphemeralKey()
    info = b"ctx"
    sealed = _crypto.hpke_seal("x25519", eph.public_bytes, b"k" * 32, info)
    eph.open(sealed, info)
    with pytest.raises(IntegrityError):
        eph.open(sealed, info)


def test_unknown_suite_and_bad_public_key_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown HPKE suite"):
        _crypto.EphemeralKey("rot13")
    with pytest.raises(ConfigError):
        _crypto.hpke_seal("x25519", b"short", b"k" * 32, b"")


def test_wrapped_key_is_bound_to_key_id_and_model_id() -> None:
    master = _crypto.generate_key()
    key = _crypto.generate_key()
    wrapped = _crypto.wrap_key(master, key, key_id="k1", model_id="m1")
    assert bytes(key) not in wrapped
    assert _crypto.unwrap_key(master, wrapped, key_id="k1", model_id="m1") == key
    with pytest.raises(IntegrityError):
        _crypto.unwrap_key(master, wrapped, key_id="k2", model_id="m1")
    with pytest.raises(IntegrityError):
        _crypto.unwrap_key(master, wrapped, key_id="k1", model_id="m2")
    with pytest.raises(IntegrityError):
        _crypto.unwrap_key(_crypto.generate_key(), wrapped, key_id="k1", model_id="m1")


def test_zeroize_overwrites() -> None:
    buf = bytearray(b"secret" * 1000)
    _crypto.zeroize(buf)
    assert buf == bytearray(len(buf))


def _sealed(size: int, chunk: int) -> tuple[bytearray, bytes, bytes, bytearray, bytes]:
    key = _crypto.generate_key()
    prefix, aad = os.urandom(_crypto.NONCE_PREFIX_SIZE), b"aad"
    plain = os.urandom(size)
    ct = _crypto.stream_encrypt(key, prefix, aad, plain, chunk_size=chunk)
    return key, prefix, aad, ct, plain


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
@pytest.mark.parametrize("size", [0, 1, 4096 * 5 + 17, 4096 * 40])
def test_parallel_decrypt_equals_the_plaintext(threads: int, size: int) -> None:
    key, prefix, aad, ct, plain = _sealed(size, 4096)
    for out in (bytearray(size), _crypto.secret_buffer(size)):
        _crypto.stream_decrypt_into(
            key, prefix, aad, ct, out, plaintext_size=size, chunk_size=4096, threads=threads
        )
        assert bytes(out[:size]) == plain
        _crypto.release_buffer(out)


@pytest.mark.parametrize("where", ["first", "boundary", "last"])
def test_a_tampered_chunk_wipes_everything_decrypted_in_any_thread(where: str) -> None:
    size, chunk = 4096 * 40, 4096
    key, prefix, aad, ct, _ = _sealed(size, chunk)
    step = chunk + _crypto.TAG_SIZE
    # chunk 20 is where the second of two threads starts
    index = {"first": 0, "boundary": 20, "last": 39}[where]
    ct[index * step + 5] ^= 1
    out = bytearray(b"\xaa" * size)
    with pytest.raises(IntegrityError):
        _crypto.stream_decrypt_into(
            key, prefix, aad, ct, out, plaintext_size=size, chunk_size=chunk, threads=2
        )
    assert out == bytearray(size)  # chunks other threads had decrypted are zeros too


def test_secret_buffer_is_a_private_zeroed_mapping_that_release_unmaps() -> None:
    import mmap

    buf = _crypto.secret_buffer(8 << 20)
    assert isinstance(buf, mmap.mmap) and len(buf) == 8 << 20
    assert buf[:16] == bytes(16) and buf[-16:] == bytes(16)
    buf[100:104] = b"abcd"
    view = memoryview(buf)
    _crypto.release_buffer(buf)  # still viewed: left to the collector, not unmapped under us
    assert bytes(view[100:104]) == b"abcd"
    view.release()
    _crypto.release_buffer(buf)
    assert buf.closed
    assert isinstance(_crypto.secret_buffer(1000), bytearray)  # small: no mapping


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of this process's mapping that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_secret_buffer_stays_out_of_core_dumps_and_asks_for_no_huge_pages() -> None:
    # no MADV_HUGEPAGE (stop 33): on a VM with free page reporting a 2 MiB
    # page drawn from memory the host took back cost 4x what 4 KiB pages did
    import ctypes

    buf = _crypto.secret_buffer(8 << 20)
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        flags = _vm_flags(address)
        assert "dd" in flags, flags  # MADV_DONTDUMP
        assert "hg" not in flags, flags  # MADV_HUGEPAGE
    finally:
        _crypto.release_buffer(buf)


@pytest.mark.parametrize("tail", [1, 7, 14, 15, 16])
def test_a_short_final_chunk_decrypts_into_an_exact_buffer(tail: int) -> None:
    size = 4096 * 9 + tail
    key, prefix, aad, ct, plain = _sealed(size, 4096)
    for threads in (1, 2, 3):
        out = bytearray(size)  # exactly the plaintext: no spare bytes at the end
        _crypto.stream_decrypt_into(
            key, prefix, aad, ct, out, plaintext_size=size, chunk_size=4096, threads=threads
        )
        assert bytes(out) == plain


def test_any_failure_in_a_decrypt_thread_wipes_everything_and_raises() -> None:
    size = 4096 * 40
    key, prefix, aad, ct, _ = _sealed(size, 4096)
    out = bytearray(b"\xaa" * size)

    def consumed(lo: int, hi: int) -> None:
        if lo > 0:  # the second thread's first report
            raise MemoryError("simulated")

    with pytest.raises(MemoryError):
        _crypto.stream_decrypt_into(
            key, prefix, aad, ct, out, plaintext_size=size, chunk_size=4096, threads=2,
            consumed=consumed,
        )  # fmt: skip
    assert out == bytearray(size)


def _kernel_populates() -> bool:
    """Whether this kernel knows ``MADV_POPULATE_WRITE`` (Linux 5.14+)."""
    import mmap

    probe = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        probe.madvise(_crypto.MADV_POPULATE_WRITE)
        return True
    except OSError:  # EINVAL: an older kernel
        return False
    finally:
        probe.close()


def _resident(buf: Any) -> list[bool]:
    """mincore(2): which pages of the mapping ``buf`` are in memory."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    pages = -(-len(buf) // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mincore(address, len(buf), vec) == 0, ctypes.get_errno()
    return [bool(b & 1) for b in vec]


def test_prefaulter_maps_pages_in_and_leaves_what_is_there() -> None:
    import mmap

    require(_kernel_populates(), "a kernel with MADV_POPULATE_WRITE (Linux 5.14+)")
    page, mib = mmap.PAGESIZE, 1 << 20
    buf = _crypto.secret_buffer(4 * mib)
    control = _crypto.secret_buffer(4 * mib)
    for m in (buf, control):  # one write must fault in one 4 KiB page, never a 2 MiB one
        m.madvise(mmap.MADV_NOHUGEPAGE)
    try:
        buf[mib + 10 : mib + 13] = b"old"  # a page already written
        populate = _crypto._prefaulter(buf)
        assert populate is not None
        populate(0, 2 * mib - 100)  # the end rounds up to its page
        resident = _resident(buf)
        assert all(resident[: 2 * mib // page]) and not any(resident[2 * mib // page :])
        assert not any(_resident(control))  # no mapping in ahead: nothing there yet
        assert buf[mib + 10 : mib + 13] == b"old" and buf[:mib] == bytes(mib)
        assert _crypto._prefaulter(bytearray(16)) is None  # only for mappings
    finally:
        _crypto.release_buffer(buf)
        _crypto.release_buffer(control)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decrypting_into_a_mapping_maps_each_chunk_in_and_keeps_every_byte(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chunks of 5000 bytes: the ranges two threads map in share pages, and
    # mapping a page in must never undo what the other thread wrote there
    size = (3 << 20) + 123
    key, prefix, aad, ct, plain = _sealed(size, 5000)
    ranges: list[tuple[int, int]] = []
    real = _crypto._prefaulter

    def recording(buf: Any) -> Any:
        populate = real(buf)
        assert populate is not None

        def record(lo: int, hi: int) -> None:
            ranges.append((lo, hi))
            populate(lo, hi)

        return record

    monkeypatch.setattr(_crypto, "_prefaulter", recording)
    out = _crypto.secret_buffer(size)
    try:
        _crypto.stream_decrypt_into(
            key, prefix, aad, ct, out, plaintext_size=size, chunk_size=5000, threads=threads
        )
        assert bytes(out[:size]) == plain
        assert sorted(ranges) == [(i, min(i + 5000, size)) for i in range(0, size, 5000)]
    finally:
        _crypto.release_buffer(out)
