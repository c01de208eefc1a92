"""Random frames thrown at a live worker: every one gets a reply (or is
dropped by the transport), and a valid call afterwards answers correctly."""

from __future__ import annotations

from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.models import mlp, reference_pipeline
from tests.sealed import open_sealed, seal_for_test
from vault.client import Model
from vault.core.protocol import PROTOCOL_VERSION, unpack_header


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Model, zmq.Socket]]:
    s = seal_for_test(tmp_path_factory.mktemp("fuzz"), mlp(), name="fuzz")
    m = open_sealed(s, worker_args=["--max-message", str(1 << 20)])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(m._endpoint)  # type: ignore[arg-type]
    try:
        yield m, sock
    finally:
        sock.close()
        ctx.term()
        m.close()


_desc = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(
            st.sampled_from(["x", "logits", "hidden", ""]),
            st.text(max_size=8),
            st.integers(-(2**40), 2**40),
        ),
        "dtype": st.one_of(
            st.sampled_from(["float32", "string", "bfloat16", "int8", "bool", "nope"]),
            st.integers(-(2**40), 2**40),
        ),
        "shape": st.one_of(
            st.lists(st.integers(min_value=-3, max_value=20), max_size=4), st.text(max_size=3)
        ),
    },
)
_header = st.fixed_dictionaries(
    {
        "v": st.one_of(st.just(PROTOCOL_VERSION), st.integers(-2, 5), st.text(max_size=2)),
        "op": st.one_of(
            st.sampled_from(["compute", "info", "health", "stats"]), st.text(max_size=6)
        ),
    },
    optional={
        "id": st.one_of(
            st.integers(-(2**40), 2**40),
            st.text(max_size=4),
            st.none(),
            st.lists(st.integers(-(2**40), 2**40), max_size=2),
        ),
        "tensors": st.one_of(
            st.lists(_desc, max_size=3), st.integers(-(2**40), 2**40), st.text(max_size=3)
        ),
        "outputs": st.one_of(
            st.none(), st.lists(st.text(max_size=6), max_size=3), st.integers(-(2**40), 2**40)
        ),
    },
).map(lambda h: msgpack.packb(h, use_bin_type=True))
_frame = st.one_of(st.binary(max_size=300), st.just(b"\0" * 128))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(first=st.one_of(_header, st.binary(max_size=64)), rest=st.lists(_frame, max_size=4))
def test_random_frames_get_typed_replies(
    live: tuple[Model, zmq.Socket], first: bytes, rest: list[bytes]
) -> None:
    _, sock = live
    sock.send_multipart([first, *rest])
    assert sock.poll(10000), "worker stopped answering"
    reply = sock.recv_multipart()
    header = unpack_header(reply[0])
    if not header["ok"]:
        assert isinstance(header["error"]["code"], str)
        assert len(reply) == 1


def test_valid_call_after_the_storm(live: tuple[Model, zmq.Socket]) -> None:
    model, _ = live
    x = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
    got = model.compute({"x": x})
    np.testing.assert_array_equal(got["logits"], reference_pipeline([mlp()], {"x": x})["logits"])


def test_oversized_request_is_refused_and_the_worker_goes_on(
    live: tuple[Model, zmq.Socket],
) -> None:
    model, _ = live
    import vault

    with pytest.raises(vault.ProtocolError, match="exceeds"):
        # five frames, each under the per-frame transport limit, together over
        # the request limit; strings, which always travel as frames (numeric
        # tensors this large together would go through shared memory)
        model.compute({f"t{i}": np.array(["a" * 250_000], dtype=object) for i in range(5)})
    assert model.compute({"x": np.ones((1, 8), np.float32)})["logits"].shape == (1, 5)
