"""A pre-started worker kept by the caller (tier 0): no process start in an open.

A tier-0 ``vault.open`` spawns the worker itself: interpreter, imports and
hardening take 250-600 ms here before the worker even reads its package.
So after an open has been answered the client starts **one** worker ahead of
need, exactly as the local daemon does for tier 1 (``worker --standby-fd``):
hardened from its first instruction on, numpy, zmq and onnxruntime imported,
then waiting on one end of a socket pair. It holds nothing of any package:
no package, no licence, no key, no caller socket; its command line names
none. The next open hands it, over that socket (``SCM_RIGHTS``), the
package's descriptor, a pipe with the licence, the shared-memory arena and
the caller's listening socket; only then does the worker verify, ask the key
server for the key and decrypt. A pre-started worker serves that one open
and is never reused: the one after it is a new process.

What may differ between opens decides which worker fits: the interpreter and
the ``worker_args`` it was started with (hardening options are fixed at
spawn), so a waiting worker is kept per (interpreter, arguments) and one for
another combination is stopped. CUDA opens spawn cold (their hardening reads
driver files), and so does the unsafe test-key path (its key and publisher
file would have to be known at spawn). ``VAULT_STANDBY=0`` turns it off.

The first tier-0 ``vault.open`` in a process starts one the same way before
the client's own imports (``vault._prestart``), so that its start-up runs
beside them, and then takes it.

Example::

    w = POOL.take(key)                 # None: spawn cold
    ready = w.assign(msg, fds, timeout=60)
    POOL.refill(key)                   # after the open was answered
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

from .daemonwire import send_message
from .launch import WorkerPipes, read_ready_line, spawn_worker
from .process import stop_process

__all__ = ["POOL", "Standby", "StandbyGone", "StandbyPool", "enabled", "key_for"]

Key = tuple[str, tuple[str, ...]]


def enabled() -> bool:
    """Whether the caller keeps a pre-started worker (``VAULT_STANDBY``, default on)."""
    return os.environ.get("VAULT_STANDBY", "1") != "0"


def key_for(
    python: str, worker_args: Sequence[str], device: str | None, providers: Sequence[str] | None
) -> Key | None:
    """The pre-started worker an open with these arguments fits; None: it
    spawns cold (pre-starting off; CUDA, whose hardening reads driver files)."""
    if not enabled() or device or "CUDAExecutionProvider" in (providers or ()):
        return None
    return (python, tuple(worker_args))


class StandbyGone(Exception):
    """The waiting worker died (or stopped reading) before it took its assignment."""


class Standby:
    """One pre-started worker: its process, private directory, and our ends
    of its socket pair, status pipe and lifeline."""

    def __init__(self, *, python: str, worker_args: Sequence[str]) -> None:
        self.key: Key = (python, tuple(worker_args))
        self._owner = os.getpid()  # a forked child never stops it nor removes its directory
        self.dir = tempfile.mkdtemp(prefix="vault-")  # 0700: its endpoint lives here
        self.endpoint = f"ipc://{self.dir}/w0.sock"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pipes = WorkerPipes()
        args = ["--standby-fd", str(theirs.fileno()), "--endpoint", self.endpoint,
                *pipes.args, *worker_args]  # fmt: skip
        try:
            self.proc = spawn_worker(
                args, pass_fds=[theirs.fileno(), *pipes.pass_fds], cwd=self.dir, python=python
            )
        except BaseException:
            pipes.failed()
            ours.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        finally:
            theirs.close()
        pipes.spawned()
        self.sock = ours
        self.status_r = pipes.status_r
        assert pipes.lifeline_w is not None
        self.lifeline_w: int | None = pipes.lifeline_w

    def alive(self) -> bool:
        return self.proc.poll() is None

    def assign(self, msg: dict[str, Any], fds: Sequence[int], *, timeout: float) -> dict[str, Any]:
        """Send the assignment, wait for "taken", then for the ready line (its
        typed error if the start-up fails). :class:`StandbyGone` when the
        worker is gone before it took it: the caller spawns cold instead."""
        try:
            self.sock.settimeout(timeout)
            send_message(self.sock, msg, fds)
            if self.sock.recv(1) != b"T":
                raise ConnectionError("the pre-started worker closed its socket")
        except OSError as exc:
            self.discard()
            raise StandbyGone() from exc
        finally:
            self.sock.close()
        try:
            return read_ready_line(self.status_r, timeout=timeout, proc=self.proc)
        except BaseException:
            self.discard()
            raise
        finally:
            self._close_status()

    def _close_status(self) -> None:
        if self.status_r >= 0:
            os.close(self.status_r)
            self.status_r = -1

    def discard(self) -> None:
        """Stop it and remove its directory (it served nobody, or failed); in
        a forked child, only close the child's copies of our descriptors."""
        self.sock.close()
        self._close_status()
        if self.lifeline_w is not None:
            os.close(self.lifeline_w)  # EOF: it leaves by itself
            self.lifeline_w = None
        if os.getpid() != self._owner:
            return
        stop_process(self.proc, 5)
        shutil.rmtree(self.dir, ignore_errors=True)


