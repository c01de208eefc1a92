"""Tier 1, attacked as an unprivileged caller would attack it (issue 9).

The daemon runs as root (as its systemd unit does), its workers under a user
this module creates with ``useradd``, and every caller and attacker runs as
``nobody`` with Debian's ``/usr/bin/python3`` and a world-readable copy of the
source. Each attack has a control: the same attack where the protection is
absent (a same-user licence, a same-user worker, a caller's own interpreter),
which must succeed, so each refusal means something.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from tests.conftest import KeyServerProcess
from tests.integration.test_worker_hardening import (
    SYSTEM_PYTHON,
    _as_nobody,
    _nobody_env,
    _readable_source,
    _site_packages,
    nobody_python,  # noqa: F401 - a fixture
)
from tests.models import mlp
from tests.prereq import require
from vault.core.crypto import PublisherKey
from vault.core.launch import read_ready_line
from vault.core.process import stop_process
from vault.sealing import seal

pytestmark = pytest.mark.usefixtures("nobody_python")

NOBODY = pwd.getpwnam("nobody")


@dataclass
class Tier1:
    dir: Path  # 0711, root's
    keyserver: KeyServerProcess
    socket: str
    package: str  # world-readable
    key_hex: str  # the package key (for the tier-0 controls only)
    publisher_pub: str
    device_dir: Path
    worker: pwd.struct_passwd
    runtime: Path  # nobody's 0700 dir: licences, scripts' files


def _nobody_file(path: Path, data: bytes, mode: int = 0o600) -> str:
    path.write_bytes(data)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    os.chmod(path, mode)
    return str(path)


@pytest.fixture(scope="module")
def worker_user() -> Iterator[pwd.struct_passwd]:
    """A dedicated, unprivileged uid for the daemon's workers (not nobody:
    nobody is the attacker here)."""
    require(shutil.which("useradd") is not None, "useradd, to make the workers' user")
    name = "vw" + os.urandom(4).hex()
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name], check=True, capture_output=True)  # fmt: skip
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture(scope="module")
def tier1(worker_user: pwd.struct_passwd) -> Iterator[Tier1]:
    from keyserver import init_dir

    base = Path(tempfile.mkdtemp(prefix="vault-tier1-"))
    os.chmod(base, 0o711)
    ks = KeyServerProcess(base / "ks", lease_ttl=5.0)
    daemon: subprocess.Popen[bytes] | None = None
    try:
        init_dir(ks.dir, address="tcp://127.0.0.1:7700")
        ks.start()
        pk = PublisherKey.load(ks.publisher_key_path)
        pkg_dir = base / "pkg"
        pkg_dir.mkdir(mode=0o755)
        res = seal(mlp(), model_id="t1", signing_key=pk, output=pkg_dir / "m.vault")
        os.chmod(res.path, 0o644)
        pub = pkg_dir / "publisher.pub"
        pub.write_bytes(pk.public_pem())
        os.chmod(pub, 0o644)
        ks.register(res.model_id, res.key_id, res.key, res.digest)
        device_dir = base / "device"
        ks.enroll(device_dir)
        runtime = base / "nobody"
        runtime.mkdir(mode=0o700)
        os.chown(runtime, NOBODY.pw_uid, NOBODY.pw_gid)
        sock = str(base / "daemon.sock")
        cmd = [sys.executable, "-m", "vault", "daemon", "--socket", sock, "--device",
               str(device_dir), "--worker-user", worker_user.pw_name, "--python", SYSTEM_PYTHON,
               "--worker-path", _readable_source(), "--worker-path", _site_packages()]  # fmt: skip
        log = open(base / "daemon.log", "wb")
        daemon = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)
        log.close()
        assert daemon.stdout is not None
        ready = read_ready_line(daemon.stdout, timeout=30, proc=daemon, what="daemon")
        assert ready["tier"] == 1 and ready["worker_uid"] == worker_user.pw_uid
        yield Tier1(base, ks, sock, str(res.path), bytes(res.key).hex(), str(pub), device_dir,
                    worker_user, runtime)  # fmt: skip
    finally:
        if daemon is not None:
            stop_process(daemon, 10)
            daemon.stdout.close()  # type: ignore[union-attr]
        ks.kill()
        shutil.rmtree(base, ignore_errors=True)


def _licence(t: Tier1, name: str, **kw: Any) -> str:
    lic = t.keyserver.issue("t1", holder=name, **kw)
    return _nobody_file(t.runtime / f"{name}.licence", lic.dumps())


def _as_nobody_py(
    code: str, *args: str, env: dict[str, str] | None = None, python: str = SYSTEM_PYTHON,
    timeout: float = 90,
) -> dict[str, Any]:  # fmt: skip
    """Run ``code`` as nobody; it prints one JSON object as its last line."""
    out = subprocess.run(
        _as_nobody([python, "-B", "-c", code, *args]), env={**_nobody_env(), **(env or {})},
        capture_output=True, timeout=timeout, cwd="/",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return dict(json.loads(out.stdout.decode().strip().splitlines()[-1]))


def _audit(t: Tier1) -> list[tuple[str, str | None, dict[str, Any]]]:
    import sqlite3

    conn = sqlite3.connect(t.keyserver.dir / "keyserver.db")
    try:
        rows = conn.execute("SELECT event, licence_id, detail FROM audit ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [(r[0], r[1], json.loads(r[2])) for r in rows]


# --- 1. a key with the licence file alone ---------------------------------------------

KEY_WITH_LICENCE_ALONE = r"""
import json, os, sys, time
import zmq
from vault.core.keyclient import KeyServerClient
from vault.core.licence import Licence
from vault.core.package import Package
from vault.core.errors import VaultError
from vault.core import crypto
from vault.core.protocol import PROTOCOL_VERSION, pack_header, unpack_header
lic = Licence.load(sys.argv[1]); pkg = Package.load(sys.argv[2]); out = {}
# (a) the project's own key client, as the issue's attacker used it
try:
    with KeyServerClient(lic, timeout=10) as ks:
        rel = ks.release(model_id=pkg.model_id, key_id=pkg.key_id, package_digest=pkg.digest)
    plain = pkg.decrypt(rel.key)
    out["client"] = "decrypted %d graph bytes" % sum(len(g) for g in plain.graphs)
except VaultError as e:
    out["client"] = "refused " + e.code + ": " + e.message
