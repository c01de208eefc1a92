"""``vault keyserver ...`` and ``vault licence ...`` (alias ``license``).

The key server itself is imported lazily, inside the commands that run it:
the CLI is the application layer, ``vault``'s library never imports it.

Example::

    $ vault keyserver init ks --address tcp://127.0.0.1:7700
    $ vault keyserver serve ks
    $ vault licence issue resnet --to alice --expires 30d --max-calls 1000 \\
          --licence ks/admin.licence -o alice.licence
    $ vault keyserver audit ks --verify
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
from typing import Any

from ..core.argtypes import non_negative_float, non_negative_int, positive_float
from ..core.errors import ConfigError

__all__ = ["parse_duration", "parse_rate", "register"]

SAME_USER_WARNING = (
    "a --same-user licence lets the holder's own user run the worker (tier 0): "
    "that user can extract the model"
)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, "y": 31536000.0}


def parse_duration(text: str) -> float:
    """``"30d"``, ``"12h"``, ``"90m"``, ``"45s"``, ``"1.5"`` (seconds) -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdwy]?)\s*", text)
    if not m:
        raise ConfigError(f"bad duration {text!r} (use e.g. 45s, 90m, 12h, 30d)")
    value = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if value <= 0:
        raise ConfigError(f"duration {text!r} must be positive")
    return value


