"""Section 1: per-call latency, vault versus in-process onnxruntime and the floors.

For each model, in one interleaved run: in-process ``InferenceSession.run``;
``vault.open`` (local worker over ipc); ``vault.connect`` (tcp + CURVE);
raw pyzmq echo over ipc and over tcp+CURVE, a raw Unix-socket echo, each of
the same request and reply bytes; and a plain memory copy of those bytes.
Overhead = vault - in-process (medians); the target compares it with the
raw pyzmq echo of the same transport. ``in_process`` uses the worker's own
SessionOptions (spinning off). A session with onnxruntime's defaults
(spinning on) is deliberately not among the rows: its spinning pool slows
whichever row runs next on a 2-core machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import Context

from collections.abc import Callable
from typing import Any

from . import models as M
from .floors import EchoServer, memcpy_fn
from .harness import interleave, ort_session

# name -> (builder, batch quick, batch full, rounds quick, rounds full)
MODELS: dict[str, tuple[Callable[..., Any], int, int, int, int]] = {
    "mlp": (M.mlp, 1, 32, 40, 200),
    "mobilenet_v2": (M.mobilenet_v2, 1, 4, 20, 60),
    "resnet50": (M.resnet50, 1, 4, 12, 40),
    "big_tensor": (lambda batch: M.big_tensor(), 1, 1, 40, 200),
}


def _nbytes(arrs: Any) -> int:
    return sum(a.nbytes for a in (arrs.values() if isinstance(arrs, dict) else arrs))


def run(quick: bool, env: Any, echo: EchoServer, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (build, bq, bf, rq, rf) in MODELS.items():
        batch = bq if quick else bf
        model = build(batch=batch) if name != "big_tensor" else build(1)
        feeds = M.example_feeds(model, batch=batch)
        mbytes = model.SerializeToString()
        sess = ort_session(mbytes)
        ref = sess.run(None, feeds)
        n_in, n_out = _nbytes(feeds), _nbytes(ref)
        fns: dict[str, Callable[[], Any]] = {
            "in_process": lambda s=sess, f=feeds: s.run(None, f),
        }
        row: dict[str, Any] = {
            "batch": batch,
            "weights_bytes": M.weight_bytes(model),
            "in_bytes": n_in,
            "out_bytes": n_out,
            "unavailable": {},
        }
        if env is not None:
            try:
                pkg, lic = env.seal(model, f"lat-{name}")
                vm = env.open_local(pkg, lic)
                got = vm.compute(feeds)
                row["max_abs_diff_vs_in_process"] = float(
                    max(abs(got[k] - r).max() for k, r in zip(got, ref))
                )
                fns["vault_ipc"] = lambda m=vm, f=feeds: m.compute(f)
                try:
                    rm = env.serve_tcp(pkg, lic)
                    rm.compute(feeds)
                    fns["vault_tcp_curve"] = lambda m=rm, f=feeds: m.compute(f)
                    row["tcp_note"] = env.tcp_note
                except Exception as exc:  # noqa: BLE001
                    row["unavailable"]["vault_tcp_curve"] = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001
                row["unavailable"]["vault_ipc"] = f"{type(exc).__name__}: {exc}"
                row["unavailable"]["vault_tcp_curve"] = "no vault package"
        else:
            row["unavailable"]["vault_ipc"] = row["unavailable"]["vault_tcp_curve"] = (
                "vault environment unavailable"
            )
        fns["zmq_echo_ipc"] = echo.zmq_ipc_fn(n_in, n_out)
        fns["zmq_echo_tcp_curve"] = echo.zmq_tcp_curve_fn(n_in, n_out)
        fns["unix_echo"] = echo.unix_fn(n_in, n_out)
        fns["memcpy"] = memcpy_fn(n_in, n_out)
        log(
            f"  latency {name} (batch {batch}, {n_in / 1e6:.2f} MB in, {n_out / 1e6:.2f} MB out): "
            f"{len(fns)} rows interleaved"
        )
        res = interleave(fns, rounds=rq if quick else rf, warmup=3, budget_s=15 if quick else 90)
        row["rows"] = res
        med = {k: v["median_s"] for k, v in res.items()}
        for mode, echo_name in (
            ("vault_ipc", "zmq_echo_ipc"),
            ("vault_tcp_curve", "zmq_echo_tcp_curve"),
        ):
            if mode in med:
                ov = med[mode] - med["in_process"]
                row[f"{mode}_overhead_s"] = ov
                row[f"{mode}_overhead_over_echo"] = ov / med[echo_name]
                row[f"{mode}_over_in_process"] = med[mode] / med["in_process"]
        out[name] = row
        del sess
    return out


def section(ctx: Context) -> dict[str, Any]:
    return run(ctx.quick, ctx.env, ctx.echo, ctx.log)
