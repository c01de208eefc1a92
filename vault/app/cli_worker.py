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
- the **service's** public key is in its ready line (``"server_key"``, the
  one JSON line on stdout) and written to ``--server-key-out``; hand that
  file to clients, who pass it as ``vault.connect(..., server_key="worker.pub")``.
  The key is stable: without ``--server-secret`` the service keeps its pair
  in the ``--device`` directory (else the ``--repository``), made on first
  start; ``vault worker keygen DIR`` makes one to give as ``--server-secret
  DIR/worker.key_secret`` (replicas share it), and its ``DIR/worker.key`` is
  accepted by ``vault.connect(server_key=...)`` as it is.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from ..core.argtypes import non_negative_float, non_negative_int, port, positive_float, positive_int
from ..core.errors import ConfigError, InputError, VaultError
from ..core.graphs import shape_text
from ..core.logs import add_log_options

__all__ = ["register"]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="compute once with a sealed model, through the local daemon's worker (tier 1)",
        description="Compute once with a sealed model: the local daemon (`vault daemon`, "
        "$VAULT_DAEMON or /run/vault/daemon.sock) starts a hardened worker under its own uid "
        "for this licence; a --same-user licence without a daemon runs the worker as you "
        "(tier 0). Each output is printed and saved as DIR/<output>.npy.",
    )
    p.add_argument("package")
    p.add_argument("--licence", "--license", dest="licence", required=True)
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=FILE.npy")
    p.add_argument(
        "--output", action="append", default=None, metavar="NAME", help="only these outputs"
    )
    p.add_argument("--output-dir", default=".", help="where NAME.npy files go (default: .)")
    p.add_argument("--no-save", action="store_true", help="print only, write no .npy")
    p.add_argument("--device", default=None, metavar="DIR",
                   help="an enrolled device of your own to release the key as, without "
                        "the daemon (advanced)")  # fmt: skip
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
    s.add_argument("--poll-interval", type=positive_float, default=None, metavar="S")
    s.add_argument("--licence", "--license", dest="licence", required=True, action="append",
                   help="the service's own runtime licence: one covering every model it "
                        "serves (`vault licence issue --all-models`, or several ids), or "
                        "repeat it, one per model; re-read on SIGHUP")  # fmt: skip
    s.add_argument("--bind", default="tcp://127.0.0.1:7701")
    s.add_argument("--allow", metavar="CLIENTS_DIR",
                   help="directory of client public keys (*.key / *.pub); needed for tcp://")  # fmt: skip
    s.add_argument("--call-licences", "--call-licenses", dest="call_licences",
                   action="store_true",
                   help="check each caller's call licence at the key server (needs --device); "
                        "instead of --allow")  # fmt: skip
    s.add_argument("--server-key-out", metavar="FILE", help="write the service's public key here")
    s.add_argument("--server-secret", metavar="CERT",
                   help="the service's CURVE secret certificate (`vault worker keygen DIR`: "
                        "DIR/worker.key_secret); default: kept in the --device directory "
                        "(else the --repository), made on first start")  # fmt: skip
    s.add_argument("--device", default=None, metavar="DIR",
                   help="the enrolled device this service runs as: `vault device init DIR`, "
                        "then `vault device enroll DIR --licence admin.licence --service`")  # fmt: skip
    s.add_argument("--instances", type=positive_int, default=None, metavar="N",
                   help="worker processes per model (default: half the cores, at least 1)")  # fmt: skip
    s.add_argument("--max-batch", type=positive_int, default=1, metavar="N",
                   help="rows per batched call; 1 turns batching off (default)")  # fmt: skip
    s.add_argument("--max-queue-delay-us", type=non_negative_int, default=0, metavar="US",
                   help="how long a call may wait for others to fill a batch")  # fmt: skip
    s.add_argument("--metrics-port", type=port, default=None, metavar="P",
                   help="serve /metrics, /healthz, /readyz, /v2/health/{live,ready} and "
                        "/v2/models/M/ready over HTTP on this port")  # fmt: skip
    s.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="the address the --metrics-port endpoints listen on (default "
                   "127.0.0.1; 0.0.0.0 for a scraper on another host)")  # fmt: skip
    s.add_argument("--sealed-port", type=int, default=0, metavar="P",
                   help="tcp:// only: the port of the second socket remote computes travel "
                   "sealed on (AES-256-GCM, keys agreed over CURVE; docs/transport.md), on "
                   "the --bind host; 0 (default): any free port; -1: none (calls stay on "
                   "CURVE)")  # fmt: skip
    s.add_argument("--drain-timeout", type=non_negative_float, default=30.0, metavar="S")
    s.add_argument("--request-timeout", type=positive_float, default=60.0, metavar="S",
                   help="the most a call waits (default 60); a worker still busy this long "
                   "past an abandoned call's deadline is stuck")  # fmt: skip
    s.add_argument("--no-replace-stuck", action="store_true",
                   help="a worker found stuck keeps its slot until it has gone (default: a "
                   "replacement starts at once, the model holding one worker more meanwhile)")  # fmt: skip
    s.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="onnxruntime threads per worker (default 2)")  # fmt: skip
    s.add_argument("--user", default=None, help="workers drop to this user (when started as root)")
    add_log_options(s)
    o = s.add_argument_group(
        "Open Inference Protocol v2 (KServe/Triton REST and gRPC; callers send bearer tokens "
        "minted from call licences: needs --call-licences)"
    )
    o.add_argument("--http", type=port, default=None, metavar="PORT",
                   help="serve the protocol's REST endpoints (/v2/...) on this port")  # fmt: skip
    o.add_argument("--grpc", type=port, default=None, metavar="PORT",
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
    k = wsub.add_parser(
        "keygen",
        help="make a stable CURVE key pair for a service: DIR/worker.key (give it to callers: "
        "vault.connect(server_key=...)) and DIR/worker.key_secret (--server-secret)",
    )
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
    d.add_argument("--models", metavar="DIR",
                   help="write the README's example models into DIR instead (digits-mlp.onnx, "
                        "digits-rf.onnx, digits-old.onnx: [N, 64] float32 -> [N, 10]); an "
                        "existing file is never overwritten")  # fmt: skip
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
        missing = [n for n in model.inputs if n not in feeds]
        if missing:  # said before the call, in the command's own words
            dtype, shape = model.inputs[missing[0]]
            raise InputError(f"missing input {missing[0]!r} ({dtype} {shape_text(shape)}): "
                             f"give it as --input {missing[0]}=FILE.npy")  # fmt: skip
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
            if arr.dtype == object:  # a string tensor: saved as text (.npy holds no objects)
                arr = arr.astype(str)
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
    # gRPC core writes its own lines on stderr (INFO: a client that does not
    # speak TLS to a TLS door is "Handshake failed"; ERROR: a client's
    # gzip-compressed message refused), which any stranger or caller can
    # trigger and which break the log's one JSON event per line. It reads
    # GRPC_VERBOSITY once, when grpc is first imported (later is too late):
    # none of them, unless the operator asks (what a caller's call did wrong
    # reaches the caller as its status; the service's own failures are its
    # JSON events)
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from worker.service import (
        AllowListPolicy,
        JsonLog,
        LaunchSpec,
        OpenPolicy,
        ServiceConfig,
        WorkerService,
    )

    from ..core.device import Device
    from ..core.logs import ready_line

    log = JsonLog(sys.stderr, level=args.log_level, fmt=args.log_format)
    if not args.packages and not args.repository:
        raise ConfigError("give packages to serve, or --repository DIR")
    policy: Any = OpenPolicy()
    licences = [_service_licence(p) for p in args.licence]
    device = Device.load(args.device) if args.device else None
    if device is None and not all(lic.same_user for lic in licences):
        raise ConfigError(
            "vault worker serve runs as an enrolled device: give --device DIR (make it with "
            "`vault device init DIR`, have the vendor's admin run `vault device enroll DIR "
            "--licence admin.licence --service`); without one only a --same-user licence (tier 0, for "
            "development) can release keys"
        )
    ks_client = None
    if args.call_licences:
        if device is None:
            raise ConfigError("--call-licences needs --device DIR: the service asks as a device")
        from worker.service import CallLicencePolicy

        from ..core.keyclient import KeyServerClient

        ks_client = KeyServerClient(licences[0], device=device)
        ks = ks_client
        _check_service_device(ks, device.device_id)
        policy = CallLicencePolicy(
            lambda model, keys, usage, grants: ks.call_decisions(
                model_id=model, keys=keys, usage=usage, grants=grants
            )
        )
    curve = None
    if args.bind.startswith("tcp://"):
        if not args.call_licences:
            if not args.allow or not os.path.isdir(args.allow):
                raise ConfigError(
                    "a tcp:// service needs --allow CLIENTS_DIR (a directory) or --call-licences"
                )
            policy = AllowListPolicy.from_dir(args.allow)
            log("callers_allowed", count=len(getattr(policy, "by_key", {})), directory=args.allow)
        curve = _server_keys(args, log)
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
        replace_stuck=not args.no_replace_stuck,
        drain_timeout=args.drain_timeout,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        sealed_port=None if args.sealed_port < 0 else args.sealed_port,
        curve=curve,
        policy=policy,
        launch=launch,
        reload_licences=lambda: [_service_licence(p) for p in args.licence],
        oip=oip,
    )
    try:
        svc = WorkerService(cfg, log=log)
        svc.catch_signals()  # a SIGTERM during the initial load, or right after it, drains
        ready = svc.start()
        key = ready.get("server_key") or ""
        if args.server_key_out:
            with open(args.server_key_out, "w", encoding="ascii") as fh:
                fh.write(key + "\n")
            log("server_key_written", path=args.server_key_out)
        # "ready" is what /v2/health/ready says now (a model takes calls): a
        # service whose every model is unavailable (its key server away) is
        # listening, with its ports here, but not ready, and each model's
        # state and reason say why (it keeps trying; the probe turns 200 then)
        ready_line({"endpoint": ready["endpoint"], "server_key": key or None,
                    "metrics_port": ready.get("metrics_port"), "models": ready["models"],
                    "sealed_port": ready.get("sealed_port"),
                    "http_port": ready.get("http_port"), "grpc_port": ready.get("grpc_port"),
                    "tls": bool(args.tls_cert), "pid": os.getpid()},
                   ready=svc.ready())  # fmt: skip
        return svc.run()
    finally:
        if ks_client is not None:
            ks_client.close()


