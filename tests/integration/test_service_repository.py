"""``vault worker serve --repository`` as a vendor runs it, one model at a
time: a real key server, one service licence covering several models (made
with ``vault licence issue A B C``), a repository holding a damaged package
and a model the licence does not cover, the real command in a subprocess.

One key server and one service for the module (the suite's time budget); the
tests run in file order and each leaves the service serving.

- each model loads on its own: the bad ones are unavailable, each reason
  logged once per attempt (code and message) and retried with backoff, while
  the others serve; readiness as Triton and KServe define it;
- SIGHUP adding an unlicensed model keeps the service ready; a licence
  replaced on disk (``--all-models``) is used at the next SIGHUP;
- batched, metered; a refused call counts in no batch;
- the server key survives a restart (kept in the device directory), and a
  client connected before the restart goes on calling with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vault
from tests.conftest import KeyServerProcess, served_ready
from tests.models import mlp, reference_pipeline
from tests.waiting import wait_for
from vault.core.crypto import PublisherKey
from vault.core.process import stop_process
from vault.sealing import seal


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "vault", *args], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    if check:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


@dataclass
class Service:
    root: Path
    args: list[str]
    log_path: Path
    alice: Path
    proc: subprocess.Popen[bytes] | None = None
    ready: dict[str, Any] = field(default_factory=dict)
    _log: Any = None

    def start(self) -> dict[str, Any]:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "vault", "worker", "serve", *self.args],
                                     stdout=subprocess.PIPE, stderr=self._log)  # fmt: skip
        ready, buf = served_ready(self.proc, timeout=120)
        assert ready is not None, buf.decode() + self.log_path.read_text()[-3000:]
        self.ready = ready
        return ready

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        self.close()
        return rc

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)
            assert self.proc.stdout is not None
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def http(self, path: str) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.ready['metrics_port']}{path}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                status, body = r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read().decode()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    def metric(self, name: str, **labels: str) -> float:
        import re

        _, text = self.http("/metrics")
        total = 0.0
        for line in str(text).splitlines():
            if not line.startswith(name + "{"):
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def events(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            rec = json.loads(line)  # every line is one JSON object
            if rec["event"] == event and all(rec.get(k) == v for k, v in fields.items()):
                out.append(rec)
        return out

    def connect(self, model: str, **kw: Any) -> vault.Model:
        return vault.connect(self.ready["endpoint"], licence=str(self.alice),
                             server_key=str(self.root / "worker.pub"), model=model,
                             **kw)  # fmt: skip


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from keyserver import init_dir

    root = tmp_path_factory.mktemp("svcrepo")
    ks_dir = root / "ks"
    init_dir(ks_dir, address="tcp://127.0.0.1:7700")
    ks = KeyServerProcess(ks_dir, lease_ttl=30.0)
    service: Service | None = None
    try:
        ks.start()
        admin = str(ks.admin_licence)
        pk = PublisherKey.load(ks.publisher_key_path)
        staged, repo = root / "staged", root / "repo"
        staged.mkdir()
        repo.mkdir()
        for i, name in enumerate(("good-a", "good-b", "broken", "extra", "late")):
            res = seal(
                mlp(seed=i),
                model_id=name,
                signing_key=pk,
                output=staged / f"{name}.vault",
                batchable=True,
            )  # the publisher declares rows independent (checked)
            ks.register(res.model_id, res.key_id, res.key, res.digest)
        data = bytearray((staged / "broken.vault").read_bytes())
        data[-100] ^= 1  # damaged after sealing: its manifest reads, its payload does not
        (staged / "broken.vault").write_bytes(data)
        for name in ("good-a", "good-b", "broken", "extra"):
            shutil.copy(staged / f"{name}.vault", repo / f"{name}.vault")
        # the service's one licence for three of the repository's models (not 'extra')
        cli("device", "init", str(root / "device"))
        cli("device", "enroll", str(root / "device"), "--licence", admin, "--service")
        cli("licence", "issue", "good-a", "good-b", "broken", "--to", "server",
            "--licence", admin, "-o", str(root / "server.licence"))  # fmt: skip
        cli("licence", "issue", "good-a", "good-b", "extra", "late", "--to", "alice", "--kind",
            "call", "--licence", admin, "-o", str(root / "alice.licence"))  # fmt: skip
        (root / "clients").mkdir()
        cli("worker", "client-key", str(root / "alice.licence"), "-o",
            str(root / "clients" / "alice.key"))  # fmt: skip
        args = ["--repository", str(repo), "--licence", str(root / "server.licence"),
                "--device", str(root / "device"), "--allow", str(root / "clients"),
                "--bind", "tcp://127.0.0.1:0", "--server-key-out", str(root / "worker.pub"),
                "--instances", "2", "--max-batch", "16", "--max-queue-delay-us", "2000",
                "--metrics-port", "0"]  # fmt: skip
        service = Service(root, args, root / "service.log", root / "alice.licence")
        service.start()
        yield service
    finally:
        if service is not None:
            service.close()
        ks.kill()


def test_one_bad_model_leaves_the_others_serving(svc: Service) -> None:
    states = {k: v["state"] for k, v in svc.ready["models"].items()}
    assert states == {"good-a": "READY", "good-b": "READY", "broken": "UNAVAILABLE",
                      "extra": "UNAVAILABLE"}  # fmt: skip
    # the ready line says why each bad one cannot load: the damaged package
    # fails its signature check, no licence of the service covers 'extra'
    assert svc.ready["models"]["broken"]["reason"]["code"] == "integrity"
    assert svc.ready["models"]["extra"]["reason"]["code"] == "wrong_model"
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    for i, name in enumerate(("good-a", "good-b")):
        with svc.connect(name) as m:
            want = reference_pipeline([mlp(seed=i)], {"x": x})["logits"]
            np.testing.assert_allclose(m.compute({"x": x})["logits"], want, rtol=1e-6)
    with pytest.raises(vault.ServiceUnavailableError, match="not available"):
        svc.connect("extra")
    # readiness as Triton and KServe users read it
    assert svc.http("/v2/health/live") == (200, {"live": True})
    assert svc.http("/v2/health/ready") == (200, {"ready": True})
    assert svc.http("/readyz") == (200, "ready\n") and svc.http("/healthz") == (200, "ok\n")
    status, body = svc.http("/v2/models/good-a/ready")
    assert status == 200 and body["ready"] is True and body["state"] == "READY"
    assert svc.http("/v2/models/good-a/versions/1/ready")[0] == 200
    assert svc.http("/v2/models/good-a/versions/2/ready")[0] == 404
    status, body = svc.http("/v2/models/extra/ready")
    assert status == 400 and body["state"] == "UNAVAILABLE"
    assert body["reason"]["code"] == "wrong_model" and "extra" in body["reason"]["message"]
    assert svc.http("/v2/models/nope/ready")[0] == 404
    assert svc.metric("vault_model_ready", model="good-a") == 1
    assert svc.metric("vault_model_ready", model="extra") == 0


def test_a_model_that_cannot_load_is_logged_once_per_attempt(svc: Service) -> None:
    # retried with backoff (1 s, 2 s, ...): wait for a second attempt
    wait_for(lambda: len(svc.events("model_unavailable", model="extra")) >= 2,
             "'extra' is tried a second time")  # fmt: skip
    lines = svc.events("model_unavailable", model="extra")
    # one line per attempt (not one per worker: --instances 2), numbered
    assert [r["attempt"] for r in lines] == list(range(1, len(lines) + 1))
    assert all(r["code"] == "wrong_model" and r["level"] == "error" for r in lines)
    assert "no licence of this service covers model 'extra'" in lines[0]["message"]
    assert lines[1]["retry_in_s"] > lines[0]["retry_in_s"]  # backoff
    assert not svc.events("worker_failed", model="extra")
    broken = svc.events("model_unavailable", model="broken")
    assert broken and broken[0]["code"] == "integrity"
    # every line of the log has the common fields
    for line in svc.log_path.read_text().splitlines():
        rec = json.loads(line)
        assert list(rec)[:4] == ["ts", "level", "component", "event"], rec
        assert rec["component"] == "service"


def test_sighup_adding_an_unlicensed_model_keeps_the_service_ready(svc: Service) -> None:
    assert svc.proc is not None
    shutil.copy(svc.root / "staged" / "late.vault", svc.root / "repo" / "late.vault")
    svc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: svc.events("model_unavailable", model="late"), "'late' is tried")
    assert svc.http("/v2/health/ready") == (200, {"ready": True})
    assert svc.http("/readyz")[0] == 200
    assert svc.http("/v2/models/late/ready")[0] == 400
    with svc.connect("good-b") as m:  # the others serve on
        assert m.compute({"x": np.ones((1, 8), np.float32)})["logits"].shape == (1, 5)


def test_batched_and_metered_and_a_refused_call_is_in_no_batch(svc: Service) -> None:
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1 + i % 3, 8)).astype(np.float32) for i in range(24)]
    calls0 = svc.metric("vault_batch_size_count", model="good-a")
    rows0 = svc.metric("vault_batch_size_sum", model="good-a")
    ok0 = svc.metric("vault_requests_total", model="good-a", licence="alice", code="ok")
    with svc.connect("good-a") as m, ThreadPoolExecutor(12) as pool:
        outs = list(pool.map(lambda x: m.compute({"x": x})["logits"], xs))
        for x, y in zip(xs, outs):
            np.testing.assert_allclose(y, reference_pipeline([mlp(seed=0)], {"x": x})["logits"],
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
        rows = svc.metric("vault_batch_size_sum", model="good-a") - rows0
        calls = svc.metric("vault_batch_size_count", model="good-a") - calls0
        assert rows == sum(len(x) for x in xs) and calls < len(xs)  # batched, every row once
        assert svc.metric("vault_requests_total", model="good-a", licence="alice",
                          code="ok") == ok0 + len(xs)  # fmt: skip
        # 64 rows of the wrong dtype: the worker refuses them, no batch counts them
        with pytest.raises(vault.InputError):
            m.compute({"x": np.ones((64, 8), np.float64)})
        assert svc.metric("vault_batch_size_sum", model="good-a") == rows0 + rows
        assert svc.metric("vault_batch_size_bucket", model="good-a", le="64.0") == \
            svc.metric("vault_batch_size_bucket", model="good-a", le="32.0")  # fmt: skip
        assert svc.metric("vault_requests_total", model="good-a", code="bad_input") >= 1


def test_a_licence_replaced_on_disk_is_used_at_the_next_sighup(svc: Service) -> None:
    assert svc.proc is not None
    admin = str(svc.root / "ks" / "admin.licence")
    cli("licence", "issue", "--all-models", "--to", "server", "--licence", admin,
        "-o", str(svc.root / "server.licence"))  # fmt: skip
    svc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: svc.http("/v2/models/extra/ready")[0] == 200, "'extra' is ready")
    wait_for(lambda: svc.http("/v2/models/late/ready")[0] == 200, "'late' is ready")
    with svc.connect("late") as m:
        want = reference_pipeline([mlp(seed=4)], {"x": np.ones((2, 8), np.float32)})["logits"]
        np.testing.assert_allclose(m.compute({"x": np.ones((2, 8), np.float32)})["logits"], want,
                                   rtol=1e-6)  # fmt: skip
    assert svc.events("model_ready", model="extra")
    assert svc.http("/v2/models/broken/ready")[0] == 400  # a damaged package stays damaged


def test_the_server_key_survives_a_restart(svc: Service) -> None:
    key = svc.ready["server_key"]
    secret = svc.root / "device" / "worker.key_secret"
    assert os.stat(secret).st_mode & 0o777 == 0o600  # kept beside the device, private
    m = svc.connect("good-a", timeout=120)
    try:
        assert m.compute({"x": np.ones((1, 8), np.float32)})["logits"].shape == (1, 5)
        before = m._channel._sealed.state  # type: ignore[union-attr]
        assert before is not None  # the call went sealed
        assert svc.stop() == 0  # a drain: exit 0
        port = svc.ready["endpoint"].rsplit(":", 1)[1]
        svc.args[svc.args.index("tcp://127.0.0.1:0")] = f"tcp://127.0.0.1:{port}"
        svc.args[svc.args.index("--instances") + 1] = "1"  # a faster second start
        svc.args += ["--sealed-port", str(svc.ready["sealed_port"])]  # the same sealed port too
        ready = svc.start()
        assert ready["server_key"] == key
        assert svc.events("server_key_loaded")
        # the connection made before the restart reconnects with the key it holds,
        # and its sealed calls go on under a new session (the restarted service
        # knows none of the old ones: its sealed port refuses the old session at
        # the handshake, and a new one is made; nothing ran twice)
        assert m.compute({"x": np.ones((1, 8), np.float32)})["logits"].shape == (1, 5)
        after = m._channel._sealed.state  # type: ignore[union-attr]
        assert after is not None and after.sealer.sid != before.sealer.sid
    finally:
        m.close()