# (b) raw ZeroMQ with the licence's keys, a hand-made request (proof included)
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.linger = 0
s.curve_serverkey = lic.keyserver_public_key.encode()
s.curve_publickey = lic.client_public_key.encode(); s.curve_secretkey = lic.client_secret_key.encode()
s.connect(lic.keyserver_address)
proof = lic.prove(device_id="", model_id=pkg.model_id, key_id=pkg.key_id, package_digest=pkg.digest)
eph = crypto.EphemeralKey()
s.send(pack_header({"v": PROTOCOL_VERSION, "op": "release", "id": 1, "nonce": os.urandom(16),
    "ts": time.time(), "model_id": pkg.model_id, "key_id": pkg.key_id, "package_digest": pkg.digest,
    "licence_id": lic.licence_id, "device_id": "", "ephemeral_key": eph.public_bytes,
    "proof": proof.signature, "proof_nonce": proof.nonce, "proof_ts": proof.ts}))
rep = unpack_header(s.recv()) if s.poll(10000) else {"ok": None}
out["raw"] = "released" if rep.get("ok") else "refused " + str(rep.get("error", {}).get("code"))
# (c) posing as a device with a key pair of one's own: not enrolled, no handshake
pub, sec = zmq.curve_keypair(); d = ctx.socket(zmq.DEALER); d.linger = 0
d.curve_serverkey = lic.keyserver_public_key.encode(); d.curve_publickey = pub; d.curve_secretkey = sec
d.connect(lic.keyserver_address); d.send(b"x")
out["fake_device"] = "answered" if d.poll(1500) else "no handshake"
s.close(); d.close(); ctx.term()
print(json.dumps(out))
"""


def test_a_licence_alone_gets_no_key(tier1: Tier1) -> None:
    runtime = _licence(tier1, "mallory")
    res = _as_nobody_py(KEY_WITH_LICENCE_ALONE, runtime, tier1.package)
    assert res["client"].startswith("refused permission_denied"), res
    assert "enrolled device" in res["client"]
    assert res["raw"] == "refused permission_denied", res
    assert res["fake_device"] == "no handshake", res
    lic_id = json.loads(Path(runtime).read_bytes())["licence_id"]
    denials = [d for e, lid, d in _audit(tier1) if e == "denied" and lid == lic_id]
    assert len(denials) == 2 and all(d["op"] == "release" for d in denials), denials
    assert not [e for e, lid, _ in _audit(tier1) if e == "released" and lid == lic_id]
    # control: a --same-user licence (tier 0) is exactly what the issue's attacker had
    control = _as_nobody_py(KEY_WITH_LICENCE_ALONE, _licence(tier1, "sam", same_user=True),
                            tier1.package)  # fmt: skip
    assert control["client"].startswith("decrypted"), control
    assert control["raw"] == "released", control


# --- 2. the device key ---------------------------------------------------------------

READ_FILE = r"""
import json, sys
try:
    data = open(sys.argv[1], "rb").read(); print(json.dumps({"read": len(data)}))
except OSError as e:
    print(json.dumps({"read": "denied errno %d" % e.errno}))
"""


def test_the_device_key_cannot_be_read(tier1: Tier1) -> None:
    key = tier1.device_dir / "device.key"
    assert _as_nobody_py(READ_FILE, str(key))["read"] == "denied errno 13"
    st = key.stat()
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o600
    assert tier1.device_dir.stat().st_mode & 0o777 == 0o700
    # control: the same bytes where nobody may read them
    copy = tier1.runtime / "device.key.copy"
    shutil.copy(key, copy)
    os.chmod(copy, 0o644)
    try:
        assert _as_nobody_py(READ_FILE, str(copy))["read"] == len(key.read_bytes())
    finally:
        copy.unlink()


# --- 3. ptrace and /proc/PID/mem, from the first instant --------------------------------

RACE = r"""
import ctypes, json, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
target_uid = int(sys.argv[1]); seen = {}; stop = threading.Event()

def attack(pid):
    res = {}
    if libc.ptrace(16, pid, None, None) == 0:  # PTRACE_ATTACH
        res["ptrace"] = "attached"; os.waitpid(pid, 0); libc.ptrace(17, pid, None, None)
    else:
        res["ptrace"] = "denied errno %d" % ctypes.get_errno()
    try:
        with open(f"/proc/{pid}/mem", "rb") as fh:
            res["mem"] = "opened"
    except OSError as e:
        res["mem"] = "denied errno %d" % e.errno
    return res

def owner(pid):  # the real uid (status stays readable when the process is non-dumpable)
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None

