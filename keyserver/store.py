"""The key server's SQLite database: schema, connection settings, transactions.

Durability choices (why):

- ``journal_mode=WAL``: readers (``vault keyserver audit``) never block the
  server, and a commit is one append to the WAL file.
- ``synchronous=FULL``: in WAL mode this fsyncs the WAL on every commit, so a
  release, issue or audit record that was *acknowledged* survives power loss,
  not only a process crash (``NORMAL`` would survive SIGKILL but could lose the
  last commits on power loss). The cost is amortised: the server commits a
  whole batch of requests at once (group commit), see :mod:`keyserver.service`.
- The audit table refuses UPDATE and DELETE with triggers (defence in depth;
  the hash chain in :mod:`keyserver.audit` is what detects a tamperer who
  drops the triggers).

Example::

    conn = connect("ks/keyserver.db")
    with transaction(conn):
        set_meta(conn, "address", "tcp://127.0.0.1:7700")
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "connect",
    "device_by_key",
    "get_device",
    "get_meta",
    "insert_device",
    "list_devices",
    "revoke_device",
    "set_meta",
    "transaction",
]

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS licences (
    licence_id TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('caller', 'admin')),
    model_id TEXT,
    client_public_key TEXT NOT NULL UNIQUE,
    issued_at REAL NOT NULL,
    expires_at REAL,
    max_calls INTEGER,
    rate_limit REAL,
    grace REAL NOT NULL DEFAULT 0,
    revoked_at REAL,
    used_calls INTEGER NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT 'runtime' CHECK (kind IN ('runtime', 'call', 'admin')),
    same_user INTEGER NOT NULL DEFAULT 0,   -- tier 0: the holder's user runs the worker
    devices TEXT,                           -- JSON list of device ids; NULL: any enrolled
    proof_public_key TEXT                   -- base64 Ed25519: verifies proofs of possession
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL UNIQUE,        -- Z85 CURVE key: the device's transport identity
    name TEXT NOT NULL,
    enrolled_at REAL NOT NULL,
    enrolled_by TEXT NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS keys (
    model_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    package_digest TEXT NOT NULL,
    wrapped BLOB NOT NULL,  -- AES-256-GCM under the master key; never the clear key
    registered_at REAL NOT NULL,
    PRIMARY KEY (model_id, key_id)
);
CREATE TABLE IF NOT EXISTS leases (
    lease_id TEXT PRIMARY KEY,
    licence_id TEXT NOT NULL,
    model_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    issued_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    hard_end REAL NOT NULL,
    call_budget INTEGER,
    ended INTEGER NOT NULL DEFAULT 0,
    device_id TEXT                          -- the device it was granted to (NULL: tier 0)
) WITHOUT ROWID;  -- one B-tree, not two: fewer pages written per release
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT keeps the high-water mark
    ts REAL NOT NULL,                        -- in sqlite_sequence: a deleted tail shows
    event TEXT NOT NULL,
    actor TEXT,
    licence_id TEXT,
    model_id TEXT,
    detail TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
"""


def connect(path: str | os.PathLike[str], *, create: bool = False) -> sqlite3.Connection:
    """Open the database with the server's settings.

    ``isolation_level=None``: we issue BEGIN/COMMIT ourselves, so a batch of
    requests is exactly one transaction.
    """
    p = os.fspath(path)
    if not create and not os.path.exists(p):
        from vault.core.errors import ConfigError

        raise ConfigError(f"{p}: no key server database (run `vault keyserver init`)")
    conn = sqlite3.connect(p, isolation_level=None, check_same_thread=True)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    # After a checkpoint lets the WAL restart, cut the file back to 16 MiB.
    conn.execute("PRAGMA journal_size_limit=16777216")
    if create:
        conn.executescript(_SCHEMA)
        set_meta(conn, "schema_version", SCHEMA_VERSION)
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception.

    IMMEDIATE takes the write lock up front, so a concurrent writer (e.g.
    rotate-master while a stray process holds the DB) fails here, not halfway.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO meta (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
        (key, value),
    )


# --- devices -------------------------------------------------------------------------

_DEVICE_COLS = "device_id, public_key, name, enrolled_at, enrolled_by, revoked_at"


def device_by_key(conn: sqlite3.Connection, public_key: str) -> tuple[Any, ...] | None:
    row = conn.execute(
        f"SELECT {_DEVICE_COLS} FROM devices WHERE public_key = ?", (public_key,)
    ).fetchone()
    return None if row is None else tuple(row)


def get_device(conn: sqlite3.Connection, device_id: str) -> tuple[Any, ...] | None:
    row = conn.execute(
        f"SELECT {_DEVICE_COLS} FROM devices WHERE device_id = ?", (device_id,)
    ).fetchone()
    return None if row is None else tuple(row)


def insert_device(
    conn: sqlite3.Connection,
    *,
    device_id: str,
    public_key: str,
    name: str,
    enrolled_at: float,
    enrolled_by: str,
) -> None:
    conn.execute(
        f"INSERT INTO devices ({_DEVICE_COLS}) VALUES (?, ?, ?, ?, ?, NULL)",
        (device_id, public_key, name, enrolled_at, enrolled_by),
    )


def revoke_device(conn: sqlite3.Connection, device_id: str, now: float) -> None:
    conn.execute("UPDATE devices SET revoked_at = ? WHERE device_id = ?", (now, device_id))
    conn.execute("UPDATE leases SET ended = 1 WHERE device_id = ?", (device_id,))


def list_devices(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    rows = conn.execute(
        f"SELECT {_DEVICE_COLS} FROM devices ORDER BY enrolled_at, device_id"
    ).fetchall()
    return [tuple(r) for r in rows]
