"""Every field of a request header gets its typed check, at the worker and
at the service (issue 17, item 7): a tensor whose name is a list, a shape of
strings, a dtype that is a map, nested junk anywhere. Each request is
answered with a typed ``protocol`` or ``bad_input`` error (never ``internal
worker error (TypeError)``), and a valid call afterwards is still served.

Hypothesis draws the headers: arbitrary msgpack values (nested lists and
maps, binary, floats, huge integers) in every field a request has.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.test_service import Running, start_service
from tests.models import mlp, reference_pipeline
from tests.sealed import open_sealed, seal_for_test
from vault.client import Model
from vault.core.protocol import PROTOCOL_VERSION, unpack_header

TYPED = {"protocol", "bad_input", "unsupported_version", "unknown_model"}

_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=6),
    st.binary(max_size=6),
)
_junk = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4),
                                                     inner, max_size=3)
    ),
    max_leaves=8,
)  # fmt: skip
_containers = st.one_of(
    st.lists(_scalar, min_size=1, max_size=2),
    st.dictionaries(st.text(max_size=3), _scalar, min_size=1, max_size=2),
)
_name = st.one_of(st.sampled_from(["x", "logits", "secret_h0", ""]), _containers, _junk)
_dtype = st.one_of(
    st.sampled_from(["float32", "string", "int64", "sequence<float32>", "map<int64,float32>",
                     "optional<float32>", "float32>", "nope"]),
    _containers,
    _junk,
)  # fmt: skip
_shape = st.one_of(st.lists(st.integers(-3, 9), max_size=4), _junk, _containers,
                   st.lists(st.one_of(st.integers(0, 9), _scalar, _containers), max_size=3))  # fmt: skip
_desc = st.one_of(
    *[st.fixed_dictionaries(
        {},
        optional={"name": _name, "dtype": _dtype, "shape": _shape, "shm": _junk,
                  "items": st.one_of(_junk, st.lists(_junk, max_size=2)),
                  "keys": _junk, "values": _junk, "value": _junk},
    )] * 4,
    _junk,
)  # fmt: skip
_wild = st.fixed_dictionaries(
    {"v": st.one_of(st.just(PROTOCOL_VERSION), _junk),
     "op": st.one_of(st.sampled_from(["compute", "info", "health", "stats"]), _junk)},
    optional={"id": _junk, "model": st.one_of(st.just("m"), _junk),
              "tensors": st.one_of(st.lists(_desc, max_size=3), _junk),
              "outputs": st.one_of(st.lists(st.one_of(st.just("logits"), _junk), max_size=2),
                                   _junk),
              "timeout": _junk, "shm": _junk},
)  # fmt: skip


def _one_bad(draw: Any) -> dict[str, Any]:
    """A valid call with exactly one field (of the header or of its tensor)
    replaced by junk: so the junk reaches every check, one at a time."""
    desc: dict[str, Any] = {"name": "x", "dtype": "float32", "shape": [1, 8]}
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": "compute", "id": 7, "model": "m",
                              "tensors": [desc]}  # fmt: skip
    where = draw(st.sampled_from(["name", "dtype", "shape", "shm", "items", "tensor", "id",
                                  "model", "outputs", "timeout", "hdr_shm", "extra"]))  # fmt: skip
    value = draw(st.one_of(_containers, _junk, st.lists(_containers, max_size=2)))
    if where in ("name", "dtype", "shape", "shm", "items"):
        desc[where] = value
    elif where == "tensor":
        header["tensors"] = [value]
    elif where == "hdr_shm":
        header["shm"] = value
    elif where == "extra":
        header["tensors"].append(draw(_desc))
    else:
        header[where] = value
    return header


_header = st.one_of(_wild, st.composite(_one_bad)())
_frames = st.lists(st.one_of(st.binary(max_size=64), st.just(b"\0" * 32)), max_size=3)


def _check(sock: zmq.Socket[Any], header: dict[str, Any], frames: list[bytes]) -> None:
    sock.send_multipart([msgpack.packb(header, use_bin_type=True), *frames])
    assert sock.poll(20000), "stopped answering"
    reply = sock.recv_multipart()
    out = unpack_header(reply[0])
    if out.get("ok"):
        return
    err = out["error"]
    assert err["code"] in TYPED, err
    assert "internal" not in err["message"], err


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Model, zmq.Socket[Any]]]:
    s = seal_for_test(tmp_path_factory.mktemp("hdr"), mlp(), name="m")
    m = open_sealed(s)
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(m._endpoint)  # type: ignore[arg-type]
    try:
        yield m, sock
    finally:
        sock.close()
        ctx.term()
        m.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, zmq.Socket[Any]]]:
    run = start_service(tmp_path_factory.mktemp("hdr-svc"), {"m": mlp()}, instances=1,
                        max_batch=8, batchable=("m",))  # fmt: skip
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_serverkey = run.server_key.encode()
    sock.curve_publickey = run.alice.client_public_key.encode()
    sock.curve_secretkey = run.alice.client_secret_key.encode()
    sock.connect(run.endpoint)
    try:
        yield run, sock
    finally:
        sock.close()
        ctx.term()
        run.stop()


_SETTINGS = settings(max_examples=200, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip


@_SETTINGS
@given(header=_header, frames=_frames)
def test_a_worker_answers_every_header_with_a_typed_error(
    worker: tuple[Model, zmq.Socket[Any]], header: dict[str, Any], frames: list[bytes]
) -> None:
    _check(worker[1], header, frames)


@_SETTINGS
@given(header=_header, frames=_frames)
def test_the_service_answers_every_header_with_a_typed_error(
    service: tuple[Running, zmq.Socket[Any]], header: dict[str, Any], frames: list[bytes]
) -> None:
    _check(service[1], header, frames)


def test_the_examples_from_the_issue(
    worker: tuple[Model, zmq.Socket[Any]], service: tuple[Running, zmq.Socket[Any]]
) -> None:
    x = np.ones((1, 8), np.float32).tobytes()
    for sock in (worker[1], service[1]):
        for desc in ({"name": [1], "dtype": "float32", "shape": [1, 8]},
                     {"name": "x", "dtype": "float32", "shape": ["1", 8]},
                     {"name": "x", "dtype": {"a": 1}, "shape": [1, 8]},
                     {"name": {"x": 1}, "dtype": "float32", "shape": [[1], [8]]}):  # fmt: skip
            _check(sock, {"v": PROTOCOL_VERSION, "op": "compute", "id": 1, "model": "m",
                          "tensors": [desc]}, [x])  # fmt: skip


def test_both_still_serve_after_the_storm(
    worker: tuple[Model, zmq.Socket[Any]], service: tuple[Running, zmq.Socket[Any]]
) -> None:
    x = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
    want = reference_pipeline([mlp()], {"x": x})["logits"]
    np.testing.assert_allclose(worker[0].compute({"x": x})["logits"], want, rtol=1e-6)
    with service[0].connect("m") as m:
        np.testing.assert_allclose(m.compute({"x": x})["logits"], want, rtol=1e-6)
    assert Path(service[0].log_path).exists()