def age_ms(pid):  # how long the process had existed when it was attacked
    try:
        start = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])
        return round(float(open("/proc/uptime").read().split()[0]) * 1000 - start * 1000 / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None

def watch():  # attack every process of the workers' uid: those waiting pre-started
    # now, and every new one the moment it shows up
    before = {n for n in os.listdir("/proc") if n.isdigit() and owner(int(n)) != target_uid}
    first = True
    while not stop.is_set():
        for name in set(os.listdir("/proc")) - before:
            if name.isdigit() and name not in seen and owner(int(name)) == target_uid:
                age = age_ms(int(name))
                seen[name] = {**attack(int(name)), "age_ms": age, "new": not first}
        first = False
        ready.set()
        time.sleep(0.0005)

mode = sys.argv[2]
ready = threading.Event()
if mode == "daemon":
    t = threading.Thread(target=watch); t.start(); ready.wait()
    import vault, numpy as np
    with vault.open(sys.argv[3], licence=sys.argv[4], daemon=sys.argv[5]) as m:
        m.compute({"x": np.ones((1, 8), np.float32)})
        later = attack(m.pid); pid = m.pid; tier = m.tier
    stop.set(); t.join()
    print(json.dumps({"early": seen, "later": later, "pid": pid, "tier": tier}))
else:  # control: a tier-0 worker the caller spawns itself, attacked as soon as it exists
    from vault.core.launch import spawn_worker
    proc = spawn_worker([sys.argv[3], "--endpoint", "ipc:///nonexistent/w.sock"],
                        python=sys.executable, sys_path=sys.argv[4].split(":"))
    early = attack(proc.pid); proc.kill(); proc.wait()
    print(json.dumps({"early": {str(proc.pid): early}}))
"""


def test_no_ptrace_or_memory_read_of_a_daemon_worker_even_at_spawn(tier1: Tier1) -> None:
    lic = _licence(tier1, "eve")
    res = _as_nobody_py(RACE, str(tier1.worker.pw_uid), "daemon", tier1.package, lic,
                        tier1.socket)  # fmt: skip
    assert res["tier"] == 1
    # our worker was attacked before it had its package (pre-started, or at spawn),
    # and the worker started behind it was caught the moment it appeared
    assert str(res["pid"]) in res["early"], res
    assert any(r["new"] for r in res["early"].values()), res
    print(f"attacks on the daemon's workers before their package came: {res['early']}")
    for pid, r in res["early"].items():
        assert r["ptrace"].startswith("denied") and r["mem"].startswith("denied"), (pid, r)
    assert res["later"]["ptrace"].startswith("denied"), res
    assert res["later"]["mem"].startswith("denied"), res
    # control: a worker of the caller's own uid is attachable before it hardens itself
    control = _as_nobody_py(RACE, str(NOBODY.pw_uid), "tier0", tier1.package,
                            f"{_readable_source()}:{_site_packages()}")  # fmt: skip
    [early] = control["early"].values()
    assert early["ptrace"] == "attached", control


# --- 4. the caller's environment and venv ------------------------------------------------

INJECT = r"""
import json, os, sys
import numpy as np
import vault
with vault.open(sys.argv[1], licence=sys.argv[2], daemon=sys.argv[3]) as m:
    out = m.compute({"x": np.ones((1, 8), np.float32)})
    print(json.dumps({"pid": m.pid, "tier": m.tier, "ok": out["logits"].shape == (1, 5)}))
"""


def _evil_venv(t: Tier1, marker: Path) -> tuple[str, Path]:
    """A caller's venv (nobody's) whose .pth and sitecustomize record every
    interpreter that starts from it, or with it on its path."""
    venv = t.runtime / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    [site] = list((venv / "lib").glob("python3*/site-packages"))
    hook = f"import os; open({str(marker)!r}, 'a').write('%d %d\\n' % (os.getpid(), os.getuid()))"
    (site / "evil.pth").write_text(hook + "\n")
    (site / "paths.pth").write_text(f"{_readable_source()}\n{_site_packages()}\n")
    evil = t.runtime / "evil"
    evil.mkdir(exist_ok=True)
    (evil / "sitecustomize.py").write_text(hook + "\n")
    for p in [venv, *venv.rglob("*"), evil, *evil.rglob("*")]:
        # never through a link: venv/bin/python points at the system's interpreter
        os.chown(p, NOBODY.pw_uid, NOBODY.pw_gid, follow_symlinks=False)
    return str(venv / "bin" / "python"), evil


def test_the_callers_environment_and_venv_never_reach_a_worker(tier1: Tier1) -> None:
    drop = tier1.dir / "drop"  # anyone may write here: a worker's hook would leave its mark
    drop.mkdir(mode=0o777, exist_ok=True)
    os.chmod(drop, 0o777)
    marker = drop / "marker"
    _nobody_file(marker, b"", 0o666)
    python, evil = _evil_venv(tier1, marker)
    env = {"PYTHONPATH": f"{evil}:{_readable_source()}:{_site_packages()}",
           "LD_PRELOAD": str(evil / "libevil.so"), "PYTHONSTARTUP": str(evil / "x.py"),
           "VAULT_DAEMON": tier1.socket}  # fmt: skip
    lic = _licence(tier1, "trent")
    res = _as_nobody_py(INJECT, tier1.package, lic, tier1.socket, env=env, python=python)
    assert res["ok"] and res["tier"] == 1
    lines = [tuple(int(v) for v in line.split()) for line in marker.read_text().splitlines()]
    assert lines, "the hooks never ran even in the caller: the test proves nothing"
    assert {uid for _, uid in lines} == {NOBODY.pw_uid}, lines  # the caller's own process only
    assert res["pid"] not in {pid for pid, _ in lines}
    # control: an interpreter started from that venv, even with -I, runs the .pth hook
    marker.write_text("")
    subprocess.run(_as_nobody([python, "-I", "-c", "pass"]), env=_nobody_env(), check=True)
    assert marker.read_text().strip(), "-I did not stop the .pth hook"


def test_the_daemons_worker_environment_is_the_fixed_minimal_one(tier1: Tier1) -> None:
    import vault

    lic = tier1.keyserver.issue("t1", holder="root-caller")
    old = {k: os.environ.get(k) for k in ("PYTHONPATH", "LD_PRELOAD")}
    os.environ["PYTHONPATH"] = "/nonexistent/evil"
    os.environ["LD_PRELOAD"] = "/nonexistent/libevil.so"
    try:
        with vault.open(tier1.package, licence=lic, daemon=tier1.socket) as m:
            env = dict(
                kv.split(b"=", 1)
                for kv in Path(f"/proc/{m.pid}/environ").read_bytes().split(b"\0")
                if b"=" in kv
            )
            assert set(env) <= {b"HOME", b"XDG_CACHE_HOME", b"XDG_CONFIG_HOME", b"TMPDIR",
                                b"PATH", b"LANG"}, env  # fmt: skip
            cmdline = Path(f"/proc/{m.pid}/cmdline").read_bytes().split(b"\0")
            assert cmdline[0] == SYSTEM_PYTHON.encode() and cmdline[1] == b"-I", cmdline
            assert os.stat(f"/proc/{m.pid}").st_uid == tier1.worker.pw_uid
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- 5. asking for hardening to be switched off ---------------------------------------

NO_HARDENING = r"""
import json, os, socket, sys
import numpy as np
import vault
from vault.core.daemonwire import send_message, recv_message
from vault.core.errors import VaultError
out = {}
try:
    vault.open(sys.argv[1], licence=sys.argv[2], daemon=sys.argv[3], worker_args=["--no-seccomp"])
    out["api"] = "opened"
except VaultError as e:
    out["api"] = "refused " + e.code + ": " + e.message
