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
import time
from typing import Any

from . import hardening

NO_HOME = "/proc/self/vault-no-home"  # procfs refuses mkdir, even for root: nothing can be created


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker", description="vault isolated worker")
    p.add_argument("package")
    p.add_argument("--endpoint", required=True, help="ipc://DIR/NAME or tcp://HOST:PORT to bind")
    p.add_argument("--licence", "--license", dest="licence", help="licence file")
    p.add_argument("--licence-fd", type=int, help="read the licence JSON from this inherited fd")
    p.add_argument("--publisher", help="publisher public key file (default: from the licence)")
    p.add_argument(
        "--unsafe-test-key-fd",
        type=int,
        help="UNSAFE, tests and air-gapped use only: read the raw package key from this fd "
        "instead of asking the key server (no licence check, no lease, no audit)",
    )
    p.add_argument("--status-fd", type=int, default=1, help="where the ready/error line goes")
    p.add_argument("--lifeline-fd", type=int, help="exit when this inherited pipe reaches EOF")
    p.add_argument("--providers", help="comma-separated onnxruntime providers")
    p.add_argument("--device", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=max(2, min(8, os.cpu_count() or 2)))
    p.add_argument(
        "--intra-op-threads", type=int, help="onnxruntime threads per compute (default: all cores)"
    )
    p.add_argument("--allow", help="directory of client CURVE public keys (tcp:// only)")
    p.add_argument(
        "--server-secret", help="zmq certificate file with the worker's CURVE secret key"
    )
    p.add_argument("--max-message", type=int, default=1 << 30)
    p.add_argument("--shm-fd", type=int, help="inherited memfd shared with a local caller")
    p.add_argument("--shm-size", type=int, default=0, help="size of the --shm-fd arena")
    p.add_argument("--suite", default="x25519", help="HPKE suite for key release")
    p.add_argument("--user", help="drop to this user when started as root")
    p.add_argument(
        "--home", default=NO_HOME, help="HOME for the worker (default: one that cannot exist)"
    )
    p.add_argument("--no-mlock", action="store_true")
    p.add_argument("--no-landlock", action="store_true")
    p.add_argument("--no-seccomp", action="store_true")
    return p.parse_args(argv)


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


def _read_fd(fd: int, limit: int) -> bytearray:
    buf = bytearray()
    while len(buf) < limit:
        chunk = os.read(fd, limit - len(buf))
        if not chunk:
            break
        buf += chunk
    os.close(fd)
    return buf


