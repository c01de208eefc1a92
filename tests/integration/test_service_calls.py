"""Per-caller call licences on the worker service, against a real key server.

The service runs as an enrolled device; its workers get their package key
with its runtime licence; each caller connects with the CURVE key of its own
*call* licence, and every call is checked (revoked, expired, quota, rate,
model) against decisions the key server makes and the service caches for at
most one lease (the fixture's lease is 2 s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
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
from tests.models import mlp, slow_matmul
from tests.waiting import wait_for
from vault.core.crypto import PublisherKey
from vault.core.keyclient import KeyServerClient
from vault.core.licence import Licence
from vault.sealing import seal
from worker.service import JsonLog, LaunchSpec, ServiceConfig, WorkerService
from worker.service.calls import CallLicencePolicy

X = np.ones((1, 8), np.float32)


class FaultyKeyServer:
    """In front of the real key server's ``call_decisions``: ``fail_next``
    makes the next request that asks for a decision fail, either before it
    is sent (``"request"``) or after the key server answered it, the answer
    lost on the way back (``"answer"``): what a dropped connection does."""

    def __init__(self, ask: Any) -> None:
        self.ask = ask
        self.fail_next: str | None = None
        self.faults = 0
        self.gone = False  # every request fails: the key server is unreachable

    def __call__(self, model: Any, keys: Any, usage: Any, grants: Any) -> Any:
        if self.gone:
            raise vault.KeyServerUnavailableError("injected: the key server is gone")
        fault = self.fail_next if model is not None and keys else None
        if fault == "request":
            self.fail_next, self.faults = None, self.faults + 1
            raise vault.KeyServerUnavailableError("injected: the request was lost")
        out = self.ask(model, keys, usage, grants)
        if fault == "answer":
            self.fail_next, self.faults = None, self.faults + 1
            raise vault.KeyServerUnavailableError("injected: the answer was lost")
        return out


class Svc:
    def __init__(self, keyserver: Any, tmp: Path, model: Any = None, *, batchable: bool = False,
                 **cfg: Any) -> None:  # fmt: skip
        pk = PublisherKey.load(keyserver.publisher_key_path)
        model = model if model is not None else mlp()
        res = seal(model, model_id="m", signing_key=pk, output=tmp / "m.vault",
                   batchable=batchable)  # fmt: skip
        keyserver.register(res.model_id, res.key_id, res.key, res.digest)
        self.keyserver = keyserver
        self.device = keyserver.enroll(tmp / "device")
        self.licence = keyserver.issue("m", holder="service")  # runtime: the workers' key
        self.ks = KeyServerClient(self.licence, device=self.device)
        self.faulty = FaultyKeyServer(
            lambda model, keys, usage, grants: self.ks.call_decisions(
                model_id=model, keys=keys, usage=usage, grants=grants)
        )  # fmt: skip
        self.policy = CallLicencePolicy(self.faulty)
        spub, ssec = zmq.curve_keypair()
        self.server_key = spub.decode()
        self.log = open(tmp / "service.log", "w")  # noqa: SIM115 - closed in stop()
        config = ServiceConfig(
            bind="tcp://127.0.0.1:0", packages=[str(res.path)], curve=(spub, ssec),
            policy=self.policy, metrics_port=0,
            launch=LaunchSpec(licence=self.licence, device=self.device), **cfg,
        )  # fmt: skip
        self.log_path = tmp / "service.log"
        self.svc = WorkerService(config, log=JsonLog(self.log))
        self.endpoint = self.svc.start()["endpoint"]
        self.thread = threading.Thread(target=self.svc.run, daemon=True)
        self.thread.start()

    def caller(self, **limits: Any) -> Licence:
        return self.keyserver.issue(limits.pop("model", "m"), kind="call", **limits)  # type: ignore[no-any-return]

    def connect(self, lic: Licence, timeout: float = 10.0) -> vault.Model:
        return vault.connect(self.endpoint, licence=lic, server_key=self.server_key, model="m",
                             timeout=timeout)  # fmt: skip

    def used(self, lic: Licence) -> int:
        return int(self.row(lic)["used_calls"])

    def row(self, lic: Licence) -> dict[str, Any]:
        with self.keyserver.admin() as ks:
            rows = {r["licence_id"]: r for r in ks.list()}
        return rows[lic.licence_id]  # type: ignore[no-any-return]

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


def test_a_service_stopping_without_its_key_server_says_what_it_could_not_report(
    keyserver: Any, tmp_path: Path
) -> None:
    logs = {}
    for gone in (True, False):  # False: the control, the key server still there
        (tmp_path / str(gone)).mkdir()
        s = Svc(keyserver, tmp_path / str(gone))
        try:
            lic = s.caller(max_calls=10)
            with s.connect(lic) as m:
                m.compute({"x": X})
            s.faulty.gone = gone
        finally:
            s.stop()
        logs[gone] = Path(s.log.name).read_text()
    assert '"usage_unreported"' in logs[True], logs[True][-2000:]
    assert '"usage_unreported"' not in logs[False]
    assert '"service_stopped"' in logs[True] and '"service_stopped"' in logs[False]


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


@contextlib.contextmanager
def _long_lease_service(keyserver_dir: Path, tmp_path: Path, **kw: Any) -> Iterator[Svc]:
    """A service on a key server of its own whose leases last a minute: a
    worker frozen for seconds keeps its key. Both stopped on the way out."""
    from tests.conftest import KeyServerProcess

    keyserver = KeyServerProcess(keyserver_dir, lease_ttl=60.0)
    keyserver.start()
    try:
        s = Svc(keyserver, tmp_path, **kw)
        try:
            yield s
        finally:
            s.stop()
    finally:
        keyserver.kill()


def _compute_in_thread(m: vault.Model, x: np.ndarray) -> tuple[threading.Thread, dict[str, Any]]:
    """``m.compute({"x": x})`` on a thread of its own (started): the dict
    gets its output ``y``, or the ``error`` it raised."""
    got: dict[str, Any] = {}

    def call() -> None:
        try:
            got["y"] = m.compute({"x": x})["y"]
        except vault.VaultError as exc:
            got["error"] = exc

    t = threading.Thread(target=call)
    t.start()
    return t, got


def _freeze(pid: int) -> None:
    """SIGSTOP, and wait until the kernel has stopped it (a request sent a
    moment after the signal was sometimes served before it took)."""
    import signal

    os.kill(pid, signal.SIGSTOP)

    def state() -> str:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]

    wait_for(lambda: state() in ("T", "t"), timeout=10, what=f"worker {pid} stopped")


def test_an_abandoned_call_counts_and_its_stuck_worker_fails_no_other_callers_call(
    keyserver_dir: Path, tmp_path: Path
) -> None:
    """A caller sent 15 s of compute with a 0.3 s timeout: answered at once,
    billed nothing, its worker busy all along; 41 such calls in 45 s. And a
    full timeout past that deadline the service killed the busy worker with
    another caller's call on it (answered `worker_crashed`). Now a call
    answered a timeout counts once its worker completes it (and not if the
    worker never does), and a stuck worker is sent nothing more and killed
    only once nobody waits for a call on it. The worker is frozen here
    (SIGSTOP) so that the timing does not depend on this machine's speed:
    two calls of alice's, side by side, time out on it; bob's, sent a second
    later, is on it when it is found stuck; the worker then resumes and bob
    is answered by it, not failed by its kill, and it completes alice's two.
    Then the control: a call of alice's abandoned on a worker that dies
    before it completes it does not count; one on a worker the service kills
    as stuck does (it ran past every deadline)."""
    import signal

    # replace_stuck=False: the stuck worker keeps its slot alone, as this test
    # follows it through its kills (its replacement has a test of its own below)
    with _long_lease_service(keyserver_dir, tmp_path, model=slow_matmul(width=64, depth=2),
                             request_timeout=3.0, instance_inflight=3,
                             replace_stuck=False) as s:  # fmt: skip
        alice, bob = s.caller(holder="alice"), s.caller(holder="bob")
        x = np.ones((1, 64), np.float32)
        with s.connect(alice, timeout=30) as a, s.connect(alice, timeout=30) as a2, \
                s.connect(bob, timeout=30) as b:  # fmt: skip
            want = b.compute({"x": x})["y"]  # bob's first call: served, counted
            a.compute({"x": x})
            worker = s.svc.models["m"].instances[0]
            _freeze(worker.pid)
            try:
                gave_up = []

                def abandon(m: vault.Model) -> None:
                    try:
                        m.compute({"x": x}, timeout=0.5)
                    except vault.WorkerTimeoutError:
                        gave_up.append(m)

                side = [threading.Thread(target=abandon, args=(m,)) for m in (a, a2)]
                for t in side:
                    t.start()
                for t in side:
                    t.join(30)
                assert len(gave_up) == 2
                # bob's call must still be waited for when her worker is found
                # stuck (her deadline + the request timeout), so it goes once the
                # service's own clock is 2 s past her calls' recorded deadline: his
                # deadline is then 2 s past her worker's stuck time, whatever the load
                hers = max(c.deadline for d in s.svc.dispatches.values() for c in d.calls)
                wait_for(lambda: time.monotonic() >= hers + 2.0, timeout=30,
                         what="the service's clock 2 s past alice's deadline")  # fmt: skip
                t, got = _compute_in_thread(b, x)
                wait_for(lambda: '"worker_stuck"' in s.log_path.read_text(), timeout=30,
                         what="the frozen worker found stuck")  # fmt: skip
                assert worker.alive()  # before: killed here, and bob's call with it
            finally:
                os.kill(worker.pid, signal.SIGCONT)
            t.join(30)
            assert "error" not in got, got  # before: WorkerCrashedError
            np.testing.assert_array_equal(got["y"], want)
            assert b.compute({"x": x})["y"].shape == (1, 64)  # the same worker serves on
            assert s.svc.models["m"].instances[0] is worker
            assert '"worker_died"' not in s.log_path.read_text()
            # the control: abandoned, and its worker killed before completing it
            _freeze(worker.pid)
            with pytest.raises(vault.WorkerTimeoutError):
                a.compute({"x": x}, timeout=0.5)
            os.kill(worker.pid, signal.SIGKILL)
            wait_for(lambda: '"worker_died"' in s.log_path.read_text(), timeout=30,
                     what="the killed worker seen dead")  # fmt: skip
            # and one the service itself kills as stuck, past every deadline: the
            # oldest call on it ran all along and counts (before: each such kill
            # made an over-long call free)
            new = wait_for(lambda: [i for i in s.svc.models["m"].instances if i is not worker],
                           timeout=60, what="a worker in the killed one's place")[0]  # fmt: skip
            assert b.compute({"x": x})["y"].shape == (1, 64)  # one it serves, then it sticks
            _freeze(new.pid)
            with pytest.raises(vault.WorkerTimeoutError):
                a.compute({"x": x}, timeout=0.5)
            wait_for(lambda: s.log_path.read_text().count('"worker_stuck"') == 2, timeout=30,
                     what="the second worker found stuck")  # fmt: skip
            # ended with SIGTERM (a SIGKILL lost every call it served since its
            # last report): resumed, it reports its usage as it goes
            os.kill(new.pid, signal.SIGCONT)
            wait_for(lambda: s.log_path.read_text().count('"worker_died"') == 2, timeout=30,
                     what="the stuck worker ended by the service")  # fmt: skip
            died = [json.loads(line) for line in s.log_path.read_text().splitlines()
                    if '"worker_died"' in line]  # fmt: skip
            assert died[-1]["status"] == 0, died  # it left by itself: not killed
            assert b.compute({"x": x})["y"].shape == (1, 64)  # and another takes its place
        s.stop()
        # alice: one served, two abandoned and completed, one run until its worker
        # was killed as stuck; not the one whose worker died before completing it
        assert s.used(alice) == 4
        assert s.used(bob) == 5
        # under the service's own licence, the computes its workers reported: the
        # first worker's were lost with it (the test's SIGKILL, before any
        # report); the stuck one's served call (and the abandoned one, when the
        # resumed worker completed it before it went), and the last worker's.
        # Killed as stuck with SIGKILL, the stuck one's were lost too: 1
        assert s.used(s.licence) in (2, 3)


@pytest.mark.parametrize("replace", [True, False], ids=["replaced", "control"])
def test_a_stuck_workers_model_serves_other_callers_from_a_replacement(
    keyserver_dir: Path, tmp_path: Path, replace: bool
) -> None:
    """A model's only worker found stuck was sent nothing more, and was ended
    only once no call of anyone else was left on it: with bob's call on it,
    carol, a third caller, was served by nobody until his call ended and the
    worker was restarted. Now a replacement is started when the worker is
    found stuck: carol is served while the stuck worker is still frozen
    (SIGSTOP) with bob's call on it; resumed, it answers bob and is ended,
    its replacement serving on. Control (``replace_stuck`` off, the behaviour
    before): carol's call times out, nobody serving it. And a replacement
    that dies while the stuck worker still holds bob's call is itself
    restarted (the stuck one does not hold the slot). A call's timeout is at
    most the service's (20 s here), and a worker is stuck 20 s past its
    oldest call's deadline: bob's call goes 4 s before that, so it is still
    waited for while carol's are served."""
    import signal

    limit = 20.0
    with _long_lease_service(keyserver_dir, tmp_path, model=slow_matmul(width=64, depth=2),
                             request_timeout=limit, instance_inflight=3,
                             replace_stuck=replace) as s:  # fmt: skip
        alice, bob, carol = (s.caller(holder=h) for h in ("alice", "bob", "carol"))
        x = np.ones((1, 64), np.float32)
        with s.connect(alice, timeout=30) as a, s.connect(bob, timeout=30) as b, \
                s.connect(carol, timeout=30) as c:  # fmt: skip
            want = b.compute({"x": x})["y"]
            worker = s.svc.models["m"].instances[0]
            _freeze(worker.pid)
            try:
                with pytest.raises(vault.WorkerTimeoutError):
                    a.compute({"x": x}, timeout=0.5)  # abandoned on the frozen worker
                hers = max(c.deadline for d in list(s.svc.dispatches.values()) for c in d.calls)
                # bob's call goes 4 s before her worker is found stuck (the
                # service's clock): his deadline is 16 s past that moment
                wait_for(lambda: time.monotonic() >= hers + limit - 4.0, timeout=60,
                         what="the service's clock near the stuck time")  # fmt: skip
                bob, got = _compute_in_thread(b, x)
                wait_for(lambda: '"worker_stuck"' in s.log_path.read_text(), timeout=30,
                         what="the frozen worker found stuck")  # fmt: skip
                assert (
                    sum(len(d.calls) for d in list(s.svc.dispatches.values()) if d.inst is worker)
                    == 2
                )  # fmt: skip - hers and bob's
                if replace:
                    np.testing.assert_array_equal(c.compute({"x": x})["y"], want)
                    assert worker.alive()  # still frozen: carol's was served by another
                    assert len(s.svc.models["m"].instances) == 2
                    first = next(i for i in s.svc.models["m"].instances if i is not worker)
                    first.kill()  # the replacement dies: restarted, the stuck one still there
                    wait_for(lambda: any(i not in (worker, first) and i.alive()
                                         for i in s.svc.models["m"].instances),
                             timeout=60, what="the replacement restarted")  # fmt: skip
                    np.testing.assert_array_equal(c.compute({"x": x})["y"], want)
                    assert worker.alive()
                else:
                    with pytest.raises(vault.WorkerTimeoutError):
                        c.compute({"x": x}, timeout=6.0)  # before: nobody serves carol
                    assert [i.pid for i in s.svc.models["m"].instances] == [worker.pid]
            finally:
                os.kill(worker.pid, signal.SIGCONT)
            bob.join(60)
            # answered by the stuck worker, or a timeout: never failed by its end
            assert "y" in got or isinstance(got["error"], vault.WorkerTimeoutError), got
            if replace:
                # resumed, it answers bob (if his call was still waited for);
                # then idle, its place taken: ended, and it left by itself
                def died() -> list[dict[str, Any]]:
                    return [e for e in map(json.loads, s.log_path.read_text().splitlines())
                            if e["event"] == "worker_died" and e["pid"] == worker.pid]  # fmt: skip

                wait_for(died, timeout=30, what="the replaced worker ended")
                # it left by itself; if bob's call timed out first (a slow host),
                # the service ended it while it was still frozen: SIGKILL
                assert died()[0]["status"] in ((0,) if "y" in got else (0, -9)), died()
                assert len(s.svc.models["m"].instances) == 1  # no restart beside the replacement
                assert s.svc.models["m"].instances[0].pid not in (worker.pid, first.pid)
            np.testing.assert_array_equal(c.compute({"x": x})["y"], want)


