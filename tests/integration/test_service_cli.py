"""``vault worker serve`` as an operator runs it: a repository rescanned on
SIGHUP, a real key server releasing each worker's key, and stops that never
hang (the signal handlers only wake the loop)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

import vault
from tests.conftest import served_ready
from tests.models import mlp
from tests.sealed import seal_for_test
from vault.core.crypto import PublisherKey
from vault.core.launch import read_ready_line, spawn_worker
from vault.core.licence import Licence
from vault.core.process import stop_process
from vault.sealing import seal


def _serve(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "vault", "worker", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # fmt: skip


def _wait_for_lines(proc: subprocess.Popen[bytes], timeout: float = 60) -> dict[str, Any]:
    """The service's JSON ready line (its initial load has finished)."""
    ready, buf = served_ready(proc, timeout)
    assert ready is not None, buf.decode() + (
        proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ""  # type: ignore[union-attr]
    )
    return ready


@pytest.fixture
def fake_licence(tmp_path: Path) -> Path:
    pub, sec = zmq.curve_keypair()
    path = tmp_path / "svc.licence"
    Licence("x", "svc", "tcp://127.0.0.1:9", pub.decode(), pub.decode(), sec.decode(),
            model_id="*", same_user=True).save(path)  # fmt: skip
    return path


@pytest.mark.parametrize("kind", ["call", "admin"])
def test_a_licence_that_never_gives_a_key_is_refused_at_start(tmp_path: Path, kind: str) -> None:
    """A call or admin licence as the service's own --licence: refused before
    anything starts, naming the file and the runtime licence to issue (it
    used to print a ready line with every model UNAVAILABLE and retry
    forever)."""
    pub, sec = zmq.curve_keypair()
    path = tmp_path / f"{kind}.licence"
    Licence("x", "svc", "tcp://127.0.0.1:9", pub.decode(), pub.decode(), sec.decode(),
            model_id=None if kind == "admin" else "*", same_user=True,
            role="admin" if kind == "admin" else "caller", kind=kind).save(path)  # fmt: skip
    repo = tmp_path / "models"
    repo.mkdir()
    out = subprocess.run([sys.executable, "-m", "vault", "worker", "serve", "--repository",
                          str(repo), "--licence", str(path), "--bind", "ipc://" + str(tmp_path / "s")],
                         capture_output=True, timeout=60)  # fmt: skip
    err = out.stderr.decode()
    assert out.returncode == 2, err
    assert b"ready" not in out.stdout
    assert str(path) in err and f"{kind} licence" in err and "runtime licence" in err, err
    assert "vault licence issue --all-models --to service" in err, err


def test_the_ready_line_says_not_ready_when_no_model_can_serve(tmp_path: Path) -> None:
    """Every model unavailable (here: no licence of the service covers it; a
    key server that is down does the same): the one JSON line still comes
    once the service listens, with its ports, but says ``"ready": false``, as
    /v2/health/ready does, and each model's state and reason say why (it
    used to say ``"ready": true`` while the probe answered 400)."""
    sealed = seal_for_test(tmp_path, mlp(), name="m")
    pub, sec = zmq.curve_keypair()
    lic = tmp_path / "svc.licence"
    Licence("x", "svc", "tcp://127.0.0.1:9", pub.decode(), pub.decode(), sec.decode(),
            model_id="other", same_user=True).save(lic)  # fmt: skip
    proc = _serve([sealed.path, "--licence", str(lic), "--bind", f"ipc://{tmp_path}/s.sock",
                   "--metrics-port", "0", "--instances", "1"])  # fmt: skip
    try:
        ready = _wait_for_lines(proc)
        assert ready["ready"] is False, ready
        assert ready["models"]["m"]["state"] == "UNAVAILABLE", ready
        assert ready["models"]["m"]["reason"]["code"] == "wrong_model", ready
        assert ready["endpoint"] and ready["metrics_port"], ready
        url = f"http://127.0.0.1:{ready['metrics_port']}/v2/health/ready"
        with pytest.raises(urllib.error.HTTPError) as probe:
            urllib.request.urlopen(url, timeout=30)
        assert probe.value.code == 400 and json.loads(probe.value.read()) == {"ready": False}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        stop_process(proc)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_the_service_stops_cleanly_every_time(tmp_path: Path, fake_licence: Path) -> None:
    """24 SIGTERMs at random moments after start: each stop exits 0 at once
    (the hang this replaces took a lock inside the signal handler, about one
    stop in five: 24 stops miss it with a probability of 0.8**24, 0.5 %; 50
    took a minute at load 10)."""
    repo = tmp_path / "repo"
    repo.mkdir()

    def start_and_stop(i: int) -> None:
        proc = _serve(["--repository", str(repo), "--licence", str(fake_licence),
                       "--bind", f"ipc://{tmp_path}/s{i}.sock", "--metrics-port", "0"])  # fmt: skip
        try:
            _wait_for_lines(proc, 60)
            time.sleep(random.Random(i).uniform(0, 0.03))
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=20)  # a hang is forever; 20 s is slack for a loaded machine
            assert rc == 0, (i, proc.stderr.read().decode()[-1000:])  # type: ignore[union-attr]
        finally:
            stop_process(proc)
            proc.stdout.close()  # type: ignore[union-attr]
            proc.stderr.close()  # type: ignore[union-attr]

    # four at a time: the suite's budget, and more signal races per second
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(start_and_stop, range(24)))


