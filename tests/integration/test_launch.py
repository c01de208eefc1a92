"""The one launch module: every worker starts isolated (``-I``, a minimal
environment), and its ready line is read one way."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vault.core.errors import (
    ConfigError,
    ProtocolError,
    VaultError,
    WorkerCrashedError,
    WorkerTimeoutError,
)
from vault.core.launch import read_ready_line, spawn_worker, worker_command
from vault.core.process import stop_process

ROOT = Path(__file__).resolve().parents[2]

HOOK = """\
import os, sys
with open({marker!r}, "a") as fh:
    fh.write(" ".join(sys.argv) + "\\n")
"""


def _plant(where: Path, marker: Path) -> None:
    """Modules a hostile working directory or PYTHONPATH would inject."""
    for name in ("json.py", "sitecustomize.py", "usercustomize.py", "argparse.py"):
        (where / name).write_text(HOOK.format(marker=str(marker)))


def _start(cwd: Path, env_extra: dict[str, str], cmd: list[str] | None = None) -> dict[str, object]:
    status_r, status_w = os.pipe()
    args = [str(cwd / "missing.vault"), "--endpoint", f"ipc://{cwd}/w.sock",
            "--status-fd", str(status_w), "--publisher", "/nonexistent"]  # fmt: skip
    old = dict(os.environ)
    os.environ.update(env_extra)  # the launcher's own environment is hostile
    try:
        if cmd is None:
            proc = spawn_worker(args, pass_fds=[status_w], cwd=str(cwd))
        else:  # the control: the same launch without -I and the clean environment
            proc = subprocess.Popen([*cmd, *args], pass_fds=[status_w], cwd=str(cwd),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    finally:
        os.environ.clear()
        os.environ.update(old)
        os.close(status_w)
    try:
        return read_ready_line(status_r, timeout=60, proc=proc)
    except VaultError as exc:
        return {"error": type(exc).__name__}
    finally:
        os.close(status_r)
        stop_process(proc)


def test_hostile_cwd_and_pythonpath_never_reach_the_worker(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    _plant(tmp_path, marker)
    res = _start(
        tmp_path, {"PYTHONPATH": str(tmp_path), "PYTHONSTARTUP": str(tmp_path / "json.py")}
    )
    assert res == {"error": "ConfigError"}  # it ran our worker, which refused the missing files
    assert not marker.exists(), marker.read_text()


def test_control_without_isolation_the_hook_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    _plant(tmp_path, marker)
    _start(tmp_path, {"PYTHONPATH": str(tmp_path)}, cmd=[sys.executable, "-B", "-m", "worker"])
    assert marker.exists() and "worker" in marker.read_text()


def test_command_is_isolated_and_environment_minimal() -> None:
    cmd = worker_command(["pkg.vault"], python="/usr/bin/python3")
    assert cmd[:5] == ["/usr/bin/python3", "-I", "-B", "-m", "worker"]
    boot = worker_command(
        ["pkg.vault"], python="py", sys_path=["/src", "/site"], prefix=["setpriv"]
    )
    assert boot[:4] == ["setpriv", "py", "-I", "-B"] and "/src:/site" in boot


def _pipe_with(data: bytes) -> int:
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return r


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"not json\n", ProtocolError),
        (b"[1, 2]\n", ProtocolError),
        (b'{"ready": false, "error": {"code": "config", "message": "no"}}\n', ConfigError),
        (b'{"ready": false}\n', WorkerCrashedError),
        (b"", WorkerCrashedError),  # closed before a line
    ],
)
def test_ready_line_failures_are_typed(data: bytes, error: type[Exception]) -> None:
    fd = _pipe_with(data)
    try:
        with pytest.raises(error):
            read_ready_line(fd, timeout=5)
    finally:
        os.close(fd)


def test_ready_line_timeout_and_success() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(WorkerTimeoutError):
            read_ready_line(r, timeout=0.3)
        os.write(w, b'{"ready": true, "endpoint": "ipc://x"}\nrest')
        assert read_ready_line(r, timeout=5)["endpoint"] == "ipc://x"
    finally:
        os.close(r)
        os.close(w)


def test_one_place_builds_a_worker_command_line() -> None:
    pattern = re.compile(r"""["']-m["']\s*,\s*["']worker["']""")
    offenders = []
    for top in ("vault", "worker", "keyserver", "tests", "benchmarks"):
        for path in (ROOT / top).rglob("*.py"):
            if path.name == "launch.py" and path.parent.name == "core":
                continue
            if path == Path(__file__).resolve():
                continue
            if pattern.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == [], f"worker command lines built outside vault/core/launch.py: {offenders}"


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_worker_pipes_hand_secrets_over_pipes_and_leak_no_fd() -> None:
    from vault.core.launch import WorkerPipes

    before = _open_fds()
    pipes = WorkerPipes()
    pipes.secret("--licence-fd", b"s3cret-licence")
    fd = pipes.args[pipes.args.index("--licence-fd") + 1]
    child = subprocess.Popen(
        [sys.executable, "-c", f"import os, sys; sys.stdout.write(os.read({fd}, 100).decode())"],
        pass_fds=pipes.pass_fds, stdout=subprocess.PIPE,
    )  # fmt: skip
    pipes.spawned()
    out, _ = child.communicate(timeout=30)
    assert out == b"s3cret-licence"
    assert not any("s3cret" in a for a in child.args)  # never on the command line
    pipes.close_status()
    assert pipes.lifeline_w is not None
    os.close(pipes.lifeline_w)
    assert _open_fds() == before

    failing = WorkerPipes()
    failing.secret("--device-key-fd", b"k")
    failing.failed()  # a spawn that failed: every fd of the launch is closed
    assert _open_fds() == before