def test_a_call_counts_under_the_callers_licence_and_the_services_own(service: Svc) -> None:
    """What docs/service.md says of `used+reserved`: each call the workers
    compute is counted once under the caller's call licence and once under
    the service's runtime licence (the workers' key leases), so a
    --max-calls on the service's licence caps the whole service."""
    alice = service.caller(holder="alice", max_calls=10)
    bob = service.caller(holder="bob", max_calls=10)
    with service.connect(alice) as a, service.connect(bob) as b:
        for _ in range(4):
            a.compute({"x": X})
        for _ in range(3):
            b.compute({"x": X})
    service.stop()  # the workers close their leases: their last calls reported
    assert (service.used(alice), service.used(bob)) == (4, 3)
    assert service.used(service.licence) == 7


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
    # a new connection with it hears it has expired, as the open one was told
    # (it was UnknownLicenceError): from the service's refusal read beside the
    # licence's own expiry, or from its first call (this machine's clock is
    # not judge alone: a licence is refused before dialing only 5 min past it)
    assert frank.expires_at is not None and frank.expires_at <= time.time()
    with pytest.raises(vault.LicenceExpiredError, match="expired"):
        with service.connect(frank) as again:
            again.compute({"x": X})
    stale = dataclasses.replace(frank, expires_at=time.time() - 600)  # long past: not dialed
    with pytest.raises(vault.LicenceExpiredError, match="has expired"):
        service.connect(stale)
    # a runtime licence is not a call licence: its key is not let in at all
    runtime = service.keyserver.issue("m", holder="mallory")
    with pytest.raises(vault.UnknownLicenceError, match="refused this caller's key"):
        service.connect(runtime, timeout=1.0)


