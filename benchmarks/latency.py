"""Section 1: per-call latency, vault versus in-process onnxruntime and the floors.

For each model, in one interleaved run: in-process ``InferenceSession.run``;
``vault.open`` (local worker over ipc); ``vault.connect`` (tcp + CURVE);
raw pyzmq echo over ipc, over tcp+CURVE and over plain tcp (their
difference is CURVE's cost), a raw Unix-socket echo, each of the same request
and reply bytes; a plain memory copy of those bytes; the same model in plain
onnxruntime in another process behind the least protocol there is
(``raw_server`` over the socket, ``raw_shm`` through shared memory:
``raw_server.py``), so vault / raw is what the vault's own code adds and raw /
in-process what any process boundary costs; and, for the models, a
bare FastAPI + uvicorn endpoint serving the same model with raw bytes and no
TLS (``fastapi_host.py``: the peer the remote path is held against).
Overhead = vault - in-process (medians); the target compares it with the
raw pyzmq echo of the same transport.

Two in-process rows: ``in_process`` uses the worker's own SessionOptions
(spinning bounded to 50 us after a run), so vault - in_process is the
channel's cost alone; ``in_process_default`` uses onnxruntime's defaults
(spinning unbounded), as a
user's plain session would, so in_process - in_process_default is the cost
of the worker's thread policy. Rows are timed in alternating BLOCKS of
several back-to-back calls (not call by call), with a pause before each
block: a spinning pool only competes with its own next call, never with the
other side's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import Context

import os
from collections.abc import Callable
from typing import Any

from . import models as M
from . import raw_server
from .floors import EchoServer, memcpy_fn
from .harness import interleave, ort_session

# name -> (builder, batch quick, batch full, calls quick, calls full, block)
MODELS: dict[str, tuple[Callable[..., Any], int, int, int, int, int]] = {
    "mlp": (M.mlp, 1, 32, 40, 200, 10),
    "mobilenet_v2": (M.mobilenet_v2, 1, 4, 20, 60, 5),
    "resnet50": (M.resnet50, 1, 4, 12, 40, 4),
    "big_tensor": (lambda batch: M.big_tensor(), 1, 1, 40, 200, 10),
}
# pause before each block (harness.quiet then waits on while this process
# still uses CPU: an in-process default session spins after its runs)
BLOCK_GAP_S = 0.02


def _nbytes(arrs: Any) -> int:
    return sum(a.nbytes for a in (arrs.values() if isinstance(arrs, dict) else arrs))


def run(quick: bool, env: Any, echo: EchoServer, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (build, bq, bf, rq, rf, block) in MODELS.items():
        batch = bq if quick else bf
        model = build(batch=batch) if name != "big_tensor" else build(1)
        feeds = M.example_feeds(model, batch=batch)
        mbytes = model.SerializeToString()
        sess = ort_session(mbytes)
        sess_default = ort_session(mbytes, default_options=True)
        ref = sess.run(None, feeds)
        n_in, n_out = _nbytes(feeds), _nbytes(ref)
        fns: dict[str, Callable[[], Any]] = {
            "in_process": lambda s=sess, f=feeds: s.run(None, f),
            "in_process_default": lambda s=sess_default, f=feeds: s.run(None, f),
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
                # the same without the local channel's short wait (docs/worker.md)
                vn = env.open_local(pkg, lic, worker_args=["--spin-us", "0"])
                vn.compute(feeds)
                fns["vault_ipc_nowait"] = lambda m=vn, f=feeds: m.compute(f)
                # the same worker reached over ZeroMQ, as before the direct channel
                vz = env.open_local(pkg, lic, local_channel=False)
                vz.compute(feeds)
                fns["vault_ipc_zmq"] = lambda m=vz, f=feeds: m.compute(f)
                try:
                    # the remote path as callers get it (calls sealed with
                    # AES-256-GCM, keys over CURVE), and CURVE alone, as before
                    rm, rm_curve = env.serve_tcp(pkg, lic, curve_only_too=True)
                    rm.compute(feeds)
                    rm_curve.compute(feeds)
                    fns["vault_tcp"] = lambda m=rm, f=feeds: m.compute(f)
                    fns["vault_tcp_curve"] = lambda m=rm_curve, f=feeds: m.compute(f)
                    row["tcp_note"] = env.tcp_note
                except Exception as exc:  # noqa: BLE001
                    row["unavailable"]["vault_tcp"] = f"{type(exc).__name__}: {exc}"
                    row["unavailable"]["vault_tcp_curve"] = row["unavailable"]["vault_tcp"]
            except Exception as exc:  # noqa: BLE001
                row["unavailable"]["vault_ipc"] = f"{type(exc).__name__}: {exc}"
                row["unavailable"]["vault_tcp"] = "no vault package"
                row["unavailable"]["vault_tcp_curve"] = "no vault package"
        else:
            row["unavailable"]["vault_ipc"] = "vault environment unavailable"
            row["unavailable"]["vault_tcp"] = "vault environment unavailable"
            row["unavailable"]["vault_tcp_curve"] = "vault environment unavailable"
        peer_closes: list[Callable[[], None]] = []
        try:  # plain onnxruntime in another process: the process boundary's own floor
            for key, shm in (("raw_server", False), ("raw_shm", True)):
                fns[key], close = raw_server.start(mbytes, feeds, ref, shm=shm)
                peer_closes.append(close)
        except Exception as exc:  # noqa: BLE001 - a floor row, not a gate
            row["unavailable"]["raw_server"] = f"{type(exc).__name__}: {exc}"
        if name != "big_tensor":
            # the bare HTTP peer: FastAPI + uvicorn, raw bytes, no TLS, same model
            import tempfile

            from . import fastapi_host

            with tempfile.NamedTemporaryFile(suffix=".onnx", delete=False) as fh:
                fh.write(mbytes)
            try:
                for key, tls in (("fastapi_raw", False), ("fastapi_tls", True)):
                    fns[key], close = fastapi_host.start(fh.name, feeds, tls=tls)
                    peer_closes.append(close)
            except Exception as exc:  # noqa: BLE001 - the rows are context, not a gate
                row["unavailable"]["fastapi"] = f"{type(exc).__name__}: {exc}"
            try:  # gRPC over TLS: the transport of the Open Inference Protocol's gRPC
                from . import grpc_host

                fns["grpc_tls"], close = grpc_host.start(fh.name, feeds)
                peer_closes.append(close)
            except Exception as exc:  # noqa: BLE001
                row["unavailable"]["grpc_tls"] = f"{type(exc).__name__}: {exc}"
            finally:
                os.unlink(fh.name)  # the peers have loaded it
        fns["zmq_echo_ipc"] = echo.zmq_ipc_fn(n_in, n_out)
        fns["zmq_echo_tcp_curve"] = echo.zmq_tcp_curve_fn(n_in, n_out)
        fns["zmq_echo_tcp"] = echo.zmq_tcp_fn(n_in, n_out)
        fns["zmq_echo_tcp_sealed"] = echo.zmq_tcp_sealed_fn(n_in, n_out)
        fns["tcp_echo"] = echo.tcp_fn(n_in, n_out)
        fns["tls_echo"] = echo.tls_fn(n_in, n_out)
        fns["unix_echo"] = echo.unix_fn(n_in, n_out)
        fns["memcpy"] = memcpy_fn(n_in, n_out)
        log(
            f"  latency {name} (batch {batch}, {n_in / 1e6:.2f} MB in, {n_out / 1e6:.2f} MB out): "
            f"{len(fns)} rows in alternating blocks of {block}"
        )
        calls = rq if quick else rf
        res = interleave(
            fns,
            rounds=max(3, -(-calls // block)),
            per_round=block,
            warmup=3,
            budget_s=15 if quick else 90,
            gap_s=BLOCK_GAP_S,
        )
        for close in peer_closes:
            close()
        row["rows"] = res
        med = {k: v["median_s"] for k, v in res.items()}
        for peer in ("fastapi_raw", "fastapi_tls", "grpc_tls"):
            for mode in ("vault_tcp", "vault_tcp_curve"):
                if peer in med and mode in med:
                    row[f"{mode}_over_{peer}"] = med[mode] / med[peer]
        # what each way of encrypting the same bytes costs over its own transport
        row["curve_cost_s"] = med["zmq_echo_tcp_curve"] - med["zmq_echo_tcp"]
        row["sealed_cost_s"] = med["zmq_echo_tcp_sealed"] - med["zmq_echo_tcp"]
        row["tls_cost_s"] = med["tls_echo"] - med["tcp_echo"]
        for mode, echo_name in (
            ("vault_ipc", "zmq_echo_ipc"),
            ("vault_tcp", "zmq_echo_tcp_sealed"),
            ("vault_tcp_curve", "zmq_echo_tcp_curve"),
        ):
            if mode in med:
                ov = med[mode] - med["in_process"]
                row[f"{mode}_overhead_s"] = ov
                row[f"{mode}_overhead_over_echo"] = ov / med[echo_name]
                row[f"{mode}_over_in_process"] = med[mode] / med["in_process"]
                row[f"{mode}_over_in_process_default"] = med[mode] / med["in_process_default"]
        raw = [med[k] for k in ("raw_server", "raw_shm") if k in med]
        if raw:
            # the process boundary's floor, and what the vault adds above it
            row["raw_floor_over_in_process"] = min(raw) / med["in_process"]
            if "vault_ipc" in med:
                row["vault_ipc_over_raw_floor"] = med["vault_ipc"] / min(raw)
        if "vault_ipc" in med and "vault_ipc_nowait" in med:
            # the local channel's short wait: with it / without it (same run, same blocks)
            row["short_wait_ratio"] = med["vault_ipc"] / med["vault_ipc_nowait"]
        # what the worker's thread policy (bounded spinning) costs in-process
        row["thread_policy_s"] = med["in_process"] - med["in_process_default"]
        out[name] = row
        del sess, sess_default
    return out


def section(ctx: Context) -> dict[str, Any]:
    return run(ctx.quick, ctx.env, ctx.echo, ctx.log)
