"""Section 3 (cold start) and section 6 (peak memory).

Cold start, per model size (about 16, 100 and 500 MB of weights; quick: 16
and 100), interleaved round by round in one run:

* ``plain_load``: ``onnxruntime.InferenceSession(path)`` in this (warm) process;
* ``vault_open``: ``vault.open(pkg, licence=...)`` until it returns a ready
  Model (spawn, imports, hardening, verify, key release, decrypt, session,
  the first ``info`` round trip); its ``close()`` is not timed;
* ``vault_open_daemon``: the same through the local daemon (tier 1), which
  keeps a worker pre-started (hardened, onnxruntime imported): spawn and
  imports leave the open; where the daemon cannot run (not root) the row is
  absent and the reason recorded;
* ``plain_fresh_process`` (context): a new Python that imports onnxruntime and
  loads the same file - the cost of *any* separate process.

The parts are the worker's own startup timings (``Model.startup_ms``, sent
in its ready line), medians over the rounds: verify, key release, decrypt,
session (including any wait for the onnxruntime import, which runs in a
thread alongside verify/release/decrypt); spawn + interpreter + imports +
hardening = total - parts.

Peak memory: VmHWM of the worker after one compute versus VmHWM of a fresh
process that loads the plain model with onnxruntime and computes once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import Context

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from . import models as M
from .harness import Timed, interleave, summary, vm_hwm

_PLAIN_CHILD = """
import resource, sys, time
t = time.perf_counter()
import numpy as np
import onnxruntime as ort
r0 = resource.getrusage(resource.RUSAGE_SELF)
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
t_load = time.perf_counter() - t
r1 = resource.getrusage(resource.RUSAGE_SELF)
if sys.argv[2] == "compute":
    x = np.zeros([d if isinstance(d, int) else 1 for d in s.get_inputs()[0].shape], np.float32)
    s.run(None, {s.get_inputs()[0].name: x})
st = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status")
      if l.startswith(("VmHWM:", "VmRSS:"))}
print(t_load, st["VmHWM"], st["VmRSS"], r1.ru_minflt - r0.ru_minflt,
      r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime)
"""


# the first open in a fresh process, as a script does it: from before
# ``import vault`` to a ready Model (the child's own clock, as _PLAIN_CHILD's
# load is timed from before ``import numpy`` and ``import onnxruntime``; until
# stop 38's full run it started after numpy's: the interpreter's own start
# and exit are the same for both and left out)
_VAULT_CHILD = """
import sys, time
t = time.perf_counter()
import vault
m = vault.open(sys.argv[1], licence=sys.argv[2])
dt = time.perf_counter() - t
print(dt, int(bool(m._localw.ready.get("standby"))))
m.close()
"""


def _vault_child(pkg: Path, lic: Path, standby: bool) -> tuple[float, bool]:
    """A fresh Python's first ``vault.open`` (``standby``: as shipped, its worker
    started before the client's imports; else ``VAULT_STANDBY=0``, a cold spawn
    after them, as every first open was before stop 38): its time, and
    whether it took the worker started first."""
    env = {k: v for k, v in os.environ.items() if k != "VAULT_DAEMON"}
    env["VAULT_STANDBY"] = "1" if standby else "0"
    out = subprocess.run(
        [sys.executable, "-c", _VAULT_CHILD, str(pkg), str(lic)],
        capture_output=True, text=True, check=True, env=env,
    ).stdout.split()  # fmt: skip
    return float(out[0]), out[1] == "1"


_MEM_PARTS_CHILD = """
import json, sys
def rss():
    d = {}
    for l in open("/proc/self/status"):
        if l.startswith(("VmRSS", "VmHWM")):
            d[l.split(":")[0]] = int(l.split()[1]) * 1024
    return d
out = {}
import numpy, zmq, onnxruntime
out["imports"] = rss()
from vault.core import crypto as _crypto
from vault.core.keyclient import KeyServerClient
from vault.core.licence import Licence
from vault.core.package import Package
from worker.runtime import Pipeline
lic = Licence.load(sys.argv[2])
pkg = Package.load(sys.argv[1]); pkg.verify(_crypto.load_public_key(lic.publisher_key)); out["load_verify"] = rss()
with KeyServerClient(lic) as ks:
    rel = ks.release(model_id=pkg.model_id, key_id=pkg.key_id, package_digest=pkg.digest)
