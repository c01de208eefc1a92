"""The key server's command line, defined once: ``python -m keyserver`` and
``vault keyserver`` both build their sub-commands with :func:`add_arguments`.

Each command returns an exit code and prints plainly; typed errors propagate
to the caller's CLI, which prints one line. Only ``argparse`` is imported at
module level, so building the ``vault`` parser stays cheap.

The PostgreSQL URL (which may hold a password) comes from
``$VAULT_DATABASE_URL`` or ``--database-file FILE``: the environment and a
0600 file are the process owner's alone, while every local user reads every
process's command line (``/proc/PID/cmdline``). ``--database URL`` still
works, with a warning when the URL holds a password.

Example::

    cmd_audit("ks", verify_chain=True)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from typing import Any

from vault.core.argtypes import positive_float
from vault.core.logs import add_log_options

DEFAULT_ADDRESS = "tcp://127.0.0.1:7700"
DATABASE_ENV = "VAULT_DATABASE_URL"

__all__ = [
    "DATABASE_ENV",
    "add_arguments",
    "cmd_audit",
    "cmd_init",
    "cmd_rotate",
    "cmd_serve",
    "database_url",
]


def cmd_init(root: str, *, address: str = DEFAULT_ADDRESS, database: str | None = None) -> int:
    from .layout import init_dir

    created = init_dir(root, address=address, database=database)
    print(f"key server initialised in {root}")
    for what, value in created.items():
        print(f"  {what}: {value}")
    return 0


def cmd_serve(
    root: str,
    *,
    bind: str | None,
    lease_ttl: float,
    advertise: str | None = None,
    database: str | None = None,
    anchor: str | None = None,
    log_format: str = "json",
    log_level: str = "info",
    limits: Any = None,
    coalesce: float | None = None,
) -> int:
    import json

    from vault.core.errors import VaultError
    from vault.core.logs import Log

    from .server import serve
    from .service import DEFAULT_COALESCE

    log = Log(sys.stderr, component="keyserver", fmt=log_format, level=log_level)
    try:
        serve(root, bind=bind, lease_ttl=lease_ttl, advertise=advertise, database=database,
              anchor=anchor, log=log, limits=limits,
              coalesce=DEFAULT_COALESCE if coalesce is None else coalesce)  # fmt: skip
    except VaultError as exc:
        # a launcher waiting for the ready line hears why there is none
        # (one that already read it may have closed the pipe)
        try:
            print(json.dumps({"ready": False, "error": exc.to_wire()}), flush=True)
        except OSError:
            pass
        raise
    return 0


def _when(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def cmd_audit(
    root: str,
    *,
    verify_chain: bool,
    quiet: bool = False,
    database: str | None = None,
    anchor: str | None = None,
) -> int:
    from vault.core import crypto as _crypto

    from . import audit
    from .anchor import verify_anchor
    from .layout import Paths
    from .store import open_store

    paths = Paths(os.fspath(root))
    st = open_store(database or paths.db)
    try:
        if not quiet:
            for r in audit.records(st):
                print(
                    f"{r.seq:>6} {_when(r.ts)} {r.event:<14} licence={r.licence_id or '-'} "
                    f"model={r.model_id or '-'} {r.detail}"
                )
        if not verify_chain:
            return 0
        problems = audit.verify(st)
        seq, digest = audit.head(st)
        last = None
        if anchor is not None:
            with open(paths.audit_pub, "rb") as fh:
                public = _crypto.load_public_key(fh.read())
            found, last = verify_anchor(st, anchor, public)
            problems += found
    finally:
        st.close()
    if problems:
        for p in problems[:20]:
            print(f"audit: TAMPERED {p}", file=sys.stderr)
        if len(problems) > 20:
            print(f"audit: ... and {len(problems) - 20} more", file=sys.stderr)
        return 1
    print(f"audit chain OK: {seq} records, head {digest.hex()}")
    if last is not None:
        print(f"anchor OK: the log matches every signed checkpoint (last: record {last.seq}, "
              f"{last.when()})")  # fmt: skip
    return 0


def cmd_rotate(root: str, *, database: str | None = None) -> int:
    from .layout import exclusive_lock, rotate_master

    with exclusive_lock(root):
        n = rotate_master(root, database=database)
    print(f"master key rotated; {n} package key(s) re-wrapped")
    return 0


def _limit(text: str) -> Any:
    """argparse type of the request limits (``R/s[:BURST]`` or ``off``)."""
    from .limits import parse_limit

    try:
        return parse_limit(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _limits(a: argparse.Namespace) -> Any:
    from .service import RequestLimits

    def given(v: Any) -> Any:  # argparse leaves a string default unconverted
        return _limit(v) if isinstance(v, str) else v

    return RequestLimits(identity=given(a.request_limit), device=given(a.device_request_limit),
                         licence=given(a.licence_request_limit))  # fmt: skip


def _database_option(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--database-file",
        default=None,
        metavar="FILE",
        help="a file (0600) holding the postgresql://... URL of a store shared by replicas "
        f"(or set ${DATABASE_ENV}; default: DIR/keyserver.db, SQLite)",
    )
    g.add_argument(
        "--database",
        default=None,
        metavar="URL",
        help="the postgresql://... URL on the command line: every local user can read it "
        f"in /proc; prefer ${DATABASE_ENV} or --database-file when it holds a password",
    )


def database_url(args: argparse.Namespace, environ: dict[str, str] | None = None) -> str | None:
    """The store's URL: ``--database-file``, ``--database``, else
    ``$VAULT_DATABASE_URL``, else None (SQLite in DIR). A password on the
    command line is warned about (it is in ``/proc/PID/cmdline``)."""
    from urllib.parse import urlsplit

    from vault.core.errors import ConfigError
    from vault.core.files import read_secret_file

    env = os.environ if environ is None else environ
    if getattr(args, "database_file", None):
        url = read_secret_file(args.database_file, limit=64 << 10, what="database URL file")
        text = url.decode("utf-8", "replace").strip()
        if not text:
            raise ConfigError(f"{args.database_file}: empty, not a database URL")
        return text
    if getattr(args, "database", None):
        try:
            password = urlsplit(args.database).password
        except ValueError:
            password = None
        if password:
            print(
                "keyserver: WARNING: --database holds a password, which every local user can "
                f"read in /proc/{os.getpid()}/cmdline: pass the URL in ${DATABASE_ENV} or "
                "with --database-file instead",
                file=sys.stderr,
                flush=True,
            )
        return str(args.database)
    return env.get(DATABASE_ENV) or None


def add_arguments(sub: Any) -> None:
    """Sub-commands init/serve/audit/rotate-master on an argparse sub-parser
    set; each sets ``func`` (args -> exit code) and ``ks_command``."""
    p = sub.add_parser("init", help="create database, master key, server keys, admin.licence")
    p.add_argument("dir")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="address clients will use")
    _database_option(p)
    p.set_defaults(
        ks_command="init",
        func=lambda a: cmd_init(a.dir, address=a.address, database=database_url(a)),
    )

    p = sub.add_parser("serve", help="run the key server until SIGTERM / Ctrl-C")
    p.add_argument("dir")
    p.add_argument("--bind", default=None, metavar="ENDPOINT",
                   help="where to listen (default: the port of the address given to init "
                        "--address, tcp://127.0.0.1:7700 unless told otherwise)")  # fmt: skip
    p.add_argument(
        "--lease-ttl", type=positive_float, default=60.0, metavar="S", help="lease TTL (s)"
    )
    p.add_argument("--advertise", default=None, help="address written into issued licences")
    _database_option(p)
    p.add_argument("--anchor", default=None, metavar="PATH",
                   help="append signed audit checkpoints to PATH (outside the database)")  # fmt: skip
    add_log_options(p)
    p.add_argument("--request-limit", type=_limit, default="20/s:100", metavar="R/s[:BURST]",
                   help="requests per licence holder's key, checked before any policy "
                        "(default 20/s:100; 'off': none); refusals carry retry_after")  # fmt: skip
    p.add_argument("--device-request-limit", type=_limit, default="1000/s:2000",
                   metavar="R/s[:BURST]",
                   help="requests per enrolled device's key (default 1000/s:2000; 'off')")  # fmt: skip
    p.add_argument("--licence-request-limit", type=_limit, default="50/s:200",
                   metavar="R/s[:BURST]",
                   help="key requests devices make for one licence (default 50/s:200; 'off')")  # fmt: skip
    p.add_argument("--coalesce", type=float, default=None, metavar="S",
                   help="identical refusals within S seconds: one audit record at once and one "
                        "with their count when S ends (default 60; 0: a record each)")  # fmt: skip
    p.set_defaults(
        ks_command="serve",
        func=lambda a: cmd_serve(
            a.dir, bind=a.bind, lease_ttl=a.lease_ttl, advertise=a.advertise,
            database=database_url(a), anchor=a.anchor, limits=_limits(a), coalesce=a.coalesce,
            log_format=a.log_format, log_level=a.log_level,
        ),
    )  # fmt: skip

    p = sub.add_parser("audit", help="print the audit log; --verify checks the hash chain")
    p.add_argument("dir")
    p.add_argument("--verify", action="store_true", help="verify the chain (exit 1 if broken)")
    p.add_argument("--quiet", action="store_true", help="with --verify: only the verdict")
    p.add_argument("--anchor", default=None, metavar="PATH",
                   help="check the log against the signed checkpoints in PATH too")  # fmt: skip
    _database_option(p)
    p.set_defaults(
        ks_command="audit",
        func=lambda a: cmd_audit(
            a.dir, verify_chain=a.verify or a.anchor is not None, quiet=a.quiet,
            database=database_url(a), anchor=a.anchor,
        ),
    )  # fmt: skip

    p = sub.add_parser("rotate-master", help="re-wrap every package key under a new master")
    p.add_argument("dir")
    _database_option(p)
    p.set_defaults(
        ks_command="rotate-master", func=lambda a: cmd_rotate(a.dir, database=database_url(a))
    )


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
