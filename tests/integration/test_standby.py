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


FORKED = r"""
import json, os, sys, time
import numpy as np
import vault
from vault.core import localwire, standby

path, lic, control = sys.argv[1], sys.argv[2], sys.argv[3] == "control"
a, b = np.full((2, 8), 1.0, np.float32), np.full((2, 8), -3.0, np.float32)
ra, rb = (np.array(r, np.float32) for r in json.loads(sys.argv[4]))  # no onnxruntime here:
# its thread pools make a forked child hang in exit()
# a call that waits for an answer fails, not hangs (in the control, the
# child's read may take both answers off the connection: the parent's is lost)
m = vault.open(path, licence=lic, timeout=5 if control else 30)
m.compute({"x": a})  # this thread's connection exists before the fork
deadline = time.monotonic() + 60
while (standby.POOL.waiting() is None or not os.path.isdir(standby.POOL.waiting().dir)) \
        and time.monotonic() < deadline:
    time.sleep(0.02)
waiting = standby.POOL.waiting()
parent_conn = os.fstat(m._channel._tls.conn.sock.fileno()).st_ino
out = {}
sent_r, sent_w = os.pipe()  # parent -> child: my request is on the wire
read_r, read_w = os.pipe()  # child -> parent: I have read an answer
res_r, res_w = os.pipe()  # child -> parent: its results
if control:
    # the protection bypassed, and one interleaving of two processes on one
    # connection made certain: the parent sends, the child sends and reads,
    # then the parent reads
    read = localwire.RecordReader.read
    def read_after_child(self):
        if os.getpid() == parent:
            os.write(sent_w, b"x")
            os.read(read_r, 1)
        return read(self)
    localwire.RecordReader.read = read_after_child
parent = os.getpid()
pid = os.fork()
if pid == 0:
    if control:
        m._channel._tls.conn.fork = localwire._FORKS[0]  # as if it were the child's own
        os.read(sent_r, 1)
    got = m.compute({"x": b})["logits"]
    child = {"right": bool(np.allclose(got, rb, rtol=1e-4)),
             "got_parents": bool(np.allclose(got, ra, rtol=1e-4)),
             "conn": os.fstat(m._channel._tls.conn.sock.fileno()).st_ino}
    os.write(res_w, json.dumps(child).encode())
    if control:
        os.write(read_w, b"x")
        os._exit(0)
    sys.exit(0)  # a normal exit: atexit runs in the child
try:
    got = m.compute({"x": a})["logits"]
    out["parent_right"] = bool(np.allclose(got, ra, rtol=1e-4))
except vault.WorkerTimeoutError:
    if not control:
        raise
    out["parent_right"] = False  # its answer went to the child, with the child's
os.waitpid(pid, 0)
out["child"] = json.loads(os.read(res_r, 4096))
out["parent_conn"] = parent_conn
if not control:
    import threading
    res = {}
    t = threading.Thread(target=lambda: res.setdefault("y", m.compute({"x": a})["logits"]))
    t.start(); t.join()
    out["new_thread_right"] = bool(np.allclose(res["y"], ra, rtol=1e-4))
    out["standby_dir_kept"] = os.path.isdir(waiting.dir)
    m2 = vault.open(path, licence=lic)
    out["next_open_took_it"] = m2.pid == waiting.proc.pid
    out["next_open_right"] = bool(np.allclose(m2.compute({"x": a})["logits"], ra, rtol=1e-4))
    m2.close()
m.close()
print(json.dumps(out))
"""


def _forked(path: str, lic: vault.Licence, tmp: Path, mode: str) -> dict[str, Any]:
    import json
    import subprocess
    import sys

    from tests.models import reference_pipeline

    lic.save(tmp / f"{mode}.licence")
    refs = [reference_pipeline([mlp()], {"x": np.full((2, 8), v, np.float32)})["logits"].tolist()
            for v in (1.0, -3.0)]  # fmt: skip
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", FORKED, path, str(tmp / f"{mode}.licence"), mode,
                          json.dumps(refs)], capture_output=True, timeout=180, env=env, cwd=root)  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return dict(json.loads(out.stdout.decode().strip().splitlines()[-1]))


def test_a_forked_child_uses_connections_of_its_own_and_leaves_the_parents_alone(
    two_packages: dict[str, tuple[str, vault.Licence]], tmp_path: Path
) -> None:
    """A process that opened a model forks (multiprocessing's default on
    Linux, pre-fork servers); parent and child compute, and the child exits.
    Before: both used the connection the parent's thread had made, and each
    could read the other's answer as its own, silently (in 40 forks, 22 calls
    of each side returned the other side's result); the child's exit closed
    the parent's models (their directory removed: the parent's new threads
    could not connect) and discarded the parent's pre-started worker (the
    parent's next open failed with FileNotFoundError). Now the child opens
    its own connection, and what the parent opened stays the parent's."""
    path, lic = two_packages["sb-a"]
    got = _forked(path, lic, tmp_path, "protected")
    assert got["child"]["conn"] != got["parent_conn"]  # a connection of its own
    assert got["parent_right"] and got["child"]["right"], got
    assert got["new_thread_right"], got  # the parent's directory is still there
    assert got["standby_dir_kept"] and got["next_open_took_it"] and got["next_open_right"], got


def test_control_parent_and_child_on_one_connection_read_each_others_answers(
    two_packages: dict[str, tuple[str, vault.Licence]], tmp_path: Path
) -> None:
    """The control: the child made to use the parent's connection (the
    generation check bypassed) and one interleaving made certain (the parent
    sends first, the child reads first): each gets the other's answer, and
    neither can tell (their calls carry the same number). Where both answers
    were on the connection when the child read, the child's read takes both
    and the parent's call never gets one."""
    path, lic = two_packages["sb-a"]
    got = _forked(path, lic, tmp_path, "control")
    assert got["child"]["conn"] == got["parent_conn"]
    assert got["child"]["got_parents"] and not got["child"]["right"], got
    assert not got["parent_right"], got


