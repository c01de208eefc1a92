"""Sealed frames (vault/core/sealed.py): what a receiver refuses, each as an
IntegrityError, with nothing of the message used."""

from __future__ import annotations

import os

import pytest

from vault.core import sealed
from vault.core.errors import IntegrityError


def _pair(sid: bytes = b"s" * 16) -> tuple[sealed.Sealer, sealed.Opener]:
    c2s, s2c = sealed.derive_keys(os.urandom(32), os.urandom(32), sid, b"C" * 40, b"S" * 40)
    assert c2s != s2c  # one key per direction
    return sealed.Sealer(c2s, sid), sealed.Opener(c2s, sid)


def _frames(n: int = 3 * sealed.CHUNK + 5) -> list[bytes]:
    return [b"header", os.urandom(n), b"", os.urandom(7)]


def test_a_message_round_trips_in_chunks() -> None:
    s, o = _pair()
    frames = _frames()
    wire = s.seal(frames)
    assert len(wire) == 1 + 1 + 4 + 1 + 1  # prefix, header, 4 chunks, empty frame, small frame
    assert all(frames[1][:64] not in bytes(c) for c in wire)  # no plaintext on the wire
    assert o.open(wire) == frames


def test_each_direction_has_its_own_key_and_both_ends_derive_the_same() -> None:
    sid, cr, sr = os.urandom(16), os.urandom(32), os.urandom(32)
    a = sealed.derive_keys(cr, sr, sid, b"C" * 40, b"S" * 40)
    assert a == sealed.derive_keys(cr, sr, sid, b"C" * 40, b"S" * 40)
    assert a != sealed.derive_keys(cr, sr, sid, b"D" * 40, b"S" * 40)  # bound to the caller's key
    assert a != sealed.derive_keys(cr, sr, os.urandom(16), b"C" * 40, b"S" * 40)
    c2s, s2c = a
    wire = sealed.Sealer(c2s, sid).seal([b"h"])
    with pytest.raises(IntegrityError):  # a message cannot be reflected back to its sender
        sealed.Opener(s2c, sid).open(wire)


@pytest.mark.parametrize("where", ["prefix", "header", "chunk", "last_byte"])
def test_a_flipped_bit_anywhere_is_refused(where: str) -> None:
    s, o = _pair()
    wire = [bytearray(w) for w in s.seal(_frames())]
    i, j = {"prefix": (0, 22), "header": (1, 0), "chunk": (3, 1000), "last_byte": (-1, -1)}[where]
    wire[i][j] ^= 0x01
    with pytest.raises(IntegrityError):
        o.open(wire)
    assert o.last == 0  # a forgery does not move the replay mark


def test_replay_and_reordering_are_refused() -> None:
    s, o = _pair()
    first, second = s.seal([b"one"]), s.seal([b"two"])
    assert o.open(second) == [b"two"]
    with pytest.raises(IntegrityError, match="replayed or arrived out of order"):
        o.open(first)  # older than the last one accepted
    with pytest.raises(IntegrityError, match="replayed"):
        o.open(second)  # the same one again


@pytest.mark.parametrize("cut", ["drop_last_chunk", "drop_middle_chunk", "add_chunk", "swap"])
def test_truncated_extended_or_shuffled_chunks_are_refused(cut: str) -> None:
    s, o = _pair()
    wire = s.seal(_frames())
    if cut == "drop_last_chunk":
        wire = wire[:-1]
    elif cut == "drop_middle_chunk":
        wire = wire[:3] + wire[4:]
    elif cut == "add_chunk":
        wire = [*wire, wire[-1]]
    else:
        wire[2], wire[3] = wire[3], wire[2]
    with pytest.raises(IntegrityError):
        o.open(wire)


def test_a_chunk_from_another_message_or_session_is_refused() -> None:
    s, o = _pair()
    a, b = s.seal([b"h", b"x" * 100]), s.seal([b"h", b"y" * 100])
    with pytest.raises(IntegrityError):
        o.open([b[0], a[1], a[2]])  # a's chunks under b's prefix
    other, _ = _pair(sid=b"t" * 16)
    with pytest.raises(IntegrityError, match="not a message of this session"):
        o.open(other.seal([b"h"]))


def test_the_session_table_is_bounded_per_caller() -> None:
    table = sealed.SessionTable(b"S" * 40, per_client=2, total=3)
    sids = [table.create("alice" + "x" * 35, os.urandom(32))["sid"] for _ in range(3)]
    assert table.get(sids[0]) is None and table.get(sids[2]) is not None  # alice keeps 2
    table.create("bob" + "x" * 37, os.urandom(32))
    table.create("carol" + "x" * 35, os.urandom(32))
    assert len(table) == 3
    with pytest.raises(IntegrityError):
        table.create("alice" + "x" * 35, b"short")
