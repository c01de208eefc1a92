"""The worker service as its callers and operators see it: real worker
processes, real ZeroMQ with CURVE, real onnxruntime, real HTTP.

The service runs in this process (a thread runs its loop); its workers get
their package keys over the test-only pipe (no key server), so each test
costs what the calls cost. ``test_service_cli.py`` runs the real command.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

import vault
from tests.models import mlp, reference_pipeline, slow_matmul
from tests.sealed import Sealed, seal_for_test
from tests.waiting import wait_for
from vault.core.curvekeys import load_secret_certificate
from vault.core.licence import Licence
from worker.service import AllowListPolicy, JsonLog, LaunchSpec, ServiceConfig, WorkerService


def caller_licence(holder: str) -> Licence:
    """A call licence's CURVE identity (no key server is involved here)."""
    pub, sec = zmq.curve_keypair()
    ks_pub, _ = zmq.curve_keypair()
    return Licence(f"lic-{holder}", holder, "tcp://127.0.0.1:9", ks_pub.decode(), pub.decode(),
                   sec.decode())  # fmt: skip


@dataclass
class Running:
    svc: WorkerService
    thread: threading.Thread
    endpoint: str
    server_key: str
    metrics_port: int
    alice: Licence
    log_path: Path
    sealed: dict[str, Sealed]
    log_stream: Any
    keys_dir: Path

    def connect(self, model: str | None, *, licence: Licence | None = None,
                timeout: float = 20.0) -> vault.Model:  # fmt: skip
        return vault.connect(self.endpoint, licence=licence or self.alice,
                             server_key=self.server_key, model=model, timeout=timeout)  # fmt: skip

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}") as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        _, text = self.http("/metrics")
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{"):
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.svc.request_stop()
        self.thread.join(30)
        self.log_stream.close()
        assert not self.thread.is_alive()


def start_service(tmp: Path, models: dict[str, Any], *, batchable: tuple[str, ...] = (),
                  keygen: bool = False, wrong_keys: bool = False, user: str | None = None,
                  python: str | None = None, **cfg: Any) -> Running:  # fmt: skip
    """The service on ``models``, in this process. ``batchable``: the models
    sealed with the publisher's declaration; ``keygen``: its CURVE keys from
    `vault worker keygen` (the real command); ``wrong_keys``: every worker
    gets a wrong package key (no model can load); ``user``: the workers'
    ``--user``; ``python``: the workers' interpreter."""
    sealed = {name: seal_for_test(tmp, m, name=name, batchable=name in batchable)
              for name, m in models.items()}  # fmt: skip
    alice = caller_licence("alice")
    keys_dir = tmp / "keys"
    if keygen:
        out = subprocess.run([sys.executable, "-m", "vault", "worker", "keygen", str(keys_dir)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        assert "server key:" in out.stdout
        spub, ssec = load_secret_certificate(keys_dir / "worker.key_secret")
    else:
        spub, ssec = zmq.curve_keypair()
    keys = {s.path: bytes(32) if wrong_keys else s.key for s in sealed.values()}
    any_sealed = next(iter(sealed.values()))
    log_path = tmp / "service.log"
    log_stream = open(log_path, "w")  # noqa: SIM115 - closed by the fixture's finaliser
    config = ServiceConfig(
        bind="tcp://127.0.0.1:0",
        packages=[s.path for s in sealed.values()],
        curve=(spub, ssec),
        policy=AllowListPolicy({"alice": alice.client_public_key}),
        metrics_port=0,
        launch=LaunchSpec(
            publisher=any_sealed.publisher_pub, unsafe_test_keys=keys, user=user, python=python
        ),  # fmt: skip
        **cfg,
    )
    try:
        svc = WorkerService(config, log=JsonLog(log_stream, level="debug"))
        ready = svc.start()
    except BaseException:
        log_stream.close()
        raise
    t = threading.Thread(target=svc.run, name="service-loop", daemon=True)
    t.start()
    return Running(svc, t, ready["endpoint"], ready["server_key"], ready["metrics_port"], alice,
                   log_path, sealed, log_stream, keys_dir)  # fmt: skip


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("service")
    models = {"a": mlp(seed=0), "b": mlp(seed=1), "slow": slow_matmul(),
              "fixed": slow_matmul(depth=1, fixed_batch=2)}  # fmt: skip
    run = start_service(tmp, models, instances=2, max_batch=16, max_queue_delay_us=2000,
                        instance_inflight=1, batchable=("slow",), keygen=True)  # fmt: skip
    try:
        yield run
    finally:
        run.stop()


def test_a_root_service_without_user_says_its_workers_run_as_root(
    service: Running, tmp_path: Path
) -> None:
    logged = service.log_path.read_text()
    if os.geteuid() != 0:  # workers of an ordinary user's service are that user's
        assert '"workers_run_as_root"' not in logged
        return
    assert '"workers_run_as_root"' in logged and "--user NAME" in logged
    # control: the same service told to drop its workers to a user says nothing of
    # it (root: a user that can run this interpreter wherever the suite runs)
    run = start_service(tmp_path, {"a": mlp(seed=0)}, user="root")
    try:
        assert '"workers_run_as_root"' not in run.log_path.read_text()
    finally:
        run.stop()


def test_a_workers_user_that_cannot_run_the_install_is_refused_at_start(tmp_path: Path) -> None:
    """A root service told `--user nobody`, from a venv nobody can read (made
    from an interpreter under /root, as a newcomer's was), started, and every
    model read UNAVAILABLE with "worker failed to start (ModuleNotFoundError)"
    (a worker imports as root, drops to the user, and its next import
    failed). Now the start is refused, naming the user, the interpreter and
    the fix. The interpreter here is reached through a directory only root
    may enter, so nobody cannot run it on any machine. Control: the same
    service with a workers' user that can run it (root) starts, and serves.
    A service that is not root drops nothing (its workers run as itself):
    there the check lets the same start through, and it serves."""
    import sysconfig

    # this suite's own install, as a venv in a directory only root may enter
    venv = tmp_path / "private"
    venv.mkdir(mode=0o700)
    (venv / "bin").mkdir()
    python = venv / "bin" / "python3"
    python.symlink_to(os.path.realpath(sys.executable))
    (venv / "pyvenv.cfg").write_text(
        f"home = {os.path.dirname(os.path.realpath(sys.executable))}\n"
        "include-system-site-packages = true\n"
    )
    purelib = Path(sysconfig.get_paths()["purelib"])
    if purelib.is_relative_to(sys.prefix) and sys.prefix != sys.base_prefix:
        site = venv / purelib.relative_to(sys.prefix)
        site.parent.mkdir(parents=True)
        site.symlink_to(purelib)
    if os.geteuid() != 0:  # nothing to drop: workers run as this user, who can run it
        run = start_service(tmp_path, {"a": mlp(seed=0)}, user="nobody", python=str(python))
        try:
            with run.connect("a") as m:
                assert m.compute({"x": np.ones((1, 8), np.float32)})["logits"].shape[0] == 1
        finally:
            run.stop()
        return
    with pytest.raises(vault.ConfigError) as err:
        start_service(tmp_path, {"a": mlp(seed=0)}, user="nobody", python=str(python))
    words = str(err.value)
    assert "'nobody' cannot run" in words and str(python) in words, words
    assert "/usr/bin/python3 -m venv" in words and "Permission denied" in words, words
    (tmp_path / "b").mkdir()
    run = start_service(tmp_path / "b", {"a": mlp(seed=0)}, user="root", python=str(python))
    try:
        with run.connect("a") as m:
            assert m.compute({"x": np.ones((1, 8), np.float32)})["logits"].shape[0] == 1
    finally:
        run.stop()


def test_models_are_routed_by_id_and_agree_with_onnxruntime(service: Running) -> None:
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    for name, seed in (("a", 0), ("b", 1)):
        with service.connect(name) as m:
            assert m.model_id == name
            assert m.inputs == {"x": ("float32", ("N", 8))}
            got = m.compute({"x": x})["logits"]
            want = reference_pipeline([mlp(seed=seed)], {"x": x})["logits"]
            np.testing.assert_allclose(got, want, rtol=1e-6)
            health = m.health()
            assert health["serving"] is True and health["tier"] == 2
            assert "pid" not in health and "kernel" not in health  # nothing about the host
    with pytest.raises(vault.UnknownModelError):
        service.connect(None)  # four models: the caller must name one
    with pytest.raises(vault.UnknownModelError):
        service.connect("nope")


def test_a_stranger_key_is_not_served(service: Running) -> None:
    # the ZAP check refuses the handshake; the client says so, not a timeout
    with pytest.raises(vault.UnknownLicenceError, match="refused this caller's key"):
        service.connect("a", licence=caller_licence("mallory"), timeout=30.0)


def _free_endpoint() -> str:
    with socket.socket() as s:  # a port nothing listens on: a service that stopped
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_a_wrong_server_key_or_no_service_fails_fast_as_what_it_is(service: Running) -> None:
    """Each is said as what it is, within the send timeout (5 s): the calls'
    own timeout is 600 s, so a WorkerTimeoutError would mean it waited."""
    wrong, _ = zmq.curve_keypair()
    with pytest.raises(vault.ConfigError, match="server key given is not this service's") as e:
        vault.connect(service.endpoint, licence=service.alice, server_key=wrong.decode(),
                      model="a", timeout=600)  # fmt: skip
    assert type(e.value) is vault.ConfigError  # the documented class (it was a private one)
    with pytest.raises(vault.ServiceUnavailableError, match="not reachable"):
        vault.connect(_free_endpoint(), licence=service.alice, server_key=service.server_key,
                      model="a", timeout=600)  # fmt: skip


def test_a_service_that_stops_mid_handshake_is_said_to_have_stopped(service: Running) -> None:
    """A service that takes the connection and then stops (SIGTERM while the
    handshake waited on its key server): the connection drops mid-handshake,
    as with a wrong server key, but nothing listens there any more, so the
    caller hears ServiceUnavailableError "it stopped" (it was ConfigError
    "the server key given is not this service's")."""
    listener = socket.create_server(("127.0.0.1", 0))
    endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"

    def stop_mid_handshake() -> None:
        conn, _ = listener.accept()
        listener.close()  # the service is gone ...
        conn.recv(64)  # ... while the caller's greeting was being answered
        conn.close()

    t = threading.Thread(target=stop_mid_handshake, daemon=True)
    t.start()
    with pytest.raises(vault.ServiceUnavailableError, match="during the CURVE handshake"):
        vault.connect(endpoint, licence=service.alice, server_key=service.server_key,
                      model="a", timeout=600)  # fmt: skip
    t.join(30)


def test_replicas_fail_over_and_say_what_is_wrong(service: Running) -> None:
    """Several addresses of one service: a stopped replica is skipped; none
    left is ServiceUnavailableError; a wrong key is a ConfigError at once."""
    dead = _free_endpoint()
    with vault.connect([dead, service.endpoint], licence=service.alice,
                       server_key=service.server_key, model="a", timeout=600) as m:  # fmt: skip
        for _ in range(4):  # turns: every other call starts at the dead replica
            assert m.compute({"x": np.ones((1, 8), np.float32)})["logits"].shape == (1, 5)
    with pytest.raises(vault.ServiceUnavailableError, match="not reachable"):
        vault.connect([dead, _free_endpoint()], licence=service.alice,
                      server_key=service.server_key, model="a", timeout=600)  # fmt: skip
    wrong, _ = zmq.curve_keypair()
    with pytest.raises(vault.ConfigError, match="server key given is not this service's"):
        vault.connect([service.endpoint, service.endpoint], licence=service.alice,
                      server_key=wrong.decode(), model="a", timeout=600)  # fmt: skip


def test_keygen_files_are_what_connect_takes(service: Running) -> None:
    """The module's service runs with `vault worker keygen`'s secret
    certificate; its public certificate, the Z85 text and a one-line file all
    name the service's key."""
    public_cert = service.keys_dir / "worker.key"
    assert os.stat(service.keys_dir / "worker.key_secret").st_mode & 0o777 == 0o600
    one_line = service.keys_dir / "worker.pub"
    one_line.write_text(service.server_key + "\n")
    for key in (str(public_cert), public_cert, service.server_key, str(one_line)):
        with vault.connect(service.endpoint, licence=service.alice, server_key=key,
                           model="a") as m:  # fmt: skip
            assert m.compute({"x": np.ones((1, 8), np.float32)})["logits"].shape == (1, 5)
    with pytest.raises(vault.ConfigError, match="not a server key"):
        vault.connect(service.endpoint, licence=service.alice, server_key=__file__, model="a")


def test_when_no_model_can_load_the_service_stays_up_unready(tmp_path: Path) -> None:
    """Every model fails (here: a wrong package key): start() returns, the
    service is live but not ready, each model unavailable with its reason,
    and it keeps trying them; a call is refused as unavailable."""
    from worker.service.oip import OipConfig

    run = start_service(tmp_path, {"m": mlp()}, instances=1, wrong_keys=True,
                        oip=OipConfig(http_port=0, grpc_port=0))  # fmt: skip
    try:
        assert run.svc.live() and not run.svc.ready()
        assert run.svc.model_state("m") == ("UNAVAILABLE",
                                            ("integrity", "package failed to authenticate or "
                                                          "decrypt"))  # fmt: skip
        assert run.http("/v2/health/live")[0] == 200
        assert run.http("/v2/health/ready")[0] == 400 and run.http("/readyz")[0] == 503
        assert run.http("/v2/models/m/ready")[0] == 400
        with pytest.raises(vault.ServiceUnavailableError):
            run.connect("m")
        assert run.svc.models_status() == [{"name": "m", "version": "1", "state": "UNAVAILABLE",
                                            "reason": "integrity: package failed to "
                                                      "authenticate or decrypt"}]  # fmt: skip
        # the Open Inference Protocol's doors say the same as the probes: the
        # model is served here, not ready (REST 400 as on the metrics port, gRPC
        # ready false, never 404 "no such model"), and its metadata is the
        # manifest's (no key needed)
        rest = f"http://127.0.0.1:{run.svc.http_port}/v2/models/m"
        for url, status in ((rest + "/ready", 400), (rest, 200), (rest + "/versions/1", 200),
                            (rest + "/versions/2/ready", 404), (rest + "x/ready", 404)):  # fmt: skip
            try:
                with urllib.request.urlopen(url) as r:
                    got, body = r.status, json.loads(r.read())
            except urllib.error.HTTPError as exc:
                got, body = exc.code, json.loads(exc.read())
            assert got == status, (url, got, body)
        with urllib.request.urlopen(rest) as r:
            meta = json.loads(r.read())
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]
        import tritonclient.grpc as tritongrpc

        g = tritongrpc.InferenceServerClient(f"127.0.0.1:{run.svc.grpc_port}")
        try:
            assert g.is_model_ready("m") is False and g.is_server_ready() is False
            assert g.get_model_metadata("m", as_json=True)["inputs"][0]["name"] == "x"
        finally:
            g.close()
        wait_for(lambda: '"attempt":2' in run.log_path.read_text(), "a second attempt")
    finally:
        run.stop()


def test_batching_joins_callers_and_splits_results_exactly(service: Running) -> None:
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal((1 + i % 3, 512)).astype(np.float32) for i in range(24)]
    before = service.metric("vault_batch_size_count", model="slow")
    rows_before = service.metric("vault_batch_size_sum", model="slow")
    with service.connect("slow") as m:
        with ThreadPoolExecutor(12) as pool:
            outs = list(pool.map(lambda x: m.compute({"x": x})["y"], inputs))
        stats = m.stats()
    for x, y in zip(inputs, outs):
        assert y.shape == x.shape
        np.testing.assert_allclose(y, reference_pipeline([slow_matmul()], {"x": x})["y"],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    calls = service.metric("vault_batch_size_count", model="slow") - before
    rows = service.metric("vault_batch_size_sum", model="slow") - rows_before
    assert rows == sum(len(x) for x in inputs)  # every row went to a worker exactly once
    assert calls < len(inputs)  # and some calls shared a worker call
    assert stats["batches"] >= 1


def test_a_callers_own_batch_is_never_split(service: Running) -> None:
    x = np.random.default_rng(3).standard_normal((40, 512)).astype(np.float32)  # > max_batch 16
    before = service.metric("vault_batch_size_bucket", model="slow", le="64.0")
    small = service.metric("vault_batch_size_bucket", model="slow", le="32.0")
    with service.connect("slow") as m:
        y = m.compute({"x": x})["y"]
    np.testing.assert_allclose(y, reference_pipeline([slow_matmul()], {"x": x})["y"],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    # one worker call of 40 rows: the <=64 bucket grew, the <=32 one did not
    assert service.metric("vault_batch_size_bucket", model="slow", le="64.0") == before + 1
    assert service.metric("vault_batch_size_bucket", model="slow", le="32.0") == small


def test_a_model_not_declared_batchable_is_not_batched(service: Running) -> None:
    # "fixed" was sealed without the declaration ("a" and "b" too, though
    # their signature is ["N", 8] -> ["N", 5]): calls are never joined
    assert service.svc.models["fixed"].batchable is False
    assert service.svc.models["a"].batchable is False
    assert service.svc.models["slow"].batchable is True
    assert "not declared batchable" in service.svc.models["a"].batching_why
    x = np.ones((2, 512), np.float32)
    with service.connect("fixed") as m, ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda _: m.compute({"x": x})["y"], range(12)))
    assert all(o.shape == (2, 512) for o in outs)
    assert service.metric("vault_batch_size_sum", model="fixed") == 2 * 12


@contextlib.contextmanager
def held(instances: list[Any]) -> Iterator[None]:
    """The workers stopped (SIGSTOP) until the block ends: a call sent to one
    stays in flight for as long as a test needs, on any machine's speed."""
    pids = [i.pid for i in instances]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        # kill() returns before the stop takes hold: on a loaded machine a
        # worker answered a call sent right after it; wait until every thread is stopped
        wait_for(lambda: all(_stopped(pid) for pid in pids), "the workers are stopped")
        yield
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def _stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (state T in /proc), or it is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
        states = []
        for tid in tids:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as fh:
                states.append(fh.read().rsplit(b")", 1)[1].split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return True
    return all(st in (b"T", b"t", b"Z", b"X") for st in states)


def test_a_crashed_worker_fails_its_call_fast_and_is_restarted(service: Running) -> None:
    m_state = service.svc.models["slow"]
    restarts = service.metric("vault_worker_restarts_total", model="slow")
    ok_before = service.metric("vault_requests_total", model="slow", outcome="success")
    x = np.ones((8, 512), np.float32)
    with service.connect("slow", timeout=60) as m, ThreadPoolExecutor(1) as pool:
        with held(list(m_state.instances)):
            fut = pool.submit(m.compute, {"x": x})
            wait_for(
                lambda: any(i.inflight for i in m_state.instances), "the call reaches a worker"
            )
            busy = [i for i in m_state.instances if i.inflight][0]
            os.kill(busy.pid, signal.SIGKILL)
            # answered while the other worker is still stopped: the service saw the
            # death itself (its pidfd), it did not wait for the call's 60 s timeout
            with pytest.raises(vault.WorkerCrashedError):
                fut.result(timeout=30)
        # the other worker serves the next call at once
        assert m.compute({"x": np.ones((1, 512), np.float32)})["y"].shape == (1, 512)
        wait_for(lambda: len(m_state.instances) == 2, "the crashed worker is restarted")
    assert service.metric("vault_worker_restarts_total", model="slow") == restarts + 1
    # the crashed call counted once, as a failure; only the completed call as a success
    assert service.metric("vault_requests_total", model="slow", code="worker_crashed") >= 1
    assert service.metric("vault_requests_total", model="slow", outcome="success") == ok_before + 1


def test_a_timed_out_call_frees_its_slot(service: Running) -> None:
    m_state = service.svc.models["slow"]
    x = np.ones((8, 512), np.float32)
    with service.connect("slow", timeout=60) as m, ThreadPoolExecutor(2) as pool:
        with held(list(m_state.instances)):
            # both workers hold a call (one in flight each); a third call waits
            # in the queue and times out there, while both are still stopped
            longs = []
            for n in (1, 2):  # one at a time: two queued together would be one batch
                longs.append(pool.submit(m.compute, {"x": x}))
                wait_for(lambda n=n: sum(i.inflight for i in m_state.instances) == n,
                         f"{n} worker(s) are busy")  # fmt: skip
            timeouts = service.metric("vault_requests_total", model="slow", code="timeout")
            with pytest.raises(vault.WorkerTimeoutError):
                m.compute({"x": np.ones((1, 512), np.float32)}, timeout=0.3)
            # the service itself gives the queued call up (its deadline came from
            # the caller), still with both workers stopped
            wait_for(lambda: service.metric("vault_requests_total", model="slow",
                                            code="timeout") == timeouts + 1,
                     "the service answers the queued call's timeout")  # fmt: skip
        assert all(f.result(timeout=60)["y"].shape == (8, 512) for f in longs)
    # the abandoned call never reached a worker and left no slot behind
    assert all(i.inflight == 0 for i in m_state.instances)
    assert service.metric("vault_inflight", model="slow") == 0


def test_bad_input_gets_a_typed_error_and_the_service_goes_on(service: Running) -> None:
    with service.connect("a") as m:
        with pytest.raises(vault.InputError):
            m.compute({"x": np.ones((2, 3), np.float32)})
        with pytest.raises(vault.InputError):
            m.compute({"nope": np.ones((2, 8), np.float32)})
        assert m.compute({"x": np.ones((2, 8), np.float32)})["logits"].shape == (2, 5)


def test_probes_metrics_and_logs(service: Running) -> None:
    assert service.http("/healthz") == (200, "ok\n")
    assert service.http("/readyz") == (200, "ready\n")
    assert service.http("/nope")[0] == 404
    with service.connect("b") as m:
        for _ in range(3):
            m.compute({"x": np.full((1, 8), 0.123456, np.float32)})
    assert (
        service.metric("vault_requests_total", model="b", licence="alice", outcome="success") >= 3
    )
    assert service.metric("vault_compute_seconds_count", model="b") >= 3
    assert service.metric("vault_queue_seconds_count", model="b") >= 3
    assert service.metric("vault_instances", model="b", state="ready") == 2
    lines = service.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any(r["event"] == "call" and r.get("model") == "b" for r in records)
    text = service.log_path.read_text()
    assert "secret_" not in text  # no node or weight names
    assert "0.123456" not in text and "0.12345" not in text  # no tensor values


def test_drain_finishes_calls_in_flight_and_refuses_new_ones(tmp_path: Path) -> None:
    run = start_service(tmp_path, {"slow": slow_matmul()}, instances=1, drain_timeout=30)
    try:
        m_state = run.svc.models["slow"]
        big = np.ones((2048, 512), np.float32)  # a 4 MiB answer: it must leave before the exit
        with run.connect("slow", timeout=60) as m, ThreadPoolExecutor(1) as pool:
            with held(list(m_state.instances)):
                fut = pool.submit(m.compute, {"x": big})
                wait_for(lambda: any(i.inflight for i in m_state.instances),
                         "the call reaches the worker")  # fmt: skip
                run.svc.request_stop()
                wait_for(lambda: run.http("/readyz")[0] == 503, "readiness turns 503")
                with pytest.raises(vault.ServiceUnavailableError):
                    m.compute({"x": np.ones((1, 512), np.float32)})
            y = fut.result(timeout=60)["y"]  # finished, not dropped
            np.testing.assert_allclose(y, reference_pipeline([slow_matmul()], {"x": big})["y"],
                                       rtol=1e-4, atol=1e-4)  # fmt: skip
            run.thread.join(30)
            assert not run.thread.is_alive()
            # a stopped service drops the connection: the next call fails as
            # such, not as a 60 s timeout on a request nobody reads
            with pytest.raises((vault.WorkerCrashedError, vault.ServiceUnavailableError)):
                m.compute({"x": np.ones((1, 512), np.float32)})
    finally:
        run.stop()
    events = [json.loads(x)["event"] for x in run.log_path.read_text().splitlines()]
    assert events.index("drain_started") < events.index("drain_finished")
    assert json.loads(run.log_path.read_text().splitlines()[-2])["unfinished"] == 0


def test_a_sequence_output_too_long_for_the_protocol_is_a_prompt_typed_error(
    tmp_path: Path,
) -> None:
    """skl2onnx's ZipMap over 20,000 rows: a descriptor and two frames a row,
    a 3 MB header, past what a receiver takes (1 MiB). Before, the service
    could not read its worker's answer: the caller waited out its timeout
    (60 s), and the worker was killed as stuck. The worker now says so at
    once (ComputeError naming the limits), locally and through the service,
    and serves the next call; 2,000 rows pass, equal to onnxruntime."""
    from onnx import TensorProto, helper

    zipmap = helper.make_model(
        helper.make_graph(
            [helper.make_node("ZipMap", ["probs"], ["scores"], domain="ai.onnx.ml",
                              classlabels_int64s=[0, 1, 2])],
            "z", [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
            [helper.make_value_info("scores", helper.make_sequence_type_proto(
                helper.make_map_type_proto(TensorProto.INT64,
                                           helper.make_tensor_type_proto(TensorProto.FLOAT, []))))],
        ),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)],
    )  # fmt: skip
    zipmap.ir_version = 8
    run = start_service(tmp_path, {"z": zipmap})
    rng = np.random.default_rng(0)
    try:
        with run.connect("z", timeout=60.0) as m:
            t0 = time.monotonic()
            with pytest.raises(vault.ComputeError, match="does not fit the protocol"):
                m.compute({"probs": rng.random((20_000, 3), dtype=np.float32)})
            assert time.monotonic() - t0 < 30  # an answer, not a timeout
            probs = rng.random((2_000, 3), dtype=np.float32)
            got = m.compute({"probs": probs})["scores"]
            want = reference_pipeline([zipmap], {"probs": probs})["scores"]
            assert got == want
        from tests.sealed import open_sealed

        with open_sealed(run.sealed["z"]) as local:
            with pytest.raises(vault.ComputeError, match="does not fit the protocol"):
                local.compute({"probs": rng.random((20_000, 3), dtype=np.float32)})
            assert local.compute({"probs": probs})["scores"] == want
    finally:
        run.stop()
    assert '"worker_stuck"' not in run.log_path.read_text()


def test_service_workers_never_run_longer_calls_on_their_router_thread(service: Running) -> None:
    """The service's one connection to a worker carries every caller's calls,
    so the worker cannot tell them apart: its longer calls must go to its pool
    (``--inline-max-ms 0``), never run where another caller's would wait for
    them (docs/worker.md)."""
    for state in service.svc.models.values():
        for inst in state.instances:
            with open(f"/proc/{inst.pid}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
            at = args.index(b"--inline-max-ms")
            assert args[at + 1] == b"0", args
