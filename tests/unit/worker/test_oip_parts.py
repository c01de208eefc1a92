"""The Open Inference Protocol's pieces that need no server: the proto is the
protocol's (field by field against Triton's compiled descriptors), the
generated modules are what generate.py writes, tensors convert both ways for
every datatype, and the plaintext rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vault.core.errors import ConfigError, InputError, ProtocolError
from vault.core.protocol import decode_tensor
from worker.service.oip import OipConfig, OipServer, is_loopback
from worker.service.oip import inference_pb2 as ours
from worker.service.oip import tensors as T

OIP = Path(__file__).resolve().parents[3] / "worker" / "service" / "oip"


def _fields(desc: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in desc.fields:
        out[f.name] = (f.number, f.type, f.is_repeated)
        if f.message_type is not None and not f.message_type.GetOptions().map_entry:
            out[f.name] = (*out[f.name], _fields(f.message_type))
    return out


def test_messages_match_tritons_compiled_proto() -> None:
    triton = pytest.importorskip("tritonclient.grpc.service_pb2")
    from tritonclient.grpc import model_config_pb2 as triton_config

    names = [n for n in ours.DESCRIPTOR.message_types_by_name]
    assert len(names) == 20
    configs = {"ModelConfig", "ModelInput", "ModelOutput"}  # model_config.proto's
    for name in names:
        mine = ours.DESCRIPTOR.message_types_by_name[name]
        where = triton_config if name in configs else triton
        theirs = where.DESCRIPTOR.message_types_by_name[name]
        assert mine.full_name == theirs.full_name
        t = _fields(theirs)
        for field_name, spec in _fields(mine).items():
            assert t[field_name][:3] == spec[:3], (name, field_name)
    # the same numbers for every datatype of the model configuration
    theirs_dt = {v.name: v.number for v in triton_config.DataType.DESCRIPTOR.values}
    assert {v.name: v.number for v in ours.DataType.DESCRIPTOR.values} == theirs_dt
    svc, tsvc = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"], None
    tsvc = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for m in svc.methods:
        tm = tsvc.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name) == (
            tm.input_type.full_name,
            tm.output_type.full_name,
        )
        # ModelStreamInfer streams both ways, as Triton's
        assert (m.client_streaming, m.server_streaming) == (
            tm.client_streaming,
            tm.server_streaming,
        ), m.name


def test_generated_modules_are_current(tmp_path: Path) -> None:
    """The committed modules hold exactly what inference.proto compiles to
    (the descriptor, whichever grpcio-tools version compiles it), in a
    private pool, and the gRPC module imports its messages relatively."""
    pytest.importorskip("grpc_tools")
    import importlib.util

    from worker.service.oip.generate import generate

    paths = {Path(p).name: Path(p) for p in generate(str(tmp_path))}
    spec = importlib.util.spec_from_file_location("fresh_inference_pb2", paths["inference_pb2.py"])
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)  # its own private pool: no clash with ours
    assert fresh.DESCRIPTOR.serialized_pb == ours.DESCRIPTOR.serialized_pb, "run generate.py"
    assert "_descriptor_pool.Default()" not in (OIP / "inference_pb2.py").read_text()
    assert "from . import inference_pb2" in (OIP / "inference_pb2_grpc.py").read_text()


@pytest.mark.parametrize("datatype", sorted(set(T.DATATYPES) - {"BF16"}))
def test_every_datatype_round_trips(datatype: str) -> None:
    vd = T.DATATYPES[datatype]
    if datatype == "BYTES":
        arr = np.array([["a", "wörld"], ["", "x" * 300]], dtype=object)
        data: Any = arr.tolist()
    elif datatype == "BOOL":
        arr = np.array([[True, False], [False, True]])
        data = arr.tolist()
    else:
        arr = np.array([[0, 1], [2, 3]], dtype=vd)
        data = arr.reshape(-1).tolist()  # flat, row-major
    d1, f1 = T.from_json("t", datatype, [2, 2], data)
    _, raw = T.to_raw({**d1}, f1)[2:]
    d2, f2 = T.from_raw("t", datatype, [2, 2], raw)
    for d, f in ((d1, f1), (d2, f2)):
        _, back = decode_tensor(d, f)
        np.testing.assert_array_equal(back, arr)
    name, dt, shape, out = T.to_json_data(d1, f1)
    assert (name, dt, shape) == ("t", datatype, [2, 2])
    assert out == arr.reshape(-1).tolist()


@pytest.mark.parametrize(("datatype", "shape", "data"), [
    ("FP32", [2, 2], [1.0, 2.0, 3.0]),          # too few
    ("INT32", [2], [1.5, 2.0]),                 # not integers
    ("UINT8", [1], [300]),                      # does not fit
    ("BOOL", [1], [1]),                         # not a boolean
    ("BYTES", [1], [1]),                        # not a string
    ("FP32", [-1], [1.0]),                      # bad shape
    ("COMPLEX", [1], [1.0]),                    # no such datatype
    ("FP32", [2], [[1.0], [2.0, 3.0]]),         # ragged
    ("UINT64", [2], [1, 2**64]),                # does not fit, past uint64
    ("UINT64", [2], [-1, 2**63]),               # does not fit, below 0
    ("INT64", [2], [1, 2**63]),                 # does not fit int64
    ("UINT64", [2], [1.5, 2**63]),              # not integers, among large ones
    ("FP32", [2], [True, 2.5]),                 # a bool among numbers (numpy reads 1.0)
    ("INT32", [2, 1], [[2], [False]]),          # the same, nested
])  # fmt: skip
def test_malformed_json_tensors_are_input_errors(
    datatype: str, shape: list[int], data: Any
) -> None:
    with pytest.raises(InputError):
        T.from_json("t", datatype, shape, data)


def test_json_integers_past_int64_are_taken_exactly() -> None:
    """numpy reads ``[1, 2**63]`` as float64 (and ``2**64 - 1`` beside a small
    one loses its last bits so): UINT64 data past int64 is taken as the exact
    integers JSON gave."""
    big = [1, 2**63, 2**64 - 1, 9007199254740993]  # the last: not a float64
    d, f = T.from_json("u", "UINT64", [2, 2], [big[:2], big[2:]])
    _, back = decode_tensor(d, f)
    assert back.dtype == np.uint64 and back.reshape(-1).tolist() == big
    d, f = T.from_json("i", "INT64", [2], [-(2**63), 2**63 - 1])
    assert decode_tensor(d, f)[1].tolist() == [-(2**63), 2**63 - 1]


def test_malformed_binary_tensors_are_input_errors() -> None:
    with pytest.raises(InputError):
        T.from_raw("t", "FP32", [2], b"\0" * 7)
    with pytest.raises(InputError):  # a length past the end
        T.from_raw("t", "BYTES", [1], b"\x10\0\0\0abc")
    with pytest.raises(InputError):  # trailing bytes
        T.from_raw("t", "BYTES", [1], b"\x01\0\0\0ab")
    with pytest.raises(InputError):  # not UTF-8
        T.from_raw("t", "BYTES", [1], b"\x01\0\0\0\xff")
    with pytest.raises(InputError, match="not valid Unicode"):  # JSON's lone surrogate
        T.from_json("t", "BYTES", [2], ["ok", "\ud800"])


def test_plaintext_is_refused_off_loopback_unless_dangerously_allowed() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    with pytest.raises(ConfigError, match="in the clear"):
        OipServer.check(OipConfig(host="0.0.0.0", http_port=0))
    # the controls: loopback, TLS, or the explicit flag
    OipServer.check(OipConfig(host="127.0.0.1", http_port=0))
    OipServer.check(OipConfig(host="0.0.0.0", grpc_port=0, dangerously_allow_plaintext=True))
    with pytest.raises(ConfigError, match="cannot read"):
        OipServer.check(
            OipConfig(host="0.0.0.0", http_port=0, tls=("/nonexistent", "/nonexistent"))
        )


def test_outputs_the_protocol_cannot_carry_are_refused_before_the_call() -> None:
    import asyncio

    from worker.service.oip.door import DataPlane

    class Service:  # only what the door reads before it posts a call
        submitted: list[Any] = []

        def model_info(self, model: str) -> dict[str, Any]:
            return {"inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 2]}],
                    "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2]},
                                {"name": "z", "dtype": "sequence<map<int64,float32>>", "shape": []}]}  # fmt: skip

        model_signature = model_info  # the manifest's: the same signature

        def model_state(self, model: str) -> tuple[str, None]:
            return ("READY", None)

        def vet_now(self, token: Any, model: Any) -> bool:
            return False  # nothing known fresh here: the door asks the loop (submit)

        def submit(self, call: Any) -> None:
            self.submitted.append(call)

    svc = Service()
    plane = DataPlane(svc)  # type: ignore[arg-type]
    assert [t["name"] for t in plane.model_metadata("m", None)["outputs"]] == ["y"]
    assert plane.default_outputs("m") == ["y"]
    with pytest.raises(InputError, match="cannot carry"):
        asyncio.run(plane.infer("m", None, None, [], [], ["z"]))  # type: ignore[arg-type]
    assert svc.submitted == []  # never posted: nothing ran, nothing billed


def _stranger_token() -> bytes:
    """A well-formed token of a licence nobody issued (a stranger's own key)."""
    import base64

    from vault.core.crypto import PublisherKey
    from vault.core.licence import Licence
    from vault.core.token import mint_token

    lic = Licence(licence_id="lic-a", holder="shop", keyserver_address="tcp://127.0.0.1:1",
                  keyserver_public_key="k" * 40, client_public_key="a" * 40,
                  client_secret_key="s" * 40, kind="call",
                  proof_key=base64.b64encode(PublisherKey.generate().export_private_raw()).decode())  # fmt: skip
    return mint_token(lic, models=["m"]).encode()


def _asgi(app: Any, method: str, path: str, headers: list[Any], body: bytes = b"",
          raw_path: bytes | None = None) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
    """One request through an ASGI app: the messages it sent, and how many
    of the body's messages it left unread."""
    import asyncio

    return asyncio.run(_asgi_on_loop(app, method, path, headers, body, raw_path))


async def _asgi_on_loop(app: Any, method: str, path: str, headers: list[Any], body: bytes = b"",
                        raw_path: bytes | None = None) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
    """:func:`_asgi` on the running loop."""
    msgs = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return msgs.pop(0)

    async def send(m: dict[str, Any]) -> None:
        sent.append(m)

    scope = {"type": "http", "method": method, "path": path, "headers": headers,
             "raw_path": raw_path or path.encode()}  # fmt: skip
    await app(scope, receive, send)
    return sent, len(msgs)


def _rest_infer(app: Any, body: bytes, token: bytes) -> tuple[list[dict[str, Any]], int]:
    """POST ``body`` to ``/v2/models/m/infer`` with a bearer ``token`` (:func:`_asgi`)."""
    return _asgi(app, "POST", "/v2/models/m/infer", [(b"authorization", b"Bearer " + token)], body)


def test_a_malformed_rest_body_is_a_typed_refusal_and_never_reaches_the_service() -> None:
    # bodies a caller whose token held can send: each is a 400 with the
    # vault's code, never an exception out of the ASGI app (uvicorn's 500 and
    # a traceback a line), and no call reaches the service
    import json

    from worker.service.oip.door import DataPlane
    from worker.service.oip.rest import RestApp

    class Service:
        submitted: list[Any] = []

        def vet_now(self, token: Any, model: Any) -> bool:
            return False  # nothing known fresh here: the door asks the loop (submit)

        def submit(self, call: Any) -> None:
            if call.vet:  # the token holds: the door may read the body
                call.reply({"ok": True}, ())
                return
            self.submitted.append(call)
            call.reply({"ok": False, "error": {"code": "compute", "message": "ran"}}, ())

        def model_info(self, model: str) -> dict[str, Any]:
            return {"inputs": [], "outputs": []}

        def model_state(self, model: str) -> tuple[str, None]:
            return ("READY", None)

    token = _stranger_token()
    svc = Service()
    app = RestApp(DataPlane(svc), max_body=1 << 20)  # type: ignore[arg-type]

    def post(body: bytes) -> tuple[int, dict[str, Any]]:
        sent, _ = _rest_infer(app, body, token)
        return sent[0]["status"], json.loads(sent[1]["body"])

    x = {"name": "x", "datatype": "FP32", "shape": [1]}
    for body in (b"[" * 100_000,  # deeper than json's decoder goes
                 json.dumps({"inputs": [{**x, "data": None}]}).encode()
                 .replace(b"null", b"[" * 5000 + b"1" + b"]" * 5000),
                 b"\xff\xfe", b"[]", json.dumps({"inputs": [{**x, "data": ["a"]}]}).encode()):  # fmt: skip
        status, answer = post(body)
        assert (status, answer["code"]) == (400, "bad_input"), (body[:40], answer)
    assert svc.submitted == []
    # the control: a well-formed request is posted into the service
    assert post(json.dumps({"inputs": [{**x, "data": [1.0]}]}).encode())[1]["code"] == "compute"
    assert len(svc.submitted) == 1


def test_rest_request_fields_of_the_wrong_kind_are_refused_not_guessed() -> None:
    """Fields a client got wrong were taken some way and the call ran: an
    ``id`` that is a number (run, and not echoed), ``parameters`` that is not
    an object, a ``timeout`` that is not a number, ``binary_data: "no"``
    (read as true), an output asked for twice, ``data`` beside
    ``binary_data_size`` (the binary bytes won), a sequence's correlation on
    a stateless model. Each is now a 400 ``bad_input`` naming the field, as
    Triton refuses them, and no call reaches the service. Controls: the same
    request without the fault runs, and ``sequence_id`` 0 (no sequence)
    runs."""
    import json

    from worker.service.oip.door import DataPlane
    from worker.service.oip.rest import RestApp

    class Service:
        def __init__(self) -> None:
            self.submitted: list[Any] = []

        def vet_now(self, token: Any, model: Any) -> bool:
            return False

        def submit(self, call: Any) -> None:
            if call.vet:
                call.reply({"ok": True}, ())
                return
            self.submitted.append(call)
            call.reply({"ok": False, "error": {"code": "compute", "message": "ran"}}, ())

        def model_info(self, model: str) -> dict[str, Any]:
            return {"inputs": [{"name": "x", "dtype": "float32", "shape": [1]}],
                    "outputs": [{"name": "y", "dtype": "float32", "shape": [1]}]}  # fmt: skip

        def model_state(self, model: str) -> tuple[str, None]:
            return ("READY", None)

    svc = Service()
    app = RestApp(DataPlane(svc), max_body=1 << 20)  # type: ignore[arg-type]
    token = _stranger_token()
    x = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}

    def post(req: dict[str, Any], binary: bytes = b"") -> dict[str, Any]:
        body = json.dumps(req).encode()
        headers = [(b"authorization", b"Bearer " + token)]
        if binary:
            headers.append((b"inference-header-content-length", str(len(body)).encode()))
        sent, _ = _asgi(app, "POST", "/v2/models/m/infer", headers, body + binary)
        answer = json.loads(sent[1]["body"])
        return {"status": sent[0]["status"], **answer}

    y = {"name": "y"}
    bad = {
        "id": {"id": 42, "inputs": [x]},
        "parameters": {"parameters": [1], "inputs": [x]},
        "timeout": {"parameters": {"timeout": "abc"}, "inputs": [x]},
        "negative timeout": {"parameters": {"timeout": -5}, "inputs": [x]},
        "binary_data_output": {"parameters": {"binary_data_output": "yes"}, "inputs": [x]},
        "binary_data": {"inputs": [x], "outputs": [{**y, "parameters": {"binary_data": "no"}}]},
        "output twice": {"inputs": [x], "outputs": [y, y]},
        "sequence_id": {"parameters": {"sequence_id": 7}, "inputs": [x]},
        "sequence_start": {"parameters": {"sequence_start": True}, "inputs": [x]},
        "input parameters": {"inputs": [{**x, "parameters": "p"}]},
    }
    for what, req in bad.items():
        got = post(req)
        assert (got["status"], got["code"]) == (400, "bad_input"), (what, got)
    both = {**x, "parameters": {"binary_data_size": 4}}
    got = post({"inputs": [both]}, np.float32(2.0).tobytes())
    assert (got["status"], got["code"]) == (400, "bad_input") and "not both" in got["error"], got
    assert svc.submitted == []
    # controls: without the fault the call is posted into the service (KServe's
    # client sends an empty binary tensor as "data": null beside its size 0)
    empty = {"name": "x", "datatype": "FP32", "shape": [0], "data": None,
             "parameters": {"binary_data_size": 0}}  # fmt: skip
    for req in ({"id": "42", "inputs": [x]}, {"parameters": {"sequence_id": 0}, "inputs": [x]},
                {"inputs": [empty]},
                {"parameters": {"timeout": 5_000_000, "binary_data_output": True},
                 "inputs": [x], "outputs": [{**y, "parameters": {"binary_data": False}}]}):  # fmt: skip
        assert post(req)["code"] == "compute", req
    assert len(svc.submitted) == 4


def test_every_rest_refusal_has_a_code_and_a_cut_json_part_is_named() -> None:
    """HTTP's own refusals carry a code as the vault's do (an unknown
    endpoint answered {"error": "no such endpoint: ..."} alone); a JSON
    request cut short by a stale Inference-Header-Content-Length (tritonclient
    writes it into a caller's reused headers dict) says which header cut it."""
    import json

    from worker.service.oip.door import DataPlane
    from worker.service.oip.rest import RestApp

    class Service:
        def vet_now(self, token: Any, model: Any) -> bool:
            return False

        def submit(self, call: Any) -> None:
            call.reply({"ok": True}, ())  # the token holds; nothing else is asked here

        def model_state(self, model: str) -> tuple[str, None] | None:
            return ("READY", None) if model == "m" else None

        def model_info(self, model: str) -> dict[str, Any]:
            return {"inputs": [], "outputs": []}

        def model_signature(self, model: str) -> dict[str, Any]:
            return {"inputs": [], "outputs": []}

    app = RestApp(DataPlane(Service()), max_body=1 << 20)  # type: ignore[arg-type]

    def call(method: str, path: str, headers: list[Any] = [], body: bytes = b"",  # noqa: B006
             raw_path: bytes | None = None) -> Any:  # fmt: skip
        sent, _ = _asgi(app, method, path, headers, body, raw_path)
        return sent[0]["status"], dict(sent[0]["headers"]), json.loads(sent[1]["body"])

    for path in ("/v2/models/m/stats", "/v2/repository/index", "/v2/systemsharedmemory/status"):
        status, _, body = call("GET", path)
        assert (status, body["code"]) == (404, "not_found"), body
        assert body["error"] == f"[not_found] no such endpoint: {path}"
    status, headers, body = call("POST", "/v2/models/m/config")
    assert (status, body["code"], headers[b"allow"]) == (405, "method_not_allowed", b"GET")
    status, _, body = call("GET", "/v2/models/nope/config")
    assert (status, body["code"]) == (404, "unknown_model")
    # a name of 100 KB is not echoed whole (gRPC's trailer could not carry it)
    status, _, body = call("GET", "/v2/models/" + "n" * 100_000)
    assert (status, body["code"]) == (404, "unknown_model") and len(body["error"]) < 400
    # a slash sent as %2F is no path separator (uvicorn decodes the path)
    status, _, body = call("GET", "/v2/models/m/config", raw_path=b"/v2/models/m%2Fconfig")
    assert (status, body["code"]) == (404, "not_found")
    assert call("GET", "/v2/models/m/config")[0] == 200  # the control, sent as a path

    auth = (b"authorization", b"Bearer " + _stranger_token())
    req = json.dumps({"inputs": []}).encode()
    status, _, body = call("POST", "/v2/models/m/infer",
                           [auth, (b"inference-header-content-length", b"5")], req)  # fmt: skip
    assert (status, body["code"]) == (400, "bad_input")
    assert "first 5 bytes" in body["error"] and "Inference-Header-Content-Length" in body["error"]


def test_the_json_part_of_a_rest_request_is_bounded_before_it_is_read() -> None:
    # JSON tensors take about 13 times their text in memory once decoded
    # (measured: 30 MiB of floats, 390 MiB peak), before the token's signature
    # is checked: the JSON part has its own limit (Triton's default, 64 MiB),
    # refused from the headers, before a byte of the body is read. Binary data
    # (no expansion) keeps the whole body's limit.
    import asyncio

    from worker.service.oip import rest
    from worker.service.oip.door import DataPlane
    from worker.service.oip.rest import RestApp

    read: list[int] = []

    def post(headers: list[tuple[bytes, bytes]], app: RestApp) -> tuple[int, str]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            read.append(1)
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(m: dict[str, Any]) -> None:
            sent.append(m)

        token = _stranger_token()  # well-formed: parsed, not verified, in the door
        scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer",
                 "headers": [(b"authorization", b"Bearer " + token), *headers]}  # fmt: skip
        asyncio.run(app(scope, receive, send))
        return sent[0]["status"], sent[1]["body"].decode()

    class Service:
        vetted = 0

        def vet_now(self, token: Any, model: Any) -> bool:
            return False  # nothing known fresh here: the door asks the loop (submit)

        def submit(self, call: Any) -> None:  # vets only: the calls themselves fail
            self.vetted += call.vet
            call.reply({"ok": call.vet, "error": {"code": "compute", "message": "x"}}, ())

        def model_state(self, model: str) -> tuple[str, None]:
            return ("READY", None)

        def model_info(self, model: str) -> dict[str, Any]:
            return {"inputs": [], "outputs": []}

    svc = Service()
    app = RestApp(DataPlane(svc), max_body=1 << 30)  # type: ignore[arg-type]
    limit = rest.MAX_JSON
    assert limit == 64 << 20
    for headers in ([(b"content-length", str(limit + 1).encode())],
                    [(b"content-length", str(1 << 29).encode()),
                     (b"inference-header-content-length", str(limit + 1).encode())]):  # fmt: skip
        status, body = post(headers, app)
        assert status == 400 and "binary" in body, body
    assert read == [] and svc.vetted == 0  # refused from the headers alone
    # the control: binary data past the JSON limit, with a small JSON part, is read
    post([(b"content-length", str(1 << 29).encode()),
          (b"inference-header-content-length", b"2")], app)  # fmt: skip
    assert read == [1]


def test_grpc_typed_contents_are_bounded_before_they_are_decoded() -> None:
    # the gRPC door's twin of the JSON limit: typed contents past 64 MiB are
    # refused from the message's size, before a Python object is made of them
    from worker.service.oip import inference_pb2
    from worker.service.oip.door import MAX_DECODED
    from worker.service.oip.grpc_door import _inputs

    pb: Any = inference_pb2
    chunk = b"a" * (1 << 20)
    n = MAX_DECODED // len(chunk) + 1  # one MiB past the limit
    big = pb.ModelInferRequest(model_name="m")
    big.inputs.add(name="x", datatype="BYTES", shape=[n]).contents.bytes_contents.extend(
        [chunk] * n
    )
    with pytest.raises(InputError, match="raw_input_contents"):
        _inputs(big)
    # the control: one element fewer is under the limit, and taken
    ok = pb.ModelInferRequest(model_name="m")
    ok.inputs.add(name="x", datatype="BYTES", shape=[n - 2]).contents.bytes_contents.extend(
        [chunk] * (n - 2)
    )
    (desc,), _ = _inputs(ok)
    assert desc["shape"] == [n - 2]


def test_json_and_typed_values_are_counted_before_they_are_decoded(monkeypatch: Any) -> None:
    """A value costs about a hundred bytes of Python objects while it is
    decoded, whatever its text: a licensed caller's 16 MiB of JSON "0,"
    values (16 KB gzipped) took the service up 1.4 GB. Both doors count a
    request's JSON or typed values before decoding one (here with the limit
    lowered to 1,000 for speed; the control: 1,000 values are taken)."""
    import json

    from worker.service.oip import grpc_door, inference_pb2, rest
    from worker.service.oip.door import DataPlane
    from worker.service.oip.rest import RestApp

    monkeypatch.setattr(rest, "MAX_DECODED_VALUES", 1000)
    monkeypatch.setattr(grpc_door, "MAX_DECODED_VALUES", 1000)

    class Service:
        def vet_now(self, token: Any, model: Any) -> bool:
            return True

        def submit(self, call: Any) -> None:
            call.reply({"ok": False, "error": {"code": "compute", "message": "ran"}}, ())

        def model_info(self, model: str) -> dict[str, Any]:
            return {"inputs": [], "outputs": []}

        def model_state(self, model: str) -> tuple[str, None]:
            return ("READY", None)

    app = RestApp(DataPlane(Service()), max_body=1 << 20)  # type: ignore[arg-type]

    def post(n: int) -> dict[str, Any]:
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [n],
                                       "data": [0] * n}]}).encode()  # fmt: skip
        sent, _ = _rest_infer(app, body, _stranger_token())
        return json.loads(sent[1]["body"])  # type: ignore[no-any-return]

    refused = post(1001)
    assert refused["code"] == "bad_input" and "binary data" in refused["error"], refused
    assert post(990)["code"] == "compute"  # decoded and posted to the service

    pb: Any = inference_pb2
    for n, taken in ((1001, False), (1000, True)):
        req = pb.ModelInferRequest(model_name="m")
        req.inputs.add(name="x", datatype="INT32", shape=[n]).contents.int_contents.extend([0] * n)
        if taken:
            (desc,), _ = grpc_door._inputs(req)
            assert desc["shape"] == [n]
        else:
            with pytest.raises(InputError, match="raw_input_contents"):
                grpc_door._inputs(req)


def test_a_clients_timeout_is_read_in_the_protocols_unit_microseconds() -> None:
    # tritonclient's infer(timeout=...) sends parameters["timeout"] in
    # microseconds (its docstring: "The timeout value for the request, in
    # microseconds"): 250000 is a quarter of a second, on both doors
    import asyncio
    import json

    from worker.service.oip import inference_pb2
    from worker.service.oip.door import DataPlane
    from worker.service.oip.grpc_door import InferenceServicer
    from worker.service.oip.rest import RestApp

    class Service:
        calls: list[Any] = []

        def vet_now(self, token: Any, model: Any) -> bool:
            return False  # nothing known fresh here: the door asks the loop (submit)

        def submit(self, call: Any) -> None:
            self.calls.append(call)
            call.reply({"ok": True, "tensors": []}, ())

        def model_info(self, model: str) -> dict[str, Any]:
            return {"inputs": [], "outputs": []}

        def model_state(self, model: str) -> tuple[str, None]:
            return ("READY", None)

    svc = Service()
    plane = DataPlane(svc)  # type: ignore[arg-type]
    token = _stranger_token()
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                       "parameters": {"timeout": 250000}}).encode()  # fmt: skip
    sent, _ = _rest_infer(RestApp(plane, max_body=1 << 20), body, token)
    assert sent[0]["status"] == 200, sent

    pb: Any = inference_pb2
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    req.parameters["timeout"].int64_param = 250000

    class Context:
        def invocation_metadata(self) -> list[tuple[str, str]]:
            return [("authorization", "Bearer " + token.decode())]

        def peer(self) -> str:
            return "ipv4:127.0.0.1:50000"

        async def read(self) -> bytes:
            return bytes(req.SerializeToString())

    asyncio.run(InferenceServicer(plane).ModelInfer(None, Context()))
    # each door had the token vetted (nothing read yet), then posted the call
    assert [(c.vet, c.timeout) for c in svc.calls] == [(True, None), (False, 0.25),
                                                        (True, None), (False, 0.25)]  # fmt: skip


def test_token_free_grpc_messages_are_read_one_per_address_and_four_at_once() -> None:
    """gRPC takes a message whole (up to the door's 1 GiB) before the door
    can look at it, and the calls that need no token take any stranger's:
    four 256 MiB ModelConfig messages took the service to 3.2 GB. Now the
    door reads such messages one per peer address and at most four at once
    (FREE_READS), each within FREE_READ_S, and answers them all."""
    import asyncio
    import collections

    from worker.service.oip import grpc_door
    from worker.service.oip.door import DataPlane
    from worker.service.oip.grpc_door import FREE_READS, InferenceServicer

    class Service:
        def model_state(self, model: str) -> Any:
            return ("READY", None)

        def model_signature(self, model: str) -> dict[str, Any]:
            return {"inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 4]}],
                    "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2]}]}  # fmt: skip

    reading: collections.Counter[str] = collections.Counter()
    most: collections.Counter[str] = collections.Counter()

    class Context:
        def __init__(self, address: str) -> None:
            self.address = address

        def peer(self) -> str:
            return f"ipv4:{self.address}:50000"

        async def read(self) -> bytes:
            for k in (self.address, "door"):
                reading[k] += 1
                most[k] = max(most[k], reading[k])
            await asyncio.sleep(0.05)  # a message arriving
            for k in (self.address, "door"):
                reading[k] -= 1
            return grpc_door.pb.ModelConfigRequest(name="m").SerializeToString()

    async def main() -> tuple[Any, list[Any]]:
        servicer = InferenceServicer(DataPlane(Service()))  # type: ignore[arg-type]
        calls = [Context("10.0.0.1") for _ in range(6)] + [Context(f"10.0.1.{i}") for i in range(8)]
        got = await asyncio.gather(*(servicer.free("ModelConfig", None, c) for c in calls))
        return servicer, got

    servicer, answers = asyncio.run(main())
    assert [a.config.name for a in answers] == ["m"] * 14
    assert [list(i.dims) for i in answers[0].config.input] == [[-1, 4]]
    assert most["10.0.0.1"] == 1 and most["door"] == FREE_READS == 4, most
    assert servicer._reading_from.keys == {} and servicer.peers.held == {}  # nothing kept after


def test_a_licences_grpc_messages_are_read_two_at_once_and_held_within_its_byte_budget() -> None:
    """gRPC's size of a message is known only once it is read whole, so a
    licence's ModelInfer messages are read at most two at once, and none
    starts while its requests being answered hold their budget of bytes
    (UNAVAILABLE, naming it); another licence's are read meanwhile."""
    import asyncio
    import collections

    from vault.core.token import mint_token
    from worker.service.oip import grpc_door
    from worker.service.oip.door import DataPlane, Gate
    from worker.service.oip.grpc_door import InferenceServicer

    answer = asyncio.Event()

    class Plane(DataPlane):
        async def vet(self, *a: Any, **k: Any) -> None:
            return None  # genuine and in force

        async def infer(self, *a: Any, **k: Any) -> Any:
            await answer.wait()  # the calls are being computed
            return [], []

    reading: collections.Counter[str] = collections.Counter()
    most: collections.Counter[str] = collections.Counter()
    req = grpc_door.pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="UINT8", shape=[60]).contents.uint_contents.extend([1] * 60)
    raw = req.SerializeToString()

    class Aborted(Exception):
        pass

    class Context:
        def __init__(self, token: str, who: str) -> None:
            self.token, self.who, self.status = token, who, None

        def invocation_metadata(self) -> list[tuple[str, str]]:
            return [("authorization", "Bearer " + self.token)]

        def peer(self) -> str:
            return "ipv4:10.0.0.9:50000"

        def set_trailing_metadata(self, md: Any) -> None:
            pass

        async def abort(self, code: Any, details: str) -> None:
            self.status = (code.name, details)
            raise Aborted()

        async def read(self) -> bytes:
            reading[self.who] += 1
            most[self.who] = max(most[self.who], reading[self.who])
            await asyncio.sleep(0.05)
            reading[self.who] -= 1
            return raw

    lic_a, lic_b = _licence("lic-a"), _licence("lic-b")
    a, b = mint_token(lic_a, models=["m"]), mint_token(lic_b, models=["m"])

    async def call(servicer: Any, ctx: Context) -> Any:
        try:
            return await servicer.ModelInfer(None, ctx)
        except Aborted:
            return ctx.status

    async def main() -> tuple[list[Any], list[Any], Any]:
        gate = Gate(64, bytes_per_licence=3 * len(raw))  # three messages' worth
        servicer = InferenceServicer(Plane(None), gate=gate)  # type: ignore[arg-type]
        first = [asyncio.ensure_future(call(servicer, Context(a, "a"))) for _ in range(3)]
        while gate.bytes_by_licence.get("lic-a", 0) < 3 * len(raw):
            await asyncio.sleep(0.01)  # alice's three are read and being computed
        refused = await call(servicer, Context(a, "a"))  # no room: refused unread
        other = asyncio.ensure_future(call(servicer, Context(b, "b")))
        while gate.bytes_by_licence.get("lic-b", 0) < len(raw):
            await asyncio.sleep(0.01)
        answer.set()
        done = await asyncio.gather(*first, other)
        return done, [refused], gate

    done, refused, gate = asyncio.run(main())
    assert refused[0][0] == "UNAVAILABLE" and "this licence's requests hold" in refused[0][1]
    assert all(r.model_name == "m" for r in done), done
    assert most["a"] == 2 and most["b"] == 1, most
    assert gate.bytes_by_licence == {}  # all given back once answered


def _licence(licence_id: str) -> Any:
    import base64

    from vault.core.crypto import PublisherKey
    from vault.core.licence import Licence

    return Licence(licence_id=licence_id, holder="shop", keyserver_address="tcp://127.0.0.1:1",
                   keyserver_public_key="k" * 40, client_public_key="a" * 40,
                   client_secret_key="s" * 40, kind="call",
                   proof_key=base64.b64encode(PublisherKey.generate().export_private_raw()).decode())  # fmt: skip


class _HeldService:
    """A service whose vetting never answers until told: requests pile up in
    a door as they would behind a slow key server."""

    def __init__(self) -> None:
        self.vets: list[Any] = []

    def vet_now(self, token: Any, model: Any) -> bool:
        return False  # nothing known fresh here: the door asks the loop (submit)

    def submit(self, call: Any) -> None:
        if call.vet:
            self.vets.append(call)
        else:
            call.reply({"ok": False, "error": {"code": "compute", "message": "x"}}, ())

    def model_state(self, model: str) -> tuple[str, None]:
        return ("READY", None)

    def model_info(self, model: str) -> dict[str, Any]:
        return {"inputs": [], "outputs": []}


def test_a_door_holds_a_bounded_number_of_requests_and_refuses_the_rest_typed() -> None:
    # REST and gRPC alike: past max_inflight requests held (here waiting for
    # their token to be vetted), the next is refused at once, 503 /
    # UNAVAILABLE with the vault's code and Retry-After, and nothing of it is
    # read; once the held ones are answered, the door takes requests again
    import asyncio
    import json

    import grpc

    from worker.service.oip.door import DataPlane, Gate
    from worker.service.oip.grpc_door import InferenceServicer
    from worker.service.oip.rest import RestApp

    svc = _HeldService()
    plane = DataPlane(svc)  # type: ignore[arg-type]
    app = RestApp(plane, max_body=1 << 20, max_inflight=2)
    token = _stranger_token()
    read: list[int] = []

    async def receive() -> dict[str, Any]:
        read.append(1)
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def post() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(m: dict[str, Any]) -> None:
            sent.append(m)

        scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer",
                 "headers": [(b"authorization", b"Bearer " + token)]}  # fmt: skip
        await app(scope, receive, send)
        return sent

    class Aborted(Exception):
        pass

    class Context:
        status: Any = None
        trailing: Any = None

        def invocation_metadata(self) -> list[tuple[str, str]]:
            return [("authorization", "Bearer " + token.decode())]

        def peer(self) -> str:
            return "ipv4:127.0.0.1:50000"

        def set_trailing_metadata(self, md: Any) -> None:
            self.trailing = dict(md)

        async def abort(self, code: Any, details: str) -> None:
            self.status = (code, details)
            raise Aborted()

        async def read(self) -> bytes:
            read.append(1)
            return b""

    async def main() -> None:
        held = [asyncio.ensure_future(post()) for _ in range(2)]
        while len(svc.vets) < 2:  # both wait on their vetting now
            await asyncio.sleep(0)
        sent = await post()
        head = dict(sent[0]["headers"])
        assert sent[0]["status"] == 503 and json.loads(sent[1]["body"])["code"] == "unavailable"
        assert head[b"retry-after"] == b"1" and head[b"connection"] == b"close"
        for call in svc.vets:  # the key server answers: refused (a stranger's token)
            call.reply({"ok": False, "error": {"code": "token_invalid", "message": "no"}}, ())
        assert [s[0]["status"] for s in await asyncio.gather(*held)] == [401, 401]
        again = asyncio.ensure_future(post())  # the door takes requests again
        while len(svc.vets) < 3:
            await asyncio.sleep(0)
        svc.vets[2].reply({"ok": False, "error": {"code": "token_invalid", "message": "no"}}, ())
        assert (await again)[0]["status"] == 401
        # gRPC: the same bound
        servicer = InferenceServicer(plane, gate=Gate(1))
        first = asyncio.ensure_future(servicer.ModelInfer(None, Context()))
        while len(svc.vets) < 4:
            await asyncio.sleep(0)
        ctx = Context()
        try:
            await servicer.ModelInfer(None, ctx)
        except Aborted:
            pass
        assert ctx.status[0] == grpc.StatusCode.UNAVAILABLE and "[unavailable]" in ctx.status[1]
        assert ctx.trailing == {"vault-error-code": "unavailable", "retry-after": "1"}
        first.cancel()

    asyncio.run(main())
    assert read == []  # not one request was read: each waited on its token, or was refused


def test_a_vetted_body_that_does_not_arrive_in_time_is_408_and_the_connection_closed() -> None:
    import asyncio

    from worker.service.oip.door import DataPlane
    from worker.service.oip.rest import RestApp

    class Service(_HeldService):
        def vet_now(self, token: Any, model: Any) -> bool:
            return False  # nothing known fresh here: the door asks the loop (submit)

        def submit(self, call: Any) -> None:
            call.reply({"ok": True}, ())  # the token holds

    app = RestApp(DataPlane(Service()), max_body=1 << 20, body_timeout=0.05)  # type: ignore[arg-type]
    never = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await never.wait()  # the client sent its headers and stopped
        raise AssertionError("unreachable")

    async def send(m: dict[str, Any]) -> None:
        sent.append(m)

    scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer",
             "headers": [(b"authorization", b"Bearer " + _stranger_token())]}  # fmt: skip
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]


def test_a_door_asks_the_loop_only_when_its_own_vetting_has_no_answer() -> None:
    # the door vets a token in its own thread (WorkerService.vet_now) and posts
    # EdgeCall(vet=True) into the service's loop only when that has no answer:
    # a token that holds costs no trip; one refused there is refused with the
    # same status as through the loop, its body unread and nothing posted; the
    # control: with no answer at hand the loop is asked, and its answer holds

    from vault.core.errors import LicenceRevokedError
    from worker.service.oip.door import DataPlane
    from worker.service.oip.rest import RestApp

    class Service:
        def __init__(self, answer: Any) -> None:
            self.answer, self.calls = answer, []  # type: ignore[var-annotated]

        def vet_now(self, token: Any, model: Any) -> bool:
            if isinstance(self.answer, Exception):
                raise self.answer
            return bool(self.answer)

        def submit(self, call: Any) -> None:
            self.calls.append(call.vet)
            if call.vet:
                call.reply({"ok": False, "error": LicenceRevokedError("revoked").to_wire()}, ())
            else:
                call.reply({"ok": True, "tensors": []}, ())

        def model_info(self, model: str) -> dict[str, Any]:
            return {"inputs": [], "outputs": []}

        def model_state(self, model: str) -> tuple[str, None]:
            return ("READY", None)

    def post(svc: Service) -> tuple[int, int]:
        body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}'
        app = RestApp(DataPlane(svc), max_body=1 << 20)  # type: ignore[arg-type]
        sent, unread = _rest_infer(app, body, _stranger_token())
        return sent[0]["status"], unread  # the status, and the body's messages left unread

    held = Service(True)
    assert post(held) == (200, 0) and held.calls == [False]  # no vetting trip: the call only
    refused = Service(LicenceRevokedError("licence lic-a is revoked"))
    assert post(refused) == (403, 1) and refused.calls == []
    unknown = Service(False)  # the control: the loop is asked, and refuses
    assert post(unknown) == (403, 1) and unknown.calls == [True]


def test_a_request_for_a_model_without_inputs_holds_none() -> None:
    """A model may take no inputs (vault.open and vault.connect run one): an
    empty list of inputs is a request, REST and gRPC alike; a missing list
    still is not, and a model with inputs then says which one is missing."""
    from worker.service.oip import grpc_door, rest

    assert rest._inputs([], memoryview(b""), 0) == ([], [])
    with pytest.raises(InputError, match="list of inputs"):
        rest._inputs(None, memoryview(b""), 0)
    with pytest.raises(InputError, match="belong to no input"):
        rest._inputs([], memoryview(b"\0" * 4), 4)
    assert grpc_door._inputs(ours.ModelInferRequest(model_name="m")) == ([], [])


def test_bytes_elements_are_counted_against_the_memory_rule_before_any_is_decoded() -> None:
    """The worker's rule (decoding at most 8x the request, or 64 MiB) on the
    declared BYTES element count: four million elements in 16 MiB are
    refused; as many in a request of 64 MiB pass, as do a few thousand in a
    small one, and numeric inputs never count."""
    from worker.service.oip import tensors as T

    n = 4 << 20
    with pytest.raises(InputError, match="4194304 BYTES elements"):
        T.check_strings([("s", "BYTES", [n])], 4 * n)
    with pytest.raises(InputError, match="BYTES elements"):  # split over two inputs: the same
        T.check_strings([("a", "BYTES", [n // 2]), ("b", "BYTES", [2, n // 4])], 4 * n)
    T.check_strings([("s", "BYTES", [n])], 64 * n)  # 15 bytes and more an element
    T.check_strings([("s", "BYTES", [4096])], 4 * 4096)  # under the 64 MiB floor
    T.check_strings([("x", "FP32", [n, 64])], 16)  # numeric: a view, nothing to bound
    with pytest.raises(InputError, match="'s'"):
        T.check_strings([("s", "BYTES", [-1])], 16)


def test_connections_are_counted_per_address_and_ipv6_per_64() -> None:
    from worker.service.calls import address_key

    assert address_key("203.0.113.7") == "203.0.113.7"
    assert address_key("127.0.0.2") != address_key("127.0.0.1")
    assert address_key("::ffff:203.0.113.7") == "203.0.113.7"  # IPv4-mapped
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_key("2001:db8:0:1::1") != address_key("2001:db8::1")
    assert address_key("[2001:db8::1%eth0]") == "2001:db8::/64"


def test_an_empty_outputs_list_asks_for_every_output_as_grpc_does() -> None:
    """REST `"outputs": []` answered with no outputs at all, gRPC's empty
    list with every one; both mean "none named: all" now."""
    from worker.service.oip.rest import _outputs

    for req in ({}, {"outputs": []}):
        names, binary = _outputs(req)
        assert names is None and binary("y") is False
    names, binary = _outputs({"outputs": [], "parameters": {"binary_data_output": True}})
    assert names is None and binary("y") is True
    names, _ = _outputs({"outputs": [{"name": "y"}]})
    assert names == ["y"]


def test_a_compressed_body_is_inflated_within_its_limit() -> None:
    import gzip
    import zlib

    from worker.service.oip.rest import _inflate

    body = b'{"inputs": []}' * 100
    assert _inflate(gzip.compress(body), b"gzip", 1 << 20) == body
    assert _inflate(zlib.compress(body), b"deflate", 1 << 20) == body  # zlib's format
    raw = zlib.compressobj(wbits=-15)
    assert _inflate(raw.compress(body) + raw.flush(), b"deflate", 1 << 20) == body
    with pytest.raises(ProtocolError, match="once decompressed"):
        _inflate(gzip.compress(bytes(10 << 20)), b"gzip", 1 << 20)
    with pytest.raises(InputError, match="ends before"):
        _inflate(gzip.compress(body)[:-12], b"gzip", 1 << 20)
    with pytest.raises(InputError, match="not valid gzip"):
        _inflate(b"not gzip at all", b"gzip", 1 << 20)


def test_a_door_without_a_licence_share_is_held_by_one_licence() -> None:
    """The gate's share: a licence holds at most a quarter of a door's slots
    (16 of 64), the others' calls still get in. Control: without the share
    (one licence may hold them all), one licence's 64 shut the door."""
    from vault.core.errors import ServiceUnavailableError
    from worker.service.oip.door import Gate

    kept: list[Any] = []  # the held requests (a share is given back when its holder goes)

    def fill(gate: Gate) -> int:
        held = 0
        for _ in range(gate.limit):
            gate.__enter__()
            cm = gate.licence("alice")
            try:
                cm.__enter__()
                kept.append(cm)
                held += 1
            except ServiceUnavailableError:
                gate.__exit__()
        return held

    gate = Gate(64)
    assert fill(gate) == 16
    gate.__enter__()  # bob gets a slot
    with gate.licence("bob"):
        pass
    control = Gate(64)
    control.per_licence = 64
    assert fill(control) == 64
    with pytest.raises(ServiceUnavailableError):
        control.__enter__()  # bob is shut out


def test_an_idle_stream_and_one_whose_answers_are_not_taken_are_ended() -> None:
    """A ModelStreamInfer stream holds a door's request, its licence's share
    and its address's call while open: one that sends no request for
    ``body_timeout`` is ended (INVALID_ARGUMENT, saying so), and so is one
    whose caller does not take an answer. Here ``body_timeout`` is 0.05 s."""
    import asyncio

    import grpc

    from worker.service.oip import inference_pb2
    from worker.service.oip.door import DataPlane
    from worker.service.oip.grpc_door import InferenceServicer

    pb: Any = inference_pb2

    class Service(_HeldService):
        def submit(self, call: Any) -> None:
            if call.vet:
                call.reply({"ok": True}, ())  # the token holds
            else:  # a compute: answered with no outputs
                call.reply({"ok": True, "tensors": []}, ())

    token = _stranger_token().decode()

    class Aborted(Exception):
        pass

    class Context:
        def __init__(self, messages: list[bytes], take: bool) -> None:
            self.messages, self.take, self.status = messages, take, None

        def invocation_metadata(self) -> list[tuple[str, str]]:
            return [("authorization", "Bearer " + token)]

        def peer(self) -> str:
            return "ipv4:127.0.0.1:50000"

        def set_trailing_metadata(self, md: Any) -> None:
            pass

        async def abort(self, code: Any, details: str) -> None:
            self.status = (code, details)
            raise Aborted()

        async def read(self) -> bytes:
            if self.messages:
                return self.messages.pop(0)
            await asyncio.Event().wait()  # a caller that sends nothing more
            raise AssertionError("unreachable")

        async def write(self, answer: Any) -> None:
            if not self.take:
                await asyncio.Event().wait()  # a caller that never reads its answers

    async def run(ctx: Context) -> None:
        servicer = InferenceServicer(DataPlane(Service()), body_timeout=0.05)  # type: ignore[arg-type]
        try:
            await servicer.ModelStreamInfer(None, ctx)
        except Aborted:
            pass
        assert servicer.gate.held == 0 and not servicer._streams  # all given back

    idle = Context([], take=True)
    asyncio.run(run(idle))
    assert idle.status is not None and idle.status[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "no request on this stream for 0.05 s" in idle.status[1]
    request = pb.ModelInferRequest(model_name="m").SerializeToString()
    unread = Context([request], take=False)
    asyncio.run(run(unread))
    assert unread.status is not None and unread.status[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "not taken within 0.05 s" in unread.status[1]


async def _until(cond: Any, what: str, timeout: float = 60.0) -> None:
    """Let the loop run until ``cond()`` holds; an AssertionError naming
    ``what`` past ``timeout`` (generous: a loaded machine is slow, not wrong)."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.005)


def _joined(sent: list[dict[str, Any]]) -> bytes:
    """An ASGI response's body, over all its messages (a large answer goes
    out in slices, its last ``more_body`` false)."""
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert not bodies[-1].get("more_body") and all(m.get("more_body") for m in bodies[:-1])
    return b"".join(bytes(m["body"]) for m in bodies)


def _body(sent: list[dict[str, Any]]) -> int:
    """How many bytes an ASGI response's body holds (:func:`_joined`)."""
    return len(_joined(sent))


class _Transport:
    """What uvicorn's HTTP protocol writes to and closes (no socket)."""

    def __init__(self) -> None:
        self.out = b""
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.9", 5555), "sockname": ("127.0.0.1", 80)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closing = True

    abort = close

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, *a: Any, **kw: Any) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def test_a_request_head_is_bounded_in_size_where_uvicorns_grows_without_end() -> None:
    """A stranger with no token streamed 8 KB header lines for the head's
    whole deadline without ending the head: uvicorn's protocol kept every
    line (httptools sets no limit) and a service went from 78 MB to 5.5 GB.
    The door's protocol answers 431 past 64 KiB and closes the connection,
    holding nothing of it (control: uvicorn's own, fed the same bytes, holds
    all 1.6 MB and stays open); a head under the bound, and a head sent in
    one read with a large body, are not touched."""
    import asyncio

    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from worker.service.oip.httpconn import DEFAULT_MAX_HEAD, bounded_protocol

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    line = b"X-Junk: " + b"a" * 8000 + b"\r\n"

    async def flood(cls: type[Any]) -> tuple[bool, bytes, int, int]:
        config = uvicorn.Config(app, http="httptools", lifespan="off")
        config.load()
        proto = cls(config=config, server_state=ServerState(), app_state={})
        t = _Transport()
        proto.connection_made(t)
        proto.data_received(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        while sent < 200 and not t.is_closing():
            proto.data_received(line)
            sent += 1
        held = len(proto.url) + sum(len(n) + len(v) for n, v in proto.headers)
        closed = t.is_closing()
        proto.connection_lost(None)
        return closed, t.out, sent, held

    async def served(cls: type[Any], head_bytes: int, body: int) -> bytes:
        config = uvicorn.Config(app, http="httptools", lifespan="off")
        config.load()
        proto = cls(config=config, server_state=ServerState(), app_state={})
        t = _Transport()
        proto.connection_made(t)
        junk = b"X-Junk: " + b"a" * head_bytes + b"\r\n"
        proto.data_received(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n" + junk
                            + b"Content-Length: %d\r\n\r\n" % body + bytes(body))  # fmt: skip
        await _until(lambda: t.out, "the app's task answered")  # on the loop
        proto.connection_lost(None)
        return t.out

    async def main() -> None:
        closed, out, sent, held = await flood(HttpToolsProtocol)  # the control: no bound
        assert not closed and sent == 200 and held > 1_500_000
        closed, out, sent, held = await flood(bounded_protocol(10.0, 64))
        assert closed and out.startswith(b"HTTP/1.1 431 Request Header Fields Too Large")
        assert b"65536 bytes" in out
        assert sent <= DEFAULT_MAX_HEAD // len(line) + 1 and held == 0
        ok = bounded_protocol(10.0, 64)
        assert (await served(ok, 60_000, 0)).startswith(b"HTTP/1.1 200")
        assert (await served(ok, 100, 4 << 20)).startswith(b"HTTP/1.1 200")  # the body is not head
        assert (await served(ok, 70_000, 0)).startswith(b"HTTP/1.1 431")

    asyncio.run(main())


def test_a_large_json_answer_is_refused_or_written_off_the_event_loop() -> None:
    """A licensed caller asked for an 82 MB output as JSON (the default): the
    door wrote 401 MB of JSON on its event loop, every tenant's REST calls
    held for 11.6 s, the service 880 MB -> 2.2 GB. Now an answer of more
    JSON values than a request may hold (4 Mi) is refused, saying to ask for
    binary outputs, which still pass; a large one under it is written in a
    thread: the loop ticks while it is written (control: written on the loop,
    it cannot tick once)."""
    import asyncio
    import json

    from worker.service.oip.door import DataPlane
    from worker.service.oip.rest import MAX_JSON_OUT_VALUES, RestApp, _encode_answer

    app = RestApp(DataPlane(object()), max_body=1 << 30)  # type: ignore[arg-type]
    big = np.arange(MAX_JSON_OUT_VALUES + 1, dtype=np.float32)
    mid = np.arange(2_000_000, dtype=np.float32)

    def desc(a: np.ndarray) -> dict[str, Any]:
        return {"name": "y", "dtype": "float32", "shape": list(a.shape)}

    async def ticking(work: Any) -> int:
        """How often the loop ran another task while ``work`` (a coroutine) ran."""
        ticks, done = 0, False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                await asyncio.sleep(0)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        start = ticks
        try:
            await work
            end = ticks
        finally:
            done = True
            await t
        return end - start

    async def answer(a: np.ndarray, binary: bool) -> tuple[list[Any], int]:
        sent: list[Any] = []

        async def send(msg: Any) -> None:
            sent.append(msg)

        ticks = await ticking(
            app._answer(send, "m", None, [desc(a)], [a.tobytes()], lambda _n: binary)
        )
        return sent, ticks

    async def on_the_loop() -> None:
        _encode_answer("m", None, [desc(mid)], [mid.tobytes()], lambda _n: False)

    async def main() -> None:
        with pytest.raises(InputError, match="binary outputs") as err:
            await answer(big, False)
        assert "4194305 values" in str(err.value) and "served and counts" in str(err.value)
        sent, _ = await answer(big, True)  # as binary data: no limit beyond the body's
        assert sent[0]["status"] == 200 and _body(sent) > big.nbytes
        sent, ticks = await answer(mid, False)
        body = json.loads(_joined(sent))
        assert body["outputs"][0]["data"] == mid.tolist()
        assert ticks > 1, ticks  # the loop served others meanwhile
        from vault.core.protocol import encode_tensors

        sent: list[Any] = []

        async def send(msg: Any) -> None:
            sent.append(msg)

        # one 30 MB string of control characters: one value, but 180 MB of JSON
        descs, frames = encode_tensors({"y": np.array(["\x01" * 30_000_000], object)})
        with pytest.raises(InputError, match="bytes of JSON text") as err:
            await ticking(app._answer(send, "m", None, descs, frames, lambda _n: False))
        assert "binary outputs" in str(err.value)
        await ticking(app._answer(send, "m", None, descs, frames, lambda _n: True))
        starts = [m for m in sent if m["type"] == "http.response.start"]
        assert starts[-1]["status"] == 200  # as binary data it goes
        # one 8 MB string: one value, as slow to write as many
        descs, frames = encode_tensors({"y": np.array(["é" * 4_000_000], object)})
        sent.clear()
        ticks = await ticking(app._answer(send, "m", None, descs, frames, lambda _n: False))
        assert json.loads(_joined(sent))["outputs"][0]["data"] == ["é" * 4_000_000]
        assert ticks > 1, ticks
        # the control: the same answer written on the loop lets nothing else run
        assert await ticking(on_the_loop()) == 0

    asyncio.run(main())


def test_a_pipelined_requests_head_is_bounded_while_the_one_before_it_is_served() -> None:
    """The head bound counted only while no request was in flight: a caller
    whose first request was being served streamed the next request's head
    as one header line that never ended, and httptools kept every byte of
    it. It is counted from the moment that head begins."""
    import asyncio

    import uvicorn
    from uvicorn.server import ServerState

    from worker.service.oip.httpconn import bounded_protocol

    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()  # the first request is still being served
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> None:
        config = uvicorn.Config(app, http="httptools", lifespan="off")
        config.load()
        proto = bounded_protocol(10.0, 64)(config=config, server_state=ServerState(),
                                           app_state={})  # fmt: skip
        t = _Transport()
        proto.connection_made(t)
        proto.data_received(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0)  # its task starts, and waits
        proto.data_received(b"GET /v2/health/live HTTP/1.1\r\nX-Junk: ")
        sent = 0
        while sent < 400 and not t.is_closing():
            proto.data_received(b"a" * 4096)  # one header value that never ends
            sent += 1
        closed = t.is_closing()
        release.set()
        proto.connection_lost(None)
        assert closed and sent <= 20, sent  # 64 KiB and a read: refused

    asyncio.run(main())


def test_a_chunked_bodys_endless_trailer_is_bounded_where_uvicorns_grows() -> None:
    """A chunked body's trailer is header lines again, which httptools holds
    until each ends: after the head was counted, a stranger's GET (answered
    at once) with a trailer line that never ended grew the door by 150 MB
    from two connections and held its event loop for seconds. Reads that
    carry no body byte now count; the connection is closed past 64 KiB of
    them (control: uvicorn's own protocol keeps it all); a chunked body that
    keeps coming is not touched."""
    import asyncio

    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from worker.service.oip.httpconn import bounded_protocol

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def feed(cls: type[Any], tail: bytes) -> tuple[bool, int]:
        config = uvicorn.Config(app, http="httptools", lifespan="off")
        config.load()
        proto = cls(config=config, server_state=ServerState(), app_state={})
        t = _Transport()
        proto.connection_made(t)
        proto.data_received(b"POST /v2/health/live HTTP/1.1\r\nHost: x\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n")  # fmt: skip
        await _until(lambda: t.out, "the request answered")  # at once, its body unread
        proto.data_received(tail)
        sent = 0
        while sent < 300 and not t.is_closing():
            proto.data_received(b"a" * 4096 if tail.endswith(b": ") else b"1000\r\n" +
                                b"a" * 4096 + b"\r\n")  # fmt: skip
            sent += 1
        closed = t.is_closing()
        proto.connection_lost(None)
        return closed, sent

    async def main() -> None:
        trailer = b"0\r\nx-a: "  # the last chunk, then one trailer line that never ends
        assert await feed(HttpToolsProtocol, trailer) == (False, 300)  # the control
        closed, sent = await feed(bounded_protocol(10.0, 64), trailer)
        assert closed and sent <= 17, sent
        # 1.2 MB of chunks that keep coming: not a trailer, not closed
        assert await feed(bounded_protocol(10.0, 64), b"") == (False, 300)

    asyncio.run(main())


def test_a_json_answer_is_written_in_slices_that_let_other_threads_run() -> None:
    """Written in a thread, a JSON answer still held the interpreter's lock
    throughout (one json.dumps of 4 Mi floats: 2.4 s in which no other
    thread of the service, no door and no caller, ran). Written in slices,
    another thread runs between them: its longest wait is a small part of
    the writing (control: one slice for all, the wait is most of it); the
    text is the same JSON either way."""
    import json
    import threading
    import time

    from vault.core.protocol import encode_tensors
    from worker.service.oip import tensors as T

    a = np.random.default_rng(0).random(3_000_000).astype(np.float32)
    a[7] = np.nan
    descs, frames = encode_tensors({"y": a})

    def longest_wait(per: int) -> tuple[float, float, str]:
        gaps: list[float] = []
        stop, started = threading.Event(), threading.Event()

        def other() -> None:  # wakes every 2 ms: how long it waited each time
            last = time.monotonic()
            while not stop.wait(0.002):
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                started.set()

        t = threading.Thread(target=other)
        t.start()
        assert started.wait(30)
        t0 = time.monotonic()
        text = T.to_json_text(descs[0], frames[0], per=per)[3]
        took = time.monotonic() - t0
        stop.set()
        t.join()
        return max(gaps), took, text

    wait, took, sliced = longest_wait(1 << 14)
    assert wait < took / 4, (wait, took)
    wait_whole, took_whole, whole = longest_wait(1 << 40)  # the control
    assert wait_whole > took_whole / 2, (wait_whole, took_whole)
    assert sliced == whole
    assert json.loads(sliced)[:8][:7] == a[:7].tolist() and "NaN" in sliced[:200]


@pytest.mark.parametrize("watched", [True, False], ids=["watched", "control"])
def test_a_queued_json_answer_whose_client_left_is_not_written(
    monkeypatch: pytest.MonkeyPatch, watched: bool
) -> None:
    """Four of mal's large JSON answers queue behind his first (a licence's
    are encoded one at a time); the clients of the last three go away while
    they wait. Each was still encoded and held in full for a connection
    nobody read: now one whose client has gone leaves the queue at once, and
    is not encoded, written or counted against the licence's share (its call
    was served and counts). Control: a door that does not watch the connection (no
    ``receive``) encodes all four."""
    import asyncio
    import threading

    from vault.core.protocol import encode_tensors
    from worker.service.oip import rest
    from worker.service.oip.door import DataPlane

    descs, frames = encode_tensors({"y": np.arange(300_000, dtype=np.float32)})
    encoded: list[int] = []
    first_held = threading.Event()
    real = rest._encode_answer

    def encode(*args: Any) -> Any:
        encoded.append(1)
        if len(encoded) == 1:
            first_held.wait(30)  # the first answer holds mal's turn
        return real(*args)

    monkeypatch.setattr(rest, "_encode_answer", encode)

    async def main() -> tuple[list[list[Any]], Any]:
        app = rest.RestApp(DataPlane(object()), max_body=1 << 30)  # type: ignore[arg-type]
        left = asyncio.Event()
        sent: list[list[Any]] = [[] for _ in range(4)]
        closed: list[int] = []

        def client(i: int) -> tuple[Any, Any]:
            async def send(msg: Any) -> None:
                sent[i].append(msg)

            async def receive() -> Any:
                if i == 0:  # the first client stays
                    await asyncio.Event().wait()
                await left.wait()
                closed.append(i)
                return {"type": "http.disconnect"}

            return send, (receive if watched else None)

        tasks = []
        for i in range(4):
            send, receive = client(i)
            tasks.append(asyncio.ensure_future(app._answer(
                send, "m", None, descs, frames, lambda _n: False, licence="mal",
                receive=receive)))  # fmt: skip
            await _until(lambda: encoded, "the first answer being encoded")
        await _until(lambda: app._json_out_by["mal"][1] == 4, "all four queued")
        left.set()
        if watched:
            # they leave the queue at once, not at their turn
            await _until(lambda: all(t.done() for t in tasks[1:]), "the three gone answers over")
            assert len(closed) == 3 and not tasks[0].done()
        first_held.set()
        await asyncio.gather(*tasks)
        return sent, app.gate.bytes_by_licence

    sent, held = asyncio.run(main())
    assert sent[0] and sent[0][0]["status"] == 200  # the client that stayed is answered
    assert not held  # nothing left counted against mal's share
    if watched:
        assert len(encoded) == 1 and not any(sent[1:]), (len(encoded), sent[1:])
    else:
        assert len(encoded) == 4 and all(sent[1:])


def test_an_answer_is_compressed_as_the_client_accepts() -> None:
    """tritonclient's response_compression_algorithm (Accept-Encoding: gzip
    or deflate) had no effect: no answer was ever compressed, where Triton
    compresses them. Now an answer of 1 KiB or more is sent as the client
    accepts, JSON or binary (a large one compressed off the event loop), its
    Inference-Header-Content-Length the uncompressed JSON's; ``q=0`` refuses
    an encoding; without Accept-Encoding the answer is plain (the control)."""
    import asyncio
    import gzip
    import json
    import zlib

    from vault.core.protocol import encode_tensors
    from worker.service.oip.door import DataPlane
    from worker.service.oip.rest import RestApp, _accepted

    def scope(value: bytes) -> dict[str, Any]:
        return {"headers": [(b"accept-encoding", value)]}

    assert _accepted(scope(b"gzip")) == "gzip"
    assert _accepted(scope(b"deflate, gzip;q=0")) == "deflate"
    assert _accepted(scope(b"br")) is None and _accepted({"headers": []}) is None
    a = np.arange(100_000, dtype=np.float32)
    descs, frames = encode_tensors({"y": a})
    app = RestApp(DataPlane(object()), max_body=1 << 30)  # type: ignore[arg-type]

    def answer(binary: bool, accept: str | None) -> tuple[dict[bytes, bytes], bytes]:
        sent: list[dict[str, Any]] = []

        async def send(msg: dict[str, Any]) -> None:
            sent.append(msg)

        asyncio.run(app._answer(send, "m", "r1", descs, frames, lambda _n: binary,
                                licence="alice", accept=accept))  # fmt: skip
        return dict(sent[0]["headers"]), b"".join(bytes(m["body"]) for m in sent[1:])

    for binary in (False, True):
        plain_headers, plain = answer(binary, None)
        assert b"content-encoding" not in plain_headers
        for accept, inflate in (("gzip", gzip.decompress), ("deflate", zlib.decompress)):
            headers, body = answer(binary, accept)
            assert headers[b"content-encoding"] == accept.encode()
            assert len(body) < len(plain) // 2  # 400 KB of float32 counting up
            assert inflate(body) == plain
            assert headers.get(b"inference-header-content-length") == plain_headers.get(
                b"inference-header-content-length")  # fmt: skip
        if binary:
            n = int(plain_headers[b"inference-header-content-length"])
            np.testing.assert_array_equal(np.frombuffer(plain[n:], np.float32), a)
        else:
            assert json.loads(plain)["outputs"][0]["data"][:3] == [0.0, 1.0, 2.0]


def test_large_json_answers_queue_per_licence_and_count_until_read() -> None:
    """One licence's large JSON answers once queued every other licence's
    behind them (a victim waited 32 s) and held their text until read (40
    answers nobody read: 3.4 GB). A licence now writes one at a time in a
    queue of its own, two licences' at once: alice's answer, asked after
    four of mal's, is not written after all of them (control: one queue for
    all, it comes last). And an answer's bytes count against its licence's
    share of the door until its client has read them: the licence's next
    request finds no room meanwhile (the answer itself is never refused)."""
    import asyncio

    from vault.core.errors import ServiceUnavailableError
    from vault.core.protocol import encode_tensors
    from worker.service.oip.door import DataPlane
    from worker.service.oip.rest import RestApp, _encode_answer

    a = np.arange(300_000, dtype=np.float32)
    descs, frames = encode_tensors({"y": a})

    async def order(app: Any) -> list[str]:
        done: list[str] = []
        asked: list[str] = []

        async def one(who: str) -> None:
            async def send(msg: Any) -> None:
                pass

            asked.append(who)
            await app._answer(send, "m", None, descs, frames, lambda _n: False, licence=who)
            done.append(who)

        mals = [asyncio.ensure_future(one("mal")) for _ in range(4)]
        # each is queued in the same step that counts it asked
        await _until(lambda: asked.count("mal") == 4, "all four of mal's asked first")
        await asyncio.gather(*mals, one("alice"))
        return done

    async def main() -> None:
        done = await order(RestApp(DataPlane(object()), max_body=1 << 30))  # type: ignore[arg-type]
        assert done.index("alice") <= 1, done
        shared = [asyncio.Semaphore(1), 0]

        class OneQueue(dict):  # type: ignore[type-arg]
            def setdefault(self, key: Any, default: Any = None) -> Any:
                return shared

        one_queue = RestApp(DataPlane(object()), max_body=1 << 30)  # type: ignore[arg-type]
        one_queue._json_out_by = OneQueue()
        assert (await order(one_queue))[-1] == "alice"  # the control: one queue for all

        # unread answers: each held until its client reads it, within the share
        size = len(_encode_answer("m", None, descs, frames, lambda _n: False)[1])
        small = RestApp(DataPlane(object()), max_body=size * 3 // 2)  # type: ignore[arg-type]
        unread = asyncio.Event()

        async def never_read(msg: Any) -> None:
            if msg.get("type") == "http.response.body":
                await unread.wait()

        first = asyncio.ensure_future(small._answer(never_read, "m", None, descs, frames,
                                                    lambda _n: False, licence="mal"))  # fmt: skip
        await _until(lambda: small.gate.bytes_by_licence.get("mal"), "mal's answer held")
        # the licence's next request's body finds no room while it is unread (an
        # answer itself is never refused: its call is served and counts)
        with pytest.raises(ServiceUnavailableError):
            small.gate.take_bytes("mal", size)
        small.gate.take_bytes("alice", size)  # another licence's share is its own
        small.gate.give_bytes("alice", size)
        unread.set()
        await first
        assert not small.gate.bytes_by_licence  # all given back once read

    asyncio.run(main())


class _BigAnswers:
    """A service whose every call is answered with one float32 output of
    ``values`` (8 MiB by default)."""

    def __init__(self, values: int = 2 << 20) -> None:
        self.computed = 0
        self.values = values

    def vet_now(self, token: Any, model: Any) -> bool:
        return True

    def model_state(self, model: str) -> tuple[str, None]:
        return ("READY", None)

    def model_info(self, model: str) -> dict[str, Any]:
        return {"inputs": [{"name": "x", "dtype": "float32", "shape": [1]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": [None]}]}  # fmt: skip

    def submit(self, call: Any) -> None:
        from vault.core.protocol import encode_tensors

        self.computed += 1
        descs, frames = encode_tensors({"y": np.ones(self.values, np.float32)})
        call.reply({"ok": True, "tensors": descs}, frames)


def test_unread_answers_count_against_their_licence_and_are_not_copied(monkeypatch: Any) -> None:
    """A REST answer was not counted against anything while its client left
    it unread, and it was held twice (the outputs, and a body joined from
    them): eight calls of one token whose 524 MB answers nobody read held
    9.3 GB. Now an answer counts against its licence's bytes at the door
    until written, and room for the next is reserved before a call is
    computed (as large as the licence's largest answer from the model): with
    a 20 MiB budget, mal's third call finds no room while two 8 MiB answers
    wait unread, and is refused before it is computed; alice's is served.
    The control, with nothing counted: mal's calls are all computed. The
    body goes out as the output's own buffer, in slices."""
    import asyncio

    from vault.core.token import mint_token
    from worker.service.oip import rest
    from worker.service.oip.door import DataPlane, Gate
    from worker.service.oip.rest import RestApp

    body = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
                       "parameters": {"binary_data_output": True}}).encode()  # fmt: skip
    tokens = {who: mint_token(_licence(f"lic-{who}"), models=["m"]).encode()
              for who in ("mal", "alice")}  # fmt: skip
    monkeypatch.setattr(rest, "_SEND_SLICE", 1 << 20)

    async def call(app: Any, who: str, read: asyncio.Event | None) -> list[dict[str, Any]]:
        msgs = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if msgs:
                return msgs.pop(0)
            await asyncio.Event().wait()  # the client neither sends nor leaves
            raise AssertionError

        async def send(m: dict[str, Any]) -> None:
            if m["type"] == "http.response.body" and read is not None:
                await read.wait()  # the client does not read its answer
            sent.append(m)

        scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer",
                 "raw_path": b"/v2/models/m/infer",
                 "headers": [(b"authorization", b"Bearer " + tokens[who])]}  # fmt: skip
        await app(scope, receive, send)
        return sent

    async def attack(app: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        read = asyncio.Event()
        held = [asyncio.ensure_future(call(app, "mal", read)) for _ in range(2)]
        await _until(lambda: app.gate.bytes_by_licence.get("lic-mal", 0) >= 16 << 20,
                     "mal's two answers held unread")  # fmt: skip
        third = await call(app, "mal", None)
        served = await call(app, "alice", None)
        read.set()
        await asyncio.gather(*held)
        return third, served

    def app_with(service: Any, **kw: Any) -> Any:  # a door of two requests at once
        return RestApp(DataPlane(service), max_body=20 << 20, max_inflight=2, **kw)

    service = _BigAnswers()
    app = app_with(service)
    third, served = asyncio.run(attack(app))
    assert third[0]["status"] == 503 and service.computed == 3, third  # refused, not computed
    assert b"hold" in third[-1]["body"]
    # answers being written hold none of the door's two requests: alice is served
    assert served[0]["status"] == 200
    pieces = [m["body"] for m in served[1:]]
    assert max(len(p) for p in pieces) <= 1 << 20 and sum(len(p) for p in pieces) > 8 << 20
    assert not app.gate.bytes_by_licence  # every byte given back once written

    # a client that takes nothing of its answer within the door's deadline is dropped
    async def dropped() -> Any:
        app = app_with(_BigAnswers(), body_timeout=0.2)
        sent = await call(app, "mal", asyncio.Event())  # never read
        return sent, app.gate

    sent, gate = asyncio.run(dropped())
    assert [m["type"] for m in sent] == ["http.response.start"]  # incomplete: dropped
    assert not gate.bytes_by_licence and gate.held == 0

    # the control: answers not counted, nothing reserved
    monkeypatch.setattr(Gate, "reserve_answer", lambda self, *a: 0)
    monkeypatch.setattr(Gate, "answer_arrived", lambda self, *a: None)
    monkeypatch.setattr(Gate, "give_answer", lambda self, *a: None)
    service = _BigAnswers()

    async def control() -> int:
        app = app_with(service)
        read = asyncio.Event()
        held = [asyncio.ensure_future(call(app, "mal", read)) for _ in range(2)]
        await _until(lambda: service.computed == 2, "mal's two calls computed")
        third = await call(app, "mal", None)
        read.set()
        await asyncio.gather(*held)
        return int(third[0]["status"])

    assert asyncio.run(control()) == 200 and service.computed == 3


def test_a_licences_large_json_requests_are_decoded_in_turn(monkeypatch: Any) -> None:
    """Decoding JSON holds the GIL: one token's 64 requests of 8 KB that gzip
    inflated to 4M values each were decoded side by side on the door's loop
    and held alice's calls up to 8.9 s. A licence's large JSON parts now wait
    their turn, one at a time, after what is ready on the loop: alice's
    request, sent after mal's eight, is decoded after at most one of them.
    The control, with no turns: after all eight."""
    import asyncio

    from vault.core.token import mint_token
    from worker.service.oip import rest
    from worker.service.oip.door import DataPlane
    from worker.service.oip.rest import RestApp

    def body(n: int) -> bytes:  # n values for an [1, 1] input: refused once decoded
        return json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32",
                                       "data": [0.5] * n}]}).encode()  # fmt: skip

    tokens = {who: mint_token(_licence(f"lic-{who}"), models=["m"]).encode()
              for who in ("mal", "alice", "m1", "m2", "m3", "m4")}  # fmt: skip
    decoded: list[int] = []
    real = rest._decoded

    def counting(head: bytes, *a: Any) -> Any:
        try:
            return real(head, *a)
        finally:
            decoded.append(len(head))

    monkeypatch.setattr(rest, "_decoded", counting)

    async def run(mals: tuple[str, ...] = ("mal",)) -> int:
        app = RestApp(DataPlane(_BigAnswers(1)), max_body=64 << 20)
        order: list[str] = []

        async def call(who: str, data: bytes) -> None:
            await _asgi_on_loop(app, "POST", "/v2/models/m/infer",
                                [(b"authorization", b"Bearer " + tokens[who])], data)  # fmt: skip
            order.append(who)

        big, small = body(100_000), body(1)
        tasks = [asyncio.ensure_future(call(mals[i % len(mals)], big)) for i in range(8)]
        tasks.append(asyncio.ensure_future(call("alice", small)))
        await asyncio.gather(*tasks)
        return order.index("alice")

    decoded.clear()
    assert asyncio.run(run()) <= 1, decoded
    assert asyncio.run(run(("m1", "m2", "m3", "m4"))) <= 1  # four licences: the door's turn
    monkeypatch.setattr(rest, "_DECODE_INLINE", 1 << 30)  # the control: no turns
    assert asyncio.run(run()) == 8


def test_an_answers_reservation_scales_with_the_requests_rows_and_forgets() -> None:
    """Room for a call's answer is reserved per row of its request: a
    licence that learned its answer size on one row and then asks for many
    reserves for many (at most its whole budget); one large answer
    is halved at each smaller one after it, so it does not hold the licence
    down for good; another licence's reservations are its own."""
    from vault.core.errors import ServiceUnavailableError
    from worker.service.oip.door import Gate

    gate = Gate(64, bytes_per_licence=64 << 20)
    assert gate.reserve_answer("a", "m", rows=1) == 0  # nothing learned yet
    gate.answer_arrived("a", "m", 0, 1 << 20, rows=1)  # 1 MiB a row, unread
    assert gate.reserve_answer("a", "m", rows=8) == 8 << 20
    with pytest.raises(ServiceUnavailableError):  # 1000 MiB, capped at 64: 9 held, no room
        gate.reserve_answer("a", "m", rows=1000)
    assert gate.reserve_answer("b", "m", rows=1000) == 0  # b learned nothing
    gate.give_answer("a", 8 << 20)
    gate.give_answer("a", 1 << 20)  # the answer written
    assert not gate.bytes_by_licence.get("a")
    for _ in range(4):  # small answers after the large one: it fades
        gate.answer_arrived("a", "m", gate.reserve_answer("a", "m"), 1 << 10)
        gate.give_answer("a", 1 << 10)
    assert gate.reserve_answer("a", "m", rows=1) == 64 << 10  # 1 MiB / 2**4
    gate.give_answer("a", 64 << 10)
    # unread answers filling the budget: the next call is refused before it runs
    gate.answer_arrived("a", "m", 0, 64 << 20)
    with pytest.raises(
        ServiceUnavailableError, match="being computed or not yet read, hold 64 MiB"
    ):
        gate.reserve_answer("a", "m")


def test_a_licences_first_call_of_a_model_is_computed_alone() -> None:
    """Nothing tells the size of an answer before one has come: sixteen
    concurrent first calls of one licence, whose 524 MB answers nobody read,
    held 8.4 GB against its 1 GiB. The first call of a (licence, model) is
    computed alone; the licence's others of that model wait for its answer
    and then reserve what it took (another licence's do not wait)."""
    import asyncio

    from vault.core.errors import ServiceUnavailableError
    from worker.service.oip.door import Gate

    gate = Gate(64, bytes_per_licence=100)
    events: list[str] = []
    answer = asyncio.Event()

    async def call(who: str, lic: str, size: int) -> None:
        async with gate.answer_room(lic, "m", 1, wait=30) as room:
            events.append(f"{who} computes, {room.reserved} reserved")
            if who == "first":
                await answer.wait()
            room.arrived([bytes(size)])

    async def main() -> None:
        first = asyncio.ensure_future(call("first", "a", 60))
        await _until(lambda: events, "the first call computes")
        second = asyncio.ensure_future(call("second", "a", 60))
        other = asyncio.ensure_future(call("other", "b", 60))
        await _until(lambda: len(events) == 2, "b's call computes")
        assert events[1] == "other computes, 0 reserved"  # b's own first call: not held up
        answer.set()
        await asyncio.gather(first, second, other)
        assert events[2] == "second computes, 60 reserved"  # after the first's answer
        # 60 held unread: a call reserving 60 more finds no room
        async with gate.answer_room("a", "m", 1, wait=30) as room:
            room.arrived([bytes(60)])
            room.keep()
        with pytest.raises(ServiceUnavailableError, match="being computed or not yet read"):
            async with gate.answer_room("a", "m", 1, wait=30):
                pass

    asyncio.run(main())
