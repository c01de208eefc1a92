"""What tier 1 costs: opening a model and calling it through the local daemon
(a worker under its own uid, CURVE on its ipc socket) against tier 0 (a
worker the caller spawns itself, plain ipc in a 0700 directory), same model,
same machine, interleaved.

``python -m benchmarks.tier1 [--quick]`` (needs root: the daemon starts its
workers under another uid). Prints a table and one JSON object; also a
``section(ctx)`` for the suite's interface.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import Unavailable, summary

__all__ = ["run", "section"]


def _keyserver(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    from vault.core.launch import read_ready_line

    proc = subprocess.Popen(
        [sys.executable, "-m", "keyserver", "serve", str(root), "--bind", "tcp://127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    ready = read_ready_line(proc.stdout, timeout=30, proc=proc, what="key server")
    return proc, str(ready["address"])


def run(*, quick: bool, log: Any = print) -> dict[str, Any]:
    import vault
    from keyserver.layout import init_dir
    from vault.app.demo import _start_daemon, _tier1_setup
    from vault.core.crypto import PublisherKey
    from vault.core.device import init_device, record_keyserver
    from vault.core.keyclient import KeyServerClient
    from vault.core.licence import Licence
    from vault.core.process import stop_process

    from . import models

    setup, why = _tier1_setup()
    if setup is None:
        raise Unavailable(why)
    tmp = Path(tempfile.mkdtemp(prefix="vault-tier1-bench-"))
    os.chmod(tmp, 0o711)
    ks = daemon = None
    try:
        init_dir(tmp / "ks", address="tcp://127.0.0.1:0")
        ks, address = _keyserver(tmp / "ks")
        admin = Licence.load(tmp / "ks" / "admin.licence")
        admin.keyserver_address = address
        pk = PublisherKey.load(tmp / "ks" / "publisher.key")
        m, b = models.mlp(), models.big_tensor()  # a small call; 6 MiB in and out (shared memory)
        res = vault.seal(m, model_id="bench", signing_key=pk, output=tmp / "m.vault")
        res_big = vault.seal(b, model_id="bench-big", signing_key=pk, output=tmp / "b.vault")
        dev = init_device(tmp / "device")
        with KeyServerClient(admin) as c:
            for r in (res, res_big):
                c.register_key(model_id=r.model_id, key_id=r.key_id, key=r.key,
                               package_digest=r.digest)  # fmt: skip
            c.enroll_device(device_id=dev.device_id, public_key=dev.public_key)
            record_keyserver(tmp / "device", address=address,
                             public_key=admin.keyserver_public_key)  # fmt: skip
            tier0 = c.issue(res.model_id, holder="t0", same_user=True)
            tier1 = c.issue(res.model_id, holder="t1")
            big0 = c.issue(res_big.model_id, holder="b0", same_user=True)
            big1 = c.issue(res_big.model_id, holder="b1")
        daemon, sock = _start_daemon(str(tmp), str(tmp / "device"), setup)
        feeds = models.example_feeds(m)
        big = models.example_feeds(b)
        opens: dict[str, list[float]] = {"0": [], "1": []}
        small: dict[str, list[float]] = {"0": [], "1": []}
        large: dict[str, list[float]] = {"0": [], "1": []}
        rounds, calls, big_calls = (2, 200, 10) if quick else (5, 1000, 40)
        for _ in range(rounds):
            for tier, lic, blic, daemon_arg in (("0", tier0, big0, None), ("1", tier1, big1, sock)):
                t0 = time.perf_counter()
                with vault.open(res.path, licence=lic, daemon=daemon_arg) as model:
                    opens[tier].append(time.perf_counter() - t0)
                    assert model.tier == int(tier)
                    model.compute(feeds)
                    for _ in range(calls // rounds):
                        t = time.perf_counter()
                        model.compute(feeds)
                        small[tier].append(time.perf_counter() - t)
                with vault.open(res_big.path, licence=blic, daemon=daemon_arg) as model:
                    model.compute(big)
                    for _ in range(big_calls // rounds):
                        t = time.perf_counter()
                        model.compute(big)
                        large[tier].append(time.perf_counter() - t)
        out = {  # every figure in seconds (summary's *_s keys)
            "open": {t: summary(v) for t, v in opens.items()},
            "small_call": {t: summary(v) for t, v in small.items()},
            "large_call": {t: summary(v) for t, v in large.items()},
            "large_input_bytes": int(sum(v.nbytes for v in big.values())),
            "worker_user": setup["user"],
        }
        log(json.dumps(out, indent=1, sort_keys=True))
        return out
    finally:
        if daemon is not None:
            stop_process(daemon, 5)
        if ks is not None:
            stop_process(ks, 5)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def section(ctx: Any) -> dict[str, Any]:
    return run(quick=ctx.quick, log=ctx.log)


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
