"""Attacks on a live worker: hand-built packages that are not pure
computation, requests built to exhaust its memory, a caller that truncates
the shared arena. Each test performs the attack and, where it makes sense,
a control showing what the attack does without the protection."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zmq
from onnx import TensorProto, helper

from tests.models import mlp, reference_pipeline
from tests.sealed import open_sealed, seal_for_test, seal_unchecked
from vault.client import Model
from vault.core.crypto import PublisherKey
from vault.core.errors import UnsafeModelError
from vault.core.protocol import PROTOCOL_VERSION, pack_header, unpack_header
from vault.sealing import seal


def _model(nodes: list[onnx.NodeProto], inputs: list, outputs: list, inits: list | None = None,
           domains: tuple[str, ...] = ()) -> onnx.ModelProto:  # fmt: skip
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in domains]
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits or []),
                          opset_imports=opsets)  # fmt: skip
    m.ir_version = 8
    return m


def _licence_leaker(n: int) -> onnx.ModelProto:
    """An initializer whose bytes are "elsewhere": ``licence.json``, relative
    to whatever folder the loading process runs in; an output returns them."""
    w = onnx.TensorProto(name="w", data_type=TensorProto.UINT8, dims=[n])
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "licence.json"), ("offset", "0"), ("length", str(n))):
        e = w.external_data.add()
        e.key, e.value = k, v
    return _model(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["w"], ["leak"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("leak", TensorProto.UINT8, [n])],
        [w],
    )  # fmt: skip


def test_worker_refuses_external_data_by_path_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = b'{"client": {"secret_key": "do-not-leak-me"}}'
    (tmp_path / "licence.json").write_bytes(secret)
    m = _licence_leaker(len(secret))
    monkeypatch.chdir(tmp_path)  # the worker starts in the folder holding the licence
    # control: plain onnxruntime, loading these bytes here, reads the file
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    leaked = sess.run(["leak"], {"x": np.zeros(1, np.float32)})[0]
    assert leaked.tobytes() == secret
    # seal refuses the graph ...
    with pytest.raises(UnsafeModelError, match="licence.json"):
        seal(m.SerializeToString(), model_id="evil", signing_key=PublisherKey.generate(),
             output=tmp_path / "sealed.vault")  # fmt: skip
    # ... and a validly signed package built without seal is refused at load
    evil = seal_unchecked(tmp_path / "pkg", m)
    with pytest.raises(UnsafeModelError, match="'w' names external data at 'licence.json'"):
        open_sealed(evil)


_LANDLOCK_PROBE = """
import sys
from worker import hardening
on = sys.argv[1] == "on"
rep = hardening.harden(home=None, mlock=False, seccomp=False, landlock=on,
                       reads=hardening.startup_reads([]) if on else None)
import numpy as np, onnxruntime as ort
try:
    sess = ort.InferenceSession(GRAPH)
    print(sess.run(["leak"], {"x": np.zeros(1, np.float32)})[0].tobytes().decode())
except Exception as exc:
    print("refused", type(exc).__name__)
