"""The one place that starts a worker process and reads its ready line.

Every launcher (the client's local worker, ``vault worker serve``, the demo,
the tests and the benchmarks) builds the worker's command line and
environment here, so the rules hold everywhere at once:

* the interpreter runs with ``-I`` (isolated: no ``PYTHON*`` variables, no
  script directory or user site on ``sys.path``) and ``-B`` (no bytecode
  written); the launcher writes the bytecode of the worker's modules where
  it is missing (:func:`write_worker_bytecode`), so a worker never compiles
  them;
* the environment is a fixed, minimal one (:func:`worker_env`): nothing of the
  caller's environment reaches the worker;
* the worker says it is ready (or why it is not) as one JSON line on a status
  pipe; :func:`read_ready_line` reads it, for the worker and for the key
  server alike (``{"ready": true, ...}`` or ``{"ready": false, "error": ...}``).

Example::

    status_r, status_w = os.pipe()
    proc = spawn_worker(["model.vault", "--endpoint", ep, "--status-fd", str(status_w)],
                        pass_fds=[status_w], cwd=private_dir)
    os.close(status_w)
    ready = read_ready_line(status_r, timeout=60, proc=proc)   # {"ready": True, "endpoint": ...}
"""

from __future__ import annotations

import json
import os
import select
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from .errors import ProtocolError, VaultError, WorkerCrashedError, WorkerTimeoutError, from_wire

__all__ = [
    "MAX_READY_LINE",
    "WORKER_PACKAGES",
    "WORKER_IMPORTS",
    "WorkerPipes",
    "blocked_for",
    "probe_install",
    "WORKER_ENV",
    "code_dir_problem",
    "trusted_groups",
    "read_ready_line",
    "secure_pycache",
    "spawn_worker",
    "worker_command",
    "worker_env",
    "write_worker_bytecode",
]

MAX_READY_LINE = 1 << 20

