"""keyserver.anchor and keyserver.rowauth without a server."""

from __future__ import annotations

import dataclasses
import json

import pytest

from keyserver import audit, store
from keyserver.anchor import AnchorWriter, verify_anchor
from keyserver.policy import LicenceRecord
from keyserver.rowauth import RowAuth
from vault.core import crypto as _crypto


@pytest.fixture
def log(tmp_path):
    st = store.SqliteStore.open(tmp_path / "a.db", create=True)
    with st.transaction():
        for i in range(5):
            audit.append(st, ts=1000.0 + i, event="released", licence_id=f"l{i}")
    yield st
    st.close()


def test_checkpoints_verify_and_catch_a_cut_log_and_a_forged_line(log, tmp_path):
    key = _crypto.PublisherKey.generate()
    path = tmp_path / "anchor"
    w = AnchorWriter(path, key)
    seq, head = audit.head(log)
    w(seq, head, 1234.5)
    w.close()
    problems, last = verify_anchor(log, path, key.public_raw)
    assert problems == [] and last is not None and last.seq == 5
    # a line signed by another key, and a garbled one
    other = AnchorWriter(path, _crypto.PublisherKey.generate())
    other(5, b"\x00" * 32, 1.0)
    other.close()
    with open(path, "a") as fh:
        fh.write(json.dumps({"v": 1, "seq": 5}) + "\n")
    problems, _ = verify_anchor(log, path, key.public_raw)
    assert [p.reason.split(" (")[0] for p in problems] == [
        "anchor line 2 is not a valid signed checkpoint",
        "anchor line 3 is not a valid signed checkpoint",
    ]
    # the log cut below the checkpoint (the triggers dropped first)
    log.conn.execute("DROP TRIGGER audit_no_delete")
    log.conn.execute("DELETE FROM audit WHERE seq = 5")
    problems, _ = verify_anchor(log, tmp_path / "anchor", key.public_raw)
    assert any(p.position == 5 and "missing" in p.reason for p in problems)
    missing, _ = verify_anchor(log, tmp_path / "nope", key.public_raw)
    assert "cannot be read" in missing[0].reason


def test_row_tags_bind_every_column_and_the_master():
    rec = LicenceRecord("lic-1", "alice", "caller", "m", "K" * 40, 1.0, None, 5, 2.0, 0.0, None, 0)
    rows = RowAuth(bytearray(32))
    sealed = rows.seal(rec)
    assert rows.authentic(sealed) and not rows.authentic(rec)  # no tag: refused
    for change in ({"role": "admin"}, {"max_calls": 6}, {"revoked_at": None, "used_calls": 1},
                   {"licence_id": "lic-2"}, {"reserved_calls": 1}):  # fmt: skip
        assert not rows.authentic(dataclasses.replace(sealed, **change)), change
    # the same stored number read back as int or float is the same row
    assert rows.authentic(dataclasses.replace(sealed, rate_limit=2, grace=0))
    assert not RowAuth(bytearray(b"\x01" * 32)).authentic(sealed)  # another master
    assert "hidden" in repr(rows)
