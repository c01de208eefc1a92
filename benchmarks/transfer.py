"""Section 5: large tensors - what moving 6 MiB each way costs.

In one interleaved run on the float32 [1, 3, 1024, 512] elementwise model:
in-process onnxruntime; ``vault.open`` over ipc; raw pyzmq echoes (6 MiB
both ways, one way only, and empty) to split the channel's cost per
direction; and a plain copy of 6 MiB. Local workers move tensors this large
through shared memory (vault/core/shm.py), so ``vault_ipc`` measures that path.

Per-direction vault transfer = (vault - in-process) / 2; it is set against a
plain memory copy of the same bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import Context

from collections.abc import Callable
from typing import Any

import numpy as np

from . import models as M
from .floors import EchoServer, memcpy_fn
from .harness import interleave, ort_session


def run(quick: bool, env: Any, echo: EchoServer, log: Callable[[str], None]) -> dict[str, Any]:
    model = M.big_tensor()
    mbytes = model.SerializeToString()
    feeds = M.example_feeds(model)
    x = feeds["x"]
    n = x.nbytes
    sess = ort_session(mbytes)
    ref = sess.run(None, feeds)[0]
    fns: dict[str, Callable[[], Any]] = {
        "in_process": lambda: sess.run(None, feeds),
        "zmq_echo_both": echo.zmq_ipc_fn(n, n),
        "zmq_echo_in_only": echo.zmq_ipc_fn(n, 0),
        "zmq_echo_out_only": echo.zmq_ipc_fn(0, n),
        "zmq_echo_empty": echo.zmq_ipc_fn(0, 0),
        "memcpy_one_way": memcpy_fn(n, 0),
    }
    out: dict[str, Any] = {"bytes_per_direction": n, "unavailable": {}}
    if env is not None:
        try:
            pkg, lic = env.seal(model, "xfer-big")
            vm = env.open_local(pkg, lic)
            vm.compute(feeds)
            fns["vault_ipc"] = lambda: vm.compute(feeds)
        except Exception as exc:  # noqa: BLE001
            out["unavailable"]["vault_ipc"] = f"{type(exc).__name__}: {exc}"
    out["max_abs_diff_vs_in_process"] = 0.0
    if "vault_ipc" in fns:
        out["max_abs_diff_vs_in_process"] = float(np.abs(vm.compute(feeds)["logits"] - ref).max())
    log(f"  transfer: {len(fns)} rows interleaved, {n / 2**20:.0f} MiB each way")
    res = interleave(fns, rounds=40 if quick else 200, warmup=3, budget_s=12 if quick else 60)
    out["rows"] = res
    med = {k: v["median_s"] for k, v in res.items()}
    mc = med["memcpy_one_way"]
    out["zmq_in_one_way_s"] = med["zmq_echo_in_only"] - med["zmq_echo_empty"]
    out["zmq_out_one_way_s"] = med["zmq_echo_out_only"] - med["zmq_echo_empty"]
    out["zmq_per_direction_over_memcpy"] = (
        max(out["zmq_in_one_way_s"], out["zmq_out_one_way_s"]) / mc
    )
    if "vault_ipc" in med:
        per_dir = (med["vault_ipc"] - med["in_process"]) / 2
        out["vault_per_direction_s"] = per_dir
        out["vault_per_direction_over_memcpy"] = per_dir / mc
    return out


def section(ctx: Context) -> dict[str, Any]:
    return run(ctx.quick, ctx.env, ctx.echo, ctx.log)