def refusals(service: Svc, reason: str) -> list[dict[str, Any]]:
    """The service's ``caller_refused`` log lines for ``reason``, once its
    metric has counted one (the ZAP thread logs it as it answers)."""
    import urllib.request

    def counted() -> bool:
        url = f"http://127.0.0.1:{service.svc.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=30).read().decode()
        return f'vault_handshakes_refused_total{{reason="{reason}"}}' in text

    wait_for(counted, f"a handshake refused for {reason} is counted")
    service.log.flush()
    lines = [json.loads(x) for x in service.log_path.read_text().splitlines()]
    return [r for r in lines if r["event"] == "caller_refused" and r["reason"] == reason]


def test_a_refused_caller_hears_what_it_may_and_the_log_says_why(service: Svc) -> None:
    """The ZAP answer carries a status code only: 400 for a key refused,
    whatever the reason (a stranger learns nothing of a key), 500 when the
    service could not ask its key server. So a revoked licence's holder gets
    UnknownLicenceError and the service's log and metric say "revoked"; with
    the key server away a new caller gets KeyServerUnavailableError (as
    docs/service.md says; before, UnknownLicenceError "not on the
    allow-list"), and the log says so."""
    grace = service.caller(holder="grace")
    with service.keyserver.admin() as ks:
        ks.revoke(grace.licence_id)
    with pytest.raises(vault.UnknownLicenceError, match="revoked"):
        service.connect(grace, timeout=2.0)
    (line,) = refusals(service, "licence_revoked")
    assert line["level"] == "warning" and line["address"] == "127.0.0.1", line
    service.faulty.gone = True
    with pytest.raises(vault.KeyServerUnavailableError, match="key server is unavailable"):
        service.connect(service.caller(holder="heidi"), timeout=5.0)
    assert refusals(service, "keyserver_unavailable")


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


