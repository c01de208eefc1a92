"""The worker's hardening, proven from outside the process.

Root bypasses non-dumpability, so the worker *and* the would-be attacker run
as ``nobody`` here, with Debian's ``/usr/bin/python3`` and a world-readable
``PYTHONPATH`` (the default interpreter lives under a 0700 home). A control
process proves the attack works against an unhardened process of the same
user, so a pass means something.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

import vault
from tests.models import mlp
from tests.prereq import require
from tests.sealed import Sealed, open_sealed, seal_for_test
from vault.core.launch import read_ready_line, spawn_worker
from vault.core.process import stop_process
from vault.core.protocol import PROTOCOL_VERSION, encode_tensors, pack_header, unpack_header

SYSTEM_PYTHON = "/usr/bin/python3"
ROOT = Path(__file__).resolve().parents[2]


def _site_packages() -> str:
    return str(Path(np.__file__).resolve().parents[1])


def _nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


def _as_nobody(cmd: list[str]) -> list[str]:
    nb = _nobody()
    return ["setpriv", f"--reuid={nb.pw_uid}", f"--regid={nb.pw_gid}", "--clear-groups", *cmd]


_SOURCE_COPY: list[str] = []


def _readable_source() -> str:
    """A world-readable copy of ``vault``/``worker`` (the checkout may sit under
    a 0700 home, as CI's clone can), made once and removed at exit."""
    if not _SOURCE_COPY:
        import atexit

        d = tempfile.mkdtemp(prefix="vault-src-")
        os.chmod(d, 0o755)
        for pkg in ("vault", "worker"):
            shutil.copytree(ROOT / pkg, Path(d) / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        for dirpath, dirnames, filenames in os.walk(d):
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)
        atexit.register(shutil.rmtree, d, True)
        _SOURCE_COPY.append(d)
    return _SOURCE_COPY[0]


def _nobody_env() -> dict[str, str]:
    path = f"{_readable_source()}:{_site_packages()}"
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": path}


@pytest.fixture(scope="module")
def nobody_python() -> None:
    """Root, setpriv and an interpreter nobody can run: a loud skip on a
    developer's machine without them, a failure under CI (tests/prereq.py)."""
    require(os.geteuid() == 0, "root, to start processes as nobody")
    require(os.path.exists(SYSTEM_PYTHON) and shutil.which("setpriv") is not None,
            f"{SYSTEM_PYTHON} and setpriv, to run as nobody")  # fmt: skip
    probe = subprocess.run(
        _as_nobody([SYSTEM_PYTHON, "-B", "-c", "import numpy, onnxruntime, zmq, vault.core.package, worker.runtime"]),
        env=_nobody_env(), capture_output=True, cwd="/", timeout=60,
    )  # fmt: skip
    # a broken setup, never an absent feature: fails wherever it happens
    assert probe.returncode == 0, f"nobody cannot import the stack: {probe.stderr.decode()[-300:]}"


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """A directory nobody can read (pytest's tmp dirs are 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="vault-hardening-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def sealed(shared_dir: Path) -> Sealed:
    s = seal_for_test(shared_dir, mlp(), name="hard")
    for p in shared_dir.iterdir():
        os.chmod(p, 0o644)
    return s


@contextlib.contextmanager
def nobody_worker(
    sealed: Sealed, shared_dir: Path, *extra: str
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """``python -m worker`` as nobody; yields (pid, endpoint, ready message)."""
    nb = _nobody()
    sock_dir = Path(tempfile.mkdtemp(prefix="vault-nb-", dir=shared_dir))
    os.chown(sock_dir, nb.pw_uid, nb.pw_gid)
    endpoint = f"ipc://{sock_dir}/w.sock"
    status_r, status_w = os.pipe()
    key_r, key_w = os.pipe()
    args = [sealed.path, "--endpoint", endpoint, "--status-fd", str(status_w),
            "--unsafe-test-key-fd", str(key_r), "--publisher", sealed.publisher_pub, *extra]  # fmt: skip
    proc = spawn_worker(args, pass_fds=[status_w, key_r], cwd=str(sock_dir), python=SYSTEM_PYTHON,
                        prefix=_as_nobody([]), sys_path=[_readable_source(), _site_packages()],
                        stderr=subprocess.PIPE)  # fmt: skip
    os.close(status_w)
    os.close(key_r)
    os.write(key_w, sealed.key)
    os.close(key_w)
    try:
        try:
            ready = read_ready_line(status_r, timeout=60, proc=proc)
        finally:
            os.close(status_r)
        yield proc.pid, endpoint, ready
    finally:
        stop_process(proc, 10)
        proc.stderr.close()  # type: ignore[union-attr]
        shutil.rmtree(sock_dir, ignore_errors=True)


def _call(endpoint: str, op: str, tensors: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    try:
        s.connect(endpoint)
        descs, frames = encode_tensors(tensors or {})
        header: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": op, "id": 1}
        if op == "compute":
            header["tensors"] = descs
        s.send_multipart([pack_header(header), *(frames if op == "compute" else [])])
        assert s.poll(20000), f"no reply to {op}"
        return unpack_header(s.recv_multipart()[0])
    finally:
        s.close()
        ctx.term()


ATTACK = r"""
import ctypes, sys
pid = int(sys.argv[1]); res = {}
try:
    with open(f"/proc/{pid}/mem", "rb") as fh:
        # the first readable mapping, if the maps file is readable at all
        start = 0
        try:
            for line in open(f"/proc/{pid}/maps"):
                addr, perms = line.split()[:2]
                if perms.startswith("r"):
                    start = int(addr.split("-")[0], 16)
                    break
        except OSError:
            pass
        fh.seek(start)
        res["mem"] = "read" if fh.read(16) else "empty"
except OSError as e:
    res["mem"] = f"denied errno {e.errno}"
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
    res["ptrace"] = "attached"
    import os; os.waitpid(pid, 0); libc.ptrace(PTRACE_DETACH, pid, None, None)
else:
    res["ptrace"] = f"denied errno {ctypes.get_errno()}"
try:
    open(f"/proc/{pid}/environ", "rb").read()
    res["environ"] = "read"
except OSError as e:
    res["environ"] = f"denied errno {e.errno}"
print(repr(res))
"""


def _attack(pid: int) -> dict[str, str]:
    out = subprocess.run(_as_nobody([SYSTEM_PYTHON, "-B", "-c", ATTACK, str(pid)]), env=_nobody_env(),
                         capture_output=True, timeout=30, cwd="/")  # fmt: skip
    assert out.returncode == 0, out.stderr
    import ast

    return ast.literal_eval(out.stdout.decode().strip())


@pytest.mark.usefixtures("nobody_python")
def test_same_user_cannot_read_memory_or_ptrace_the_worker(
    sealed: Sealed, shared_dir: Path
) -> None:
    # control: a plain process of the same user *can* be read, so the denials below mean something
    victim = subprocess.Popen(
        _as_nobody([SYSTEM_PYTHON, "-c", "import time; time.sleep(30)"]), env=_nobody_env()
    )
    try:
        deadline = time.monotonic() + 60  # the victim runs python (not setpriv any more)
        while b"time.sleep(30)" not in Path(f"/proc/{victim.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the control process never started"
            time.sleep(0.01)
        control = _attack(victim.pid)
        assert control["mem"] == "read" and control["ptrace"] == "attached", control
    finally:
        victim.kill()
        victim.wait()
    with nobody_worker(sealed, shared_dir) as (pid, endpoint, ready):
        res = _attack(pid)
        assert res["mem"].startswith("denied"), res
        assert res["ptrace"].startswith("denied"), res
        assert res["environ"].startswith("denied"), res
        # RLIMIT_CORE 0, seen by root from outside
        limits = Path(f"/proc/{pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core
        status = Path(f"/proc/{pid}/status").read_text()
        assert "NoNewPrivs:\t1" in status
        assert "Seccomp:\t2" in status
        # and it still computes, reporting its hardening
        health = _call(endpoint, "health")
        assert health["ok"]
        hard = health["hardening"]
        assert hard["dumpable"]["status"] == "on"
        assert hard["core_dumps"]["status"] == "on"
        assert hard["mlock"]["status"] in ("on", "skipped")  # RLIMIT_MEMLOCK is small for nobody
        assert hard["landlock"]["status"] in ("on", "absent")
        assert hard["seccomp"]["status"] in ("on", "absent")
        assert health["kernel"]["uid"] == _nobody().pw_uid
        out = _call(endpoint, "compute", {"x": np.ones((2, 8), np.float32)})
        assert out["ok"], out


@pytest.mark.usefixtures("nobody_python")
def test_root_started_worker_drops_to_nobody(sealed: Sealed, shared_dir: Path) -> None:
    nb = _nobody()
    sock_dir = Path(tempfile.mkdtemp(prefix="vault-drop-", dir=shared_dir))
    os.chown(sock_dir, nb.pw_uid, nb.pw_gid)
    endpoint = f"ipc://{sock_dir}/w.sock"
    m = vault.client._LocalWorker(  # the client's own spawner, with the system python and --user
        sealed.path, None, providers=None, device=None, start_timeout=60, unsafe_key=sealed.key,
        publisher=sealed.publisher_pub, worker_args=["--user", "nobody"], python=SYSTEM_PYTHON,
    )  # fmt: skip
    try:
        os.chown(m.dir, nb.pw_uid, nb.pw_gid)  # the dropped worker must be able to bind there
        os.environ_backup = None  # type: ignore[attr-defined]
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = _nobody_env()["PYTHONPATH"]
        try:
            m.python = SYSTEM_PYTHON
            endpoint = _start_without_isolation(m)
        finally:
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old
        pid = m.proc.pid  # type: ignore[union-attr]
        st = os.stat(f"/proc/{pid}")
        assert st.st_uid in (0, nb.pw_uid)
        uid_line = next(
            x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:")
        )
        assert uid_line.split()[1:] == [str(nb.pw_uid)] * 4, uid_line
        assert _attack(pid)["mem"].startswith("denied")
        health = _call(endpoint, "health")
        assert health["hardening"]["user"]["status"] == "on"
    finally:
        m.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def _start_without_isolation(w: Any) -> str:
    """The client starts workers with ``python -I`` (PYTHONPATH ignored); the
    system interpreter needs PYTHONPATH, so pass it through its environment."""
    import vault.client as client

    real_popen = subprocess.Popen

    def popen(cmd: list[str], **kw: Any) -> Any:
        cmd = [c for c in cmd if c != "-I"]
        kw["env"] = {**kw["env"], "PYTHONPATH": _nobody_env()["PYTHONPATH"]}
        return real_popen(cmd, **kw)

    client.subprocess.Popen = popen  # type: ignore[assignment]
    try:
        return str(w.start())
    finally:
        client.subprocess.Popen = real_popen  # type: ignore[assignment]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    if root.exists():
        for p in root.rglob("*"):
            with contextlib.suppress(OSError):
                st = p.lstat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def test_worker_writes_nothing_even_with_a_writable_home(tmp_path: Path) -> None:
    """Give the worker a *writable* HOME on purpose: Landlock still keeps
    onnxruntime's telemetry store (and anything else) off the disk."""
    home = tmp_path / "home"
    home.mkdir()
    s = seal_for_test(tmp_path, mlp(), name="quiet")
    before = _tree(tmp_path)
    with open_sealed(s, worker_args=["--home", str(home)]) as m:
        if m.health()["hardening"]["landlock"]["status"] != "on":
            pytest.skip("LOUD SKIP: no Landlock on this kernel")
        for _ in range(5):
            m.compute({"x": np.ones((3, 8), np.float32)})
        wdir = Path(m._localw.dir)  # type: ignore[union-attr]
        assert m.health()["kernel"]["home"] == str(home)
        # only its socket (w0), beside the caller's own listening socket (c0,
        # which the client made there for the direct local channel)
        assert sorted(p.name for p in wdir.iterdir()) == ["c0.sock", "w0.sock"]
    assert list(home.rglob("*")) == []  # no ~/.cache/Microsoft/... store
    assert _tree(tmp_path) == before


def test_default_home_cannot_exist(tmp_path: Path) -> None:
    s = seal_for_test(tmp_path, mlp(), name="nohome")
    with open_sealed(s) as m:
        env = dict(
            kv.split(b"=", 1)
            for kv in Path(f"/proc/{m.pid}/environ").read_bytes().split(b"\0")
            if b"=" in kv
        )
        assert env[b"HOME"].startswith(b"/proc/self/")
        assert set(env) <= {
            b"HOME",
            b"XDG_CACHE_HOME",
            b"XDG_CONFIG_HOME",
            b"TMPDIR",
            b"PATH",
            b"LANG",
        }


def _scan(roots: list[Path], pattern: bytes) -> list[str]:
    hits = []
    for root in roots:
        if not root.exists():
            continue
        for dirpath, _dirs, files in os.walk(root, followlinks=False):
            for name in files:
                p = os.path.join(dirpath, name)
                try:
                    st = os.lstat(p)
                    if not (st.st_mode & 0o170000 == 0o100000) or st.st_size > 64 << 20:
                        continue
                    with open(p, "rb") as fh:
                        if pattern in fh.read():
                            hits.append(p)
                except OSError:
                    continue
    return hits


def test_sentinel_weights_never_reach_the_disk(tmp_path: Path) -> None:
    sentinel = os.urandom(32)
    s = seal_for_test(tmp_path, mlp(sentinel=sentinel), name="sentinel")
    assert sentinel not in Path(s.path).read_bytes()
    with open_sealed(s) as m:
        x = np.ones((4, 8), np.float32)
        m.compute({"x": x})
        m.health()
        m.stats()
        with pytest.raises(vault.InputError):
            m.compute({"x": x}, outputs=["hidden"])
        os.kill(m.pid, 9)  # a crash: no core file may appear
        with pytest.raises(vault.WorkerCrashedError):
            for _ in range(50):
                m.compute({"x": x})
        m.compute({"x": x})  # restarted
    roots = [Path(tempfile.gettempdir()), Path.cwd(), Path.home() / ".cache", Path("/var/tmp"),
             Path("/dev/shm"), tmp_path]  # fmt: skip
    assert _scan(roots, sentinel) == []
