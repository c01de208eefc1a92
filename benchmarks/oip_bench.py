"""Section "oip": the Open Inference Protocol, the vault against NVIDIA Triton
and KServe, under 1, 8 and 32 concurrent callers, batching off and on.

Side by side in one run, on the same ONNX model (an MLP, ``x [N, 64] ->
logits [N, 10]``, one row per call), with the same onnxruntime options (one
intra-op thread, sequential) and the same number of instances (the cores):

- ``vault-rest`` / ``vault-grpc``: ``vault worker serve --http/--grpc``
  (:mod:`benchmarks.oip_hosts`), bearer token on every call;
- ``vault-zmq``: the same service's ZeroMQ front through ``vault.connect``;
- ``triton-rest`` / ``triton-grpc``: NVIDIA Triton via nvidia-pytriton (its
  own venv, ``VAULT_BENCH_PYTRITON`` = its python; see ENVIRONMENT notes);
- ``kserve-rest`` / ``kserve-grpc``: KServe's ``ModelServer`` (no dynamic
  batching of its own: its "batching on" rows are the same server).

Every protocol row is driven by tritonclient (binary tensors over REST), one
client per caller thread, in this process. Batching on: the vault with
``--max-batch 32`` (queue delay 0), Triton's dynamic batcher with
``max_batch_size 32`` (queue delay 0). Each point runs ``window`` seconds
after a warm-up. A server that cannot start here is left out with its
reason (``unavailable``).

Run alone: ``python -m benchmarks --sections oip`` or
``python -m benchmarks.oip_bench [--window S] [--callers 1,8,32] [--out F]``.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import models as M
from .harness import Unavailable
from .service_bench import _free_port

if TYPE_CHECKING:
    from .context import Context

CALLERS = (1, 8, 32)
ROOT = Path(__file__).resolve().parents[1]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    import signal

    from vault.core.process import stop_process

    stop_process(proc, 20)
    try:  # servers that fork workers (pytriton's proxies, kserve's workers)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.stdout is not None:
        proc.stdout.close()


def _drain(stream: Any) -> None:
    for _ in stream:
        pass


def _wait_ready(proc: subprocess.Popen[bytes], what: str, timeout: float = 180) -> bytes:
    assert proc.stdout is not None
    import select

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 0.5)
        if r:
            line = proc.stdout.readline()
            if line:
                # keep reading what it prints after: a server blocked on a full pipe
                # (KServe's workers log every call to stdout) would stall mid-run
                threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
                return line
        if proc.poll() is not None:
            break
    _stop(proc)
    raise Unavailable(f"{what} did not start")


class _Server:
    """A server process and its REST/gRPC ports."""

    def __init__(self, proc: subprocess.Popen[bytes], http: int, grpc: int, model: str) -> None:
        self.proc, self.http, self.grpc, self.model = proc, http, grpc, model
        self.headers: dict[str, str] | None = None
        self.zmq: Any = None

    def close(self) -> None:
        if self.zmq is not None:
            self.zmq.close()
        _stop(self.proc)


def _vault(work: Path, m: Any, *, max_batch: int, instances: int) -> _Server:
    import zmq

    from vault.core.crypto import PublisherKey
    from vault.core.licence import Licence
    from vault.core.token import mint_token
    from vault.sealing import seal

    pk = PublisherKey.generate()
    pk.save(work / "publisher.key", work / "publisher.pub")
    # declared batchable (and checked) so the service may join callers' rows
    res = seal(m, model_id="m", signing_key=pk, output=work / f"m{max_batch}.vault",
               batchable=max_batch > 1)  # fmt: skip
    spub, ssec = zmq.curve_keypair()
    cpub, csec = zmq.curve_keypair()
    proof = PublisherKey.generate()
    lic = Licence("bench-call", "bench", "tcp://127.0.0.1:9", spub.decode(), cpub.decode(),
                  csec.decode(), model_id="m", kind="call",
                  proof_key=base64.b64encode(proof.export_private_raw()).decode())  # fmt: skip
    cfg = {"keys": {str(res.path): bytes(res.key).hex()}, "publisher": str(work / "publisher.pub"),
           "instances": instances, "max_batch": max_batch, "max_queue_delay_us": 0,
           "public": spub.decode(), "secret": ssec.decode(), "client_public": cpub.decode(),
           "licence_id": lic.licence_id, "proof_key": lic.proof_public_key}  # fmt: skip
    path = work / f"oip-vault-{max_batch}.json"
    path.write_text(json.dumps(cfg))
    os.chmod(path, 0o600)
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.oip_hosts", "vault", str(path)],
                            stdout=subprocess.PIPE, env=_env(), start_new_session=True)  # fmt: skip
    ready = json.loads(_wait_ready(proc, "the vault service"))
    s = _Server(proc, ready["http_port"], ready["grpc_port"], "m")
    s.headers = {"authorization": f"Bearer {mint_token(lic, models=['m'], expires=3600)}"}
    import vault

    s.zmq = vault.connect(ready["endpoint"], licence=lic, server_key=spub.decode(), model="m",
                          timeout=60)  # fmt: skip
    return s


def pytriton_python() -> str | None:
    """The interpreter of a venv with nvidia-pytriton (VAULT_BENCH_PYTRITON)."""
    py = os.environ.get("VAULT_BENCH_PYTRITON")
    return py if py and os.path.exists(py) else None


def _triton(onnx_path: Path, *, max_batch: int, instances: int) -> _Server:
    py = pytriton_python()
    if py is None:
        raise Unavailable("nvidia-pytriton: set VAULT_BENCH_PYTRITON to a venv's python that has "
                          "it (with onnxruntime and numpy)")  # fmt: skip
    libdir = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    # pytriton's helper otherwise loads Debian's libpython (docs: ENVIRONMENT notes)
    ld = ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)
    http, grpc = _free_port(), _free_port()
    proc = subprocess.Popen([py, "-m", "benchmarks.oip_hosts", "triton", str(onnx_path), str(http),
                             str(grpc), str(instances), str(max_batch)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=_env({"LD_LIBRARY_PATH": ld}),
                            start_new_session=True)  # fmt: skip
    _wait_ready(proc, "pytriton")
    _wait_http(http, proc, "pytriton")  # "ready" comes before tritonserver listens
    return _Server(proc, http, grpc, "m")


def _kserve(onnx_path: Path, *, instances: int) -> _Server:
    py = os.environ.get("VAULT_BENCH_KSERVE", sys.executable)
    ok = subprocess.run([py, "-c", "import kserve"], capture_output=True).returncode == 0
    if not ok:
        raise Unavailable(
            "kserve is not installed (pip install -e '.[test]', or VAULT_BENCH_KSERVE)"
        )
    http, grpc = _free_port(), _free_port()
    proc = subprocess.Popen([py, "-m", "benchmarks.oip_hosts", "kserve", str(onnx_path), str(http),
                             str(grpc), str(instances)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=_env(), start_new_session=True)  # fmt: skip
    _wait_ready(proc, "kserve")
    _wait_http(http, proc, "kserve")
    return _Server(proc, http, grpc, "m")


def _wait_http(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/v2/models/m/ready", timeout=2
            ) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    _stop(proc)
    raise Unavailable(f"{what} did not become ready")


def _reference(onnx_path: Path, x: np.ndarray[Any, Any]) -> Any:
    """What plain onnxruntime answers (every system must answer the same)."""
    from .oip_hosts import _session

    return _session(str(onnx_path)).run(None, {"x": x})[0]


def _callers(s: _Server, x: np.ndarray[Any, Any], proto: str) -> Callable[[], Any]:
    """A call function with one client per calling thread."""
    tls = threading.local()
    if proto == "zmq":
        return lambda: s.zmq.compute({"x": x})
    if proto == "rest":
        import tritonclient.http as th

        def rest() -> Any:
            c = getattr(tls, "c", None)
            if c is None:
                c = tls.c = th.InferenceServerClient(f"127.0.0.1:{s.http}", network_timeout=10)
                tls.inp = th.InferInput("x", list(x.shape), "FP32")
                tls.inp.set_data_from_numpy(x, binary_data=True)
                tls.out = [th.InferRequestedOutput("logits", binary_data=True)]
            # tritonclient.http adds its own headers to the dict it is given: a copy
            return c.infer(s.model, [tls.inp], outputs=tls.out, request_id="1",
                           headers=dict(s.headers) if s.headers else None).as_numpy("logits")  # fmt: skip

        return rest
    import tritonclient.grpc as tg

    def grpc() -> Any:
        c = getattr(tls, "c", None)
        if c is None:
            c = tls.c = tg.InferenceServerClient(f"127.0.0.1:{s.grpc}")
            tls.kw = {"client_timeout": 10.0}
            tls.inp = tg.InferInput("x", list(x.shape), "FP32")
            tls.inp.set_data_from_numpy(x)
        return c.infer(s.model, [tls.inp], headers=s.headers, request_id="1", **tls.kw).as_numpy(
            "logits"
        )

    return grpc


def _load(fn: Callable[[], Any], n: int, window: float) -> dict[str, Any]:
    """``n`` threads call ``fn`` for ``window`` seconds after a warm-up; a
    failed call (warm-up included) is counted, never a hang of the run."""
    import statistics

    lat: list[list[float]] = [[] for _ in range(n)]
    errors = [0] * n
    first: list[str] = []
    go = threading.Barrier(n + 1, timeout=600)
    stop_at = [1e18]

    def worker(i: int) -> None:
        for _ in range(3):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - counted
                errors[i] += 1
                first.append(f"{type(exc).__name__}: {exc}"[:300])
        go.wait()
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at[0]:
                return
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - counted, the row says how many
                errors[i] += 1
                first.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            lat[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    go.wait()
    t_start = time.perf_counter()
    stop_at[0] = t_start + window
    for t in threads:
        t.join(window + 120)
    elapsed = time.perf_counter() - t_start
    all_lat = sorted(x for per in lat for x in per)
    err = {"errors": sum(errors), **({"first_error": first[0]} if first else {})}
    if not all_lat:
        return {"calls_per_s": 0.0, **err}
    return {
        **err,
        "calls_per_s": len(all_lat) / elapsed,
        "p50_ms": statistics.median(all_lat) * 1e3,
        "p99_ms": all_lat[min(len(all_lat) - 1, int(0.99 * len(all_lat)))] * 1e3,
        "calls": len(all_lat),
    }


def _leftovers() -> str:
    """The live children this process carries into the section (its load
    generator's callers are threads of it, so whatever earlier sections left
    running sits beside them): how many, and what each runs."""
    me = str(os.getpid())
    kids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            if stat[stat.rindex(")") + 2 :].split()[1] == me:
                kids.append(Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ")[:60])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return f"{len(kids)} live children {[k.decode(errors='replace') for k in kids]}"


def run(work: Path, *, window: float, log: Callable[[str], None],
        callers: tuple[int, ...] = CALLERS,
        systems_wanted: tuple[str, ...] = ("triton", "vault", "kserve"),
        batchings: tuple[str, ...] = ("off", "on")) -> dict[str, Any]:  # fmt: skip
    instances = max(1, os.cpu_count() or 2)
    log(f"  oip: before the section, {_leftovers()}")
    m = M.mlp(d_in=64, hidden=256, classes=10)
    onnx_path = work / "oip-mlp.onnx"
    onnx_path.write_bytes(m.SerializeToString())
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    rows: list[dict[str, Any]] = []
    unavailable: dict[str, str] = {}
    for batching, mb in (("off", 1), ("on", 32)):
        if batching not in batchings:
            continue
        servers: dict[str, _Server] = {}
        try:

            def start_triton(mb: int = mb) -> _Server:
                return _triton(onnx_path, max_batch=mb, instances=instances)

            def start_vault(mb: int = mb) -> _Server:
                return _vault(work, m, max_batch=mb, instances=instances)

            def start_kserve() -> _Server:
                return _kserve(onnx_path, instances=instances)

            starters: list[tuple[str, Callable[[], _Server]]] = [
                ("triton", start_triton),
                ("vault", start_vault),
                ("kserve", start_kserve),
            ]  # pytriton first: its proxy has a 1 s handshake (ENVIRONMENT notes)
            for name, start in starters:
                if name not in systems_wanted:
                    continue
                try:
                    servers[name] = start()
                except Unavailable as exc:
                    unavailable[name] = str(exc)
                    log(f"oip {name}: {exc}")
            systems: dict[str, Callable[[], Any]] = {}
            want = _reference(onnx_path, x)
            for name, s in servers.items():
                for proto in ("rest", "grpc", *(("zmq",) if name == "vault" else ())):
                    fn = _callers(s, x, proto)
                    try:  # every system answers this very input alike, or is left out
                        got = fn()
                        got = got["logits"] if proto == "zmq" else got
                        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
                    except Exception as exc:  # noqa: BLE001 - said in the results
                        unavailable[f"{name}-{proto} ({batching})"] = (
                            f"{type(exc).__name__}: {exc}"[:300]
                        )
                        log(f"oip {name}-{proto}: left out: {exc}")
                        continue
                    systems[f"{name}-{proto}"] = fn
            for n in callers:
                for label, fn in systems.items():
                    r = _load(fn, n, window)
                    rows.append({"system": label, "batching": batching, "callers": n, **r})
                    log(f"oip {label:12s} batching {batching:3s} {n:2d} callers: "
                        f"{r['calls_per_s']:8.0f}/s p50 {r.get('p50_ms', 0):7.3f} ms "
                        f"p99 {r.get('p99_ms', 0):7.3f} ms errors {r['errors']} "
                        f"{r.get('first_error', '')}")  # fmt: skip
        finally:
            for s in servers.values():
                s.close()
    return {"rows": rows, "window_s": window, "instances": instances, "unavailable": unavailable,
            "targets": _targets(rows), "python": sysconfig.get_python_version()}  # fmt: skip


def _get(rows: list[dict[str, Any]], system: str, batching: str, n: int) -> dict[str, Any]:
    for r in rows:
        if r["system"] == system and r["batching"] == batching and r["callers"] == n:
            return r
    return {}


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    ns = sorted({r["callers"] for r in rows})
    for proto in ("rest", "grpc"):
        for batching in ("off", "on"):
            for n in ns:
                a = _get(rows, f"vault-{proto}", batching, n)
                for peer in ("triton", "kserve"):
                    p = _get(rows, f"{peer}-{proto}", batching, n)
                    if a.get("p50_ms") and p.get("p50_ms"):
                        out.append({"target": f"vault-{proto} p50 below {peer}-{proto}, batching "
                                              f"{batching}, {n} callers",
                                    "value": f"{a['p50_ms']:.3f} vs {p['p50_ms']:.3f} ms",
                                    "ok": a["p50_ms"] < p["p50_ms"]})  # fmt: skip
                    if batching == "on" and a.get("calls_per_s") and p.get("calls_per_s"):
                        out.append({"target": f"vault-{proto} throughput above {peer}-{proto}, "
                                              f"batching on, {n} callers",
                                    "value": f"{a['calls_per_s']:.0f} vs {p['calls_per_s']:.0f}/s",
                                    "ok": a["calls_per_s"] > p["calls_per_s"]})  # fmt: skip
    return out


def table(res: dict[str, Any]) -> str:
    lines = ["| system | batching | callers | calls/s | p50 ms | p99 ms |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in res["rows"]:
        lines.append(f"| {r['system']} | {r['batching']} | {r['callers']} | {r['calls_per_s']:.0f} | "
                     f"{r.get('p50_ms', float('nan')):.3f} | {r.get('p99_ms', float('nan')):.3f} |")  # fmt: skip
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, batching in zip(axes, ("off", "on")):
        systems = sorted({r["system"] for r in res["rows"] if r["batching"] == batching})
        for sysname in systems:
            pts = sorted((r["callers"], r.get("p50_ms", float("nan")), r["calls_per_s"])
                         for r in res["rows"] if r["system"] == sysname and r["batching"] == batching)  # fmt: skip
            ax.plot([p[2] for p in pts], [p[1] for p in pts], marker="o", label=sysname)
            for c, p50, tput in pts:
                ax.annotate(str(c), (tput, p50), fontsize=7)
        ax.set_xlabel("calls/s (annotated: concurrent callers)")
        ax.set_ylabel("p50 latency, ms")
        ax.set_yscale("log")
        ax.set_title(f"Open Inference Protocol, batching {batching}")
        ax.legend(fontsize=7)
    fig.suptitle(res.get("load_note", ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def section(ctx: Context) -> dict[str, Any]:
    return run(ctx.workdir, window=1.0 if ctx.quick else 3.0, log=ctx.log)


if __name__ == "__main__":
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m benchmarks.oip_bench")
    ap.add_argument("--window", type=float, default=3.0)
    ap.add_argument("--callers", default="1,8,32")
    ap.add_argument("--systems", default="triton,vault,kserve")
    ap.add_argument("--batching", default="off,on")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--plot", default=None, help="also draw the plot here (PNG)")
    ap.add_argument("--load-note", default="", help="what else ran on the machine (for the plot)")
    a = ap.parse_args()
    import signal

    def _term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # run the finally blocks: stop every server

    signal.signal(signal.SIGTERM, _term)
    with tempfile.TemporaryDirectory(prefix="vault-oipbench-") as d:
        res = run(Path(d), window=a.window, log=lambda s: print(s, file=sys.stderr, flush=True),
                  callers=tuple(int(c) for c in a.callers.split(",")),
                  systems_wanted=tuple(a.systems.split(",")),
                  batchings=tuple(a.batching.split(",")))  # fmt: skip
    res["load_note"] = a.load_note
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    if a.plot:
        plot(res, Path(a.plot))
    print(table(res))
    for t in res["targets"]:
        print(f"{'PASS' if t['ok'] else 'MISS'}  {t['target']}: {t['value']}")