def _wait(cond: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def _served(m: vault.Model, n: int) -> None:
    """``n`` calls served; calls refused meanwhile (a renewal that failed
    leaves a short-lived refusal) are not served, and are not billed."""
    done = 0
    for _ in range(10_000):
        try:
            m.compute({"x": X})
            done += 1
        except vault.KeyServerUnavailableError:
            time.sleep(0.01)
        if done == n:
            return
    raise AssertionError(f"only {done} of {n} calls were served")


def test_a_caller_never_reads_where_the_key_server_is(service: Svc) -> None:
    """With the key server down, a caller's call was answered with the key
    client's own words, "no answer from key server tcp://HOST:PORT ...": a
    web page's script (through the REST door) read the vendor's back-end
    address. The caller now reads that the service cannot reach its licence
    server, typed as before (KeyServerUnavailableError), and nothing of where
    it is; the words the service got (the control) held the address."""
    said: list[str] = []

    def down(*_a: Any) -> Any:
        exc = vault.KeyServerUnavailableError(
            "no answer from key server tcp://10.9.8.7:7700 within 10s: nothing listens"
        )
        said.append(str(exc))
        raise exc

    with service.connect(service.caller(holder="dora")) as m:
        m.compute({"x": X})  # known to the service, its decision held for a lease
        service.faulty.ask = down
        refused: list[vault.KeyServerUnavailableError] = []

        def refused_now() -> bool:  # served until its decision is due again, then refused
            try:
                m.compute({"x": X})
            except vault.KeyServerUnavailableError as exc:
                refused.append(exc)
            return bool(refused)

        wait_for(refused_now, timeout=60, what="the key server asked again, and unreachable")
        err = refused[0]
    assert said and "10.9.8.7" in said[0]  # what the service was told
    assert "10.9.8.7" not in str(err) and "7700" not in str(err), err
    assert "licence server" in str(err)


def test_a_failed_renewal_loses_no_call_and_refunds_the_rest(service: Svc) -> None:
    # issue 17, item 7: a call licence of 20 calls, 7 served around two
    # failed renewals (one whose answer was lost after the key server counted
    # it, one never sent): after the service stops, 7 used and 13 available
    hana = service.caller(holder="hana", max_calls=20)
    with service.connect(hana) as h:
        _served(h, 4)
        service.faulty.fail_next = "answer"
        _wait(lambda: service.faulty.faults == 1, "a renewal's answer is lost")
        _served(h, 2)
        service.faulty.fail_next = "request"
        _wait(lambda: service.faulty.faults == 2, "a renewal is lost before the key server")
        _served(h, 1)
    service.stop()  # reports the rest, gives every reserve back
    row = service.row(hana)
    assert (row["used_calls"], row["reserved_calls"]) == (7, 0)
    assert row["max_calls"] - row["used_calls"] - row["reserved_calls"] == 13
    assert service.policy.pending_reports() == 0
    from keyserver import audit, open_store

    st = open_store(service.keyserver.dir / "keyserver.db")
    try:
        assert audit.verify(st) == []
    finally:
        st.close()


def _serve(keyserver: Any, tmp: Path, package: Path, name: str) -> tuple[Any, dict[str, Any]]:
    """`vault worker serve` as a vendor runs it, in its own process group (a
    SIGKILL of the group is a replica's machine dying: the service and its
    workers at once)."""
    import os
    import subprocess
    import sys

    from tests.conftest import served_ready

    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(
        [sys.executable, "-m", "vault", "worker", "serve", str(package), "--licence",
         str(tmp / "service.licence"), "--device", str(tmp / "device"), "--call-licences",
         "--bind", "tcp://127.0.0.1:0", "--instances", "1"],
        stdout=subprocess.PIPE, stderr=log, start_new_session=True,
        # a temp directory of the test's own: what a killed service leaves there is the test's
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
             "TMPDIR": str(tmp / "tmp")},
    )  # fmt: skip
    log.close()
    ready, buf = served_ready(proc, timeout=120)
    assert ready is not None, buf.decode() + (tmp / f"{name}.log").read_text()[-3000:]
    return proc, ready


