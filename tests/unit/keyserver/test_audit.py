from __future__ import annotations

import sqlite3

import pytest

from keyserver import audit, store


@pytest.fixture
def conn(tmp_path):
    c = store.SqliteStore.open(tmp_path / "a.db", create=True)
    with c.transaction():
        for i in range(6):
            audit.append(c, ts=1000.0 + i / 3, event="issued", licence_id=f"l{i}",
                         detail={"n": i, "f": 0.1 * i})  # fmt: skip
    yield c
    c.close()


def _force(c: store.SqliteStore, sql: str) -> None:
    c.conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
    c.conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    c.conn.execute(sql)


def test_intact_chain_verifies_and_is_linked(conn):
    assert audit.verify(conn) == []
    recs = list(audit.records(conn))
    assert [r.seq for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[0].prev_hash == audit.GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(recs, recs[1:]))
    assert audit.head(conn) == (6, recs[-1].hash)


def test_append_only_triggers(conn):
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.conn.execute("UPDATE audit SET event = 'x' WHERE seq = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.conn.execute("DELETE FROM audit")


def test_edited_record_is_reported_at_its_position(conn):
    _force(conn, "UPDATE audit SET licence_id = 'evil' WHERE seq = 3")
    assert [(p.position, "edited" in p.reason) for p in audit.verify(conn)] == [(3, True)]


def test_rehashed_edit_shows_at_the_next_record(conn):
    _force(conn, "UPDATE audit SET hash = zeroblob(32) WHERE seq = 2")
    problems = audit.verify(conn)
    assert [p.position for p in problems] == [2, 3]


@pytest.mark.parametrize(("deleted", "position"), [("seq = 4", 4), ("seq IN (2, 3)", 2),
                                                   ("seq = 1", 1), ("seq >= 5", 5)])  # fmt: skip
def test_deleted_records_are_reported(conn, deleted, position):
    _force(conn, f"DELETE FROM audit WHERE {deleted}")
    problems = audit.verify(conn)
    assert problems and problems[0].position == position and "deleted" in problems[0].reason
    assert str(problems[0]).startswith(f"record {position}:")
