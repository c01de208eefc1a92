"""Worker processes of the service: starting one, and the restart backoff.

Each instance is an ordinary hardened worker (``python -I -B -m worker``,
started through :mod:`vault.core.launch`, the one place that builds a
worker's command line and environment) bound to an ``ipc://`` socket in a
private 0700 directory, with a lifeline pipe: if the service dies, its
workers see EOF and exit by themselves. Starting one blocks (key release,
decrypt, session build), so the service does it on a thread and hands the
ready :class:`Instance` to its loop.

Example::

    spec = LaunchSpec(licence=lic)
    inst = start_instance(spec, "/srv/models/m.vault", model_id="m", index=0)
    ...                          # the loop connects a DEALER to inst.endpoint
    inst.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from vault.core.device import Device
from vault.core.errors import ConfigError, ProtocolError, WorkerTimeoutError, WrongModelError
from vault.core.launch import WorkerPipes, probe_install, read_ready_line, spawn_worker
from vault.core.licence import Licence
from vault.core.modelscope import describe
from vault.core.protocol import PROTOCOL_VERSION, pack_header, raise_for_reply, unpack_header

__all__ = ["Backoff", "Instance", "LaunchSpec", "check_workers_user", "start_instance"]


@dataclass
class LaunchSpec:
    """How the service starts its workers (the same for every model).

    ``licence`` is the service's own runtime licence (one per model, or one
    whose model scope covers several or all: ``vault licence issue
    --all-models``) and ``device`` the enrolled device the service runs as:
    each worker asks the key server for its package key as that device, with
    the licence's proof. ``unsafe_test_keys`` (package path -> raw key, with
    ``publisher``) bypasses the key server and exists for tests only, as
    :func:`vault.client.open_with_unsafe_test_key` does.
    """

    licence: Licence | Sequence[Licence] | None = None
    threads: int = 2
    intra_op_threads: int | None = 1
    user: str | None = None
    device: Device | None = None  # the enrolled device this service runs as (tier 2)
    providers: Sequence[str] | None = None
    start_timeout: float = 120.0
    python: str | None = None
    extra_args: Sequence[str] = ()
    publisher: str | None = None
    unsafe_test_keys: Mapping[str, bytes] = field(default_factory=dict)

    def licence_for(self, model_id: str) -> Licence | None:
        """The licence a worker of ``model_id`` asks for its key with: one for
        exactly that model first, else the first whose model scope covers it
        (several ids, ``prefix*``, ``*``: :mod:`vault.core.modelscope`).
        :class:`WrongModelError` when licences were given and none covers it;
        None when none was given."""
        lics = [self.licence] if isinstance(self.licence, Licence) else list(self.licence or ())
        if not lics:
            return None
        for lic in lics:
            if lic.model_id == model_id:
                return lic
        for lic in lics:
            if lic.covers(model_id):
                return lic
        given = "; ".join(f"{lic.licence_id}: {describe(lic.model_id)}" for lic in lics)
        raise WrongModelError(
            f"no licence of this service covers model {model_id!r} ({given}); issue one that "
            "does (vault licence issue ID... or --all-models) and send SIGHUP"
        )


def check_workers_user(spec: LaunchSpec) -> None:
    """A root service's workers drop to ``spec.user``: that user must exist
    and be able to run the workers' interpreter with this install
    (:class:`ConfigError` naming what it cannot reach). Before, a venv made
    from an interpreter under a private home (``/root/.pyenv``) started, and
    every model was unavailable with "worker failed to start
    (ModuleNotFoundError)": a worker imports as root, drops to the user, and
    its next import failed."""
    if not spec.user or os.geteuid() != 0:
        return
    import pwd
    import sys

    try:
        pw = pwd.getpwnam(spec.user)
    except KeyError:
        raise ConfigError(f"--user {spec.user!r}: no such user on this machine") from None
    python = spec.python or sys.executable
    where, why = probe_install(python, (), uid=pw.pw_uid, gid=pw.pw_gid)
    if where is None:
        raise ConfigError(
            f"the workers' user {spec.user!r} cannot run {python} with this install ({why}), "
            "so no worker could start: the interpreter, its standard library and the install "
            "must be readable by that user (a venv made from an interpreter under a private "
            "home, such as /root/.pyenv, is not); make the venv from the system's interpreter "
            "(/usr/bin/python3 -m venv, deploy/README.md) or leave --user out"
        )


# how long a worker ended as stuck has to report its usage and go
STUCK_GRACE_S = 5.0


class Instance:
    """One running worker process of a model's pool."""

    def __init__(
        self,
        *,
        model_id: str,
        index: int,
        proc: subprocess.Popen[bytes],
        directory: str,
        endpoint: str,
        lifeline: int,
        info: dict[str, Any],
    ) -> None:
        self.model_id = model_id
        self.index = index
        self.proc = proc
        self.dir = directory
        self.endpoint = endpoint
        self.lifeline: int | None = lifeline
        self.info = info
        self.started = time.monotonic()
        self.sock: zmq.Socket[Any] | None = None  # owned by the service loop
        self.inflight = 0
        self.lease_ended = False  # it said its key lease ended: being taken down, sent nothing more
        # busy with an abandoned call a full timeout past its deadline: sent nothing
        # more, and killed once no call of anyone else is left on it
        self.stuck = False
        self.ending = False  # sent SIGTERM as stuck (end())
        # found stuck and a replacement started in its place: ended once idle
        self.replaced = False
        self.drained = False  # replaced, it recovered, and its replacement serves: being drained
        self._ender: threading.Timer | None = None
        self.pidfd: int | None = None
        try:
            self.pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # pragma: no cover - kernels before 5.3
            self.pidfd = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Close the lifeline (the worker exits on EOF), SIGTERM, then SIGKILL."""
        if self._ender is not None:
            self._ender.cancel()  # it goes here: no signal after its pid is reaped
        if self.lifeline is not None:
            os.close(self.lifeline)
            self.lifeline = None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL at once."""
        if self.proc.poll() is None:
            self.proc.kill()

    def end(self, grace: float = STUCK_GRACE_S) -> None:
        """Stop a worker stuck past its calls' timeouts: SIGTERM, which a
        serving worker answers by reporting its usage and leaving at once, a
        run in flight or not (a SIGKILL lost every call it had served since
        its last report, and left its grant reserved); SIGKILL if it has not
        gone within ``grace``. Once; the crash path sees it go."""
        if self.ending or self.proc.poll() is not None:
            return
        self.ending = True
        self.proc.send_signal(signal.SIGTERM)
        self.kill_after(grace)

    def kill_after(self, grace: float) -> None:
        """SIGKILL if it has not gone within ``grace`` (cancelled by :meth:`stop`,
        so no signal goes after its pid is reaped)."""
        if self._ender is None:
            self._ender = threading.Timer(grace, self.kill)
            self._ender.daemon = True
            self._ender.start()


