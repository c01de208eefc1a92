"""Tier 0's pre-started worker (vault/core/standby.py): a later ``vault.open``
in the same process takes a worker that was started, hardened and imported
ahead of need, holding nothing of any package until the open assigns it one,
and never reused."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vault
from tests.conftest import KeyServerProcess
from tests.models import mlp
from vault.client import Model
from vault.core import standby
from vault.core.crypto import PublisherKey
from vault.sealing import seal

X = np.ones((2, 8), np.float32)


@pytest.fixture(scope="module")
def keyserver_m(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyServerProcess]:
    from keyserver import init_dir

    d = tmp_path_factory.mktemp("standby") / "ks"
    init_dir(d, address="tcp://127.0.0.1:7700")
    ks = KeyServerProcess(d, lease_ttl=30.0)
    try:
        ks.start()
        yield ks
    finally:
        ks.kill()


def _package(ks: KeyServerProcess, directory: Path, model_id: str) -> tuple[str, vault.Licence]:
    res = seal(mlp(), model_id=model_id, signing_key=PublisherKey.load(ks.publisher_key_path),
               output=directory / f"{model_id}.vault")  # fmt: skip
    ks.register(res.model_id, res.key_id, res.key, res.digest)
    return str(res.path), ks.issue(res.model_id, holder="alice", same_user=True)


@pytest.fixture(scope="module")
def two_packages(
    keyserver_m: KeyServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[str, vault.Licence]]:
    d = tmp_path_factory.mktemp("pkgs")
    return {m: _package(keyserver_m, d, m) for m in ("sb-a", "sb-b")}


def _open(path: str, lic: Any, **kw: Any) -> Model:
    m = vault.open(path, licence=lic, **kw)
    assert isinstance(m, Model)
    return m


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as fh:
        return dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)


def _hardened_standby(timeout: float = 60.0) -> standby.Standby:
    """The pre-started worker, once it exists and has hardened itself (a state
    to wait for: it starts in the background after an open)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        w = standby.POOL.waiting()
        if w is not None and w.alive():
            st = _status(w.proc.pid)
            if st.get("Seccomp", "").strip() == "2" and st.get("NoNewPrivs", "").strip() == "1":
                return w
        time.sleep(0.05)
    raise AssertionError("no hardened pre-started worker appeared")


def _fds(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def test_a_later_open_takes_a_pre_started_worker_that_held_nothing_before(
    two_packages: dict[str, tuple[str, Any]],
) -> None:
    (path_a, lic_a), (path_b, lic_b) = two_packages["sb-a"], two_packages["sb-b"]
    with _open(path_a, lic_a) as a:
        assert a.compute({"x": X})["logits"].shape == (2, 5)
        w = _hardened_standby()
        pid = w.proc.pid
        assert pid != a.pid
        # nothing of any package before its open: no path, no descriptor of one
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read().split(b"\0")
        assert not any(arg.endswith(b".vault") or b"licence" in arg for arg in cmdline)
        assert not any(link.endswith(".vault") for link in _fds(pid))
        with _open(path_b, lic_b) as b:
            assert b.pid == pid  # it existed before this open
            assert b._localw is not None and b._localw.ready.get("standby") is True
            assert b.model_id == "sb-b"
            np.testing.assert_allclose(
                b.compute({"x": X})["logits"], a.compute({"x": X})["logits"], rtol=0, atol=0
            )  # fmt: skip  (same architecture, same seed)
            behind = _hardened_standby()  # and the next one waits behind it
            assert behind.proc.pid not in (pid, a.pid)
        # closed: that worker is gone (stopped and reaped), never handed to anyone again
        assert not os.path.exists(f"/proc/{pid}")
        with _open(path_b, lic_b) as again:
            assert again.pid not in (pid, a.pid)
            assert again.compute({"x": X})["logits"].shape == (2, 5)


def test_an_open_survives_a_pre_started_worker_that_died_waiting(
    two_packages: dict[str, tuple[str, Any]],
) -> None:
    path, lic = two_packages["sb-a"]
    with _open(path, lic):
        w = _hardened_standby()
    os.kill(w.proc.pid, signal.SIGKILL)
    w.proc.wait()
    with _open(path, lic) as m:
        assert m.pid != w.proc.pid
        assert m._localw is not None and not m._localw.ready.get("standby")
        assert m.compute({"x": X})["logits"].shape == (2, 5)


def test_a_pre_started_worker_serves_only_opens_with_its_own_arguments(
    two_packages: dict[str, tuple[str, Any]],
) -> None:
    path, lic = two_packages["sb-a"]
    with _open(path, lic):
        w = _hardened_standby()
    with _open(path, lic, worker_args=["--threads", "3"]) as m:
        assert m.pid != w.proc.pid  # hardening options are fixed at spawn: not this one
        assert m._localw is not None and not m._localw.ready.get("standby")
    deadline = time.monotonic() + 30
    while w.alive():  # the one that did not fit is stopped, not kept
        assert time.monotonic() < deadline
        time.sleep(0.05)