plain = pkg.decrypt(rel.key, lazy=True); pkg.drop_resident_pages(); out["decrypt"] = rss()
pipe = Pipeline(plain.graphs, plain.files, inputs=pkg.inputs, outputs=pkg.outputs, owner=plain)
out["session"] = rss()
plain.wipe_graphs(); pkg.close(); out["wipe_graphs_close_package"] = rss()
if hasattr(plain, "settle"):
    plain.settle(); out["settle_lazy_weights"] = rss()
pipe.close(); out["session_closed_plaintext_wiped"] = rss()
print(json.dumps(out))
"""


def _mem_parts(pkg: Path, lic: Path) -> dict[str, Any]:
    """RSS/HWM after each of the worker's steps (as ``worker/__main__.py`` runs
    them), replayed in a fresh process; keep the two in step."""
    import json

    r = subprocess.run(
        [sys.executable, "-c", _MEM_PARTS_CHILD, str(pkg), str(lic)],
        capture_output=True,
        text=True,
        # no malloc tunable, as the client gives a worker none (stop 33)
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    if r.returncode:
        return {"unavailable": r.stderr[-300:]}
    return json.loads(r.stdout)


# after a timed tier-0 open, the client starts the next pre-started worker in
# the background; it is given this long, untimed, as the daemon's is
STANDBY_WAIT_S = 1.5


def _plain_child(path: Path, compute: bool) -> tuple[float, int, int, dict[str, float], float]:
    """A fresh Python loading ``path``: wall time, VmHWM, VmRSS, the load's
    own minor faults and CPU (user, sys) from its rusage, and its own clock
    from before ``import numpy`` to the session built."""
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _PLAIN_CHILD, str(path), "compute" if compute else "load"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    ru = {"minor_faults": float(out[3]), "cpu_user_s": float(out[4]), "cpu_sys_s": float(out[5])}
    # last: its own clock, from before import numpy and onnxruntime to the session built
    return time.perf_counter() - t, int(out[1]), int(out[2]), ru, float(out[0])


class _Rusage:
    """Minor faults and CPU (user, sys) of this process across calls (a plain
    load in the benchmark's own, long-lived process)."""

    def __init__(self) -> None:
        self.samples: list[dict[str, float]] = []

    def wrap(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        import resource

        def timed() -> Any:
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            res = fn()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            self.samples.append({
                "minor_faults": float(r1.ru_minflt - r0.ru_minflt),
                "cpu_user_s": r1.ru_utime - r0.ru_utime,
                "cpu_sys_s": r1.ru_stime - r0.ru_stime,
            })  # fmt: skip
            return res

        return timed


def _median_rusage(samples: list[dict[str, float]]) -> dict[str, float]:
    if not samples:
        return {}
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def _worker_rusage(timings: list[dict[str, float]]) -> dict[str, float]:
    """The workers' own CPU over their opens (their ready lines' ``cpu_user``
    and ``cpu_sys``), as medians in seconds."""
    return _median_rusage(
        [
            {"cpu_user_s": t["cpu_user"] / 1e3, "cpu_sys_s": t["cpu_sys"] / 1e3}
            for t in timings
            if "cpu_sys" in t
        ]
    )


def _parts(pkg_path: Path, lic_path: Path) -> dict[str, float]:
    """Replay the worker's steps here, timing each."""
    from vault.core import crypto as _crypto
    from vault.core.keyclient import KeyServerClient
    from vault.core.licence import Licence
    from vault.core.package import Package
    from worker.runtime import Pipeline

    lic = Licence.load(lic_path)
    t0 = time.perf_counter()
    pkg = Package.load(pkg_path)
    pkg.verify(_crypto.load_public_key(lic.publisher_key))
    t1 = time.perf_counter()
    with KeyServerClient(lic) as ks:
        rel = ks.release(model_id=pkg.model_id, key_id=pkg.key_id, package_digest=pkg.digest)
    t2 = time.perf_counter()
    plain = pkg.decrypt(rel.key)
    t3 = time.perf_counter()
    size = plain.nbytes
    _crypto.zeroize(rel.key)
    pipe = Pipeline(plain.graphs, plain.files, inputs=pkg.inputs, outputs=pkg.outputs)
    t4 = time.perf_counter()
    plain.release()
    pkg.close()
    pipe.close()
    return {
        "load_verify_s": t1 - t0,
        "key_release_s": t2 - t1,
        "decrypt_s": t3 - t2,
        "session_s": t4 - t3,
        "plaintext_bytes": size,
        "decrypt_gbps": size / (t3 - t2) / 1e9,
    }


def _worker_parts(ms: dict[str, float], weights: int) -> dict[str, float]:
    """The worker's reported phases in the keys the report uses."""
    if not ms or "decrypt" not in ms:
        return {}
    # lazy weights (vault/core/lazyplain.py) are decrypted inside the session
    # build, on onnxruntime's first reads (and read ahead on a second thread,
    # overlapping the build): the worker reports that time apart, summed over
    # its threads, so this split of the build is approximate
    lazy_s = ms.get("weights_decrypt", 0.0) / 1e3
    decrypt_s = ms["decrypt"] / 1e3 + lazy_s
    return {
        "load_verify_s": ms.get("verify", 0.0) / 1e3,
        "key_release_s": ms.get("key_release", 0.0) / 1e3,
        "decrypt_s": decrypt_s,
        "session_s": (ms.get("session", 0.0) + ms.get("import_wait", 0.0)) / 1e3 - lazy_s,
        "plaintext_bytes": float(weights),
        "decrypt_gbps": weights / decrypt_s / 1e9 if decrypt_s > 0 else 0.0,
    }


def run(quick: bool, env: Any, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    worker_timings: dict[int, list[dict[str, float]]] = {}
    first_timings: dict[int, list[dict[str, float]]] = {}
    standby_used: dict[int, list[bool]] = {}
    daemon_timings: dict[int, list[dict[str, float]]] = {}
    sock: str | None = None
    if env is not None:
        try:
            sock = env.daemon()
        except Exception as exc:  # noqa: BLE001
            out_daemon_why = f"{type(exc).__name__}: {exc}"
        else:
            out_daemon_why = ""
    sizes = (16, 100) if quick else (16, 100, 500)
    mem_size = 100 if quick else 500
    out: dict[str, Any] = {"sizes_mb": list(sizes), "rows": {}, "memory": {}, "unavailable": {}}
    if env is not None and sock is None:
        out["unavailable"]["daemon"] = out_daemon_why
    for mb in sizes:
        model = M.sized(mb)
        path = workdir / f"sized{mb}.onnx"
        onnx.save(model, path)
        row: dict[str, Any] = {
            "weights_bytes": M.weight_bytes(model),
            "file_bytes": path.stat().st_size,
        }
        plain_ru = _Rusage()
        fns: dict[str, Callable[[], Any]] = {
            "plain_load": plain_ru.wrap(
                lambda p=path: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            ),
        }
        pkg = lic = None
        if env is not None:
            try:
                pkg, lic = env.seal(model, f"cold-{mb}")

                def vopen(p: Path = pkg, lc: Path = lic, mb: int = mb) -> Timed:
                    # a later open in this process: it takes the worker the
                    # client pre-started after the open before (vault/core/standby.py)
                    t = time.perf_counter()
                    m = env.open_local(p, lc)
                    dt = time.perf_counter() - t  # close (stopping the worker) is not timed
                    worker_timings.setdefault(mb, []).append(m.startup_ms)
                    standby_used.setdefault(mb, []).append(bool(m._localw.ready.get("standby")))  # noqa: SLF001
                    m.close()
                    env._models.remove(m)  # noqa: SLF001
                    time.sleep(STANDBY_WAIT_S)  # untimed: the next pre-started worker starts
                    return Timed(dt)

                def vopen_first(p: Path = pkg, lc: Path = lic, mb: int = mb) -> Timed:
                    # the first open in a process: nothing pre-started, it spawns
                    old = os.environ.get("VAULT_STANDBY")
                    os.environ["VAULT_STANDBY"] = "0"
                    try:
                        t = time.perf_counter()
                        m = env.open_local(p, lc)
                        dt = time.perf_counter() - t
                    finally:
                        if old is None:
                            del os.environ["VAULT_STANDBY"]
                        else:
                            os.environ["VAULT_STANDBY"] = old
                    first_timings.setdefault(mb, []).append(m.startup_ms)
                    m.close()
                    env._models.remove(m)  # noqa: SLF001
                    return Timed(dt)

                fns["vault_open"] = vopen
                fns["vault_open_first"] = vopen_first
                if sock is not None:
                    lic1 = env.device_licence(f"cold-{mb}")

                    def vopen_daemon(p: Path = pkg, lc: Path = lic1, mb: int = mb) -> Timed:
                        import vault

                        t = time.perf_counter()
                        m = vault.open(p, licence=lc, daemon=sock)
                        dt = time.perf_counter() - t
                        daemon_timings.setdefault(mb, []).append(m.startup_ms)
                        m.close()
                        time.sleep(1.0)  # untimed: the daemon starts the next standby worker
                        return Timed(dt)

                    fns["vault_open_daemon"] = vopen_daemon
            except Exception as exc:  # noqa: BLE001
                row["unavailable"] = f"{type(exc).__name__}: {exc}"
                out["unavailable"][f"{mb}MB"] = row["unavailable"]
        del model
        rounds = 3 if (quick or mb >= 500) else 5
        log(f"  cold start {mb} MB: {rounds} interleaved rounds")
        res = interleave(fns, rounds=rounds, warmup=1)
        fresh = [_plain_child(path, compute=False) for _ in range(2 if quick else 3)]
        res["plain_fresh_process"] = summary([f[0] for f in fresh])
        if pkg is not None and lic is not None and "unavailable" not in row:
            # the first open of a fresh process against a fresh process's import
            # and load, each on its own clock; the three alternate, order rotating
            kinds = ("plain_fresh_import_load", "vault_fresh_first_open",
                     "vault_fresh_first_open_cold")  # fmt: skip
            got: dict[str, list[float]] = {k: [] for k in kinds}
            early = []
            for r in range(4 if quick else 6):
                for k in kinds[r % 3 :] + kinds[: r % 3]:
                    if k == "plain_fresh_import_load":
                        got[k].append(_plain_child(path, compute=False)[4])
                    else:
                        dt, took = _vault_child(pkg, lic, standby=k == "vault_fresh_first_open")
                        got[k].append(dt)
                        if k == "vault_fresh_first_open":
                            early.append(took)
            for k in kinds:
                res[k] = summary(got[k])
            row["fresh_first_open_took_early_worker"] = early
        row["rows"] = res
        # where a fresh process's time goes: the same CPU in user space, and
        # the kernel's first touch of new memory in sys (a VM pays it dearly)
        row["rusage"] = {
            "plain_load": _median_rusage(plain_ru.samples),
            "plain_fresh_process": _median_rusage([f[3] for f in fresh]),
            "vault_open_worker": _worker_rusage(worker_timings.get(mb, [])),
            "vault_open_daemon_worker": _worker_rusage(daemon_timings.get(mb, [])),
        }
        if "vault_open" in res:
            v, p = res["vault_open"]["median_s"], res["plain_load"]["median_s"]
            row["vault_minus_plain_s"] = v - p
            row["vault_over_plain"] = v / p
            row["standby_used"] = standby_used.get(mb, [])
            if "vault_open_first" in res:
                f = res["vault_open_first"]["median_s"]
                row["first_minus_plain_s"] = f - p
                row["first_over_plain"] = f / p
                reps = [_worker_parts(t, row["weights_bytes"]) for t in first_timings.get(mb, [])]
                if reps and all(reps):
                    fparts = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
                    fparts["spawn_imports_hardening_s"] = f - sum(
                        fparts[k]
                        for k in ("load_verify_s", "key_release_s", "decrypt_s", "session_s")
                    )
                    row["first_parts"] = fparts
            if "vault_open_daemon" in res:
                d = res["vault_open_daemon"]["median_s"]
                row["daemon_minus_plain_s"] = d - p
                row["daemon_over_plain"] = d / p
                reps = [_worker_parts(t, row["weights_bytes"]) for t in daemon_timings.get(mb, [])]
                if reps and all(reps):
                    dparts = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
                    dparts["outside_worker_s"] = d - sum(
                        dparts[k]
                        for k in ("load_verify_s", "key_release_s", "decrypt_s", "session_s")
                    )
                    row["daemon_parts"] = dparts
            try:
                reps = [_worker_parts(t, row["weights_bytes"]) for t in worker_timings.get(mb, [])]
                if not reps or not all(reps):
                    reps = [_parts(pkg, lic) for _ in range(3)]  # type: ignore[arg-type]
                    row["parts_source"] = "replayed in the benchmark process"
                else:
                    row["parts_source"] = "the worker's own timings (Model.startup_ms)"
                parts = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
                parts["spawn_imports_hardening_s"] = v - sum(
                    parts[k] for k in ("load_verify_s", "key_release_s", "decrypt_s", "session_s")
                )
                row["parts"] = parts
            except Exception as exc:  # noqa: BLE001
                row["parts_unavailable"] = f"{type(exc).__name__}: {exc}"
        out["rows"][f"{mb}MB"] = row
        if mb == mem_size:
            out["memory"] = _memory(env, path, pkg, lic, mb)
        path.unlink()
        if pkg is not None:
            pkg.unlink()
    return out


def vm_rss(pid: int) -> int | None:
    """Resident set (VmRSS) of a live process now, in bytes."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _memory(env: Any, path: Path, pkg: Path | None, lic: Path | None, mb: int) -> dict[str, Any]:
    _, plain_hwm, plain_rss, _ru, _load = _plain_child(path, compute=True)
    mem: dict[str, Any] = {
        "size_mb": mb,
        "plain_onnxruntime_vmhwm_bytes": plain_hwm,
        "plain_onnxruntime_vmrss_bytes": plain_rss,
    }
    if env is None or pkg is None:
        mem["unavailable"] = "vault environment unavailable"
        return mem
    # the default worker, then one with --no-prepack (the decrypted weights the
    # only copy: onnxruntime makes no packed second one), each computing a while
    # and the control for lazy weights: every weight decrypted up front, so the
    # originals of what onnxruntime packs stay beside its packed copies
    for key, args in (
        ("worker", ()),
        ("worker_no_prepack", ("--no-prepack",)),
        ("worker_eager_weights", ("--eager-weights",)),
    ):
        m = env.open_local(pkg, lic, worker_args=list(args))
        try:
            name, (dtype, shape) = next(iter(m.inputs.items()))
            feeds = {name: np.zeros([d if isinstance(d, int) else 1 for d in shape], dtype)}
            m.compute(feeds)
            times = []
            for _ in range(20):
                t = time.perf_counter()
                m.compute(feeds)
                times.append(time.perf_counter() - t)
            pid = m.health()["pid"]
            mem[f"{key}_vmhwm_bytes"] = vm_hwm(pid)
            mem[f"{key}_vmrss_bytes"] = vm_rss(pid)
            mem[f"{key}_compute_ms"] = statistics.median(times) * 1e3
            mem[f"{key}_over_plain"] = (
                mem[f"{key}_vmhwm_bytes"] / plain_hwm if mem[f"{key}_vmhwm_bytes"] else None
            )
        finally:
            m.close()
            env._models.remove(m)  # noqa: SLF001
    mem["worker_steps_replayed"] = _mem_parts(pkg, lic)  # type: ignore[arg-type]
    return mem


if os.name != "posix":  # pragma: no cover
    raise ImportError("POSIX only")


def section(ctx: Context) -> dict[str, Any]:
    return run(ctx.quick, ctx.env, ctx.workdir, ctx.log)
