"""``vault device ...`` and ``vault daemon``: the trusted runtime host (tier 1).

Example::

    # as root (or the daemon's service user), once per machine
    $ vault device init /var/lib/vault/device
    $ vault device enroll /var/lib/vault/device --licence admin.licence   # fixes its key server
    $ vault device enroll /srv/vault/device --licence admin.licence --service   # a worker service's
    $ vault device keyserver /var/lib/vault/device --licence alice.licence  # (enrolled elsewhere)
    $ vault device list --licence admin.licence
    $ vault device revoke dev-3f9c0a1b2c4d5e6f --licence admin.licence
    $ vault daemon --device /var/lib/vault/device --worker-user vault-worker
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..core.argtypes import non_negative_int, positive_float, positive_int
from ..core.errors import ConfigError
from ..core.logs import add_log_options

__all__ = ["register"]


def _client(args: argparse.Namespace) -> Any:
    from ..core.keyclient import KeyServerClient

    return KeyServerClient(args.licence, timeout=args.timeout)


def _init(args: argparse.Namespace) -> int:
    from ..core.device import init_device

    dev = init_device(args.dir)
    print(f"device {dev.device_id} created in {args.dir} (key readable only by uid {os.getuid()})")
    print(
        f"enroll it: vault device enroll {args.dir} --licence KS/admin.licence "
        "(the admin licence `vault keyserver init KS` wrote; add --service for a worker "
        "service's device)"
    )
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from ..core.device import Device, device_id_for, record_keyserver

    # DIR (on the device) or a copy of its device.pub (on the admin's machine):
    # enrolment needs the public key only; the key server checks id and key agree
    if not os.path.exists(args.dir):
        raise ConfigError(f"{args.dir}: no such device directory (nor a copy of its device.pub): "
                          f"make the device first, vault device init {args.dir}")  # fmt: skip
    on_device = os.path.isdir(args.dir)
    if on_device:
        pub = Device.load_public(args.dir)
    else:
        pub = Device.load_public(os.path.dirname(args.dir) or ".", name=os.path.basename(args.dir))
    if device_id_for(pub["public_key"]) != pub["device_id"]:
        raise ConfigError(f"{args.dir}: device id and public key do not belong together")
    with _client(args) as ks:
        created = ks.enroll_device(
            device_id=pub["device_id"], public_key=pub["public_key"], name=args.name or "",
            service=args.service,
        )  # fmt: skip
        address, server_key = ks.licence.keyserver_address, ks.licence.keyserver_public_key
    note = "enrolled" if created else "was already enrolled"
    if args.service:  # the key server recorded it as one, or the call raised
        note += " as a worker service" if created else "; it is a worker service now"
    print(f"device {pub['device_id']} {note}")
    if on_device:  # the key server the device will talk to, fixed here (never a caller's)
        record_keyserver(args.dir, address=address, public_key=server_key)
        print(f"key server {address} recorded in {args.dir}")
    else:
        print(f"on the device, record this key server: vault device keyserver DIR "
              f"--licence FILE.licence (any licence of {address})")  # fmt: skip
    return 0


def _keyserver(args: argparse.Namespace) -> int:
    """The key server a device talks to, from a licence its vendor gave (for a
    device the vendor enrolled from a copy of its ``device.pub``)."""
    from ..core.device import Device, record_keyserver
    from ..core.licence import Licence

    lic = Licence.load(args.licence)
    Device.load(args.dir, require_keyserver=False)  # a device directory, readable by us
    record_keyserver(args.dir, address=lic.keyserver_address, public_key=lic.keyserver_public_key)
    print(f"key server {lic.keyserver_address} recorded in {args.dir}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from .cli_keyserver import _fmt_time

    with _client(args) as ks:
        rows = ks.list_devices()
    # KIND: a worker service's device (asks for call decisions) or a daemon's
    print(f"{'DEVICE':<22} {'NAME':<20} {'KIND':<8} {'ENROLLED':<17} STATE")
    for r in rows:
        state = "revoked" if r.get("revoked") else "active"
        kind = "service" if r.get("service") else "daemon"
        print(f"{r['device_id']:<22} {str(r.get('name') or '-'):<20} {kind:<8} "
              f"{_fmt_time(r.get('enrolled_at')):<17} {state}")  # fmt: skip
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with _client(args) as ks:
        res = ks.revoke_device(args.device_id)
    note = " (was already revoked)" if res.get("already") else ""
    print(f"revoked device {args.device_id}{note}")
    return 0


def _daemon(args: argparse.Namespace) -> int:
    from .daemon import DaemonConfig, resolve_worker_user, run_daemon

    uid, gid, name = resolve_worker_user(args.worker_user)
    sys_path = tuple(os.path.abspath(p) for p in args.worker_path)
    if any(not p for p in sys_path):
        raise ConfigError("--worker-path must name directories")
    cfg = DaemonConfig(
        socket_path=os.path.abspath(args.socket),
        device_dir=args.device,
        worker_uid=uid,
        worker_gid=gid,
        worker_user=name,
        python=args.python,
        sys_path=sys_path,
        runtime_dir=os.path.abspath(args.runtime_dir) if args.runtime_dir else "",
        start_timeout=args.start_timeout,
        standby=args.standby,
        max_connections=args.max_connections,
        max_connections_per_uid=args.max_connections_per_uid,
        max_idle_connections_per_uid=args.max_idle_connections_per_uid,
        max_workers=args.max_workers,
        max_workers_per_uid=args.max_workers_per_uid,
        max_starting=args.max_starting,
        max_starting_per_uid=args.max_starting_per_uid,
        refusal_burst=args.refusal_burst,
        refusal_interval=args.refusal_interval,
        keyserver_timeout=args.keyserver_timeout,
        worker_memory_headroom=args.worker_memory_headroom,
        subuid_file=args.subuid_file,
    )
    for name in ("max_workers", "max_workers_per_uid", "max_starting", "max_starting_per_uid",
                 "refusal_burst", "max_idle_connections_per_uid"):  # fmt: skip
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("refusal_interval", "keyserver_timeout"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive number of seconds")
    from ..core.logs import Log

    return run_daemon(cfg, log=Log(sys.stderr, component="daemon", fmt=args.log_format,
                                   level=args.log_level))  # fmt: skip


def _size(text: str) -> int:
    """``1073741824``, ``512M``, ``2G``: bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = units.get(t[-1:], 1)
    try:
        value = int(t[:-1] if t[-1:] in units else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (bytes, or 512M, 2G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("a size must be positive")
    return value


def register(sub: Any) -> None:
    from ..core.daemonwire import DEFAULT_SOCKET
    from .daemon import DEFAULT_DEVICE_DIR

    d = sub.add_parser("device", help="this machine's device identity (tier 1 runtime host)")
    dsub = d.add_subparsers(dest="device_command", metavar="COMMAND", required=True)

    def admin_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--licence", "--license", dest="licence", required=True,
                       help="the admin licence file")  # fmt: skip
        p.add_argument(
            "--timeout", type=positive_float, default=10.0, help="seconds to wait for the server"
        )

    p = dsub.add_parser("init", help="create a device key pair in DIR (0700, key 0600)")
    p.add_argument("dir")
    p.set_defaults(func=_init)
    p = dsub.add_parser(
        "enroll",
        help="register a device (its DIR, or a copy of its device.pub) with the key server",
    )
    p.add_argument("dir")
    p.add_argument("--name", default=None, help="a label for the device list")
    p.add_argument("--service", action="store_true",
                   help="a device of one of your worker services (vault worker serve): the only "
                   "devices that may ask for callers' call decisions (a customer's daemon must not)")  # fmt: skip
    admin_opts(p)
    p.set_defaults(func=_enroll)
    p = dsub.add_parser(
        "keyserver",
        help="fix the key server of the device in DIR: the one a licence of its vendor names",
    )
    p.add_argument("dir")
    p.add_argument("--licence", "--license", dest="licence", required=True,
                   help="any licence issued by the key server (its address and key are used)")  # fmt: skip
    p.set_defaults(func=_keyserver)
    p = dsub.add_parser("list", help="list enrolled devices (admin)")
    admin_opts(p)
    p.set_defaults(func=_list)
    p = dsub.add_parser("revoke", help="revoke a device (admin)")
    p.add_argument("device_id")
    admin_opts(p)
    p.set_defaults(func=_revoke)

    p = sub.add_parser("daemon", help="the local runtime (tier 1): workers under a dedicated uid")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"default {DEFAULT_SOCKET}")
    p.add_argument("--device", default=DEFAULT_DEVICE_DIR, help="the device directory")
    p.add_argument("--worker-user", default=None,
                   help="user the workers run as (root daemon; default vault-worker)")  # fmt: skip
    p.add_argument("--python", default=sys.executable,
                   help="the workers' interpreter (root-owned; default: this one)")  # fmt: skip
    p.add_argument("--worker-path", action="append", default=[], metavar="DIR",
                   help="directories the workers import from, when the install is not on "
                        "the interpreter's own path (root-owned; repeatable)")  # fmt: skip
    p.add_argument("--runtime-dir", default=None, metavar="DIR",
                   help="a private directory (root's, no other writer) the workers' socket "
                        "directories go in (default: a fresh one beside --socket, removed "
                        "when the daemon stops)")  # fmt: skip
    p.add_argument("--start-timeout", type=positive_float, default=60.0, metavar="S",
                   help="seconds a worker has to be ready; one that is not is killed "
                        "(default 60)")  # fmt: skip
    p.add_argument("--standby", type=non_negative_int, default=1, metavar="N",
                   help="workers kept pre-started (hardened, onnxruntime imported) so an "
                        "open skips spawn and imports; 0: none (default 1)")  # fmt: skip
    p.add_argument("--subuid-file", default="/etc/subuid", metavar="PATH",
                   help="subordinate uid ranges (owner:start:count): a uid in a user's range "
                        "counts as that user for every per-uid cap (default /etc/subuid)")  # fmt: skip
    p.add_argument("--max-connections", type=positive_int, default=512,
                   help="callers connected at once, in all (default 512)")  # fmt: skip
    p.add_argument("--max-connections-per-uid", type=positive_int, default=64,
                   help="callers connected at once from one uid (default 64)")  # fmt: skip
    p.add_argument("--max-idle-connections-per-uid", type=int, default=8,
                   help="of those, connections holding no model (default 8)")  # fmt: skip
    p.add_argument("--max-workers", type=int, default=64,
                   help="callers' workers live or starting, in all (default 64)")  # fmt: skip
    p.add_argument("--max-workers-per-uid", type=int, default=8,
                   help="workers one uid may hold, live or starting (default 8)")  # fmt: skip
    p.add_argument("--max-starting", type=int, default=8,
                   help="workers starting at once, in all (default 8)")  # fmt: skip
    p.add_argument("--max-starting-per-uid", type=int, default=2,
                   help="workers starting, or opens awaiting the key server's answer, at "
                        "once for one uid (default 2)")  # fmt: skip
    p.add_argument("--refusal-burst", type=int, default=10, metavar="N",
                   help="opens of one uid the key server may refuse in a burst; past them the "
                        "daemon refuses that uid itself, one more every --refusal-interval "
                        "(default 10)")  # fmt: skip
    p.add_argument("--refusal-interval", type=float, default=6.0, metavar="SECONDS",
                   help="one more refusal per this many seconds (default 6)")  # fmt: skip
    p.add_argument("--keyserver-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long an open waits for the key server's answer before it is "
                        "refused as keyserver_unavailable (default 10)")  # fmt: skip
    p.add_argument("--worker-memory-headroom", type=_size, default=None, metavar="SIZE",
                   help="each worker's memory limit (RLIMIT_DATA) is 4x its package's "
                        "plaintext plus this (default 1G + 64M per CPU)")  # fmt: skip
    add_log_options(p)
    p.set_defaults(func=_daemon)
