"""The hybrid end to end: ``vault split`` with a real key server, the tails served
by ``vault worker serve`` over tcp + CURVE, and ``vault.open(split_dir, server=...)``."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

import vault
from tests.conftest import KeyServerProcess, served_endpoint
from tests.models import classifier_pipeline, reference_pipeline
from vault.core.crypto import PublisherKey
from vault.core.keyclient import KeyServerClient
from vault.core.process import stop_process
from vault.hybrid.client import HybridModel
from vault.hybrid.publish import split


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_tail(
    tail: Path, licence: Path, allow: Path, tmp: Path, sealed_port: int = 0
) -> tuple[Any, str, str]:
    """``vault worker serve TAIL`` on a free port; returns (proc, endpoint, server key).
    ``sealed_port``: its sealed calls' port (for an emulated link to cover it too)."""
    key_out = tmp / f"{tail.stem}.pub"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vault", "worker", "serve", str(tail), "--licence", str(licence),
         "--bind", "tcp://127.0.0.1:0", "--allow", str(allow), "--server-key-out", str(key_out),
         "--sealed-port", str(sealed_port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    endpoint, buf = served_endpoint(proc)
    if endpoint is None:
        stop_process(proc, 5)
        raise AssertionError(f"tail worker did not start: {buf.decode()}")
    return proc, endpoint, key_out.read_text().strip()


class Deployment:
    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.server: dict[str, str] = {}
        self.keys: dict[str, str] = {}
        self.key_ids: dict[str, str] = {}
        self.sealed: dict[str, int] = {}  # each tail's sealed calls' port
        self.alice = Path()

    def close(self) -> None:
        for p in self.procs:
            stop_process(p, 10)
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()


@pytest.fixture(scope="module")
def ks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyServerProcess]:
    from keyserver import init_dir

    d = tmp_path_factory.mktemp("hybrid-ks") / "ks"
    init_dir(d, address="tcp://127.0.0.1:7700")
    proc = KeyServerProcess(d, lease_ttl=2.0)
    try:
        proc.start()
        yield proc
    finally:
        proc.kill()


def deploy(ks: KeyServerProcess, tmp: Path, model_id: str, dep: Deployment, **kw: Any) -> Path:
    """Split the classifier pipeline, serve each tail; returns the split directory."""
    pre, model, post = kw.pop("stages", classifier_pipeline())

    def register(res: Any) -> None:
        ks.register(res.model_id, res.key_id, res.key, res.digest)
        dep.key_ids[res.model_id] = res.key_id

    out = tmp / f"{model_id}.split"
    split(model, pre=pre, post=post, model_id=model_id, output_dir=out,
          signing_key=PublisherKey.load(ks.publisher_key_path), register=register,
          profile_repeats=2, **kw)  # fmt: skip
    # a sealed head runs in a local worker: with no daemon in this test, tier 0
    alice = ks.issue(f"{model_id}.head", holder="alice", same_user=bool(kw.get("seal_head")))
    dep.alice = tmp / f"{model_id}-alice.licence"
    alice.save(dep.alice)
    allow = tmp / f"{model_id}-clients"
    allow.mkdir()
    (allow / "alice.key").write_text(alice.client_public_key + "\n")
    desc = json.loads((out / "split.json").read_text())
    for c in desc["cuts"]:
        srv = ks.issue(
            c["tail_model_id"], holder=f"server-{c['name']}", same_user=True
        )  # the vendor's own server, no device here
        srv_path = tmp / f"{model_id}-server-{c['name']}.licence"
        srv.save(srv_path)
        sealed = _free_port()
        proc, endpoint, key = serve_tail(out / c["tail"], srv_path, allow, tmp, sealed)
        dep.procs.append(proc)
        dep.server[c["tail_model_id"]] = endpoint
        dep.sealed[c["tail_model_id"]] = sealed
        dep.keys[c["tail_model_id"]] = key
    return out


@pytest.fixture(scope="module")
def deployed(
    ks: KeyServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Path, Deployment, dict]]:
    """The classifier pipeline split twice (cuts c0 at h2, c1 at h0), each tail served."""
    dep = Deployment()
    try:
        out = deploy(ks, tmp_path_factory.mktemp("hybrid"), "clf", dep, at=[["h2"], ["h0"]],
                     split_points=["h0", "h2"])  # fmt: skip
        yield out, dep.alice, dep, dep.key_ids
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
            # a wrong dtype at the head: the vault's words, not onnxruntime's
            with pytest.raises(vault.InputError, match="is float32; the model takes uint8") as e:
                m.compute({"image": x.astype(np.float32)})
            assert "ONNXRuntime" not in str(e.value) and "INVALID_ARGUMENT" not in str(e.value)
            with pytest.raises(vault.InputError, match="takes a dict of input name"):
                m.compute(x)  # type: ignore[arg-type]
            # a str where an array goes: said as a str (it read "is str160")
            with pytest.raises(vault.InputError, match="'image' is str; the model takes a uint8"):
                m.compute({"image": "a picture"})
            assert m.compute({"image": x})["probs"].shape == (4, 5)  # still serving


