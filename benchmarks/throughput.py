"""Section 2: throughput with 1, 2, 4 and 8 concurrent callers, MobileNetV2
at batch 1 and the MLP (1024-2048-1024-10) at batch 1.

In-process: N threads share one ``InferenceSession`` (``run`` drops the GIL),
configured like the worker's (``in_process``, spinning bounded to 50 us
after a run) and with onnxruntime's defaults (``in_process_default``,
spinning unbounded).
Vault: N threads share one ``vault.open`` Model (each thread gets its own
connection, served by a worker thread of its own); beside it the same
worker with one onnxruntime thread per run (``vault_ipc_intra1``) and over
ZeroMQ as before the direct local channel (``vault_ipc_zmq``); and the same
model in plain onnxruntime in another process, a thread per connection,
behind the least protocol there is (``raw_server``, ``raw_server.py``: the
process boundary's own floor). Each point
counts completed calls in a fixed window after a warm-up; the sides
alternate window by window (blocks, never call by call, with a pause before
each window so a spinning pool goes idle), over several rounds, and the
median rate wins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import Context

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from . import models as M
from . import raw_server
from .harness import ort_session

CALLERS = (1, 2, 4, 8)


def _rate(fn: Callable[[], Any], n: int, window: float) -> float:
    stop = time.perf_counter() + window
    counts = [0] * n
    start = threading.Barrier(n + 1)

    def worker(i: int) -> None:
        fn()  # warm this thread's socket / arena
        start.wait()
        c = 0
        while time.perf_counter() < stop_at[0]:
            fn()
            c += 1
        counts[i] = c

    stop_at = [stop]
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + window
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def run(
    quick: bool, env: Any, log: Callable[[str], None], model_name: str = "mobilenet_v2"
) -> dict[str, Any]:
    model = M.mobilenet_v2(batch=1) if model_name == "mobilenet_v2" else M.mlp(batch=1)
    feeds = M.example_feeds(model)
    sess = ort_session(model.SerializeToString())
    sess_default = ort_session(model.SerializeToString(), default_options=True)
    fns: dict[str, Callable[[], Any]] = {
        "in_process": lambda: sess.run(None, feeds),
        "in_process_default": lambda: sess_default.run(None, feeds),
    }
    out: dict[str, Any] = {"model": model_name, "batch": 1, "unavailable": {}}
    close_raw = None
    try:  # plain onnxruntime in another process, a connection per calling thread
        fns["raw_server"], close_raw = raw_server.per_thread(
            model.SerializeToString(), feeds, sess.run(None, feeds)
        )
    except Exception as exc:  # noqa: BLE001 - a floor column, not a gate
        out["unavailable"]["raw_server"] = f"{type(exc).__name__}: {exc}"
    if env is not None:
        try:
            pkg, lic = env.seal(model, f"tp-{model_name}")
            vm = env.open_local(pkg, lic)
            fns["vault_ipc"] = lambda: vm.compute(feeds)
            # the concurrency models measured against the default (one worker
            # thread per calling thread, each running its calls itself, one
            # session, onnxruntime's intra-op pool on every core):
            # each run on one core (several runs side by side instead) ...
            vm1 = env.open_local(pkg, lic, worker_args=["--intra-op-threads", "1"])
            fns["vault_ipc_intra1"] = lambda: vm1.compute(feeds)
            # ... and the ZeroMQ path as before: a router thread, inline small
            # calls, a pool of --threads for the others
            vmz = env.open_local(pkg, lic, local_channel=False)
            fns["vault_ipc_zmq"] = lambda: vmz.compute(feeds)
        except Exception as exc:  # noqa: BLE001
            out["unavailable"]["vault_ipc"] = f"{type(exc).__name__}: {exc}"
    else:
        out["unavailable"]["vault_ipc"] = "vault environment unavailable"
    window = 0.6 if quick else 2.0
    rounds = 2 if quick else 5
    points: dict[str, dict[int, list[float]]] = {k: {n: [] for n in CALLERS} for k in fns}
    for r in range(rounds):
        for n in CALLERS:
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]
            for k in order:
                time.sleep(0.02)  # the previous window's pools go idle first
                points[k][n].append(_rate(fns[k], n, window))
    if close_raw is not None:
        close_raw()
    log(
        f"  throughput {model_name}: {rounds} rounds x {len(CALLERS)} caller counts, {window}s windows"
    )
    out["window_s"] = window
    out["rounds"] = rounds
    out["calls_per_s"] = {
        k: {n: statistics.median(v) for n, v in d.items()} for k, d in points.items()
    }
    out["samples"] = points
    if "vault_ipc" in fns:
        out["vault_over_in_process"] = {
            n: out["calls_per_s"]["vault_ipc"][n] / out["calls_per_s"]["in_process"][n]
            for n in CALLERS
        }
        if "raw_server" in fns:
            out["raw_over_in_process"] = {
                n: out["calls_per_s"]["raw_server"][n] / out["calls_per_s"]["in_process"][n]
                for n in CALLERS
            }
            out["vault_over_raw"] = {
                n: out["calls_per_s"]["vault_ipc"][n] / out["calls_per_s"]["raw_server"][n]
                for n in CALLERS
            }
        out["vault_over_in_process_default"] = {
            n: out["calls_per_s"]["vault_ipc"][n] / out["calls_per_s"]["in_process_default"][n]
            for n in CALLERS
        }
    return out


def section(ctx: Context) -> dict[str, Any]:
    out = run(ctx.quick, ctx.env, ctx.log)  # MobileNetV2 at batch 1: the section's table
    out["mlp"] = run(ctx.quick, ctx.env, ctx.log, model_name="mlp")  # a small model's calls
    return out
