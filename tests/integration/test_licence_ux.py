"""Licences a vendor can read (issue 18, item 6): ``--rate`` serves at the
rate it names, refusals say when to come back, ``licence list`` says expired,
exhausted and revoked, ``licence issue`` refuses a model id the key server
has no key for, ``vault inspect NAME.licence`` shows what the licence allows.

One key server (60 s leases, as in production, so a lease's budget is a
whole minute of calls) serves every test here.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vault
from tests.cli import vault_in_process as _vault
from tests.conftest import KeyServerProcess
from tests.models import mlp
from vault.core.crypto import PublisherKey
from vault.sealing import seal

X = np.ones((1, 8), np.float32)


@pytest.fixture(scope="module")
def ks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyServerProcess]:
    from keyserver import init_dir

    d = tmp_path_factory.mktemp("licux") / "ks"
    init_dir(d, address="tcp://127.0.0.1:7700")
    server = KeyServerProcess(d, lease_ttl=60.0)
    try:
        server.start()
        res = seal(mlp(), model_id="digits", signing_key=PublisherKey.load(
            server.publisher_key_path), output=d.parent / "digits.vault")  # fmt: skip
        server.register(res.model_id, res.key_id, res.key, res.digest)
        yield server
    finally:
        server.kill()


def test_rate_2_per_s_is_served_at_2_per_s_and_every_refusal_says_when(
    ks: KeyServerProcess,
) -> None:
    lic = ks.issue(
        "digits", holder="rita", rate_limit=2.0, same_user=True
    )  # tier 0: a local worker
    served: list[float] = []
    waits: list[float | None] = []
    with vault.open(ks.dir.parent / "digits.vault", licence=lic) as m:
        # the lease reserves a minute's worth: alone, it would be served at once
        assert m.health()["lease"]["call_budget"] == 120
        t0 = time.monotonic()
        while len(served) < 5:  # the burst, then three more at the rate
            try:
                m.compute({"x": X})
                served.append(time.monotonic() - t0)
            except vault.RateLimitedError as exc:
                waits.append(exc.retry_after)
                time.sleep(0.01)
        elapsed = time.monotonic() - t0
    # bursts of 2, then one call every 0.5 s: 5 calls take at least 1.5 s,
    # and no call came before its token (a slow machine only serves fewer)
    assert elapsed >= 1.5 - 0.05, served
    for i, at in enumerate(served):
        assert at >= 0.5 * (i - 1) - 0.05, served
    assert waits and all(w is not None and 0 < w <= 0.5 for w in waits), waits[:5]


def test_licence_list_says_expired_exhausted_and_revoked(
    ks: KeyServerProcess, tmp_path: Path
) -> None:
    admin = str(ks.admin_licence)
    expiring = ks.issue("digits", holder="ex", expires=0.5)
    quota = ks.issue("digits", holder="qu", max_calls=2)
    revoked = ks.issue("digits", holder="rv")
    active = ks.issue("digits", holder="ac", expires=3600.0, max_calls=5)
    with ks.admin() as a:
        a.revoke(revoked.licence_id)
    with ks.client(quota) as c:
        rel = c.release(model_id="digits", key_id=_key_id(ks), package_digest=_digest(ks))
        rows = _states(_vault("licence", "list", "--licence", admin, cwd=tmp_path).stdout)
        assert rows[quota.licence_id] == "exhausted (2 held by open leases)"
        c.close_lease(lease_id=rel.lease.lease_id, calls=2)
    while time.time() < (expiring.expires_at or 0):
        time.sleep(0.05)
    rows = _states(_vault("licence", "list", "--licence", admin, cwd=tmp_path).stdout)
    assert rows[expiring.licence_id] == "expired"
    assert rows[quota.licence_id] == "exhausted"
    assert rows[revoked.licence_id] == "revoked"
    assert rows[active.licence_id] == "active"


def _states(out: str) -> dict[str, str]:
    states = ("active", "expired", "exhausted", "revoked")
    rows = {}
    for line in out.splitlines()[1:]:
        cols = line.split()
        for i, c in enumerate(cols):
            if c in states:
                rows[cols[0]] = " ".join(cols[i:])
                break
    return rows


def _package(ks: KeyServerProcess) -> Any:
    from vault.core.package import Package

    return Package.load(ks.dir.parent / "digits.vault")


def _key_id(ks: KeyServerProcess) -> str:
    with _package(ks) as p:
        return p.key_id


def _digest(ks: KeyServerProcess) -> str:
    with _package(ks) as p:
        return p.digest


def test_licence_issue_refuses_a_model_id_with_no_key(ks: KeyServerProcess, tmp_path: Path) -> None:
    admin = str(ks.admin_licence)
    r = _vault("licence", "issue", "digitz", "--to", "typo", "--licence", admin,
               "-o", "typo.licence", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2 and not (tmp_path / "typo.licence").exists()
    assert "error[unknown_model]" in r.stderr and "no key for model 'digitz'" in r.stderr
    assert "registered: digits" in r.stderr and "--force" in r.stderr
    r = _vault("licence", "issue", "digitz", "--to", "typo", "--licence", admin,
               "-o", "typo.licence", "--force", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    # a hybrid's plain head has no key of its own: its tail's registration vouches for it
    ks.register("clf.tail", "k1", bytes(32), "sha256:" + "11" * 32)
    r = _vault("licence", "issue", "clf.head", "--to", "alice", "--licence", admin,
               "-o", "alice.licence", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_inspect_shows_what_a_licence_allows(ks: KeyServerProcess, tmp_path: Path) -> None:
    admin = str(ks.admin_licence)
    dev = ks.device()
    r = _vault("licence", "issue", "digits", "--to", "alice", "--expires", "30d",
               "--max-calls", "1000", "--rate", "2/s", "--device", dev.device_id,
               "--licence", admin, "-o", "alice.licence", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "rate: 2/s: bursts of 2, then one call every 0.5 s" in r.stdout
    out = _vault("inspect", "alice.licence", cwd=tmp_path).stdout
    for needle in ("(runtime)", "held by alice", "models:     digits", "in 30.0 days",
                   "quota:      1,000 calls", "rate:       2/s: bursts of 2", dev.device_id,
                   ks.address):  # fmt: skip
        assert needle in out, (needle, out)
    data = json.loads(_vault("inspect", "alice.licence", "--json", cwd=tmp_path).stdout)
    assert data["limits"]["max_calls"] == 1000 and data["limits"]["rate_limit"] == 2.0
    assert data["devices"] == [dev.device_id] and data["kind"] == "runtime"
    assert "client" not in data and "proof_key" not in data  # no secret shown
    text = (tmp_path / "alice.licence").read_text()
    secret = json.loads(text)["client"]["secret_key"]
    assert secret not in out
    os.unlink(tmp_path / "alice.licence")


def test_issue_help_explains_the_rate(tmp_path: Path) -> None:
    r = _vault("licence", "issue", "--help", cwd=tmp_path)
    text = " ".join(r.stdout.split())
    for needle in ("calls per second", "at most max(1, R) calls at once", "retry_after",
                   "R x TTL", "gives back what it did not serve", "--force"):  # fmt: skip
        assert needle in text, needle
