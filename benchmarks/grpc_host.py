"""The gRPC-over-TLS peer of the latency section: the same ONNX model behind
a gRPC server with TLS 1.3 (grpcio, its own BoringSSL), raw float32 bytes in
and out through one unary method (no protobuf message: the Open Inference
Protocol's gRPC adds its encoding on top, so this is the cheapest gRPC call
a server can answer), the session built with the vault worker's own options.

``python -m benchmarks.grpc_host MODEL.onnx PORT CERT KEY`` runs the server;
:func:`start` runs it as a child and returns a call function over one
channel, and its stop function. ``grpcio`` comes with the ``bench`` extra;
:func:`start` raises :class:`~benchmarks.harness.Unavailable` without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .fastapi_host import _free_port, _self_signed
from .harness import Unavailable, die_with_parent

_METHOD = "/vault.bench.Infer/Predict"
_MAX = 256 << 20


def _serve(path: str, port: int, cert: str, key: str) -> None:  # pragma: no cover - the child
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    import onnxruntime as ort

    from vault.core.ortthreads import apply_spin_policy

    so = ort.SessionOptions()  # as the worker's: every core, its spin policy
    apply_spin_policy(so)
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def predict(request: bytes, context: Any) -> bytes:
        shape = tuple(int(d) for d in dict(context.invocation_metadata())["x-shape"].split(","))
        x = np.frombuffer(request, np.float32).reshape(shape)
        return bytes(sess.run(None, {name: x})[0].tobytes())

    handler = grpc.method_handlers_generic_handler(
        "vault.bench.Infer", {"Predict": grpc.unary_unary_rpc_method_handler(predict)}
    )
    opts = [("grpc.max_receive_message_length", _MAX), ("grpc.max_send_message_length", _MAX)]
    server = grpc.server(ThreadPoolExecutor(max_workers=1), options=opts)
    server.add_generic_rpc_handlers((handler,))
    with open(cert, "rb") as c, open(key, "rb") as k:
        creds = grpc.ssl_server_credentials([(k.read(), c.read())])
    server.add_secure_port(f"127.0.0.1:{port}", creds)
    server.start()
    server.wait_for_termination()


def start(
    model_path: str, feeds: dict[str, np.ndarray], *, timeout: float = 60.0
) -> tuple[Callable[[], Any], Callable[[], None]]:
    """Start the peer on ``model_path``; return (one call with ``feeds``, stop)."""
    try:
        import grpc
    except ImportError:
        raise Unavailable("grpcio not installed: pip install -e '.[bench]'") from None
    import shutil
    import tempfile

    port = _free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp(prefix="vault-grpc-")
    cert, key = _self_signed(tmp)
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.grpc_host", model_path, str(port), cert, key],
        cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )  # fmt: skip
    with open(cert, "rb") as fh:
        creds = grpc.ssl_channel_credentials(root_certificates=fh.read())
    opts = [("grpc.max_receive_message_length", _MAX), ("grpc.max_send_message_length", _MAX)]
    channel = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=opts)

    def stop() -> None:
        channel.close()
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except Exception:  # noqa: BLE001 - any failure to come up is "unavailable"
        stop()
        raise Unavailable("the gRPC peer did not start") from None
    [x] = feeds.values()
    body = np.ascontiguousarray(x, np.float32).tobytes()
    meta = (("x-shape", ",".join(str(d) for d in x.shape)),)
    rpc = channel.unary_unary(_METHOD)

    def call() -> Any:
        return np.frombuffer(rpc(body, metadata=meta, timeout=timeout), np.float32)

    call()
    return call, stop


def main() -> int:  # pragma: no cover - the child
    _serve(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
    return 0


if __name__ == "__main__":
    sys.exit(main())
