"""The KServe model of the Open Inference Protocol benchmark: a
``kserve.Model`` holding an onnxruntime session (module-level, so that
``ModelServer(workers=N)`` can hand it to its worker processes). Imported
only where ``kserve`` is installed (:mod:`benchmarks.oip_hosts`)."""

from __future__ import annotations

from typing import Any

from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.utils.utils import get_predict_input


class OnnxModel(Model):  # type: ignore[misc]
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.sess: Any = None

    def load(self) -> bool:
        from .oip_hosts import _session

        self.sess = _session(self.path)
        self.ready = True
        return True

    def __getstate__(self) -> dict[str, Any]:  # a session does not pickle: load it again
        state = dict(self.__dict__)
        state["sess"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.load()

    async def predict(self, payload: InferRequest, headers: Any = None,
                      response_headers: Any = None) -> InferResponse:  # fmt: skip
        x = get_predict_input(payload)
        out = self.sess.run(None, {"x": x})[0]
        t = InferOutput(name="logits", shape=list(out.shape), datatype="FP32")
        t.set_data_from_numpy(out, binary_data=payload.from_grpc)  # gRPC: raw; REST: JSON
        return InferResponse(model_name=self.name, infer_outputs=[t], response_id=payload.id,
                             from_grpc=payload.from_grpc)  # fmt: skip
