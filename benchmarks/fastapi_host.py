"""The bare HTTP peer of the latency section: FastAPI + uvicorn serving the
same ONNX model, raw float32 bytes in and out (no JSON, the shape in one
header), the session built with the vault worker's own options; plain HTTP
(``fastapi_raw``: encrypts nothing, the peer the issue names) or HTTPS with a
fresh self-signed certificate (``fastapi_tls``: TLS 1.3, AES-GCM, the
like-for-like peer of a CURVE-encrypted call).

``python -m benchmarks.fastapi_host MODEL.onnx PORT [CERT KEY]`` runs the server;
:func:`start` runs it as a child and returns a call function over one
keep-alive ``http.client`` connection, and its stop function. Installed by
the ``bench`` extra (LitServe brings FastAPI and uvicorn); :func:`start`
raises :class:`~benchmarks.harness.Unavailable` without them.
"""

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .harness import Unavailable, die_with_parent


def _app(path: str) -> Any:  # pragma: no cover - runs in the child
    import onnxruntime as ort
    from fastapi import FastAPI, Request, Response

    from vault.core.ortthreads import apply_spin_policy

    so = ort.SessionOptions()  # as the worker's: every core, its spin policy
    apply_spin_policy(so)
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        # run in the event loop itself: one caller at a time, no thread hop
        # (the fastest a bare endpoint can answer one caller)
        body = await request.body()
        shape = tuple(int(d) for d in request.headers["x-shape"].split(","))
        x = np.frombuffer(body, np.float32).reshape(shape)
        y = sess.run(None, {name: x})[0]
        return Response(content=y.tobytes(), media_type="application/octet-stream")

    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _self_signed(directory: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, written to ``directory``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = os.path.join(directory, "c.pem"), os.path.join(directory, "k.pem")
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def start(
    model_path: str,
    feeds: dict[str, np.ndarray],
    *,
    tls: bool = False,
    timeout: float = 60.0,
) -> tuple[Callable[[], Any], Callable[[], None]]:
    """Start the peer on ``model_path``; return (one call with ``feeds``, stop)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise Unavailable(
            f"fastapi/uvicorn not installed ({exc.name}): pip install -e '.[bench]'"
        ) from None
    import shutil
    import ssl
    import tempfile

    port = _free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp(prefix="vault-fastapi-")
    extra: list[str] = []
    if tls:
        cert, key = _self_signed(tmp)
        extra = [cert, key]
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.fastapi_host", model_path, str(port), *extra],
        cwd=root,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )

    def stop() -> None:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop()
                raise Unavailable("the FastAPI peer did not start") from None
            time.sleep(0.1)
    [x] = feeds.values()
    body = np.ascontiguousarray(x, np.float32).tobytes()
    headers = {"x-shape": ",".join(str(d) for d in x.shape),
               "content-type": "application/octet-stream"}  # fmt: skip
    conn: http.client.HTTPConnection
    if tls:
        ctx = ssl.create_default_context(cafile=extra[0])
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port)

    def call() -> Any:
        conn.request("POST", "/predict", body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"FastAPI peer answered {resp.status}")
        return np.frombuffer(data, np.float32)

    def close() -> None:
        conn.close()
        stop()

    call()
    return call, close


def main() -> int:  # pragma: no cover - the child
    import uvicorn

    path, port = sys.argv[1], int(sys.argv[2])
    tls = {"ssl_certfile": sys.argv[3], "ssl_keyfile": sys.argv[4]} if len(sys.argv) > 4 else {}
    # keep-alive for as long as the section runs: its blocks alternate with
    # other rows' for minutes, and a reconnect must never land inside a timed call
    uvicorn.run(_app(path), host="127.0.0.1", port=port, log_level="warning",
                access_log=False, timeout_keep_alive=3600, **tls)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
