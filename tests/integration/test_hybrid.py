"""The hybrid end to end: ``vault split`` with a real key server, the tails served
by ``vault worker serve`` over tcp + CURVE, and ``vault.open(split_dir, server=...)``."""

from __future__ import annotations

import asyncio
import json
import os
import select
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vault
from tests.models import classifier_pipeline, reference_pipeline
from vault.core.crypto import PublisherKey
from vault.core.keyclient import KeyServerClient
from vault.core.process import stop_process
from vault.hybrid.client import HybridModel
from vault.hybrid.publish import split


def serve_tail(tail: Path, licence: Path, allow: Path, tmp: Path) -> tuple[Any, str, str]:
    """``vault worker serve TAIL`` on a free port; returns (proc, endpoint, server key)."""
    key_out = tmp / f"{tail.stem}.pub"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vault", "worker", "serve", str(tail), "--licence", str(licence),
         "--bind", "tcp://127.0.0.1:0", "--allow", str(allow), "--server-key-out", str(key_out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    endpoint = None
    buf = b""
    deadline = time.monotonic() + 30
    while endpoint is None and time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 0.5)
        if r:
            chunk = os.read(proc.stdout.fileno(), 4096)  # type: ignore[union-attr]
            if not chunk:
                break
            buf += chunk
            for line in buf.decode().splitlines():
                if line.startswith("endpoint: "):
                    endpoint = line.split(": ", 1)[1].strip()
    if endpoint is None:
        stop_process(proc, 5)
        raise AssertionError(f"tail worker did not start: {buf.decode()}")
    return proc, endpoint, key_out.read_text().strip()


class Deployment:
    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.server: dict[str, str] = {}
        self.keys: dict[str, str] = {}

    def close(self) -> None:
        for p in self.procs:
            stop_process(p, 10)
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()


@pytest.fixture
def deployed(keyserver: Any, tmp_path: Path) -> Iterator[tuple[Path, Path, Deployment, dict]]:
    """The classifier pipeline split twice (cuts c0 at h2, c1 at h0), each tail served."""
    pre, model, post = classifier_pipeline()
    registered: dict[str, str] = {}

    def register(res: Any) -> None:
        keyserver.register(res.model_id, res.key_id, res.key, res.digest)
        registered[res.model_id] = res.key_id

    out = tmp_path / "clf.split"
    split(model, pre=pre, post=post, model_id="clf", output_dir=out,
          signing_key=PublisherKey.load(keyserver.publisher_key_path),
          at=[["h2"], ["h0"]], split_points=["h0", "h2"], register=register)  # fmt: skip
    alice = keyserver.issue("clf.head", holder="alice")
    alice_path = tmp_path / "alice.licence"
    alice.save(alice_path)
    allow = tmp_path / "clients"
    allow.mkdir()
    (allow / "alice.key").write_text(alice.client_public_key + "\n")
    dep = Deployment()
    try:
        desc = json.loads((out / "split.json").read_text())
        for c in desc["cuts"]:
            srv = keyserver.issue(c["tail_model_id"], holder=f"server-{c['name']}")
            srv_path = tmp_path / f"server-{c['name']}.licence"
            srv.save(srv_path)
            proc, endpoint, key = serve_tail(out / c["tail"], srv_path, allow, tmp_path)
            dep.procs.append(proc)
            dep.server[c["tail_model_id"]] = endpoint
            dep.keys[c["tail_model_id"]] = key
        yield out, alice_path, dep, registered
    finally:
        dep.close()


def _image(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 8), dtype=np.uint8)


def test_hybrid_equals_in_process_onnxruntime_for_every_shipped_cut(deployed: Any) -> None:
    out, alice, dep, _ = deployed
    want_fn = lambda x: reference_pipeline(list(classifier_pipeline()), {"image": x})  # noqa: E731
    for cut in ("c0", "c1"):
        with vault.open(out, licence=alice, server=dep.server, server_key=dep.keys,
                        cut=cut, replan=False) as m:  # fmt: skip
            assert isinstance(m, HybridModel) and m.cut == cut
            assert m.inputs == {"image": ("uint8", ("N", 8))}
            assert set(m.outputs) == {"probs", "top_values", "top_indices"}
            x = _image(4, seed=1)
            got = m.compute({"image": x})
            for k, v in want_fn(x).items():
                np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6)
            assert list(m.compute({"image": x}, outputs=["probs"])) == ["probs"]
            with pytest.raises(vault.InputError):
                m.compute({"pixels": x})
            with pytest.raises(vault.InputError):
                m.compute({"image": x.astype(np.float32)})
            assert m.compute({"image": x})["probs"].shape == (4, 5)  # still serving