def test_a_wrong_server_key_or_a_stopped_tail_is_said_at_once(deployed: Any) -> None:
    """The hybrid's server connection reports what is wrong, typed, long
    before a call's timeout (120 s here: a WorkerTimeoutError would mean it waited)."""
    out, alice, dep, _ = deployed
    wrong, _ = zmq.curve_keypair()
    with pytest.raises(vault.ConfigError, match="server key given is not this service's"):
        vault.open(out, licence=alice, server=dep.server, timeout=120,
                   server_key={k: wrong.decode() for k in dep.keys})  # fmt: skip
    with socket.socket() as s:  # a port nothing listens on: a tail that stopped
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(vault.ServiceUnavailableError, match="not reachable"):
        vault.open(out, licence=alice, server={k: f"tcp://127.0.0.1:{free}" for k in dep.server},
                   server_key=dep.keys, timeout=120)  # fmt: skip


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
        h = m.health()
        assert h["cut"] == "c0" and h["link"]["rtt_ms"] == link.rtt_ms and h["tail"]["serving"]


def _audit(keyserver: KeyServerProcess) -> list[tuple[str, str | None, str]]:
    conn = sqlite3.connect(keyserver.dir / "keyserver.db")
    try:
        rows = conn.execute("SELECT event, licence_id, detail FROM audit ORDER BY seq")
        return [(r[0], r[1], r[2]) for r in rows]
    finally:
        conn.close()


def test_the_caller_never_receives_the_tail_key(ks: KeyServerProcess, deployed: Any) -> None:
    out, alice_path, dep, registered = deployed
    alice = vault.Licence.load(alice_path)
    before = len(_audit(ks))
    with vault.open(out, licence=alice, server=dep.server, server_key=dep.keys) as m:
        m.compute({"image": _image(1)})
    # the hybrid asked the key server for nothing under the caller's licence
    assert [e for e in _audit(ks)[before:] if e[1] == alice.licence_id] == []
    # and asking for the tail's key with the caller's licence is refused: alone
    # (no enrolled device), and even through an enrolled device (wrong model)
    desc = json.loads((out / "split.json").read_text())
    tail = desc["cuts"][0]
    args = {"model_id": tail["tail_model_id"], "key_id": registered[tail["tail_model_id"]],
            "package_digest": tail["tail_digest"]}  # fmt: skip
    with KeyServerClient(alice, timeout=5) as kc, pytest.raises(vault.PermissionDeniedError):
        kc.release(**args)
    with ks.client(alice, timeout=5) as kc, pytest.raises(vault.WrongModelError):
        kc.release(**args)
    # nothing in the split directory holds a key
    names = sorted(p.name for p in out.iterdir())
    assert names == ["head-c0.onnx", "head-c1.onnx", "split.json", "tail-c0.vault", "tail-c1.vault"]
    assert "key" not in json.dumps(desc).replace("server_key", "").replace("key_id", "")


def test_vault_split_and_profile_cli(ks: KeyServerProcess, tmp_path: Path) -> None:
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
         "--protect-from", "h2", "--model-id", "m", "--licence", str(ks.admin_licence),
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
         "--protect-from", "h2", "--model-id", "m2", "--licence", str(ks.admin_licence),
         "-o", str(tmp_path / "bad.split")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "protected node 'secret_dense2'" in bad.stderr and "h2 -> h3" in bad.stderr


def test_sealed_head_runs_in_a_local_worker_and_gets_only_the_head_key(
    ks: KeyServerProcess, tmp_path: Path
) -> None:
    dep = Deployment()
    try:
        out = deploy(ks, tmp_path, "sh", dep, at=[["h2"]], split_points=["h2"], seal_head=True)
        alice = vault.Licence.load(dep.alice)
        assert sorted(p.name for p in out.iterdir()) == [
            "head-c0.vault",
            "split.json",
            "tail-c0.vault",
        ]
        before = len(_audit(ks))
        x = _image(3, seed=5)
        with vault.open(out, licence=alice, server=dep.server, server_key=dep.keys) as m:
            got = m.compute({"image": x})
        for k, v in reference_pipeline(list(classifier_pipeline()), {"image": x}).items():
            np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6)
        mine = [e for e in _audit(ks)[before:] if e[1] == alice.licence_id]
        released = [json.loads(e[2])["key_id"] for e in mine if e[0] == "released"]
        assert released == [dep.key_ids["sh.head"]], mine  # the head's key, for the local worker
        assert dep.key_ids["sh.tail"] not in json.dumps(mine)
    finally:
        dep.close()