def _start(args: argparse.Namespace, report: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Everything after hardening; returns the running server and the ready message."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def mark(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[name] = round((now - t0) * 1e3, 2)
        t0 = now

    # onnxruntime is the slowest import (~75 ms with numpy); load it in a
    # thread while this one verifies the signature (hashing drops the GIL),
    # waits for the key server and decrypts. Hardening is already in place,
    # so the thread inherits seccomp, Landlock and no_new_privs.
    runtime_ready = threading.Event()
    runtime_failed: list[BaseException] = []

    def import_runtime() -> None:
        try:
            import onnxruntime  # noqa: F401

            from . import runtime  # noqa: F401
        except BaseException as exc:  # re-raised in the main thread below
            runtime_failed.append(exc)
        finally:
            runtime_ready.set()

    threading.Thread(target=import_runtime, name="vault-import", daemon=True).start()

    import zmq

    from vault.core import crypto as _crypto
    from vault.core.errors import ConfigError
    from vault.core.licence import Licence
    from vault.core.package import Package

    from .lease import LeaseKeeper
    from .server import Server, load_allowed_keys

    mark("imports")

    lic: Licence | None = None
    if args.licence_fd is not None:
        lic = Licence.from_json(json.loads(bytes(_read_fd(args.licence_fd, 1 << 20))), source="fd")
    elif args.licence:
        lic = Licence.load(args.licence)
    if args.publisher:
        with open(args.publisher, "rb") as fh:
            publisher = _crypto.load_public_key(fh.read())
    elif lic is not None and lic.publisher_key:
        publisher = _crypto.load_public_key(lic.publisher_key)
    else:
        raise ConfigError("no publisher key: give a licence that names one, or --publisher")

    pkg = Package.load(args.package)
    pkg.verify(publisher)  # before any key is asked for
    mark("verify")

    lease: Any = None
    if args.unsafe_test_key_fd is not None:
        key = _read_fd(args.unsafe_test_key_fd, _crypto.KEY_SIZE)
    else:
        if lic is None:
            raise ConfigError("a licence is needed to ask the key server for the package key")
        from vault.core.keyclient import KeyServerClient

        with KeyServerClient(lic) as ks:
            rel = ks.release(
                model_id=pkg.model_id,
                key_id=pkg.key_id,
                package_digest=pkg.digest,
                suite=args.suite,
            )
        key, lease = rel.key, rel.lease
    mark("key_release")
    try:
        plain = pkg.decrypt(key)
    finally:
        _crypto.zeroize(key)
    pkg.drop_resident_pages()
    mark("decrypt")
    runtime_ready.wait()
    if runtime_failed:
        raise runtime_failed[0]
    from .ops import Service
    from .runtime import Pipeline

    mark("import_wait")
    try:
        pipeline = Pipeline(
            plain.graphs,
            plain.files,
            inputs=pkg.inputs,
            outputs=pkg.outputs,
            providers=args.providers.split(",") if args.providers else None,
            device=args.device,
            options={"intra_op_num_threads": args.intra_op_threads}
            if args.intra_op_threads
            else None,
        )
    finally:
        plain.release()  # overwrite the only plaintext copy: the sessions hold the weights now
    mark("session")

    def renew(lease_id: str, calls: int) -> Any:
        from vault.core.keyclient import KeyServerClient

        assert lic is not None
        with KeyServerClient(lic) as ks:
            return ks.renew(lease_id=lease_id, calls=calls)

    keeper = LeaseKeeper(
        lease,
        renew=renew if lease is not None else None,
        on_end=pipeline.close,
        unsafe_no_lease=args.unsafe_test_key_fd is not None,
    )
    info = {
        "model_id": pkg.model_id,
        "digest": pkg.digest,
        "inputs": pipeline.inputs,
        "outputs": pipeline.outputs,
    }
    pkg.close()
    shm = None
    if args.shm_fd is not None and args.shm_size > 0:
        from vault.core.shm import map_arena

        shm = map_arena(args.shm_fd, args.shm_size)
        os.close(args.shm_fd)  # the mapping keeps the memory; the fd is no longer needed
    service = Service(
        pipeline, keeper, info=info, hardening=report, max_request=args.max_message, shm=shm,
        remote=args.endpoint.startswith("tcp://"),
    )  # fmt: skip

    ctx: zmq.Context[Any] = zmq.Context(io_threads=1)
    server_public: bytes | None = None
    server_secret: bytes | None = None
    allowed = None
    if args.endpoint.startswith("tcp://"):
        if not args.allow:
            raise ConfigError(
                "a tcp:// worker needs --allow CLIENTS_DIR (client CURVE public keys)"
            )
        allowed = load_allowed_keys(args.allow)
        if args.server_secret:
            import zmq.auth

            server_public, server_secret = zmq.auth.load_certificate(args.server_secret)
            if not server_secret:
                raise ConfigError(f"{args.server_secret}: holds no secret key")
        else:
            server_public, server_secret = zmq.curve_keypair()
    server = Server(
        ctx,
        args.endpoint,
        handler=service.handle,
        threads=args.threads,
        max_message=args.max_message,
        curve_secret=server_secret,
        curve_public=server_public,
        allowed=allowed,
    )
    bound = server.bind()
    server.start()
    keeper.start()
    ready = {
        "ready": True,
        "pid": os.getpid(),
        "endpoint": bound,
        "server_key": server_public.decode() if server_public else None,
        "provider": pipeline.provider,
        "model_id": pkg.model_id,
        "allowed_clients": len(allowed) if allowed is not None else None,
        "timings_ms": timings,
    }
    return (server, keeper, ctx), ready


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parent = _Parent(args.status_fd)
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
    except OSError as exc:
        parent.send(
            {"ready": False, "error": {"code": "config", "message": f"hardening failed: {exc}"}}
        )
        return 3

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.lifeline_fd is not None:
        fd = args.lifeline_fd

        def watch() -> None:
            try:
                while os.read(fd, 64):
                    pass
            except OSError:
                pass
            stop.set()  # the parent is gone: nobody will ever call us again

        threading.Thread(target=watch, name="vault-lifeline", daemon=True).start()

    from vault.core.errors import VaultError

    try:
        (server, keeper, ctx), ready = _start(args, rep)
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
    parent.send(ready)
    while not stop.wait(0.5):
        pass
    keeper.stop()
    # the proxy closes the front socket (an ipc:// socket file goes with it);
    # bounded, because nothing here is worth a slow exit
    t = threading.Thread(target=server.stop, daemon=True)
    t.start()
    t.join(0.5)
    # Handler threads may sit inside onnxruntime; tearing the zmq context down
    # under them is unsafe, and there is nothing to flush: leave at once.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