def _ask_info(endpoint: str, timeout: float) -> dict[str, Any]:
    """The worker's public signature (one ``info`` round trip on a private socket)."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        sock.send(pack_header({"v": PROTOCOL_VERSION, "op": "info", "id": 0}))
        if not sock.poll(int(timeout * 1000)):
            raise WorkerTimeoutError("worker did not answer info")
        frames = sock.recv_multipart()
        hdr = unpack_header(frames[0])
        raise_for_reply(hdr)
        if not isinstance(hdr.get("inputs"), list) or not isinstance(hdr.get("outputs"), list):
            raise ProtocolError("worker info has no signature")
        return {k: v for k, v in hdr.items() if k not in ("v", "id", "ok")}
    finally:
        sock.close(linger=0)


STALE_AFTER_S = 60.0
_DIR_PREFIX = "vault-svc-"  # an instance's private directory in the temp directory


def sweep_stale_dirs(base: str | None = None, *, older_than: float = STALE_AFTER_S) -> int:
    """Remove the instance directories a service of this uid left behind when
    it was killed (SIGKILL leaves no chance to clean): a ``vault-svc-*``
    directory of ours, mode 0700, older than ``older_than`` seconds, holding
    only its ``w.sock`` that nobody listens on any more. A live service's
    socket answers, a starting one's directory is young: both are left.
    Returns how many were removed."""
    import socket
    import stat

    base = base or tempfile.gettempdir()
    me, now, removed = os.geteuid(), time.time(), 0
    try:
        entries = list(os.scandir(base))
    except OSError:
        return 0
    for e in entries:
        if not e.name.startswith(_DIR_PREFIX):
            continue
        try:
            st = e.stat(follow_symlinks=False)
            if (not stat.S_ISDIR(st.st_mode) or st.st_uid != me
                    or stat.S_IMODE(st.st_mode) != 0o700 or now - st.st_mtime < older_than):  # fmt: skip
                continue
            if os.listdir(e.path) != ["w.sock"]:
                continue
            sock_path = os.path.join(e.path, "w.sock")
            sst = os.lstat(sock_path)
            if not stat.S_ISSOCK(sst.st_mode) or sst.st_uid != me:
                continue
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1.0)
                probe.connect(sock_path)
                continue  # somebody listens: a live instance
            except ConnectionRefusedError:
                pass
            finally:
                probe.close()
            shutil.rmtree(e.path)
            removed += 1
        except OSError:
            continue
    return removed


def start_instance(spec: LaunchSpec, package: str, *, model_id: str, index: int) -> Instance:
    """Start one worker for ``package`` and wait until it serves (blocking)."""
    key = spec.unsafe_test_keys.get(os.path.abspath(package))
    lic = spec.licence_for(model_id) if key is None else None  # refuses before any spawn
    directory = tempfile.mkdtemp(prefix=_DIR_PREFIX)  # 0700
    endpoint = f"ipc://{directory}/w.sock"
    pipes = WorkerPipes()
    args = [os.path.abspath(package), "--endpoint", endpoint, "--threads", str(spec.threads)]
    # the service's one connection carries every caller's calls: the worker
    # cannot tell callers apart, so a longer call never runs on its router
    # thread, where another caller's would wait for it (docs/worker.md)
    args += ["--inline-max-ms", "0"]
    if spec.intra_op_threads:
        args += ["--intra-op-threads", str(spec.intra_op_threads)]
    if key is not None:
        pipes.secret("--unsafe-test-key-fd", bytes(key))
    elif lic is not None:
        pipes.secret("--licence-fd", lic.dumps())
        # a worker whose lease ended (the key server away past it) exits, and the
        # crash path starts one that asks for a new lease once the server is back
        args += ["--exit-when-lease-ends"]
    if spec.device is not None:
        pipes.secret("--device-key-fd", spec.device.dumps())
        args += ["--tier", "2"]
    if spec.publisher:
        args += ["--publisher", os.path.abspath(spec.publisher)]
    if spec.user:
        args += ["--user", spec.user]
    if spec.providers:
        args += ["--providers", ",".join(spec.providers)]
    args += [*pipes.args, *spec.extra_args]
    if spec.user:  # the dropped worker must still reach its socket directory
        import pwd

        pw = pwd.getpwnam(spec.user)
        os.chown(directory, pw.pw_uid, pw.pw_gid)
    try:
        proc = spawn_worker(args, pass_fds=pipes.pass_fds, cwd=directory, python=spec.python)
    except BaseException:
        pipes.failed()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    pipes.spawned()
    life_w = pipes.lifeline_w
    assert life_w is not None
    inst: Instance | None = None
    try:
        ready = read_ready_line(pipes.status_r, timeout=spec.start_timeout, proc=proc)
        bound = str(ready.get("endpoint") or endpoint)
        info = _ask_info(bound, timeout=30.0)
        inst = Instance(model_id=model_id, index=index, proc=proc, directory=directory,
                        endpoint=bound, lifeline=life_w, info=info)  # fmt: skip
        return inst
    except BaseException:
        if inst is None:
            os.close(life_w)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            shutil.rmtree(directory, ignore_errors=True)
        raise
    finally:
        pipes.close_status()


class Backoff:
    """Restart delays for one pool slot: 0.5 s, doubling to ``cap``; an
    instance that served for ``reset_after`` seconds resets it."""

    def __init__(self, first: float = 0.5, cap: float = 30.0, reset_after: float = 60.0) -> None:
        self.first = first
        self.cap = cap
        self.reset_after = reset_after
        self.failures = 0

    def next_delay(self, lived: float) -> float:
        if lived >= self.reset_after:
            self.failures = 0
        delay = 0.0 if self.failures == 0 else min(self.cap, self.first * 2 ** (self.failures - 1))
        self.failures += 1
        return delay
