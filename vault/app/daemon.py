"""``vault daemon``: the local runtime of tier 1.

It runs as root (or as a dedicated service user), holds the device key that
callers cannot read, and listens on a local Unix socket
(``/run/vault/daemon.sock`` by default). Each caller is identified by
``SO_PEERCRED``. For each ``open`` it spawns a hardened worker:

- under the dedicated worker uid *from its first instruction* (the uid is set
  in the child before ``exec``), so a caller cannot ptrace it or read its
  memory at any moment, start-up included;
- from the daemon's own interpreter and install (checked at start: owned by
  root or the daemon's user, writable by nobody else), with ``-I`` and the
  fixed minimal environment: nothing of the caller's environment, venv,
  ``.pth`` files or ``PYTHONPATH`` reaches it;
- with hardening fixed by the daemon (a caller's request that names any other
  option is refused);
- from the package descriptor the caller passed (``SCM_RIGHTS``): the daemon
  never opens a path for a caller;
- releasing the key as the enrolled device, with the caller's licence proof,
  from the key server the device was enrolled with (never one a caller's
  licence names: such a licence is refused before any worker);
- listening on ``ipc://`` with CURVE, accepting only the client key of the
  connection that opened it (the key the caller's proof binds), in a
  directory only the workers' uid may enter (0700): its caller connects
  through an ``O_PATH`` descriptor of the socket sent with the ``open`` reply
  (``ipc:///proc/self/fd/N``), and no other user can connect at all (the
  socket's name is in every worker's command line; a flood of connections
  once killed a worker at its descriptor limit).

**Nothing runs before a licence is shown.** Before a worker is started or a
pre-started one assigned, the daemon reads the package's header from the
caller's descriptor (bounded reads: every size it claims checked against the
file, a sparse file refused) and asks its key server, as the device, whether
the caller's licence and proof would get this package's key now
(``authorize``: the licence genuine, in force, for this model, this device
and this caller's CURVE key, with quota and rate left; nothing released,
nothing debited, audited). A stranger with a forged licence or proof gets the
key server's typed refusal and costs no worker process; while it awaits the
answer it holds no place among the starts in all (only one of its own uid's
opens in progress), and once the key server has refused a uid
``--refusal-burst`` times (then one more each ``--refusal-interval``) the
daemon refuses that uid itself, reading nothing and asking nothing (a
stranger cannot grow the key server's audit, made as the device, or the
daemon's log). Workers are capped
live and starting, per uid and in all (``--max-workers``,
``--max-workers-per-uid``, ``--max-starting``, ``--max-starting-per-uid``:
:class:`~vault.core.errors.CapacityError`); each runs under a memory limit
(``RLIMIT_DATA``) sized from the package's declared plaintext
(:func:`vault.core.package.memory_limit`; the worker sets the daemon's value
first thing, before it reads the package), and one that is not ready within
``--start-timeout`` is killed.

The socket's directory and every directory above it must be writable by no
one but root or the daemon's own user (a sticky directory such as ``/tmp``
may sit above one the daemon owns), and the directory is the daemon's own:
otherwise another user could move the socket aside and listen in its place.

A worker lives as long as the connection that opened it (or until ``close``).
Connections are capped per uid (``--max-connections-per-uid``, 64, of which
``--max-idle-connections-per-uid``, 8, may hold no worker) and in all
(``--max-connections``, 512): each holds a descriptor and a thread, and a
flood past them gets a typed refusal rather than running the daemon out of
descriptors; an ``accept`` that fails for want of them backs off and goes on.

Pre-started workers (``--standby N``, default 1): the daemon keeps N workers
already spawned under the worker uid, hardened and with onnxruntime imported,
each waiting on its own socket pair for an assignment (the package and shm
descriptors, the licence and proof on pipes, the caller's client key). An
``open`` on the CPU takes one, so it costs verify, key release, decrypt and
the session build only; a new one is started behind it. A standby worker
belongs to no caller until assigned, serves exactly one, and is never reused.
An open that asks for CUDA (whose hardening reads driver files) spawns cold.

Example::

    $ vault device init /var/lib/vault/device
    $ vault device enroll /var/lib/vault/device --licence admin.licence
    $ vault daemon --device /var/lib/vault/device --worker-user vault-worker
    {"ready": true, "socket": "/run/vault/daemon.sock", "tier": 1, ...}
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from ..core import launch
from ..core.daemonwire import DEFAULT_SOCKET, peer_credentials, recv_message, send_message
from ..core.device import Device
from ..core.errors import (
    CapacityError,
    ConfigError,
    FormatError,
    KeyServerUnavailableError,
    PermissionDeniedError,
    ProtocolError,
    RateLimitedError,
    VaultError,
    WorkerCrashedError,
    WorkerTimeoutError,
    WrongKeyServerError,
)
from ..core.launch import blocked_for
from ..core.licence import Licence, LicenceProof
from ..core.logs import Log, reason
from ..core.package import Header, memory_limit, read_header
from ..core.process import stop_process

__all__ = [
    "DaemonConfig",
    "blocked_for",
    "check_install",
    "check_private_dir",
    "check_worker_can_run",
    "run_daemon",
]

TIER = 1
DEFAULT_DEVICE_DIR = "/var/lib/vault/device"
DEFAULT_WORKER_USER = "vault-worker"
_OPEN_FIELDS = {"op", "licence", "proof", "client_key", "package_digest", "shm_size", "listen_token",
                "providers", "device", "prepack"}  # fmt: skip
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_PROVIDERS = {"CPUExecutionProvider", "CUDAExecutionProvider"}
_DEVICE_RE = re.compile(r"cpu|cuda(:\d{1,2})?")
_MAX_SHM = 1 << 34
# a licence's public part and a proof are a few hundred bytes; the caps keep
# each well inside one pipe buffer (64 KiB), which a pre-started worker's
# assignment fills before the worker holds the other end
_MAX_LICENCE, _MAX_PROOF = 32 << 10, 8 << 10


@dataclass
class DaemonConfig:
    socket_path: str = DEFAULT_SOCKET
    device_dir: str = DEFAULT_DEVICE_DIR
    worker_uid: int = 0
    worker_gid: int = 0
    python: str = sys.executable
    sys_path: tuple[str, ...] = ()
    runtime_dir: str = ""
    start_timeout: float = 60.0
    worker_user: str = ""
    standby: int = 1  # workers kept pre-started; 0: every open spawns
    max_connections: int = 512  # in all (each holds a descriptor and a thread)
    max_connections_per_uid: int = 64
    # of those, connections holding no worker (a stranger's: it can open
    # none): the connections in all take many uids to fill, not a few
    max_idle_connections_per_uid: int = 8
    # workers of callers, live or starting (pre-started ones are the daemon's own)
    max_workers: int = 64  # in all
    max_workers_per_uid: int = 8
    max_starting: int = 8  # authorised and starting at once, in all (release, decrypt, sessions)
    # opens of one uid in progress at once: waiting for the key server's
    # answer or starting (an open the key server has not answered for holds
    # no place among the starts in all: a stranger cannot take others' places)
    max_starting_per_uid: int = 2
    # opens of one uid the key server may refuse: a burst, then one more each
    # interval; past it, refused here without asking the key server (a
    # stranger cannot spend the device's standing with the key server, nor
    # grow its audit and the daemon's log without bound)
    refusal_burst: int = 10
    refusal_interval: float = 6.0
    worker_memory_headroom: int | None = None  # None: vault.core.package's default
    keyserver_timeout: float = 10.0  # the pre-authorisation round trip
    # who owns which subordinate uids (a user runs processes as those through
    # newuidmap): every per-uid cap counts them as their owner's
    subuid_file: str = "/etc/subuid"


def _subid_from_nss(path: str = "/etc/nsswitch.conf") -> bool:
    """Whether nsswitch names a ``subid:`` source (newuidmap then ignores
    /etc/subuid)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return any(line.split("#", 1)[0].strip().startswith("subid:") for line in fh)
    except OSError:
        return False


