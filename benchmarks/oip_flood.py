"""What a flood of large requests from strangers costs ``vault worker serve``'s
Open Inference Protocol doors: the service process's peak resident memory.

A stranger holds no licence: it mints well-formed bearer tokens with keys of
its own (a made-up licence, and one naming the real licence's id and key
signed with the stranger's proof key) and sends ``--callers`` requests at
once to each door, each carrying ``--size`` MiB of binary tensor data (REST:
the binary tensor extension; gRPC: ``raw_input_contents``, the message sent
pre-serialized so the client holds one copy). Before each flood the service's
peak RSS is reset (``/proc/PID/clear_refs`` 5, root); after it, VmHWM less
the RSS before is what the flood cost. The last row is the control: one
request of the same size from the licence holder, whose body is read.

Run: ``python -m benchmarks.oip_flood [--callers 8] [--size 64]`` (as root,
for ``clear_refs``); it prints one JSON object.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MIB = 1 << 20


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_peak(pid: int) -> int:
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")  # the peak RSS starts again from the current RSS
    return _status(pid)["VmRSS"]


def _rest(port: int, token: str, size: int) -> str:
    head = json.dumps({"inputs": [{"name": "x", "shape": [size // 256, 64], "datatype": "FP32",
                                   "parameters": {"binary_data_size": size}}]}).encode()  # fmt: skip
    body = _BODY[:size]
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    try:
        s.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n"
                  b"Authorization: Bearer " + token.encode() + b"\r\n"
                  b"Inference-Header-Content-Length: " + str(len(head)).encode() + b"\r\n"
                  b"Content-Length: " + str(len(head) + size).encode() + b"\r\n\r\n" + head)  # fmt: skip
        try:
            s.sendall(body)
        except OSError:  # refused and closed before the body was read
            pass
        answer = s.recv(4096)
        return answer.split(b"\r\n", 1)[0].decode() or "closed"
    except OSError as exc:
        return type(exc).__name__
    finally:
        s.close()


def _grpc(port: int, token: str, raw: bytes) -> str:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]) as ch:  # fmt: skip
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                              request_serializer=None, response_deserializer=None)  # fmt: skip
        try:
            call(raw, metadata=[("authorization", f"Bearer {token}")], timeout=120)
            return "OK"
        except grpc.RpcError as exc:
            return str(exc.code())


_BODY = b""


def _flood(pid: int, n: int, send: Any) -> dict[str, Any]:
    before = _reset_peak(pid)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(send())) for _ in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    peak = _status(pid)["VmHWM"]
    return {"requests": n, "answers": sorted(set(results)), "seconds": round(took, 2),
            "rss_before_mib": round(before / MIB, 1),
            "peak_growth_mib": round((peak - before) / MIB, 1)}  # fmt: skip


def main() -> None:
    global _BODY
    ap = argparse.ArgumentParser()
    ap.add_argument("--callers", type=int, default=8)
    ap.add_argument("--size", type=int, default=64, help="MiB per request")
    a = ap.parse_args()
    size = a.size * MIB
    _BODY = os.urandom(size)

    import zmq

    from benchmarks import models as M
    from benchmarks.oip_bench import _vault
    from vault.core.crypto import PublisherKey
    from vault.core.licence import Licence
    from vault.core.token import mint_token
    from worker.service.oip import inference_pb2

    work = Path(tempfile.mkdtemp(prefix="vault-flood-"))
    server = _vault(work, M.mlp(), max_batch=1, instances=1)
    try:
        pid = server.proc.pid
        licensed = (server.headers or {})["authorization"].split(" ", 1)[1]
        body = json.loads(base64.urlsafe_b64decode(licensed.split(".")[1] + "=="))
        lid, key = body.get("lic"), body.get("key")
        cpub, csec = zmq.curve_keypair()

        def stranger(licence_id: str, client_public: str) -> str:
            proof = PublisherKey.generate()
            lic = Licence(licence_id, "stranger", "tcp://127.0.0.1:9", "k" * 40, client_public,
                          csec.decode(), model_id="m", kind="call",
                          proof_key=base64.b64encode(proof.export_private_raw()).decode())  # fmt: skip
            return mint_token(lic, models=["m"], expires=3600)

        made_up = stranger("lic-made-up", cpub.decode())
        forged = stranger(lid, key) if lid and key else made_up
        pb: Any = inference_pb2
        req = pb.ModelInferRequest(model_name="m")
        req.inputs.add(name="x", datatype="FP32", shape=[size // 256, 64])
        req.raw_input_contents.append(_BODY)
        raw = req.SerializeToString()
        out: dict[str, Any] = {"callers": a.callers, "size_mib": a.size}
        for door, port, send in (("rest", server.http, _rest), ("grpc", server.grpc, _grpc)):
            payload: Any = size if door == "rest" else raw
            for name, tok in (("made_up", made_up), ("forged_signature", forged)):
                out[f"{door}_{name}"] = _flood(
                    pid, a.callers, lambda s=send, p=port, t=tok, x=payload: s(p, t, x)
                )
            out[f"{door}_licensed_control"] = _flood(
                pid, 1, lambda s=send, p=port, t=licensed, x=payload: s(p, t, x)
            )
        print(json.dumps(out, indent=1))
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
