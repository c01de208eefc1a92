"""``vault split`` and ``vault profile``: the latency-split hybrid, publisher side.

Example::

    $ vault profile model.onnx -o phone.json --threads 1          # on the caller's device
    $ vault split model.onnx --protect-from block3 --auto --rtt 20 --bandwidth 100 \\
          --client-costs phone.json --model-id clf --licence admin.licence -o clf.split
    $ vault split model.onnx --split-point h2 --at h2 --model-id clf \\
          --licence admin.licence -o clf.split
    $ vault worker serve clf.split/tail-c0.vault --licence server.licence --allow clients/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..core.argtypes import positive_int
from ..core.errors import ConfigError, VaultError
from ..core.graphs import shape_text

__all__ = ["register"]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "profile", help="per-node latency of a model on this device (for the planner)"
    )
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="the profile (JSON)")
    p.add_argument(
        "--repeats", type=positive_int, default=10, help="runs; each node's median is kept"
    )
    p.add_argument(
        "--threads", type=positive_int, default=None, help="onnxruntime intra-op threads"
    )
    p.add_argument("--calibration", metavar="INPUTS.npz",
                   help="example inputs (NAME -> [K, ...] arrays, as vault split takes); the "
                        "first row is profiled (default: made-up, each symbolic dim 1)")  # fmt: skip
    p.set_defaults(func=_profile)

    s = sub.add_parser(
        "split", help="cut a model: a head for the caller, a sealed tail for a server"
    )
    s.add_argument("model")
    s.add_argument("--pre", help="pre-process graph (.onnx)")
    s.add_argument("--post", help="post-process graph (.onnx)")
    s.add_argument("--model-id", required=True)
    s.add_argument("--licence", "--license", dest="licence",
                   help="admin licence: the keys are registered with its key server")  # fmt: skip
    s.add_argument("--signing-key", help="Ed25519 key (default: publisher.key beside the licence)")
    s.add_argument("-o", "--output", required=True, help="the split directory")
    how = s.add_mutually_exclusive_group()  # neither: list the cuts this model has
    how.add_argument("--at", action="append", metavar="TENSOR[,TENSOR...]",
                     help="cut at these tensors (one cut; repeat to ship several; "
                          "'(inputs)': also ship the all-server cut)")  # fmt: skip
    how.add_argument("--auto", action="store_true", help="let the planner choose")
    s.add_argument("--rtt", type=float, help="link round-trip time, ms (--auto)")
    s.add_argument("--bandwidth", type=float, help="link bandwidth, Mbit/s (--auto)")
    s.add_argument("--client-costs", help="the caller device's profile (vault profile)")
    s.add_argument("--server-costs", help="the server's profile (default: profile here)")
    s.add_argument("--alternatives", type=int, default=0,
                   help="with --auto, also ship the next N cuts (the client re-plans among them)")  # fmt: skip
    s.add_argument("--split-point", action="append", default=[], metavar="TENSOR",
                   help="a tensor a cut may be made at (repeatable)")  # fmt: skip
    s.add_argument("--protect-from", action="append", default=[], metavar="TENSOR",
                   help="everything downstream of TENSOR stays on the server (repeatable)")  # fmt: skip
    s.add_argument("--seal-head", action="store_true", help="seal the head for a local worker")
    s.add_argument("--batchable", action="store_true",
                   help="seal each tail declared batchable (as vault seal --batchable, checked "
                        "on the tail): the service may join callers' tail calls")  # fmt: skip
    s.add_argument("--encoding", choices=("float32", "float16", "int8"), default="float32",
                   help="wire encoding of float cut tensors (checked on calibration inputs)")  # fmt: skip
    s.add_argument("--max-error", type=float, default=0.05,
                   help="largest output error an encoding may cause (default 0.05)")  # fmt: skip
    s.add_argument("--min-agreement", type=float, default=0.99,
                   help="smallest top-1 agreement an encoding must keep (default 0.99)")  # fmt: skip
    s.add_argument("--calibration", metavar="INPUTS.npz",
                   help=".npz of calibration inputs (NAME -> [K, ...] arrays, one row each, or "
                        "[K, *shape], K whole inputs, for a fixed batch): "
                        "the accuracy check runs them, the profile the first (default: made-up "
                        "inputs, each symbolic dim 1; --encoding int8 needs real ones)")  # fmt: skip
    s.add_argument("--server-key", help="the tail worker's CURVE public key, recorded for callers")
    s.add_argument("--key-out", help="without a key server: write the package keys here (0600)")
    s.set_defaults(func=_split)


def _profile(args: argparse.Namespace) -> int:
    import onnx

    from ..core.files import write_private_file
    from ..hybrid.profile import profile_model

    try:
        model = onnx.load(args.model)
    except Exception as exc:  # noqa: BLE001 - onnx raises many kinds
        raise ConfigError(f"{args.model}: not an ONNX model ({exc.__class__.__name__})") from exc
    feeds = None
    if args.calibration:
        rows = _calibration(args.calibration, args.model)
        if not rows:
            raise ConfigError(f"{args.calibration}: holds no input")
        feeds = rows[0]
    hint = "give real example inputs: vault profile --calibration inputs.npz (NAME -> [K, ...])"
    prof = profile_model(model, repeats=args.repeats, threads=args.threads, feeds=feeds,
                         hint=hint)  # fmt: skip
    write_private_file(args.output, (json.dumps(prof, indent=1, sort_keys=True) + "\n").encode())
    top = sorted(prof["nodes"].items(), key=lambda kv: -kv[1])[:5]
    print(f"{len(prof['nodes'])} nodes, median run {prof['run_ms']:.2f} ms -> {args.output}")
    for name, ms in top:
        print(f"  {name:<30} {ms:8.3f} ms")
    return 0


def _calibration(path: str, model: str, pre: str | None = None) -> list[dict[str, Any]]:
    """The example inputs in ``path`` (an .npz, ``NAME -> [K, ...]``), one dict
    per example. An array of the input's own rank gives K examples of one row
    each (``a[i:i+1]``); an array of one rank more gives K whole inputs
    (``a[i]``): how a model whose batch dim is fixed (``[4, 3, 224, 224]``)
    gets its examples, as ``[K, 4, 3, 224, 224]``."""
    import numpy as np
    import onnx

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read an .npz of inputs ({exc})") from exc
    ranks: dict[str, int] = {}
    first = pre or model
    try:
        graph = onnx.load(first, load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001 - onnx raises many kinds
        raise ConfigError(f"{first}: not an ONNX model ({exc.__class__.__name__})") from exc
    for vi in graph.input:
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            ranks[vi.name] = len(tt.shape.dim)
    whole = {k for k, a in arrays.items() if k in ranks and a.ndim == ranks[k] + 1}
    if whole and len(whole) != len(arrays):
        raise ConfigError(
            f"{path}: give every input with a leading examples axis ([K, *its shape]: "
            f"{sorted(whole)}) or none (one row each)"
        )
    n = min(len(a) for a in arrays.values()) if arrays else 0
    if whole:
        return [{k: a[i] for k, a in arrays.items()} for i in range(n)]
    return [{k: a[i : i + 1] for k, a in arrays.items()} for i in range(n)]


def _split(args: argparse.Namespace) -> int:
    from ..core.crypto import PublisherKey
    from ..hybrid.plan import Link
    from ..hybrid.profile import load_profile
    from ..hybrid.publish import split, write_key_file
    from .cli_package import publisher_credentials

    if not args.auto and not args.at:
        # no cut named: list what there is to choose from, write nothing
        from ..hybrid.publish import cut_options

        opts = cut_options(args.model, pre=args.pre, post=args.post,
                           split_points=args.split_point, protect_from=args.protect_from)  # fmt: skip
        print(opts.table())
        raise ConfigError(
            "no cut named: cut at one of the tensors above (--at TENSOR, allowed by "
            "--split-point TENSOR or --protect-from TENSOR), or let the planner choose (--auto)"
        )
    licence, signing = publisher_credentials(args, "splitting")
    link = None
    if args.auto:
        if args.rtt is None or args.bandwidth is None:
            raise ConfigError("--auto needs --rtt MS and --bandwidth MBIT")
        link = Link(args.rtt, args.bandwidth)
    elif args.rtt is not None or args.bandwidth is not None or args.alternatives:
        raise ConfigError("--rtt, --bandwidth and --alternatives are for the planner: "
                          "with --auto (not with --at)")  # fmt: skip
    at = [[t for t in item.split(",") if t] for item in args.at or []]

    ks: Any = None
    if licence is not None:
        from ..core.keyclient import KeyServerClient

        ks = KeyServerClient(licence)

    def register(res: Any) -> None:
        if ks is not None:
            ks.register_key(model_id=res.model_id, key_id=res.key_id, key=res.key,
                            package_digest=res.digest,
                            publisher=res.manifest["publisher"]["fingerprint"])  # fmt: skip
        else:
            os.makedirs(args.key_out, mode=0o700, exist_ok=True)
            write_key_file(os.path.join(args.key_out, f"{res.model_id}.key"), res)

    try:
        result = split(
            args.model, pre=args.pre, post=args.post, model_id=args.model_id,
            signing_key=PublisherKey.load(signing), output_dir=args.output, at=at, link=link,
            split_points=args.split_point, protect_from=args.protect_from,
            seal_head=args.seal_head, encoding=args.encoding, max_error=args.max_error,
            min_agreement=args.min_agreement,
            calibration=(_calibration(args.calibration, args.model, args.pre)
                         if args.calibration else None),
            client_costs=load_profile(args.client_costs) if args.client_costs else None,
            server_costs=load_profile(args.server_costs) if args.server_costs else None,
            alternatives=args.alternatives, register=register, server_key=args.server_key,
            log=lambda msg: print(msg, file=sys.stderr), batchable=args.batchable,
        )  # fmt: skip
    except VaultError:
        raise
    finally:
        if ks is not None:
            ks.close()
    if result.table:
        print(result.table)
    for c in result.description["cuts"]:
        cross = ", ".join(
            f"{x['name']} {x['encoding']} {shape_text(x['shape'])}" for x in c["crossing"]
        )
        print(f"cut {c['name']} at {','.join(c['at'])}: head {c['head'] or '(none: all on server)'}"
              f", tail {c['tail']} ({c['tail_model_id']})")  # fmt: skip
        print(f"  crossing: {cross}")
        acc = c["accuracy"]
        if acc.get("checked"):
            print(f"  head∘tail vs whole: max abs error {acc['max_abs_error']:.3g}, "
                  f"top-1 agreement {acc['top1_agreement']}")  # fmt: skip
    print(f"wrote {os.path.join(result.directory, 'split.json')}")
    where = f"registered with {licence.keyserver_address}" if licence else f"in {args.key_out}"
    print(f"keys {where}; serve each tail with: vault worker serve TAIL.vault --licence ...")
    return 0
