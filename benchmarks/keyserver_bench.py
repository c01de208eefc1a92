"""Key releases per second and latency against a real key server process.

Starts ``python -m keyserver serve`` on a fresh directory, registers a key,
issues licences, then drives 1, 10 and 50 concurrent clients. Each client is
one CURVE connection with one request in flight (a caller's worker asking for
its key), doing the full client work: a fresh HPKE ephemeral key per request
and opening the sealed key. Clients run in separate processes (``--procs``,
default 2) on their own event loop each, so the measurement is of the server,
not of the GIL of a single client process.

Example::

    $ python benchmarks/keyserver_bench.py            # full run
    $ python benchmarks/keyserver_bench.py --quick
    >>> from benchmarks.keyserver_bench import run; run(quick=True)["50"]["releases_per_s"]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import Context

import argparse
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MODEL, KEY_ID, DIGEST = "bench-model", "k1", "sha256:bench"


def _client_loop(
    licences: list[dict[str, Any]],
    n_sockets: int,
    duration: float,
    start_at: float,
    interval: float,
    nice: int,
    q: Any,
) -> None:
    """n_sockets connections, each with at most one release in flight, for
    ``duration``. ``interval`` 0: closed loop (send again on each reply);
    else each connection sends on a fixed schedule, one every ``interval`` s
    (latency is still measured from the actual send)."""
    import zmq

    if nice:
        os.nice(nice)  # load generators yield the CPU to the server they measure
    from vault.core import crypto as _crypto
    from vault.core.licence import Licence
    from vault.core.protocol import PROTOCOL_VERSION, pack_header, unpack_header

    ctx = zmq.Context()
    socks = []
    for i in range(n_sockets):
        lic = Licence.from_json(licences[i % len(licences)])
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.curve_serverkey = lic.keyserver_public_key.encode()
        s.curve_publickey = lic.client_public_key.encode()
        s.curve_secretkey = lic.client_secret_key.encode()
        s.connect(lic.keyserver_address)
        socks.append((s, lic))
    poller = zmq.Poller()
    for s, _ in socks:
        poller.register(s, zmq.POLLIN)
    pending: dict[Any, tuple[float, Any, Any]] = {}
    latencies: list[float] = []
    errors = 0
    rid = 0

    def send(s: Any, lic: Licence) -> None:
        nonlocal rid
        rid += 1
        eph = _crypto.EphemeralKey()
        hdr = {"v": PROTOCOL_VERSION, "op": "release", "id": rid, "nonce": os.urandom(16),
               "ts": time.time(), "model_id": MODEL, "key_id": KEY_ID,
               "package_digest": DIGEST, "licence_id": lic.licence_id,
               "ephemeral_key": eph.public_bytes}  # fmt: skip
        pending[s] = (time.perf_counter(), eph, lic)
        s.send(pack_header(hdr))

    # warm-up: one ping-equivalent release per socket (handshakes) before timing
    while time.time() < start_at:
        time.sleep(0.001)
    t_start = time.perf_counter()
    end = t_start + duration
    n = len(socks)
    # staggered schedule so paced clients do not fire in lock-step
    due = {s: t_start + (i / n) * interval for i, (s, _) in enumerate(socks)}
    idle = dict(socks)
    while pending or (idle and time.perf_counter() < end):
        now = time.perf_counter()
        for s in [s for s in idle if due[s] <= now]:
            send(s, idle.pop(s))
            due[s] = max(due[s] + interval, now) if interval else now
        if not pending:
            time.sleep(max(0.0, min(due.values()) - time.perf_counter()))
            continue
        wait_ms = 1000 if not idle else max(0, math.ceil((min(due[s] for s in idle) - now) * 1000))
        for s, _ev in poller.poll(wait_ms):
            t0, eph, lic = pending.pop(s)
            reply = unpack_header(s.recv())
            now = time.perf_counter()
            if reply.get("ok"):
                key = eph.open(
                    reply["sealed_key"], _crypto.key_release_info(MODEL, DIGEST, lic.licence_id)
                )
                _crypto.zeroize(key)
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
            if now < end:
                idle[s] = lic
    for s, _ in socks:
        s.close(0)
    ctx.term()
    q.put((latencies, errors))


def _percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux), to report server CPU per release."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _measure(
    licences: list[dict[str, Any]],
    clients: int,
    duration: float,
    procs: int,
    rate: float = 0.0,
    server_pid: int = 0,
    nice: int = 0,
) -> dict[str, Any]:
    """``rate`` 0: saturate (closed loop); else offer ``rate`` releases/s in all."""
    interval = clients / rate if rate else 0.0
    procs = max(1, min(procs, clients))
    share = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    q: Any = mp.get_context("fork").Queue()
    start_at = time.time() + 1.0 + clients * 0.01  # time for every handshake
    ps = [
        mp.get_context("fork").Process(
            target=_client_loop, args=(licences, n, duration, start_at, interval, nice, q)
        )
        for n in share
    ]
    for p in ps:
        p.start()
    while time.time() < start_at:
        time.sleep(0.005)
    cpu0 = _cpu_seconds(server_pid) if server_pid else float("nan")
    lat: list[float] = []
    errors = 0
    for _ in ps:
        got, err = q.get(timeout=duration + 60)
        lat.extend(got)
        errors += err
    cpu = (_cpu_seconds(server_pid) if server_pid else float("nan")) - cpu0
    for p in ps:
        p.join(10)
    return {
        "server_cpu_ms_per_release": round(cpu * 1000 / max(1, len(lat)), 3),
        "clients": clients,
        "offered_per_s": rate or "max",
        "releases": len(lat),
        "errors": errors,
        "releases_per_s": round(len(lat) / duration, 1),
        "p50_ms": round(_percentile(lat, 50) * 1000, 2),
        "p99_ms": round(_percentile(lat, 99) * 1000, 2),
        "max_ms": round(max(lat) * 1000, 2) if lat else float("nan"),
    }


def run(
    quick: bool = False,
    procs: int = 2,
    nice: int = 0,
    *,
    database: str | None = None,
    anchor: bool = False,
    replicas: int = 1,
) -> dict[str, Any]:
    """Start a key server, measure 1/10/50 clients; returns the numbers.

    The clients share the machine with the server (2 cores here): their HPKE
    and CURVE work competes with it. ``nice`` > 0 lowers the clients'
    priority, approximating clients on other machines."""
    from keyserver import init_dir
    from vault.core import crypto as _crypto
    from vault.core.keyclient import KeyServerClient
    from vault.core.launch import read_ready_line
    from vault.core.licence import Licence

    duration = 2.0 if quick else 5.0
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "ks")
        init_dir(d, database=database)
        log = open(os.path.join(tmp, "server.log"), "wb")
        env = {**os.environ, "PYTHONPATH": ROOT}
        extra = ["--database", database] if database else []
        addresses: list[str] = []
        servers: list[subprocess.Popen[bytes]] = []
        for i in range(replicas if database else 1):
            anchor_args = ["--anchor", os.path.join(tmp, f"audit{i}.anchor")] if anchor else []
            servers.append(subprocess.Popen(
                [sys.executable, "-u", "-m", "keyserver", "serve", d, "--bind", "tcp://127.0.0.1:0",
                 *extra, *anchor_args,
                 # capacity, not the per-key flood limit (20/s a key by default)
                 "--request-limit", "off"],
                stdout=subprocess.PIPE, stderr=log, env=env,
            ))  # fmt: skip
        proc = servers[0]
        try:
            for p in servers:
                assert p.stdout is not None
                with p.stdout:
                    ready = read_ready_line(p.stdout, timeout=10, proc=p, what="key server")
                addresses.append(str(ready["address"]))
            address = addresses[0]
            admin = Licence.load(os.path.join(d, "admin.licence"))
            with KeyServerClient(admin, address=address) as ks:
                ks.register_key(
                    model_id=MODEL, key_id=KEY_ID, key=_crypto.generate_key(), package_digest=DIGEST
                )
                licences = [  # tier 0 licences: raw requests with the licence's own key
                    ks.issue(MODEL, holder=f"bench{i}", same_user=True).to_json() for i in range(50)
                ]
            for i, lic in enumerate(licences):  # clients spread over the replicas
                lic["keyserver"]["address"] = addresses[i % len(addresses)]
            results: dict[str, Any] = {"duration_s": duration, "procs": procs,
                                       "nice": nice, "cpus": os.cpu_count(),
                                       "store": "postgresql" if database else "sqlite",
                                       "replicas": len(servers), "anchor": anchor}  # fmt: skip
            for clients in (1, 10, 50):
                results[str(clients)] = _measure(
                    licences, clients, duration, procs, server_pid=proc.pid, nice=nice
                )
            # the target load: 1,000 releases/s offered by 50 clients (20/s each)
            results["50@1000"] = _measure(
                licences, 50, duration, procs, rate=1000.0, server_pid=proc.pid, nice=nice
            )
            return results
        finally:
            for p in servers:
                p.terminate()
                p.wait(10)
            log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--nice", type=int, default=0, help="client processes' niceness")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--database", default=None, help="postgresql://... (an empty database)")
    ap.add_argument("--replicas", type=int, default=1, help="key servers on --database")
    ap.add_argument("--anchor", action="store_true", help="serve with --anchor (checkpoints)")
    a = ap.parse_args()
    res = run(quick=a.quick, procs=a.procs, nice=a.nice, database=a.database,
              anchor=a.anchor, replicas=a.replicas)  # fmt: skip
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"key server releases ({res['cpus']} CPUs, {res['duration_s']}s per point, "
          f"{res['procs']} client processes, nice {res['nice']}; store {res['store']}, "
          f"{res['replicas']} replica(s), anchor {'on' if res['anchor'] else 'off'})")  # fmt: skip
    print(f"{'clients':>8} {'offered':>8} {'rel/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'errors':>7} {'srv cpu ms/rel':>15}")  # fmt: skip
    for c in ("1", "10", "50", "50@1000"):
        r = res[c]
        print(f"{r['clients']:>8} {r['offered_per_s']:>8} {r['releases_per_s']:>9} "
              f"{r['p50_ms']:>8} {r['p99_ms']:>8} {r['max_ms']:>8} {r['errors']:>7} "
              f"{r['server_cpu_ms_per_release']:>15}")  # fmt: skip
    print("target: >= 1000 releases/s and p99 < 20 ms at 50 clients")


if __name__ == "__main__":
    main()


def section(ctx: Context) -> dict[str, Any]:
    return run(quick=ctx.quick)
