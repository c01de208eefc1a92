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


def _session(table: sealed.SessionTable, key: str) -> tuple[bytes, sealed.Sealer, str]:
    """A session made as a caller makes it: its id, the caller's sealer, its password."""
    rand = os.urandom(32)
    fields = table.create(key, rand)
    c2s, _s2c, password = sealed.derive_session(rand, fields["rand"], fields["sid"], key.encode(),
                                                table.server_public)  # fmt: skip
    return fields["sid"], sealed.Sealer(c2s, fields["sid"]), password


def _forgery(sid: bytes, seq: int) -> list[bytes]:
    """What a party on the wire can send in a session's name: its id and next
    number (both travel in clear), any chunk."""
    prefix = sealed._PREFIX.pack(sealed.SEALED_TAG, sid, seq, 1) + (1).to_bytes(4, "big")
    return [prefix, os.urandom(4096 + 16)]


def test_a_lent_buffer_refuses_a_forgery_until_its_answer_went() -> None:
    """A server's reused buffer holds the call being computed: a forgery that
    arrives meanwhile is refused before a byte is written."""
    table = sealed.SessionTable(b"S" * 40)
    sid, sealer, _ = _session(table, "alice" + "x" * 35)
    opener = table.get(sid).opener  # type: ignore[union-attr]
    frames = opener.open(sealer.seal([b"header", b"\x01" * 8192]))
    held = [bytes(f) for f in frames]
    with pytest.raises(IntegrityError, match="served"):
        opener.open(_forgery(sid, sealer.seq + 1))
    assert [bytes(f) for f in frames] == held  # the call's inputs are as the caller sent them
    opener.release()
    assert opener.open(sealer.seal([b"next"])) == [b"next"]


def test_control_a_forgery_opened_into_a_buffer_still_in_use_overwrites_it() -> None:
    """The control: the same forgery once the buffer is handed back while the
    frames are still used (what the server did while a call was computed)
    writes over them, although it fails authentication."""
    table = sealed.SessionTable(b"S" * 40)
    sid, sealer, _ = _session(table, "alice" + "x" * 35)
    opener = table.get(sid).opener  # type: ignore[union-attr]
    frames = opener.open(sealer.seal([b"header", b"\x01" * 8192]))
    held = [bytes(f) for f in frames]
    opener.release()
    with pytest.raises(IntegrityError, match="failed authentication"):
        opener.open(_forgery(sid, sealer.seq + 1))
    assert [bytes(f) for f in frames] != held


def test_a_forgery_keeps_no_larger_buffer_and_leaves_nothing_readable() -> None:
    table = sealed.SessionTable(b"S" * 40)
    sid, sealer, _ = _session(table, "alice" + "x" * 35)
    opener = table.get(sid).opener  # type: ignore[union-attr]
    opener.open(sealer.seal([b"h", b"\x02" * 1000]))
    opener.release()
    kept = table.retained.bytes
    big = sealed._PREFIX.pack(sealed.SEALED_TAG, sid, sealer.seq + 1, 1) + (8).to_bytes(4, "big")
    with pytest.raises(IntegrityError):
        opener.open([big, *[os.urandom(sealed.CHUNK + 16) for _ in range(8)]])
    assert table.retained.bytes == kept  # a forgery cannot make a session keep 2 MiB
    opener.open(sealer.seal([b"h", b"\x02" * 8000]))
    opener.release()
    before = bytes(opener._buf)
    with pytest.raises(IntegrityError):
        opener.open(_forgery(sid, sealer.seq + 1))  # one chunk of 4,096 bytes, into the kept buffer
    after = bytes(opener._buf)
    assert after[:4096] == bytes(4096)  # what its failed chunk decrypted to is wiped
    assert after[4096:] == before[4096:]


def test_buffers_kept_for_reuse_are_bounded_across_sessions() -> None:
    """One caller with many sessions, one large message each: a server keeps at
    most ``retain_bytes`` of buffers, not one large buffer per session
    (control: without a bound, every session keeps its own)."""
    for limit, kept_at_most in ((3 << 20, 3 << 20), (1 << 40, None)):
        table = sealed.SessionTable(b"S" * 40, retain_bytes=limit)
        for _ in range(8):
            sid, sealer, _ = _session(table, "alice" + "x" * 35)
            opener = table.get(sid).opener  # type: ignore[union-attr]
            opener.open(sealer.seal([b"h", bytes(1 << 20)]))
            opener.release()
        if kept_at_most is not None:
            assert table.retained.bytes <= kept_at_most
        else:
            assert table.retained.bytes >= 8 << 20  # the control: 1 MiB kept per session
        kept = sum(len(sess.opener._buf) for sess in table._by_sid.values())
        assert kept == table.retained.bytes


def test_a_session_is_admitted_with_its_own_password_only() -> None:
    table = sealed.SessionTable(b"S" * 40, per_client=1)
    sid, _, password = _session(table, "alice" + "x" * 35)
    other, _, other_password = _session(table, "bob" + "x" * 37)
    assert table.admits(sid.hex(), password)
    assert not table.admits(sid.hex(), other_password)  # another session's password
    assert not table.admits(other.hex()[:-2] + "00", other_password)
    assert not table.admits("not hex", password)
    _session(table, "alice" + "x" * 35)  # alice's first session goes (one per caller here)
    assert not table.admits(sid.hex(), password)  # a session that went admits nobody


def test_asking_about_a_lost_answer_ends_the_session_and_tells_the_truth() -> None:
    """What a caller asks before sending a call again: whether the old session
    accepted it. The old session ends with the question, so a copy held back
    on the wire can no longer be accepted. Only the caller's own sessions
    are answered about (another's is "unknown", and goes on)."""
    alice, bob = "alice" + "x" * 35, "bob" + "x" * 37
    table = sealed.SessionTable(b"S" * 40)
    sid, sealer, _ = _session(table, alice)
    opener = table.get(sid).opener  # type: ignore[union-attr]
    opener.open(sealer.seal([b"ran"]))
    opener.release()
    held = sealer.seal([b"held back"])
    assert table.create(bob, os.urandom(32), prev=sid, prev_seq=1)["prev"] == "unknown"
    assert table.get(sid) is not None  # bob cannot end alice's session
    assert table.create(alice, os.urandom(32), prev=sid, prev_seq=2)["prev"] == "not_accepted"
    assert table.get(sealed.session_id(held[0])) is None  # ended: the held-back copy finds none
    assert table.create(alice, os.urandom(32), prev=sid, prev_seq=1)["prev"] == "accepted"
    assert table.create(alice, os.urandom(32), prev=os.urandom(16), prev_seq=1)["prev"] == "unknown"
    with pytest.raises(IntegrityError):
        table.create(alice, os.urandom(32), prev=b"short", prev_seq=1)


def test_one_callers_sessions_go_before_anyone_elses() -> None:
    """A caller that makes session after session evicts only its own (and each
    one costs the same whatever the table holds: sessions are indexed by caller)."""
    table = sealed.SessionTable(b"S" * 40, per_client=4, total=1000)
    others = [_session(table, f"{i:040d}")[0] for i in range(50)]
    for _ in range(200):
        _session(table, "mallory" + "x" * 33)
    assert all(table.get(s) is not None for s in others)
    assert len(table) == 54


def test_a_message_of_no_chunks_is_refused_and_moves_no_mark() -> None:
    """A prefix whose frames claim no chunk would authenticate nothing: a
    stranger on the wire could set the replay mark to the last number and
    end the session for good."""
    s, o = _pair()
    forged = [sealed._PREFIX.pack(sealed.SEALED_TAG, s.sid, (1 << 64) - 1, 1) + bytes(4)]
    with pytest.raises(IntegrityError, match="malformed"):
        o.open(forged)
    two = sealed._PREFIX.pack(sealed.SEALED_TAG, s.sid, 7, 2) + (0).to_bytes(4, "big") * 2
    with pytest.raises(IntegrityError, match="malformed"):
        o.open([two])
    assert o.last == 0
    assert o.open(s.seal([b"genuine", b""])) == [b"genuine", b""]  # the session goes on


def test_a_later_chunk_tampered_leaves_none_of_the_message_readable() -> None:
    """Genuine first chunks, a tampered last one, opened into a kept buffer:
    what the genuine chunks decrypted to is wiped with the rest."""
    table = sealed.SessionTable(b"S" * 40)
    sid, sealer, _ = _session(table, "carol" + "x" * 35)
    opener = table.get(sid).opener  # type: ignore[union-attr]
    opener.open(sealer.seal([b"h", b"\x03" * (3 * sealed.CHUNK)]))
    opener.release()
    secret = os.urandom(3 * sealed.CHUNK)
    wire = [bytearray(w) for w in sealer.seal([b"h", secret])]
    wire[-1][5] ^= 0x01  # the third chunk of the tensor frame
    with pytest.raises(IntegrityError):
        opener.open(wire)
    kept = bytes(opener._buf)
    assert secret[: sealed.CHUNK // 2] not in kept and secret[-4096:] not in kept
    assert kept[: 3 * sealed.CHUNK + 64].count(0) >= 3 * sealed.CHUNK  # wiped, not left over


def test_another_callers_churn_does_not_forget_this_callers_sessions() -> None:
    """A session that went is remembered so that its caller, asking whether
    its last call was accepted, is told the truth (and a call the service
    ran is not sent, and paid for, again). Those memories were one list for
    all callers: mallory's 20,000 sessions (a second's work, stop 31's
    attack round) flushed alice's, whose question then got "unknown" and
    whose call would be sent again. Now each caller's are its own: alice is
    still told "accepted" after mallory's churn. Control: alice's own churn
    past 16 sessions that went does forget her oldest."""
    alice, mallory = "alice" + "x" * 35, "mallory" + "x" * 33
    table = sealed.SessionTable(b"S" * 40, per_client=1, total=64)
    sid, sealer, _ = _session(table, alice)
    opener = table.get(sid).opener  # type: ignore[union-attr]
    opener.open(sealer.seal([b"call"]))  # accepted: message 1
    opener.release()
    table.create(alice, os.urandom(32))  # per_client 1: her first session goes
    assert table.get(sid) is None
    for _ in range(20_000):
        table.create(mallory, os.urandom(32))
    assert table.create(alice, os.urandom(32), prev=sid, prev_seq=sealer.seq)["prev"] == "accepted"
    # control: her own churn, past what is kept of hers, forgets it
    sid2, sealer2, _ = _session(table, alice)
    for _ in range(sealed.GONE_PER_CLIENT + 1):
        table.create(alice, os.urandom(32))
    answer = table.create(alice, os.urandom(32), prev=sid2, prev_seq=sealer2.seq + 1)
    assert answer["prev"] == "unknown"
