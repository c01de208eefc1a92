"""The wire encoding of values: sequences, maps, optionals and low-bit
dtypes round-trip; everything is checked from the header before decoding."""

from __future__ import annotations

import ml_dtypes
import msgpack
import numpy as np
import pytest

from vault.core import protocol
from vault.core.errors import InputError, ProtocolError
from vault.core.protocol import decode_tensors, encode_tensors, parse_type


def _roundtrip(values: dict, types: dict, expect: dict | None = None) -> dict:
    descs, frames = encode_tensors(values, types=types)
    return decode_tensors(descs, [bytes(memoryview(f)) for f in frames], copy=True, expect=expect)


def test_containers_round_trip() -> None:
    types = {"s": "sequence<float32>", "m": "map<string,float32>", "z": "sequence<map<int64,float32>>",
             "o": "optional<int64>", "none": "optional<float32>"}  # fmt: skip
    values = {"s": [np.arange(3, dtype=np.float32), np.ones((2, 2), np.float32)],
              "m": {"a": 1.5, "b": -2.0}, "z": [{0: 0.25, 1: 0.75}, {0: 1.0, 1: 0.0}],
              "o": np.array([7], np.int64), "none": None}  # fmt: skip
    got = _roundtrip(values, types, expect=types)
    assert [a.tolist() for a in got["s"]] == [a.tolist() for a in values["s"]]
    assert got["m"] == values["m"] and got["z"] == values["z"]
    assert got["o"].tolist() == [7] and got["none"] is None


def test_low_bit_dtypes_round_trip() -> None:
    for name in (
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "int4",
        "uint4",
    ):
        arr = np.array([0, 1, 2, 3, 4], np.float32).astype(getattr(ml_dtypes, name))
        got = _roundtrip({"x": arr}, {})["x"]
        assert got.dtype == arr.dtype and got.tobytes() == arr.tobytes()
        assert got.flags.writeable


def test_names_and_types_are_checked_before_decoding() -> None:
    frame = msgpack.packb(["a"])
    with pytest.raises(InputError, match="no input named 'x'"):
        decode_tensors(
            [{"name": "x", "dtype": "string", "shape": [1]}], [frame], expect={"s": "string"}
        )
    with pytest.raises(InputError, match="must be sequence<float32>, got string"):
        decode_tensors([{"name": "s", "dtype": "string", "shape": [1]}], [frame],
                       expect={"s": "sequence<float32>"})  # fmt: skip
    with pytest.raises(ProtocolError, match="nested"):
        parse_type("sequence<" * 20 + "float32" + ">" * 20)
    with pytest.raises(ProtocolError):
        parse_type("map<sequence<int64>,float32>")


def test_string_memory_is_bounded_by_the_request_size() -> None:
    n = (protocol.MEMORY_FLOOR // protocol.STRING_ELEMENT_COST) + 1
    frame = b"\xdd" + n.to_bytes(4, "big") + b"\xa1a" * n  # ~1.4 MiB of 1-char strings
    with pytest.raises(ProtocolError, match="strings"):
        decode_tensors([{"name": "s", "dtype": "string", "shape": [n]}], [frame])
    # under the floor, the same strings decode
    small = b"\x93" + b"\xa1a" * 3
    assert (
        decode_tensors([{"name": "s", "dtype": "string", "shape": [3]}], [small])["s"].tolist()
        == ["a"] * 3
    )


def test_one_header_limit_for_worker_and_key_server() -> None:
    """One constant and one check (unpack_header); the key server only lowers it."""
    from keyserver import server

    assert server.MAX_HEADER is protocol.MAX_HEADER
    assert server.REQUEST_HEADER_LIMIT < protocol.MAX_HEADER
    with pytest.raises(ProtocolError, match="too large"):
        protocol.unpack_header(b"\x00" * (protocol.MAX_HEADER + 1))
    with pytest.raises(ProtocolError, match="too large"):
        protocol.unpack_header(b"\x00" * 100, limit=50)
    with pytest.raises(ProtocolError, match="too large"):  # a limit cannot raise the ceiling
        protocol.unpack_header(b"\x00" * (protocol.MAX_HEADER + 1), limit=protocol.MAX_HEADER * 2)


def test_many_medium_tensors_go_through_shared_memory_together() -> None:
    """A call whose tensors together outgrow a local socket's send buffer
    (a GPT-2 step with its past: 18 tensors of 24 KiB) goes through the
    caller's shared-memory slot, though no one tensor is large; fewer, or
    tiny ones, stay frames; each comes back as it went."""
    from vault.core.protocol import SHM_GROUP_BYTES, SharedRegion, shm_threshold

    past = {f"past.{i}": np.random.rand(1, 12, 8, 64).astype(np.float32) for i in range(18)}
    assert sum(a.nbytes for a in past.values()) >= SHM_GROUP_BYTES
    assert shm_threshold(past) is not None
    few = dict(list(past.items())[:2])
    assert shm_threshold(few) is None
    tiny = {f"t{i}": np.ones(8, np.float32) for i in range(64)}
    for arrays, in_shm in ((past, 18), (few, 0)):
        region = SharedRegion(bytearray(4 << 20), 0, 4 << 20)
        descs, frames = encode_tensors(arrays, region)
        assert sum("shm" in d for d in descs) == in_shm
        assert len(frames) == len(arrays) - in_shm
        back = decode_tensors(descs, frames, SharedRegion(region.buf, 0, 4 << 20), copy=True)
        for k, v in arrays.items():
            np.testing.assert_array_equal(back[k], v)
    descs, frames = encode_tensors({**past, **tiny}, SharedRegion(bytearray(4 << 20), 0, 4 << 20))
    assert all("shm" not in d for d in descs if d["name"].startswith("t"))  # under 4 KiB: frames


def test_a_shared_region_checks_every_place_it_is_told_and_keeps_outputs_aligned() -> None:
    """The worker reads tensors at offsets the caller's header names: only
    whole, non-negative, in-slot ranges given as two plain ints are read; a
    read or a placement moves the cursor to the next 64-byte boundary past
    it (where the worker's outputs then go); what does not fit is not placed."""
    from vault.core.protocol import SharedRegion

    buf = bytearray(8192)
    region = SharedRegion(buf, 1024, 4096)
    for loc in ([True, 8], [1024, True], [1024.0, 8], [1024, -1], [1000, 8], [4000, 97],
                (1024, 8), [1024], [1024, 8, 0], "1024", None):  # fmt: skip
        with pytest.raises(ProtocolError, match="outside its region"):
            region.view(loc)
        assert region.cursor == 1024
    at_zero = SharedRegion(buf, 0, 4096)
    for loc in ([False, 8], [0, True]):  # a bool is no offset, though it is an int
        with pytest.raises(ProtocolError, match="outside its region"):
            at_zero.view(loc)
    assert region.view([1024, 8]).nbytes == 8 and region.cursor == 1088
    assert region.view([4000, 96]).nbytes == 96 and region.cursor == 4096  # to the end
    assert region.view([1024, 4]).nbytes == 4 and region.cursor == 4096  # behind: stays
    out = SharedRegion(buf, 1024, 4096)
    assert out.place(np.arange(10, dtype=np.uint8)) == [1024, 10] and out.cursor == 1088
    assert bytes(buf[1024:1034]) == bytes(range(10))
    assert out.place(memoryview(np.ones(3, np.float64))) == [1088, 24] and out.cursor == 1152
    assert out.place(bytes(4096)) is None and out.cursor == 1152  # too big: not placed


def test_a_callers_results_from_shared_memory_are_its_own() -> None:
    """Results decoded for a caller (``copy=True``) are writable copies: the
    slot they came through is reused by the next call, and writing into a
    result changes neither the slot nor another result."""
    from vault.core.protocol import SharedRegion

    arrays = {f"o{i}": np.full((64, 64), i, np.float32) for i in range(3)}
    buf = bytearray(1 << 20)
    descs, frames = encode_tensors(arrays, SharedRegion(buf, 0, 1 << 20), min_bytes=1)
    assert all("shm" in d for d in descs) and frames == []
    back = decode_tensors(descs, frames, SharedRegion(buf, 0, 1 << 20), copy=True)
    buf[:] = bytes(len(buf))  # the next call overwrites the slot
    for i in range(3):
        assert back[f"o{i}"].flags.writeable
        np.testing.assert_array_equal(back[f"o{i}"], arrays[f"o{i}"])
    back["o0"][:] = 7
    np.testing.assert_array_equal(back["o1"], arrays["o1"])
    assert not any(buf)


def test_a_string_tensor_of_bytes_that_are_not_text_is_an_input_error() -> None:
    """String tensors travel as UTF-8 text: a bytes element that is not
    (``b"\\xff"``) is the caller's InputError naming the input, not a
    UnicodeDecodeError from deep inside the client; text bytes are taken."""
    with pytest.raises(InputError, match="'s': a bytes element is not UTF-8"):
        encode_tensors({"s": np.array([b"ok", b"\xff"], dtype=object)})
    descs, frames = encode_tensors({"s": np.array([b"ab", "c"], dtype=object)})
    assert decode_tensors(descs, frames)["s"].tolist() == ["ab", "c"]
    # a lone surrogate (valid in a Python str, in JSON's "\ud800") has no UTF-8
    with pytest.raises(InputError, match="'s': a string element is not valid Unicode"):
        encode_tensors({"s": np.array(["ok", "\ud800"], dtype=object)})