def _service_licence(path: str) -> Any:
    """A licence the service can release keys with: a runtime licence. A call
    licence (a caller's, checked by the service) or an admin licence never
    gives a key, so a service started with one would report ready and retry
    its models forever: refuse it at start, naming the file and the fix."""
    from ..core.licence import Licence

    lic = Licence.load(path)
    if lic.kind != "runtime" or lic.is_admin:
        kind = "admin" if lic.is_admin else lic.kind
        raise ConfigError(
            f"--licence {path} is {_article(kind)} {kind} licence ({lic.licence_id}), which "
            "never gives a key: the service needs a runtime licence issued to it, e.g. "
            "`vault licence issue --all-models --to service --licence admin.licence "
            "-o service.licence`"
            + (
                " (a call licence is a caller's: the service checks it with --call-licences)"
                if kind == "call"
                else ""
            )
        )
    return lic


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _server_keys(args: argparse.Namespace, log: Any) -> tuple[bytes, bytes]:
    """The service's CURVE key pair: ``--server-secret``, else the one kept in
    the device directory (else the repository), made there on first start, so
    a restart keeps the key its callers hold. Only a service with neither
    (packages and a --same-user licence: development) gets a fresh key."""
    import zmq

    from ..core.curvekeys import load_secret_certificate, stable_server_keys

    if args.server_secret:
        return load_secret_certificate(args.server_secret)
    home = args.device or args.repository
    if not home:
        log("server_key_ephemeral", level="warning",
            hint="give --server-secret (vault worker keygen DIR) for a key that survives a "
                 "restart")  # fmt: skip
        return zmq.curve_keypair()
    public, secret, created = stable_server_keys(home)
    log("server_key_created" if created else "server_key_loaded",
        path=os.path.join(home, "worker.key_secret"))  # fmt: skip
    return public, secret


