"""Entry point: ``python -m worker PACKAGE --endpoint ENDPOINT [--licence FILE]``.

Order matters: arguments are parsed and the process hardened with nothing but
the standard library loaded (no thread exists yet, so seccomp and Landlock
cover every thread created later); only then are numpy, onnxruntime and zmq
imported. The package is verified against the publisher key, its key released
by the key server (or, for tests only, read from an inherited pipe), the
pipeline decrypted in memory and loaded, the key and plaintext overwritten,
and the endpoint bound. Only then does one JSON line go to the parent on
``--status-fd`` (stdout by default): ``{"ready": true, ...}``, or
``{"ready": false, "error": {"code", "message"}}`` before exiting with 3.

Example::

    $ python -m worker model.vault --licence alice.licence \\
          --endpoint tcp://0.0.0.0:7701 --allow clients/
    {"ready": true, "endpoint": "tcp://0.0.0.0:7701", "server_key": "...", ...}
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from . import hardening

NO_HOME = "/proc/self/vault-no-home"  # procfs refuses mkdir, even for root: nothing can be created


TIERS = {
    0: "same user: the caller's own uid runs this worker and can extract the model",
    1: "local daemon: a dedicated uid, a root-owned install, a device key callers cannot read",
    2: "vendor-hosted: only inputs and outputs cross to callers",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker", description="vault isolated worker")
    p.add_argument("package", nargs="?", default=None, help="package file (or --package-fd)")
    p.add_argument("--package-fd", type=int, help="read the package from this inherited fd")
    p.add_argument("--endpoint", required=True, help="ipc://DIR/NAME or tcp://HOST:PORT to bind")
    p.add_argument("--licence", "--license", dest="licence", help="licence file")
    p.add_argument("--licence-fd", type=int, help="read the licence JSON from this inherited fd")
    p.add_argument("--publisher", help="publisher public key file (default: from the licence)")
    p.add_argument(
        "--device-key-fd", type=int, help="the device's key pair (JSON) on this inherited fd"
    )
    p.add_argument(
        "--proof-fd", type=int, help="the caller's licence proof (JSON) on this inherited fd"
    )
    p.add_argument(
        "--allow-key",
        action="append",
        default=None,
        metavar="Z85",
        help="accept only this client CURVE key (ipc:// too); repeatable",
    )
    p.add_argument(
        "--tier",
        type=int,
        choices=(0, 1, 2),
        default=0,
        help="protection tier the launcher provides (reported by health)",
    )
    p.add_argument(
        "--unsafe-test-key-fd",
        type=int,
        help="UNSAFE, tests and air-gapped use only: read the raw package key from this fd "
        "instead of asking the key server (no licence check, no lease, no audit)",
    )
    p.add_argument("--status-fd", type=int, default=1, help="where the ready/error line goes")
    p.add_argument("--lifeline-fd", type=int, help="exit when this inherited pipe reaches EOF")
    p.add_argument("--exit-when-lease-ends", action="store_true",
                   help="exit (status 75) once the key lease ends, for a supervisor to start a "
                   "worker that asks for a new one (the service's workers)")  # fmt: skip
    p.add_argument("--providers", help="comma-separated onnxruntime providers")
    p.add_argument("--device", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=max(2, min(8, os.cpu_count() or 2)))
    p.add_argument(
        "--intra-op-threads", type=int, help="onnxruntime threads per compute (default: all cores)"
    )
    p.add_argument(
        "--spin-us",
        type=int,
        help="the local channel: how long a connection's thread polls for its caller's "
        "next request before it sleeps, when no other call is being served "
        "(default: worker.server.DEFAULT_SPIN_US, 200; 0: never)",
    )
    p.add_argument(
        "--inline-max-ms",
        type=float,
        default=50.0,
        help="the ZeroMQ front: calls estimated under this long run on its own thread (no "
        "thread hop) while one caller has the worker to itself; 0: only calls under 2 ms "
        "do (docs/worker.md)",
    )
    p.add_argument(
        "--no-prepack",
        action="store_true",
        help="no prepacked weight copies: the decrypted weights are the only copy "
        "(lower peak memory; MatMul/Conv run slower)",
    )
    p.add_argument(
        "--eager-weights",
        action="store_true",
        help="decrypt every weight before the sessions are built and keep it "
        "(default: weights are decrypted as onnxruntime reads them, and those it "
        "packs are given back after the build)",
    )
    p.add_argument("--allow", help="directory of client CURVE public keys (tcp:// only)")
    p.add_argument(
        "--server-secret", help="zmq certificate file with the worker's CURVE secret key"
    )
    p.add_argument("--max-message", type=int, default=1 << 30)
    p.add_argument("--shm-fd", type=int, help="inherited memfd shared with a local caller")
    p.add_argument(
        "--listen-fd",
        type=int,
        help="the local caller's listening Unix socket (inherited): serve the direct "
        "local channel on the connections it accepts (vault/core/localwire.py)",
    )
    p.add_argument(
        "--listen-token-fd",
        type=int,
        help="the 32-byte token each --listen-fd connection must send first (on this pipe)",
    )
    p.add_argument("--shm-size", type=int, default=0, help="size of the --shm-fd arena")
    p.add_argument("--suite", default="x25519", help="HPKE suite for key release")
    p.add_argument("--user", help="drop to this user when started as root")
    p.add_argument(
        "--home", default=NO_HOME, help="HOME for the worker (default: one that cannot exist)"
    )
    p.add_argument(
        "--standby-fd",
        type=int,
        help="a pre-started worker: harden, import onnxruntime, then wait on this inherited "
        "Unix socket for its package, licence and caller (the local daemon's assignment)",
    )
    p.add_argument(
        "--memory-limit",
        type=int,
        default=None,
        metavar="BYTES",
        help="RLIMIT_DATA for this worker, set before anything else (default: from the "
        "package's declared plaintext size, vault.core.package.memory_limit)",
    )
    p.add_argument("--no-mlock", action="store_true")
    p.add_argument("--no-landlock", action="store_true")
    p.add_argument("--no-seccomp", action="store_true")
    args = p.parse_args(argv)
    if not 0 <= args.inline_max_ms <= 60_000:
        p.error("--inline-max-ms must be 0 to 60000")
    if args.standby_fd is not None:
        if args.package is not None or args.package_fd is not None:
            p.error("a --standby-fd worker gets its package from the assignment")
    elif (args.package is None) == (args.package_fd is None):
        p.error("give exactly one of PACKAGE and --package-fd")
    return args


class _Parent:
    """The one-line report to whoever started us."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg, sort_keys=True) + "\n").encode()
        try:
            os.write(self.fd, data)
            if self.fd > 2:
                os.close(self.fd)
        except OSError:
            pass


