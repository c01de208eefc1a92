"""Publisher commands: ``vault seal``, ``vault inspect``, ``vault verify``.

Example::

    $ vault seal model.onnx --pre pre.onnx --model-id resnet --licence admin.licence -o resnet.vault
    $ vault inspect resnet.vault
    $ vault verify resnet.vault --publisher ks/publisher.pub
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from ..core.errors import ConfigError, VaultError
from ..core.graphs import shape_text

__all__ = ["register"]


def register(sub: Any) -> None:
    p = sub.add_parser("seal", help="seal an ONNX pipeline into a .vault package")
    p.add_argument("model", help="the model graph (.onnx)")
    p.add_argument("--pre", help="pre-process graph (.onnx)")
    p.add_argument("--post", help="post-process graph (.onnx)")
    p.add_argument("--model-id", required=True)
    p.add_argument(
        "--licence",
        "--license",
        dest="licence",
        help="admin licence: the key is registered with its key server",
    )
    p.add_argument("--signing-key", help="Ed25519 key (default: publisher.key beside the licence)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="STAGE:OUT=IN",
        help="wire a differently named tensor, e.g. pre:pixels=input or post:logits=x",
    )
    p.add_argument(
        "--split-point",
        action="append",
        default=[],
        metavar="TENSOR",
        help="a model tensor the hybrid may cut at (repeatable)",
    )
    p.add_argument("--key-out", help="without a key server: write the package key here (0600)")
    p.add_argument(
        "--batchable",
        action="store_true",
        help="declare dim 0 of every input and output a batch of independent rows, so a "
        "worker service may join different callers' calls into one batch; checked here by "
        "running the pipeline on random rows together and apart (refused if any output row "
        "depends on another row)",
    )
    p.set_defaults(func=_seal)

    p = sub.add_parser(
        "inspect", help="show a package's public manifest (no key needed), or what a licence allows"
    )
    p.add_argument("package")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("verify", help="check a package's publisher signature (no key needed)")
    p.add_argument("package")
    p.add_argument("--publisher", required=True, help="publisher public key (publisher.pub)")
    p.set_defaults(func=_verify)


def _parse_maps(items: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in items:
        stage, sep, rest = item.partition(":")
        src, eq, dst = rest.partition("=")
        if not sep or not eq or stage not in ("pre", "post") or not src or not dst:
            raise ConfigError(f"--map {item!r}: expected pre:OUT=IN or post:OUT=IN")
        out.setdefault(stage, {})[src] = dst
    return out


class _Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty()
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total < (64 << 20):
            return
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        rate = done / max(now - self.start, 1e-9) / 1e6
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac:6.1%} {rate:8.0f} MB/s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def publisher_credentials(args: argparse.Namespace, what: str) -> tuple[Any, str]:
    """The admin licence (or None with ``--key-out``) and the signing key path
    of a publisher command (``vault seal``, ``vault split``): the signing key
    defaults to the ``publisher.key`` beside the admin licence."""
    from ..core.licence import Licence

    licence = Licence.load(args.licence) if args.licence else None
    if licence is None and not args.key_out:
        raise ConfigError(
            "name a key server (--licence admin.licence) or --key-out: otherwise the "
            "package key would be lost"
        )
    if licence is not None and not licence.is_admin:
        raise ConfigError(f"{args.licence}: {what} needs an admin licence")
    signing = args.signing_key
    if signing is None:
        if args.licence is None:
            raise ConfigError("--signing-key is required without --licence")
        signing = os.path.join(os.path.dirname(os.path.abspath(args.licence)), "publisher.key")
    if not os.path.exists(signing):
        raise ConfigError(f"signing key {signing} not found (pass --signing-key)")
    if licence is not None:
        check_signing_key(licence, str(signing), args.licence)
    return licence, str(signing)


def check_signing_key(licence: Any, signing: str, licence_path: str) -> None:
    """Refuse a signing key that is not the publisher key the licence's key
    server trusts (``DIR/publisher.pub`` of ``vault keyserver init DIR``,
    carried in every licence it issues): every worker checks a package's
    signature against that key, so such a package could never be opened.
    Before, ``--licence ks2/admin.licence --signing-key ks/publisher.key``
    sealed, registered the key with ks2, and every open failed with a bare
    'package failed to authenticate or decrypt'."""
    import base64
    import binascii

    from ..core.crypto import PublisherKey, fingerprint

    if not licence.publisher_key:
        return  # a licence from a key server before publisher keys: nothing to compare
    try:
        trusted = fingerprint(base64.b64decode(licence.publisher_key, validate=True))
    except (binascii.Error, ValueError):
        return  # the key server checks it again at registration
    mine = PublisherKey.load(signing).fingerprint
    if mine != trusted:
        raise ConfigError(
            f"signing key {signing} ({mine}) is not the publisher key the key server of "
            f"{licence_path} trusts ({trusted}): no licence it issues could open the package. "
            "Sign with the publisher.key made beside that admin licence (vault keyserver init "
            "DIR: DIR/publisher.key), or name that key server's admin licence"
        )


def _seal(args: argparse.Namespace) -> int:
    from ..core.crypto import PublisherKey, zeroize
    from ..core.licence import write_private_file
    from ..sealing import seal

    licence, signing = publisher_credentials(args, "sealing")
    result = seal(
        args.model,
        pre=args.pre,
        post=args.post,
        model_id=args.model_id,
        signing_key=PublisherKey.load(signing),
        output=args.output,
        io_map=_parse_maps(args.map),
        split_points=args.split_point,
        progress=_Progress("sealing"),
        batchable=args.batchable,
    )
    try:
        if licence is not None:
            from ..core.keyclient import KeyServerClient

            try:
                with KeyServerClient(licence) as ks:
                    ks.register_key(
                        model_id=result.model_id,
                        key_id=result.key_id,
                        key=result.key,
                        package_digest=result.digest,
                        publisher=result.manifest["publisher"]["fingerprint"],
                    )
            except VaultError:
                os.unlink(result.path)  # a package whose key is nowhere is useless
                raise
            where = f"key registered with {licence.keyserver_address}"
        else:
            write_private_file(args.key_out, bytes(result.key).hex().encode() + b"\n")
            where = f"key written to {args.key_out} (mode 0600): keep it secret"
    finally:
        zeroize(result.key)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    size = os.path.getsize(result.path)
    print(f"sealed {result.model_id} -> {result.path} ({size:,} bytes)")
    print(f"  key id   {result.key_id}")
    print(f"  digest   {result.digest}")
    if args.batchable:
        print("  batchable: declared, and checked on random rows together and apart")
    print(f"  {where}")
    return 0


def format_manifest(m: dict[str, Any]) -> str:
    lines = [
        f"model id      {m['model_id']}",
        f"key id        {m['key_id']}",
        f"publisher     {m['publisher']['fingerprint']}",
        f"created       {m['created']}",
        f"stages        {' -> '.join(m['stages'])}"
        + (" (composed into one graph)" if m.get("composed") and len(m["stages"]) > 1 else ""),
        f"payload       {m['payload']['plaintext_size']:,} bytes, {m['payload']['cipher']}",
        "batchable     "
        + (
            "yes (declared by the publisher: dim 0 is a batch of independent rows)"
            if m.get("batchable") is True
            else "no (a service never joins different callers' calls)"
        ),
        "inputs",
    ]
    for t in m["inputs"]:
        lines.append(f"  {t['name']:<24} {t['dtype']:<10} {shape_text(t['shape'])}")
    lines.append("outputs")
    for t in m["outputs"]:
        lines.append(f"  {t['name']:<24} {t['dtype']:<10} {shape_text(t['shape'])}")
    if m.get("split_points"):
        lines.append("split points  " + ", ".join(m["split_points"]))
    return "\n".join(lines)


def licence_lines(lic: Any, now: float) -> list[str]:
    """What a licence allows, as the key server issued it (its record decides:
    usage, and a revocation, are in `vault licence list`)."""
    from .cli_keyserver import describe_rate

    def when(ts: float) -> str:
        import datetime as _dt

        at = _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        left = ts - now
        span = abs(left)
        human = (f"{span / 86400:.1f} days" if span >= 86400 else f"{span / 3600:.1f} h"
                 if span >= 3600 else f"{span / 60:.0f} min")  # fmt: skip
        return f"{at} ({'in ' + human if left > 0 else 'EXPIRED ' + human + ' ago'})"

    models = [lic.model_id] if lic.model_id else []
    lines = [
        f"kind:       {lic.kind}"
        + {"runtime": " (use through an enrolled device: vault daemon or a service)",
           "call": " (call a vendor-hosted service; gives no key)",
           "admin": " (issue, revoke, list; register keys; enroll devices)"}.get(lic.kind, ""),
        f"models:     {', '.join(models) if models else 'any (admin)'}",
        f"expires:    {when(lic.expires_at) if lic.expires_at is not None else 'never'}",
        f"quota:      {f'{lic.max_calls:,} calls' if lic.max_calls is not None else 'unlimited'}",
        f"rate:       {describe_rate(lic.rate_limit) if lic.rate_limit else 'unlimited'}",
        f"grace:      {f'{lic.grace:g} s offline' if lic.grace else 'none (the key server must answer)'}",
        f"devices:    {', '.join(lic.devices) if lic.devices else 'any enrolled device'}",
        f"key server: {lic.keyserver_address}",
    ]  # fmt: skip
    if lic.kind != "admin" and not lic.limits():  # a file from a key server before limits
        lines[2:6] = ["limits:     not in this file (an older key server): vault licence list"]
    elif lic.kind == "admin":
        del lines[2:6]
    return lines


def _licence_summary(path: str, as_json: bool) -> bool:
    """``vault inspect NAME.licence``: what a licence allows, without its secrets.
    Returns False when ``path`` is not a licence file."""
    from ..core.files import open_regular
    from ..core.licence import Licence

    try:
        fd = open_regular(path, what="file")
    except VaultError:
        return False  # not a regular file: the package reader says what it is
    try:
        if os.pread(fd, 1, 0) != b"{":
            return False
    finally:
        os.close(fd)
    lic = Licence.load(path)
    pub = lic.public_copy().to_json()
    for secret in ("client", "proof_key"):
        pub.pop(secret, None)
    if as_json:
        print(json.dumps(pub, indent=2, sort_keys=True))
        return True
    print(f"licence {lic.licence_id} ({lic.kind}) held by {lic.holder}")
    for line in licence_lines(lic, time.time()):
        print(f"  {line}")
    if lic.same_user:
        from .cli_keyserver import SAME_USER_WARNING

        print(f"  SAME-USER:  {SAME_USER_WARNING}")
    return True


def _inspect(args: argparse.Namespace) -> int:
    from ..core.package import inspect

    if _licence_summary(args.package, args.json):
        return 0
    manifest = inspect(args.package)
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
    else:
        print(format_manifest(manifest))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ..core.files import read_regular
    from ..core.package import Package

    pub = read_regular(args.publisher, limit=64 << 10, what="publisher key")
    with Package.load(args.package) as pkg:
        pkg.verify(pub)
        print(f"OK: {args.package} is signed by {pkg.publisher_fingerprint}")
        print(f"    package digest {pkg.digest}")
    return 0
