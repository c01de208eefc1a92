"""A real PostgreSQL server for tests: initdb in a private temp dir, started
on a free loopback port with its unix socket in a private directory, as an
unprivileged user (PostgreSQL refuses to run as root), and stopped after,
even when the test fails.

Debian's ``postgresql`` package provides the binaries (``.ci/run`` installs
it when ``initdb`` is absent).

Example::

    with postgres_server() as url:      # postgresql://vault@127.0.0.1:PORT/vault
        psycopg.connect(url)
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.prereq import require

__all__ = ["find_bindir", "postgres_server"]

RUN_AS = "nobody"


def find_bindir() -> str | None:
    """Directory holding initdb/pg_ctl/postgres, or None."""
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(cand, "initdb")):
            return cand
    found = shutil.which("initdb")
    return os.path.dirname(os.path.realpath(found)) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_user(cmd: list[str]) -> list[str]:
    pw = pwd.getpwnam(RUN_AS)
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", *cmd]


def _run(cmd: list[str], timeout: float = 120,
         wrap: Callable[[list[str]], list[str]] | None = None) -> None:  # fmt: skip
    full = _as_user(cmd)
    res = subprocess.run(
        wrap(full) if wrap else full, capture_output=True, text=True, timeout=timeout, cwd="/",
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[0])} failed: {res.stdout}{res.stderr}")


@contextlib.contextmanager
def postgres_server(
    *, port: int | None = None, wrap: Callable[[list[str]], list[str]] | None = None
) -> Iterator[str]:
    """``port``: listen there (default: a free one); ``wrap``: run the server's
    commands through it (e.g. into a test host's namespaces, tests/nshost.py)."""
    bindir = find_bindir()
    require(bindir is not None, "PostgreSQL server binaries (apt-get install postgresql)")
    assert bindir is not None
    require(os.geteuid() == 0 and shutil.which("setpriv") is not None,
            "root and setpriv, to run PostgreSQL as an unprivileged user")  # fmt: skip
    pw = pwd.getpwnam(RUN_AS)
    base = Path(tempfile.mkdtemp(prefix="vault-pg-"))
    data, sock = base / "data", base / "sock"
    started = False
    try:
        sock.mkdir(mode=0o700)
        for p in (base, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(base, 0o700)
        _run([f"{bindir}/initdb", "-D", str(data), "-U", "vault", "-A", "trust", "-E", "UTF8",
              "--locale=C", "--no-sync", "--no-instructions"])  # fmt: skip
        port = port or _free_port()
        opts = (f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections=50"
                " -c shared_buffers=16MB")  # fmt: skip
        _run([f"{bindir}/pg_ctl", "-D", str(data), "-o", opts, "-l", str(base / "server.log"),
              "-w", "-t", "60", "start"], wrap=wrap)  # fmt: skip
        started = True
        _run([f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "vault", "vault"],
             wrap=wrap)  # fmt: skip
        yield f"postgresql://vault@127.0.0.1:{port}/vault"
    finally:
        if started:
            try:
                _run([f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "-w", "-t", "30",
                      "stop"], wrap=wrap)  # fmt: skip
            except (RuntimeError, subprocess.TimeoutExpired):
                _kill_postmaster(data)
        shutil.rmtree(base, ignore_errors=True)


def _kill_postmaster(data: Path) -> None:
    try:
        pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass
