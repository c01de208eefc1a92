"""The Open Inference Protocol's pieces that need no server: the proto is the
protocol's (field by field against Triton's compiled descriptors), the
generated modules are what generate.py writes, tensors convert both ways for
every datatype, and the plaintext rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vault.core.errors import ConfigError, InputError
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
    names = [n for n in ours.DESCRIPTOR.message_types_by_name]
    assert len(names) == 14
    for name in names:
        mine = ours.DESCRIPTOR.message_types_by_name[name]
        theirs = triton.DESCRIPTOR.message_types_by_name[name]
        t = _fields(theirs)
        for field_name, spec in _fields(mine).items():
            assert t[field_name][:3] == spec[:3], (name, field_name)
    svc, tsvc = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"], None
    tsvc = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for m in svc.methods:
        tm = tsvc.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name) == (
            tm.input_type.full_name,
            tm.output_type.full_name,
        )


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
])  # fmt: skip
def test_malformed_json_tensors_are_input_errors(
    datatype: str, shape: list[int], data: Any
) -> None:
    with pytest.raises(InputError):
        T.from_json("t", datatype, shape, data)


def test_malformed_binary_tensors_are_input_errors() -> None:
    with pytest.raises(InputError):
        T.from_raw("t", "FP32", [2], b"\0" * 7)
    with pytest.raises(InputError):  # a length past the end
        T.from_raw("t", "BYTES", [1], b"\x10\0\0\0abc")
    with pytest.raises(InputError):  # trailing bytes
        T.from_raw("t", "BYTES", [1], b"\x01\0\0\0ab")
    with pytest.raises(InputError):  # not UTF-8
        T.from_raw("t", "BYTES", [1], b"\x01\0\0\0\xff")


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

        def submit(self, call: Any) -> None:
            self.submitted.append(call)

    svc = Service()
    plane = DataPlane(svc)  # type: ignore[arg-type]
    assert [t["name"] for t in plane.model_metadata("m", None)["outputs"]] == ["y"]
    assert plane.default_outputs("m") == ["y"]
    with pytest.raises(InputError, match="cannot carry"):
        asyncio.run(plane.infer("m", None, None, [], [], ["z"]))  # type: ignore[arg-type]
    assert svc.submitted == []  # never posted: nothing ran, nothing billed
