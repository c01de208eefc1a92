"""Several hosts on one machine: a key server, two worker-service hosts and a
client, each in its own network namespace, joined by veth pairs to a bridge
(real TCP between real addresses). One worker host is killed (every process
in its namespace, SIGKILL) while the client is calling; the client's calls go
on on the other host, none is lost, and the key server counts none twice.

Needs root and iproute2 (both are the case here, CI included); the
namespaces get names unique to the run and are always deleted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq.auth

from tests.models import mlp, reference_pipeline
from tests.prereq import require
from vault.core.crypto import PublisherKey
from vault.core.device import record_keyserver
from vault.core.launch import read_ready_line
from vault.core.licence import Licence
from vault.sealing import seal


@pytest.fixture(autouse=True)
def _namespaces_possible() -> None:
    require(os.geteuid() == 0 and shutil.which("ip") is not None,
            "root and iproute2, for network namespaces")  # fmt: skip


ROOT = Path(__file__).resolve().parents[2]
SUBNET = "10.231.77"  # addresses that exist only inside this test's namespaces
HOSTS = {"ks": 1, "w1": 2, "w2": 3, "cl": 4}
N_CALLS = 300


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


class Net:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.ns = {h: f"vt{tag}{h}" for h in (*HOSTS, "hub")}
        self.addr = {h: f"{SUBNET}.{n}" for h, n in HOSTS.items()}
        self.made: list[str] = []
        self.tag = tag

    def up(self) -> None:
        hub = self.ns["hub"]
        _ip("netns", "add", hub)
        self.made.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for h in HOSTS:
            ns = self.ns[h]
            _ip("netns", "add", ns)
            self.made.append(ns)
            outer, inner = f"vo{self.tag}{h}", f"vi{self.tag}{h}"
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", outer, "netns", hub)
            _ip("link", "set", inner, "netns", ns)
            _ip("-n", hub, "link", "set", outer, "master", "br0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[h]}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")

    def pids(self, host: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns[host]], capture_output=True,
                             text=True, timeout=20)  # fmt: skip
        return [int(p) for p in out.stdout.split()]

    def kill_host(self, host: str) -> None:
        for pid in self.pids(host):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def down(self) -> None:
        for h in HOSTS:
            if self.ns[h] in self.made:
                self.kill_host(h)
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self.made.clear()

    def popen(self, host: str, args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.Popen(["ip", "netns", "exec", self.ns[host], sys.executable, *args],
                                env=env, **kw)  # fmt: skip


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    try:
        n.up()
        yield n
    finally:
        n.down()
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert n.tag not in left


CLIENT = textwrap.dedent(
    """
    import json, sys, threading, urllib.request
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    import vault
    endpoints, key, lic, inputs, want, metrics = sys.argv[1:7]
    xs, ys = np.load(inputs), np.load(want)
    done = [0]
    lock = threading.Lock()
    errors = []
    with vault.connect(endpoints.split(","), licence=lic, server_key=key, model="m",
                       timeout=30) as m:
        def one(i):
            try:
                y = m.compute({"x": xs[i:i + 1]})["logits"]
                ok = bool(np.allclose(y, ys[i:i + 1], rtol=1e-5))
            except Exception as exc:
                ok = False
                errors.append(type(exc).__name__)
            with lock:
                done[0] += ok
                print(json.dumps({"done": done[0]}), flush=True)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(len(xs))))
    text = urllib.request.urlopen(metrics).read().decode()
    served = sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                 if l.startswith("vault_requests_total{") and 'outcome="success"' in l)
    print(json.dumps({"final": done[0], "errors": errors, "served_by_w2": served}), flush=True)
    """
)

USAGE = textwrap.dedent(
    """
    import json, sys
    from vault.core.keyclient import KeyServerClient
    with KeyServerClient(sys.argv[1]) as ks:
        rows = {r["licence_id"]: r for r in ks.list()}
    print(json.dumps(rows[sys.argv[2]]["used_calls"]))
    """
)


def _moved(lic: Licence, address: str) -> Licence:
    return dataclasses.replace(lic, keyserver_address=address)


def test_killing_a_worker_host_mid_load_loses_no_call(
    keyserver: Any, net: Net, tmp_path: Path
) -> None:
    # set up on the loopback key server, then move it into its namespace
    pk = PublisherKey.load(keyserver.publisher_key_path)
    res = seal(mlp(), model_id="m", signing_key=pk, output=tmp_path / "m.vault")
    keyserver.register(res.model_id, res.key_id, res.key, res.digest)
    ks_addr = f"tcp://{net.addr['ks']}:7700"
    svc_lic = tmp_path / "service.licence"
    _moved(keyserver.issue("m", holder="service"), ks_addr).save(svc_lic)
    alice = keyserver.issue("m", holder="alice", kind="call")
    alice_path = tmp_path / "alice.licence"
    _moved(alice, ks_addr).save(alice_path)
    admin = tmp_path / "admin.licence"
    _moved(Licence.load(keyserver.admin_licence), ks_addr).save(admin)
    devices = {h: tmp_path / f"device-{h}" for h in ("w1", "w2")}
    for d in devices.values():
        keyserver.enroll(d)
        # the key server each host dials is the one fixed at enrolment: here the
        # address it has in its namespace (as `vault device enroll DIR` with this
        # admin licence records it)
        record_keyserver(d, address=ks_addr, public_key=keyserver.ready["server_key"])
    _, secret = zmq.auth.create_certificates(str(tmp_path), "service")  # both replicas'
    os.chmod(secret, 0o600)  # pyzmq leaves it to the umask; the service takes it 0600 only
    xs = np.random.default_rng(5).standard_normal((N_CALLS, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", xs)
    np.save(tmp_path / "y.npy", reference_pipeline([mlp()], {"x": xs})["logits"])
    keyserver.stop()

    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(tmp_path / "ks.log", "wb") as fh:  # stdout: the one JSON ready line
            ks = net.popen("ks", ["-u", "-m", "keyserver", "serve", str(keyserver.dir),
                                  "--bind", ks_addr, "--lease-ttl", "2", "--advertise", ks_addr],
                           stdout=subprocess.PIPE, stderr=fh)  # fmt: skip
        procs.append(ks)
        assert ks.stdout is not None
        read_ready_line(ks.stdout, proc=ks, timeout=30, what="key server")
        endpoints = []
        for h in ("w1", "w2"):
            ep = f"tcp://{net.addr[h]}:7701"
            w = net.popen(h, ["-m", "vault", "worker", "serve", str(res.path),
                              "--licence", str(svc_lic), "--device", str(devices[h]),
                              "--call-licences", "--bind", ep,
                              "--server-secret", str(tmp_path / "service.key_secret"),
                              "--instances", "1", "--metrics-host", net.addr[h],
                              "--metrics-port", "9100"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
            procs.append(w)
            endpoints.append(ep)
        for w in procs[1:]:
            assert w.stdout is not None
            while not (line := w.stdout.readline()).startswith(b"{"):  # the JSON ready line
                assert line, "a worker host did not start"
            assert json.loads(line)["ready"] is True
        server_key = zmq.auth.load_certificate(str(tmp_path / "service.key"))[0].decode()
        (tmp_path / "client.py").write_text(CLIENT)
        client = net.popen("cl", [str(tmp_path / "client.py"), ",".join(endpoints), server_key,
                                  str(alice_path), str(tmp_path / "x.npy"),
                                  str(tmp_path / "y.npy"),
                                  f"http://{net.addr['w2']}:9100/metrics"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        procs.append(client)
        assert client.stdout is not None
        killed_at = None
        final: dict[str, Any] = {}
        for raw in client.stdout:
            msg = json.loads(raw)
            if killed_at is None and msg.get("done", 0) >= N_CALLS // 3:
                net.kill_host("w1")  # the whole host: its service and its workers
                killed_at = msg["done"]
            if "final" in msg:
                final = msg
        assert client.wait(60) == 0, client.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        assert killed_at is not None and killed_at < N_CALLS
        assert final["errors"] == []
        assert final["final"] == N_CALLS  # every call answered, and answered right
        procs[2].send_signal(signal.SIGTERM)  # w2 drains and reports its usage
        assert procs[2].wait(30) == 0
        q = net.popen("cl", ["-c", USAGE, str(admin), alice.licence_id], stdout=subprocess.PIPE)
        used = int(json.loads(q.communicate(timeout=60)[0]))
        # never counted twice: the key server saw at most one count per call;
        # and at least every call the surviving host served
        assert final["served_by_w2"] <= used <= N_CALLS
        assert final["served_by_w2"] > N_CALLS - killed_at - 1  # the rest went on on w2
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
            for stream in (p.stdout, p.stderr):
                if stream is not None:
                    stream.close()
