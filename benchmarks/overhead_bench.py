"""Per-call overhead of a vault local worker, against in-process onnxruntime
and a raw pyzmq echo of the same bytes (a separate process on ipc://).

The three are measured in the same run, interleaved call by call (so drift in
CPU frequency or load hits them alike), for a tiny tensor and a 1 MiB one.
``vault_overhead_vs_echo`` = (vault median - in-process median) / echo median:
the target is at most 1.3.

Example::

    $ python benchmarks/overhead_bench.py --quick
    from benchmarks.overhead_bench import run; run(quick=True)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import onnxruntime as ort
import zmq
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ECHO = r"""
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1])
print("ready", flush=True)
while True:
    m = s.recv_multipart(copy=False)
    s.send_multipart(m, copy=False)
"""


def _scale_model(width: int) -> Any:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "scale", [x], [y], [two])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _stats(samples: list[float]) -> dict[str, float]:
    a = np.array(samples) * 1e6
    return {"median_us": float(np.median(a)), "p99_us": float(np.percentile(a, 99))}


def _case(width: int, iters: int, tmp: str) -> dict[str, Any]:
    from tests.sealed import open_sealed, seal_for_test

    m = _scale_model(width)
    x = np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    sealed = seal_for_test(tmp, m, name=f"scale{width}")
    model = open_sealed(sealed)
    ep = f"ipc://{tmp}/echo{width}.sock"
    echo = subprocess.Popen([sys.executable, "-c", ECHO, ep], stdout=subprocess.PIPE)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        assert echo.stdout is not None and echo.stdout.readline().startswith(b"ready")
        sock.connect(ep)
        from vault.core.protocol import encode_tensors, pack_header

        descs, frames = encode_tensors({"x": x})
        header = pack_header({"v": 1, "op": "compute", "id": 1, "tensors": descs})

        def inproc() -> None:
            sess.run(["y"], {"x": x})

        def echo_call() -> None:
            sock.send_multipart([header, *frames], copy=False)
            sock.recv_multipart(copy=False)

        def vault_call() -> None:
            model.compute({"x": x})

        calls = {
            "onnxruntime_inprocess": inproc,
            "pyzmq_echo": echo_call,
            "vault_worker": vault_call,
        }
        for f in calls.values():  # warm up
            for _ in range(50):
                f()
        samples: dict[str, list[float]] = {k: [] for k in calls}
        order = list(calls)
        for _ in range(iters):
            random.shuffle(order)
            for k in order:
                t0 = time.perf_counter()
                calls[k]()
                samples[k].append(time.perf_counter() - t0)
        res: dict[str, Any] = {k: _stats(v) for k, v in samples.items()}
        v, o, e = (
            res[k]["median_us"] for k in ("vault_worker", "onnxruntime_inprocess", "pyzmq_echo")
        )
        res["payload_bytes"] = int(x.nbytes)
        res["vault_overhead_vs_echo"] = (v - o) / e
        res["vault_vs_echo"] = v / e
        return res
    finally:
        sock.close()
        ctx.term()
        echo.kill()
        echo.wait()
        model.close()


def _matmul_model(n: int) -> Any:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((n, n)).astype(np.float32), "w"
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w"], ["y"]),
    ]
    m = helper.make_model(
        helper.make_graph(nodes, "mm", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)]
    )
    m.ir_version = 8
    return m


def _throughput(tmp: str, seconds: float) -> dict[str, Any]:
    """Calls per second with 1 and 2 concurrent callers on a ~ms-sized model
    (one onnxruntime thread per call, so the worker's concurrency shows)."""
    import threading

    from tests.sealed import open_sealed, seal_for_test

    sealed = seal_for_test(tmp, _matmul_model(384), name="mm")
    x = np.ones((64, 384), np.float32)
    out: dict[str, Any] = {}
    with open_sealed(sealed, worker_args=["--intra-op-threads", "1", "--threads", "2"]) as model:
        for _ in range(20):
            model.compute({"x": x})
        for callers in (1, 2):
            counts = [0] * callers
            stop = time.monotonic() + seconds

            def work(i: int, stop: float = stop, counts: list[int] = counts) -> None:
                while time.monotonic() < stop:
                    model.compute({"x": x})
                    counts[i] += 1

            ts = [threading.Thread(target=work, args=(i,)) for i in range(callers)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            out[f"calls_per_s_{callers}_callers"] = sum(counts) / seconds
    out["scaling_2_vs_1"] = out["calls_per_s_2_callers"] / out["calls_per_s_1_callers"]
    return out


def run(quick: bool = False) -> dict[str, Any]:
    """Measure both payload sizes; returns a JSON-able dict of medians and p99s."""
    iters = 300 if quick else 3000
    tmp = tempfile.mkdtemp(prefix="vault-bench-")
    try:
        return {
            "iterations": iters,
            "small": _case(8, iters, tmp),
            "1MiB": _case(262144, max(100, iters // 10), tmp),
            "throughput": _throughput(tmp, 1.5 if quick else 5.0),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    print(json.dumps(run(quick=ap.parse_args().quick), indent=2))
