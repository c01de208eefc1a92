"""Reading a package costs what the file holds, never what its header claims
(issue 17, item 4): regular files only, bounded reads, chunk bounds checked
before anything is allocated, and chunk hashing whose memory does not grow
with the chunk count. ``vault inspect``, ``vault verify`` and the repository
scan of ``vault worker serve`` get a typed error for ``/dev/zero``, a FIFO, a
directory and a huge sparse file: no hang, no MemoryError."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.models import mlp
from tests.sealed import forge_package, seal_for_test
from vault.core import crypto as _crypto
from vault.core.errors import FormatError, IntegrityError
from vault.core.package import (
    MIN_CHUNK_SIZE,
    Package,
    chunk_hashes_digest,
    inspect,
    memory_limit,
)


@pytest.fixture(scope="module")
def genuine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return seal_for_test(tmp_path_factory.mktemp("genuine"), mlp())


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory: pytest.TempPathFactory, genuine: Any) -> dict[str, str]:
    """Everything a path may name that is not a package file: each is named
    ``*.vault`` so a repository scan meets it too."""
    d = tmp_path_factory.mktemp("odd")
    fifo = d / "fifo.vault"
    os.mkfifo(fifo)
    zero = d / "zero.vault"
    zero.symlink_to("/dev/zero")
    (d / "dir.vault").mkdir()
    huge = d / "huge.vault"  # 1 TB claimed, a few KiB on disk
    with open(huge, "wb") as fh:
        fh.truncate(1 << 40)
    sparse = forge_package(d / "sparse.vault", genuine.path, chunk_size=1, chunks=30_000_000)
    return {"fifo": str(fifo), "zero": str(zero), "dir": str(d / "dir.vault"),
            "huge": str(huge), "sparse": sparse, "devzero": "/dev/zero"}  # fmt: skip


_WHAT = {"fifo": "FIFO", "zero": "character device", "devzero": "character device",
         "dir": "directory", "huge": "sparse", "sparse": "sparse"}  # fmt: skip


def test_odd_files_are_a_typed_format_error_in_process(odd_files: dict[str, str]) -> None:
    for name, path in odd_files.items():
        with pytest.raises(FormatError, match=_WHAT[name]):
            Package.load(path)
        with pytest.raises(FormatError, match=_WHAT[name]):
            inspect(path)


def _vault(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # a hang would be the bug: the timeout turns it into a failure, not a stuck suite
    return subprocess.run([sys.executable, "-m", "vault", *args], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def test_inspect_and_verify_refuse_odd_files_at_once(
    odd_files: dict[str, str], genuine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from vault.app.cli import main

    # a FIFO in a process of its own: a hang (the bug) becomes a timeout, not a stuck suite
    for cmd in (["inspect", odd_files["fifo"]],
                ["verify", odd_files["fifo"], "--publisher", genuine.publisher_pub]):  # fmt: skip
        out = _vault(*cmd)
        assert out.returncode == 2 and "error[format]" in out.stderr, (cmd, out.stderr)
        assert "FIFO" in out.stderr
    for name in ("devzero", "zero", "dir", "huge", "sparse"):
        for cmd in (["inspect", odd_files[name]],
                    ["verify", odd_files[name], "--publisher", genuine.publisher_pub]):  # fmt: skip
            assert main(cmd) == 2, cmd
            err = capsys.readouterr().err
            assert "error[format]" in err and _WHAT[name] in err, (cmd, err)
    # a publisher key that is /dev/zero: a bounded read, a typed error
    assert main(["verify", genuine.path, "--publisher", "/dev/zero"]) == 2
    assert "error[config]" in capsys.readouterr().err
    # control: the genuine package is inspected and verified by the same commands
    assert main(["inspect", genuine.path]) == 0
    assert main(["verify", genuine.path, "--publisher", genuine.publisher_pub]) == 0
    assert "OK:" in capsys.readouterr().out


def test_the_repository_scan_serves_packages_and_logs_the_rest(
    odd_files: dict[str, str], genuine: Any
) -> None:
    from worker.service.repository import Repository

    d = Path(odd_files["fifo"]).parent
    os.link(genuine.path, d / "good.vault")
    logged: list[dict[str, Any]] = []
    try:
        found = Repository(str(d)).scan(lambda event, **kw: logged.append({"event": event, **kw}))
    finally:
        os.unlink(d / "good.vault")
    assert [model_id for model_id, _, _ in found] == [genuine.manifest["model_id"]]
    skipped = {e["file"]: e["code"] for e in logged if e["event"] == "package_skipped"}
    assert skipped == {"dir.vault": "format", "fifo.vault": "format", "huge.vault": "format",
                       "sparse.vault": "format", "zero.vault": "format"}, skipped  # fmt: skip


def test_header_claims_are_checked_before_anything_is_allocated(
    tmp_path: Path, genuine: Any
) -> None:
    # 30 million 1-byte chunks written out densely would be 510 MB; a claim
    # the file cannot hold (the header alone) and a chunk below the bound are
    # refused from the header, as the opaque integrity error
    short = forge_package(tmp_path / "short.vault", genuine.path, chunk_size=1 << 20,
                          chunks=30_000_000, layout="short")  # fmt: skip
    tiny = forge_package(tmp_path / "tiny.vault", genuine.path, chunk_size=MIN_CHUNK_SIZE // 2,
                         chunks=64, layout="dense")  # fmt: skip
    huge_chunk = forge_package(tmp_path / "big.vault", genuine.path, chunk_size=128 << 20,
                               chunks=1, layout="short")  # fmt: skip
    for path in (short, tiny, huge_chunk):
        with pytest.raises(IntegrityError):
            inspect(path)
        with pytest.raises(IntegrityError):
            Package.load(path)
    # control: the same layout at an allowed chunk size is read (and fails only
    # at the signature, since its bytes are random)
    ok = forge_package(tmp_path / "ok.vault", genuine.path, chunk_size=MIN_CHUNK_SIZE,
                       chunks=64, layout="dense")  # fmt: skip
    with Package.load(ok) as pkg:
        with pytest.raises(IntegrityError):
            pkg.verify(Path(genuine.publisher_pub).read_bytes())


def _peak_while(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_chunk_hashing_memory_does_not_grow_with_the_chunk_count(tmp_path: Path) -> None:
    # 100,000 chunks of the smallest size, as a sparse file mapped read-only
    # (no memory of its own): what grows is only what the hashing keeps
    step = MIN_CHUNK_SIZE + _crypto.TAG_SIZE
    path = tmp_path / "ct"
    with open(path, "wb") as out:
        out.truncate(step * 100_000)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as ct:
        view = memoryview(ct)
        digest = b""

        def streaming() -> None:
            nonlocal digest
            digest = chunk_hashes_digest(view, MIN_CHUNK_SIZE, threads=2)

        def per_chunk_list() -> None:  # control: a reader that keeps one digest per chunk
            parts = [_crypto.sha256(view[s : s + step]) for s in range(0, len(view), step)]
            assert _crypto.sha256(b"".join(parts)) == digest

        ours = _peak_while(streaming)
        naive = _peak_while(per_chunk_list)
        view.release()
    print(f"peak traced memory hashing 100,000 chunks: {ours} bytes (per-chunk list: {naive})")
    assert naive > 10 << 20  # the measure sees a reader whose memory grows with the count
    assert ours < 4 << 20  # a few 16 MiB slices' digests in flight, whatever the count


def test_the_memory_limit_follows_the_declared_plaintext() -> None:
    base = memory_limit(0)
    assert base >= 1 << 30
    assert memory_limit(100 << 20) == base + 4 * (100 << 20)
    assert memory_limit(0, headroom=1 << 20) == 1 << 20