def test_client_moves_to_the_cheaper_cut_when_the_link_slows(
    ks: KeyServerProcess, tmp_path: Path
) -> None:
    """Two cuts shipped: c0 sends a wide tensor (cheap head), c1 a narrow one (the
    vendor's profile says its head costs 50 ms more). Behind a fast emulated link the
    client stays on c0; after the link drops to 40 ms / 2 Mbit/s (the wide tensor,
    40 KB, then takes 160 ms) it moves to c1 and the answers stay right. With
    replan=False it never moves. (50 ms, not less: on a loaded machine a call's
    wall time, from which the client measures the link, grows by tens of ms, and
    a 15 ms gap moved the client on the fast link.)"""
    from benchmarks.linkproxy import LinkProxy

    wide = _wide_model()
    nodes = {n.name: 0.01 for n in wide.graph.node}
    client = {"format": "vault-profile/1", "nodes": {**nodes, "narrow": 50.0}}
    dep = Deployment()
    proxies: list[LinkProxy] = []
    try:
        out = deploy(ks, tmp_path, "w", dep, stages=(None, wide, None), at=[["wide"], ["thin"]],
                     split_points=["wide", "thin"], client_costs=client,
                     server_costs={"nodes": nodes})  # fmt: skip
        server = {}
        for tail, address in dep.server.items():
            host, port = address.removeprefix("tcp://").rsplit(":", 1)
            proxies.append(LinkProxy(host, int(port), rtt_ms=2, mbit=1000,
                                     sealed_port=dep.sealed[tail]))  # fmt: skip
            server[tail] = proxies[-1].address
        x = {"x": np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)}
        want = _run_whole(wide, x)
        with vault.open(out, licence=dep.alice, server=server, server_key=dep.keys) as m:
            for _ in range(4):
                np.testing.assert_allclose(m.compute(x)["y"], want, rtol=1e-5)
            assert m.cut == "c0"
            for p in proxies:
                p.set(rtt_ms=40, mbit=2)
            seen = []
            for _ in range(8):
                np.testing.assert_allclose(m.compute(x)["y"], want, rtol=1e-5)
                seen.append(m.cut)
            assert seen[-1] == "c1", seen
            assert seen.count("c0") >= 2  # not on the first slow call: hysteresis
        with vault.open(out, licence=dep.alice, server=server, server_key=dep.keys,
                        replan=False) as m:  # fmt: skip
            for _ in range(4):
                m.compute(x)
            assert m.cut == "c0"
    finally:
        for p in proxies:
            p.close()
        dep.close()


def _wide_model() -> Any:
    """x [1, 8] -> wide [1, 10000] -> narrow: thin [1, 8] -> y [1, 4]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(9)
    w = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in ((8, 10000), (10000, 8), (8, 4))]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["wide"], name="widen"),
        helper.make_node("MatMul", ["wide", "w1"], ["thin"], name="narrow"),
        helper.make_node("MatMul", ["thin", "w2"], ["y"], name="classify"),
    ]
    g = helper.make_graph(
        nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(a, f"w{i}") for i, a in enumerate(w)],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _run_whole(m: Any, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


# --- what a tail returns and what crosses, beyond float tensors -------------------------------


def _onnx_model(nodes: list, inputs: list, outputs: list, inits: tuple | list = ()) -> Any:
    from onnx import helper

    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21),
                                            helper.make_opsetid("ai.onnx.ml", 3)])  # fmt: skip
    m.ir_version = 10
    return m


def _seq_and_map_model() -> Any:
    """x -> h = x W (cut) -> softmax p -> outputs: p, a sequence (SequenceConstruct) and
    a ZipMap's sequence of {class: score} maps, as skl2onnx's classifiers give."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    w = np.random.default_rng(5).standard_normal((4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Softmax", ["h"], ["p"], axis=1, name="softmax"),
        helper.make_node("SequenceConstruct", ["p", "h"], ["seq"], name="seq"),
        helper.make_node("ZipMap", ["p"], ["probs"], domain="ai.onnx.ml", name="zipmap",
                         classlabels_int64s=[0, 1, 2]),
    ]  # fmt: skip
    zip_t = helper.make_sequence_type_proto(
        helper.make_map_type_proto(T.INT64, helper.make_tensor_type_proto(T.FLOAT, []))
    )
    outs = [helper.make_tensor_value_info("p", T.FLOAT, ["N", 3]),
            helper.make_tensor_sequence_value_info("seq", T.FLOAT, None),
            helper.make_value_info("probs", zip_t)]  # fmt: skip
    return _onnx_model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, ["N", 4])], outs,
                       [numpy_helper.from_array(w, "w")])  # fmt: skip