# --- a pre-started worker's assignment ------------------------------------------------------


def _standby(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, int, socket.socket]:
    status_r, status_w = os.pipe()
    life_r, life_w = os.pipe()
    ours, theirs = socket.socketpair()
    args = ["--standby-fd", str(theirs.fileno()), "--endpoint", f"ipc://{tmp_path}/w.sock",
            "--status-fd", str(status_w), "--lifeline-fd", str(life_r)]  # fmt: skip
    proc = spawn_worker(args, pass_fds=[status_w, life_r, theirs.fileno()], cwd=str(tmp_path))
    for fd in (status_w, life_r):
        os.close(fd)
    theirs.close()
    return proc, status_r, life_w, ours


def test_an_assignment_cannot_change_a_pre_started_workers_options(tmp_path: Path) -> None:
    """Only the package, the caller and its licence are assignable: a field
    that names anything else (hardening off) is refused on the ready line."""
    from vault.core.daemonwire import send_message

    proc, status_r, life_w, sock = _standby(tmp_path)
    pkg = tmp_path / "any.vault"
    pkg.write_bytes(b"x")
    fd = os.open(pkg, os.O_RDONLY)
    try:
        send_message(sock, {"op": "assign", "package_fd": 0, "no_seccomp": True}, [fd])
        assert sock.recv(1) == b"T"
        with pytest.raises(ProtocolError, match="no_seccomp"):
            read_ready_line(status_r, timeout=60, proc=proc)
        assert proc.wait(timeout=30) == 3
    finally:
        os.close(fd)
        os.close(status_r)
        os.close(life_w)
        sock.close()
        stop_process(proc, 5)


def test_a_pre_started_worker_leaves_when_its_launcher_does(tmp_path: Path) -> None:
    """The lifeline reaching EOF before any assignment: the worker exits, 0."""
    proc, status_r, life_w, sock = _standby(tmp_path)
    try:
        os.close(life_w)
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(status_r)
        sock.close()
        stop_process(proc, 5)


def _tree_of_worker_modules(dst: Path) -> list[Path]:
    """This project's worker-side packages (their modules only) copied to ``dst``."""
    import shutil

    from vault.core.launch import WORKER_PACKAGES

    copied = []
    for parts in WORKER_PACKAGES:
        (dst.joinpath(*parts)).mkdir(parents=True, exist_ok=True)
        for src in ROOT.joinpath(*parts).glob("*.py"):
            copied.append(Path(shutil.copy2(src, dst.joinpath(*parts, src.name))))
    return copied


