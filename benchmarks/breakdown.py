"""Where a small call's overhead goes: the vault call split into its parts.

For a model with tiny tensors (the MLP), interleaved in one run:

* ``ort_run``: ``InferenceSession.run`` alone (the compute);
* ``worker_handle``: the worker's own request handler
  (:meth:`worker.ops.Service.handle`: header decode, input checks, lease
  check, pipeline run, reply encode) called directly in this process on
  ready-made frames - no sockets;
* ``client_codec``: the client library's encode of the request and decode
  of a reply (``vault.core.protocol``), no sockets;
* ``zmq_echo_ipc``: a raw pyzmq round trip of the same bytes;
* ``vault_ipc``: the real ``vault.open`` call.

So: worker Python overhead = worker_handle - ort_run; transport and thread
hand-offs = vault_ipc - worker_handle - client_codec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import Context

from collections.abc import Callable
from typing import Any

from . import models as M
from .floors import EchoServer
from .harness import interleave, ort_session


def run(quick: bool, env: Any, echo: EchoServer, log: Callable[[str], None]) -> dict[str, Any]:
    from vault.core.protocol import (
        decode_tensors,
        encode_tensors,
        ok_reply,
        pack_header,
        unpack_header,
    )
    from worker.lease import LeaseKeeper
    from worker.ops import Service
    from worker.runtime import Pipeline

    model = M.mlp(batch=1)
    mb = model.SerializeToString()
    feeds = M.example_feeds(model)
    sess = ort_session(mb)
    pipe = Pipeline([mb])
    keeper = LeaseKeeper(None, renew=None, on_end=lambda: None, unsafe_no_lease=True)
    svc = Service(pipe, keeper, info={"model_id": "bench"}, hardening={})
    descs, frames = encode_tensors(feeds)
    req = [pack_header({"v": 1, "op": "compute", "id": 1, "tensors": descs}), *frames]
    reply = svc.handle(req)
    assert unpack_header(reply[0]).get("ok", True), unpack_header(reply[0])
    reply_bytes = [bytes(f) for f in reply]

    def client_codec() -> Any:
        d, fr = encode_tensors(feeds)
        pack_header({"v": 1, "op": "compute", "id": 1, "tensors": d})
        h = unpack_header(reply_bytes[0])
        return decode_tensors(h.get("tensors"), reply_bytes[1:])

    fns: dict[str, Callable[[], Any]] = {
        "ort_run": lambda: sess.run(None, feeds),
        "worker_handle": lambda: svc.handle(req),
        "client_codec": client_codec,
        "zmq_echo_ipc": echo.zmq_ipc_fn(sum(a.nbytes for a in feeds.values()), 40),
    }
    out: dict[str, Any] = {"model": "mlp", "unavailable": {}}
    if env is not None:
        try:
            pkg, lic = env.seal(model, "breakdown-mlp")
            vm = env.open_local(pkg, lic)
            fns["vault_ipc"] = lambda: vm.compute(feeds)
        except Exception as exc:  # noqa: BLE001
            out["unavailable"]["vault_ipc"] = f"{type(exc).__name__}: {exc}"
    log("  overhead breakdown (mlp)")
    res = interleave(
        fns, rounds=60 if quick else 300, per_round=5, warmup=5, budget_s=6 if quick else 30
    )
    out["rows"] = res
    med = {k: v["median_s"] for k, v in res.items()}
    out["worker_python_s"] = med["worker_handle"] - med["ort_run"]
    out["client_python_s"] = med["client_codec"]
    if "vault_ipc" in med:
        out["transport_and_handoffs_s"] = (
            med["vault_ipc"] - med["worker_handle"] - med["client_codec"]
        )
    del ok_reply
    pipe.close()
    return out


def section(ctx: Context) -> dict[str, Any]:
    return run(ctx.quick, ctx.env, ctx.echo, ctx.log)
