"""Lazy weights (vault/core/lazyplain.py): decrypted on first read, given
back, decrypted again when read again, and failing closed.

Read from this process only through ``ctypes.memmove``, which drops the GIL
as onnxruntime does: the fault handler is a Python thread.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.prereq import require
from vault.core import lazyplain
from vault.core.crypto import PublisherKey, generate_key
from vault.core.errors import IntegrityError
from vault.core.package import Package, build_plaintext, payload_aad, write_package

MiB = 1 << 20
ROWS = 4096  # one file of ROWS x 1024 float32: 16 MiB, 8 blocks


def _package(tmp_path: Path, *, chunk: int = MiB) -> tuple[str, bytearray, bytes]:
    rng = np.random.default_rng(11)
    weights = rng.standard_normal((ROWS, 1024)).astype(np.float32)
    graph = b"\x08\x07" * 1000  # the graphs are read as bytes only here
    plaintext = build_plaintext([("pipeline", graph)], [("w.bin", bytearray(weights.tobytes()))])
    key = generate_key()
    pk = PublisherKey.generate()
    path = str(tmp_path / "lazy.vault")
    manifest = {
        "format": "vault-package/1", "model_id": "lazy", "key_id": "k-lazy",
        "publisher": {"alg": "ed25519", "fingerprint": pk.fingerprint},
        "created": "2026-01-01T00:00:00Z", "stages": ["model"], "composed": True,
        "inputs": [], "outputs": [], "split_points": [],
    }  # fmt: skip
    reference = bytearray(plaintext)  # write_package wipes what it sealed
    write_package(path, manifest, plaintext, key, pk.sign, chunk_size=chunk)
    return path, reference, bytes(key)


def _open(path: str, key: bytes, **kw: int) -> lazyplain.LazyPlaintext | None:
    pkg = Package.load(path)
    try:
        p = pkg.manifest["payload"]
        return lazyplain.decrypt_lazily(
            os.dup(pkg._fd),  # type: ignore[arg-type]  # noqa: SLF001
            pkg._layout.payload_start,  # noqa: SLF001
            key,
            bytes.fromhex(p["nonce_prefix"]),
            payload_aad(pkg._layout.header, pkg._layout.manifest_bytes),  # noqa: SLF001
            plaintext_size=int(p["plaintext_size"]),
            chunk_size=int(p["chunk_size"]),
            min_bytes=kw.get("min_bytes", 0),
        )
    finally:
        pkg.close()


def _read(view: memoryview, lo: int, n: int) -> bytes:
    """Copy ``n`` bytes out with the GIL released (as onnxruntime reads)."""
    out = ctypes.create_string_buffer(n)
    src = ctypes.addressof(ctypes.c_char.from_buffer(view)) + lo
    ctypes.memmove(out, src, n)
    return out.raw


def _quiet(plain: lazyplain.LazyPlaintext) -> dict[str, object]:
    """The stats once no block is being copied in (a reader is woken by the
    copy, before the filling thread has done its bookkeeping)."""
    with plain._changed:  # noqa: SLF001
        assert plain._changed.wait_for(lambda: not plain._filling, 10)  # noqa: SLF001
    return plain.stats()


UFFD = "a kernel with userfaultfd for user-mode faults (Linux 5.11+, not blocked by seccomp)"


@pytest.fixture
def lazy(tmp_path: Path):  # type: ignore[no-untyped-def]
    require(lazyplain.supported(), UFFD)
    path, plaintext, key = _package(tmp_path)
    plain = _open(path, key)
    assert plain is not None
    yield plain, plaintext, path, key
    plain.release()


def test_weights_decrypt_on_first_read_and_match_the_eager_plaintext(lazy) -> None:  # type: ignore[no-untyped-def]
    plain, plaintext, _, _ = lazy
    f = plain.index["files"][0]
    view = plain.files["w.bin"]
    assert plain.stats()["faults"] == 0  # nothing of the weights decrypted yet
    # graphs are decrypted up front (Python reads them)
    g = plain.index["graphs"][0]
    assert bytes(plain.graphs[0]) == bytes(plaintext[g["offset"] : g["offset"] + g["length"]])
    got = _read(view, 0, f["length"])
    assert got == bytes(plaintext[f["offset"] : f["offset"] + f["length"]])
    st = _quiet(plain)  # every block decrypted once (on a fault or read ahead of one)
    assert st["decrypted_bytes"] >= st["lazy_bytes"] and st["refills"] == 0, st


def test_blocks_given_back_are_decrypted_again_when_read_again(lazy) -> None:  # type: ignore[no-untyped-def]
    plain, plaintext, _, _ = lazy
    f = plain.index["files"][0]
    view = plain.files["w.bin"]
    first = _read(view, 0, f["length"])  # the "build" reads every block
    plain.settle()  # ...and gives every one back
    assert plain.stats()["resident_blocks"] == 0
    mid = f["length"] // 2
    again = _read(view, mid, 4096)  # a session reads one page again
    assert again == first[mid : mid + 4096]
    st = plain.stats()
    assert st["refills"] >= 1 and st["resident_blocks"] >= 1, st


def test_blocks_the_build_never_read_are_decrypted_by_settle(lazy) -> None:  # type: ignore[no-untyped-def]
    plain, plaintext, _, _ = lazy
    plain.settle()
    st = plain.stats()
    assert st["read_in_build"] == 0 and st["resident_blocks"] == st["blocks"], st
    f = plain.index["files"][0]
    faults = st["faults"]
    assert _read(plain.files["w.bin"], 0, f["length"]) == bytes(
        plaintext[f["offset"] : f["offset"] + f["length"]]
    )
    assert plain.stats()["faults"] == faults  # a call after settle needs no fault


def test_a_build_that_reads_more_than_the_budget_keeps_only_the_budget(lazy) -> None:  # type: ignore[no-untyped-def]
    plain, _, _, _ = lazy
    # the block being read, the ones read ahead of it, and the one before
    keep = lazyplain.READ_AHEAD + 2
    plain._budget = keep * plain._block  # noqa: SLF001
    f = plain.index["files"][0]
    for lo in range(0, f["length"], 64 << 10):  # front to back, as a packer reads
        _read(plain.files["w.bin"], lo, min(64 << 10, f["length"] - lo))
    st = _quiet(plain)
    assert st["blocks"] > keep, st
    assert st["resident_blocks"] <= keep and st["refills"] == 0, st
    assert st["build_budget"] == keep * plain._block, st  # noqa: SLF001  # never grew


@pytest.mark.parametrize("change", ["rewritten", "cut"])
def test_a_package_changed_after_open_fails_closed(lazy, change: str) -> None:  # type: ignore[no-untyped-def]
    plain, _, path, _ = lazy
    pkg = Package.load(path)
    start = pkg._layout.payload_start  # noqa: SLF001
    pkg.close()
    if change == "rewritten":  # the ciphertext rewritten in place, same size
        with open(path, "r+b") as fh:
            fh.seek(start + (4 << 20))
            fh.write(b"\0" * (2 << 20))
    else:  # the file cut short: a short read, not a SIGBUS
        os.truncate(path, start + (4 << 20))
    f = plain.index["files"][0]
    _read(plain.files["w.bin"], 0, f["length"])  # no thread hangs: zeros are given
    assert plain.failed and "changed" in plain.failed
    with pytest.raises(IntegrityError):
        plain.settle()


def test_a_wrong_key_is_an_integrity_error_at_once(tmp_path: Path) -> None:
    require(lazyplain.supported(), UFFD)
    path, _, _ = _package(tmp_path)
    with pytest.raises(IntegrityError):
        _open(path, bytes(32))


def test_small_or_odd_payloads_are_decrypted_up_front(tmp_path: Path) -> None:
    path, _, key = _package(tmp_path, chunk=3000)  # not a whole number of pages
    assert _open(path, key) is None
    path, _, key = _package(tmp_path)
    assert _open(path, key, min_bytes=64 << 20) is None  # below the size that pays


def test_wipe_overwrites_what_is_in_and_decrypts_nothing(
    lazy, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    plain, plaintext, _, _ = lazy
    f = plain.index["files"][0]
    view = plain.files["w.bin"]
    page = _read(view, 0, 4096)  # this block is in
    assert page == bytes(plaintext[f["offset"] : f["offset"] + 4096]) and any(page)
    faults = plain.stats()["faults"]
    # the wipe's last step gives every page back, which reads as zeros
    # whether or not it was overwritten: leave it out to see the overwrite
    monkeypatch.setattr(lazyplain, "_MADV_DONTNEED", -1)
    plain.wipe()
    assert plain.stats()["faults"] == faults  # nothing decrypted to be wiped
    assert _read(view, 0, 4096) == bytes(4096)  # the block that was in: overwritten


def test_an_unprivileged_user_gets_a_userfaultfd() -> None:
    """UFFD_USER_MODE_ONLY needs no privilege (vm.unprivileged_userfaultfd
    stays 0): the daemon's and the service's workers are not root."""
    require(os.geteuid() == 0 and shutil.which("setpriv") is not None, "root and setpriv")
    require(lazyplain.supported(), UFFD)
    code = "from vault.core import lazyplain; print(lazyplain.supported())"
    root = str(Path(__file__).resolve().parents[3])
    r = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
         code],
        capture_output=True, text=True, cwd="/", env={**os.environ, "PYTHONPATH": root},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


def _child(tmp_path: Path, body: str) -> str:
    """Run ``body`` in a fresh interpreter (a process-wide setting: huge
    pages, mlockall) with this module's helpers; its stdout."""
    import textwrap

    root = str(Path(__file__).resolve().parents[3])
    code = (
        f"import sys; sys.path.insert(0, {root!r})\n"
        "from pathlib import Path\n"
        "from tests.unit.vault.test_lazyplain import _open, _package, _read\n"
        f"path, ref, key = _package(Path({str(tmp_path)!r}))\n" + textwrap.dedent(body)
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
    return r.stdout


def test_huge_pages_never_serve_zeros_nor_spin(tmp_path: Path) -> None:
    """Transparent huge pages set to "always" (a common distribution
    default; here every mapping of the module is advised MADV_HUGEPAGE): a
    huge page from the up-front part's writes reaching into the lazy range
    would leave present zeros that never fault, and blocks that copy in only
    partly. Found by review: the read hung, faulting a million times."""
    require(lazyplain.supported(), UFFD)
    out = _child(
        tmp_path,
        """
        import mmap as _mmap, threading, types
        from vault.core import lazyplain
        def thp_mmap(*a, **kw):
            buf = _mmap.mmap(*a, **kw)
            buf.madvise(_mmap.MADV_HUGEPAGE)
            return buf
        shim = types.SimpleNamespace(**{k: getattr(_mmap, k) for k in dir(_mmap) if k.isupper()})
        shim.mmap = thp_mmap
        lazyplain.mmap = shim
        plain = _open(path, key)
        f = plain.index["files"][0]
        got = []
        t = threading.Thread(target=lambda: got.append(_read(plain.files["w.bin"], 0, f["length"])),
                             daemon=True)
        t.start(); t.join(60)
        want = bytes(ref[f["offset"] : f["offset"] + f["length"]])
        print("HUNG" if not got else "MATCH" if got[0] == want else "WRONG", plain.failed)
        """,
    )
    assert "MATCH None" in out, out


def test_a_mapping_filled_at_creation_is_decrypted_up_front(tmp_path: Path) -> None:
    """``mlockall`` without ``MCL_ONFAULT`` (the worker's fallback where the
    kernel refuses it) fills every new mapping at once: its pages are there
    as zeros and would never fault. Lazy weights step aside (None: the
    caller decrypts everything up front) rather than serve them."""
    require(lazyplain.supported(), UFFD)
    require(os.geteuid() == 0, "root (mlockall of a whole process without a memlock limit)")
    out = _child(
        tmp_path,
        """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.mlockall(1 | 2) == 0, ctypes.get_errno()  # MCL_CURRENT | MCL_FUTURE
        print("LAZY" if _open(path, key) is not None else "EAGER")
        """,
    )
    assert "EAGER" in out, out


def test_buffers_made_ahead_are_taken_by_the_open_and_hold_only_zeros_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a pre-started worker makes the decrypting buffers while it waits; an
    # open takes them instead of faulting fresh ones in, and a pair handed on
    # from one user to the next is wiped first
    require(lazyplain.supported(), UFFD)
    lazyplain.forget_buffers()
    lazyplain.keep_buffers(2)
    made = list(lazyplain._SPARE)  # noqa: SLF001
    assert len(made) == 2
    for scratch, ct in made:
        assert len(scratch) == lazyplain.BLOCK_BYTES + 16 and len(ct) == MiB + 16
        assert not any(scratch) and not any(ct)
    handed_on: list[bool] = []
    real_give_back = lazyplain._give_back  # noqa: SLF001

    def give_back(pair: tuple[bytearray, bytearray]) -> None:
        real_give_back(pair)
        handed_on.append(not any(pair[0]))

    monkeypatch.setattr(lazyplain, "_give_back", give_back)
    made_at_open: list[int] = []  # a block buffer made at the open instead of taken

    def counting_bytearray(n: int) -> bytearray:
        if n == lazyplain.BLOCK_BYTES + 16:
            made_at_open.append(n)
        return bytearray(n)

    monkeypatch.setattr(lazyplain, "bytearray", counting_bytearray, raising=False)
    path, plaintext, key = _package(tmp_path)
    plain = _open(path, key)
    assert plain is not None
    try:
        assert handed_on == [True]  # the up-front part's pair, wiped, back for a thread
        f = plain.index["files"][0]
        got = _read(plain.files["w.bin"], 0, f["length"])
        assert got == bytes(plaintext[f["offset"] : f["offset"] + f["length"]])
        _quiet(plain)
        assert made_at_open == []  # the up-front part and the threads took the pairs made ahead
        for scratch, _ in lazyplain._SPARE:  # noqa: SLF001  # one the read-ahead did not need
            assert any(scratch is p[0] for p in made) and not any(scratch)
    finally:
        plain.release()
        lazyplain.forget_buffers()


def test_settle_makes_buffers_only_for_blocks_the_build_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require(lazyplain.supported(), UFFD)
    made: list[int] = []
    real = lazyplain._Source.buffers  # noqa: SLF001

    def buffers(self: object, block: int) -> tuple[bytearray, bytearray]:
        made.append(block)
        return real(self, block)  # type: ignore[arg-type]

    monkeypatch.setattr(lazyplain._Source, "buffers", buffers)  # noqa: SLF001
    path, plaintext, key = _package(tmp_path)
    for read_all in (True, False):  # the control: a build that read nothing
        plain = _open(path, key)
        assert plain is not None
        try:
            if read_all:
                f = plain.index["files"][0]
                _read(plain.files["w.bin"], 0, f["length"])
                _quiet(plain)
            before = len(made)
            plain.settle()
            assert (len(made) == before) is read_all, (read_all, made)
        finally:
            plain.release()
        lazyplain.forget_buffers()


def _no_memory(self: object, block: int) -> tuple[bytearray, bytearray]:
    raise MemoryError("simulated")


def _read_all_weights(plain: lazyplain.LazyPlaintext) -> bytes | None:
    """The whole weights file read on another thread; None when the read
    did not end within 30 s (a block claimed that no thread will fill)."""
    import threading

    f = plain.index["files"][0]
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(_read(plain.files["w.bin"], 0, f["length"])),
                              daemon=True)  # fmt: skip
    reader.start()
    reader.join(30)
    return got[0] if got else None