"""


def test_landlock_stops_reads_outside_the_startup_paths(tmp_path: Path) -> None:
    """Second layer, with the purity check out of the way: onnxruntime in a
    hardened process cannot read a file from its working directory."""
    import subprocess
    import sys

    secret = b"licence-secret-123"
    (tmp_path / "licence.json").write_bytes(secret)
    graph = _licence_leaker(len(secret)).SerializeToString()
    probe = tmp_path / "probe.py"
    probe.write_text(f"GRAPH = {graph!r}\n" + _LANDLOCK_PROBE)
    results = {}
    for mode in ("off", "on"):
        out = subprocess.run(
            [sys.executable, "-I", str(probe), mode], cwd=tmp_path, capture_output=True,
            text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        results[mode] = out.stdout.strip() or out.stderr[-300:]
    assert results["off"] == secret.decode()  # control: the file is read
    assert results["on"].startswith("refused"), results["on"]


def test_worker_refuses_custom_domains_and_outside_weights_at_load(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    custom = _model([helper.make_node("Evil", ["x"], ["y"], domain="com.evil")], [x], [y],
                    domains=("com.evil",))  # fmt: skip
    with pytest.raises(UnsafeModelError, match="custom domain 'com.evil'"):
        open_sealed(seal_unchecked(tmp_path / "a", custom))
    # an If branch hiding a custom op one level down is found too
    branch = helper.make_graph([helper.make_node("Evil", ["x"], ["t"], domain="com.evil")],
                               "b", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])  # fmt: skip
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    nested = _model([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
                    [x, c], [y], domains=("com.evil",))  # fmt: skip
    with pytest.raises(UnsafeModelError, match="custom domain 'com.evil'"):
        open_sealed(seal_unchecked(tmp_path / "b", nested))
    # the package's own weight file, but read past its end
    w = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2])
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "pipeline.weights"), ("offset", "64"), ("length", "8")):
        e = w.external_data.add()
        e.key, e.value = k, v
    past = _model([helper.make_node("Add", ["x", "w"], ["y"])], [x], [y], [w])
    with pytest.raises(UnsafeModelError, match="outside its weight file"):
        open_sealed(
            seal_unchecked(tmp_path / "c", past, files=[("pipeline.weights", bytearray(64))])
        )


# --- denial of service ------------------------------------------------------------------------


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def strings_model(tmp_path: Path) -> Iterator[Model]:
    m = _model([helper.make_node("Identity", ["s"], ["t"])],
               [helper.make_tensor_value_info("s", TensorProto.STRING, ["N"])],
               [helper.make_tensor_value_info("t", TensorProto.STRING, ["N"])])  # fmt: skip
    model = open_sealed(seal_for_test(tmp_path, m, name="strings"))
    try:
        yield model
    finally:
        model.close()


def test_64mib_of_one_char_strings_is_refused_before_decoding(strings_model: Model) -> None:
    model = strings_model
    assert model.pid is not None
    n = 32 << 20  # 2 bytes each on the wire: a 64 MiB frame
    frame = b"\xdd" + n.to_bytes(4, "big") + b"\xa1a" * n
    before = _rss(model.pid)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(model._endpoint)  # type: ignore[arg-type]
        for rid, desc in enumerate(
            [{"name": "s", "dtype": "string", "shape": [n]},
             {"name": "nope", "dtype": "string", "shape": [n]},
             {"name": "s", "dtype": "int64", "shape": [n // 4]}]
        ):  # fmt: skip
            header = {"v": PROTOCOL_VERSION, "op": "compute", "id": rid, "tensors": [desc]}
            sock.send_multipart([pack_header(header), frame])
            assert sock.poll(30_000), "the worker did not answer"
            reply = unpack_header(sock.recv_multipart()[0])
            assert reply["ok"] is False
            assert reply["error"]["code"] == ("protocol" if rid == 0 else "bad_input")
            if rid == 0:
                assert "strings" in reply["error"]["message"]
        peak = _rss(model.pid)
    finally:
        sock.close()
        ctx.term()
    # unchecked, decoding took the worker from ~80 MB to ~670 MB; now the
    # frame (64 MiB, held by ZeroMQ) is all a request costs
    assert peak - before < 160 << 20, (before >> 20, peak >> 20)
    # and it still serves
    words = np.array(["a", "bc", "déf"], dtype=object)
    assert model.compute({"s": words})["t"].tolist() == ["a", "bc", "déf"]


def test_caller_cannot_truncate_the_shared_arena(tmp_path: Path) -> None:
    # control: an unsealed memfd can be truncated by whoever holds it
    fd = os.memfd_create("control")
    os.ftruncate(fd, mmap.PAGESIZE)
    os.ftruncate(fd, 0)
    os.close(fd)
    model = open_sealed(seal_for_test(tmp_path, mlp(), name="shm"))
    try:
        assert model._localw is not None and model._localw.arena is not None
        arena = model._localw.arena
        with pytest.raises(PermissionError):
            os.ftruncate(arena.fd, 0)  # would have been a SIGBUS in the worker
        with pytest.raises(PermissionError):
            os.ftruncate(arena.fd, arena.size * 2)
        x = np.random.default_rng(0).standard_normal((16384, 8)).astype(np.float32)  # 512 KiB
        got = model.compute({"x": x})
        want = reference_pipeline([mlp()], {"x": x})["logits"]
        np.testing.assert_allclose(got["logits"], want, rtol=1e-5, atol=1e-5)
        assert model.pid is not None and os.path.exists(f"/proc/{model.pid}")
    finally:
        model.close()


def test_results_are_owned_and_writable_whatever_the_transport(tmp_path: Path) -> None:
    with open_sealed(seal_for_test(tmp_path, mlp(n_classes=4096), name="out")) as model:
        small = model.compute({"x": np.ones((1, 8), np.float32)})["logits"]  # a frame
        large = model.compute({"x": np.ones((64, 8), np.float32)})["logits"]  # 1 MiB: shm
        for arr in (small, large):
            assert arr.flags.writeable
            arr[0, 0] = 42.0
            assert arr[0, 0] == 42.0


def test_callers_header_is_not_mutated(tmp_path: Path) -> None:
    with open_sealed(seal_for_test(tmp_path, mlp(), name="hdr")) as model:
        header = {"op": "stats"}
        model._request(header)
        assert header == {"op": "stats"}


def test_deeply_nested_values_are_refused_unread(strings_model: Model) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(strings_model._endpoint)  # type: ignore[arg-type]
        deep = "sequence<" * 40 + "string" + ">" * 40
        header = {"v": PROTOCOL_VERSION, "op": "compute", "id": 1,
                  "tensors": [{"name": "s", "dtype": deep, "items": []}]}  # fmt: skip
        sock.send_multipart([pack_header(header)])
        assert sock.poll(10_000)
        reply = unpack_header(sock.recv_multipart()[0])
        assert reply["ok"] is False and reply["error"]["code"] == "protocol"
        # a string frame whose element count disagrees with its shape
        frame = msgpack.packb(["a", "b"])
        header = {"v": PROTOCOL_VERSION, "op": "compute", "id": 2,
                  "tensors": [{"name": "s", "dtype": "string", "shape": [3]}]}  # fmt: skip
        sock.send_multipart([pack_header(header), frame])
        assert sock.poll(10_000)
        reply = unpack_header(sock.recv_multipart()[0])
        assert reply["ok"] is False and reply["error"]["code"] == "protocol"
    finally:
        sock.close()
        ctx.term()


def test_a_remote_caller_learns_no_host_details_from_health(tmp_path: Path) -> None:
    """A worker bound to tcp:// (the hybrid tail, a hand-run worker) answers a
    remote caller's ``health`` with liveness, tier and provider: no pid, uid,
    environment or hardening detail. A local caller sees those (control)."""
    from vault.core.launch import read_ready_line, spawn_worker
    from vault.core.process import stop_process

    s = seal_for_test(tmp_path, mlp(), name="remote")
    with open_sealed(s) as local:  # control: the local view has the host details
        assert {"pid", "kernel", "hardening"} <= set(local.health())
    client_public, client_secret = zmq.curve_keypair()
    status_r, status_w = os.pipe()
    key_r, key_w = os.pipe()
    os.write(key_w, s.key)
    os.close(key_w)
    proc = spawn_worker(
        [s.path, "--endpoint", "tcp://127.0.0.1:0", f"--allow-key={client_public.decode()}",
         "--publisher", s.publisher_pub, "--unsafe-test-key-fd", str(key_r),
         "--status-fd", str(status_w)],
        pass_fds=[status_w, key_r],
    )  # fmt: skip
    os.close(status_w)
    os.close(key_r)
    ctx = zmq.Context()
    try:
        ready = read_ready_line(status_r, timeout=60, proc=proc)
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_serverkey = ready["server_key"].encode()
        sock.curve_publickey, sock.curve_secretkey = client_public, client_secret
        sock.connect(ready["endpoint"])
        sock.send_multipart([pack_header({"v": PROTOCOL_VERSION, "op": "health", "id": 1})])
        assert sock.poll(20_000), "no answer"
        health = unpack_header(sock.recv_multipart()[0])
        sock.close()
        assert health["ok"] is True and health["serving"] is True and health["tier"] == 2
        assert set(health) - {"v", "id", "ok"} <= {"model_id", "serving", "tier", "provider"}
    finally:
        os.close(status_r)
        stop_process(proc, 5)
        ctx.term()
