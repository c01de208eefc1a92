"""``python -m benchmarks.litserve_host MODEL.onnx PORT WORKERS MAX_BATCH``: the
peer in the service benchmark, LitServe serving the same ONNX model with
onnxruntime over its usual HTTP API (``POST /predict``, JSON ``{"x": [[...]]}``),
``WORKERS`` worker processes, LitServe's own dynamic batching when
``MAX_BATCH`` > 1. Installed by the ``bench`` extra.
"""

import sys
from typing import Any

import litserve as ls
import numpy as np


class OnnxAPI(ls.LitAPI):  # type: ignore[misc]
    """One onnxruntime session per LitServe worker, one intra-op thread (as the vault's)."""

    def __init__(self, path: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.path = path

    def setup(self, device: Any) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sess = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # noqa: ANN001 - LitServe reads the annotation
        return np.asarray(request["x"], dtype=np.float32)

    def batch(self, inputs: list[Any]) -> Any:
        return np.concatenate(inputs, axis=0)

    def predict(self, x: Any) -> Any:
        return self.sess.run(None, {"x": x})[0]

    def unbatch(self, output: Any) -> list[Any]:
        return [row[None, :] for row in output]

    def encode_response(self, output: Any) -> dict[str, Any]:
        return {"y": output.tolist()}


def main() -> int:
    path, port, workers, max_batch = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
    )
    kw: dict[str, Any] = (
        {"max_batch_size": max_batch, "batch_timeout": 0.0005} if max_batch > 1 else {}
    )
    server = ls.LitServer(OnnxAPI(path, **kw), accelerator="cpu", workers_per_device=workers)
    server.run(port=port, host="127.0.0.1", generate_client_file=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
