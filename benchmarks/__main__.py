"""``python -m benchmarks [--quick] [--out DIR] [--sections a,b]``: the benchmark suite.

Writes ``DIR/results.json`` and ``DIR/benchmarks.png`` (default DIR:
``benchmarks/out``) and prints the table with every target's PASS/MISS.
See docs/benchmarks.md for what each figure means.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import harness, report, targets

SECTIONS = (
    "decrypt",
    "accounting",
    "latency",
    "breakdown",
    "throughput",
    "transfer",
    "coldstart",
    "overhead",
    "keyserver",
    "hybrid",
)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="smaller sizes and fewer repeats (< 2 minutes)"
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"), help="output directory")
    ap.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
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

    def section(name: str, fn: Any) -> None:
        if name not in wanted:
            return
        _log(f"[{time.perf_counter() - t0:6.1f}s] {name}")
        try:
            res[name] = fn()
        except harness.Unavailable as exc:
            res[name] = {"unavailable": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
            res["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        save()

    from . import accounting, decrypt_bench

    section(
        "decrypt", lambda: decrypt_bench.run(quick=args.quick, size_mb=100 if args.quick else 500)
    )
    section("accounting", lambda: accounting.run(args.quick))

    work = Path(tempfile.mkdtemp(prefix="vault-bench-"))
    env: Any = None
    try:
        if set(wanted) & {"latency", "breakdown", "throughput", "transfer", "coldstart", "hybrid"}:
            from .vaultenv import VaultEnv

            try:
                env = VaultEnv(work)
            except harness.Unavailable as exc:
                res["vault_unavailable"] = str(exc)
                _log(f"vault rows unavailable: {exc}")
            from . import breakdown, coldstart, hybrid, latency, throughput, transfer
            from .floors import EchoServer

            with EchoServer() as echo:
                section("latency", lambda: latency.run(args.quick, env, echo, _log))
                section("breakdown", lambda: breakdown.run(args.quick, env, echo, _log))
                section("transfer", lambda: transfer.run(args.quick, env, echo, _log))
            section("throughput", lambda: throughput.run(args.quick, env, _log))
            section("coldstart", lambda: coldstart.run(args.quick, env, work, _log))
            section("hybrid", lambda: hybrid.run(args.quick, env, work, _log))
    finally:
        if env is not None:
            env.close()
        shutil.rmtree(work, ignore_errors=True)

    def reused(name: str) -> Callable[[], dict[str, Any]]:
        """A section run by another benchmark module's ``run(quick=...)``."""

        def run() -> dict[str, Any]:
            try:
                module = importlib.import_module(f"{__package__}.{name}")
            except ImportError as exc:
                raise harness.Unavailable(f"benchmarks/{name}.py not importable ({exc})") from None
            return module.run(quick=args.quick)  # type: ignore[no-any-return]

        return run

    section("overhead", reused("overhead_bench"))
    section("keyserver", reused("keyserver_bench"))
    save()
    png = report.plot(res, out / "benchmarks.png")
    if isinstance(res.get("hybrid"), dict):
        from .hybrid import plot as hybrid_plot

        hybrid_plot(res["hybrid"], out / "hybrid.png")
    print(report.table(res))
    print(
        f"\nwrote {out / 'results.json'}"
        + (f" and {png}" if png else " (no plot: matplotlib missing)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
