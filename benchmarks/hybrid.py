"""The latency-split hybrid over emulated links: all-local, all-server, the planner's
cut and every allowed cut (the oracle), for MobileNetV2 and ResNet-50.

Set-up, per model: the vendor allows cuts at the end of each stage (the tensors
listed in ``SPLIT_POINTS``, found as single-tensor cuts of the graph) and the
planner may also send the input (all-server). The caller is slow (one
onnxruntime thread, in-process head); the server worker uses every core. The
link is :class:`benchmarks.linkproxy.LinkProxy` between the client and each
worker: a user-space proxy that delays (RTT/2 each way) and rate-limits.

Every row (all-local, all-server, each cut) is up at once, each worker behind its
own emulated link; per link, one warm-up call per row, then rounds of one call
per row, interleaved, and each row's median. A cut whose predicted
time is above a cap (a few seconds per call at 2 Mbit/s) is not measured; its
prediction is reported instead, and the oracle is the best *measured* cut.
The planner uses ``vault profile``-style per-node costs of both sides (the
client profiled with one thread, the server with all) and the link's nominal
RTT and bandwidth. Pipelining: K calls through ``compute_many`` against K
sequential calls, at the planner's cut.

Example::

    python -m benchmarks --sections hybrid --quick
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vault.core.process import stop_process

from . import models
from .context import Context
from .harness import Unavailable
from .linkproxy import LinkProxy

LINKS = [(5.0, 1000.0), (20.0, 100.0), (50.0, 10.0), (100.0, 2.0)]


def _stage_ends(m: Any) -> list[str]:
    """The vendor's split points: per spatial resolution, the smallest single-tensor cut
    (a stage's bottleneck output), and the pooled features before the classifier."""
    from vault.hybrid.cut import CutGraph, Policy

    g = CutGraph(m)
    best: dict[tuple[int, ...], tuple[int, str]] = {}
    for c in g.candidates(Policy(protect_from=frozenset({"logits"}))):
        t = c.tensors[0]
        if c.crossing != [t] or t in g.outputs:
            continue
        shape = tuple(d.dim_value for d in g.value_info(t).type.tensor_type.shape.dim)
        if shape[-1:] == (1000,):  # the logits themselves: no cut
            continue
        size = int(np.prod(shape))
        res = shape[2:] if len(shape) == 4 and shape[2:] != (1, 1) else (1, 1)
        if res not in best or size <= best[res][0]:  # ties: the later (deeper) one
            best[res] = (size, t)
    return [t for _, t in best.values()]


def _profiles(m: Any, rounds: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Client (1 thread) and server (all cores) profiles, taken in alternating rounds of
    3 runs so that a burst of load from other jobs hits both sides alike; per node,
    the median over rounds."""
    from vault.hybrid.profile import profile_model

    runs: dict[str, list[dict[str, Any]]] = {"client": [], "server": []}
    for _ in range(rounds):
        runs["client"].append(profile_model(m, repeats=3, threads=1))
        runs["server"].append(profile_model(m, repeats=3))
    out = []
    for side in ("client", "server"):
        profs = runs[side]
        merged = dict(profs[0])
        merged["nodes"] = {k: statistics.median(p["nodes"][k] for p in profs)
                           for k in profs[0]["nodes"]}  # fmt: skip
        merged["run_ms"] = statistics.median(p["run_ms"] for p in profs)
        merged["repeats"] = 3 * rounds
        out.append(merged)
    return out[0], out[1]


def _one_model(
    name: str, m: Any, quick: bool, env: Any, work: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    import onnxruntime as ort

    import vault
    from vault.core.crypto import PublisherKey
    from vault.core.keyclient import KeyServerClient
    from vault.core.licence import Licence
    from vault.hybrid.client import HybridModel
    from vault.hybrid.plan import CutCost, Link, plan

    reps = 3 if quick else 5
    cap_ms = 1500.0 if quick else 4000.0
    feeds = models.example_feeds(m)
    points = _stage_ends(m)
    if quick:  # the two deepest stage ends
        points = points[-2:]
    log(f"  {name}: profiling client (1 thread) and server (all cores)")
    client_prof, server_prof = _profiles(m, rounds=2 if quick else 5)

    admin = Licence.load(env.admin_path)
    ks = KeyServerClient(admin)

    def register(res: Any) -> None:
        ks.register_key(model_id=res.model_id, key_id=res.key_id, key=res.key,
                        package_digest=res.digest)  # fmt: skip

    from vault.hybrid.publish import split

    out = work / f"{name}.split"
    log(f"  {name}: splitting at {len(points)} stage ends")
    res = split(m, model_id=name, signing_key=PublisherKey.load(env.ks_dir / "publisher.key"),
                output_dir=out, at=[[p] for p in points], split_points=points,
                client_costs=client_prof, server_costs=server_prof, register=register,
                calibration=[feeds])  # fmt: skip
    caller = ks.issue(f"{name}.head", holder="caller")
    caller_path = work / f"{name}-caller.licence"
    caller.save(caller_path)
    cuts = res.description["cuts"]

    in_bytes = sum(v.nbytes for v in feeds.values())
    out_bytes = 1000 * 4
    costs = {
        "all-server": CutCost(
            "all-server", 0.0, sum(server_prof["nodes"].values()), in_bytes, out_bytes
        ),  # fmt: skip
        **{c["name"]: CutCost.from_json(c["cost"]) for c in cuts},
    }
    label = {"all-local": "all-local", "all-server": "all-server",
             **{c["name"]: c["at"][0] for c in cuts}}  # fmt: skip
    predicted = {k: {f"{r:g}/{b:g}": c.total_ms(Link(r, b)) for r, b in LINKS}
                 for k, c in costs.items()}  # fmt: skip
    chosen = {f"{r:g}/{b:g}": plan(list(costs.values()), Link(r, b))[0].cut for r, b in LINKS}

    # every row side by side: one worker and one emulated link per row, all up at once,
    # so that a row and its rivals are measured interleaved, round by round
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    local = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    callers: dict[str, Callable[[], Any]] = {"all-local": lambda: local.run(None, feeds)}
    proxies: dict[str, LinkProxy] = {}
    models_open: list[Any] = []
    started: list[Any] = []
    try:
        log(f"  {name}: all-server worker")
        pkg, lic = env.seal(m, f"{name}-whole")
        srv = env.serve_tcp(pkg, lic)
        started.append((srv, env._procs[-1]))  # noqa: SLF001
        host, port = srv._endpoint.removeprefix("tcp://").rsplit(":", 1)  # noqa: SLF001
        proxies["all-server"] = LinkProxy(host, int(port), rtt_ms=LINKS[0][0], mbit=LINKS[0][1],
                                          sealed_port=srv._bench_sealed_port)  # noqa: SLF001  # fmt: skip
        whole = vault.connect(proxies["all-server"].address, licence=lic,
                              server_key=srv._remote.server_key, timeout=120)  # noqa: SLF001  # fmt: skip
        models_open.append(whole)
        callers["all-server"] = lambda: whole.compute(feeds)
        for c in cuts:
            log(f"  {name}: tail worker for cut {c['name']} at {c['at'][0]}")
            srv_lic = ks.issue(
                c["tail_model_id"], holder=f"server-{c['name']}", same_user=True
            )  # the vendor's own server: no device here
            srv_path = work / f"{name}-{c['name']}-server.licence"
            srv_lic.save(srv_path)
            allow = env.dir / f"allow-{Path(c['tail']).stem}"  # VaultEnv's allow-list for it
            allow.mkdir(exist_ok=True)
            (allow / "caller.pub").write_text(caller.client_public_key + "\n")
            tail = env._serve_tcp(out / c["tail"], srv_path, None, probe=False)  # noqa: SLF001
            started.append((tail, env._procs[-1]))  # noqa: SLF001
            host, port = tail._endpoint.removeprefix("tcp://").rsplit(":", 1)  # noqa: SLF001
            proxies[c["name"]] = LinkProxy(host, int(port), rtt_ms=LINKS[0][0], mbit=LINKS[0][1],
                                           sealed_port=tail._bench_sealed_port)  # noqa: SLF001  # fmt: skip
            hm = HybridModel(out, caller_path, server=proxies[c["name"]].address,
                             server_key=tail._remote.server_key, cut=c["name"],  # noqa: SLF001
                             replan=False, head_threads=1, timeout=120)  # fmt: skip
            models_open.append(hm)
            callers[c["name"]] = lambda hm=hm: hm.compute(feeds)

        measured: dict[str, dict[str, float | None]] = {k: {} for k in callers}
        pipelining: dict[str, Any] = {}
        for rtt, mbit in LINKS:
            lk = f"{rtt:g}/{mbit:g}"
            log(f"  {name}: link {rtt:g} ms / {mbit:g} Mbit/s")
            for p in proxies.values():
                p.set(rtt_ms=rtt, mbit=mbit)
            rows = [k for k in callers if k == "all-local" or predicted[k][lk] <= cap_ms]
            samples: dict[str, list[float]] = {k: [] for k in rows}
            for k in rows:
                callers[k]()  # warm-up on this link
            for _ in range(reps):
                for k in rows:
                    t0 = time.perf_counter()
                    callers[k]()
                    samples[k].append((time.perf_counter() - t0) * 1e3)
            for k in callers:
                measured[k][lk] = statistics.median(samples[k]) if k in samples else None
            best = chosen[lk]
            if best != "all-server" and measured[best][lk] is not None:
                hm = next(x for x in models_open if getattr(x, "cut", None) == best)
                n = 4 if quick else 8
                hm.compute_many([feeds] * 2)  # each in-flight slot opens its connection
                t0 = time.perf_counter()
                for _ in range(n):
                    hm.compute(feeds)
                seq = time.perf_counter() - t0
                t0 = time.perf_counter()
                hm.compute_many([feeds] * n)
                pipe = time.perf_counter() - t0
                pipelining[lk] = {"calls": n, "sequential_per_s": n / seq,
                                  "pipelined_per_s": n / pipe, "gain": seq / pipe}  # fmt: skip
    finally:
        for x in models_open:
            x.close()
        for p in proxies.values():
            p.close()
        for handle, proc in started:
            handle.close()
            stop_process(proc, 10)
        ks.close()

    rows = []
    for rtt, mbit in LINKS:
        lk = f"{rtt:g}/{mbit:g}"
        meas = {k: v[lk] for k, v in measured.items() if v.get(lk) is not None and k != "all-local"}
        oracle = min(meas, key=lambda k: meas[k]) if meas else None
        hybrid = {k: v for k, v in meas.items() if k != "all-server"}
        best_hybrid = min(hybrid, key=lambda k: hybrid[k]) if hybrid else None
        pick = chosen[lk]
        rows.append({
            "link": lk,
            "all_local_ms": measured["all-local"][lk],
            "all_server_ms": measured["all-server"].get(lk),
            "all_server_predicted_ms": predicted["all-server"][lk],
            "planner_cut": label[pick],
            "planner_ms": meas.get(pick),
            "planner_predicted_ms": predicted[pick][lk],
            "oracle_cut": label[oracle] if oracle else None,
            "oracle_ms": meas.get(oracle) if oracle else None,
            "best_hybrid_cut": label[best_hybrid] if best_hybrid else None,
            "best_hybrid_ms": hybrid.get(best_hybrid) if best_hybrid else None,
            "cuts": {label[k]: {"measured_ms": measured[k].get(lk),
                                "predicted_ms": predicted[k][lk]} for k in costs},
            "pipelining": pipelining.get(lk),
        })  # fmt: skip
    return {
        "split_points": points,
        "client_profile_ms": client_prof["run_ms"],
        "server_profile_ms": server_prof["run_ms"],
        "reps": reps,
        "cap_ms": cap_ms,
        "rows": rows,
    }


def section(ctx: Context) -> dict[str, Any]:
    return run(ctx.quick, ctx.env, ctx.workdir, ctx.log)


def run(quick: bool, env: Any, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    if env is None:
        raise Unavailable("no key server (VaultEnv) for the hybrid rows")
    out: dict[str, Any] = {"links": [f"{r:g} ms / {b:g} Mbit/s" for r, b in LINKS]}
    for name, build in (("mobilenet_v2", models.mobilenet_v2), ("resnet50", models.resnet50)):
        out[name] = _one_model(name, build(), quick, env, work, log)
    return out


def table(res: dict[str, Any]) -> list[str]:
    """Rows for the report: per model and link, the extremes, planner and oracle."""
    lines = ["hybrid (slow client: 1 thread; server: all cores; emulated link):"]

    def ms(v: Any) -> str:
        return "   -    " if v is None else f"{v:8.1f}"

    for name in ("mobilenet_v2", "resnet50"):
        r = res.get(name)
        if not isinstance(r, dict) or "rows" not in r:
            continue
        lines.append(f"  {name}: {'link':>9} {'local':>8} {'server':>8} {'planner':>8} "
                     f"{'oracle':>8}  planner cut / oracle cut   pipelined x")  # fmt: skip
        for row in r["rows"]:
            pipe = row.get("pipelining") or {}
            gain = f"{pipe['gain']:.2f}" if pipe else "-"
            lines.append(
                f"  {'':{len(name)}}  {row['link']:>9} {ms(row['all_local_ms'])} "
                f"{ms(row['all_server_ms'])} {ms(row['planner_ms'])} {ms(row['oracle_ms'])}  "
                f"{row['planner_cut']} / {row['oracle_cut']}   {gain}"
            )
    return lines


def plot(res: dict[str, Any], path: Path) -> Path | None:
    """Bars per link: all-local, all-server, the planner's cut, the oracle (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [n for n in ("mobilenet_v2", "resnet50") if isinstance(res.get(n), dict)]
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    kinds = [("all_local_ms", "all-local (1 thread)"), ("all_server_ms", "all-server"),
             ("planner_ms", "hybrid: planner"), ("oracle_ms", "oracle (best measured)")]  # fmt: skip
    for ax, name in zip(axes[0], names):
        rows = res[name]["rows"]
        xs = range(len(rows))
        for k, (key, label) in enumerate(kinds):
            vals = [r.get(key) or 0.0 for r in rows]
            ax.bar([x + (k - 1.5) * 0.2 for x in xs], vals, width=0.2, label=label)
        ax.set_xticks(list(xs), [r["link"].replace("/", " ms\n") + " Mbit/s" for r in rows])
        ax.set_yscale("log")
        ax.set_ylabel("latency per call, ms (log)")
        ax.set_title(f"{name}: hybrid over emulated links")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