def test_settle_that_cannot_make_its_buffers_leaves_every_block_readable(
    lazy, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # out of memory while settle makes its buffers: no block may stay
    # claimed by a thread that will never fill it (a later read would hang)
    plain, plaintext, _, _ = lazy
    with monkeypatch.context() as m:
        m.setattr(lazyplain._Source, "buffers", _no_memory)  # noqa: SLF001
        with pytest.raises(MemoryError):
            plain.settle()
    f = plain.index["files"][0]
    assert _read_all_weights(plain) == bytes(plaintext[f["offset"] : f["offset"] + f["length"]])


def test_a_fault_with_no_memory_for_buffers_fails_closed_and_hangs_nothing(
    lazy, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # the fault handler and the read-ahead thread make their buffers at their
    # first block: out of memory there, the block becomes zero pages and the
    # weights failed (every call then refused), and both threads live on
    plain, _, _, _ = lazy
    monkeypatch.setattr(lazyplain._Source, "buffers", _no_memory)  # noqa: SLF001
    got = _read_all_weights(plain)
    assert got is not None, "a read of the weights hung"
    lazy_part = got[plain._lazy_from - plain.index["files"][0]["offset"] :]  # noqa: SLF001
    assert lazy_part and lazy_part == bytes(len(lazy_part))  # zero pages, never a guess
    assert plain.failed is not None and "out of memory" in plain.failed
    assert all(t.is_alive() for t in plain._threads)  # noqa: SLF001