def test_a_worker_stops_on_sigterm_every_time(tmp_path: Path) -> None:
    sealed = seal_for_test(tmp_path, mlp())
    for i in range(3):
        status_r, status_w = os.pipe()
        key_r, key_w = os.pipe()
        proc = spawn_worker([sealed.path, "--endpoint", f"ipc://{tmp_path}/w{i}.sock",
                             "--status-fd", str(status_w), "--unsafe-test-key-fd", str(key_r),
                             "--publisher", sealed.publisher_pub],
                            pass_fds=[status_w, key_r])  # fmt: skip
        os.close(status_w)
        os.close(key_r)
        os.write(key_w, sealed.key)
        os.close(key_w)
        try:
            read_ready_line(status_r, timeout=30, proc=proc)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0, i
        finally:
            os.close(status_r)
            stop_process(proc)


@pytest.fixture
def repository(keyserver: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    pk = PublisherKey.load(keyserver.publisher_key_path)
    staged = tmp_path / "staged"
    staged.mkdir()
    repo = tmp_path / "repo"
    repo.mkdir()
    licences = []
    for name, seed in (("m1", 0), ("m2", 1)):
        res = seal(mlp(seed=seed), model_id=name, signing_key=pk, output=staged / f"{name}.vault")
        keyserver.register(res.model_id, res.key_id, res.key, res.digest)
        lic_path = tmp_path / f"service-{name}.licence"
        keyserver.issue(name, holder=f"service-{name}").save(lic_path)
        licences += ["--licence", str(lic_path)]
    alice = keyserver.issue("m1", holder="alice")
    clients = tmp_path / "clients"
    clients.mkdir()
    (clients / "alice.key").write_text(alice.client_public_key + "\n")
    keyserver.enroll(tmp_path / "device")  # the service runs as an enrolled device
    yield {"staged": staged, "repo": repo, "licences": licences, "alice": alice,
           "clients": clients, "device": tmp_path / "device"}  # fmt: skip


def test_a_repository_is_rescanned_on_sighup(repository: dict[str, Any], tmp_path: Path) -> None:
    r = repository
    shutil.copy(r["staged"] / "m1.vault", r["repo"] / "m1.vault")
    proc = _serve(["--repository", str(r["repo"]), *r["licences"], "--bind", "tcp://127.0.0.1:0",
                   "--allow", str(r["clients"]), "--instances", "1", "--metrics-port", "0",
                   "--device", str(r["device"])])  # fmt: skip
    try:
        ready = _wait_for_lines(proc)
        endpoint, key = ready["endpoint"], ready["server_key"]
        x = np.ones((2, 8), np.float32)

        def connect(model: str) -> vault.Model:
            return vault.connect(endpoint, licence=r["alice"], server_key=key, model=model,
                                 timeout=10)  # fmt: skip

        with connect("m1") as m:
            assert m.compute({"x": x})["logits"].shape == (2, 5)
        with pytest.raises(vault.UnknownModelError):
            connect("m2")
        shutil.copy(r["staged"] / "m2.vault", r["repo"] / "m2.vault")
        os.remove(r["repo"] / "m1.vault")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:
            try:
                with connect("m2") as m:
                    assert m.compute({"x": x})["logits"].shape == (2, 5)
                break
            except (vault.UnknownModelError, vault.ServiceUnavailableError):  # not yet / loading
                assert time.monotonic() < deadline, "m2 never came up"
                time.sleep(0.2)
        with pytest.raises(vault.UnknownModelError):
            connect("m1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        log = proc.stderr.read().decode()  # type: ignore[union-attr]
        assert '"event":"model_added","model":"m2"' in log
        assert '"event":"model_retired","model":"m1"' in log
    finally:
        stop_process(proc)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