def _wants_cuda(args: argparse.Namespace) -> bool:
    device = (args.device or "").lower()
    return device.startswith("cuda") or device == "gpu" or "CUDA" in (args.providers or "")


def _endpoint_dir(endpoint: str) -> str | None:
    if endpoint.startswith("ipc://"):
        return os.path.dirname(endpoint[len("ipc://") :]) or "."
    return None


def _start(args: argparse.Namespace, report: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Everything after hardening, as named steps; returns the running server
    and the ready message. The steps and their order are in :mod:`worker.startup`."""
    from .startup import Startup

    return Startup(args, report).run()


# What an assignment may set: the package, the caller and its licence. The
# hardening is done by then and nothing in an assignment can change it.
_ASSIGNABLE_FDS = (
    "package_fd", "licence_fd", "proof_fd", "shm_fd", "listen_fd", "listen_token_fd",
)  # fmt: skip
_ASSIGNABLE = {*_ASSIGNABLE_FDS, "shm_size", "allow_key", "providers", "no_prepack",
               "memory_limit"}  # fmt: skip


def _preload() -> None:
    """Everything a start-up imports, before the assignment: what is left to an
    open is verify, key release, decrypt and the session build."""
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401
    import zmq  # noqa: F401

    from vault.core import device, keyclient, lazyplain, licence, package, shm  # noqa: F401

    from . import lease, ops, runtime, server, startup  # noqa: F401

    if lazyplain.supported():  # the weights' decrypting buffers, paged in while we wait
        lazyplain.keep_buffers()


def _await_assignment(args: argparse.Namespace, wake_fd: int) -> bool:
    """A pre-started worker's wait: imports first, then one message on the
    standby socket, ``{"op": "assign", ...}`` with its descriptors
    (``package_fd``, ``licence_fd``, ``proof_fd``, ``shm_fd`` name indexes
    into them). False when told to stop (signal, lifeline) before one came."""
    import select
    import socket

    from vault.core.daemonwire import recv_message
    from vault.core.errors import ProtocolError

    _preload()
    sock = socket.socket(fileno=args.standby_fd)
    try:
        while True:
            ready, _, _ = select.select([sock.fileno(), wake_fd], [], [])
            if sock.fileno() in ready:
                break
            if wake_fd in ready:
                return False
        try:
            msg, fds = recv_message(sock)
            sock.sendall(b"T")  # taken: from here a failure is this assignment's
        except (ConnectionError, OSError):
            return False  # the daemon went away before assigning us
    finally:
        sock.close()
    extra = set(msg) - _ASSIGNABLE - {"op"}
    if msg.get("op") != "assign" or extra:
        for fd in fds:
            os.close(fd)
        raise ProtocolError(f"not an assignment: {sorted(extra) or msg.get('op')!r}")
    for name in _ASSIGNABLE_FDS:
        index = msg.pop(name, None)
        if index is not None:
            setattr(args, name, fds[index])
    for name in ("shm_size", "allow_key", "providers", "no_prepack", "memory_limit"):
        if name in msg:
            setattr(args, name, msg[name])
    if args.memory_limit is not None:
        hardening.limit_memory(args.memory_limit)  # before the package is read
    if args.package_fd is None:
        raise ProtocolError("an assignment without a package")
    return True


def _wake_only(signum: int, frame: Any) -> None:
    """The Python-level handler: the wakeup fd already carries the signal."""
    del signum, frame


def _wait_readable(fd: int) -> None:
    """Block until ``fd`` has a byte (a signal or the lifeline), retrying on EINTR."""
    import select

    while True:
        r, _, _ = select.select([fd], [], [])
        if r:
            return


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parent = _Parent(args.status_fd)
    if args.memory_limit is not None:
        hardening.limit_memory(args.memory_limit)
    try:
        rep = hardening.harden(
            home=args.home,
            endpoint_dir=_endpoint_dir(args.endpoint),
            user=args.user,
            mlock=not args.no_mlock,
            landlock=not args.no_landlock,
            # CUDA needs driver files under /dev, /proc and /sys: reads stay open there
            reads=None
            if _wants_cuda(args)
            else hardening.startup_reads(
                [args.package, args.licence, args.publisher, args.allow, args.server_secret]
            ),
            seccomp=not args.no_seccomp,
        ).as_dict()
        rep["tier"] = {"status": str(args.tier), "detail": TIERS[args.tier]}
        if args.tier == 1 and os.getuid() != 0 and rep["user"]["status"] == "off":
            # the daemon set our uid before exec: we never ran as the caller
            rep["user"] = {"status": "on", "detail": f"uid {os.getuid()} from the first "
                           "instruction (set by the daemon before exec)"}  # fmt: skip
    except OSError as exc:
        parent.send(
            {"ready": False, "error": {"code": "config", "message": f"hardening failed: {exc}"}}
        )
        return 3

    # A signal handler only wakes the main loop: the C-level handler writes the
    # signal number to this pipe (signal.set_wakeup_fd) and the Python-level
    # one does nothing. Taking a lock in a handler (threading.Event.set) can
    # deadlock against the main thread holding it, which is how a SIGTERM used
    # to hang about one stop in five.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, _wake_only)
    signal.signal(signal.SIGINT, _wake_only)
    if args.lifeline_fd is not None:
        fd = args.lifeline_fd

        def watch() -> None:
            try:
                while os.read(fd, 64):
                    pass
            except OSError:
                pass
            try:  # the parent is gone: nobody will ever call us again
                os.write(wake_w, b"L")
            except OSError:
                pass

        threading.Thread(target=watch, name="vault-lifeline", daemon=True).start()

    from vault.core.errors import VaultError

    # From here a signal or the lifeline's EOF is watched by a thread: during
    # start-up it ends the process at once (the daemon's start timeout, a
    # caller gone: a start-up that hashes or decrypts for long must not make
    # them wait, nor ignore SIGTERM); once serving, it starts a clean stop.
    lock = threading.Lock()
    serving = [False]
    stop = threading.Event()

    def on_wake() -> None:
        _wait_readable(wake_r)
        with lock:
            if not serving[0]:
                os._exit(128 + signal.SIGTERM)
        stop.set()

    try:
        if args.standby_fd is not None and not _await_assignment(args, wake_r):
            os._exit(0)
        threading.Thread(target=on_wake, name="vault-stop", daemon=True).start()
        (server, keeper, ctx), ready = _start(args, rep)
        if args.standby_fd is not None:
            ready["standby"] = True  # hardened and imported before its package came
    except VaultError as exc:
        parent.send({"ready": False, "error": exc.to_wire()})
        return 3
    except Exception as exc:  # a bug or an OS failure: the class only, never data
        parent.send(
            {
                "ready": False,
                "error": {
                    "code": "worker",
                    "message": f"worker failed to start ({type(exc).__name__})",
                },
            }
        )
        print(f"vault-worker: startup failed: {type(exc).__name__}", file=sys.stderr)
        return 3
    with lock:
        serving[0] = True
    parent.send(ready)
    stop.wait()
    keeper.stop()
    # the proxy closes the front socket (an ipc:// socket file goes with it);
    # bounded, because nothing here is worth a slow exit
    t = threading.Thread(target=server.stop, daemon=True)
    t.start()
    t.join(0.5)
    keeper.drop_sessions()  # the plaintext weights are wiped unless a call is still running
    # Handler threads may sit inside onnxruntime; tearing the zmq context down
    # under them is unsafe, and there is nothing to flush: leave at once.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