from vault.core.licence import Licence
from vault.core.package import Package
import zmq
lic = Licence.load(sys.argv[2]); pkg = Package.load(sys.argv[1])
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[3])
send_message(s, {"op": "hello"}); hello, _ = recv_message(s)
fd = os.open(sys.argv[1], os.O_RDONLY)
for name, extra in (("worker_args", {"worker_args": ["--no-seccomp"]}),
                    ("providers", {"providers": ["--no-seccomp"]}),
                    ("no_landlock", {"no_landlock": True})):
    proof = lic.prove(device_id=hello["device_id"], model_id=pkg.model_id, key_id=pkg.key_id,
                      package_digest=pkg.digest)
    msg = {"op": "open", "licence": lic.public_copy().to_json(), "proof": proof.to_wire(),
           "client_key": zmq.curve_keypair()[0].decode(), **extra}
    send_message(s, msg, [fd])
    rep, _ = recv_message(s)
    out[name] = "opened" if rep.get("ok") else "refused %s: %s" % (rep["error"]["code"], rep["error"]["message"])
with vault.open(sys.argv[1], licence=sys.argv[2], daemon=sys.argv[3]) as m:
    out["seccomp"] = m.health()["hardening"]["seccomp"]["status"]
    out["status"] = open(f"/proc/{m.pid}/status").read()
print(json.dumps(out))
"""

TIER0_NO_SECCOMP = r"""
import json, os, sys
from vault.core.launch import spawn_worker, read_ready_line
key = bytes.fromhex(sys.argv[3]); d = sys.argv[4]
sr, sw = os.pipe(); kr, kw = os.pipe()
proc = spawn_worker([sys.argv[1], "--endpoint", f"ipc://{d}/w.sock", "--status-fd", str(sw),
                     "--unsafe-test-key-fd", str(kr), "--publisher", sys.argv[2], "--no-seccomp"],
                    pass_fds=[sw, kr], cwd=d, python=sys.executable, sys_path=sys.argv[5].split(":"))
os.close(sw); os.close(kr); os.write(kw, key); os.close(kw)
ready = read_ready_line(sr, timeout=60, proc=proc)
status = open(f"/proc/{proc.pid}/status").read()
proc.kill(); proc.wait()
print(json.dumps({"seccomp": [l for l in status.splitlines() if l.startswith("Seccomp:")][0]}))
"""


def test_a_caller_cannot_switch_hardening_off(tier1: Tier1) -> None:
    lic = _licence(tier1, "oscar")
    res = _as_nobody_py(NO_HARDENING, tier1.package, lic, tier1.socket)
    assert res["api"].startswith("refused config") and "daemon" in res["api"], res
    assert res["worker_args"].startswith("refused config") and "daemon's configuration" in res[
        "worker_args"], res  # fmt: skip
    assert res["no_landlock"].startswith("refused config") and "no_landlock" in res["no_landlock"]
    assert res["providers"].startswith("refused config: providers must be"), res
    assert res["seccomp"] == "on"
    assert "Seccomp:\t2" in res["status"] and "NoNewPrivs:\t1" in res["status"]
    # control: a worker the caller starts itself does what the caller asks
    d = tier1.runtime / "t0"
    d.mkdir(exist_ok=True)
    os.chown(d, NOBODY.pw_uid, NOBODY.pw_gid)
    control = _as_nobody_py(TIER0_NO_SECCOMP, tier1.package, tier1.publisher_pub, tier1.key_hex,
                            str(d), f"{_readable_source()}:{_site_packages()}")  # fmt: skip
    assert control["seccomp"].split() == ["Seccomp:", "0"], control


# --- 6. another caller's worker ---------------------------------------------------------

OWNER = r"""
import json, os, sys
import numpy as np
import vault
m = vault.open(sys.argv[1], licence=sys.argv[2], daemon=sys.argv[3])
w = m._localw
# the worker's socket is reached through the owner's O_PATH descriptor: another
# process of the owner's uid can use it through /proc/PID/fd (what we test here)
endpoint = m._endpoint.replace("/proc/self/", f"/proc/{os.getpid()}/")
print(json.dumps({"worker": w.wid, "pid": m.pid, "endpoint": endpoint, "server_key": w.server_key,
                  "client_public": w._client_public.decode(), "client_secret": w._client_secret.decode(),
                  "local_path": w.local_path, "local_token": w.local_token.hex(),
                  "channel": type(m._channel).__name__,
                  "tier": m.tier, "daemon_tier": w.daemon_health()["tier"]}), flush=True)
sys.stdin.readline()  # hold the worker until told
print(json.dumps({"still": m.compute({"x": np.ones((1, 8), np.float32)})["logits"].shape == (1, 5)}))
m.close()
"""

INTRUDER = r"""
import json, socket, sys, time
import zmq
from vault.core.daemonwire import send_message, recv_message
from vault.core.protocol import PROTOCOL_VERSION, pack_header, unpack_header
info = json.loads(sys.argv[1]); out = {}
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[2])
for op in ("status", "close"):
    send_message(s, {"op": op, "worker": info["worker"]}); rep, _ = recv_message(s)
    out[op] = "ok" if rep.get("ok") else "refused " + rep["error"]["code"]

def ask(pub, sec):
    ctx = zmq.Context(); d = ctx.socket(zmq.DEALER); d.linger = 0
    d.curve_serverkey = info["server_key"].encode(); d.curve_publickey = pub; d.curve_secretkey = sec
    d.connect(info["endpoint"]); d.send(pack_header({"v": PROTOCOL_VERSION, "op": "info", "id": 1}))
    got = unpack_header(d.recv()).get("ok") if d.poll(2000) else None
    d.close(); ctx.term()
    return "answered" if got else "no answer"

pub, sec = zmq.curve_keypair()
out["own_key"] = ask(pub, sec)
plain = zmq.Context(); p = plain.socket(zmq.DEALER); p.linger = 0; p.connect(info["endpoint"])
p.send(pack_header({"v": PROTOCOL_VERSION, "op": "info", "id": 1}))
out["no_curve"] = "answered" if p.poll(1500) else "no answer"; p.close(); plain.term()
# control: the owner's key (which only the owner holds) is answered
out["owners_key"] = ask(info["client_public"].encode(), info["client_secret"].encode())
# the direct local channel: the owner's socket, in the owner's directory, which
# this process (the same uid) can reach; without the owner's token, no answer
from vault.core.localwire import Closed, RecordReader, send_record

def local(token):
    c = socket.socket(socket.AF_UNIX); c.settimeout(10)
    try:
        c.connect(info["local_path"]); c.sendall(token)
        send_record(c, [pack_header({"v": PROTOCOL_VERSION, "op": "info", "id": 1})])
        got = unpack_header(RecordReader(c, max_message=1 << 20, owned=True).read()[0]).get("ok")
    except (Closed, OSError):
        got = None
    c.close()
    return "answered" if got else "no answer"