class StandbyPool:
    """At most one waiting worker per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: Standby | None = None
        self._starting = False
        self._closed = False

    def take(self, key: Key) -> Standby | None:
        """The waiting worker if it fits ``key`` and lives; else None (and a
        worker that does not fit is stopped)."""
        with self._lock:
            w, self._waiting = self._waiting, None
        if w is None:
            return None
        if w.key == key and w.alive():
            return w
        threading.Thread(target=w.discard, daemon=True).start()
        return None

    def refill(self, key: Key, *, wait: bool = False) -> None:
        """Start a worker for ``key`` in the background, unless one waits or
        starts; ``wait``: spawn it in this thread (the first open, before the
        client's imports: ``vault.open``), its start-up still runs on its own."""
        if not enabled():
            return
        with self._lock:
            if self._closed or self._starting:
                return
            if self._waiting is not None and self._waiting.key == key and self._waiting.alive():
                return
            old, self._waiting = self._waiting, None
            self._starting = True
        if old is not None:
            threading.Thread(target=old.discard, daemon=True).start()

        def start() -> None:
            w: Standby | None = None
            try:
                w = Standby(python=key[0], worker_args=key[1])
            except (OSError, subprocess.SubprocessError):
                w = None  # the next open spawns cold, as before
            finally:
                with self._lock:
                    self._starting = False
                    if w is not None and not self._closed and self._waiting is None:
                        self._waiting, w = w, None
            if w is not None:  # closed meanwhile, or another one won
                w.discard()

        if wait:
            start()
        else:
            threading.Thread(target=start, name="vault-standby", daemon=True).start()

    def close(self) -> None:
        """Stop the waiting worker (at exit); later refills do nothing."""
        with self._lock:
            self._closed = True
            w, self._waiting = self._waiting, None
        if w is not None:
            w.discard()

    def after_fork(self) -> None:
        """In a forked child: the waiting worker is the parent's (the child
        closes only its copies of that worker's descriptors; the process and
        its directory are left alone), and a start under way was the
        parent's thread's."""
        self._lock = threading.Lock()
        w, self._waiting, self._starting = self._waiting, None, False
        if w is not None:
            w.sock.close()
            w._close_status()
            if w.lifeline_w is not None:
                os.close(w.lifeline_w)
                w.lifeline_w = None

    def waiting(self) -> Standby | None:
        """The worker waiting now, if any (for tests and benchmarks)."""
        with self._lock:
            return self._waiting


POOL = StandbyPool()
# here, not in the client library: vault.open starts a worker before it
# imports the client (vault._prestart), and a fork or an exit in between
# must find the pool's rules in place (a child stopping the parent's
# waiting worker removed its directory: the parent's next open failed)
os.register_at_fork(after_in_child=POOL.after_fork)
atexit.register(POOL.close)