def test_a_killed_service_replicas_grant_lapses_and_every_call_counts_once(
    keyserver: Any, tmp_path: Path
) -> None:
    """A replica SIGKILLed mid-load held a grant of its caller's quota (before:
    the whole quota, for good: `0+N/N`). After the lease the reserve is back,
    what it reported is counted once, and a second replica serves exactly the
    rest of the quota. The next service start removes the instance directory
    the killed one left."""
    import os
    import signal

    pk = PublisherKey.load(keyserver.publisher_key_path)
    res = seal(mlp(), model_id="m", signing_key=pk, output=tmp_path / "m.vault")
    keyserver.register(res.model_id, res.key_id, res.key, res.digest)
    keyserver.enroll(tmp_path / "device")
    keyserver.issue("m", holder="service").save(tmp_path / "service.licence")
    quota = 40
    lic = keyserver.issue("m", kind="call", holder="shop", max_calls=quota)  # no rate limit
    (tmp_path / "tmp").mkdir(mode=0o700)

    def row() -> tuple[int, int]:
        with keyserver.admin() as ks:  # the list lapses what is due first
            (r,) = [r for r in ks.list() if r["licence_id"] == lic.licence_id]
        return int(r["used_calls"]), int(r["reserved_calls"])

    first, ready = _serve(keyserver, tmp_path, res.path, "first")
    served_first = 0
    try:
        with vault.connect(ready["endpoint"], licence=lic, server_key=ready["server_key"],
                           model="m", timeout=10) as m:  # fmt: skip
            while served_first < 12:  # past its first grant: reported and given back once
                m.compute({"x": X})
                served_first += 1
            assert row()[1] > 0  # it holds a grant now
            os.killpg(first.pid, signal.SIGKILL)  # mid-load: its service and workers
            with pytest.raises(vault.VaultError):
                for _ in range(100):
                    m.compute({"x": X})
                    served_first += 1
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        assert first.stdout is not None
        first.stdout.close()
    deadline = time.monotonic() + 120  # a state, polled within the admin's request limit
    while row()[1] != 0:
        assert time.monotonic() < deadline, "the dead replica's grant never lapsed"
        time.sleep(0.25)
    used = row()[0]
    records = keyserver.audit(lic.licence_id)
    reported = sum(json.loads(r.detail)["calls"] for r in records if r.event == "usage")
    lapsed = [json.loads(r.detail) for r in records if r.event == "grant_lapsed"]
    assert lapsed and all(d["returned_calls"] > 0 for d in lapsed)  # the lapse gave it back
    assert used == reported  # each report counted once
    # what it served and never reported is lost, at most one grant's worth
    assert used <= served_first <= used + quota // 4
    left = list((tmp_path / "tmp").glob("vault-svc-*"))
    assert left, "the SIGKILLed service left no instance directory to sweep"
    for d in left:  # as found a while later
        os.utime(d, (time.time() - 3600, time.time() - 3600))
    second, ready = _serve(keyserver, tmp_path, res.path, "second")
    assert not [d for d in left if d.exists()]
    assert '"stale_instance_dirs_removed"' in (tmp_path / "second.log").read_text()
    served_second = 0
    try:
        with vault.connect(ready["endpoint"], licence=lic, server_key=ready["server_key"],
                           model="m", timeout=10) as m:  # fmt: skip
            with pytest.raises(vault.QuotaExhaustedError):
                for _ in range(quota + 1):
                    m.compute({"x": X})
                    served_second += 1
        second.send_signal(signal.SIGTERM)  # a clean stop reports and gives back the rest
        assert second.wait(60) == 0
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait()
        assert second.stdout is not None
        second.stdout.close()
    assert served_second == quota - used  # the whole rest of the quota, each call once
    assert row() == (quota, 0)


def test_a_strangers_silent_connections_to_the_services_ports_are_bounded(service: Svc) -> None:
    """The service's ports as a TCP worker's (vault/core/peercap.py; the attack and
    its control: tests/integration/test_sealed_attacks.py): 400 silent
    connections from 127.0.0.3 to each of the CURVE front and the sealed
    port; all but 256 of each are shut down, the service counts 256 for
    that address at each port, a caller from 127.0.0.1 is served meanwhile,
    and once the stranger's connections close the count goes back to none."""
    from tests.integration.test_sealed_attacks import _cut, _silent_flood, _taken_by

    cap = service.svc._peercap
    assert cap is not None and service.svc.bulk_port
    front = int(service.endpoint.rpartition(":")[2])
    flood: list[Any] = []
    try:
        for port, n in ((service.svc.bulk_port, 400), (front, 400)):
            taken = _taken_by(os.getpid())  # the service is in this process: less our own
            socks = _silent_flood(port, n, accepted=lambda s, t=taken: t(s) - len(s))
            flood += socks
            # every one seen, all past 256 cut (a state, with a generous deadline)
            wait_for(lambda s=socks, n=n: _cut(s) >= n - 256, "every one past 256 is cut", 60)
        # by the bound, not the handshake timeout: its own count of what it cut
        assert cap.refused >= 2 * (400 - 256), cap.refused
        # a cut connection is counted until its end is seen: wait for the count
        wait_for(lambda: (cap.held.get(("sealed", "127.0.0.3"), 0) <= 256
                          and cap.held.get(("front", "127.0.0.3"), 0) <= 256),
                 "the bound's counts come down to 256", 60)  # fmt: skip
        with service.connect(service.caller(holder="alice")) as a:
            assert a.compute({"x": X})["logits"].shape == (1, 5)
    finally:
        for c in flood:
            c.close()
    deadline = time.monotonic() + 30
    while ("sealed", "127.0.0.3") in cap.held or ("front", "127.0.0.3") in cap.held:
        assert time.monotonic() < deadline, cap.held
        time.sleep(0.05)


