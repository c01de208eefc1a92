"""Command bodies shared by ``python -m keyserver`` and ``vault keyserver``.

Each returns an exit code and prints plainly; typed errors propagate to the
caller's CLI, which prints one line.

Example::

    cmd_audit("ks", verify_only=False, verify_chain=True)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from typing import Any

from . import audit, store
from .layout import DEFAULT_ADDRESS, Paths, exclusive_lock, init_dir, rotate_master

__all__ = ["add_arguments", "cmd_audit", "cmd_init", "cmd_rotate", "cmd_serve"]


def cmd_init(root: str, *, address: str = DEFAULT_ADDRESS) -> int:
    created = init_dir(root, address=address)
    print(f"key server initialised in {root}")
    for what, value in created.items():
        print(f"  {what}: {value}")
    return 0


def cmd_serve(root: str, *, bind: str, lease_ttl: float, advertise: str | None = None) -> int:
    from .server import serve

    serve(root, bind=bind, lease_ttl=lease_ttl, advertise=advertise)
    return 0


def _when(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def cmd_audit(root: str, *, verify_chain: bool, quiet: bool = False) -> int:
    conn = store.connect(Paths(os.fspath(root)).db)
    try:
        if not quiet:
            for r in audit.records(conn):
                print(
                    f"{r.seq:>6} {_when(r.ts)} {r.event:<14} licence={r.licence_id or '-'} "
                    f"model={r.model_id or '-'} {r.detail}"
                )
        if not verify_chain:
            return 0
        problems = audit.verify(conn)
        seq, digest = audit.head(conn)
    finally:
        conn.close()
    if problems:
        for p in problems:
            print(f"audit: TAMPERED {p}", file=sys.stderr)
        return 1
    print(f"audit chain OK: {seq} records, head {digest.hex()}")
    return 0


def cmd_rotate(root: str) -> int:
    with exclusive_lock(root):
        n = rotate_master(root)
    print(f"master key rotated; {n} package key(s) re-wrapped")
    return 0


def add_arguments(sub: Any) -> None:
    """Sub-commands init/serve/audit/rotate-master on an argparse sub-parser set."""
    p = sub.add_parser("init", help="create database, master key, server keys, admin.licence")
    p.add_argument("dir")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="address clients will use")
    p.set_defaults(func=lambda a: cmd_init(a.dir, address=a.address))

    p = sub.add_parser("serve", help="run the key server until SIGTERM / Ctrl-C")
    p.add_argument("dir")
    p.add_argument("--bind", default=DEFAULT_ADDRESS)
    p.add_argument("--lease-ttl", type=float, default=60.0, metavar="S")
    p.add_argument("--advertise", default=None, help="address written into issued licences")
    p.set_defaults(
        func=lambda a: cmd_serve(a.dir, bind=a.bind, lease_ttl=a.lease_ttl, advertise=a.advertise)
    )

    p = sub.add_parser("audit", help="print the audit log; --verify checks the hash chain")
    p.add_argument("dir")
    p.add_argument("--verify", action="store_true")
    p.add_argument("--quiet", action="store_true", help="with --verify: only the verdict")
    p.set_defaults(func=lambda a: cmd_audit(a.dir, verify_chain=a.verify, quiet=a.quiet))

    p = sub.add_parser("rotate-master", help="re-wrap every key under a new master key")
    p.add_argument("dir")
    p.set_defaults(func=lambda a: cmd_rotate(a.dir))


def main(argv: list[str] | None = None) -> int:
    from vault.core.errors import VaultError

    parser = argparse.ArgumentParser(prog="python -m keyserver")
    add_arguments(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except VaultError as exc:
        print(f"keyserver: {exc.diagnostics()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
