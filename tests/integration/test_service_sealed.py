"""The worker service's sealed calls (vault/core/sealed.py): a call licence's
computes travel sealed under keys agreed over CURVE, are admitted as that
licence's key, and a replayed or tampered one is refused and never counted."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from tests.integration.test_service_calls import Svc
from tests.models import mlp, reference_pipeline
from vault.core import sealed
from vault.core.protocol import encode_tensors, pack_header, unpack_header

X = np.random.default_rng(4).standard_normal((20_000, 8)).astype(np.float32)  # 640 KB: 3 chunks


@pytest.fixture
def service(keyserver: Any, tmp_path: Path) -> Iterator[Svc]:
    s = Svc(keyserver, tmp_path)
    try:
        yield s
    finally:
        s.stop()


def test_service_calls_travel_sealed_and_a_replay_is_refused_uncounted(service: Svc) -> None:
    assert service.svc.bulk_port is not None  # on by default (--sealed-port 0: any free port)
    lic = service.caller(holder="sealed")
    with service.connect(lic) as m:
        got = m.compute({"x": X})["logits"]
        np.testing.assert_allclose(got, reference_pipeline([mlp()], {"x": X})["logits"], rtol=1e-5)
        state = m._channel._sealed.state  # type: ignore[union-attr]
        assert state is not None, "the service's computes do not travel sealed"
        port = int(state.sock.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2])
        calls = int(m.stats()["calls"])
    # by hand: a session for this licence's key, one call, then that call again
    ctx = zmq.Context()
    front, bulk = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        for s in (front, bulk):
            s.linger = 0
        front.curve_serverkey = service.server_key.encode()
        front.curve_publickey = lic.client_public_key.encode()
        front.curve_secretkey = lic.client_secret_key.encode()
        front.connect(service.endpoint)
        rand = os.urandom(32)
        front.send_multipart([pack_header({"v": 1, "op": "session", "id": 1, "rand": rand})])
        assert front.poll(10_000)
        hdr = unpack_header(front.recv_multipart()[0])
        assert hdr["ok"] is True and hdr["port"] == port
        c2s, s2c, password = sealed.derive_session(rand, hdr["rand"], hdr["sid"],
                                                   lic.client_public_key.encode(),
                                                   service.server_key.encode())  # fmt: skip
        sealer, opener = sealed.Sealer(c2s, hdr["sid"]), sealed.Opener(s2c, hdr["sid"])
        bulk.plain_username = (
            hdr["sid"].hex().encode()
        )  # the sealed port admits the session's holder
        bulk.plain_password = password.encode()
        bulk.connect(service.endpoint.rpartition(":")[0] + f":{port}")
        descs, frames = encode_tensors({"x": X[:4]})
        wire = sealer.seal([pack_header({"v": 1, "op": "compute", "id": 7, "model": "m",
                                         "tensors": descs}), *[bytes(f) for f in frames]])  # fmt: skip
        answers = []
        for msg in (wire, wire):  # the second one is a replay
            bulk.send_multipart(msg)
            assert bulk.poll(10_000)
            answers.append(bulk.recv_multipart())
        ok = unpack_header(opener.open(answers[0])[0])
        assert ok["ok"] is True and ok["id"] == 7
        assert answers[1][0] == sealed.ERROR_TAG  # refused, plainly: nothing ran
        assert unpack_header(answers[1][1])["error"]["code"] == "integrity"
        # a caller whose answer was replaced by a plain "unknown session" asks,
        # before sending the call again, what became of it: accepted (so it is
        # not sent twice), and the old session ends with the question
        front.send_multipart([pack_header({"v": 1, "op": "session", "id": 2, "rand": os.urandom(32),
                                           "prev": hdr["sid"], "prev_seq": 1})])  # fmt: skip
        assert front.poll(10_000)
        assert unpack_header(front.recv_multipart()[0])["prev"] == "accepted"
        bulk.send_multipart(wire)
        assert bulk.poll(10_000)
        gone = bulk.recv_multipart()
        assert gone[0] == sealed.ERROR_TAG and unpack_header(gone[1]).get("session") == "unknown"
    finally:
        front.close()
        bulk.close()
        ctx.term()
    with service.connect(lic) as m:
        assert int(m.stats()["calls"]) == calls + 1  # the call once, the replay never