def test_a_strangers_handshakes_cost_the_key_server_a_bounded_number_of_requests(
    service: Svc,
) -> None:
    """A stranger who has the service's public key (every caller has it)
    opens CURVE connections with a fresh key each: each handshake was a
    key-server request on the one ZAP thread. Per address, past a burst and
    a rate, they are refused unasked; a licensed caller still gets in and
    computes, and the stranger never reaches a worker."""
    from worker.service.calls import PROBE_BURST, PROBE_RATE

    asked: list[int] = []
    ask = service.faulty.ask

    def counting(model: Any, keys: Any, usage: Any, grants: Any) -> Any:
        if model is None:
            asked.append(len(keys))
        return ask(model, keys, usage, grants)

    service.faulty.ask = counting
    ctx = zmq.Context()
    socks = []
    try:
        t0 = time.monotonic()
        for _ in range(120):
            pub, sec = zmq.curve_keypair()
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.curve_serverkey = service.server_key.encode()
            s.curve_publickey, s.curve_secretkey = pub, sec
            s.connect(service.endpoint)
            socks.append(s)
        # until every handshake has had its ZAP answer (asked, or refused unasked)
        deadline = time.monotonic() + 60
        while sum(asked) + service.policy.probes_refused < len(socks):
            assert time.monotonic() < deadline, (sum(asked), service.policy.probes_refused)
            time.sleep(0.02)
        probes = sum(asked)
        budget = PROBE_BURST + PROBE_RATE * (time.monotonic() - t0) + 2
        assert 0 < probes <= budget, (probes, budget)
        assert service.policy.probes_refused > 0
        dave = service.caller(holder="dave")
        # a caller new to the flooded address gets in once its budget refills
        # (8 a second): told it may retry, it does, within a generous deadline
        deadline = time.monotonic() + 60
        while True:
            try:
                d = service.connect(dave)
                break
            except vault.UnknownLicenceError:
                assert time.monotonic() < deadline, "never admitted"
                time.sleep(0.2)
        with d:
            assert d.compute({"x": X})["logits"].shape == (1, 5)
    finally:
        for s in socks:
            s.close()
        ctx.term()


def test_a_caller_reads_no_statistics_of_a_model_its_licence_does_not_cover(service: Svc) -> None:
    """A model's statistics (op ``stats``: its calls and latencies) are its
    callers' activity, answered only to callers whose licence covers the
    model, as a compute is. Before, carol, licensed for another model only,
    read how many calls alice made and their latencies. Its signature and
    health stay public, as the Open Inference Protocol's metadata and
    readiness are. Control: alice, whose licence covers it, reads them."""
    alice = service.caller(holder="alice")
    carol = service.caller(model="other", holder="carol")  # a live call licence, another model
    with service.connect(alice) as a:
        for _ in range(3):
            a.compute({"x": X})
        assert int(a.stats()["calls"]) >= 3
    with service.connect(carol) as c:  # the signature: public
        assert c.info["inputs"] and c.health()
        with pytest.raises(vault.WrongModelError):
            c.stats()
        with pytest.raises(vault.WrongModelError):
            c.compute({"x": X})
    got = []
    ctx = zmq.Context()
    try:  # the op itself, without the client library
        s = ctx.socket(zmq.DEALER)
        s.curve_serverkey = service.server_key.encode()
        s.curve_publickey = carol.client_public_key.encode()
        s.curve_secretkey = carol.client_secret_key.encode()
        s.connect(service.endpoint)
        from vault.core.protocol import PROTOCOL_VERSION, pack_header, unpack_header

        s.send(pack_header({"v": PROTOCOL_VERSION, "id": 1, "op": "stats", "model": "m"}))
        assert s.poll(20_000), "no answer to stats"
        got.append(unpack_header(s.recv()))
        s.close(0)
    finally:
        ctx.term()
    assert got[0].get("error", {}).get("code") == "wrong_model" and "calls" not in got[0], got


def test_a_caller_reads_its_own_statistics_never_another_callers(service: Svc) -> None:
    """Two callers of one model, each with its own licence: a caller's
    ``stats`` are its own calls, errors and latencies. Before, they were the
    model's: bob read alice's call count going up by hers (651 -> 658 around
    her 7 calls), her errors and the batches her calls made."""
    alice = service.caller(holder="alice-stats")
    bob = service.caller(holder="bob-stats")
    with service.connect(alice) as a, service.connect(bob) as b:
        assert int(b.stats()["calls"]) == 0  # bob has made none
        for _ in range(5):
            a.compute({"x": X})
        with pytest.raises(vault.InputError):
            a.compute({"x": np.zeros((1, 3), np.float32)})  # an error of alice's
        mine = b.stats()
        assert (int(mine["calls"]), int(mine["errors"])) == (0, 0), mine
        assert mine["latency_ms"]["window"] == 0
        b.compute({"x": X})
        assert int(b.stats()["calls"]) == 1
        theirs = a.stats()  # the control: alice's own are there
        assert (int(theirs["calls"]), int(theirs["errors"])) == (6, 1), theirs
        assert theirs["latency_ms"]["window"] == 6


