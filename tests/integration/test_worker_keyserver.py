"""The worker with a real key server: licensed open, revocation within a lease
period, and the remote (tcp + CURVE + allow-list) worker service."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vault
from tests.conftest import served_endpoint
from tests.models import mlp
from vault.core.crypto import PublisherKey
from vault.core.process import stop_process
from vault.sealing import seal


def revoked_calls(model: Any, feeds: dict[str, Any], give_up_s: float = 120.0) -> list[float]:
    """Call until the licence's revocation stops the calls; returns the time
    (time.time(), before sending) of each call that was still served."""
    served: list[float] = []
    deadline = time.monotonic() + give_up_s  # only so a broken stop fails instead of hanging
    while True:
        t = time.time()
        try:
            model.compute(feeds)
        except vault.LicenceRevokedError:
            return served
        served.append(t)
        assert time.monotonic() < deadline, "the revocation never stopped the calls"
        time.sleep(0.02)


def within_one_lease(keyserver: Any, licence_id: str, served: list[float], *,
                     grants: tuple[str, ...]) -> bool:  # fmt: skip
    """From the key server's audit (its clock is this machine's): after the
    revocation nothing was granted to this licence, and every call still
    served was sent before the last grant made before it ran out (grant time +
    lease TTL). No wall-clock bound: a slower machine only serves fewer."""
    records = keyserver.audit(licence_id)
    revoked = next(r.ts for r in records if r.event == "revoked")
    assert not [r for r in records if r.event in grants and r.ts > revoked], records
    last = max(r.ts for r in records if r.event in grants and r.ts <= revoked)
    late = [t for t in served if t > last + keyserver.lease_ttl]
    assert not late, (late, last, keyserver.lease_ttl)
    return True


@pytest.fixture
def licensed(keyserver: Any, tmp_path: Path) -> tuple[str, vault.Licence]:
    res = seal(mlp(), model_id="ks-model", signing_key=PublisherKey.load(keyserver.publisher_key_path),
               output=tmp_path / "m.vault")  # fmt: skip
    keyserver.register(res.model_id, res.key_id, res.key, res.digest)
    lic = keyserver.issue(res.model_id, holder="alice", same_user=True)  # tier 0: no daemon here
    path = tmp_path / "alice.licence"
    lic.save(path)
    return str(res.path), lic


def test_open_compute_then_revocation_refuses_within_the_lease(
    keyserver: Any, licensed: tuple
) -> None:
    path, lic = licensed
    x = np.ones((2, 8), np.float32)
    with vault.open(path, licence=lic) as model:
        assert model.compute({"x": x})["logits"].shape == (2, 5)
        lease = model.health()["lease"]
        assert lease["state"] == "active" and lease["lease_id"]
        with keyserver.admin() as ks:
            ks.revoke(lic.licence_id)
        served = revoked_calls(model, {"x": x})
        assert within_one_lease(keyserver, lic.licence_id, served, grants=("released", "renewed"))
        with pytest.raises(vault.LicenceRevokedError):
            model.compute({"x": x})  # and it stays refused
        assert model.health()["serving"] is False  # sessions dropped


def test_revoked_licence_cannot_open(keyserver: Any, licensed: tuple) -> None:
    path, lic = licensed
    with keyserver.admin() as ks:
        ks.revoke(lic.licence_id)
    with pytest.raises(vault.LicenceRevokedError):
        vault.open(path, licence=lic)


def test_remote_worker_over_curve_with_allow_list(
    keyserver: Any, licensed: tuple, tmp_path: Path
) -> None:
    path, lic = licensed
    allow = tmp_path / "clients"
    allow.mkdir()
    (allow / "alice.key").write_text(lic.client_public_key + "\n")
    out = tmp_path / "worker.pub"
    lic_path = tmp_path / "alice.licence"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vault", "worker", "serve", path, "--licence", str(lic_path),
         "--bind", "tcp://127.0.0.1:0", "--allow", str(allow), "--server-key-out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        endpoint, buf = served_endpoint(proc)
        assert endpoint, (
            buf.decode() + proc.stderr.read().decode()[-500:] if proc.poll() is not None else buf
        )
        server_key = out.read_text().strip()
        with vault.connect(endpoint, licence=lic, server_key=server_key, timeout=10) as remote:
            assert remote.inputs["x"][0] == "float32"
            assert remote.compute({"x": np.ones((1, 8), np.float32)})["logits"].shape == (1, 5)
            # a remote caller learns liveness and the tier, nothing about the host
            health = remote.health()
            assert health["serving"] is True and health["tier"] == 2
            assert set(health) <= {"model_id", "serving", "tier", "provider"}, health
        # a caller whose key is not on the allow-list gets no service
        stranger = keyserver.issue("ks-model", holder="mallory")
        with pytest.raises(vault.UnknownLicenceError, match="refused this caller's key"):
            vault.connect(endpoint, licence=stranger, server_key=server_key, timeout=1.5)
    finally:
        stop_process(proc, 10)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
