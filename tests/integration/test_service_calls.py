"""Per-caller call licences on the worker service, against a real key server.

The service runs as an enrolled device; its workers get their package key
with its runtime licence; each caller connects with the CURVE key of its own
*call* licence, and every call is checked (revoked, expired, quota, rate,
model) against decisions the key server makes and the service caches for at
most one lease (the fixture's lease is 2 s).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

import vault
from tests.integration.test_worker_keyserver import revoked_calls, within_one_lease
from tests.models import mlp
from vault.core.crypto import PublisherKey
from vault.core.keyclient import KeyServerClient
from vault.core.licence import Licence
from vault.sealing import seal
from worker.service import JsonLog, LaunchSpec, ServiceConfig, WorkerService
from worker.service.calls import CallLicencePolicy

X = np.ones((1, 8), np.float32)


class Svc:
    def __init__(self, keyserver: Any, tmp: Path) -> None:
        pk = PublisherKey.load(keyserver.publisher_key_path)
        res = seal(mlp(), model_id="m", signing_key=pk, output=tmp / "m.vault")
        keyserver.register(res.model_id, res.key_id, res.key, res.digest)
        self.keyserver = keyserver
        self.device = keyserver.enroll(tmp / "device")
        self.licence = keyserver.issue("m", holder="service")  # runtime: the workers' key
        self.ks = KeyServerClient(self.licence, device=self.device)
        self.policy = CallLicencePolicy(
            lambda model, keys, usage: self.ks.call_decisions(model_id=model, keys=keys,
                                                              usage=usage)  # type: ignore[arg-type]
        )  # fmt: skip
        spub, ssec = zmq.curve_keypair()
        self.server_key = spub.decode()
        self.log = open(tmp / "service.log", "w")  # noqa: SIM115 - closed in stop()
        cfg = ServiceConfig(
            bind="tcp://127.0.0.1:0", packages=[str(res.path)], curve=(spub, ssec),
            policy=self.policy, metrics_port=0,
            launch=LaunchSpec(licence=self.licence, device=self.device),
        )  # fmt: skip
        self.svc = WorkerService(cfg, log=JsonLog(self.log))
        self.endpoint = self.svc.start()["endpoint"]
        self.thread = threading.Thread(target=self.svc.run, daemon=True)
        self.thread.start()

    def caller(self, **limits: Any) -> Licence:
        return self.keyserver.issue(limits.pop("model", "m"), kind="call", **limits)  # type: ignore[no-any-return]

    def connect(self, lic: Licence, timeout: float = 10.0) -> vault.Model:
        return vault.connect(self.endpoint, licence=lic, server_key=self.server_key, model="m",
                             timeout=timeout)  # fmt: skip

    def used(self, lic: Licence) -> int:
        with self.keyserver.admin() as ks:
            rows = {r["licence_id"]: r for r in ks.list()}
        return int(rows[lic.licence_id]["used_calls"])

    def stop(self) -> None:
        self.svc.request_stop()
        self.thread.join(30)
        self.ks.close()
        self.log.close()


@pytest.fixture
def service(keyserver: Any, tmp_path: Path) -> Iterator[Svc]:
    s = Svc(keyserver, tmp_path)
    try:
        yield s
    finally:
        s.stop()


def test_quota_is_enforced_per_caller_and_usage_reported(service: Svc) -> None:
    alice = service.caller(holder="alice", max_calls=5)
    bob = service.caller(holder="bob", max_calls=10)
    with service.connect(alice) as a, service.connect(bob) as b:
        for _ in range(5):
            assert a.compute({"x": X})["logits"].shape == (1, 5)
        with pytest.raises(vault.QuotaExhaustedError):
            a.compute({"x": X})
        for _ in range(3):  # alice's quota is hers alone
            b.compute({"x": X})
        with pytest.raises(vault.InputError):  # a failed call is not billed
            b.compute({"x": np.ones((1, 3), np.float32)})
    service.stop()  # reports usage and gives unused reserves back
    assert service.used(alice) == 5
    assert service.used(bob) == 3


def test_revocation_stops_a_caller_within_one_lease(service: Svc) -> None:
    carol = service.caller(holder="carol")
    with service.connect(carol) as c:
        c.compute({"x": X})
        with service.keyserver.admin() as ks:
            ks.revoke(carol.licence_id)
        # a decision is never used past one lease: no call is served after the
        # lease of the last decision made before the revocation
        served = revoked_calls(c, {"x": X})
        assert within_one_lease(service.keyserver, carol.licence_id, served,
                                grants=("call_lease",))  # fmt: skip


def test_rate_limit_is_enforced_per_call(service: Svc) -> None:
    dan = service.caller(holder="dan", rate_limit=2.0)
    ok = limited = 0
    with service.connect(dan) as d:
        t0 = time.monotonic()
        while limited < 5:  # until the caller has been refused a few times
            try:
                d.compute({"x": X})
                ok += 1
            except vault.RateLimitedError:
                limited += 1
            # a burst of 2, then 2/s, over the time it took (a slow machine serves fewer)
            assert ok <= 2 + 2 * (time.monotonic() - t0) + 1, ok


def test_wrong_model_expired_and_runtime_licences_are_refused(service: Svc) -> None:
    erin = service.caller(holder="erin", model="other")
    with service.connect(erin) as e, pytest.raises(vault.WrongModelError):
        e.compute({"x": X})
    frank = service.caller(holder="frank", expires=3.0)
    with service.connect(frank) as f:
        f.compute({"x": X})
        with service.keyserver.admin() as ks:
            expires_at = next(r["expires_at"] for r in ks.list() if r["holder"] == "frank")
        while time.time() <= expires_at:  # the key server's clock: this machine's
            time.sleep(0.05)
        with pytest.raises(vault.LicenceExpiredError):
            f.compute({"x": X})
    # a runtime licence is not a call licence: its key is not let in at all
    runtime = service.keyserver.issue("m", holder="mallory")
    with pytest.raises(vault.UnknownLicenceError, match="refused this caller's key"):
        service.connect(runtime, timeout=1.0)


def test_metrics_count_calls_per_licence(service: Svc) -> None:
    import urllib.request

    gina = service.caller(holder="gina")
    with service.connect(gina) as g:
        for _ in range(3):
            g.compute({"x": X})
    port = service.svc.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    line = (
        f'vault_requests_total{{code="ok",licence="{gina.licence_id}",model="m",outcome="success"}}'
    )
    assert f"{line} 3.0" in text
