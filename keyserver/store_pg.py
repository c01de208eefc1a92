"""The key server's store on PostgreSQL (psycopg 3): several replicas, one database.

Same interface and guarantees as :class:`keyserver.store.SqliteStore`:

- **No key before its audit record is durable.** A batch is one transaction;
  the server replies only after ``COMMIT`` returns, and PostgreSQL's default
  ``synchronous_commit=on`` returns only once the commit record is flushed
  to its WAL.
- **One audit chain across replicas.** Every write transaction first takes
  one transaction-level advisory lock (``pg_advisory_xact_lock``), released
  by COMMIT or ROLLBACK, so the read-head-then-append of the hash chain, the
  quota and the rate counters are serialised across every replica: two
  replicas never append two records with the same ``prev_hash``. A replica
  killed mid-transaction loses its connection, PostgreSQL rolls back, and
  the lock is free again.
- The audit table refuses UPDATE, DELETE and TRUNCATE with triggers (defence
  in depth; the hash chain and the signed checkpoints detect the rest).

Example::

    st = PostgresStore.open("postgresql://ks@127.0.0.1:5432/vault", create=True)
    with st.transaction():
        st.set_meta("address", "tcp://10.0.0.5:7700")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from vault.core.errors import ConfigError

from .store import SCHEMA_VERSION, AuditRow, Store

__all__ = ["ADVISORY_LOCK", "PostgresStore"]

# An arbitrary, fixed 64-bit key: "vault-ks" in ASCII.
ADVISORY_LOCK = int.from_bytes(b"vault-ks", "big") & 0x7FFF_FFFF_FFFF_FFFF

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS licences (
    licence_id TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('caller', 'admin')),
    model_id TEXT,
    client_public_key TEXT NOT NULL UNIQUE,
    issued_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION,
    max_calls BIGINT,
    rate_limit DOUBLE PRECISION,
    grace DOUBLE PRECISION NOT NULL DEFAULT 0,
    revoked_at DOUBLE PRECISION,
    used_calls BIGINT NOT NULL DEFAULT 0,
    reserved_calls BIGINT NOT NULL DEFAULT 0,
    rate_tokens DOUBLE PRECISION,
    rate_at DOUBLE PRECISION,
    kind TEXT NOT NULL DEFAULT 'runtime' CHECK (kind IN ('runtime', 'call', 'admin')),
    same_user INTEGER NOT NULL DEFAULT 0,
    devices TEXT,
    proof_public_key TEXT,
    mac BYTEA
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    enrolled_at DOUBLE PRECISION NOT NULL,
    enrolled_by TEXT NOT NULL,
    revoked_at DOUBLE PRECISION,
    mac BYTEA
);
CREATE TABLE IF NOT EXISTS keys (
    model_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    package_digest TEXT NOT NULL,
    wrapped BYTEA NOT NULL,
    registered_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (model_id, key_id)
);
CREATE TABLE IF NOT EXISTS leases (
    lease_id TEXT PRIMARY KEY,
    licence_id TEXT NOT NULL,
    model_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    issued_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    hard_end DOUBLE PRECISION NOT NULL,
    call_budget BIGINT,
    ended INTEGER NOT NULL DEFAULT 0,
    calls BIGINT NOT NULL DEFAULT 0,
    device_id TEXT
);
CREATE INDEX IF NOT EXISTS leases_open ON leases (licence_id, hard_end) WHERE ended = 0;
CREATE TABLE IF NOT EXISTS audit (
    seq BIGINT PRIMARY KEY,
    ts DOUBLE PRECISION NOT NULL,
    event TEXT NOT NULL,
    actor TEXT,
    licence_id TEXT,
    model_id TEXT,
    detail TEXT NOT NULL,
    prev_hash BYTEA NOT NULL,
    hash BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_high_water (one INTEGER PRIMARY KEY CHECK (one = 1),
                                             seq BIGINT NOT NULL);
CREATE OR REPLACE FUNCTION vault_audit_append_only() RETURNS trigger AS $$
BEGIN RAISE EXCEPTION 'audit log is append-only'; END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS audit_no_change ON audit;
CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION vault_audit_append_only();
DROP TRIGGER IF EXISTS audit_no_truncate ON audit;
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION vault_audit_append_only();
"""


class PostgresStore(Store):
    """:class:`~keyserver.store.Store` on a PostgreSQL database."""

    kind = "postgresql"
    errors = (psycopg.Error,)
    _param = "%s"

    def __init__(self, conn: psycopg.Connection[Any], url: str) -> None:
        self.conn = conn
        self._url = url

    @staticmethod
    def _connect(url: str) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            # the class only: a connection error may quote the URL (a password)
            raise ConfigError(
                f"cannot connect to the PostgreSQL store ({type(exc).__name__})"
            ) from None

    @classmethod
    def open(cls, url: str, *, create: bool = False) -> PostgresStore:
        conn = cls._connect(url)
        st = cls(conn, url)
        if create:
            with st.transaction():
                conn.execute(_SCHEMA)
                st.ensure_metering_ids()
                st.set_meta("schema_version", SCHEMA_VERSION)
        elif st._one("SELECT to_regclass('public.audit')")[0] is None:
            conn.close()
            raise ConfigError("the PostgreSQL store has no key server schema (run init)")
        return st

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(sql, params or None)

    def begin(self) -> None:
        if self.conn.closed or self.conn.broken:
            # the server restarted or the connection dropped: a fresh one
            # (a failure here is this batch's failure; the next one retries)
            self.conn = psycopg.connect(self._url, autocommit=True, connect_timeout=5)
        self.conn.execute("BEGIN")
        # Serialise every writer on every replica (see the module docstring).
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK,))

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        self.conn.execute("ROLLBACK")

    @property
    def in_transaction(self) -> bool:
        return self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def close(self) -> None:
        self.conn.close()

    def insert_audit(self, row: AuditRow) -> None:
        super().insert_audit(row)
        self._q(
            "INSERT INTO audit_high_water (one, seq) VALUES (1, ?)"
            " ON CONFLICT (one) DO UPDATE SET seq = GREATEST(audit_high_water.seq, excluded.seq)",
            (row.seq,),
        )

    def audit_high_water(self) -> int:
        row = self._one("SELECT seq FROM audit_high_water WHERE one = 1")
        return 0 if row is None else int(row[0])
