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
import signal
import sys
from typing import Any

from ..core.errors import ConfigError, VaultError
from ..core.process import stop_process

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
    s = wsub.add_parser("serve", help="serve a sealed model over tcp:// with CURVE")
    s.add_argument("package")
    s.add_argument("--licence", "--license", dest="licence", required=True)
    s.add_argument("--bind", default="tcp://127.0.0.1:7701")
    s.add_argument("--allow", required=True, metavar="CLIENTS_DIR",
                   help="directory of client public keys (*.key / *.pub)")  # fmt: skip
    s.add_argument("--server-key-out", metavar="FILE", help="write the worker's public key here")
    s.add_argument("--server-secret", metavar="CERT", help="zmq secret certificate (stable key)")
    s.add_argument("--device", default=None)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--user", default=None, help="drop to this user (when started as root)")
    s.set_defaults(func=_serve)
    k = wsub.add_parser("keygen", help="make a stable CURVE key pair for a worker")
    k.add_argument("dir")
    k.set_defaults(func=_keygen)
    c = wsub.add_parser("client-key", help="write a licence's public client key for an allow-list")
    c.add_argument("licence")
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(func=_client_key)

    d = sub.add_parser("demo", help="the whole flow on a small model, in a temp dir")
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
    if not os.path.isdir(args.allow):
        raise ConfigError(f"--allow {args.allow}: not a directory")
    from ..core.launch import read_ready_line, spawn_worker

    status_r, status_w = os.pipe()
    wargs = [os.path.abspath(args.package), "--endpoint", args.bind,
             "--licence", os.path.abspath(args.licence), "--allow", os.path.abspath(args.allow),
             "--status-fd", str(status_w)]  # fmt: skip
    for flag, value in (("--server-secret", args.server_secret), ("--device", args.device),
                        ("--threads", args.threads), ("--user", args.user)):  # fmt: skip
        if value is not None:
            wargs += [flag, os.path.abspath(value) if flag == "--server-secret" else str(value)]
    try:
        proc = spawn_worker(wargs, pass_fds=[status_w], stderr=None, new_session=False)
    finally:
        os.close(status_w)
    forward = lambda signum, _frame: proc.send_signal(signum)  # noqa: E731
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        msg = read_ready_line(status_r, timeout=600, proc=proc)
    except BaseException:
        stop_process(proc)
        raise
    finally:
        os.close(status_r)
    key = msg.get("server_key") or ""
    if args.server_key_out:
        with open(args.server_key_out, "w", encoding="ascii") as fh:
            fh.write(key + "\n")
    print(f"worker ready: model {msg.get('model_id')} on {msg.get('provider')}")
    print(f"endpoint: {msg.get('endpoint')}")
    print(f"server key: {key}")
    print(f"allowed clients: {msg.get('allowed_clients')} (from {args.allow})")
    if args.server_key_out:
        print(f"server key written to {args.server_key_out}")
    sys.stdout.flush()
    return proc.wait()


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

    try:
        return run_demo()
    except VaultError:
        raise