# The whole environment a worker gets. HOME points nowhere, so nothing the
# worker's libraries would write under it (onnxruntime's telemetry store) can
# be written.
WORKER_ENV: Mapping[str, str] = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/proc/self/vault-no-home",
    # No malloc tunables: the worker's memory is paged as plain onnxruntime's
    # is (the kernel's transparent-huge-page setting). Stop 33 removed
    # glibc.malloc.hugetlb=1, measured on a VM with free page reporting
    # (memory the guest frees goes back to the host, and a 2 MiB page drawn
    # from it is dear): the 500 MB first open took 1,911 ms with it against
    # 1,193 ms without, 100 MB 633 against 477 ms, 16 MB even (VAULT_STANDBY=0,
    # six alternating rounds each, docs/benchmarks.md "Stop 33").
}


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: :data:`WORKER_ENV`, plus ``extra`` (for a
    launcher that runs the worker from a copied source tree, ``PYTHONPATH`` is
    ignored under ``-I``: such launchers pass ``sys_path`` to
    :func:`worker_command` instead)."""
    env = dict(WORKER_ENV)
    if extra:
        env.update(extra)
    return env


def worker_command(
    args: Sequence[str],
    *,
    python: str | None = None,
    prefix: Sequence[str] = (),
    sys_path: Sequence[str] = (),
) -> list[str]:
    """``[*prefix, python, -I, -B, -m, worker, *args]``.

    ``prefix`` wraps the interpreter (``setpriv --reuid ...`` to drop to
    another user); ``sys_path`` names directories the worker imports from when
    the install is not on the interpreter's own path (a world-readable copy of
    the source, for a worker run as another user): they are put on
    ``sys.path`` by a ``-c`` bootstrap, since ``-I`` ignores ``PYTHONPATH``.
    """
    py = python or sys.executable
    if not sys_path:
        return [*prefix, py, "-I", "-B", "-m", "worker", *args]
    boot = (
        "import sys, runpy; sys.path[:0] = sys.argv[1].split(':'); del sys.argv[1]; "
        "sys.argv[0] = 'worker'; runpy.run_module('worker', run_name='__main__', alter_sys=True)"
    )
    return [*prefix, py, "-I", "-B", "-c", boot, ":".join(sys_path), *args]


def blocked_for(path: str, uid: int, gid: int, *, read: bool) -> str | None:
    """Why user ``uid`` (primary group ``gid``, no other groups: a worker's)
    cannot reach ``path``, or None: the first directory on the way it may not
    search, or ``path`` itself it may not execute (``read``: a directory it
    may not list). By the mode bits (root's ACLs are not looked at)."""

    def allowed(st: os.stat_result, bits: int) -> bool:
        shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
        return (st.st_mode >> shift) & bits == bits

    parts = os.path.abspath(path).split(os.sep)
    for i in range(1, len(parts) + 1):
        node = os.sep.join(parts[:i]) or os.sep
        try:
            st = os.stat(node)
        except OSError as exc:
            return f"{node}: {exc.strerror}"
        last = i == len(parts)
        need, what = (5, "list") if last and read else (1, "search")
        if last and not stat.S_ISDIR(st.st_mode):
            need, what = (4, "read") if read else (1, "execute")
        if not allowed(st, need):
            return (
                f"it may not {what} {node} (mode {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid})"
            )
    return None


# what a worker imports, found (never imported) by probe_install
WORKER_IMPORTS = ("vault", "worker", "numpy", "onnxruntime", "zmq", "cryptography", "msgpack")

# Finds, never imports, this project's packages: nothing of theirs runs before
# the daemon's check_worker_code has looked at their directories and bytecode
# caches (an import here ran a cache's planted bytecode as the workers' uid).
_PROBE = (
    "import sys, json, importlib.util as u; sys.path[:0] = [p for p in sys.argv[1].split(':') "
    f"if p]; missing = [m for m in {WORKER_IMPORTS!r} if u.find_spec(m) is None]; "
    "sys.exit('cannot import ' + ', '.join(missing)) if missing else None; "
    "print(json.dumps({**{m: list(u.find_spec(m).submodule_search_locations or []) "
    "for m in ('vault', 'worker')}, 'path': sys.path}))"
)


def probe_install(
    python: str, sys_path: Sequence[str], *, uid: int, gid: int
) -> tuple[dict[str, Any] | None, str]:
    """Run ``python`` as user ``uid`` (primary group ``gid``, no other
    groups, the workers' environment), as a worker of that user is run, and
    find (never import) what a worker imports, ``sys_path`` first: where it
    found this project's packages and its ``sys.path`` (``(where, "")``), or
    why it could not (``(None, why)``: the interpreter's last error line, and
    the first directory on the way that user may not search)."""
    as_other = os.geteuid() == 0 and uid != os.geteuid()
    try:
        done = subprocess.run(
            [python, "-I", "-B", "-c", _PROBE, ":".join(sys_path)],
            user=uid if as_other else None, group=gid if as_other else None,
            extra_groups=[] if as_other else None, env=worker_env(), cwd="/",
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )  # fmt: skip
        why = "" if done.returncode == 0 else (
            done.stderr.decode(errors="replace").strip().splitlines() or ["exit status"]
        )[-1][:300]  # fmt: skip
    except subprocess.TimeoutExpired:
        why = "it did not finish within 60 s"
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
    if not why:
        try:
            where = json.loads(done.stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            where = None
        if isinstance(where, dict):
            return where, ""
        why = "the interpreter's answer was not understood"
    if as_other:
        for path, read in ((python, False), (os.path.realpath(python), False),
                           *((p, True) for p in sys_path)):  # fmt: skip
            blocked = blocked_for(path, uid, gid, read=read)
            if blocked:
                return None, f"{why}; {blocked}"
    return None, why


def spawn_worker(
    args: Sequence[str],
    *,
    pass_fds: Sequence[int] = (),
    cwd: str | None = None,
    python: str | None = None,
    prefix: Sequence[str] = (),
    sys_path: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    stderr: int | IO[Any] | None = subprocess.DEVNULL,
    new_session: bool = True,
    uid: int | None = None,
    gid: int | None = None,
    umask: int = -1,
) -> subprocess.Popen[bytes]:
    """Start ``python -I -B -m worker ARGS`` with the minimal environment.

    ``uid``/``gid`` (a launcher running as root: the local daemon) make the
    worker that user *from its first instruction*: the uid changes in the
    child before ``exec``, so no process of the caller's uid ever exists that
    a caller could ptrace, however early it tries. Supplementary groups are
    cleared with them.

    ``stderr`` is discarded by default (onnxruntime prints a telemetry warning
    at import); ``VAULT_DEBUG_WORKER=1`` in the launcher's environment keeps it.
    ``new_session``: a Ctrl-C meant for the launcher is not the worker's to
    handle (a service that forwards signals itself passes ``False``).
    """
    if os.environ.get("VAULT_DEBUG_WORKER") == "1":
        stderr = None
    if python is None or os.path.realpath(python) == os.path.realpath(sys.executable):
        write_worker_bytecode(sys_path)
    return subprocess.Popen(
        worker_command(args, python=python, prefix=prefix, sys_path=sys_path),
        pass_fds=list(pass_fds),
        env=worker_env(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=new_session,
        user=uid,
        group=gid,
        extra_groups=[] if uid is not None else None,
        umask=umask,
    )


_BYTECODE_DONE: set[tuple[str, ...]] = set()
_BYTECODE_LOCK = threading.Lock()
# what a worker imports of this project (its modules, not the service's or the CLI's)
WORKER_PACKAGES = (("vault",), ("vault", "core"), ("worker",))
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def trusted_groups() -> set[int]:
    """Groups whose write access to a code directory is root's own: root's,
    and Debian's ``staff`` (``/usr/local/lib/python3.X/dist-packages`` is
    root:staff 2775 there; its members may already put programs first on
    every user's PATH, /usr/local/bin)."""
    import grp

    groups = {0}
    try:
        groups.add(grp.getgrnam("staff").gr_gid)
    except KeyError:
        pass
    return groups


def code_dir_problem(
    path: str, owners: set[int] | frozenset[int], *, groups: set[int] | frozenset[int] | None = None
) -> str | None:
    """Why another user could change the code a process loads from the
    directory ``path``, or None: ``path`` and every directory above it must
    belong to one of ``owners`` and be writable by nobody else (a directory
    above it may be if sticky, as ``/tmp``: others may add names there but not
    move ``path`` aside), or writable by its group when that group is one of
    ``groups`` (by default :func:`trusted_groups`; nobody else). The path as
    given and its resolved form are both walked; a link's own mode means
    nothing, its owner does."""
    if groups is None:
        groups = trusted_groups()
    for start in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        node = start
        while True:
            try:
                st = os.lstat(node)
            except OSError as exc:
                return f"{node}: {exc.strerror}"
            if st.st_uid not in owners:
                return f"{node} belongs to uid {st.st_uid}"
            writable = st.st_mode & (_OTHERS_WRITE if st.st_gid not in groups else stat.S_IWOTH)
            if not stat.S_ISLNK(st.st_mode) and writable:
                if node == start or not st.st_mode & stat.S_ISVTX:
                    return f"{node} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
            parent = os.path.dirname(node)
            if parent == node:
                break
            node = parent
    return None


def secure_pycache(package_dir: str, owners: set[int] | frozenset[int]) -> str | None:
    """Make ``package_dir/__pycache__`` hold only bytecode nobody outside
    ``owners`` could have put there or could change, or say why it cannot
    (None: it is so, or there is none). Bytecode is code: a worker loads it
    without looking at the source when it is written as an unchecked hash, so
    a cache others can write lets them run code in every worker. A Python
    under umask 0 makes its caches world-writable (0777) as it imports, before
    any of our code runs; so a cache of this process's own is repaired here:
    mode 0755 first (nobody else can add a name from then on), then emptied
    (a file of ours there may have been renamed over another: nothing in it
    is trusted). In a cache others could not write, every entry that is not
    a regular file of an owner's, writable by it alone, with one link, is
    removed. ``package_dir`` itself must already pass
    :func:`code_dir_problem` (nobody else can swap the cache as a whole)."""
    cache = os.path.join(package_dir, "__pycache__")
    try:
        st = os.lstat(cache)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{cache}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{cache} is not a directory"
    if st.st_uid not in owners:
        return f"{cache} belongs to uid {st.st_uid}"
    ours = st.st_uid == os.geteuid()
    opened = bool(st.st_mode & _OTHERS_WRITE)
    try:
        if opened:
            if not ours:
                return f"{cache} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
            os.chmod(cache, 0o755)
        with os.scandir(cache) as entries:
            for e in entries:
                es = e.stat(follow_symlinks=False)
                # a cache others could write: nothing in it is trusted (a file of
                # ours may have been renamed over another), it is rebuilt
                if not opened and (stat.S_ISREG(es.st_mode) and es.st_uid in owners
                                   and not es.st_mode & _OTHERS_WRITE
                                   and es.st_nlink == 1):  # fmt: skip
                    continue
                if not ours:
                    return f"{e.path}: bytecode another user could have written"
                if stat.S_ISDIR(es.st_mode):
                    shutil.rmtree(e.path)
                else:
                    os.unlink(e.path)
    except OSError as exc:
        return f"{cache}: {exc.strerror}"
    return None


def write_worker_bytecode(sys_path: Sequence[str] = (), *, force: bool = False) -> None:
    """Write the bytecode of the modules a worker imports where it is missing
    or older than its source, at this process's first spawn from an import
    root, as ``pip install`` does for a wheel. A worker runs with ``-B`` and
    under Landlock (no file writes), so from an install without bytecode (an
    editable one: the README's) every worker start compiled them from source:
    114-166 ms for this project's modules against 63-70 ms with bytecode,
    measured here. Honours ``sys.dont_write_bytecode``
    (``PYTHONDONTWRITEBYTECODE``, ``-B``). Writes only into a package
    directory this process's user owns and nobody else may write, into a
    ``__pycache__`` it owns with mode 0755 whatever the umask: bytecode is
    code the workers run, so a directory others could write would let them
    swap it (a root daemon under umask 0 once left them world-writable); a
    cache of its own others could write is repaired first
    (:func:`secure_pycache`). An install it may not write (a system one,
    which has its bytecode from pip, or a user's checkout seen by root) is
    left as it is, silently. ``force``: even under ``sys.dont_write_bytecode``
    (the benchmarks: they time a worker's start as an installed package has
    it, whatever the machine sets)."""
    roots = tuple(sys_path)
    if (sys.dont_write_bytecode and not force) or sys.pycache_prefix:
        return
    if roots in _BYTECODE_DONE:
        return
    with _BYTECODE_LOCK:  # held only to claim the root: a fork never inherits it held long
        if roots in _BYTECODE_DONE:
            return
        _BYTECODE_DONE.add(roots)
    _compile_worker_modules(roots)


def _private_dir(path: str, euid: int) -> bool:
    """Whether ``path`` is a directory of ``euid`` that nobody else may write."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == euid and not st.st_mode & 0o022


def _compile_worker_modules(roots: tuple[str, ...]) -> None:
    import compileall
    import importlib.util

    dirs: list[str] = []
    for parts in WORKER_PACKAGES:
        if roots:
            dirs += [os.path.join(r, *parts) for r in roots]
            continue
        try:
            spec = importlib.util.find_spec(".".join(parts))
        except (ImportError, ValueError):
            continue
        dirs += list(spec.submodule_search_locations or []) if spec else []
    euid = os.geteuid()
    for d in dirs:
        if not _private_dir(d, euid):
            continue
        cache = os.path.join(d, "__pycache__")
        try:
            os.mkdir(cache, 0o755)
            os.chmod(cache, 0o755)  # the umask's bits off, and readable by the workers' user
        except FileExistsError:
            pass
        except OSError:
            continue
        if secure_pycache(d, {0, euid}) is not None:  # repairs a cache of ours others could write
            continue
        try:  # compiles only what is missing or older than its source
            compileall.compile_dir(d, maxlevels=0, quiet=2, workers=1, optimize=0)
        except OSError:
            pass


class WorkerPipes:
    """The inherited pipes of one worker launch, in one place: the status pipe
    its ready line comes back on, the lifeline (EOF: the launcher is gone, the
    worker stops), and secrets (licence, keys, proofs) that travel on pipes and
    never in argv, the environment or a file.

    Usage: build, add ``secret(flag, data)`` for each, spawn with
    ``args=[..., *pipes.args]`` and ``pass_fds=[..., *pipes.pass_fds]``, then
    ``spawned()`` (closes the child's ends, writes and closes the secrets) or,
    if the spawn failed, ``failed()`` (closes everything).
    """

    def __init__(self, *, lifeline: bool = True) -> None:
        self.status_r, status_w = os.pipe()
        self._child = [status_w]
        self.args = ["--status-fd", str(status_w)]
        self.lifeline_w: int | None = None
        if lifeline:
            life_r, self.lifeline_w = os.pipe()
            self._child.append(life_r)
            self.args += ["--lifeline-fd", str(life_r)]
        self._secrets: list[tuple[int, bytes]] = []

    def secret(self, flag: str, data: bytes | bytearray) -> None:
        r, w = os.pipe()
        self._child.append(r)
        self.args += [flag, str(r)]
        self._secrets.append((w, bytes(data)))

    @property
    def pass_fds(self) -> list[int]:
        return list(self._child)

    def _close_child_ends(self) -> None:
        for fd in self._child:
            os.close(fd)
        self._child = []

    def spawned(self) -> None:
        """The child holds its ends now: close ours, then hand over the secrets
        (each small: it fits the pipe buffer)."""
        self._close_child_ends()
        secrets, self._secrets = self._secrets, []
        for fd, data in secrets:
            try:
                os.write(fd, data)
            finally:
                os.close(fd)

    def failed(self) -> None:
        """The spawn failed: close every fd of this launch."""
        self._close_child_ends()
        for fd, _ in self._secrets:
            os.close(fd)
        self._secrets = []
        self.close_status()
        if self.lifeline_w is not None:
            os.close(self.lifeline_w)
            self.lifeline_w = None

    def close_status(self) -> None:
        if self.status_r >= 0:
            os.close(self.status_r)
            self.status_r = -1


def _parse(line: bytes, what: str) -> dict[str, Any]:
    try:
        msg = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"{what} sent a malformed ready line") from exc
    if not isinstance(msg, dict):
        raise ProtocolError(f"{what} sent a malformed ready line")
    if not msg.get("ready"):
        err = msg.get("error")
        failure = from_wire(err) if err is not None else None
        if isinstance(failure, VaultError):
            raise failure
        raise WorkerCrashedError(f"{what} failed to start")
    return msg


def _readable(fd: int, seconds: float) -> bool:
    """Whether ``fd`` has something to read within ``seconds``: poll(2), not
    select(2), which refuses descriptors past 1,023 (a service that holds
    many connections, its open-file limit lifted, starts workers whose pipes
    are numbered past it)."""
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(p.poll(max(0, int(seconds * 1000))))


def read_ready_line(
    source: int | IO[bytes],
    *,
    timeout: float,
    proc: subprocess.Popen[Any] | None = None,
    what: str = "worker",
) -> dict[str, Any]:
    """Read one JSON status line from a pipe fd or a binary stream.

    Returns the message when it says ``"ready": true``; raises the typed error
    it carries when it says ``"ready": false``; :class:`WorkerCrashedError` if
    the process exits (or the pipe closes) first; :class:`WorkerTimeoutError`
    after ``timeout`` seconds. Bytes after the line are left unread only for a
    stream; for an fd they are dropped (the status pipe carries one line).
    """
    fd = source if isinstance(source, int) else source.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise WorkerTimeoutError(f"{what} not ready after {timeout:g}s")
        if _readable(fd, min(left, 0.2)):
            chunk = os.read(fd, 65536) if isinstance(source, int) else source.readline()
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_READY_LINE:
                raise ProtocolError(f"{what} sent an oversized ready line")
        elif proc is not None and proc.poll() is not None and not _readable(fd, 0):
            break
    if b"\n" not in buf:
        rc = None
        if proc is not None:
            try:
                rc = proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                rc = None
        raise WorkerCrashedError(f"{what} exited during startup (status {rc})")
    return _parse(buf.split(b"\n", 1)[0], what)
