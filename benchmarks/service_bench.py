"""Section "service": the worker service under 1, 8 and 32 concurrent callers.

Side by side in one run, on the same ONNX models (a small and a medium MLP,
``x [N, D] -> logits [N, 10]``, one row per call):

- ``onnxruntime``: in-process, the callers' threads share one session (the
  floor: no process boundary, no network);
- ``vault``: ``vault worker serve`` (:mod:`worker.service`, its own process,
  hardened worker processes, CURVE over tcp://127.0.0.1), batching off;
- ``vault+batch``: the same with dynamic batching (``--max-batch 32``);
- ``litserve`` and ``litserve+batch``: LitServe serving the same model with
  onnxruntime over HTTP/JSON (``bench`` extra), batching off and on.

Both servers get the same worker processes (``instances``) with one
onnxruntime thread each. Each point runs ``window`` seconds after a warm-up;
throughput is calls completed per second, latency the p50 and p99 of the
calls in the window. The load generator is this process's threads, the same
for every row.

Run alone: ``python -m benchmarks --sections service`` (``--quick`` shortens
the windows), or ``python -m benchmarks.service_bench`` for the table only.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import models as M
from .harness import Unavailable, ort_session

if TYPE_CHECKING:
    from .context import Context

CALLERS = (1, 8, 32)
ROOT = Path(__file__).resolve().parents[1]


def _models() -> dict[str, Any]:
    return {
        "small": M.mlp(d_in=64, hidden=256, classes=10),  # ~0.3 MB of weights
        "medium": M.mlp(),  # ~16.8 MB: 1024 -> 2048 -> 1024 -> 10
    }


def _load(fn: Callable[[], Any], n: int, window: float) -> dict[str, Any]:
    """``n`` threads call ``fn`` for ``window`` seconds after a warm-up."""
    lat: list[list[float]] = [[] for _ in range(n)]
    errors = [0] * n
    go = threading.Barrier(n + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        for _ in range(3):
            fn()  # this thread's socket / connection, warm
        go.wait()
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at[0]:
                return
            try:
                fn()
            except Exception:  # noqa: BLE001 - counted, the row says how many
                errors[i] += 1
                continue
            lat[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 1e9
    go.wait()
    t_start = time.perf_counter()
    stop_at[0] = t_start + window
    for t in threads:
        t.join(window + 60)
    elapsed = time.perf_counter() - t_start
    all_lat = sorted(x for per in lat for x in per)
    if not all_lat:
        return {"calls_per_s": 0.0, "errors": sum(errors)}
    return {
        "calls_per_s": len(all_lat) / elapsed,
        "p50_ms": statistics.median(all_lat) * 1e3,
        "p99_ms": all_lat[min(len(all_lat) - 1, int(0.99 * len(all_lat)))] * 1e3,
        "calls": len(all_lat),
        "errors": sum(errors),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Vault:
    def __init__(self, work: Path, onnx_model: Any, name: str, *, max_batch: int,
                 instances: int) -> None:  # fmt: skip
        import zmq

        from vault.core.crypto import PublisherKey
        from vault.core.licence import Licence
        from vault.sealing import seal

        pk = PublisherKey.generate()
        pk.save(work / "publisher.key", work / "publisher.pub")
        # declared batchable (and checked) so the service may join callers' rows
        res = seal(onnx_model, model_id=name, signing_key=pk, output=work / f"{name}.vault",
                   batchable=max_batch > 1)  # fmt: skip
        spub, ssec = zmq.curve_keypair()
        cpub, csec = zmq.curve_keypair()
        cfg = {
            "keys": {str(res.path): bytes(res.key).hex()},
            "publisher": str(work / "publisher.pub"),
            "instances": instances,
            "intra_op_threads": 1,
            "max_batch": max_batch,
            "max_queue_delay_us": 0,
            "public": spub.decode(),
            "secret": ssec.decode(),
            "client_public": cpub.decode(),
        }
        cfg_path = work / f"service-{name}-{max_batch}.json"
        cfg_path.write_text(json.dumps(cfg))
        os.chmod(cfg_path, 0o600)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.service_host",
                                      str(cfg_path)], stdout=subprocess.PIPE, env=env)  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise Unavailable("the service did not start")
        endpoint = json.loads(line)["endpoint"]
        self.lic = Licence("bench", "bench", "tcp://127.0.0.1:9", spub.decode(), cpub.decode(),
                           csec.decode())  # fmt: skip
        import vault

        self.model = vault.connect(endpoint, licence=self.lic, server_key=spub.decode(),
                                   model=name, timeout=60)  # fmt: skip

    def call(self, x: np.ndarray[Any, Any]) -> Any:
        return self.model.compute({"x": x})

    def close(self) -> None:
        self.model.close()
        from vault.core.process import stop_process

        stop_process(self.proc, 30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class _LitServe:
    def __init__(self, path: Path, *, max_batch: int, workers: int) -> None:
        try:
            import litserve  # noqa: F401
        except ImportError as exc:
            raise Unavailable("LitServe is not installed (pip install '.[bench]')") from exc
        self.port = _free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.litserve_host", str(path), str(self.port),
             str(workers), str(max_batch)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True,  # its own group: LitServe's worker processes go with it
        )  # fmt: skip
        self._tls = threading.local()
        deadline = time.monotonic() + 120
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().read() == b"ok":
                    c.close()
                    break
                c.close()
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise Unavailable("LitServe did not start")
            time.sleep(0.2)

    def call(self, x: np.ndarray[Any, Any]) -> Any:
        conn = getattr(self._tls, "conn", None)
        if conn is None:
            conn = self._tls.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        body = json.dumps({"x": x.tolist()})
        conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")
        return json.loads(data)

    def close(self) -> None:
        import signal

        from vault.core.process import stop_process

        stop_process(self.proc, 10)
        try:  # LitServe's spawned workers outlive their parent otherwise
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(work: Path, *, window: float, log: Callable[[str], None]) -> dict[str, Any]:
    instances = max(1, os.cpu_count() or 2)
    rows: list[dict[str, Any]] = []
    for name, m in _models().items():
        path = work / f"{name}.onnx"
        path.write_bytes(m.SerializeToString())
        x = (
            np.random.default_rng(0)
            .standard_normal((1, m.graph.input[0].type.tensor_type.shape.dim[1].dim_value))
            .astype(np.float32)
        )  # noqa: E501
        sess = ort_session(m.SerializeToString())
        systems: dict[str, Callable[[], Any]] = {}
        closers: list[Callable[[], None]] = []
        try:
            systems["onnxruntime"] = lambda s=sess, x=x: s.run(None, {"x": x})
            for label, mb in (("vault", 1), ("vault+batch", 32)):
                v = _Vault(work, m, f"{name}{mb}", max_batch=mb, instances=instances)
                closers.append(v.close)
                systems[label] = lambda v=v, x=x: v.call(x)
            for label, mb in (("litserve", 1), ("litserve+batch", 32)):
                try:
                    ls_ = _LitServe(path, max_batch=mb, workers=instances)
                except Unavailable as exc:
                    log(f"{label}: {exc}")
                    continue
                closers.append(ls_.close)
                systems[label] = lambda s=ls_, x=x: s.call(x)
            for n in CALLERS:
                for label, fn in systems.items():
                    r = _load(fn, n, window)
                    row = {"model": name, "system": label, "callers": n, **r}
                    log(f"service {name:6s} {label:15s} {n:2d} callers: "
                        f"{r['calls_per_s']:8.0f}/s p50 {r.get('p50_ms', 0):7.3f} ms "
                        f"p99 {r.get('p99_ms', 0):7.3f} ms")  # fmt: skip
                    rows.append(row)
        finally:
            for c in closers:
                c()
    return {"rows": rows, "window_s": window, "instances": instances, "targets": _targets(rows)}


def _get(rows: list[dict[str, Any]], model: str, system: str, n: int) -> dict[str, Any]:
    for r in rows:
        if r["model"] == model and r["system"] == system and r["callers"] == n:
            return r
    return {}


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for model in ("small", "medium"):
        b, nb = _get(rows, model, "vault+batch", 32), _get(rows, model, "vault", 32)
        if b and nb and nb.get("calls_per_s"):
            ratio = b["calls_per_s"] / nb["calls_per_s"]
            out.append({"target": f"{model}: batching at 32 callers >= 2x without",
                        "value": round(ratio, 2), "ok": ratio >= 2.0})  # fmt: skip
        for n in CALLERS:
            for mine, peer in (("vault", "litserve"), ("vault+batch", "litserve+batch")):
                a, p = _get(rows, model, mine, n), _get(rows, model, peer, n)
                if a.get("p50_ms") and p.get("p50_ms"):
                    out.append({"target": f"{model}: {mine} p50 below {peer} at {n} callers",
                                "value": f"{a['p50_ms']:.3f} vs {p['p50_ms']:.3f} ms",
                                "ok": a["p50_ms"] < p["p50_ms"]})  # fmt: skip
    return out


def table(res: dict[str, Any]) -> str:
    """The README's markdown table."""
    lines = [
        "| model | system | callers | calls/s | p50 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['system']} | {r['callers']} | {r['calls_per_s']:.0f} | "
                     f"{r.get('p50_ms', float('nan')):.3f} | {r.get('p99_ms', float('nan')):.3f} |")  # fmt: skip
    return "\n".join(lines)


def section(ctx: Context) -> dict[str, Any]:
    return run(ctx.workdir, window=1.0 if ctx.quick else 3.0, log=ctx.log)


if __name__ == "__main__":
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m benchmarks.service_bench")
    ap.add_argument("--window", type=float, default=3.0)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vault-svcbench-") as d:
        res = run(Path(d), window=a.window, log=lambda s: print(s, file=sys.stderr, flush=True))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    print(table(res))
    for t in res["targets"]:
        print(f"{'PASS' if t['ok'] else 'MISS'}  {t['target']}: {t['value']}")
