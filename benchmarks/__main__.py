"""``python -m benchmarks [--quick] [--out DIR] [--sections a,b]``: the benchmark suite.

Writes ``DIR/results.json`` and ``DIR/benchmarks.png`` (default DIR:
``benchmarks/out``) and prints the table with every target's PASS/MISS.
See docs/benchmarks.md for what each figure means.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from . import harness, report, targets
from .context import Context

# Each name is a module in this package with ``section(ctx) -> dict``
# (see benchmarks/context.py), run in this order.
SECTIONS = {
    "decrypt": "decrypt_bench",
    "accounting": "accounting",
    "latency": "latency",
    "breakdown": "breakdown",
    "transformers": "real_models",
    "transfer": "transfer",
    "throughput": "throughput",
    "coldstart": "coldstart",
    "keyserver": "keyserver_bench",
    "hybrid": "hybrid",
    "service": "service_bench",
    "oip": "oip_bench",
    "web": "web",
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="smaller sizes and fewer repeats (< 2 minutes)"
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"), help="output directory")
    ap.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}"
    )
    args = ap.parse_args(argv)
    import signal

    def _term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # run the finally blocks: stop every helper process

    signal.signal(signal.SIGTERM, _term)
    wanted = [s for s in args.sections.split(",") if s]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    gpu_ok, gpu_why = harness.gpu_available()
    res: dict[str, Any] = {
        "quick": args.quick,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": harness.machine(),
        "versions": harness.versions(),
        "gpu": "CUDA rows not implemented yet" if gpu_ok else f"CUDA rows skipped: {gpu_why}",
        "errors": {},
    }

    def save() -> None:
        res["elapsed_s"] = time.perf_counter() - t0
        res["targets"] = targets.evaluate(res)
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))

    ctx = Context(quick=args.quick, log=_log)
    try:  # the workers' bytecode, as ``pip install`` writes it: a worker's start is
        # timed as an installed package has it, not recompiled at every spawn
        # (an editable install under PYTHONDONTWRITEBYTECODE=1, as this machine sets)
        from vault.core.launch import write_worker_bytecode

        write_worker_bytecode(force=True)
    except Exception as exc:  # noqa: BLE001 - the benchmark still runs, and says so
        res["errors"]["bytecode"] = f"{type(exc).__name__}: {exc}"
    try:
        for name, module_name in SECTIONS.items():
            if name not in wanted:
                continue
            _log(f"[{time.perf_counter() - t0:6.1f}s] {name}")
            try:
                module = importlib.import_module(f"{__package__}.{module_name}")
                res[name] = module.section(ctx)
            except harness.Unavailable as exc:
                res[name] = {"unavailable": str(exc)}
            except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
                res["errors"][name] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            finally:
                ctx.end_section()
            if ctx.env_error:
                res["vault_unavailable"] = ctx.env_error
            save()
    finally:
        ctx.close()
    png = report.plot(res, out / "benchmarks.png")
    if isinstance(res.get("hybrid"), dict):
        from .hybrid import plot as hybrid_plot

        hybrid_plot(res["hybrid"], out / "hybrid.png")
    if isinstance(res.get("oip"), dict) and res["oip"].get("rows"):
        from .oip_bench import plot as oip_plot
        from .oip_bench import table as oip_table

        oip_plot(res["oip"], out / "oip.png")
        print("\nOpen Inference Protocol (section oip):\n" + oip_table(res["oip"]))
    if isinstance(res.get("web"), dict) and res["web"].get("rows"):
        from .web import table as web_table

        print("\n" + "\n".join(web_table(res["web"])))
    print(report.table(res))
    print(
        f"\nwrote {out / 'results.json'}"
        + (f" and {png}" if png else " (no plot: matplotlib missing)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
