"""A sealed model served by one worker on tcp:// (CURVE and sealed calls), for
the tests that attack or exercise remote calls: a key server of its own, the
package sealed and registered, a licence per holder (each holder's client
key in the worker's --allow directory), the worker licensed as the first."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx

from tests.conftest import KeyServerProcess
from vault.core.crypto import PublisherKey
from vault.core.launch import read_ready_line, spawn_worker
from vault.sealing import seal


@contextmanager
def tcp_worker(d: Path, model: onnx.ModelProto, model_id: str,
               holders: tuple[str, ...] = ("alice",),
               worker_args: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Yields ``{"ready": the worker's ready line, "licences": {holder:
    Licence}, "pid": the worker's pid, "dir": d, "log": its stderr's file}``;
    stops both at the end. ``worker_args``: more of the worker's options."""
    from keyserver import init_dir

    init_dir(d / "ks", address="tcp://127.0.0.1:7700")
    ks = KeyServerProcess(d / "ks", lease_ttl=30.0)
    ks.start()
    proc = None
    try:
        res = seal(model, model_id=model_id,
                   signing_key=PublisherKey.load(ks.publisher_key_path), output=d / "m.vault")  # fmt: skip
        ks.register(res.model_id, res.key_id, res.key, res.digest)
        lics = {}
        allow = d / "allow"
        allow.mkdir()
        for who in holders:
            lics[who] = ks.issue(res.model_id, holder=who, same_user=True)
            lics[who].save(d / f"{who}.licence")
            (allow / f"{who}.key").write_text(lics[who].client_public_key + "\n")
        status_r, status_w = os.pipe()
        log = d / "worker.log"
        try:
            with open(log, "wb") as err:
                proc = spawn_worker([str(res.path), "--licence", str(d / f"{holders[0]}.licence"),
                                     "--endpoint", "tcp://127.0.0.1:0", "--allow", str(allow),
                                     "--status-fd", str(status_w), *worker_args],
                                    pass_fds=[status_w],
                                    cwd=str(d), stderr=err)  # fmt: skip
        finally:
            os.close(status_w)
        try:
            ready = read_ready_line(status_r, timeout=120, proc=proc)
        finally:
            os.close(status_r)
        yield {"ready": ready, "licences": lics, "pid": proc.pid, "dir": d, "log": log}
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        ks.kill()
