"""The printed table and the PNG plot of one run's results."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:9.3f}"


def table(res: dict[str, Any]) -> str:
    L: list[str] = []
    m = res["machine"]
    L.append(
        f"vault benchmarks ({'quick' if res['quick'] else 'full'}) on {m['cpu']}, {m['cores']} cores, "
        f"load {m['loadavg_at_start']}, onnxruntime {res['versions'].get('onnxruntime')}, "
        f"libzmq {res['versions'].get('libzmq')}, took {res.get('elapsed_s', 0):.0f}s"
    )
    L.append(f"GPU rows: {res['gpu']}")
    lat = res.get("latency") or {}
    if isinstance(lat, dict) and lat.get("unavailable_all"):
        L.append(f"\n1. latency: unavailable: {lat['unavailable_all']}")
    elif lat:
        L.append(
            "\n1. per-call latency, ms: median (p99); same run, alternating blocks; "
            "in_process = worker's options (spinning bounded), in_process_default = onnxruntime's"
        )
        groups = [
            ["in_process", "in_process_default", "vault_ipc", "vault_ipc_zmq", "zmq_echo_ipc"],
            ["unix_echo", "memcpy", "vault_tcp", "vault_tcp_curve", "fastapi_raw"],
            ["fastapi_tls", "grpc_tls", "raw_server", "raw_shm", "vault_ipc_nowait"],
            ["zmq_echo_tcp", "zmq_echo_tcp_sealed", "zmq_echo_tcp_curve", "tcp_echo", "tls_echo"],
        ]  # local (direct channel, ZeroMQ); remote (sealed, CURVE alone; peers); remote floors
        for modes in groups:
            L.append(f"{'model':<14}" + "".join(f"{x:>20}" for x in modes))
            for name, row in lat.items():
                cells = []
                for x in modes:
                    r = row["rows"].get(x)
                    cells.append(
                        f"{r['median_s'] * 1e3:9.3f} ({r['p99_s'] * 1e3:7.2f})"
                        if r
                        else f"{'unavailable':>20}"
                    )
                L.append(f"{name:<14}" + "".join(f"{c:>20}" for c in cells))
        L.append(
            f"{'model':<14}{'batch':>6}{'in MB':>8}{'out MB':>8}{'ipc ovh ms':>12}{'ovh/echo':>10}"
            f"{'ipc/inproc':>11}{'tcp ovh ms':>12}{'ovh/echo':>10}{'tcp/inproc':>11}"
        )  # tcp: the remote path as callers get it (sealed), against the sealed echo
        for name, row in lat.items():

            def g(k: str, fmt: str, scale: float = 1, row: dict[str, Any] = row) -> str:
                v = row.get(k)
                return "-" if v is None else format(v * scale, fmt)

            L.append(
                f"{name:<14}{row['batch']:>6}{row['in_bytes'] / 1e6:>8.2f}{row['out_bytes'] / 1e6:>8.2f}"
                f"{g('vault_ipc_overhead_s', '.3f', 1e3):>12}{g('vault_ipc_overhead_over_echo', '.2f'):>10}"
                f"{g('vault_ipc_over_in_process', '.3f'):>11}{g('vault_tcp_overhead_s', '.3f', 1e3):>12}"
                f"{g('vault_tcp_overhead_over_echo', '.2f'):>10}{g('vault_tcp_over_in_process', '.3f'):>11}"
            )
        L.append(
            "   thread policy (in_process - in_process_default, ms) / vault_ipc over the "
            "default session: "
            + ", ".join(
                f"{name} {row['thread_policy_s'] * 1e3:+.3f} / "
                f"{row.get('vault_ipc_over_in_process_default', float('nan')):.3f}"
                for name, row in lat.items()
                if "thread_policy_s" in row
            )
        )
        floors = [
            f"{name} {row['raw_floor_over_in_process']:.3f} / {row['vault_ipc_over_raw_floor']:.3f}"
            for name, row in lat.items()
            if "vault_ipc_over_raw_floor" in row
        ]
        if floors:
            L.append(
                "   process boundary (best of raw_server, raw_shm / in_process) / what the vault "
                "adds (vault_ipc / that raw): " + ", ".join(floors)
            )
        wait = "vault_ipc / vault_ipc_nowait, --spin-us 0"
        waits = ", ".join(
            f"{n} {r['short_wait_ratio']:.3f}" for n, r in lat.items() if "short_wait_ratio" in r
        )
        if waits:
            L.append(f"   the local channel's short wait ({wait}): {waits}")
        for mode in ("vault_tcp", "vault_tcp_curve"):
            for peer, what in (
                ("fastapi_raw", "bare HTTP, no TLS"),
                ("fastapi_tls", "HTTPS"),
                ("grpc_tls", "gRPC over TLS"),
            ):
                vs = [
                    f"{name} {row[f'{mode}_over_{peer}']:.3f}"
                    for name, row in lat.items()
                    if f"{mode}_over_{peer}" in row
                ]
                if vs:
                    L.append(f"   {mode} / {peer} ({what}): " + ", ".join(vs))
        for key, what in (
            ("sealed_cost_s", "sealed frames' cost (zmq_echo_tcp_sealed - zmq_echo_tcp)"),
            ("curve_cost_s", "CURVE's cost (zmq_echo_tcp_curve - zmq_echo_tcp)"),
            ("tls_cost_s", "TLS's cost (tls_echo - tcp_echo)"),
        ):
            cc = [f"{name} {row[key] * 1e3:.3f}" for name, row in lat.items() if key in row]
            if cc:
                L.append(f"   {what}, ms: " + ", ".join(cc))
        notes = {row.get("tcp_note") for row in lat.values() if row.get("tcp_note")}
        for n in notes:
            L.append(f"   tcp worker: {n}")
        for name, row in lat.items():
            for k, why in row.get("unavailable", {}).items():
                L.append(f"   {name} {k}: unavailable: {why}")
    bd = res.get("breakdown")
    if bd and "rows" in bd:
        r = {k: v["median_s"] * 1e6 for k, v in bd["rows"].items()}
        L.append(
            "   where a small call's time goes (mlp, us, medians): "
            + ", ".join(f"{k} {v:.0f}" for k, v in r.items())
        )
        if "transport_and_handoffs_s" in bd:
            L.append(
                f"   -> worker Python {bd['worker_python_s'] * 1e6:.0f} us, "
                f"client Python {bd['client_python_s'] * 1e6:.0f} us, "
                f"transport + thread hand-offs {bd['transport_and_handoffs_s'] * 1e6:.0f} us "
                f"(raw zmq echo {r['zmq_echo_ipc']:.0f} us)"
            )
    real = res.get("transformers") or {}
    if real.get("unavailable"):
        L.append(f"\n   real architectures: unavailable: {real['unavailable']}")
    elif real.get("models"):
        L.append("\n   real architectures exported from transformers, ms: median (p99)")
        for name, row in real["models"].items():
            rows = row.get("rows") or {}
            cells = "  ".join(
                f"{k} {rows[k]['median_s'] * 1e3:.3f} ({rows[k]['p99_s'] * 1e3:.2f})"
                for k in ("in_process", "raw_shm", "vault_ipc")
                if k in rows
            )
            ratio = row.get("vault_ipc_over_in_process")
            why = f"  unavailable: {row['unavailable']}" if row.get("unavailable") else ""
            split = ""
            w = row.get("worker_compute_p50_s")
            if w is not None and "vault_ipc" in rows and "in_process" in rows:
                v, p = rows["vault_ipc"]["median_s"], rows["in_process"]["median_s"]
                split = (f"  [worker {w * 1e3:.3f}: its side {(w - p) * 1e3:+.3f}, "
                         f"crossing + caller {(v - w) * 1e3:+.3f}]")  # fmt: skip
            L.append(
                f"   {name:<12}{cells}"
                + (f"  vault/inproc {ratio:.3f}" if ratio is not None else "")
                + split
                + (
                    f"  [process boundary {row['raw_floor_over_in_process']:.3f}, "
                    f"vault/raw {row['vault_ipc_over_raw_floor']:.3f}]"
                    if "vault_ipc_over_raw_floor" in row
                    else ""
                )
                + why
            )
    tp0 = res.get("throughput") or {}
    for tp in (tp0, tp0.get("mlp") or {}):
        if "calls_per_s" not in tp:
            continue
        L.append(
            f"\n2. throughput, {tp['model']} batch {tp['batch']}, calls/s "
            f"(median of {tp['rounds']} windows of {tp['window_s']}s)"
        )
        L.append(
            f"{'callers':<10}"
            + "".join(f"{k:>14}" for k in tp["calls_per_s"])
            + f"{'vault/inproc':>14}"
        )
        for n in tp["calls_per_s"]["in_process"]:
            ratio = (tp.get("vault_over_in_process") or {}).get(n)
            L.append(
                f"{n:<10}"
                + "".join(f"{tp['calls_per_s'][k][n]:>14.1f}" for k in tp["calls_per_s"])
                + f"{'-' if ratio is None else format(ratio, '.3f'):>14}"
            )
        if tp.get("vault_over_raw"):
            L.append(
                "   process boundary (raw_server / in_process) / what the vault adds "
                "(vault_ipc / raw_server): "
                + ", ".join(
                    f"{n} callers {tp['raw_over_in_process'][n]:.3f} / {tp['vault_over_raw'][n]:.3f}"
                    for n in tp["vault_over_raw"]
                )
            )
        for k, why in tp.get("unavailable", {}).items():
            L.append(f"   {k}: unavailable: {why}")
    cold = res.get("coldstart")
    if cold and cold.get("rows"):
        L.append("\n3. cold start, ms (median; p99 = max of few)")
        L.append(
            f"{'size':<8}{'plain_load':>12}{'vault_open':>12}{'diff':>9}{'ratio':>8}{'fresh proc':>12}"
            f"{'verify':>9}{'release':>9}{'decrypt':>9}{'GB/s':>7}{'session':>9}{'spawn+imp':>11}"
            f"{'daemon':>9}{'diff':>7}{'ratio':>7}"
        )
        for size, row in cold["rows"].items():
            r = row["rows"]
            p = row.get("parts") or {}

            def ms(k: str, p: dict[str, Any] = p) -> str:
                return f"{p[k] * 1e3:.0f}" if k in p else "-"

            L.append(
                f"{size:<8}{r['plain_load']['median_s'] * 1e3:>12.0f}"
                f"{(r['vault_open']['median_s'] * 1e3 if 'vault_open' in r else float('nan')):>12.0f}"
                f"{row.get('vault_minus_plain_s', float('nan')) * 1e3:>9.0f}"
                f"{row.get('vault_over_plain', float('nan')):>8.2f}"
                f"{r['plain_fresh_process']['median_s'] * 1e3:>12.0f}{ms('load_verify_s'):>9}{ms('key_release_s'):>9}"
                f"{ms('decrypt_s'):>9}{p.get('decrypt_gbps', float('nan')):>7.1f}{ms('session_s'):>9}"
                f"{ms('spawn_imports_hardening_s'):>11}"
                + (
                    f"{r['vault_open_daemon']['median_s'] * 1e3:>9.0f}"
                    f"{row['daemon_minus_plain_s'] * 1e3:>7.0f}{row['daemon_over_plain']:>7.2f}"
                    if "vault_open_daemon" in r
                    else f"{'-':>9}{'-':>7}{'-':>7}"
                )
            )
            fp = row.get("first_parts")
            if "vault_open_first" in r and fp:
                L.append(
                    f"{'':<8}tier 0, first open in a process (spawns): "
                    f"{r['vault_open_first']['median_s'] * 1e3:.0f} ms, "
                    f"+{row['first_minus_plain_s'] * 1e3:.0f} over plain; verify "
                    f"{fp['load_verify_s'] * 1e3:.0f}, release {fp['key_release_s'] * 1e3:.0f}, "
                    f"decrypt {fp['decrypt_s'] * 1e3:.0f}, session {fp['session_s'] * 1e3:.0f}, "
                    f"spawn+imports {fp['spawn_imports_hardening_s'] * 1e3:.0f} ms"
                )
            if "vault_fresh_first_open" in r and "plain_fresh_import_load" in r:
                early = row.get("fresh_first_open_took_early_worker") or []
                L.append(
                    f"{'':<8}a fresh process's first open (its own clock, from import vault): "
                    f"{r['vault_fresh_first_open']['median_s'] * 1e3:.0f} ms (worker started "
                    f"before the client's imports in {sum(early)} of {len(early)}), spawned "
                    f"after them {r['vault_fresh_first_open_cold']['median_s'] * 1e3:.0f} ms; "
                    f"plain import onnxruntime + load "
                    f"{r['plain_fresh_import_load']['median_s'] * 1e3:.0f} ms"
                )
            used = row.get("standby_used")
            if used:
                L.append(
                    f"{'':<8}vault_open: {sum(used)} of {len(used)} opens took a pre-started worker"
                )
            ru = {k: v for k, v in (row.get("rusage") or {}).items() if v}
            if ru:  # where a fresh process's extra time goes: sys CPU (first touch of memory)
                L.append(
                    f"{'':<8}CPU user/sys ms (faults): "
                    + "; ".join(
                        f"{k} {v['cpu_user_s'] * 1e3:.0f}/{v['cpu_sys_s'] * 1e3:.0f}"
                        + (f" ({v['minor_faults']:.0f})" if "minor_faults" in v else "")
                        for k, v in ru.items()
                    )
                )
            dp = row.get("daemon_parts")
            if dp:
                L.append(
                    f"{'':<8}daemon (pre-started worker): verify {dp['load_verify_s'] * 1e3:.0f}, "
                    f"release {dp['key_release_s'] * 1e3:.0f}, decrypt {dp['decrypt_s'] * 1e3:.0f} "
                    f"({dp['decrypt_gbps']:.1f} GB/s), session {dp['session_s'] * 1e3:.0f}, outside "
                    f"the worker (daemon, client, first info) {dp['outside_worker_s'] * 1e3:.0f} ms"
                )
        if cold.get("unavailable", {}).get("daemon"):
            L.append(f"   daemon rows unavailable: {cold['unavailable']['daemon']}")
    dec = res.get("decrypt")
    if dec and "decrypt_gbps" in dec:
        L.append(
            f"   decrypt_bench {dec['size_bytes'] >> 20} MiB: decrypt {dec['decrypt_gbps']:.2f} GB/s, "
            f"signature hashing {dec['verify_hash_gbps']:.2f} GB/s, fresh memcpy {dec['memcpy_fresh_gbps']:.2f} GB/s"
        )
        if "first_touch_gbps" in dec:
            L.append(
                f"      its parts: first touch of a fresh mapping alone {dec['first_touch_gbps']:.2f} GB/s, "
                f"decrypt into touched memory {dec['decrypt_touched_gbps']:.2f} GB/s"
            )
    ks = res.get("keyserver")
    L.append("\n4. key server (benchmarks/keyserver_bench.py)")
    if ks and "1" in ks:
        for k in ("1", "10", "50", "50@1000"):
            if k in ks:
                r = ks[k]
                L.append(
                    f"   {k:>8} clients: {r['releases_per_s']:8.1f} releases/s  p50 {r['p50_ms']:.2f} ms  "
                    f"p99 {r['p99_ms']:.2f} ms  errors {r['errors']}"
                )
    else:
        L.append(f"   unavailable: {(ks or {}).get('unavailable', 'not run')}")
    xf = res.get("transfer")
    if xf and "rows" in xf:
        L.append(
            f"\n5. large tensors, {xf['bytes_per_direction'] / 2**20:.0f} MiB each way, ms median (p99)"
        )
        for k, r in xf["rows"].items():
            L.append(f"   {k:<20}{r['median_s'] * 1e3:9.3f} ({r['p99_s'] * 1e3:.2f})")
        if "vault_per_direction_s" in xf:
            L.append(
                f"   vault per direction {xf['vault_per_direction_s'] * 1e3:.3f} ms = "
                f"{xf['vault_per_direction_over_memcpy']:.2f}x memcpy; "
                f"raw zmq per direction {xf['zmq_per_direction_over_memcpy']:.2f}x memcpy"
            )
    mem = (cold or {}).get("memory") or {}
    if mem:
        L.append(
            f"\n6. peak memory (VmHWM) {mem['size_mb']} MB model: plain onnxruntime "
            f"{mem['plain_onnxruntime_vmhwm_bytes'] / 2**20:.0f} MiB, worker "
            + (
                f"{mem['worker_vmhwm_bytes'] / 2**20:.0f} MiB ({mem['worker_over_plain']:.2f}x)"
                if mem.get("worker_vmhwm_bytes")
                else f"unavailable: {mem.get('unavailable')}"
            )
        )
        if mem.get("worker_vmrss_bytes") and mem.get("plain_onnxruntime_vmrss_bytes"):
            L.append(
                f"   resident after the compute (VmRSS): plain "
                f"{mem['plain_onnxruntime_vmrss_bytes'] / 2**20:.0f} MiB, worker "
                f"{mem['worker_vmrss_bytes'] / 2**20:.0f} MiB"
            )
        if mem.get("worker_no_prepack_vmhwm_bytes"):
            L.append(
                f"   worker --no-prepack (no packed weight copy): peak "
                f"{mem['worker_no_prepack_vmhwm_bytes'] / 2**20:.0f} MiB "
                f"({mem['worker_no_prepack_over_plain']:.2f}x); one compute "
                f"{mem['worker_no_prepack_compute_ms']:.2f} ms vs {mem['worker_compute_ms']:.2f} ms "
                f"with prepacking ({mem['worker_no_prepack_compute_ms'] / mem['worker_compute_ms']:.2f}x)"
            )
        if mem.get("worker_eager_weights_vmhwm_bytes"):
            L.append(
                f"   worker --eager-weights (the control: every weight decrypted up front "
                f"and kept beside the packed copies): peak "
                f"{mem['worker_eager_weights_vmhwm_bytes'] / 2**20:.0f} MiB "
                f"({mem['worker_eager_weights_over_plain']:.2f}x), resident "
                f"{(mem.get('worker_eager_weights_vmrss_bytes') or 0) / 2**20:.0f} MiB"
            )
        steps = mem.get("worker_steps_replayed") or {}
        if steps and "unavailable" not in steps:
            L.append(
                "   worker steps replayed in a fresh process, RSS/peak MiB after each: "
                + ", ".join(
                    f"{k} {v['VmRSS'] / 2**20:.0f}/{v['VmHWM'] / 2**20:.0f}"
                    for k, v in steps.items()
                )
            )
    acc = res.get("accounting") or {}
    if "median_s" in acc:
        L.append(f"\nlicence accounting: {acc['median_s'] * 1e9:.0f} ns per call ({acc['method']})")
    hyb = res.get("hybrid") or {}
    if isinstance(hyb, dict) and any(k in hyb for k in ("mobilenet_v2", "resnet50")):
        from .hybrid import table as hybrid_table

        L.append("")
        L.extend(hybrid_table(hyb))
    L.append("\nTARGETS")
    for t in res.get("targets", []):
        L.append(
            f"  {t['status']:<5} {t['target']}: {t['value'] if t['value'] is not None else '-'} (goal {t['goal']})"
            + (f"  [{t['note']}]" if t["note"] and t["status"] == "N/A" else "")
        )
    for s, why in (res.get("errors") or {}).items():
        L.append(f"  section {s} failed: {why}")
    return "\n".join(L)


def plot(res: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    lat = res.get("latency") or {}
    ax = axes[0][0]
    modes = [
        "in_process",
        "vault_ipc",
        "vault_ipc_zmq",
        "vault_tcp",
        "vault_tcp_curve",
        "fastapi_tls",
        "grpc_tls",
        "zmq_echo_ipc",
        "unix_echo",
    ]
    if lat and not lat.get("unavailable_all"):
        names = list(lat)
        w = 0.8 / len(modes)
        for i, mname in enumerate(modes):
            vals = [
                lat[n]["rows"][mname]["median_s"] * 1e3 if mname in lat[n]["rows"] else 0
                for n in names
            ]
            ax.bar([j + i * w for j in range(len(names))], vals, w, label=mname)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(names))], names)
        ax.set_yscale("log")
        ax.set_ylabel("ms per call (median)")
        ax.set_title("1. per-call latency")
        ax.legend(fontsize=7)
    ax = axes[0][1]
    tp = res.get("throughput") or {}
    for k, d in (tp.get("calls_per_s") or {}).items():
        ns = list(d)
        ax.plot(ns, [d[n] for n in ns], marker="o", label=k)
    ax.set_xlabel("concurrent callers")
    ax.set_ylabel("calls/s")
    ax.set_title(f"2. throughput ({tp.get('model', '-')})")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    cold = (res.get("coldstart") or {}).get("rows") or {}
    if cold:
        sizes = list(cold)
        for i, k in enumerate(
            ["plain_load", "plain_fresh_process", "vault_open", "vault_open_first",
             "plain_fresh_import_load", "vault_fresh_first_open", "vault_fresh_first_open_cold",
             "vault_open_daemon"]
        ):  # fmt: skip
            ax.bar(
                [j + i * 0.11 for j in range(len(sizes))],
                [
                    cold[s]["rows"][k]["median_s"] * 1e3 if k in cold[s]["rows"] else 0
                    for s in sizes
                ],
                0.11,
                label=k,
            )
        ax.set_xticks([j + 0.385 for j in range(len(sizes))], sizes)
        ax.set_ylabel("ms")
        ax.set_title("3. cold start")
        ax.legend(fontsize=8)
    ax = axes[1][1]
    xf = res.get("transfer") or {}
    if xf.get("rows"):
        ks = list(xf["rows"])
        ax.barh(ks, [xf["rows"][k]["median_s"] * 1e3 for k in ks])
        ax.set_xlabel("ms (median)")
        ax.set_title("5. 6 MiB in + 6 MiB out")
    fig.suptitle(
        f"vault benchmarks ({'quick' if res['quick'] else 'full'}), {res['machine']['cpu']}, "
        f"{res['machine']['cores']} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
