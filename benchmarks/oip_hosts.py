"""Servers for the Open Inference Protocol benchmark (:mod:`benchmarks.oip_bench`),
each in its own process, on the same ONNX model with the same onnxruntime
options (one intra-op thread per instance, sequential execution):

``python -m benchmarks.oip_hosts vault CONFIG.json``
    :class:`worker.service.WorkerService` with ``--http``/``--grpc`` (as
    ``vault worker serve`` runs it), hardened worker processes. The key
    release is skipped (the package key comes from CONFIG through the
    test-only pipe, as in :mod:`benchmarks.service_host`), and the key
    server's decisions for the one call licence come from a local function
    granting it; every call still goes through the same admission (token
    signature, scope, budget, rate), queue, batching and metering.
``python -m benchmarks.oip_hosts triton MODEL.onnx HTTP GRPC INSTANCES MAX_BATCH``
    NVIDIA Triton through nvidia-pytriton (its bundled tritonserver: Triton's
    HTTP/gRPC front and dynamic batcher) over ``INSTANCES`` Python callables
    each holding an onnxruntime session. Runs in pytriton's own venv.
``python -m benchmarks.oip_hosts kserve MODEL.onnx HTTP GRPC INSTANCES``
    KServe's ``ModelServer`` (``kserve`` on PyPI) with a ``kserve.Model``
    holding an onnxruntime session, ``INSTANCES`` worker processes.

Each prints ``ready`` on stdout once it serves.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _session(path: str) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def vault_main(cfg_path: str) -> int:
    from worker.service import LaunchSpec, ServiceConfig, WorkerService
    from worker.service.calls import CallLicencePolicy
    from worker.service.oip import OipConfig

    cfg = json.loads(open(cfg_path).read())
    keys = {p: bytes.fromhex(k) for p, k in cfg["keys"].items()}
    grant = {"ok": True, "licence_id": cfg["licence_id"], "holder": "bench", "budget": 10**9,
             "retry_after": None, "rate": None, "expires_at": None, "proof_key": cfg["proof_key"],
             "model_id": "m"}  # fmt: skip

    def ask(model: Any, keys_: list[str], usage: Any, grants: Any = None) -> dict[str, Any]:
        return {
            "ttl": 3600.0,
            "decisions": {k: dict(grant) for k in keys_ if k == cfg["client_public"]},
        }

    svc = WorkerService(
        ServiceConfig(
            bind="tcp://127.0.0.1:0", packages=list(keys), instances=cfg["instances"],
            max_batch=cfg["max_batch"], max_queue_delay_us=cfg["max_queue_delay_us"],
            curve=(cfg["public"].encode(), cfg["secret"].encode()),
            policy=CallLicencePolicy(ask),
            launch=LaunchSpec(publisher=cfg["publisher"], unsafe_test_keys=keys,
                              intra_op_threads=1),
            oip=OipConfig(http_port=0, grpc_port=0),
        )
    )  # fmt: skip
    ready = svc.start()
    print(json.dumps({"endpoint": ready["endpoint"], "http_port": ready["http_port"],
                      "grpc_port": ready["grpc_port"]}), flush=True)  # fmt: skip
    return svc.run()


def triton_main(model: str, http: str, grpc: str, instances: str, max_batch: str) -> int:
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    n, mb = int(instances), int(max_batch)

    def make() -> Any:
        sess = _session(model)
        if mb > 1:  # Triton's dynamic batcher joins calls; @batch hands over the batch

            @batch  # type: ignore[untyped-decorator]
            def batched(x: Any) -> dict[str, Any]:
                return {"logits": sess.run(None, {"x": x})[0]}

            return batched

        def each(requests: Any) -> list[dict[str, Any]]:  # no batcher: one request at a time
            return [{"logits": sess.run(None, {"x": r["x"]})[0]} for r in requests]

        return each

    d_in = int(_session(model).get_inputs()[0].shape[1])
    config = ModelConfig(batching=mb > 1, max_batch_size=max(mb, 1),
                         batcher=DynamicBatcher(max_queue_delay_microseconds=0))  # fmt: skip
    dims_in, dims_out = ((d_in,), (-1,)) if mb > 1 else ((-1, d_in), (-1, -1))
    import os

    # pytriton makes the workspace itself (it must not exist): in the run's directory
    ws = os.path.join(os.path.dirname(os.path.abspath(model)), f"pytriton-{os.getpid()}")
    with Triton(config=TritonConfig(http_port=int(http), grpc_port=int(grpc),
                                    metrics_port=0, allow_metrics=False),
                workspace=ws) as t:  # fmt: skip
        t.bind(model_name="m", infer_func=[make() for _ in range(n)],
               inputs=[Tensor(name="x", dtype=np.float32, shape=dims_in)],
               outputs=[Tensor(name="logits", dtype=np.float32, shape=dims_out)],
               config=config, strict=False)  # fmt: skip
        print("ready", flush=True)
        t.serve()
    return 0


def kserve_main(model: str, http: str, grpc: str, instances: str) -> int:
    import logging

    from kserve import ModelServer

    from .kserve_host import OnnxModel

    m = OnnxModel("m", model)
    m.load()
    print("ready", flush=True)
    logging.disable(logging.INFO)  # no access or latency log line per call
    ModelServer(http_port=int(http), grpc_port=int(grpc), workers=int(instances),
                enable_docs_url=False, enable_latency_logging=False,
                event_loop="uvloop").start([m])  # fmt: skip
    return 0


if __name__ == "__main__":
    mains: dict[str, Any] = {"vault": vault_main, "triton": triton_main, "kserve": kserve_main}
    sys.exit(mains[sys.argv[1]](*sys.argv[2:]))