def _keygen(args: argparse.Namespace) -> int:
    from ..core.curvekeys import PUBLIC_NAME, SECRET_NAME, write_certificates

    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    if os.path.exists(os.path.join(args.dir, SECRET_NAME)):
        raise ConfigError(f"{args.dir} already holds {SECRET_NAME}; refusing to overwrite it")
    public, _ = write_certificates(args.dir)
    pub = os.path.join(args.dir, PUBLIC_NAME)
    sec = os.path.join(args.dir, SECRET_NAME)
    print(f"server key: {public.decode()}")
    print(f"  {pub}: the public key; callers pass it as vault.connect(server_key={pub!r})")
    print(f"  {sec}: the secret (0600); the service takes it as --server-secret {sec}")
    return 0


def _client_key(args: argparse.Namespace) -> int:
    from ..core.licence import Licence

    lic = Licence.load(args.licence)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)  # clients/ on first use
    with open(args.output, "w", encoding="ascii") as fh:
        fh.write(lic.client_public_key + "\n")
    print(f"client public key of {lic.holder} ({lic.licence_id}) -> {args.output}")
    return 0


# --- demo -----------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo, write_example_models

    if args.models:
        for path in write_example_models(args.models):
            print(path)
        return 0
    if args.web:
        from .demo_web import run_web_demo

        return run_web_demo(port=args.port)

    try:
        return run_demo()
    except VaultError:
        raise


def _check_service_device(ks: Any, device_id: str) -> None:
    """At start, before any caller: the key server answers this device's call
    decisions. A device enrolled without ``--service`` (or before a key
    server that asks for it) would be refused at every caller's handshake
    while the service said it was ready."""
    from ..core.errors import KeyServerUnavailableError, PermissionDeniedError

    try:
        ks.call_decisions(model_id=None, keys=[], usage=[])
    except PermissionDeniedError as exc:
        raise ConfigError(
            f"--call-licences: the key server refuses this device's call decisions ({exc}); "
            f"have the vendor's admin run `vault device enroll DIR --licence admin.licence "
            f"--service` for device {device_id}"
        ) from None
    except KeyServerUnavailableError:
        pass  # the key server away at start: callers wait for it, as they would later
