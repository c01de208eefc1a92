"""``vault run``, ``vault worker ...`` and ``vault demo``.

Example::

    $ vault run model.vault --licence alice.licence --input image=img.npy --output-dir out/
    $ vault worker client-key alice.licence -o clients/alice.key      # on the caller's side
    $ vault worker serve model.vault --licence server.licence \\
          --bind tcp://0.0.0.0:7701 --allow clients/ --server-key-out worker.pub
    $ vault demo

How the two ends of a remote worker learn each other's keys (CURVE):

- the **client's** public key is the ``client.public_key`` of its licence;
  ``vault worker client-key NAME.licence -o CLIENTS_DIR/NAME.key`` writes it
  (one Z85 line, no secret), and the operator drops that file into the
  worker's ``--allow`` directory. A zmq certificate file works too.
- the **worker's** public key is printed when it starts (``server key: ...``)
  and written to ``--server-key-out``; hand that file to clients, who pass it
  as ``vault.connect(..., server_key="worker.pub")``. Without
  ``--server-secret`` the key is fresh at each start; for a stable key make
  one with ``vault worker keygen DIR`` and pass ``--server-secret
  DIR/worker.key_secret``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from ..core.errors import ConfigError, VaultError

__all__ = ["register"]


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="compute once with a sealed model (spawns a local worker)")
    p.add_argument("package")
    p.add_argument("--licence", "--license", dest="licence", required=True)
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=FILE.npy")
    p.add_argument(
        "--output", action="append", default=None, metavar="NAME", help="only these outputs"
    )
    p.add_argument("--output-dir", default=".", help="where NAME.npy files go (default: .)")
    p.add_argument("--no-save", action="store_true", help="print only, write no .npy")
    p.add_argument("--device", default=None)
    p.add_argument("--daemon", default=None, metavar="SOCKET",
                   help="the local daemon's socket (default: $VAULT_DAEMON, "
                        "/run/vault/daemon.sock)")  # fmt: skip
    p.set_defaults(func=_run)

    w = sub.add_parser("worker", help="the isolated worker as a network service")
    wsub = w.add_subparsers(dest="worker_command", metavar="COMMAND", required=True)
    s = wsub.add_parser(
        "serve", help="serve sealed models over tcp:// with CURVE (a supervised worker service)"
    )
    s.add_argument("packages", nargs="*", metavar="PKG", help="*.vault packages to serve")
    s.add_argument("--repository", metavar="DIR",
                   help="serve every *.vault in DIR; rescanned on SIGHUP and --poll-interval")  # fmt: skip
    s.add_argument("--poll-interval", type=float, default=None, metavar="S")
    s.add_argument("--licence", "--license", dest="licence", required=True, action="append",
                   help="the service's own licence (repeat: one per model); its workers ask "
                        "the key server for package keys with it")  # fmt: skip
    s.add_argument("--bind", default="tcp://127.0.0.1:7701")
    s.add_argument("--allow", metavar="CLIENTS_DIR",
                   help="directory of client public keys (*.key / *.pub); needed for tcp://")  # fmt: skip
    s.add_argument("--call-licences", "--call-licenses", dest="call_licences",
                   action="store_true",
                   help="check each caller's call licence at the key server (needs --device); "
                        "instead of --allow")  # fmt: skip
    s.add_argument("--server-key-out", metavar="FILE", help="write the service's public key here")
    s.add_argument("--server-secret", metavar="CERT", help="zmq secret certificate (stable key)")
    s.add_argument("--device", default=None, metavar="DIR",
                   help="the enrolled device this service runs as (`vault device init`)")  # fmt: skip
    s.add_argument("--instances", type=int, default=None, metavar="N",
                   help="worker processes per model (default: half the cores, at least 1)")  # fmt: skip
    s.add_argument("--max-batch", type=int, default=1, metavar="N",
                   help="rows per batched call; 1 turns batching off (default)")  # fmt: skip
    s.add_argument("--max-queue-delay-us", type=int, default=0, metavar="US",
                   help="how long a call may wait for others to fill a batch")  # fmt: skip
    s.add_argument("--metrics-port", type=int, default=None, metavar="P",
                   help="serve /metrics, /healthz and /readyz over HTTP on this port")  # fmt: skip
    s.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST")
    s.add_argument("--drain-timeout", type=float, default=30.0, metavar="S")
    s.add_argument("--request-timeout", type=float, default=60.0, metavar="S")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--user", default=None, help="workers drop to this user (when started as root)")
    s.add_argument("--log-level", choices=("info", "debug"), default="info",
                   help="debug also logs every successful call")  # fmt: skip
    o = s.add_argument_group(
        "Open Inference Protocol v2 (KServe/Triton REST and gRPC; callers send bearer tokens "
        "minted from call licences: needs --call-licences)"
    )
    o.add_argument("--http", type=int, default=None, metavar="PORT",
                   help="serve the protocol's REST endpoints (/v2/...) on this port")  # fmt: skip
    o.add_argument("--grpc", type=int, default=None, metavar="PORT",
                   help="serve inference.GRPCInferenceService on this port")  # fmt: skip
    o.add_argument("--oip-host", default="127.0.0.1", metavar="HOST",
                   help="address both bind to (default 127.0.0.1)")  # fmt: skip
    o.add_argument("--http-cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web page's origin (https://shop.example) whose scripts may call the "
                        "REST endpoints (repeatable; * for any page; default none)")  # fmt: skip
    o.add_argument("--tls-cert", metavar="FILE", help="TLS certificate chain (PEM) for both")
    o.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM) for both")
    o.add_argument("--dangerously-serve-plaintext", action="store_true",
                   help="serve without TLS on a non-loopback --oip-host: bearer tokens cross the "
                        "network in the clear (only behind a proxy that terminates TLS)")  # fmt: skip
    s.set_defaults(func=_serve)
    k = wsub.add_parser("keygen", help="make a stable CURVE key pair for a worker")
    k.add_argument("dir")
    k.set_defaults(func=_keygen)
    c = wsub.add_parser("client-key", help="write a licence's public client key for an allow-list")
    c.add_argument("licence")
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(func=_client_key)

    d = sub.add_parser("demo", help="the whole flow on a small model, in a temp dir")
    d.add_argument("--web", action="store_true",
                   help="serve a page whose head runs in your browser, the protected tail on "
                        "a local worker service; prints the URL")  # fmt: skip
    d.add_argument("--port", type=int, default=0, help="the page's port with --web (default: free)")
    d.set_defaults(func=_demo)


# --- run -------------------------------------------------------------------------------


def _summary(arr: Any) -> str:
    import numpy as np

    if arr.size == 0 or arr.dtype == object or arr.dtype.kind not in "biuf":
        return ""
    a = arr.astype(np.float64)
    return f"min {a.min():.6g}  max {a.max():.6g}  mean {a.mean():.6g}"


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..client import open as vault_open

    feeds: dict[str, Any] = {}
    for item in args.input:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--input {item!r}: use NAME=FILE.npy")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read a .npy array ({exc})") from exc
    with vault_open(
        args.package, licence=args.licence, device=args.device, daemon=args.daemon
    ) as model:
        out = model.compute(feeds, args.output)
    if not args.no_save:
        os.makedirs(args.output_dir, exist_ok=True)
    used: set[str] = set()
    for name, arr in out.items():
        if not isinstance(arr, np.ndarray):  # a sequence, map or optional output
            print(f"{name}: {type(arr).__name__} {arr!r}"[:400])
            continue
        print(f"{name}: {arr.dtype} {list(arr.shape)}  {_summary(arr)}".rstrip())
        if not args.no_save:
            dest = os.path.join(args.output_dir, _file_name(name, used) + ".npy")
            np.save(dest, arr, allow_pickle=False)
            print(f"  -> {dest}")
    return 0


_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def _file_name(name: str, used: set[str]) -> str:
    """A file name for an output, never a path: output names come from the
    package (``../../x`` and ``resnet/Softmax:0`` are both valid ONNX names),
    so every character outside ``[A-Za-z0-9._-]`` becomes ``_``, leading dots
    go, and a clash gets a numeric suffix."""
    base = _UNSAFE_CHARS.sub("_", name).lstrip(".")[:200] or "output"
    candidate, n = base, 1
    while candidate.lower() in used:
        n += 1
        candidate = f"{base}_{n}"
    used.add(candidate.lower())
    return candidate


# --- worker serve ----------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    """The service runs in this process (worker.service); its workers are
    hardened child processes started through vault.core.launch."""
    from worker.service import (
        AllowListPolicy,
        JsonLog,
        LaunchSpec,
        OpenPolicy,
        ServiceConfig,
        WorkerService,
    )

    from ..core.device import Device
    from ..core.licence import Licence

    if not args.packages and not args.repository:
        raise ConfigError("give packages to serve, or --repository DIR")
    curve = None
    policy: Any = OpenPolicy()
    licences = [Licence.load(p) for p in args.licence]
    device = Device.load(args.device) if args.device else None
    ks_client = None
    if args.call_licences:
        if device is None:
            raise ConfigError("--call-licences needs --device DIR: the service asks as a device")
        from worker.service import CallLicencePolicy

        from ..core.keyclient import KeyServerClient

        ks_client = KeyServerClient(licences[0], device=device)
        ks = ks_client
        policy = CallLicencePolicy(
            lambda model, keys, usage, grants: ks.call_decisions(
                model_id=model, keys=keys, usage=usage, grants=grants
            )
        )
    if args.bind.startswith("tcp://"):
        if not args.call_licences:
            if not args.allow or not os.path.isdir(args.allow):
                raise ConfigError(
                    "a tcp:// service needs --allow CLIENTS_DIR (a directory) or --call-licences"
                )
            policy = AllowListPolicy.from_dir(args.allow)
        curve = _server_keys(args.server_secret)
    oip = None
    if args.http is not None or args.grpc is not None:
        if not args.call_licences:
            raise ConfigError(
                "--http/--grpc admit callers by bearer tokens minted from call licences: "
                "add --call-licences"
            )
        if (args.tls_cert is None) != (args.tls_key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        from worker.service.oip import OipConfig
        from worker.service.oip.cors import check_origin

        oip = OipConfig(
            host=args.oip_host, http_port=args.http, grpc_port=args.grpc,
            tls=(args.tls_cert, args.tls_key) if args.tls_cert else None,
            dangerously_allow_plaintext=args.dangerously_serve_plaintext,
            cors_origins=tuple(check_origin(o) for o in args.http_cors_origin),
        )  # fmt: skip
        from worker.service.oip import OipServer

        OipServer.check(oip)  # refuse a plaintext bind before any worker starts
    elif args.tls_cert or args.tls_key or args.dangerously_serve_plaintext or args.http_cors_origin:
        raise ConfigError(
            "--tls-cert, --tls-key, --http-cors-origin and --dangerously-serve-plaintext go "
            "with --http/--grpc"
        )
    cores = os.cpu_count() or 2
    instances = args.instances or max(1, cores // 2)
    launch = LaunchSpec(
        licence=licences,
        threads=args.threads or 2,
        intra_op_threads=max(1, cores // instances),
        user=args.user,
        device=device,
    )
    cfg = ServiceConfig(
        bind=args.bind,
        packages=args.packages,
        repository=args.repository,
        poll_interval=args.poll_interval,
        instances=instances,
        max_batch=max(1, args.max_batch),
        max_queue_delay_us=max(0, args.max_queue_delay_us),
        request_timeout=args.request_timeout,
        drain_timeout=args.drain_timeout,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        curve=curve,
        policy=policy,
        launch=launch,
        oip=oip,
    )
    svc = WorkerService(cfg, log=JsonLog(sys.stderr, level=args.log_level))
    svc.catch_signals()  # a SIGTERM during start-up or right after the ready lines drains
    ready = svc.start()
    key = ready.get("server_key") or ""
    if args.server_key_out:
        with open(args.server_key_out, "w", encoding="ascii") as fh:
            fh.write(key + "\n")
    for model_id, m in ready["models"].items():
        print(f"worker ready: model {model_id} on {m['provider']} ({m['instances']} workers, "
              f"batching {'on' if m['batching'] else 'off'}: {m['batching_reason']})")  # fmt: skip
    print(f"endpoint: {ready['endpoint']}")
    print(f"server key: {key}")
    if args.allow:
        print(f"allowed clients: {len(getattr(policy, 'by_key', {}))} (from {args.allow})")
    if ready.get("metrics_port") is not None:
        print(f"metrics: http://{args.metrics_host}:{ready['metrics_port']}/metrics")
    scheme = "https" if args.tls_cert else "http"
    if ready.get("http_port") is not None:
        print(f"open inference protocol (REST): {scheme}://{args.oip_host}:{ready['http_port']}/v2")
    if ready.get("grpc_port") is not None:
        print(f"open inference protocol (gRPC): {args.oip_host}:{ready['grpc_port']}"
              f"{' (TLS)' if args.tls_cert else ''}")  # fmt: skip
    if args.server_key_out:
        print(f"server key written to {args.server_key_out}")
    sys.stdout.flush()
    try:
        return svc.run()
    finally:
        if ks_client is not None:
            ks_client.close()


def _server_keys(secret_cert: str | None) -> tuple[bytes, bytes]:
    import zmq
    import zmq.auth

    if not secret_cert:
        return zmq.curve_keypair()
    try:
        public, secret = zmq.auth.load_certificate(secret_cert)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{secret_cert}: not a zmq certificate ({exc})") from exc
    if not secret:
        raise ConfigError(f"{secret_cert}: holds no secret key")
    return public, secret


def _keygen(args: argparse.Namespace) -> int:
    import zmq.auth

    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    public, secret = zmq.auth.create_certificates(args.dir, "worker")
    os.chmod(secret, 0o600)
    print(
        f"worker public key: {public}\nworker secret key: {secret} (keep private; --server-secret)"
    )
    return 0


def _client_key(args: argparse.Namespace) -> int:
    from ..core.licence import Licence

    lic = Licence.load(args.licence)
    with open(args.output, "w", encoding="ascii") as fh:
        fh.write(lic.client_public_key + "\n")
    print(f"client public key of {lic.holder} ({lic.licence_id}) -> {args.output}")
    return 0


# --- demo -----------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.web:
        from .demo_web import run_web_demo

        return run_web_demo(port=args.port)

    try:
        return run_demo()
    except VaultError:
        raise