def _narrow_model() -> Any:
    """x -> relu -> three cut tensors at once, bfloat16, float8 and int4 (Casts), each
    widened back in the tail and summed: the head's outputs have no numpy type in
    onnxruntime's bridge."""
    from onnx import TensorProto as T
    from onnx import helper

    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu")]
    for t, code in (("b16", T.BFLOAT16), ("f8", T.FLOAT8E4M3FN), ("i4", T.INT4)):
        nodes += [helper.make_node("Cast", ["a"], [t], to=code, name=f"to_{t}"),
                  helper.make_node("Cast", [t], [f"{t}_f"], to=T.FLOAT, name=f"from_{t}")]  # fmt: skip
    nodes += [helper.make_node("Sum", ["b16_f", "f8_f", "i4_f"], ["y"], name="sum")]
    return _onnx_model(nodes, [helper.make_tensor_value_info("x", T.FLOAT, ["N", 4])],
                       [helper.make_tensor_value_info("y", T.FLOAT, ["N", 4])])  # fmt: skip


def _string_model() -> Any:
    """s (strings) -> LabelEncoder -> l (strings, the cut) -> LabelEncoder -> y (int64)."""
    from onnx import TensorProto as T
    from onnx import helper

    nodes = [
        helper.make_node("LabelEncoder", ["s"], ["l"], domain="ai.onnx.ml", name="norm",
                         keys_strings=["A", "B"], values_strings=["a", "b"], default_string="z"),
        helper.make_node("LabelEncoder", ["l"], ["y"], domain="ai.onnx.ml", name="enc",
                         keys_strings=["a", "b"], values_int64s=[1, 2], default_int64=0),
    ]  # fmt: skip
    return _onnx_model(nodes, [helper.make_tensor_value_info("s", T.STRING, ["N"])],
                       [helper.make_tensor_value_info("y", T.INT64, ["N"])])  # fmt: skip


@pytest.mark.parametrize(
    "build, at, feeds",
    [
        (_seq_and_map_model, "h",
         {"x": np.random.default_rng(6).standard_normal((3, 4)).astype(np.float32)}),
        (_narrow_model, "b16,f8,i4",
         {"x": np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32) * 3}),
        (_string_model, "l", {"s": np.array(["A", "B", "C"], dtype=object)}),
    ],
    ids=["sequence-and-zipmap-out", "bf16-float8-int4-cut", "string-cut"],
)  # fmt: skip
def test_the_hybrid_carries_any_output_kind_and_every_wire_dtype(
    ks: KeyServerProcess, tmp_path: Path, build: Any, at: str, feeds: dict
) -> None:
    """A tail returning a sequence and a ZipMap's maps: before, the client's bandwidth
    estimate took ``.nbytes`` of each output and the answer was lost to an
    AttributeError. Cut tensors of bfloat16, float8 and int4: before, ``vault split``
    failed on them, and the caller's in-process head could not hand them over (its
    ``session.run`` has no numpy type for them). Strings cross too. Each equals the
    whole model run in-process, call after call (the estimate runs on each)."""
    import onnxruntime as ort

    model = build()
    dep = Deployment()
    try:
        out = deploy(ks, tmp_path, f"any-{build.__name__.strip('_')}".replace("_", "-"), dep,
                     stages=(None, model, None), at=[at.split(",")],
                     split_points=at.split(","))  # fmt: skip
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        with vault.open(out, licence=dep.alice, server=dep.server, server_key=dep.keys,
                        replan=False) as m:  # fmt: skip
            for _ in range(2):
                got = m.compute(feeds)
                assert set(got) == set(want)
                for k, v in want.items():
                    if isinstance(v, list):  # the sequence, the maps
                        assert len(got[k]) == len(v)
                        for g, w in zip(got[k], v):
                            if isinstance(w, dict):
                                assert g.keys() == w.keys()
                                np.testing.assert_array_equal(list(g.values()), list(w.values()))
                            else:
                                np.testing.assert_array_equal(g, w)
                    else:
                        np.testing.assert_array_equal(got[k], v)
            assert m.link_estimate() is not None  # the call was measured, not skipped
    finally:
        dep.close()