out["local_no_token"] = local(bytes(32))
out["local_owners_token"] = local(bytes.fromhex(info["local_token"]))  # control
print(json.dumps(out))
"""


@contextlib.contextmanager
def _owner(tier1: Tier1, lic: str) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    """The OWNER script as nobody: a caller that opened the model through the
    daemon, with its first line (what it opened) read; stopped at the end."""
    owner = subprocess.Popen(
        _as_nobody([SYSTEM_PYTHON, "-B", "-c", OWNER, tier1.package, lic, tier1.socket]),
        env=_nobody_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd="/",
    )  # fmt: skip
    try:
        assert owner.stdout is not None and owner.stdin is not None
        line = owner.stdout.readline()
        assert line, owner.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        yield owner, json.loads(line)
    finally:
        stop_process(owner, 5)
        for f in (owner.stdin, owner.stdout, owner.stderr):
            if f is not None:
                f.close()


def test_a_caller_reaches_only_the_workers_it_opened(tier1: Tier1) -> None:
    lic = _licence(tier1, "alice")
    with _owner(tier1, lic) as (owner, info):
        assert owner.stdout is not None and owner.stdin is not None
        assert info["tier"] == 1 and info["daemon_tier"] == 1
        res = _as_nobody_py(INTRUDER, json.dumps(info), tier1.socket)
        assert res["status"] == "refused permission_denied", res
        assert res["close"] == "refused permission_denied", res
        assert res["own_key"] == "no answer" and res["no_curve"] == "no answer", res
        assert res["owners_key"] == "answered", res  # control: CURVE is what kept them out
        # the owner's calls travel the direct local channel, whose socket the
        # intruder reaches (same uid) but cannot use without the owner's token
        assert info["channel"] == "LocalChannel", info
        assert res["local_no_token"] == "no answer", res
        assert res["local_owners_token"] == "answered", (
            res
        )  # control: the token is what kept it out
        owner.stdin.write(b"go\n")
        owner.stdin.flush()
        assert json.loads(owner.stdout.readline())["still"] is True  # untouched by the intruder
        assert owner.wait(30) == 0


CLAIMS = r"""
import json, socket, struct, sys
import numpy as np
import vault
from vault.core import localwire
m = vault.open(sys.argv[1], licence=sys.argv[2], daemon=sys.argv[3])
m.compute({"x": np.ones((1, 8), np.float32)})
w = m._localw
conns = []

def claim(size, send):
    c = socket.socket(socket.AF_UNIX); c.connect(w.local_path); c.sendall(w.local_token)
    c.sendall(struct.pack("<IIQ", localwire.MAGIC, 1, size) + struct.pack("<Q", size) + bytes(40))
    c.sendall(bytes(send))
    conns.append(c)

print(json.dumps({"pid": m.pid, "channel": type(m._channel).__name__}), flush=True)
sys.stdin.readline()
for _ in range(8):  # the attack: heads alone, each claiming 64 MiB
    claim(64 << 20, 0)
print("claimed", flush=True)
sys.stdin.readline()
for _ in range(4):  # the control: what is really sent is held (all but the last byte)
    claim(32 << 20, (32 << 20) - 1)
print("sent", flush=True)
sys.stdin.readline()
for c in conns:
    c.close()