def test_only_a_device_enrolled_as_a_service_asks_for_or_spends_a_callers_calls(
    service: Svc, tmp_path: Path
) -> None:
    """A customer's daemon is an enrolled device too. Before, any enrolled
    device could ask for call decisions: a probe of erin's key (which her
    bearer tokens name) gave her licence id and holder, and a usage report
    of a million calls spent her whole quota. Now only a device the vendor
    enrolled with ``--service`` asks: the daemon's device is refused before
    anything is read, and erin's quota is untouched. Control: the same probe
    and report from the service's own device are answered and counted."""
    erin = service.caller(holder="erin", max_calls=100)
    runtime = service.keyserver.issue("m", holder="customer")  # the customer's own licence
    daemon = service.keyserver.enroll(tmp_path / "customer-device", service=False)
    with KeyServerClient(runtime, device=daemon) as ks:
        with pytest.raises(vault.PermissionDeniedError, match="not enrolled as a worker service"):
            ks.call_decisions(model_id=None, keys=[erin.client_public_key], usage=[])
        with pytest.raises(vault.PermissionDeniedError, match="not enrolled as a worker service"):
            ks.call_decisions(model_id="m", keys=[erin.client_public_key],
                              usage=[{"licence_id": erin.licence_id, "used": 1_000_000}])  # fmt: skip
    assert service.used(erin) == 0 and int(service.row(erin)["reserved_calls"]) == 0
    assert any(
        r.event == "denied" and "call_decisions" in r.detail for r in service.keyserver.audit(None)
    )  # the refusal is in the audit
    # what a customer's device is for still works: a key released to its own licence
    from vault.core import crypto as _crypto

    own = _crypto.generate_key()
    service.keyserver.register("own", "k-own", own, "d-own")
    mine = service.keyserver.issue("own", holder="customer")
    with KeyServerClient(mine, device=daemon) as ks:
        assert ks.release(model_id="own", key_id="k-own", package_digest="d-own").key == own
    out = service.ks.call_decisions(model_id=None, keys=[erin.client_public_key],
                                    usage=[{"licence_id": erin.licence_id, "used": 7}])  # fmt: skip
    assert out["decisions"][erin.client_public_key]["licence_id"] == erin.licence_id
    assert service.used(erin) == 7


@contextlib.contextmanager
def _running(cfg: ServiceConfig, log_path: Path) -> Iterator[tuple[WorkerService, str]]:
    """A service of ``cfg`` on its own thread, logging to ``log_path``: the
    service and its endpoint; stopped (its usage reported) on the way out."""
    with open(log_path, "w") as log:
        svc = WorkerService(cfg, log=JsonLog(log))
        endpoint = svc.start()["endpoint"]
        thread = threading.Thread(target=svc.run, daemon=True)
        thread.start()
        try:
            yield svc, endpoint
        finally:
            svc.request_stop()
            thread.join(30)


def test_a_key_server_away_longer_than_a_lease_does_not_end_the_service(
    keyserver: Any, tmp_path: Path
) -> None:
    """The workers' key lease ends when the key server stays away past it,
    and a worker then drops its key. Before, the service kept those workers:
    every call was refused ("the lease ended while the key server was
    unreachable") until the service was restarted, long after the key server
    was back, while readiness said ready. Now a worker whose lease ended
    exits, the model reads not ready while none can get a key, and the
    service serves again on its own once the key server is back."""
    from worker.service import AllowListPolicy

    pk = PublisherKey.load(keyserver.publisher_key_path)
    res = seal(mlp(), model_id="m", signing_key=pk, output=tmp_path / "m.vault")
    keyserver.register(res.model_id, res.key_id, res.key, res.digest)
    device = keyserver.enroll(tmp_path / "device")
    licence = keyserver.issue("m", holder="service")
    alice = keyserver.issue("m", holder="alice", kind="call")  # its key on the allow-list
    spub, ssec = zmq.curve_keypair()
    cfg = ServiceConfig(
        bind="tcp://127.0.0.1:0", packages=[str(res.path)], curve=(spub, ssec),
        policy=AllowListPolicy({"alice": alice.client_public_key}), metrics_port=0,
        launch=LaunchSpec(licence=licence, device=device),
    )  # fmt: skip
    try:
        with (
            _running(cfg, tmp_path / "service.log") as (svc, endpoint),
            vault.connect(
                endpoint, licence=alice, server_key=spub.decode(), model="m", timeout=10
            ) as m,
        ):
            m.compute({"x": X})
            keyserver.stop()
            # the lease (2 s, and its grace) runs out
            wait_for(lambda: not svc.model_ready("m"), "the model reads not ready without a key")
            with pytest.raises(vault.VaultError):
                m.compute({"x": X})
            keyserver.start()

            def served() -> Any:
                try:
                    return m.compute({"x": X})
                except vault.VaultError:
                    return None  # not yet: the worker is getting a new key

            got = wait_for(served, "the service serves again")
            assert got["logits"].shape == (1, 5)
            assert svc.model_ready("m")
    finally:
        if keyserver.proc is None or keyserver.proc.poll() is not None:
            keyserver.start()
    assert '"worker_died"' in (tmp_path / "service.log").read_text()


