"""The worker's start-up after hardening, as named steps in their order.

:meth:`Startup.run` runs them and times each (``timings_ms`` in the ready
line, ``Model.startup_ms`` on the caller's side):

1. ``imports``      numpy, zmq and the foundation; onnxruntime is imported in a
                    thread meanwhile (the slowest import, ~75 ms)
2. ``verify``       the licence (from an inherited fd or a file), the
                    publisher key, the package's header (every size it claims
                    checked against the file; the worker's memory limit set
                    from them), the package's signature: before any key is
                    asked for
3. ``key_release``  the package key from the key server (HPKE-sealed to a
                    fresh ephemeral key), or, for tests only, from a pipe
4. ``decrypt``      one pass into one buffer, the key overwritten at once; or,
                    with lazy weights (``vault.core.lazyplain``), the index
                    and graphs only, the weights decrypted as onnxruntime
                    reads them (timed as ``weights_decrypt``) with the key
                    kept until the sessions end
5. ``import_wait``  the onnxruntime import started in step 1
6. ``session``      onnxruntime sessions from bytes, using the weights in
                    the plaintext buffer in place (no copy); the pipeline
                    owns the buffer and overwrites it when the sessions end
7. the lease keeper, the request service, the bound endpoint, the ready line

Beside the steps, ``cpu_user`` and ``cpu_sys``: the CPU the whole process
(every thread) spent over steps 1-6. On a VM a fresh process's first touch
of memory shows up as ``cpu_sys`` (the kernel zeroing new pages): it is
what separates an open from the same load in a process that has memory at
hand (docs/benchmarks.md, cold start).

Hardening is already in place when this runs (the import thread inherits
seccomp, Landlock and no_new_privs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from typing import Any

__all__ = ["Startup", "read_fd"]


def _wants_cuda(args: argparse.Namespace) -> bool:
    device = (getattr(args, "device", None) or "").lower()
    providers = getattr(args, "providers", None) or ""
    return device.startswith("cuda") or device == "gpu" or "CUDA" in providers


def read_fd(fd: int, limit: int) -> bytearray:
    """Read an inherited pipe to EOF (at most ``limit`` bytes) and close it."""
    buf = bytearray()
    while len(buf) < limit:
        chunk = os.read(fd, limit - len(buf))
        if not chunk:
            break
        buf += chunk
    os.close(fd)
    return buf


class Startup:
    """One worker's start-up; each step is a method, called in order by :meth:`run`."""

    def __init__(self, args: argparse.Namespace, report: dict[str, Any]) -> None:
        self.args = args
        self.report = report
        self.timings: dict[str, float] = {}
        self._t0 = time.perf_counter()
        self._ru0 = resource.getrusage(resource.RUSAGE_SELF)
        self._runtime_ready = threading.Event()
        self._runtime_failed: list[BaseException] = []
        self.licence: Any = None
        self.publisher: bytes = b""
        self.package: Any = None
        self.key: Any = None
        self.lease: Any = None
        self.plain: Any = None
        self.pipeline: Any = None
        self.device: Any = None

    def _mark(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round((now - self._t0) * 1e3, 2)
        self._t0 = now

    def run(self) -> tuple[Any, dict[str, Any]]:
        self.start_runtime_import()
        self._mark("imports")
        self.verify()
        self._mark("verify")
        self.release_key()
        self._mark("key_release")
        self.decrypt()
        self._mark("decrypt")
        self.wait_runtime()
        self._mark("import_wait")
        self.build_sessions()
        self._mark("session")
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.timings["cpu_user"] = round((ru.ru_utime - self._ru0.ru_utime) * 1e3, 2)
        self.timings["cpu_sys"] = round((ru.ru_stime - self._ru0.ru_stime) * 1e3, 2)
        return self.serve()

    # -- steps ------------------------------------------------------------------

    def start_runtime_import(self) -> None:
        def import_runtime() -> None:
            try:
                import onnxruntime  # noqa: F401

                from . import runtime  # noqa: F401
            except BaseException as exc:  # re-raised in the main thread by wait_runtime
                self._runtime_failed.append(exc)
            finally:
                self._runtime_ready.set()

        threading.Thread(target=import_runtime, name="vault-import", daemon=True).start()
        import zmq  # noqa: F401

        from vault.core import package  # noqa: F401

    def verify(self) -> None:
        from vault.core import crypto
        from vault.core.errors import ConfigError
        from vault.core.licence import Licence
        from vault.core.package import Package

        args = self.args
        if args.licence_fd is not None:
            raw = bytes(read_fd(args.licence_fd, 1 << 20))
            self.licence = Licence.from_json(json.loads(raw), source="fd")
        elif args.licence:
            self.licence = Licence.load(args.licence)
        if args.publisher:
            from vault.core.files import read_regular

            self.publisher = crypto.load_public_key(
                read_regular(args.publisher, limit=64 << 10, what="publisher key")
            )
        elif self.licence is not None and self.licence.publisher_key:
            self.publisher = crypto.load_public_key(self.licence.publisher_key)
        else:
            raise ConfigError("no publisher key: give a licence that names one, or --publisher")
        if args.package_fd is not None:
            self.package = Package.from_fd(args.package_fd)
        else:
            self.package = Package.load(args.package)
        self.limit_memory()
        self.package.verify(self.publisher)  # before any key is asked for

    def limit_memory(self) -> None:
        """``RLIMIT_DATA`` from the package's declared plaintext size (see
        ``vault.core.package.memory_limit``), lowered only, before the payload
        is hashed or decrypted: a package whose claims would take more gets a
        MemoryError (a failed start), not the machine's memory. A worker given
        ``--memory-limit`` (the local daemon's, on its command line or in its
        assignment) set that one first thing. Not for CUDA, whose driver maps
        device memory into the process."""
        from vault.core.package import memory_limit

        from .hardening import limit_memory

        if self.args.memory_limit is not None or _wants_cuda(self.args):
            return
        limit_memory(memory_limit(int(self.package.manifest["payload"]["plaintext_size"])))

    def release_key(self) -> None:
        from vault.core import crypto
        from vault.core.errors import ConfigError

        args, pkg = self.args, self.package
        if args.unsafe_test_key_fd is not None:
            self.key = read_fd(args.unsafe_test_key_fd, crypto.KEY_SIZE)
            return
        if self.licence is None:
            raise ConfigError("a licence is needed to ask the key server for the package key")
        from vault.core.device import Device
        from vault.core.keyclient import KeyServerClient
        from vault.core.licence import LicenceProof

        # As a device (tier 1, 2): the device's key at the transport, the
        # caller's proof passed through. Without one (tier 0) the licence
        # itself connects and signs: only a same-user licence is answered.
        proof = None
        if args.device_key_fd is not None:
            self.device = Device.loads(bytes(read_fd(args.device_key_fd, 1 << 16)), source="fd")
        if args.proof_fd is not None:
            proof = LicenceProof.from_wire(json.loads(bytes(read_fd(args.proof_fd, 1 << 16))))
        # the one caller this worker answers: the caller's proof names its key
        allow = list(args.allow_key or ())
        if proof is not None and len(allow) != 1:
            raise ConfigError("a caller's proof binds exactly one --allow-key")
        with KeyServerClient(self.licence, device=self.device) as ks:
            rel = ks.release(
                model_id=pkg.model_id,
                key_id=pkg.key_id,
                package_digest=pkg.digest,
                suite=args.suite,
                proof=proof,
                client_key=allow[0] if allow else "",
            )
        self.key, self.lease = rel.key, rel.lease

    def decrypt(self) -> None:
        from vault.core import crypto

        # lazy weights (vault.core.lazyplain): what onnxruntime packs is given
        # back after the build. Not for CUDA, whose copies to the device have
        # not been tried behind a fault handler.
        lazy = not (self.args.eager_weights or _wants_cuda(self.args))
        try:
            self.plain = self.package.decrypt(self.key, lazy=lazy)
        finally:
            crypto.zeroize(self.key)
            self.key = None
        self.package.drop_resident_pages()

    def wait_runtime(self) -> None:
        self._runtime_ready.wait()
        if self._runtime_failed:
            raise self._runtime_failed[0]

    def build_sessions(self) -> None:
        from .runtime import Pipeline

        args, pkg = self.args, self.package
        plain, self.plain = self.plain, None
        try:
            self.pipeline = Pipeline(
                plain.graphs,
                plain.files,
                inputs=pkg.inputs,
                outputs=pkg.outputs,
                providers=args.providers.split(",") if args.providers else None,
                device=args.device,
                options={
                    **(
                        {"intra_op_num_threads": args.intra_op_threads}
                        if args.intra_op_threads
                        else {}
                    ),
                    **({"prepack": 0} if args.no_prepack else {}),
                }
                or None,  # fmt: skip
                owner=plain,  # the only copy of the weights: wiped when the sessions end
            )
        except BaseException:
            plain.release()
            raise
        plain.wipe_graphs()  # parsed into the sessions: only the weights stay
        settle = getattr(plain, "settle", None)
        if settle is not None:  # lazy weights: give back what the build packed
            try:
                settle()
            except BaseException:
                self.pipeline.close()
                raise
            # the weights' decryption ran inside the build (on faults) and in
            # settle: timed apart, so "session" stays onnxruntime's own
            self.timings["weights_decrypt"] = plain.stats()["decrypt_ms"]
        from vault.core.lazyplain import forget_buffers

        forget_buffers()  # what a pre-started worker made ahead and no thread took
        from .hardening import lift_memory_limit

        lift_memory_limit()  # the start-up limit bounded the package's claims; see there

    def _renew(self, lease_id: str, calls: int, report_id: str | None = None) -> Any:
        from vault.core.keyclient import KeyServerClient

        assert self.licence is not None
        with KeyServerClient(self.licence, device=self.device) as ks:
            return ks.renew(lease_id=lease_id, calls=calls, report_id=report_id)

    def _close_lease(self, lease_id: str, calls: int, report_id: str | None = None) -> Any:
        from vault.core.keyclient import KeyServerClient

        assert self.licence is not None
        with KeyServerClient(self.licence, device=self.device, timeout=2.0) as ks:  # no lingering
            return ks.close_lease(lease_id=lease_id, calls=calls, report_id=report_id)

    def serve(self) -> tuple[Any, dict[str, Any]]:
        """Lease keeper, request service, bound endpoint; returns the ready line."""
        import zmq

        from vault.core.errors import ConfigError

        from .lease import LeaseKeeper
        from .ops import Service
        from .server import Server, load_allowed_keys

        args, pkg, pipeline = self.args, self.package, self.pipeline
        keeper = LeaseKeeper(
            self.lease,
            renew=self._renew if self.lease is not None else None,
            on_end=pipeline.close,
            unsafe_no_lease=args.unsafe_test_key_fd is not None,
            close=self._close_lease if self.lease is not None else None,
            report_ids=True,  # a report whose answer was lost is sent again, counted once
            on_ended=_exit_soon if args.exit_when_lease_ends else None,
        )
        info = {
            "model_id": pkg.model_id,
            "digest": pkg.digest,
            "inputs": pipeline.inputs,
            "outputs": pipeline.outputs,
            # the publisher's signed declaration (vault seal --batchable): the
            # only thing that lets a service join calls of different callers
            "batchable": pkg.batchable,
        }
        pkg.close()
        shm = None
        if args.shm_fd is not None and args.shm_size > 0:
            from vault.core.shm import map_arena

            shm = map_arena(args.shm_fd, args.shm_size)
            os.close(args.shm_fd)  # the mapping keeps the memory; the fd is no longer needed
        service = Service(
            pipeline,
            keeper,
            info=info,
            hardening=self.report,
            max_request=args.max_message,
            shm=shm,
            remote=args.endpoint.startswith("tcp://"),  # remote health: liveness and tier
        )
        ctx: zmq.Context[Any] = zmq.Context(io_threads=1)
        server_public: bytes | None = None
        server_secret: bytes | None = None
        allowed = None
        if args.allow_key:
            # A daemon's worker: CURVE on its ipc:// socket too, and only the
            # key of the caller that opened it (the socket file is reachable
            # by the caller's uid; the key keeps every other caller out).
            allowed = {k.encode() for k in args.allow_key}
            server_public, server_secret = zmq.curve_keypair()
        elif args.endpoint.startswith("tcp://"):
            if not args.allow:
                raise ConfigError(
                    "a tcp:// worker needs --allow CLIENTS_DIR (client CURVE public keys)"
                )
            allowed = load_allowed_keys(args.allow)
            if args.server_secret:
                from vault.core.curvekeys import load_secret_certificate

                server_public, server_secret = load_secret_certificate(args.server_secret)
            else:
                server_public, server_secret = zmq.curve_keypair()
        local = None
        if args.listen_fd is not None:
            from vault.core.localwire import TOKEN_BYTES, check_listener

            from .server import LocalServer

            if args.listen_token_fd is None:
                raise ConfigError("--listen-fd needs --listen-token-fd")
            token = bytes(read_fd(args.listen_token_fd, TOKEN_BYTES))
            local = LocalServer(check_listener(args.listen_fd), token=token,
                                handler=service.handle_own, max_message=args.max_message,
                                spin_us=args.spin_us)  # fmt: skip
        server = Server(
            ctx,
            args.endpoint,
            handler=service.handle,
            threads=args.threads,
            max_message=args.max_message,
            inline_alone_below=args.inline_max_ms / 1e3,
            ran=service.ran,
            curve_secret=server_secret,
            curve_public=server_public,
            allowed=allowed,
            local=local,
            log=_stderr_log,
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
            "local": local is not None,  # the direct local channel is served
            "sealed_port": server.bulk_port,  # remote callers' sealed calls (None: none)
            "timings_ms": self.timings,
            "weights": pipeline.weights(),  # lazy weights: what the build gave back
        }
        return (server, keeper, ctx), ready


EXIT_LEASE_ENDED = 75  # the worker's status when --exit-when-lease-ends took it down


def _exit_soon(err: Any) -> None:
    """``--exit-when-lease-ends`` (a service's workers): the key is dropped
    already; leave a moment for the refusals in flight to go out, then exit,
    so the supervisor starts a worker that asks for a new lease (a key server
    back after an outage longer than the lease: the old worker would refuse
    every call for good)."""
    import threading

    del err
    threading.Timer(0.5, os._exit, (EXIT_LEASE_ENDED,)).start()


def _stderr_log(event: str, **fields: Any) -> None:
    """A worker's own events (its TCP ports' bounds: vault/core/peercap.py),
    one JSON line on stderr."""
    print(json.dumps({"event": event, "component": "vault-worker", **fields}, default=str),
          file=sys.stderr, flush=True)  # fmt: skip