@pytest.mark.parametrize("force", [False, True], ids=["allowed", "forced"])
def test_the_launcher_writes_the_workers_bytecode_once_and_honours_dont_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force: bool
) -> None:
    """A worker runs with -B under Landlock and cannot write bytecode: from an
    install without it (an editable one) each start compiled every module.
    The launcher writes what is missing, as pip does for a wheel; never where
    the user said not to write bytecode."""
    import importlib.util

    from vault.core import launch

    modules = _tree_of_worker_modules(tmp_path / "src")
    assert len(modules) > 20
    monkeypatch.setattr(launch, "_BYTECODE_DONE", set())
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    launch.write_worker_bytecode([str(tmp_path / "src")])
    assert not any(Path(importlib.util.cache_from_source(str(m))).exists() for m in modules)
    if force:  # the benchmarks' way: written whatever the machine sets
        launch.write_worker_bytecode([str(tmp_path / "src")], force=True)
    else:
        monkeypatch.setattr(sys, "dont_write_bytecode", False)
        launch.write_worker_bytecode([str(tmp_path / "src")])
    cached = [Path(importlib.util.cache_from_source(str(m))) for m in modules]
    assert all(c.exists() for c in cached), [c for c in cached if not c.exists()]
    # once per process and root: a second launch does not look again
    stamp = {c: c.stat().st_mtime_ns for c in cached}
    modules[0].write_text(modules[0].read_text() + "\n")
    launch.write_worker_bytecode([str(tmp_path / "src")])
    assert {c: c.stat().st_mtime_ns for c in cached} == stamp
    # a worker started from that tree still runs
    out = subprocess.run(
        [*worker_command(["--help"], sys_path=[str(tmp_path / "src")])],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 0 and "--max-message" in out.stdout, out.stderr[-500:]


def test_spawning_a_worker_writes_its_bytecode_first_for_the_same_interpreter_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vault.core import launch

    seen: list[tuple[str, ...]] = []
    monkeypatch.setattr(launch, "write_worker_bytecode", lambda roots=(): seen.append(tuple(roots)))
    proc = spawn_worker(["--help"], sys_path=[str(ROOT)])
    assert proc.wait(timeout=60) == 0
    assert seen == [(str(ROOT),)]
    other = tmp_path / "python3"  # another interpreter: its bytecode is not ours to write
    other.symlink_to("/bin/true")
    spawn_worker(["--help"], python=str(other)).wait(timeout=60)
    assert seen == [(str(ROOT),)]


def test_bytecode_goes_only_where_nobody_else_can_write_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytecode is code the workers run: a __pycache__ others could write
    would let them swap it. Under umask 0 the launcher's stays 0755; a
    package directory others may write gets none."""
    import importlib.util

    from vault.core import launch

    modules = _tree_of_worker_modules(tmp_path / "src")
    open_dir = tmp_path / "src" / "worker"
    open_dir.chmod(0o777)  # the control: a package directory anyone may write
    monkeypatch.setattr(launch, "_BYTECODE_DONE", set())
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    old = os.umask(0)
    try:
        launch.write_worker_bytecode([str(tmp_path / "src")])
    finally:
        os.umask(old)
    for m in modules:
        cached = Path(importlib.util.cache_from_source(str(m)))
        if m.parent == open_dir:
            assert not cached.exists() and not (open_dir / "__pycache__").exists()
            continue
        assert cached.exists(), m
        mode = cached.parent.stat().st_mode & 0o777
        assert mode == 0o755, oct(mode)
        assert not cached.stat().st_mode & 0o022, oct(cached.stat().st_mode)


def test_root_writes_no_bytecode_into_another_users_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A root launcher (the daemon, a demo run as root) leaves a user's
    checkout alone: no root-owned __pycache__ the user could not remove."""
    from tests.prereq import require

    require(os.geteuid() == 0, "root, to give the tree to another user")
    from vault.core import launch

    modules = _tree_of_worker_modules(tmp_path / "src")
    for d in {m.parent for m in modules}:
        os.chown(d, 65534, 65534)
    monkeypatch.setattr(launch, "_BYTECODE_DONE", set())
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    launch.write_worker_bytecode([str(tmp_path / "src")])
    assert not any((m.parent / "__pycache__").exists() for m in modules)


def _as_nobody_sh(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/bin/sh", "-c", script],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_a_bytecode_cache_others_could_write_is_repaired_and_anothers_refused() -> None:
    """A root Python under umask 0 leaves each __pycache__ it creates 0777:
    another user could then plant bytecode (an unchecked-hash .pyc is loaded
    without a look at its source), or rename one of root's files over
    another, and every worker from that install runs it. Such a cache is
    made 0755 and emptied (it is rebuilt); in a cache others could not
    write, only what is not a regular file of root's, writable by it alone,
    with one link, is removed; a cache of another user's is refused."""
    import shutil
    import stat
    import tempfile

    from tests.prereq import require
    from vault.core.launch import secure_pycache

    require(os.geteuid() == 0 and shutil.which("setpriv") is not None, "root and setpriv")
    base = Path(tempfile.mkdtemp(prefix="vault-cache-"))
    try:
        base.chmod(0o755)
        pkg = base / "pkg"
        pkg.mkdir(mode=0o755)
        cache = pkg / "__pycache__"
        cache.mkdir()
        cache.chmod(0o777)  # what a Python under umask 0 leaves
        for name in ("a.cpython-311.pyc", "b.cpython-311.pyc"):
            (cache / name).write_bytes(name.encode())
            (cache / name).chmod(0o644)
        # the control: anyone may plant bytecode in such a cache, or shuffle root's
        planted = _as_nobody_sh(f"echo evil > {cache}/package.cpython-311.pyc && "
                                f"mv {cache}/a.cpython-311.pyc {cache}/b.cpython-311.pyc")  # fmt: skip
        assert planted.returncode == 0, planted.stderr
        assert (cache / "package.cpython-311.pyc").stat().st_uid == 65534
        assert (cache / "b.cpython-311.pyc").read_bytes() == b"a.cpython-311.pyc"  # root's, moved
        assert secure_pycache(str(pkg), {0}) is None
        assert stat.S_IMODE(cache.stat().st_mode) == 0o755 and list(cache.iterdir()) == []
        again = _as_nobody_sh(f"echo evil > {cache}/package.cpython-311.pyc")
        assert again.returncode != 0 and not (cache / "package.cpython-311.pyc").exists()
        # a cache nobody else could write: what is not root's own, alone, goes
        good = cache / "mod.cpython-311.pyc"
        good.write_bytes(b"root's own bytecode")
        (cache / "theirs.pyc").write_bytes(b"x")
        os.chown(cache / "theirs.pyc", 65534, 65534)
        (cache / "open.pyc").write_bytes(b"x")
        (cache / "open.pyc").chmod(0o666)  # root's, but anyone may rewrite it
        elsewhere = base / "elsewhere.pyc"
        elsewhere.write_bytes(b"y")
        os.link(elsewhere, cache / "linked.pyc")  # another name for a file outside
        (cache / "ln.pyc").symlink_to(elsewhere)
        (cache / "sub").mkdir()
        assert secure_pycache(str(pkg), {0}) is None
        assert sorted(p.name for p in cache.iterdir()) == ["mod.cpython-311.pyc"]
        assert good.read_bytes() == b"root's own bytecode" and elsewhere.exists()
        # a cache of another user's: not ours to repair, refused as it is
        os.chown(cache, 65534, 65534)
        cache.chmod(0o777)
        why = secure_pycache(str(pkg), {0})
        assert why is not None and "belongs to uid 65534" in why
        assert stat.S_IMODE(cache.stat().st_mode) == 0o777
        assert secure_pycache(str(base / "absent"), {0}) is None  # no cache: nothing to do
    finally:
        shutil.rmtree(base)


def test_code_directories_must_be_the_owners_all_the_way_up() -> None:
    """Whoever may write a directory the workers import from, or any
    directory above it, can swap the code: each must belong to root (or the
    daemon's user) and be writable by nobody else; a sticky one above (/tmp)
    is fine, a sticky one holding the code is not."""
    import shutil
    import tempfile

    from tests.prereq import require
    from vault.core.launch import code_dir_problem

    require(os.geteuid() == 0, "root, to give a directory to another user")
    base = Path(tempfile.mkdtemp(prefix="vault-code-"))
    try:
        base.chmod(0o755)
        mid = base / "mid"
        code = mid / "pkg"
        code.mkdir(parents=True)
        mid.chmod(0o755)
        code.chmod(0o755)
        assert code_dir_problem(str(code), {0}) is None  # below /tmp (sticky): fine
        os.chown(mid, 65534, 65534)  # its owner could move pkg aside and put its own
        assert f"{mid} belongs to uid 65534" in (code_dir_problem(str(code), {0}) or "")
        assert code_dir_problem(str(code), {0, 65534}) is None
        os.chown(mid, 0, 0)
        mid.chmod(0o777)
        assert f"{mid} is writable by others" in (code_dir_problem(str(code), {0}) or "")
        mid.chmod(0o1777)  # sticky above: others may add names, not move pkg
        assert code_dir_problem(str(code), {0}) is None
        code.chmod(0o1777)  # sticky where the code is: others may add modules
        assert f"{code} is writable by others" in (code_dir_problem(str(code), {0}) or "")
        code.chmod(0o775)  # writable by its group: root's group counts as root
        assert code_dir_problem(str(code), {0}, groups={0}) is None
        os.chown(code, 0, 65534)
        assert "is writable by others" in (code_dir_problem(str(code), {0}, groups={0}) or "")
        os.chown(code, 0, 0)
        code.chmod(0o755)
        link = base / "link"
        link.symlink_to(code)
        assert code_dir_problem(str(link), {0}) is None
        os.lchown(link, 65534, 65534)  # another user's link is refused as anything of theirs
        assert "belongs to uid 65534" in (code_dir_problem(str(link), {0}) or "")
    finally:
        shutil.rmtree(base)


def test_the_daemon_repairs_the_caches_an_import_under_umask_0_left_open() -> None:
    """The attack, end to end up to the worker's read: a root Python started
    under umask 0 importing this project makes its caches 0777, and another
    user swaps a module's bytecode (the control). The daemon's start check
    (:func:`check_worker_code`, on the directories the workers import from)
    repairs them: the swapped bytecode is gone and no other can be put."""
    import shutil
    import stat
    import tempfile

    from tests.prereq import require
    from vault.app.daemon import check_worker_code

    require(os.geteuid() == 0 and shutil.which("setpriv") is not None, "root and setpriv")
    base = Path(tempfile.mkdtemp(prefix="vault-umask0-"))
    try:
        base.chmod(0o755)
        for pkg in ("vault", "worker"):
            shutil.copytree(ROOT / pkg, base / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run(
            [sys.executable, "-c", "import os, sys; os.umask(0); sys.path.insert(0, sys.argv[1]); "
             "import vault.core.package, worker.ops", str(base)],
            check=True, timeout=120, env={"PATH": "/usr/bin:/bin"}, cwd="/",
        )  # fmt: skip
        dirs = [base / "vault", base / "vault" / "core", base / "worker"]
        caches = [d / "__pycache__" for d in dirs]
        assert [stat.S_IMODE(c.stat().st_mode) for c in caches] == [0o777] * 3
        target = caches[1] / f"package.{sys.implementation.cache_tag}.pyc"
        assert target.stat().st_uid == 0
        swap = f"echo evil > {caches[1]}/.x && mv {caches[1]}/.x {target}"
        planted = _as_nobody_sh(swap)
        assert planted.returncode == 0 and target.stat().st_uid == 65534, planted.stderr
        check_worker_code([str(d) for d in dirs])
        assert [stat.S_IMODE(c.stat().st_mode) for c in caches] == [0o755] * 3
        assert not target.exists()
        assert all(f.stat().st_uid == 0 for c in caches for f in c.iterdir())
        again = _as_nobody_sh(swap)
        assert again.returncode != 0 and not target.exists()
    finally:
        shutil.rmtree(base)


def test_the_daemons_checks_run_none_of_the_workers_code_and_look_at_every_module(
    tmp_path: Path,
) -> None:
    """The probe that asks the workers' interpreter where their packages are
    finds them without importing them (an import ran a cache's planted
    bytecode as the workers' uid before any check); a module file another
    user may write is refused like a directory."""
    import shutil
    import tempfile

    from tests.prereq import require
    from vault.app.daemon import check_worker_can_run, check_worker_code
    from vault.core.launch import WORKER_PACKAGES

    require(os.geteuid() == 0, "root, for a root-owned copy of the install")
    base = Path(tempfile.mkdtemp(prefix="vault-probe-"))
    try:
        base.chmod(0o755)
        for pkg in ("vault", "worker"):
            shutil.copytree(ROOT / pkg, base / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        init = base / "worker" / "__init__.py"
        init.write_text("raise SystemExit('the worker package was imported')\n")
        control = subprocess.run(
            [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(base)!r}); "
             "import worker"], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "the worker package was imported" in control.stderr  # an import would run it
        site = [p for p in sys.path if p.endswith("site-packages")]
        dirs = check_worker_can_run(sys.executable, [str(base), *site], uid=0, gid=0, user="root")
        assert sorted(dirs) == sorted(str(base.joinpath(*p)) for p in WORKER_PACKAGES)
        check_worker_code(dirs)
        (base / "vault" / "core" / "package.py").chmod(0o666)
        with pytest.raises(ConfigError, match="package.py belongs to uid 0 .mode 0666"):
            check_worker_code(dirs)
        # any directory on the workers' import path (a venv's site-packages, a
        # .pth's addition) another user owns is refused as the package's own
        theirs = base / "theirs"
        theirs.mkdir(mode=0o755)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(ConfigError, match=f"the workers import from {theirs}"):
            check_worker_can_run(sys.executable, [str(base), str(theirs), *site], uid=0, gid=0,
                                 user="root")  # fmt: skip
    finally:
        shutil.rmtree(base)