def _c_ulong(text: str) -> int | None:
    """A number as shadow reads /etc/subuid's fields (``strtoul`` in base 0:
    leading blanks, decimal, ``0x`` hex, ``0`` octal; all of the field, and
    no sign), or None: the daemon must see the ranges ``newuidmap`` grants."""
    t = text.lstrip(" \t\n\v\f\r")
    if t.startswith("+"):
        t = t[1:]
    if not t or not t.isascii():
        return None
    try:
        if t[:2].lower() == "0x":
            return int(t[2:], 16) if t[2:] and all(c in string.hexdigits for c in t[2:]) else None
        if not t.isdigit():
            return None
        return int(t, 8) if t.startswith("0") else int(t)
    except ValueError:  # an octal field with an 8 or a 9
        return None


class SubordinateUids:
    """The subordinate uid ranges of ``/etc/subuid`` (``owner:start:count``, the
    owner a name or a uid), read as shadow's ``newuidmap`` reads them, again
    whenever the file changes.

    Why: every per-uid cap keys on the caller's uid (``SO_PEERCRED``), and a
    user with a subordinate range (what ``useradd`` gives every new user on
    Debian and Ubuntu: 65,536 uids, for rootless containers) can run
    processes as any of them with ``newuidmap``: one user as 64 uids held
    every connection and every worker (the attack round). :meth:`owner`
    names the user a uid counts as. A range whose owner is unknown counts as
    a user of its own (its start). Ranges of two owners that overlap (a
    misconfiguration ``useradd`` never makes: either owner may use the
    overlap) count the overlap as the owner of the range that starts first,
    and are said in :attr:`problems` for the log."""

    _LIMIT = 4 << 20  # a larger file is not read (the daemon says so)
    _LINE = 1023  # shadow's line buffer: a longer line is no range to newuidmap

    def __init__(self, path: str) -> None:
        self.path = path
        self._key: tuple[int, int, int, int] | None = None
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, int]] = []  # (start, end, owner), by start
        self.problems: list[str] = []  # what the last read found wrong, for the log
        self.error: str | None = None  # why the file could not be read, if it could not

    def owner(self, uid: int) -> int:
        """The uid ``uid`` counts as: its range's owner, or itself."""
        found = self._find(uid)
        return uid if found is None else found[2]

    def in_range(self, uid: int) -> bool:
        """Whether ``uid`` lies in any range (whoever owns it, known or not)."""
        return self._find(uid) is not None

    def _find(self, uid: int) -> tuple[int, int, int] | None:
        """The range holding ``uid``, as last read (:meth:`reload` reads)."""
        i = bisect.bisect_right(self._starts, uid) - 1
        if i >= 0 and uid < self._ranges[i][1]:
            return self._ranges[i]
        return None

    def reload(self) -> bool:
        """Read the file again if it changed; True when it was read now. A
        file that cannot be read keeps what was read before (``error`` says
        why); one that does not exist holds no ranges."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            changed = self._key is not None or self._ranges
            self._key, self._starts, self._ranges, self.error = None, [], [], None
            return bool(changed)
        except OSError as exc:
            self.error = f"{self.path}: {exc.strerror}"
            return False
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key == self._key:
            return False
        try:
            if st.st_size > self._LIMIT:
                raise OSError(0, f"larger than {self._LIMIT >> 20} MiB")
            with open(self.path, "rb") as fh:
                text = fh.read(self._LIMIT + 1).decode("utf-8", "replace")
        except OSError as exc:
            self.error = f"{self.path}: {exc.strerror}"
            return False
        self.error = None
        ranges: list[tuple[int, int, int]] = []
        for line in text.split("\n"):  # shadow splits on newlines only
            if len(line) >= self._LINE:
                continue
            parts = line.split(":")
            if len(parts) < 3:  # shadow reads three fields and ignores any after them
                continue
            start, count = _c_ulong(parts[1]), _c_ulong(parts[2])
            if start is None or count is None or count <= 0:
                continue
            who = parts[0]
            if who.isascii() and who.isdigit():
                owner = int(who)
            else:
                try:
                    owner = pwd.getpwnam(who).pw_uid
                except (KeyError, ValueError):  # unknown, or not a name (a NUL in it)
                    owner = start
            ranges.append((start, start + count, owner))
        ranges.sort()
        merged: list[tuple[int, int, int]] = []
        problems: list[str] = []
        for start, end, owner in ranges:
            if merged and start < merged[-1][1]:
                if owner != merged[-1][2]:
                    problems.append(
                        f"uids {start}-{min(end, merged[-1][1]) - 1} are in ranges of uid "
                        f"{merged[-1][2]} and uid {owner}: both may use them, and the daemon "
                        f"counts them as uid {merged[-1][2]}'s"
                    )
                start = merged[-1][1]
                if start >= end:
                    continue
            merged.append((start, end, owner))
        self._key, self._ranges, self.problems = key, merged, problems
        self._starts = [r[0] for r in merged]
        return True


def check_install(python: str, sys_path: Sequence[str] = ()) -> None:
    """The worker's interpreter and code must be owned by root or by the
    daemon's user and writable by nobody else, and so must every directory
    above them (unless sticky): otherwise whoever can write them runs code
    inside every worker. Checked here: the interpreter (the file it resolves
    to, the directory it is named in, a venv's ``pyvenv.cfg``) and each
    ``--worker-path``; the package directories the workers import from, and
    their bytecode caches, by :func:`check_worker_code` once the interpreter
    has said where they are."""
    owners = {0, os.geteuid()}
    real = os.path.realpath(python)
    checks = [(real, os.path.dirname(real)), (python, os.path.dirname(os.path.abspath(python)))]
    cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(python))), "pyvenv.cfg")
    if os.path.lexists(cfg):  # a venv's: it names the interpreter's home (its standard library)
        checks.append((cfg, os.path.dirname(cfg)))
    checks += [(p, p) for p in sys_path]
    for path, directory in checks:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ConfigError(f"{path}: worker install not found ({exc.strerror})") from None
        why = None
        if st.st_uid not in owners or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            why = f"{path} belongs to uid {st.st_uid} (mode {stat.S_IMODE(st.st_mode):04o})"
        why = why or launch.code_dir_problem(directory, owners)
        if why:
            raise ConfigError(
                f"{path}: the worker's install must be owned by root (or the daemon's user) "
                f"and writable by no one else, as must every directory above it ({why})"
            )


def _module_problem(package_dir: str, owners: set[int]) -> str | None:
    """A module file in ``package_dir`` another user owns or may write (or a
    link: its target could be anything), or None."""
    try:
        with os.scandir(package_dir) as entries:
            for e in entries:
                if not e.name.endswith((".py", ".so", ".pyd", ".pth")):
                    continue
                st = e.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    return f"{e.path} is a link"
                if st.st_uid not in owners or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                    return (f"{e.path} belongs to uid {st.st_uid} "
                            f"(mode {stat.S_IMODE(st.st_mode):04o})")  # fmt: skip
    except OSError as exc:
        return f"{package_dir}: {exc.strerror}"
    return None


def check_worker_code(package_dirs: Sequence[str]) -> None:
    """The directories the workers import this project's packages from (as
    their interpreter resolved them, :func:`check_worker_can_run`): each, and
    every directory above it, owned by root or the daemon's user and writable
    by nobody else; and each bytecode cache in them holding only what those
    could have written. A cache of the daemon's own that others could write
    (a daemon started under umask 0 makes its imports' caches 0777) is
    repaired (:func:`vault.core.launch.secure_pycache`); any other is a
    :class:`ConfigError` naming it."""
    owners = {0, os.geteuid()}
    for d in dict.fromkeys(package_dirs):
        why = (launch.code_dir_problem(d, owners) or _module_problem(d, owners)
               or launch.secure_pycache(d, owners))  # fmt: skip
        if why:
            raise ConfigError(
                f"the workers' code could be changed by another user ({why}): the install "
                "must be owned by root (or the daemon's user) and writable by no one else, "
                "its __pycache__ directories included (deploy/README.md, step 1)"
            )


def check_worker_can_run(
    python: str, sys_path: Sequence[str], *, uid: int, gid: int, user: str
) -> list[str]:
    """The workers' user must be able to run the interpreter and import the
    install (:class:`ConfigError` naming what it cannot reach otherwise). A
    venv made from an interpreter under a private home (``/root/.pyenv``,
    conda in ``/root``) passes :func:`check_install` but no worker of another
    uid could ever start from it: the daemon would say ready and fail every
    open. Checked by running the interpreter as that user, as a worker is run.
    Returns the directories the workers import this project's packages from
    (``vault``, ``vault/core``, ``worker``), as that interpreter found them."""
    where, why = launch.probe_install(python, sys_path, uid=uid, gid=gid)
    if where is not None:
        try:
            dirs = [os.path.join(d, *parts[1:]) for parts in launch.WORKER_PACKAGES
                    for d in where[parts[0]]]  # fmt: skip
            imports = [p for p in where["path"] if isinstance(p, str) and p]
        except (KeyError, TypeError):
            raise ConfigError(
                f"{python}: could not tell where the workers' packages are "
                "(the interpreter's answer was not understood)"
            ) from None
        # every directory the workers import from (the standard library, the
        # site-packages with numpy and onnxruntime, .pth files' additions):
        # none another user may change, down to the directory itself
        owners = {0, os.geteuid()}
        for p in imports:
            if os.path.isdir(p):
                problem = launch.code_dir_problem(p, owners)
                if problem:
                    raise ConfigError(
                        f"the workers import from {p}, which another user could change "
                        f"({problem}): the install must be owned by root (or the daemon's "
                        "user) and writable by no one else (deploy/README.md, step 1)"
                    )
        return [d for d in dirs if os.path.isdir(d)]
    raise ConfigError(
        f"the workers' user {user!r} cannot run {python} with this install ({why}): the "
        "interpreter, its standard library and the install must be readable by that user "
        "(a venv made from an interpreter under a private home, such as /root/.pyenv, is not); "
        "make the venv from the system's (/usr/bin/python3 -m venv, deploy/README.md) or "
        f"pass --python and --worker-path{_suggestion(python, sys_path)}"
    )


def _suggestion(python: str, sys_path: Sequence[str]) -> str:
    """Where this daemon's own interpreter finds what the workers import: the
    ``--worker-path`` directories a newcomer had to work out from the source
    (and the system's interpreter, where the one given is not it)."""
    import importlib.util

    roots: list[str] = []
    for name in launch.WORKER_IMPORTS:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for loc in (spec.submodule_search_locations or []) if spec else []:
            root = os.path.dirname(os.path.abspath(loc))
            if root not in roots and root not in sys_path:
                roots.append(root)
    if not roots:
        return ""
    flags = " ".join(f"--worker-path {r}" for r in roots)
    system = "/usr/bin/python3"
    py = f"--python {system} " if os.path.exists(system) and python != system else ""
    return (f" (where this daemon's own Python finds them: {py}{flags}; each must be "
            "readable by the workers' user and writable only by root)")  # fmt: skip


def check_private_dir(directory: str, *, what: str = "socket directory") -> None:
    """``directory`` must be the daemon's own (owned by its effective uid) and
    writable by no one else, and every directory above it owned by root or
    the daemon's user and writable by no one else, unless sticky (``/tmp``:
    another user may add names there but not move or remove the daemon's).
    Both the path as given and its resolved form are checked. Otherwise
    another user could move the daemon's socket aside and listen in its
    place, relaying callers' opens (:class:`ConfigError`, naming the path)."""
    me = os.geteuid()
    start = os.path.abspath(directory)
    for path in dict.fromkeys((start, os.path.realpath(start))):
        node = path
        while True:
            try:
                st = os.lstat(node)
            except OSError as exc:
                raise ConfigError(f"{node}: cannot check the {what} ({exc.strerror})") from None
            link = stat.S_ISLNK(st.st_mode)  # its mode means nothing: its owner and parent do
            writable = not link and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            if node == path and not link:
                if not stat.S_ISDIR(st.st_mode):
                    raise ConfigError(f"{node}: the {what} is not a directory")
                if st.st_uid != me:
                    raise ConfigError(
                        f"{node}: the {what} belongs to uid {st.st_uid}; the daemon (uid {me}) "
                        "uses only a directory of its own (another user could replace the "
                        "socket in it)"
                    )
                if writable:
                    raise ConfigError(
                        f"{node}: the {what} is writable by group or others "
                        f"(mode {stat.S_IMODE(st.st_mode):04o}): another user could move the "
                        "socket aside and listen in its place; use a directory only root or "
                        "the daemon's user can write (e.g. /run/vault)"
                    )
            else:
                if st.st_uid not in (0, me):
                    raise ConfigError(
                        f"{node}: above the {what}, owned by uid {st.st_uid} (neither root nor "
                        "the daemon's user): its owner could replace the directories below it"
                    )
                if writable and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
                    raise ConfigError(
                        f"{node}: above the {what}, writable by group or others and not sticky "
                        f"(mode {stat.S_IMODE(st.st_mode):04o}): another user could rename the "
                        "directories below it and put their own socket in place"
                    )
            parent = os.path.dirname(node)
            if parent == node:
                break
            node = parent


@dataclass
class _Worker:
    wid: str
    proc: subprocess.Popen[bytes]
    lifeline: int
    directory: str

    def stop(self) -> None:
        try:
            os.close(self.lifeline)  # EOF: the worker stops by itself
        except OSError:
            pass
        stop_process(self.proc, 5)
        shutil.rmtree(self.directory, ignore_errors=True)


def _end_start(worker: _Worker, exc: BaseException) -> None:
    """A start that failed: a worker past its start timeout is killed at once
    (SIGKILL: it had its time); any other is stopped (lifeline, SIGTERM, which
    a starting worker honours, then SIGKILL)."""
    if isinstance(exc, WorkerTimeoutError) and worker.proc.poll() is None:
        worker.proc.kill()
    worker.stop()


@dataclass(frozen=True)
class _OpenRequest:
    """A caller's ``open``, checked: what either start-up path hands a worker."""

    package_fd: int
    shm_fd: int | None
    shm_size: int
    licence: Licence
    proof: LicenceProof
    client_key: str
    providers: list[str] | None
    device: str | None
    prepack: bool
    package: Header  # the header and manifest, read from package_fd and checked
    digest: str  # the package digest the caller's proof signs
    memory: int | None  # the worker's RLIMIT_DATA (None: CUDA, not limited)
    listen_fd: int | None = None  # the caller's listening socket (the direct local channel)
    listen_token: bytes = b""

    @property
    def cuda(self) -> bool:
        return "CUDAExecutionProvider" in (self.providers or []) or str(self.device).startswith(
            "cuda"
        )

    def worker_args(self) -> list[str]:
        """The request's options as worker flags (a cold spawn)."""
        args: list[str] = []
        if self.providers is not None:
            args += ["--providers", ",".join(self.providers)]
        if self.device is not None:
            args += ["--device", self.device]
        if not self.prepack:
            args += ["--no-prepack"]  # a session option, not hardening: the caller's choice
        return args


@dataclass(eq=False)
class _Standby:
    """A pre-started worker and the daemon's ends of its pipes and socket."""

    worker: _Worker
    status_r: int
    sock: socket.socket

    def discard(self) -> None:
        self.sock.close()
        try:
            os.close(self.status_r)
        except OSError:
            pass
        self.worker.stop()


class _StandbyGone(Exception):
    """The standby worker died before it took its assignment: spawn cold."""


@dataclass(eq=False)
class _Slot:
    """One open's place, until its worker is admitted: first among its uid's
    opens awaiting the key server (``authorizing``), then, once the key
    server said yes, among the starts in all (``starting``), then ``live``."""

    uid: int
    stage: str = "authorizing"


class _Throttled(RateLimitedError):
    """An open refused by the daemon itself: its uid's refusals are spent."""


@dataclass
class _Bucket:
    """One uid's refusals left (a token bucket: ``burst``, one more each interval)."""

    tokens: float
    stamp: float


@dataclass(eq=False)
class _Connection:
    uid: int  # whom its caps count it as: its peer's uid, or that uid's owner (/etc/subuid)
    pid: int
    workers: dict[str, _Worker] = field(default_factory=dict)
    peer_uid: int = -1  # the uid SO_PEERCRED gave


_REPLY_FDS = "_fds"  # descriptors that go with a reply (popped before it is sent)


def _socket_path_fd(path: str) -> int:
    """An ``O_PATH`` descriptor of the Unix socket at ``path`` (never a link
    in its place): a process holding it connects through
    ``/proc/self/fd/N`` without the right to reach ``path`` by name."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.ENOTSOCK, "not a socket")
    return fd


def _short(value: Any) -> str:
    """``repr(value)``, cut to 64 characters: what a reply may echo of a request."""
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _decrement(counts: dict[int, int], uid: int) -> None:
    left = counts.get(uid, 0) - 1
    if left > 0:
        counts[uid] = left
    else:
        counts.pop(uid, None)


def _readable(fd: int) -> bool:
    """Open for reading, and not an ``O_PATH`` handle (which stat accepts)."""
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    o_path = getattr(os, "O_PATH", 0)
    return not (o_path and flags & o_path) and flags & os.O_ACCMODE in (os.O_RDONLY, os.O_RDWR)


def _listening_unix_socket(fd: int) -> bool:
    """A listening Unix stream socket (what a caller's direct channel hands a worker)."""
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        return (
            s.family == socket.AF_UNIX
            and s.type == socket.SOCK_STREAM
            and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        )
    except OSError:
        return False
    finally:
        s.close()


def _memfd(fd: int) -> bool:
    """A memfd (the only kind of file ``F_GET_SEALS`` answers for)."""
    import fcntl

    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_GET_SEALS", 1034))
    except OSError:
        return False
    return True


def _z85_key(value: Any) -> str:
    from zmq.utils import z85

    if isinstance(value, str) and len(value) == 40:
        try:
            if len(z85.decode(value.encode("ascii"))) == 32:
                return value
        except (ValueError, KeyError, UnicodeEncodeError):
            pass
    raise ConfigError("client_key must be a Z85 CURVE public key")


class Daemon:
    def __init__(self, config: DaemonConfig, device: Device, *, log: Log | None = None) -> None:
        self.config = config
        self.device = device
        # structured events (vault.core.logs.Log): log(event, level=..., **fields)
        self.log = log or Log(sys.stderr, component="daemon")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[_Connection] = set()
        self._count = 0
        self._standby: list[_Standby] = []
        self._refilling = False
        self._starting: dict[int, int] = {}  # uid -> authorised workers starting for it now
        self._authorizing: dict[int, int] = {}  # uid -> opens awaiting the key server's answer
        self._refusals: dict[int, _Bucket] = {}  # uid -> refusals the key server may still give
        self._quiet: dict[int, int] = {}  # uid -> refusals not logged (a flood's log is bounded)
        self._log_budget: dict[int, _Bucket] = {}
        self._throttled: set[int] = set()  # uids whose opens the daemon refuses itself now
        self._subuids = SubordinateUids(config.subuid_file)
        self._subuid_error: str | None = None

    # -- requests -----------------------------------------------------------------

    def _hello(self, conn: _Connection) -> dict[str, Any]:
        return {"device_id": self.device.device_id, "tier": TIER, "caller_uid": conn.uid}

    def _health(self, conn: _Connection) -> dict[str, Any]:
        cfg = self.config
        with self._lock:
            workers = sorted(conn.workers)
            live_uid, live_all, start_uid, start_all = self._counts(conn.uid)
            auth_uid = self._authorizing.get(conn.uid, 0)
        return {
            "tier": TIER,
            "device_id": self.device.device_id,
            "worker_uid": cfg.worker_uid,
            "caller_uid": conn.uid,
            "workers": workers,
            "live": {"uid": live_uid, "all": live_all},
            "starting": {"uid": start_uid, "all": start_all},
            "authorizing": {"uid": auth_uid},
            "caps": {
                "max_workers": cfg.max_workers,
                "max_workers_per_uid": cfg.max_workers_per_uid,
                "max_starting": cfg.max_starting,
                "max_starting_per_uid": cfg.max_starting_per_uid,
            },  # fmt: skip
            "keyserver": self.device.keyserver_address,
            "hardening": "fixed by the daemon; callers cannot change it",
        }

    # -- caps -------------------------------------------------------------------------

    def _counts(self, uid: int) -> tuple[int, int, int, int]:
        """(live of uid, live in all, starting of uid, starting in all); under the lock."""
        live_uid = sum(len(c.workers) for c in self._conns if c.uid == uid)
        live_all = sum(len(c.workers) for c in self._conns)
        return live_uid, live_all, self._starting.get(uid, 0), sum(self._starting.values())

    def _reap(self) -> None:
        """Forget callers' workers that died (their callers have not closed them
        yet), so a crash does not hold a slot."""
        dead: list[_Worker] = []
        with self._lock:
            for conn in self._conns:
                for wid, w in list(conn.workers.items()):
                    if w.proc.poll() is not None:
                        dead.append(conn.workers.pop(wid))
        for w in dead:
            w.stop()

    def _bucket(self, table: dict[int, _Bucket], uid: int, burst: int, interval: float) -> _Bucket:
        """``uid``'s bucket in ``table``, refilled to now; under the lock."""
        now = time.monotonic()
        b = table.setdefault(uid, _Bucket(float(burst), now))
        b.tokens = min(float(burst), b.tokens + (now - b.stamp) / interval)
        b.stamp = now
        return b

    def _reserve_open(self, conn: _Connection) -> _Slot:
        """One more open in progress for ``conn``'s uid, awaiting the key
        server, or a typed refusal: its refusals spent (:class:`RateLimitedError`,
        nothing asked of the key server), its opens in progress or its live
        workers at their caps, or the daemon's live workers at theirs
        (:class:`CapacityError`). The uid takes no place among the starts in
        all until the key server has said yes (:meth:`_admit_start`)."""
        cfg = self.config
        self._reap()
        with self._lock:
            uid = conn.uid
            self._check_refusals_locked(uid)
            live_uid, live_all, start_uid, start_all = self._counts(uid)
            busy = start_uid + self._authorizing.get(uid, 0)
            if busy >= cfg.max_starting_per_uid:
                raise CapacityError(
                    f"this user has {busy} worker(s) starting or awaiting the key server, the "
                    "most allowed (--max-starting-per-uid): retry when they are up"
                )
            if live_uid + busy >= cfg.max_workers_per_uid:
                raise CapacityError(
                    f"this user holds {cfg.max_workers_per_uid} worker(s), the most allowed "
                    "(--max-workers-per-uid): close a model first"
                )
            if live_all + start_all >= cfg.max_workers:
                raise CapacityError(
                    f"the daemon runs {cfg.max_workers} worker(s), the most allowed "
                    "(--max-workers): close a model first"
                )
            self._authorizing[uid] = self._authorizing.get(uid, 0) + 1
        return _Slot(uid)

    def _check_refusals_locked(self, uid: int) -> None:
        """Refuse (:class:`RateLimitedError`) an open of a uid whose refusals
        are spent, before anything else is done for it; under the lock."""
        cfg = self.config
        bucket = self._bucket(self._refusals, uid, cfg.refusal_burst, cfg.refusal_interval)
        if bucket.tokens >= 1:
            self._throttled.discard(uid)
        else:
            wait = (1 - bucket.tokens) * cfg.refusal_interval
            if uid not in self._throttled:  # once per episode: the log stays bounded
                self._throttled.add(uid)
                self.log(
                    "open_refusals_spent", level="warning", uid=uid, burst=cfg.refusal_burst
                )  # the uid's opens are refused here for now
            raise _Throttled(
                f"the key server refused {cfg.refusal_burst} or more opens of this user "
                f"lately: the daemon asks it again in {wait:.0f}s"
            )

    def _admit_start(self, slot: _Slot) -> None:
        """The key server said yes: from awaiting it to a place among the
        starts in all, or a typed refusal (:class:`CapacityError`)."""
        cfg = self.config
        with self._lock:
            _lu, live_all, _su, start_all = self._counts(slot.uid)
            if start_all >= cfg.max_starting:
                raise CapacityError(
                    f"the daemon has {start_all} worker(s) starting, the most allowed "
                    "(--max-starting): retry when they are up"
                )
            if live_all + start_all >= cfg.max_workers:
                raise CapacityError(
                    f"the daemon runs {cfg.max_workers} worker(s), the most allowed "
                    "(--max-workers): close a model first"
                )
            _decrement(self._authorizing, slot.uid)
            self._starting[slot.uid] = self._starting.get(slot.uid, 0) + 1
            slot.stage = "starting"

    def _refused(self, uid: int) -> None:
        """The key server refused an open of ``uid``: one refusal spent."""
        cfg = self.config
        with self._lock:
            self._bucket(self._refusals, uid, cfg.refusal_burst, cfg.refusal_interval).tokens -= 1

    def _log_refusal(self, uid: int, exc: VaultError) -> None:
        """Log a refused open, at most 20 lines per uid and then one every
        3 s, each saying how many were left out since: a flood of refusals
        cannot flood the daemon's log (nor make a journal drop others' lines)."""
        with self._lock:
            if (
                isinstance(exc, _Throttled)
                or self._bucket(self._log_budget, uid, 20, 3.0).tokens < 1
            ):
                self._quiet[uid] = self._quiet.get(uid, 0) + 1
                return
            self._log_budget[uid].tokens -= 1
            skipped = self._quiet.pop(uid, 0)
        code, message = reason(exc)
        more = {"not_logged": skipped} if skipped else {}  # refusals left out since the last line
        self.log("open_refused", level="warning", uid=uid, code=code, message=message, **more)

    def _reload_subuids(self) -> None:
        """Read the subordinate uid ranges again if they changed (one stat
        when they did not), and say once what is wrong with them (overlaps of
        two owners, a file unreadable)."""
        try:
            changed = self._subuids.reload()
        except Exception:  # noqa: BLE001 - whatever the file holds, the daemon goes on
            changed = False
        if changed:
            for problem in self._subuids.problems:
                self.log("subuid_ranges_overlap", level="warning", detail=problem)
        error = self._subuids.error
        if error != self._subuid_error:
            self._subuid_error = error
            if error:
                self.log("subuid_unreadable", level="error", detail=error)

    def _workers_uid_exposed(self) -> ConfigError | None:
        """Whether a subordinate range has come to hold the workers' uid (its
        owner could run processes as the workers, and read them)."""
        if not self._subuids.in_range(self.config.worker_uid):
            return None
        return ConfigError(
            f"the workers' uid {self.config.worker_uid} lies in a subordinate uid range of "
            f"{self.config.subuid_file}: the daemon opens nothing until it is moved out"
        )

    def _open(self, conn: _Connection, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        self._reload_subuids()
        exposed = self._workers_uid_exposed()  # a connection admitted before the range came
        if exposed is not None:
            raise exposed
        with self._lock:  # a uid past its refusals costs nothing more: not even a header read
            self._check_refusals_locked(conn.uid)
        req = self._check_open(msg, fds)
        slot = self._reserve_open(conn)
        try:
            try:
                self._authorize(req)  # nothing runs before the licence is shown
            except KeyServerUnavailableError:
                raise  # no answer is not a refusal of this caller's
            except VaultError:
                self._refused(conn.uid)
                raise
            self._admit_start(slot)
            if not req.cuda:  # CUDA's hardening reads driver files: a pre-started worker has not
                while (standby := self._take_standby()) is not None:
                    try:
                        return self._assign(conn, standby, req, slot)
                    except _StandbyGone:
                        continue
            return self._spawn(conn, req, slot)
        finally:
            with self._lock:
                if slot.stage == "authorizing":  # refused, or no answer
                    _decrement(self._authorizing, slot.uid)
                elif slot.stage == "starting":  # not admitted: the start failed
                    _decrement(self._starting, slot.uid)

    def _check_open(self, msg: dict[str, Any], fds: list[int]) -> _OpenRequest:
        """Every field of an ``open`` and the package's header, checked; a
        typed error for anything else, before any worker or key server."""
        extra = set(msg) - _OPEN_FIELDS
        if extra:
            names = ", ".join(_short(x) for x in sorted(extra)[:5])
            raise ConfigError(
                f"unknown field(s) {names}{', ...' if len(extra) > 5 else ''}: the worker's "
                "hardening and options are the daemon's configuration, not the caller's"
            )
        if not fds:
            raise ProtocolError("open needs the package's file descriptor")
        package_fd = fds[0]
        if not stat.S_ISREG(os.fstat(package_fd).st_mode) or not _readable(package_fd):
            raise ConfigError("the package descriptor is not a regular file open for reading")
        lic = Licence.from_json(msg.get("licence"), source="caller's licence").public_copy()
        proof = LicenceProof.from_wire(msg.get("proof"))
        if len(lic.dumps()) > _MAX_LICENCE or len(json.dumps(proof.to_wire())) > _MAX_PROOF:
            raise ConfigError("the licence or proof is too large")
        if proof.licence_id != lic.licence_id or proof.device_id != self.device.device_id:
            raise PermissionDeniedError("the licence proof is not for this licence and device")
        providers = msg.get("providers")
        if providers is not None:
            if (
                not isinstance(providers, list)
                or not all(isinstance(x, str) for x in providers)
                or not set(providers) <= _PROVIDERS
            ):
                raise ConfigError(f"providers must be among {sorted(_PROVIDERS)}")
        device = msg.get("device")
        if device is not None:
            if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device):
                raise ConfigError("device must be cpu or cuda[:N]")
        prepack = msg.get("prepack", True)
        if not isinstance(prepack, bool):
            raise ConfigError("prepack must be true or false")
        shm_size = msg.get("shm_size") or 0
        if isinstance(shm_size, bool) or not isinstance(shm_size, int):
            raise ConfigError("shm_size must be an integer")
        if not 0 <= shm_size <= _MAX_SHM or (shm_size and (len(fds) < 2 or not _memfd(fds[1]))):
            raise ConfigError("shm_size needs a memfd and at most 16 GiB")
        if lic.keyserver_public_key != self.device.keyserver_public_key:
            raise WrongKeyServerError(
                f"licence {lic.licence_id} names another key server than the one this device "
                f"was enrolled with ({self.device.keyserver_address}): it cannot be used here"
            )
        client_key = _z85_key(msg.get("client_key"))
        digest = msg.get("package_digest")
        if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
            raise ConfigError("package_digest must be sha256:<64 hex digits>")
        # bounded reads of the header: a package whose claims the file cannot
        # hold (a sparse file, 30 million 1-byte chunks) is refused here
        try:
            header = read_header(package_fd, source="the package")
        except OSError as exc:  # /proc/self/mem and the like: a regular file that reads fail
            raise FormatError(f"the package could not be read ({exc.strerror})") from None
        cuda = "CUDAExecutionProvider" in (providers or []) or str(device).startswith("cuda")
        memory = None if cuda else memory_limit(header.plaintext_size,
                                                headroom=self.config.worker_memory_headroom)  # fmt: skip
        listen_fd, token = None, b""
        if msg.get("listen_token") is not None:
            # the caller's listening socket is the last descriptor; its token
            # is what each connection to it must send first (localwire.py)
            raw = msg["listen_token"]
            if not isinstance(raw, str) or not re.fullmatch(r"[0-9a-f]{64}", raw):
                raise ConfigError("listen_token must be 32 bytes in hex")
            if len(fds) != (3 if shm_size else 2) or not _listening_unix_socket(fds[-1]):
                raise ConfigError(
                    "listen_token needs a listening Unix socket as the last descriptor"
                )
            listen_fd, token = fds[-1], bytes.fromhex(raw)
        return _OpenRequest(package_fd, fds[1] if shm_size else None, shm_size, lic, proof,
                            client_key, providers, device, prepack, header, digest,
                            memory, listen_fd, token)  # fmt: skip

    def _authorize(self, req: _OpenRequest) -> None:
        """Ask the key server, as the device, whether this caller's licence and
        proof would get this package's key now: its typed refusal, if any,
        is the caller's answer, and no worker starts."""
        from ..core.keyclient import KeyServerClient

        with KeyServerClient(req.licence, device=self.device,
                             timeout=self.config.keyserver_timeout) as ks:  # fmt: skip
            ks.authorize(model_id=req.package.model_id, key_id=req.package.key_id,
                         package_digest=req.digest, proof=req.proof,
                         client_key=req.client_key)  # fmt: skip

    # -- pre-started workers ----------------------------------------------------------

    def _new_worker_dir(self) -> tuple[str, str]:
        cfg = self.config
        with self._lock:
            self._count += 1
            wid = f"w{self._count}-{os.urandom(4).hex()}"
        wdir = tempfile.mkdtemp(prefix=f"{wid}-", dir=cfg.runtime_dir)
        # the workers' uid and root only: no other user reaches the worker's
        # socket by its name (it is in every worker's command line), so none
        # can flood it with connections; its caller gets a descriptor (_admit)
        os.chmod(wdir, 0o700)
        if os.geteuid() == 0:
            os.chown(wdir, cfg.worker_uid, cfg.worker_gid)
        return wid, wdir

    def _start_standby(self) -> _Standby:
        """Spawn one worker that hardens, imports and waits for its assignment."""
        wid, wdir = self._new_worker_dir()
        pipes = launch.WorkerPipes()
        pipes.secret("--device-key-fd", self.device.dumps())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        args = ["--standby-fd", str(theirs.fileno()), "--endpoint", f"ipc://{wdir}/w.sock",
                "--tier", str(TIER), *pipes.args]  # fmt: skip
        try:
            proc = self._launch(args, [theirs.fileno(), *pipes.pass_fds], wdir)
        except BaseException:
            pipes.failed()
            ours.close()
            shutil.rmtree(wdir, ignore_errors=True)
            raise
        finally:
            theirs.close()
        pipes.spawned()
        assert pipes.lifeline_w is not None
        return _Standby(_Worker(wid, proc, pipes.lifeline_w, wdir), pipes.status_r, ours)

    def _take_standby(self) -> _Standby | None:
        with self._lock:
            standby = self._standby.pop(0) if self._standby else None
        if standby is not None and standby.worker.proc.poll() is not None:
            standby.discard()  # died waiting (killed, out of memory): try the next
            return self._take_standby()
        return standby

    def _refill(self) -> None:
        """Start standby workers in the background until there are ``standby``."""
        with self._lock:
            if self._refilling or self._stop.is_set() or len(self._standby) >= self.config.standby:
                return
            self._refilling = True

        def fill() -> None:
            while True:
                with self._lock:  # the check and the reset at once: no open slips between
                    if self._stop.is_set() or len(self._standby) >= self.config.standby:
                        self._refilling = False
                        return
                try:
                    standby = self._start_standby()
                except Exception as exc:  # noqa: BLE001 - logged; the next open spawns cold
                    code, message = reason(exc)
                    self.log("standby_failed", level="error", code=code, message=message)
                    with self._lock:
                        self._refilling = False
                    return
                with self._lock:
                    kept = not self._stop.is_set()
                    if kept:
                        self._standby.append(standby)
                if not kept:
                    standby.discard()

        threading.Thread(target=fill, name="vault-standby", daemon=True).start()

    def _assign(
        self, conn: _Connection, standby: _Standby, req: _OpenRequest, slot: _Slot
    ) -> dict[str, Any]:
        """Hand a standby worker its package, licence and caller; wait for ready
        (it sets its memory limit from the assignment before it reads the package)."""
        cfg = self.config
        deadline = time.monotonic() + cfg.start_timeout
        secrets: list[int] = []
        try:
            datas = [req.licence.dumps(), json.dumps(req.proof.to_wire()).encode()]
            if req.listen_fd is not None:
                datas.append(req.listen_token)
            for data in datas:
                r, w = os.pipe()
                secrets.append(r)
                try:
                    # the reader gets its end only with the message below: a write
                    # that would block is refused, never waited on (_open caps both)
                    os.set_blocking(w, False)
                    if os.write(w, data) != len(data):
                        raise BlockingIOError
                except BlockingIOError:
                    raise ConfigError("the licence or proof is too large") from None
                finally:
                    os.close(w)
            fds = [req.package_fd, *secrets]
            msg: dict[str, Any] = {"op": "assign", "package_fd": 0, "licence_fd": 1,
                                   "proof_fd": 2, "allow_key": [req.client_key]}  # fmt: skip
            if req.shm_fd is not None:
                msg.update(shm_fd=len(fds), shm_size=req.shm_size)
                fds.append(req.shm_fd)
            if req.listen_fd is not None:
                msg.update(listen_fd=len(fds), listen_token_fd=len(fds) + 1)
                fds += [req.listen_fd, secrets[2]]
            if req.providers is not None:
                msg["providers"] = ",".join(req.providers)
            if not req.prepack:
                msg["no_prepack"] = True
            if req.memory is not None:
                msg["memory_limit"] = req.memory
            try:
                send_message(standby.sock, msg, fds)
                # its "taken" byte: a worker that died waiting (killed, out of
                # memory) closes the socket instead, and the next one is tried;
                # one that neither takes it nor dies is past its start timeout
                standby.sock.settimeout(max(0.001, deadline - time.monotonic()))
                if standby.sock.recv(1) != b"T":
                    raise ConnectionError("the pre-started worker closed its socket")
            except TimeoutError:
                standby.worker.proc.kill()
                raise WorkerTimeoutError(f"worker not ready after {cfg.start_timeout:g}s") from None
            except OSError as exc:
                raise _StandbyGone() from exc
        except BaseException:
            standby.discard()  # whatever failed, this worker is nobody's: stopped, not leaked
            raise
        finally:
            for fd in secrets:
                os.close(fd)
        standby.sock.close()
        worker = standby.worker
        try:
            ready = launch.read_ready_line(standby.status_r, proc=worker.proc,
                                           timeout=max(0.0, deadline - time.monotonic()))  # fmt: skip
        except BaseException as exc:
            _end_start(worker, exc)
            raise
        finally:
            os.close(standby.status_r)
        return self._admit(conn, worker, ready, req.licence, slot)

    def _admit(
        self, conn: _Connection, worker: _Worker, ready: dict[str, Any], lic: Licence,
        slot: _Slot,
    ) -> dict[str, Any]:  # fmt: skip
        try:
            endpoint_fd = _socket_path_fd(os.path.join(worker.directory, "w.sock"))
        except OSError as exc:
            worker.stop()
            raise WorkerCrashedError(f"the worker's socket is not there ({exc.strerror})") from None
        with self._lock:  # from starting to live at once: never counted twice, nor not at all
            conn.workers[worker.wid] = worker
            _decrement(self._starting, slot.uid)
            slot.stage = "live"
        self.log("worker_started", worker=worker.wid, pid=worker.proc.pid, uid=conn.uid,
                 worker_uid=self.config.worker_uid if os.geteuid() == 0 else os.geteuid(),
                 caller_pid=conn.pid, model=ready.get("model_id"), licence=lic.licence_id,
                 standby=bool(ready.get("standby")))  # fmt: skip
        return {
            "worker": worker.wid,
            "pid": worker.proc.pid,
            "endpoint": ready.get("endpoint"),
            "server_key": ready.get("server_key"),
            "ready": {k: v for k, v in ready.items() if k != "ready"},
            # the socket's directory is closed to the caller: it connects through
            # this O_PATH descriptor (ipc:///proc/self/fd/N), sent with the reply
            _REPLY_FDS: [endpoint_fd],
        }

    def _spawn(self, conn: _Connection, req: _OpenRequest, slot: _Slot) -> dict[str, Any]:
        """A cold start: spawn a worker for this request; wait for ready."""
        wid, wdir = self._new_worker_dir()
        pipes = launch.WorkerPipes()
        pipes.secret("--licence-fd", req.licence.dumps())
        pipes.secret("--proof-fd", json.dumps(req.proof.to_wire()).encode())
        pipes.secret("--device-key-fd", self.device.dumps())
        # "--allow-key=KEY": a Z85 key may start with "-"
        args = ["--package-fd", str(req.package_fd), "--endpoint", f"ipc://{wdir}/w.sock",
                f"--allow-key={req.client_key}", "--tier", str(TIER), *pipes.args]  # fmt: skip
        pass_fds = [req.package_fd]
        if req.shm_fd is not None:
            args += ["--shm-fd", str(req.shm_fd), "--shm-size", str(req.shm_size)]
            pass_fds.append(req.shm_fd)
        if req.memory is not None:  # the worker's first act, before it reads anything
            args += ["--memory-limit", str(req.memory)]
        if req.listen_fd is not None:
            args += ["--listen-fd", str(req.listen_fd)]
            pass_fds.append(req.listen_fd)
            pipes.secret("--listen-token-fd", req.listen_token)
            args += pipes.args[-2:]
        try:
            proc = self._launch([*args, *req.worker_args()], [*pass_fds, *pipes.pass_fds], wdir)
        except BaseException:
            pipes.failed()
            shutil.rmtree(wdir, ignore_errors=True)
            raise
        pipes.spawned()
        assert pipes.lifeline_w is not None
        worker = _Worker(wid, proc, pipes.lifeline_w, wdir)
        try:
            ready = launch.read_ready_line(pipes.status_r, timeout=self.config.start_timeout,
                                           proc=proc)  # fmt: skip
        except BaseException as exc:
            _end_start(worker, exc)
            raise
        finally:
            pipes.close_status()
        return self._admit(conn, worker, ready, req.licence, slot)

    def _launch(self, args: list[str], pass_fds: list[int], wdir: str) -> subprocess.Popen[bytes]:
        """``python -I -B -m worker ARGS`` as the workers' uid, from the daemon's install."""
        cfg = self.config
        root = os.geteuid() == 0
        return launch.spawn_worker(
            args,
            pass_fds=pass_fds,
            cwd=wdir,
            python=cfg.python,
            sys_path=cfg.sys_path,
            uid=cfg.worker_uid if root else None,
            gid=cfg.worker_gid if root else None,
            umask=0o000,  # the socket file is connectable; the worker's CURVE key decides
        )

    def _close(self, conn: _Connection, msg: dict[str, Any]) -> dict[str, Any]:
        wid = msg.get("worker")
        with self._lock:
            worker = conn.workers.pop(wid, None) if isinstance(wid, str) else None
        if worker is None:
            # the same answer for another caller's worker and for none at all
            raise PermissionDeniedError("no such worker on this connection")
        worker.stop()
        return {"worker": wid, "closed": True}

    def _status(self, conn: _Connection, msg: dict[str, Any]) -> dict[str, Any]:
        wid = msg.get("worker")
        worker = conn.workers.get(wid) if isinstance(wid, str) else None
        if worker is None:
            raise PermissionDeniedError("no such worker on this connection")
        return {"worker": wid, "alive": worker.proc.poll() is None}

    def handle(self, conn: _Connection, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        op = msg.get("op")
        rid = msg.get("id")
        if not (type(rid) is int or (isinstance(rid, str) and len(rid) <= 128)):
            rid = None  # echoed only when small: a reply never outgrows its request's limit
        try:
            if op == "open":
                body = self._open(conn, msg, fds)
            elif op == "hello":
                body = self._hello(conn)
            elif op == "health":
                body = self._health(conn)
            elif op == "close":
                body = self._close(conn, msg)
            elif op == "status":
                body = self._status(conn, msg)
            else:
                raise ProtocolError(f"unknown op {_short(op)}")
        except VaultError as exc:
            if op == "open":
                self._log_refusal(conn.uid, exc)
            return {"ok": False, "id": rid, "error": exc.to_wire()}
        except Exception as exc:  # noqa: BLE001 - a bug or odd input: answered, never fatal
            self.log("request_failed", level="error", op=str(op), uid=conn.uid,
                     error=type(exc).__name__)  # fmt: skip
            err = ProtocolError(f"the daemon could not handle this {_short(op)} request")
            return {"ok": False, "id": rid, "error": err.to_wire()}
        finally:
            for fd in fds:  # the worker got its own copies
                try:
                    os.close(fd)
                except OSError:
                    pass
        return {"ok": True, "id": rid, **body}

    # -- connections --------------------------------------------------------------

    def _serve_connection(self, sock: socket.socket, conn: _Connection) -> None:
        try:
            if self.config.worker_uid in (conn.uid, conn.peer_uid):
                # a caller of the workers' own uid could ptrace them: tier 1 void.
                # Its first request is read (and ignored) before the refusal, so
                # the refusal is what it sees, not a broken pipe on its send.
                sock.settimeout(5.0)
                try:
                    _msg, fds = recv_message(sock)
                    for fd in fds:
                        os.close(fd)
                except (ConnectionError, OSError, ProtocolError):
                    return
                send_message(sock, {"ok": False, "error": PermissionDeniedError(
                    "callers may not share the workers' uid").to_wire()})  # fmt: skip
                return
            while not self._stop.is_set():
                try:
                    msg, fds = recv_message(sock)
                except (ConnectionError, OSError):
                    return
                except ProtocolError as exc:
                    send_message(sock, {"ok": False, "error": exc.to_wire()})
                    return  # the stream may be out of step: drop the connection
                reply = self.handle(conn, msg, fds)
                out_fds: list[int] = reply.pop(_REPLY_FDS, [])
                try:
                    try:
                        send_message(sock, reply, out_fds)
                    except ProtocolError:  # a reply past the message limit: said, small
                        send_message(sock, {"ok": False, "error": ProtocolError(
                            "the daemon's answer to this request is past the message "
                            "limit").to_wire()})  # fmt: skip
                finally:
                    for fd in out_fds:
                        os.close(fd)
                    if msg.get("op") == "open":
                        # the next standby worker starts once this open is answered
                        # (its imports would otherwise take cores from the open), or
                        # once its caller has hung up: the pool never stays drained
                        self._refill()
        except OSError:
            pass
        finally:
            with self._lock:
                workers = list(conn.workers.values())
                conn.workers.clear()
                self._conns.discard(conn)
            for worker in workers:
                worker.stop()
            sock.close()

    def _admit_connection(self, sock: socket.socket) -> _Connection | None:
        """At most ``max_connections`` at once, ``max_connections_per_uid`` of one
        uid, of which at most ``max_idle_connections_per_uid`` hold no worker:
        beyond, the caller gets one typed refusal and the socket closes (each
        connection holds a descriptor and a thread of the daemon's; a stranger
        holds no worker, so a few strangers' uids cannot fill the daemon)."""
        try:
            pid, peer, _gid = peer_credentials(sock)
        except OSError:
            sock.close()
            return None
        cfg = self.config
        # a subordinate uid counts as the user it belongs to (SubordinateUids)
        self._reload_subuids()
        uid = self._subuids.owner(peer)
        refusal: VaultError = ConfigError(
            "the vault daemon has too many connections (of this user, of this user's "
            "holding no model, or in all): close some and retry")  # fmt: skip
        exposed = self._workers_uid_exposed()
        if exposed is not None:
            refusal = exposed
        else:
            with self._lock:  # counted and registered at once: a flood cannot overshoot
                total = len(self._conns)
                mine = [c for c in self._conns if c.uid == uid]
                idle = sum(1 for c in mine if not c.workers)
                if (total < cfg.max_connections and len(mine) < cfg.max_connections_per_uid
                        and idle < cfg.max_idle_connections_per_uid):  # fmt: skip
                    conn = _Connection(uid, pid, peer_uid=peer)
                    self._conns.add(conn)
                    return conn
        try:
            sock.settimeout(1.0)
            send_message(sock, {"ok": False, "error": refusal.to_wire()})
        except OSError:
            pass
        sock.close()
        return None

    def serve(self, listener: socket.socket) -> None:
        self._refill()
        listener.settimeout(0.2)
        threads: list[threading.Thread] = []
        while not self._stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    break
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # out of descriptors or memory (a flood of connections): back
                    # off and go on serving the callers already connected
                    self.log("accept_backoff", level="warning", error=exc.strerror)
                    self._stop.wait(0.1)
                    continue
                raise
            conn = self._admit_connection(sock)
            if conn is None:
                continue
            sock.settimeout(None)
            t = threading.Thread(target=self._serve_connection, args=(sock, conn), daemon=True)
            try:
                t.start()
            except RuntimeError:  # no thread to be had: refuse this one, keep serving
                with self._lock:
                    self._conns.discard(conn)
                sock.close()
                continue
            threads = [x for x in threads if x.is_alive()] + [t]
        with self._lock:
            conns = list(self._conns)
            standby, self._standby = self._standby, []
        for conn in conns:
            for worker in list(conn.workers.values()):
                worker.stop()
        for s in standby:
            s.discard()

    def stop(self) -> None:
        self._stop.set()


def _bind(path: str) -> socket.socket:
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, mode=0o755, exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # a stale socket from a daemon that died
        else:
            probe.close()
            raise ConfigError(f"{path}: a daemon is already listening there")
        finally:
            probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        os.chmod(path, 0o666)  # every local user may ask; SO_PEERCRED says who asks
        s.listen(64)
    except OSError as exc:
        s.close()
        raise ConfigError(f"cannot listen on {path}: {exc.strerror}") from None
    return s


def resolve_worker_user(name: str | None) -> tuple[int, int, str]:
    """(uid, gid, name) the workers run as: ``name`` when the daemon is root,
    else the daemon's own user (a service-user daemon)."""
    if os.geteuid() != 0:
        pw = pwd.getpwuid(os.geteuid())
        return pw.pw_uid, pw.pw_gid, pw.pw_name
    want = name or DEFAULT_WORKER_USER
    try:
        pw = pwd.getpwnam(want)
    except KeyError:
        raise ConfigError(
            f"no user {want!r} for the workers: create it (see deploy/README.md) "
            "or pass --worker-user"
        ) from None
    if pw.pw_uid == 0:
        raise ConfigError("workers must not run as root: name an unprivileged --worker-user")
    return pw.pw_uid, pw.pw_gid, pw.pw_name


def run_daemon(config: DaemonConfig, *, out: IO[str] | None = None, log: Log | None = None) -> int:
    """Run until SIGTERM or Ctrl-C; prints one JSON ready line on ``out``,
    its events on ``log`` (default: JSON lines on stderr)."""
    out = out or sys.stdout
    log = log or Log(sys.stderr, component="daemon")
    device = Device.load(config.device_dir)
    # whatever this daemon creates from here on (its later imports' bytecode
    # caches among it) is writable by no one else, whatever umask it started under
    os.umask(os.umask(0o022) | 0o022)
    # and what it made before that (the caches of its own imports, 0777 under
    # umask 0) is repaired, with the workers' code below
    own = [p for name, mod in list(sys.modules.items()) if name.partition(".")[0] == "vault"
           for p in getattr(mod, "__path__", None) or () if os.path.isdir(p)]  # fmt: skip
    subuids = SubordinateUids(config.subuid_file)
    subuids.reload()
    if subuids.error:
        raise ConfigError(f"cannot read the subordinate uid ranges ({subuids.error}): "
                          "the per-user caps need them (--subuid-file)")  # fmt: skip
    for problem in subuids.problems:
        log("subuid_ranges_overlap", level="warning", detail=problem)
    if _subid_from_nss():
        log("subuid_from_nss", level="warning", detail=(
            "/etc/nsswitch.conf names a subid: source: newuidmap reads the ranges from it, "
            f"not from {config.subuid_file}, and the daemon reads only the file"))  # fmt: skip
    if subuids.in_range(config.worker_uid):
        raise ConfigError(
            f"the workers' uid {config.worker_uid} lies in a subordinate uid range of "
            f"{config.subuid_file}, whose owner could run processes as it and read its "
            "workers: name a --worker-user outside every range"
        )
    check_install(config.python, config.sys_path)
    check_worker_code(
        own
        + check_worker_can_run(
            config.python,
            config.sys_path,
            uid=config.worker_uid,
            gid=config.worker_gid,
            user=config.worker_user or str(config.worker_uid),
        )
    )
    base = os.path.dirname(os.path.abspath(config.socket_path))
    os.makedirs(base, mode=0o755, exist_ok=True)
    check_private_dir(base)  # nobody else may move the socket aside and listen in its place
    own_runtime = not config.runtime_dir
    if own_runtime:
        config.runtime_dir = tempfile.mkdtemp(prefix="workers-", dir=base)
    else:
        check_private_dir(config.runtime_dir, what="runtime directory")
    os.chmod(config.runtime_dir, 0o711)
    listener = _bind(config.socket_path)
    daemon = Daemon(config, device, log=log)
    old = {s: signal.signal(s, lambda *_: daemon.stop()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        log("started", socket=config.socket_path, device=device.device_id,
            worker_uid=config.worker_uid, standby=config.standby)  # fmt: skip
        print(json.dumps({"ready": True, "socket": config.socket_path, "tier": TIER,
                          "device_id": device.device_id, "worker_uid": config.worker_uid,
                          "keyserver": device.keyserver_address,
                          "pid": os.getpid()}), file=out, flush=True)  # fmt: skip
        daemon.serve(listener)
    finally:
        listener.close()
        try:
            os.unlink(config.socket_path)
        except OSError:
            pass
        if own_runtime:
            shutil.rmtree(config.runtime_dir, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)
        log("stopped")
    return 0