def test_each_callers_usage_is_audited_under_the_model_it_was_used_on(
    keyserver: Any, tmp_path: Path
) -> None:
    """Two models, two callers: bob's calls on m are reported in whatever
    request the service makes next, here the one for alice's first call on
    m2 (a model bob's licence does not hold). Each usage record names the
    model its calls were made on, never the request's (the attack round:
    bob's 5 calls were audited under m2)."""
    pk = PublisherKey.load(keyserver.publisher_key_path)
    pkgs = []
    for name in ("m", "m2"):
        res = seal(mlp(), model_id=name, signing_key=pk, output=tmp_path / f"{name}.vault")
        keyserver.register(res.model_id, res.key_id, res.key, res.digest)
        pkgs.append(str(res.path))
    device = keyserver.enroll(tmp_path / "device")
    runtimes = [keyserver.issue(name, holder="service") for name in ("m", "m2")]
    runtime = runtimes[0]
    bob = keyserver.issue("m", kind="call", holder="bob")
    alice = keyserver.issue("m2", kind="call", holder="alice")
    spub, ssec = zmq.curve_keypair()
    ks = KeyServerClient(runtime, device=device)
    policy = CallLicencePolicy(
        lambda model, keys, usage, grants: ks.call_decisions(
            model_id=model, keys=keys, usage=usage, grants=grants)
    )  # fmt: skip
    cfg = ServiceConfig(bind="tcp://127.0.0.1:0", packages=pkgs, curve=(spub, ssec),
                        policy=policy, metrics_port=0,
                        launch=LaunchSpec(licence=runtimes, device=device))  # fmt: skip
    try:
        with _running(cfg, tmp_path / "service.log") as (_, endpoint):  # stopped: reports the rest
            with vault.connect(endpoint, licence=bob, server_key=spub.decode(), model="m",
                               timeout=10) as b:  # fmt: skip
                for _ in range(5):
                    b.compute({"x": X})
            with vault.connect(endpoint, licence=alice, server_key=spub.decode(), model="m2",
                               timeout=10) as a:  # fmt: skip
                a.compute({"x": X})  # its decision's request carries bob's report
    finally:
        ks.close()
    for lic, model, calls in ((bob, "m", 5), (alice, "m2", 1)):
        usage = [r for r in keyserver.audit(lic.licence_id) if r.event == "usage"]
        assert usage and {r.model_id for r in usage} == {model}, [
            (r.model_id, r.detail) for r in usage
        ]
        assert sum(json.loads(r.detail)["calls"] for r in usage) == calls


def test_a_request_refused_before_its_id_is_read_says_why(keyserver: Any, tmp_path: Path) -> None:
    """A call whose header passes the service's limit (a sequence of 40,000
    items: a descriptor each) is refused before its id is read: the caller
    was told "the service answered another call". It now gets the refusal,
    and the next call is served."""
    from onnx import TensorProto, helper

    seq = helper.make_tensor_sequence_value_info("sq", TensorProto.FLOAT, None)
    m = helper.make_model(
        helper.make_graph([helper.make_node("SequenceLength", ["sq"], ["n"])], "g", [seq],
                          [helper.make_tensor_value_info("n", TensorProto.INT64, [])]),
        opset_imports=[helper.make_opsetid("", 17)],
    )  # fmt: skip
    m.ir_version = 8
    s = Svc(keyserver, tmp_path, model=m)
    try:
        with s.connect(s.caller(holder="alice")) as c:
            item = np.ones(1, np.float32)
            with pytest.raises(vault.ProtocolError, match="header frame too large"):
                c.compute({"sq": [item] * 40_000})
            assert int(c.compute({"sq": [item] * 10})["n"]) == 10
    finally:
        s.stop()


def test_a_joined_call_that_timed_out_never_counts(keyserver_dir: Path, tmp_path: Path) -> None:
    """A victim's row joined into a batch with an attacker's 31 rows timed
    out (the batch's time is all their rows), and when the batch's worker
    was killed as stuck the victim was billed as its oldest call. A joined
    call that timed out never counts now, whether its batch completes or its
    worker is killed; the worker is frozen (SIGSTOP) while the two calls,
    alice's and mal's, are joined and time out, then resumed: the batch
    completes and neither is billed (the control, a call alone that timed
    out and completed, counts: the test above)."""
    import signal

    with _long_lease_service(keyserver_dir, tmp_path, batchable=True, request_timeout=30.0,
                             max_batch=32, max_queue_delay_us=300_000) as s:  # fmt: skip
        alice, mal = s.caller(holder="alice"), s.caller(holder="mal")
        with s.connect(alice) as a, s.connect(mal) as m:
            a.compute({"x": X})
            m.compute({"x": X})
            worker = s.svc.models["m"].instances[0]

            def joined_and_abandoned(first: vault.Model, second: vault.Model) -> None:
                """31 rows of ``first``'s and 1 of ``second``'s, joined on the frozen
                worker, both timed out by the service; then the worker resumes
                and completes the batch."""
                batches, errors = s.svc.models["m"].batches, s.svc.models["m"].errors
                gave_up: list[int] = []

                def abandon(c: vault.Model, rows: int) -> None:
                    try:
                        c.compute({"x": np.ones((rows, 8), np.float32)}, timeout=1.0)
                    except vault.WorkerTimeoutError:
                        gave_up.append(rows)

                _freeze(worker.pid)
                try:
                    side = [threading.Thread(target=abandon, args=(first, 31)),
                            threading.Thread(target=abandon, args=(second, 1))]  # fmt: skip
                    for t in side:
                        t.start()
                    for t in side:
                        t.join(30)
                    assert sorted(gave_up) == [1, 31]
                    assert s.svc.models["m"].batches == batches + 1  # the two, joined
                    wait_for(lambda: s.svc.models["m"].errors == errors + 2, timeout=30,
                             what="the service's own timeouts of the two")  # fmt: skip
                finally:
                    os.kill(worker.pid, signal.SIGCONT)
                wait_for(lambda: not s.svc.dispatches, timeout=30, what="the batch completed")

            joined_and_abandoned(m, a)  # mal's and alice's
            assert a.compute({"x": X})["logits"].shape == (1, 5)
            # a batch of one licence's own calls counts as they would alone
            with s.connect(mal) as m2:
                m2.compute({"x": X})
                joined_and_abandoned(m, m2)
        s.stop()
        assert s.used(alice) == 2  # the two served alone; not the joined one
        assert s.used(mal) == 4  # two served alone, and its own batch's two
