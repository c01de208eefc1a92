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
             "retry_after": None, "rate": None, "expires_at": None, "proof_key": cfg["proof_key"]}  # fmt: skip

    def ask(model: Any, keys_: list[str], usage: Any) -> dict[str, Any]:
        return {"ttl": 3600.0, "decisions": {k: dict(grant) for k in keys_ if k == cfg["client_public"]}}

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

        @batch  # type: ignore[untyped-decorator]
        def infer(x: Any) -> dict[str, Any]:
            return {"logits": sess.run(None, {"x": x})[0]}

        return infer

    d_in = int(_session(model).get_inputs()[0].shape[1])
    config = ModelConfig(max_batch_size=max(mb, 1),
                         batcher=DynamicBatcher(max_queue_delay_microseconds=0),
                         batching=mb > 1)  # fmt: skip
    with Triton(config=TritonConfig(http_port=int(http), grpc_port=int(grpc),
                                    metrics_port=0, allow_metrics=False)) as t:  # fmt: skip
        t.bind(model_name="m", infer_func=[make() for _ in range(n)],
               inputs=[Tensor(name="x", dtype=np.float32, shape=(d_in,))],
               outputs=[Tensor(name="logits", dtype=np.float32, shape=(-1,))],
               config=config, strict=False)  # fmt: skip
        print("ready", flush=True)
        t.serve()
    return 0


def kserve_main(model: str, http: str, grpc: str, instances: str) -> int:
    import kserve
    from kserve import InferRequest, InferResponse, Model, ModelServer
    from kserve.utils.utils import get_predict_input, get_predict_response

    class Onnx(Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__("m")
            self.sess: Any = None

        def load(self) -> bool:
            self.sess = _session(model)
            self.ready = True
            return True

        async def predict(self, payload: InferRequest, headers: Any = None,
                          response_headers: Any = None) -> InferResponse:  # fmt: skip
            x = get_predict_input(payload)
            out = self.sess.run(None, {"x": x})[0]
            return get_predict_response(payload, out, self.name)  # type: ignore[no-any-return]

    m = Onnx()
    m.load()
    del kserve
    print("ready", flush=True)
    ModelServer(http_port=int(http), grpc_port=int(grpc), workers=int(instances),
                enable_docs_url=False).start([m])  # fmt: skip
    return 0


if __name__ == "__main__":
    kind, args = sys.argv[1], sys.argv[2:]
    sys.exit({"vault": vault_main, "triton": triton_main, "kserve": kserve_main}[kind](*args))