def parse_rate(text: str) -> float:
    """``"5/s"``, ``"300/m"``, ``"2.5"`` (per second) -> calls per second."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"bad rate {text!r} (use e.g. 5/s, 300/m)")
    return float(m.group(1)) / _UNITS[m.group(2) or "s"]


def _client(args: argparse.Namespace) -> Any:
    from ..core.keyclient import KeyServerClient

    return KeyServerClient(args.licence, timeout=args.timeout)


def _issue(args: argparse.Namespace) -> int:
    from ..core.modelscope import ALL, describe, make_scope

    if args.all_models and args.model_id:
        raise ConfigError("give model ids or --all-models, not both")
    scope = make_scope([ALL] if args.all_models else args.model_id)
    expires = None if args.expires is None else parse_duration(args.expires)
    with _client(args) as ks:
        lic = ks.issue(
            scope,
            holder=args.to,
            expires=expires,
            max_calls=args.max_calls,
            rate_limit=args.rate_limit,
            grace=args.grace,
            kind=args.kind,
            same_user=args.same_user,
            devices=args.device,
            require_key=not args.force,
        )
    out = args.output or f"{args.to}.licence"
    lic.save(out)
    print(
        f"issued {lic.kind} licence {lic.licence_id} to {lic.holder} for "
        f"{describe(lic.model_id)} -> {out}"
    )
    if lic.rate_limit is not None:
        print(f"  rate: {describe_rate(lic.rate_limit)}")
    if lic.same_user:
        print(f"warning: {SAME_USER_WARNING}")
    return 0


def _token(args: argparse.Namespace) -> int:
    from ..core.files import write_private_file
    from ..core.token import mint_token

    text = mint_token(args.licence_file, models=args.model, expires=parse_duration(args.expires),
                      max_calls=args.max_calls)  # fmt: skip
    if args.output == "-":
        print(text)
        return 0
    write_private_file(args.output, (text + "\n").encode())
    budget = f", {args.max_calls} calls" if args.max_calls else ""
    print(f"token for {', '.join(args.model)} (expires in {args.expires}{budget}) -> {args.output}")
    return 0


RATE_HELP = (
    "calls per second, e.g. 2/s or 120/m. Enforced per call by the worker or service "
    "serving the holder: at most max(1, R) calls at once (one second's worth), then one "
    "every 1/R s; a refused call gets rate_limited with retry_after (seconds). Each lease "
    "(60 s by default) reserves up to R x TTL calls from the licence's bucket at the key "
    "server and gives back what it did not serve, so several workers on one licence "
    "together serve at most R x (T + TTL) calls in any T seconds"
)


def describe_rate(rate: float) -> str:
    """``2/s: bursts of 2, then one every 0.5 s``."""
    burst = max(1.0, rate)
    return f"{rate:g}/s: bursts of {burst:g}, then one call every {1 / rate:.3g} s"


def licence_state(row: dict[str, Any], now: float) -> str:
    """revoked, expired, exhausted (quota used, or all of it reserved by open
    leases) or active: what `vault licence list` says."""
    if row.get("revoked"):
        return "revoked"
    exp = row.get("expires_at")
    if exp is not None and now >= float(exp):
        return "expired"
    quota = row.get("max_calls")
    if quota is not None:
        used = int(row.get("used_calls") or 0)
        held = int(row.get("reserved_calls") or 0)
        if used >= quota:
            return "exhausted"
        if used + held >= quota:
            return f"exhausted ({held} held by open leases)"
    return "active"


def _revoke(args: argparse.Namespace) -> int:
    licence_id = args.licence_id
    if os.path.isfile(licence_id):  # a licence file given where its id goes: its id
        from ..core.licence import Licence

        licence_id = Licence.load(licence_id).licence_id
    with _client(args) as ks:
        res = ks.revoke(licence_id)
    note = " (was already revoked)" if res.get("already") else ""
    print(f"revoked licence {licence_id}{note}")
    return 0


def _fmt_time(ts: Any) -> str:
    if ts is None:
        return "never"
    return _dt.datetime.fromtimestamp(float(ts), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _list(args: argparse.Namespace) -> int:
    import time

    with _client(args) as ks:
        rows = ks.list()
    now = time.time()
    # CALLS: used (reported, or reserved by a worker that died) + reserved by
    # open leases, out of the quota: the quota is spent by both.
    print(f"{'LICENCE':<22} {'HOLDER':<16} {'ROLE':<7} {'KIND':<10} {'MODEL':<16} "
          f"{'EXPIRES':<17} {'CALLS':<14} {'RATE/S':<7} STATE")  # fmt: skip
    same_user = False
    for r in rows:
        quota = r["max_calls"] if r["max_calls"] is not None else "-"
        held = int(r.get("reserved_calls") or 0)
        calls = f"{r['used_calls']}{f'+{held}' if held else ''}/{quota}"
        rate = "-" if r.get("rate_limit") is None else f"{r['rate_limit']:g}"
        state = licence_state(r, now)
        kind = str(r.get("kind") or "runtime") + ("*" if r.get("same_user") else "")
        same_user = same_user or bool(r.get("same_user"))
        devices = r.get("devices") or []
        where = f" devices={','.join(devices)}" if devices else ""
        if r.get("authentic") is False:
            state = "REFUSED (row not written by the key server)"
        print(
            f"{r['licence_id']:<22} {r['holder']:<16} {r['role']:<7} {kind:<10} "
            f"{r['model_id'] or '-':<16} {_fmt_time(r['expires_at']):<17} {calls:<14} "
            f"{rate:<7} {state}{where}"
        )
    if same_user:
        print(f"* same-user: {SAME_USER_WARNING}")
    return 0


def register(sub: Any) -> None:
    ks = sub.add_parser("keyserver", help="run and administer the licensing key server")
    ks_sub = ks.add_subparsers(dest="ks_command", metavar="COMMAND", required=True)
    # One definition of the key server's commands, shared with `python -m keyserver`
    # (keyserver.commands imports only argparse until a command runs).
    from keyserver.commands import add_arguments

    add_arguments(ks_sub)

    lic = sub.add_parser("licence", aliases=["license"], help="issue, revoke and list licences")
    lic_sub = lic.add_subparsers(dest="licence_command", metavar="COMMAND", required=True)

    def admin_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--licence", "--license", dest="licence", required=True,
                       help="the admin licence file")  # fmt: skip
        p.add_argument(
            "--timeout", type=positive_float, default=10.0, help="seconds to wait for the server"
        )

    p = lic_sub.add_parser(
        "issue", help="issue a licence for a model (or several)",
        description="Issue a licence for models whose keys are registered with the key server "
        "(one id, several, a prefix ending in '*', or --all-models). "
        "--rate R/s: " + RATE_HELP + ".",
    )  # fmt: skip
    p.add_argument("model_id", nargs="*", metavar="MODEL_ID",
                   help="the model(s) it covers: ids the key server has a key for (vault seal "
                        "registered them; see --force), or a prefix ending in '*' (quote it)")  # fmt: skip
    p.add_argument("--all-models", action="store_true",
                   help="every model of this key server (its publisher's), now or registered "
                        "later: e.g. a service serving a whole --repository")  # fmt: skip
    p.add_argument("--to", required=True, help="holder name")
    p.add_argument("--expires", default=None, help="lifetime, e.g. 30d, 12h (default: never)")
    p.add_argument("--max-calls", type=non_negative_int, default=None, help="call quota")
    p.add_argument("--rate", "--rate-limit", dest="rate_limit", type=parse_rate, default=None,
                   metavar="R/s", help=RATE_HELP)  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="issue it even though the key server has no key for a MODEL_ID yet "
                        "(by default a model id with no registered key is refused: a typo)")  # fmt: skip
    p.add_argument("--grace", type=non_negative_float, default=0.0, help="offline grace period (s)")
    p.add_argument("--kind", choices=("runtime", "call"), default="runtime",
                   help="runtime: use the model through an enrolled device (default); "
                        "call: call a vendor-hosted service, gives no key")  # fmt: skip
    p.add_argument("--device", action="append", default=[], metavar="ID",
                   help="only on this enrolled device (repeatable; default: any)")  # fmt: skip
    p.add_argument("--same-user", action="store_true",
                   help="tier 0: the holder's own user may run the worker, and can therefore "
                        "EXTRACT THE MODEL; for development or vendors who accept it")  # fmt: skip
    p.add_argument("-o", "--output", default=None, help="licence file to write (NAME.licence)")
    admin_opts(p)
    p.set_defaults(func=_issue)
    p = lic_sub.add_parser(
        "token", help="mint a short-lived bearer token from a call licence (no key server needed)"
    )
    p.add_argument("licence_file", metavar="NAME.licence", help="the call licence")
    p.add_argument("--model", action="append", required=True, metavar="ID",
                   help="a model the token may call (repeatable)")  # fmt: skip
    p.add_argument("--expires", default="10m", help="lifetime, at most 1d (default: 10m)")
    p.add_argument("--max-calls", type=int, default=None, metavar="N",
                   help="the token's own call budget (besides the licence's quota)")  # fmt: skip
    p.add_argument("-o", "--output", required=True, metavar="TOKEN",
                   help="file to write (mode 0600), or - for stdout")  # fmt: skip
    p.set_defaults(func=_token)
    p = lic_sub.add_parser("revoke", help="revoke a licence")
    p.add_argument("licence_id", help="the licence's id (vault licence list), or its file")
    admin_opts(p)
    p.set_defaults(func=_revoke)
    p = lic_sub.add_parser("list", help="list licences")
    admin_opts(p)
    p.set_defaults(func=_list)