FIRST_OPEN = r"""
import json, sys

spawned = []  # (what was started, whether the client library was loaded by then)


def audit(event, args):
    if event == "subprocess.Popen":
        argv = [str(a) for a in (args[1] or ())]
        spawned.append({"worker": "worker" in argv, "standby": "--standby-fd" in argv,
                        "client_loaded": "vault.client" in sys.modules})
        argvs.append(argv)


def children():
    # our child processes still running (not zombies), from /proc
    import os
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                out.append(int(d))
    return out


argvs = []


sys.addaudithook(audit)
import vault

path, lic, first = sys.argv[1], sys.argv[2], sys.argv[3]
if first == "client":
    import vault.client  # loaded before the open: the client's own rules apply
out = {}
if first == "fork":
    import os
    vault._prestart(lic, {})  # the early worker exists; the client is not loaded yet
    pid = os.fork()
    if pid == 0:  # a child that loads the client and exits: the worker is not its own
        import vault.client
        sys.exit(0)
    os.waitpid(pid, 0)
if first == "missing":
    path = path + ".gone"
try:
    args = ["--threads", "3"] if first == "args" else []  # its key: these arguments too
    m = vault.open(path, licence=lic, worker_args=args)
    out["standby"] = bool(m._localw.ready.get("standby"))
    import numpy as np
    out["right"] = m.compute({"x": np.ones((2, 8), np.float32)})["logits"].shape == (2, 5)
    m.close()
except vault.VaultError as exc:
    out["error"] = type(exc).__name__
out["spawned"] = spawned
out["argv_names_package_or_licence"] = any(a in (sys.argv[1], lic) for v in argvs for a in v
                                           if "--standby-fd" in v)  # fmt: skip
out["children_left"] = len(children()) if "error" in out else None
print(json.dumps(out))
"""


def _first_open(path: str, lic: vault.Licence, tmp: Path, first: str, **env_extra: str) -> Any:
    import json
    import subprocess
    import sys

    lic_path = tmp / f"first-{first}-{lic.licence_id}.licence"
    lic.save(lic_path)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("VAULT_DAEMON", None)
    env.pop("VAULT_STANDBY", None)
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", FIRST_OPEN, path, str(lic_path), first],
                         capture_output=True, timeout=180, env=env, cwd=root)  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def test_the_first_open_in_a_process_starts_its_worker_before_the_client_loads(
    two_packages: dict[str, tuple[str, Any]], tmp_path: Path
) -> None:
    path, lic = two_packages["sb-a"]
    got = _first_open(path, lic, tmp_path, "open")
    assert got.get("right") and got["standby"] is True, got  # it took the worker started first
    first = got["spawned"][0]
    assert first == {"worker": True, "standby": True, "client_loaded": False}, got
    assert got["argv_names_package_or_licence"] is False, got  # it is given nothing yet
    # with worker_args: a worker started with them, and taken
    args = _first_open(path, lic, tmp_path, "args")
    assert args["right"] and args["standby"] is True, args
    assert args["spawned"][0] == {"worker": True, "standby": True, "client_loaded": False}, args
    # control: with the client loaded before the open, that open spawns cold, as before
    ctl = _first_open(path, lic, tmp_path, "client")
    assert ctl["right"] and ctl["standby"] is False, ctl
    assert ctl["spawned"][0]["standby"] is False and ctl["spawned"][0]["client_loaded"], ctl
    # and pre-starting off (VAULT_STANDBY=0): cold
    off = _first_open(path, lic, tmp_path, "open", VAULT_STANDBY="0")
    assert off["right"] and off["standby"] is False, off
    assert [s["standby"] for s in off["spawned"]] == [False], off


def test_an_open_that_cannot_be_tier_0_starts_no_worker_early(
    keyserver_m: KeyServerProcess, two_packages: dict[str, tuple[str, Any]], tmp_path: Path
) -> None:
    path, _ = two_packages["sb-a"]
    # a licence that is not --same-user needs the daemon: refused, and nothing started
    other = keyserver_m.issue("sb-a", holder="bob")
    got = _first_open(path, other, tmp_path, "open")
    assert got.get("error") == "ConfigError" and got["spawned"] == [], got
    # a daemon named: its workers, not ours (none there: the open fails, nothing started)
    _, lic = two_packages["sb-a"]
    gone = str(tmp_path / "no-daemon.sock")
    got = _first_open(path, lic, tmp_path, "open", VAULT_DAEMON=gone)
    assert "error" in got and got["spawned"] == [], got


def test_a_first_open_of_a_missing_package_says_so_and_stops_the_early_worker(
    two_packages: dict[str, tuple[str, Any]], tmp_path: Path
) -> None:
    path, lic = two_packages["sb-a"]
    got = _first_open(path, lic, tmp_path, "missing")
    assert got.get("error") == "FormatError", got  # as a cold spawn's worker says it
    assert got["spawned"][0]["standby"] is True, got  # the early worker was started ...
    assert got["children_left"] == 0, got  # ... and stopped: nothing left running


def test_a_fork_before_the_client_loads_leaves_the_parents_early_worker_alone(
    two_packages: dict[str, tuple[str, Any]], tmp_path: Path
) -> None:
    path, lic = two_packages["sb-a"]
    got = _first_open(path, lic, tmp_path, "fork")
    # the child loaded the client and exited; the parent's open still takes its worker
    assert got.get("right") and got["standby"] is True, got