print(json.dumps({"still": m.compute({"x": np.ones((1, 8), np.float32)})["logits"].shape == (1, 5)}))
m.close()
"""


_RECVFROM = {"x86_64": 45, "aarch64": 207}


def _pending_reads(pid: int, *, at_least: int, body_from: int = 1 << 18) -> list[int]:
    """The lengths the threads of ``pid`` that sleep in ``recvfrom`` asked for,
    once at least ``at_least`` of them ask for ``body_from`` bytes or more (a
    record's body, not a head or the scratch)."""
    import platform

    nr = _RECVFROM[platform.machine()]
    deadline = time.monotonic() + 60
    while True:
        lens = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                fields = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
            except OSError:
                continue
            if fields and fields[0] == str(nr) and int(fields[3], 16) >= body_from:
                lens.append(int(fields[3], 16))
        if len(lens) >= at_least or time.monotonic() > deadline:
            assert len(lens) >= at_least, lens
            return lens
        time.sleep(0.02)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_callers_claims_cost_its_worker_only_what_it_sends(tier1: Tier1) -> None:
    """A caller (nobody) holds its worker's token and talks to the worker's
    parser directly. Before, a 64-byte head claiming a 64 MiB record made the
    worker (another uid) allocate and zero 64 MiB before any of it came: 12
    such heads took a worker from 81 to 850 MB, 256 connections could claim
    256 GiB. Now memory follows the bytes that arrive, and what records in
    flight may claim in all is one largest record: 8 heads claiming 512 MiB
    cost under 24 MB. Control: bytes that are really sent are held (4 x 32 MiB
    sent, all but one byte each: the worker's RSS grows by them), so the
    measurement would have seen the claims."""
    lic = _licence(tier1, "claims")
    caller = subprocess.Popen(
        _as_nobody([SYSTEM_PYTHON, "-B", "-c", CLAIMS, tier1.package, lic, tier1.socket]),
        env=_nobody_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd="/",
    )  # fmt: skip
    try:
        assert caller.stdout is not None and caller.stdin is not None

        def step(expect: str | None = None) -> str:
            caller.stdin.write(b"go\n")  # type: ignore[union-attr]
            caller.stdin.flush()  # type: ignore[union-attr]
            line = caller.stdout.readline().decode()  # type: ignore[union-attr]
            assert line, caller.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            if expect is not None:
                assert line.strip() == expect, line
            return line

        line = caller.stdout.readline()
        assert line, caller.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        info = json.loads(line)
        assert info["channel"] == "LocalChannel", info
        pid = info["pid"]
        assert os.stat(f"/proc/{pid}").st_uid == tier1.worker.pw_uid  # another uid's worker
        before = _rss_mb(pid)
        step("claimed")
        # a state, not a wait: each of the 8 connections' worker threads has
        # read its head and sleeps in recv(2) for the body, asking for what
        # its buffer holds (read from /proc: root's view of the other uid)
        pending = _pending_reads(pid, at_least=8)
        assert max(pending) <= 1 << 20, pending  # buffers of 1 MiB, not of the 64 MiB claimed
        claimed = _rss_mb(pid) - before
        assert claimed < 24, f"heads claiming 512 MiB cost the worker {claimed:.0f} MB"
        step("sent")
        grew = 0.0
        deadline = time.monotonic() + 120  # the control: 128 MiB really sent is held
        while grew < 96:
            assert time.monotonic() < deadline, f"the worker held only {grew:.0f} MB"
            grew = _rss_mb(pid) - before
            time.sleep(0.05)
        assert json.loads(step())["still"] is True
        assert caller.wait(30) == 0
    finally:
        stop_process(caller, 5)
        for f in (caller.stdin, caller.stdout, caller.stderr):
            if f is not None:
                f.close()


STRANGER_LOCAL = r"""
import errno, json, os, socket, sys
info = json.loads(sys.argv[1]); owner_pid, worker_pid = int(sys.argv[2]), int(sys.argv[3]); out = {}

def attempt(fn):
    try:
        fn()
        return "reached"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def connect(path):
    c = socket.socket(socket.AF_UNIX)
    try:
        c.connect(path)
    finally:
        c.close()

out["socket_path"] = attempt(lambda: connect(info["local_path"]))
out["owner_fds"] = attempt(lambda: os.listdir(f"/proc/{owner_pid}/fd"))
out["worker_fds"] = attempt(lambda: os.listdir(f"/proc/{worker_pid}/fd"))
out["owner_environ"] = attempt(lambda: open(f"/proc/{owner_pid}/environ", "rb").read())
# the listening socket has no name outside the owner's directory: no abstract
# twin to connect to
out["abstract"] = attempt(lambda: connect("\0" + info["local_path"]))
print(json.dumps(out))
"""


def test_another_local_user_cannot_reach_a_callers_local_channel(
    tier1: Tier1, worker_user: pwd.struct_passwd
) -> None:
    """A local user who is neither the caller nor root (here the workers' own
    uid, the one that comes closest) tries every way to the caller's direct
    channel: its socket in the caller's 0700 directory, the descriptors of
    the caller and of the worker under /proc, the caller's environment, an
    abstract socket of the same name. Each is refused; control: the caller's
    own uid reaches the socket (and needs the token to be answered:
    test_a_caller_reaches_only_the_workers_it_opened)."""
    lic = _licence(tier1, "local-owner")
    with _owner(tier1, lic) as (owner, info):
        assert owner.stdout is not None and owner.stdin is not None
        wpid = int(info["pid"])
        assert os.stat(f"/proc/{wpid}").st_uid == worker_user.pw_uid
        as_other = ["setpriv", f"--reuid={worker_user.pw_uid}", f"--regid={worker_user.pw_gid}",
                    "--clear-groups", SYSTEM_PYTHON, "-B", "-c", STRANGER_LOCAL, json.dumps(info),
                    str(owner.pid), str(wpid)]  # fmt: skip
        out = subprocess.run(as_other, env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                             timeout=60, cwd="/")  # fmt: skip
        assert out.returncode == 0, out.stderr.decode()[-2000:]
        got = json.loads(out.stdout.decode().strip().splitlines()[-1])
        assert got["socket_path"] == "EACCES", got
        assert got["owner_fds"] == "EACCES" and got["owner_environ"] == "EACCES", got
        assert got["worker_fds"] == "EACCES", got  # its own uid, but the worker is not dumpable
        assert got["abstract"] == "ECONNREFUSED", got
        control = _as_nobody_py(STRANGER_LOCAL, json.dumps(info), str(owner.pid), str(wpid))
        assert control["socket_path"] == "reached", control
        owner.stdin.write(b"go\n")
        owner.stdin.flush()
        assert json.loads(owner.stdout.readline())["still"] is True
        assert owner.wait(30) == 0


def test_a_caller_of_the_workers_uid_is_turned_away(tier1: Tier1) -> None:
    """A process of the workers' own uid could ptrace them: the daemon will not serve it."""
    code = (
        "import json, socket, sys\n"
        "from vault.core.daemonwire import send_message, recv_message\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "send_message(s, {'op': 'hello'}); rep, _ = recv_message(s)\n"
        "print(json.dumps(rep))\n"
    )
    w = tier1.worker
    as_worker = ["setpriv", f"--reuid={w.pw_uid}", f"--regid={w.pw_gid}", "--clear-groups"]
    out = subprocess.run([*as_worker, SYSTEM_PYTHON, "-B", "-c", code, tier1.socket],
                         env=_nobody_env(), capture_output=True, timeout=60, cwd="/")  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    rep = json.loads(out.stdout)
    assert rep["ok"] is False and rep["error"]["code"] == "permission_denied", rep
    assert _as_nobody_py(code, tier1.socket)["ok"] is True  # control: another uid is served


# --- the device, revoked ------------------------------------------------------------------


def test_health_reports_tier_one_read_back_from_the_kernel(tier1: Tier1) -> None:
    import vault

    lic = tier1.keyserver.issue("t1", holder="health")
    with vault.open(tier1.package, licence=lic, daemon=tier1.socket) as m:
        hard = m.health()["hardening"]
        assert m.tier == 1
        assert hard["tier"]["status"] == "1"
        assert hard["user"]["status"] == "on"
        assert "kernel: PR_GET_DUMPABLE=0" in hard["dumpable"]["detail"]
        assert "kernel: NoNewPrivs: 1" in hard["no_new_privs"]["detail"]
        assert "kernel: Seccomp: 2" in hard["seccomp"]["detail"]
        status = Path(f"/proc/{m.pid}/status").read_text()
        assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status


# --- pre-started workers ------------------------------------------------------------------


def _waiting(t: Tier1, exclude: set[int] | None = None, timeout: float = 60) -> set[int]:
    """Pids of the daemon's pre-started workers (the workers' uid, started with
    ``--standby-fd``, hardened), once at least one is up."""
    deadline = time.monotonic() + timeout
    while True:
        found = set()
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in (exclude or set()):
                continue
            try:
                if os.stat(f"/proc/{name}").st_uid != t.worker.pw_uid:
                    continue
                cmd = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # counted once hardened: a standby is another uid from its first
            # instruction, and seccomp and no_new_privs follow within ms
            status = Path(f"/proc/{name}/status").read_text() if b"--standby-fd" in cmd else ""
            if "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status:
                found.add(int(name))
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_an_open_takes_a_pre_started_hardened_worker_and_one_more_waits_behind(
    tier1: Tier1,
) -> None:
    import vault

    lic = tier1.keyserver.issue("t1", holder="standby")
    x = {"x": np.ones((1, 8), np.float32)}
    waiting = _waiting(tier1)
    assert waiting, "the daemon keeps a worker pre-started"
    for pid in waiting:  # hardened while it waits, before any package reached it
        status = Path(f"/proc/{pid}/status").read_text()
        assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status, status
        assert f"Uid:\t{tier1.worker.pw_uid}" in status
    with vault.open(tier1.package, licence=lic, daemon=tier1.socket) as m:
        assert m.pid in waiting  # it existed before this open
        assert m.compute(x)["logits"].shape == (1, 5)
        behind = _waiting(tier1, exclude={m.pid})
        assert behind and not behind & {m.pid}
        with vault.open(tier1.package, licence=lic, daemon=tier1.socket) as m2:
            assert m2.pid in behind and m2.pid != m.pid  # never reused
            assert m2.compute(x)["logits"].shape == (1, 5)
        first = m.pid
    deadline = time.monotonic() + 10
    while Path(f"/proc/{first}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{first}").exists(), "a closed worker is gone, not returned to standby"


def test_an_open_survives_a_pre_started_worker_that_died_waiting(tier1: Tier1) -> None:
    import vault

    lic = tier1.keyserver.issue("t1", holder="standby-killed")
    waiting = _waiting(tier1)
    for pid in waiting:
        os.kill(pid, signal.SIGKILL)
    with vault.open(tier1.package, licence=lic, daemon=tier1.socket) as m:
        assert m.pid not in waiting
        assert m.compute({"x": np.ones((1, 8), np.float32)})["logits"].shape == (1, 5)
    assert _waiting(tier1, exclude=waiting), "a new one is started behind it"


def test_an_oversized_licence_is_refused_and_strands_no_worker(tier1: Tier1) -> None:
    """A caller's licence with a 200 KB holder would not fit the pipe a
    pre-started worker's licence goes on: refused at once (not a hung daemon
    thread and a stranded worker), and the next open is served as before."""
    import dataclasses

    import vault
    from vault.core.errors import ConfigError

    lic = tier1.keyserver.issue("t1", holder="oversized")
    big = dataclasses.replace(lic, holder="x" * 200_000)
    before = _waiting(tier1)
    with pytest.raises(ConfigError, match="too large"):
        vault.open(tier1.package, licence=big, daemon=tier1.socket)
    assert before <= _waiting(tier1), "the pre-started workers are still there, unassigned"
    with vault.open(tier1.package, licence=lic, daemon=tier1.socket) as m:
        assert m.pid in before
        assert m.compute({"x": np.ones((1, 8), np.float32)})["logits"].shape == (1, 5)


def test_prepack_false_reaches_a_pre_started_worker(tier1: Tier1) -> None:
    """``vault.open(..., prepack=False)``: a session option, the caller's to
    choose (the decrypted weights stay the only copy); hardening is untouched."""
    import vault

    lic = tier1.keyserver.issue("t1", holder="lean")
    x = {"x": np.ones((1, 8), np.float32)}
    waiting = _waiting(tier1)
    with vault.open(tier1.package, licence=lic, daemon=tier1.socket, prepack=False) as lean:
        assert lean.pid in waiting
        health = lean.health()
        assert health["prepack"] is False
        assert "kernel: Seccomp: 2" in health["hardening"]["seccomp"]["detail"]
        got = lean.compute(x)["logits"]
        with vault.open(tier1.package, licence=lic, daemon=tier1.socket) as default:
            assert default.health()["prepack"] is True
            np.testing.assert_allclose(default.compute(x)["logits"], got, rtol=1e-5)


RAW = r"""
import json, socket, sys
from vault.core.daemonwire import send_message, recv_message
def ask(msg, fds=()):
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
    try:
        try:
            send_message(s, msg, fds)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused unasked, and closed before this was sent: its refusal waits
        rep, _ = recv_message(s)
        return rep.get("error", {}).get("code") if not rep.get("ok") else "ok"
    except (ConnectionError, OSError) as e:
        return f"dropped: {e}"
    finally:
        s.close()
def raw(body):  # a hand-framed message: bytes the JSON encoder would never make
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
    try:
        s.sendall(len(body).to_bytes(4, "big") + body); rep, _ = recv_message(s)
        return rep.get("error", {}).get("code")
    except (ConnectionError, OSError) as e:
        return f"dropped: {e}"
    finally:
        s.close()
lic = json.load(open(sys.argv[2]))
pkg = open(sys.argv[3], "rb")
out = {
    "providers_not_strings": ask({"op": "open", "providers": [["CPUExecutionProvider"]],
                                  "licence": lic, "proof": {}, "client_key": "x" * 40}, [pkg.fileno()]),
    "licence_extra_not_a_map": ask({"op": "open", "licence": {**lic, "extra": "ab"},
                                    "proof": {}, "client_key": "x" * 40}, [pkg.fileno()]),
    "nested_deep": raw(b"[" * 50000 + b"]" * 50000),
    # a request under the 1 MiB limit whose answer would echo past it
    "hello_big_id": ask({"op": "hello", "id": "i" * 1_048_500}),
    "open_big_field": ask({"op": "open", "f" * 1_048_500: 1}, [pkg.fileno()]),
    "big_op": ask({"op": "o" * 1_048_500}),
    "hello_after": ask({"op": "hello"}),
}
# a regular file whose reads fail, with a licence and proof that hold
import zmq
from vault.core.licence import Licence
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); send_message(s, {"op": "hello"})
device_id = recv_message(s)[0]["device_id"]; s.close()
holder, key = Licence.from_json(lic), zmq.curve_keypair()[0].decode()
proof = holder.prove(device_id=device_id, model_id="t1", key_id="k", client_key=key,
                     package_digest="sha256:" + "0" * 64)
mem = open("/proc/self/mem", "rb")
out["proc_mem_package"] = ask({"op": "open", "licence": holder.public_copy().to_json(),
                               "proof": proof.to_wire(), "client_key": key,
                               "package_digest": "sha256:" + "0" * 64}, [mem.fileno()])
# a flood of idle connections from this uid: the ones past the cap of those
# holding no model get a refusal; its connections holding a model are not
# counted against that cap (the control: two models, each on its connection)
import select, time
import numpy as np
import vault
models = [vault.open(sys.argv[3], licence=sys.argv[2], daemon=sys.argv[1]) for _ in range(2)]
conns = []
for _ in range(int(sys.argv[4]) + 5):
    c = socket.socket(socket.AF_UNIX); c.connect(sys.argv[1]); conns.append(c)
deadline = time.monotonic() + 10  # only a refused connection is answered unasked, at once
readable = []
while len(readable) < 5 and time.monotonic() < deadline:
    time.sleep(0.2)
    readable, _, _ = select.select(conns, [], [], 0)
held, refused = [c for c in conns if c not in readable], 0
for c in readable:
    c.settimeout(5)
    rep, _ = recv_message(c)
    refused += rep.get("error", {}).get("code") == "config"
    c.close()
out["held"], out["refused"] = len(held), refused
out["hello_while_flooded"] = ask({"op": "hello"})
try:  # the client library says the same, typed, whichever comes first: its hello or the refusal
    vault.open(sys.argv[3], licence=sys.argv[2], daemon=sys.argv[1]).close()
    out["open_while_flooded"] = "ok"
except vault.VaultError as e:
    out["open_while_flooded"] = e.code
out["models_while_flooded"] = [m.compute({"x": np.ones((1, 8), np.float32)})["logits"].shape == (1, 5)
                               for m in models]
for m in models:
    m.close()
for c in held:
    c.close()
deadline = time.monotonic() + 10  # the daemon notices each hang-up at once; allow for load
while (r := ask({"op": "hello"})) != "ok" and time.monotonic() < deadline:
    time.sleep(0.1)
out["hello_after_flood"] = r
print(json.dumps(out))
"""


def test_odd_requests_get_typed_answers_and_a_flood_is_capped(tier1: Tier1) -> None:
    """As nobody: requests the daemon's checks never foresaw (a provider that
    is a list, a licence whose extra is a string, JSON nested 50,000 deep) are
    answered with a typed error, and the daemon goes on; a flood of idle
    connections from one uid past its cap of connections holding no model
    (8; 64 in all per uid: eight strangers' uids once filled the 512 in all)
    gets a typed refusal instead of running the daemon out of descriptors,
    while the same uid's two models, each on a connection of its own, go on
    computing, and everyone is served afterwards."""
    lic = _licence(tier1, "odd")
    res = _as_nobody_py(RAW, tier1.socket, lic, tier1.package, "8", timeout=120)
    assert res["providers_not_strings"] == "config", res
    assert res["licence_extra_not_a_map"] == "config", res
    assert res["nested_deep"] == "protocol", res
    assert res["hello_big_id"] == "ok", res  # answered, its id not echoed
    assert res["open_big_field"] == "config" and res["big_op"] == "protocol", res
    assert res["proc_mem_package"] == "format", res
    assert res["hello_after"] == "ok", res
    # 8 held at most (a connection of an earlier test may not be reaped yet)
    assert res["held"] <= 8 and res["refused"] >= 5 and res["held"] + res["refused"] == 13, res
    assert res["models_while_flooded"] == [True, True], res
    assert res["hello_while_flooded"] == "config", res  # its own uid is at the cap
    assert res["open_while_flooded"] == "config", res
    assert res["hello_after_flood"] == "ok", res
    import vault  # another caller (root) was never refused

    with vault.open(tier1.package, licence=tier1.keyserver.issue("t1", holder="after"),
                    daemon=tier1.socket) as m:  # fmt: skip
        assert m.compute({"x": np.ones((1, 8), np.float32)})["logits"].shape == (1, 5)


def test_a_caller_hanging_up_mid_open_does_not_drain_the_pool(tier1: Tier1) -> None:
    """An ``open`` whose caller hangs up before the answer still takes a
    pre-started worker; the daemon starts the next one all the same."""
    from vault.core.daemonwire import recv_message, send_message
    from vault.core.licence import Licence
    from vault.core.package import Package

    lic = tier1.keyserver.issue("t1", holder="hangup")
    s = socket.socket(socket.AF_UNIX)
    s.connect(tier1.socket)
    send_message(s, {"op": "hello"})
    hello, _ = recv_message(s)
    client_key = zmq.curve_keypair()[0].decode()
    with Package.load(tier1.package) as pkg:
        digest = pkg.digest
        proof = lic.prove(device_id=hello["device_id"], model_id=pkg.model_id,
                          key_id=pkg.key_id, package_digest=digest,
                          client_key=client_key)  # fmt: skip
    assert isinstance(lic, Licence)
    waiting = _waiting(tier1)
    with open(tier1.package, "rb") as fh:
        send_message(s, {"op": "open", "licence": lic.public_copy().to_json(),
                         "proof": proof.to_wire(), "client_key": client_key,
                         "package_digest": digest}, [fh.fileno()])  # fmt: skip
    s.close()  # gone before the answer
    deadline = time.monotonic() + 60
    while _waiting(tier1) & waiting and time.monotonic() < deadline:
        time.sleep(0.1)  # the one it took leaves the pool...
    assert _waiting(tier1, exclude=waiting), "...and a new one is started behind it"


def test_a_package_resealed_in_place_opens_under_its_own_digest(tier1: Tier1) -> None:
    """The client names a package to the daemon by its digest and remembers
    the digests it computed (a later open reads no payload): a package sealed
    anew at the same path, the same size, must be named anew, or its worker's
    key release is refused for a proof that names the old one."""
    import vault
    from vault import client as _client
    from vault.core.package import Package

    pk = PublisherKey.load(tier1.keyserver.publisher_key_path)
    path = Path(tempfile.mkdtemp(prefix="reseal-", dir=tier1.dir)) / "m.vault"
    os.chmod(path.parent, 0o755)
    lic = tier1.keyserver.issue("t1", holder="reseal")
    x = {"x": np.ones((1, 8), np.float32)}
    digests = []
    for _ in range(2):
        res = seal(mlp(), model_id="t1", signing_key=pk, output=path)
        os.chmod(res.path, 0o644)
        tier1.keyserver.register(res.model_id, res.key_id, res.key, res.digest)
        for _ in range(2):  # the second open of the same package reads its digest back
            with vault.open(path, licence=lic, daemon=tier1.socket) as m:
                assert m.compute(x)["logits"].shape == (1, 5)
        digests.append(res.digest)
        with Package.load(path) as pkg:
            assert _client._DIGESTS[pkg.name_parts()] == res.digest
    assert digests[0] != digests[1]