def test_pipelined_calls_return_each_calls_own_result(deployed: Any) -> None:
    out, alice, dep, _ = deployed
    xs = [_image(2, seed=s) for s in range(12)]
    want = [reference_pipeline(list(classifier_pipeline()), {"image": x})["probs"] for x in xs]
    with vault.open(out, licence=alice, server=dep.server, server_key=dep.keys) as m:
        got = m.compute_many([{"image": x} for x in xs])
        for g, w in zip(got, want):
            np.testing.assert_allclose(g["probs"], w, rtol=1e-5)

        async def many() -> list[dict[str, np.ndarray]]:
            return await asyncio.gather(*(m.compute_async({"image": x}) for x in xs))

        for g, w in zip(asyncio.run(many()), want):
            np.testing.assert_allclose(g["probs"], w, rtol=1e-5)
        link = m.link_estimate()
        assert link is not None and link.rtt_ms > 0 and link.mbit > 0


def _audit(keyserver: Any) -> list[tuple[str, str | None, str]]:
    conn = sqlite3.connect(keyserver.dir / "keyserver.db")
    try:
        rows = conn.execute("SELECT event, licence_id, detail FROM audit ORDER BY seq")
        return [(r[0], r[1], r[2]) for r in rows]
    finally:
        conn.close()


def test_the_caller_never_receives_the_tail_key(keyserver: Any, deployed: Any) -> None:
    out, alice_path, dep, registered = deployed
    alice = vault.Licence.load(alice_path)
    before = len(_audit(keyserver))
    with vault.open(out, licence=alice, server=dep.server, server_key=dep.keys) as m:
        m.compute({"image": _image(1)})
    # the hybrid asked the key server for nothing under the caller's licence
    assert [e for e in _audit(keyserver)[before:] if e[1] == alice.licence_id] == []
    # and asking for the tail's key with the caller's licence is refused
    desc = json.loads((out / "split.json").read_text())
    tail = desc["cuts"][0]
    with KeyServerClient(alice, timeout=5) as ks, pytest.raises(vault.WrongModelError):
        ks.release(model_id=tail["tail_model_id"], key_id=registered[tail["tail_model_id"]],
                   package_digest=tail["tail_digest"])  # fmt: skip
    # nothing in the split directory holds a key
    names = sorted(p.name for p in out.iterdir())
    assert names == ["head-c0.onnx", "head-c1.onnx", "split.json", "tail-c0.vault", "tail-c1.vault"]
    assert "key" not in json.dumps(desc).replace("server_key", "").replace("key_id", "")


def test_vault_split_and_profile_cli(keyserver: Any, tmp_path: Path) -> None:
    import onnx

    from tests.models import mlp

    onnx.save(mlp(), tmp_path / "m.onnx")
    prof = subprocess.run(
        [sys.executable, "-m", "vault", "profile", str(tmp_path / "m.onnx"), "-o",
         str(tmp_path / "phone.json"), "--repeats", "3", "--threads", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert prof.returncode == 0, prof.stderr
    nodes = json.loads((tmp_path / "phone.json").read_text())["nodes"]
    assert set(nodes) == {"secret_dense1", "secret_bias1", "secret_relu", "secret_dense2",
                          "secret_bias2"}  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-m", "vault", "split", str(tmp_path / "m.onnx"), "--auto", "--rtt", "20",
         "--bandwidth", "100", "--client-costs", str(tmp_path / "phone.json"),
         "--protect-from", "h2", "--model-id", "m", "--licence", str(keyserver.admin_licence),
         "-o", str(tmp_path / "m.split")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "link: RTT 20 ms, 100 Mbit/s" in res.stdout
    for row in ("(inputs)", "h0", "h1", "h2"):  # every allowed cut; nothing past h2
        assert f" {row} " in res.stdout
    assert "h3" not in res.stdout
    assert (tmp_path / "m.split" / "split.json").exists()
    # refusal: a cut at a protected tensor names the path
    bad = subprocess.run(
        [sys.executable, "-m", "vault", "split", str(tmp_path / "m.onnx"), "--at", "h3",
         "--protect-from", "h2", "--model-id", "m2", "--licence", str(keyserver.admin_licence),
         "-o", str(tmp_path / "bad.split")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "protected node 'secret_dense2'" in bad.stderr and "h2 -> h3" in bad.stderr
