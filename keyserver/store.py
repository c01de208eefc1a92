"""The key server's storage: every SQL statement it runs, behind one interface.

:class:`Store` is what the rest of the key server sees: transactions and
savepoints, and typed reads and writes of licences, wrapped keys, leases,
meta values and audit records. :mod:`keyserver.service` makes decisions and
never writes SQL. Two engines implement it: :class:`SqliteStore` here (one
host) and :class:`keyserver.store_pg.PostgresStore` (several replicas on one
PostgreSQL database). :func:`open_store` picks by the database argument.

SQLite durability choices (why):

- ``journal_mode=WAL``: readers (``vault keyserver audit``) never block the
  server, and a commit is one append to the WAL file.
- ``synchronous=FULL``: in WAL mode this fsyncs the WAL on every commit, so a
  release, issue or audit record that was *acknowledged* survives power loss,
  not only a process crash. The cost is amortised: the server commits a whole
  batch of requests at once (group commit), see :mod:`keyserver.service`.
- The audit table refuses UPDATE and DELETE with triggers (defence in depth;
  the hash chain in :mod:`keyserver.audit` and the signed checkpoints are what
  detect a tamperer who drops the triggers).

Example::

    st = open_store("ks/keyserver.db")
    with st.transaction():
        st.set_meta("address", "tcp://127.0.0.1:7700")
    st.close()
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .policy import DeviceRecord, LicenceRecord

__all__ = [
    "SCHEMA_VERSION",
    "AuditRow",
    "KeyRow",
    "LeaseRow",
    "METERING_SCHEMA",
    "SERVICE_SCHEMA",
    "PROOF_SCHEMA",
    "MeteringId",
    "SqliteStore",
    "Store",
    "connect",
    "get_meta",
    "open_store",
    "set_meta",
    "transaction",
]

SCHEMA_VERSION = "2"

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
    used_calls INTEGER NOT NULL DEFAULT 0,      -- reported, or forfeited by a dead worker
    reserved_calls INTEGER NOT NULL DEFAULT 0,  -- held by open leases
    rate_tokens REAL,                           -- the call bucket (keyserver.metering)
    rate_at REAL,
    kind TEXT NOT NULL DEFAULT 'runtime' CHECK (kind IN ('runtime', 'call', 'admin')),
    same_user INTEGER NOT NULL DEFAULT 0,   -- tier 0: the holder's user runs the worker
    devices TEXT,                           -- JSON list of device ids; NULL: any enrolled
    proof_public_key TEXT,                  -- base64 Ed25519: verifies proofs of possession
    mac BLOB                                -- HMAC of the row (keyserver.rowauth)
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL UNIQUE,        -- Z85 CURVE key: the device's transport identity
    name TEXT NOT NULL,
    enrolled_at REAL NOT NULL,
    enrolled_by TEXT NOT NULL,
    revoked_at REAL,
    mac BLOB                                -- HMAC of the row (keyserver.rowauth)
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
    call_budget INTEGER,                  -- calls reserved for this lease (NULL: unlimited)
    ended INTEGER NOT NULL DEFAULT 0,
    calls INTEGER NOT NULL DEFAULT 0,     -- calls the worker reported on it
    device_id TEXT                        -- the device it was granted to (NULL: tier 0)
) WITHOUT ROWID;  -- one B-tree, not two: fewer pages written per release
CREATE INDEX IF NOT EXISTS leases_open ON leases (licence_id, hard_end) WHERE ended = 0;
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

# Ids a worker service chooses for its usage reports and call grants, so a
# request whose answer was lost can be sent again without counting anything
# twice (keyserver/calls.py). Created by `serve` too, for databases made by
# an earlier version (same statement on both engines).
METERING_SCHEMA = """
CREATE TABLE IF NOT EXISTS metering_ids (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    licence_id TEXT,
    budget BIGINT,
    released INTEGER NOT NULL DEFAULT 0,
    at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS metering_ids_at ON metering_ids (at);
CREATE INDEX IF NOT EXISTS metering_open_grants ON metering_ids (at)
    WHERE kind = 'grant' AND released = 0;
"""

# Proofs of possession already used (keyserver.service: one row per proof and
# step, a digest of the step, the licence and the proof's nonce), kept until
# the proof is stale anyway (its time + the clock-skew window): in the
# database, so a proof is good once across every replica and every restart.
# Created by `serve` too, for databases made by an earlier version.
PROOF_SCHEMA = """
CREATE TABLE IF NOT EXISTS used_proofs (
    id TEXT PRIMARY KEY,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS used_proofs_expiry ON used_proofs (expires_at);
"""

# Devices the vendor enrolled as its worker services (``vault device enroll
# --service``): only these ask for call decisions and report calls served
# under call licences (keyserver/calls.py); a customer's daemon is a device
# too and must never spend a caller's quota. A row of its own (tagged like a
# device's, keyserver.rowauth), so a device row made before it keeps its tag.
# Created by `serve` too, for databases made by an earlier version.
SERVICE_SCHEMA = """
CREATE TABLE IF NOT EXISTS service_devices (
    device_id TEXT PRIMARY KEY,
    mac TEXT NOT NULL
);
"""

LICENCE_COLS = (
    "licence_id, holder, role, model_id, client_public_key, issued_at, expires_at,"
    " max_calls, rate_limit, grace, revoked_at, used_calls, reserved_calls, rate_tokens, rate_at,"
    " kind, same_user, devices, proof_public_key, mac"
)
_DEVICE_COLS = "device_id, public_key, name, enrolled_at, enrolled_by, revoked_at, mac"
_LEASE_COLS = (
    "lease_id, licence_id, model_id, key_id, issued_at, expires_at, hard_end, call_budget,"
    " ended, calls, device_id"
)
_AUDIT_COLS = "seq, ts, event, actor, licence_id, model_id, detail, prev_hash, hash"


@dataclass(frozen=True)
class KeyRow:
    model_id: str
    key_id: str
    package_digest: str
    wrapped: bytes


@dataclass(frozen=True)
class LeaseRow:
    lease_id: str
    licence_id: str
    model_id: str
    key_id: str
    issued_at: float
    expires_at: float
    hard_end: float
    call_budget: int | None
    ended: bool
    calls: int = 0
    device_id: str | None = None  # the device it was granted to (None: tier 0)


@dataclass(frozen=True)
class MeteringId:
    """A usage report already counted, or a call grant (its reserve, and
    whether it was given back): what makes a re-sent report count once."""

    ident: str
    kind: str  # "report" or "grant"
    licence_id: str | None
    budget: int | None = None
    released: bool = False


@dataclass(frozen=True)
class AuditRow:
    seq: int
    ts: float
    event: str
    actor: str | None
    licence_id: str | None
    model_id: str | None
    detail: str
    prev_hash: bytes
    hash: bytes


def _licence(row: Sequence[Any]) -> LicenceRecord:
    kind, same_user, devices, proof_public_key, mac = row[15:20]
    return dataclasses.replace(
        LicenceRecord(*row[:15]), kind=str(kind), same_user=bool(same_user),
        devices=tuple(json.loads(devices)) if devices else (), proof_public_key=proof_public_key,
        mac=None if mac is None else bytes(mac),
    )  # fmt: skip


def _device(r: Sequence[Any]) -> DeviceRecord:
    mac = r[6]
    return dataclasses.replace(DeviceRecord(*r[:6]), mac=None if mac is None else bytes(mac))


def _lease(r: Sequence[Any]) -> LeaseRow:
    return LeaseRow(str(r[0]), str(r[1]), str(r[2]), str(r[3]), float(r[4]), float(r[5]),
                    float(r[6]), None if r[7] is None else int(r[7]), bool(r[8]), int(r[9]),
                    None if r[10] is None else str(r[10]))  # fmt: skip


class Store:
    """The storage interface. Reads and writes run inside the transaction the
    caller opened with :meth:`begin` (or :meth:`transaction`); a batch of
    requests is one transaction, each request one savepoint.

    ``errors`` is the tuple of the engine's exception types: a caller that
    catches them knows the write did not happen (fail closed).
    """

    kind = "abstract"
    errors: tuple[type[BaseException], ...] = ()
    _param = "?"

    # --- engine hooks ---------------------------------------------------------

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        raise NotImplementedError

    def begin(self) -> None:
        """Open a write transaction (the engine's writer lock taken up front)."""
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def rollback(self) -> None:
        raise NotImplementedError

    @property
    def in_transaction(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def audit_high_water(self) -> int:
        """The highest audit seq ever handed out (a deleted tail shows)."""
        raise NotImplementedError

    # --- shared plumbing ---------------------------------------------------------

    def _q(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if self._param != "?":
            sql = sql.replace("?", self._param)
        return self._execute(sql, params)

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._q(sql, params).fetchone()

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        """``begin`` ... ``commit``; ``rollback`` on any exception."""
        self.begin()
        try:
            yield self
        except BaseException:
            if self.in_transaction:
                self.rollback()
            raise
        self.commit()

    def savepoint(self) -> None:
        self._execute("SAVEPOINT req")

    def release_savepoint(self) -> None:
        self._execute("RELEASE SAVEPOINT req")

    def rollback_savepoint(self) -> None:
        self._execute("ROLLBACK TO SAVEPOINT req")
        self._execute("RELEASE SAVEPOINT req")

    # --- meta ----------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT v FROM meta WHERE k = ?", (key,))
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._q(
            "INSERT INTO meta (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            (key, value),
        )

    # --- licences --------------------------------------------------------------------

    def has_client_key(self, client_public_key: str) -> bool:
        return self._one("SELECT 1 FROM licences WHERE client_public_key = ?",
                         (client_public_key,)) is not None  # fmt: skip

    def licence_by_key(self, client_public_key: str) -> LicenceRecord | None:
        row = self._one(
            f"SELECT {LICENCE_COLS} FROM licences WHERE client_public_key = ?",
            (client_public_key,),
        )
        return None if row is None else _licence(row)

    def licence(self, licence_id: str) -> LicenceRecord | None:
        row = self._one(f"SELECT {LICENCE_COLS} FROM licences WHERE licence_id = ?", (licence_id,))
        return None if row is None else _licence(row)

    def licences(self) -> list[LicenceRecord]:
        rows = self._q(f"SELECT {LICENCE_COLS} FROM licences ORDER BY issued_at, licence_id")
        return [_licence(r) for r in rows.fetchall()]

    def insert_licence(self, rec: LicenceRecord) -> None:
        self._q(
            f"INSERT INTO licences ({LICENCE_COLS}) VALUES ({', '.join(['?'] * 20)})",
            (rec.licence_id, rec.holder, rec.role, rec.model_id, rec.client_public_key,
             rec.issued_at, rec.expires_at, rec.max_calls, rec.rate_limit, rec.grace,
             rec.revoked_at, rec.used_calls, rec.reserved_calls, rec.rate_tokens, rec.rate_at,
             rec.kind, int(rec.same_user),
             json.dumps(list(rec.devices)) if rec.devices else None, rec.proof_public_key,
             rec.mac),
        )  # fmt: skip

    def update_licence(self, rec: LicenceRecord) -> None:
        """Write the licence's changing columns (revocation, meters) and its tag."""
        self._q(
            "UPDATE licences SET revoked_at = ?, used_calls = ?, reserved_calls = ?,"
            " rate_tokens = ?, rate_at = ?, mac = ? WHERE licence_id = ?",
            (rec.revoked_at, rec.used_calls, rec.reserved_calls, rec.rate_tokens, rec.rate_at,
             rec.mac, rec.licence_id),
        )  # fmt: skip

    # --- package keys ------------------------------------------------------------------

    def key(self, model_id: str, key_id: str) -> KeyRow | None:
        row = self._one(
            "SELECT package_digest, wrapped FROM keys WHERE model_id = ? AND key_id = ?",
            (model_id, key_id),
        )
        return None if row is None else KeyRow(model_id, key_id, str(row[0]), bytes(row[1]))

    def keys(self) -> list[KeyRow]:
        rows = self._q("SELECT model_id, key_id, package_digest, wrapped FROM keys").fetchall()
        return [KeyRow(str(r[0]), str(r[1]), str(r[2]), bytes(r[3])) for r in rows]

    def model_ids(self, *, limit: int = 1000) -> list[str]:
        """The model ids that have a registered key (sorted, at most ``limit``)."""
        rows = self._q("SELECT DISTINCT model_id FROM keys ORDER BY model_id LIMIT ?", (limit,))
        return [str(r[0]) for r in rows.fetchall()]

    def has_model(self, model_id: str) -> bool:
        return self._one("SELECT 1 FROM keys WHERE model_id = ? LIMIT 1", (model_id,)) is not None

    def insert_key(self, row: KeyRow, *, registered_at: float) -> None:
        self._q(
            "INSERT INTO keys (model_id, key_id, package_digest, wrapped, registered_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (row.model_id, row.key_id, row.package_digest, row.wrapped, registered_at),
        )

    def set_wrapped(self, model_id: str, key_id: str, wrapped: bytes) -> None:
        self._q(
            "UPDATE keys SET wrapped = ? WHERE model_id = ? AND key_id = ?",
            (wrapped, model_id, key_id),
        )

    # --- leases ----------------------------------------------------------------------------

    def insert_lease(self, row: LeaseRow) -> None:
        self._q(
            "INSERT INTO leases (lease_id, licence_id, model_id, key_id, issued_at, expires_at,"
            " hard_end, call_budget, ended, device_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.lease_id, row.licence_id, row.model_id, row.key_id, row.issued_at,
             row.expires_at, row.hard_end, row.call_budget, int(row.ended), row.device_id),
        )  # fmt: skip

    def lease(self, lease_id: str, licence_id: str) -> LeaseRow | None:
        """The lease, only if it belongs to ``licence_id`` and was granted to
        no device (a device's lease is renewed by that device only)."""
        r = self._one(
            f"SELECT {_LEASE_COLS} FROM leases WHERE lease_id = ? AND licence_id = ?"
            " AND device_id IS NULL",
            (lease_id, licence_id),
        )
        return None if r is None else _lease(r)

    def device_lease(self, lease_id: str, device_id: str) -> LeaseRow | None:
        """The lease, only if it was granted to ``device_id``."""
        r = self._one(
            f"SELECT {_LEASE_COLS} FROM leases WHERE lease_id = ? AND device_id = ?",
            (lease_id, device_id),
        )
        return None if r is None else _lease(r)

    # --- devices -------------------------------------------------------------------------

    def device_by_key(self, public_key: str) -> DeviceRecord | None:
        r = self._one(f"SELECT {_DEVICE_COLS} FROM devices WHERE public_key = ?", (public_key,))
        return None if r is None else _device(r)

    def device(self, device_id: str) -> DeviceRecord | None:
        r = self._one(f"SELECT {_DEVICE_COLS} FROM devices WHERE device_id = ?", (device_id,))
        return None if r is None else _device(r)

    def devices(self) -> list[DeviceRecord]:
        rows = self._q(f"SELECT {_DEVICE_COLS} FROM devices ORDER BY enrolled_at, device_id")
        return [_device(r) for r in rows.fetchall()]

    def insert_device(self, rec: DeviceRecord) -> None:
        self._q(
            f"INSERT INTO devices ({_DEVICE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (rec.device_id, rec.public_key, rec.name, rec.enrolled_at, rec.enrolled_by,
             rec.revoked_at, rec.mac),
        )  # fmt: skip

    def update_device(self, rec: DeviceRecord) -> None:
        """Write the device's changing column (revocation) and its tag."""
        self._q("UPDATE devices SET revoked_at = ?, mac = ? WHERE device_id = ?",
                (rec.revoked_at, rec.mac, rec.device_id))  # fmt: skip

    def service_device_tag(self, device_id: str) -> str | None:
        """The tag of the row that names ``device_id`` a service, or None."""
        r = self._one("SELECT mac FROM service_devices WHERE device_id = ?", (device_id,))
        return None if r is None else str(r[0])

    def insert_service_device(self, device_id: str, tag: str) -> None:
        self._q("INSERT INTO service_devices (device_id, mac) VALUES (?, ?)", (device_id, tag))

    def update_service_device(self, device_id: str, tag: str) -> None:
        self._q("UPDATE service_devices SET mac = ? WHERE device_id = ?", (tag, device_id))

    def end_device_leases(self, device_id: str) -> None:
        """End every lease granted to a (revoked) device; what they reserved
        stays spent: fail closed, as for a worker that died."""
        self._q("UPDATE leases SET ended = 1, call_budget = 0 WHERE device_id = ?", (device_id,))

    def lapsed_leases_of(self, licence_id: str, now: float) -> list[LeaseRow]:
        """Open leases of the licence whose hard end has passed (an index
        range: the cost does not grow with the live leases)."""
        rows = self._q(
            f"SELECT {_LEASE_COLS} FROM leases WHERE licence_id = ? AND ended = 0 AND hard_end < ?",
            (licence_id, now),
        )
        return [_lease(r) for r in rows.fetchall()]

    def extend_lease(
        self,
        lease_id: str,
        *,
        expires_at: float,
        hard_end: float,
        call_budget: int | None,
        calls: int,
    ) -> None:
        """New expiry and budget; ``calls`` more were reported on it."""
        self._q(
            "UPDATE leases SET expires_at = ?, hard_end = ?, call_budget = ?, calls = calls + ?"
            " WHERE lease_id = ?",
            (expires_at, hard_end, call_budget, calls, lease_id),
        )

    def end_lease(self, lease_id: str, *, calls: int = 0) -> None:
        """Mark it ended (nothing reserved any more); ``calls`` more were reported."""
        self._q(
            "UPDATE leases SET ended = 1, call_budget = 0, calls = calls + ? WHERE lease_id = ?",
            (calls, lease_id),
        )

    def count_leases(self) -> int:
        return int(self._one("SELECT count(*) FROM leases")[0])

    # --- metering ids (idempotent usage reports and call grants) -----------------------

    def ensure_metering_ids(self) -> None:
        """The metering ids' and used proofs' tables, in a database made
        before they existed (idempotent)."""
        for stmt in (METERING_SCHEMA + PROOF_SCHEMA + SERVICE_SCHEMA).split(";"):
            if stmt.strip():
                self._execute(stmt)

    def metering_id(self, ident: str) -> MeteringId | None:
        r = self._one(
            "SELECT id, kind, licence_id, budget, released FROM metering_ids WHERE id = ?",
            (ident,),
        )
        if r is None:
            return None
        return MeteringId(str(r[0]), str(r[1]), r[2], None if r[3] is None else int(r[3]),
                          bool(r[4]))  # fmt: skip

    def insert_metering_id(self, row: MeteringId, *, at: float) -> None:
        self._q(
            "INSERT INTO metering_ids (id, kind, licence_id, budget, released, at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (row.ident, row.kind, row.licence_id, row.budget, int(row.released), at),
        )

    def release_metering_id(self, ident: str) -> None:
        self._q("UPDATE metering_ids SET released = 1 WHERE id = ?", (ident,))

    def prune_metering_ids(self, before: float) -> None:
        """Forget ids older than ``before``; a grant never given back is
        lapsed (:func:`keyserver.calls.lapse_grants`) long before that."""
        self._q("DELETE FROM metering_ids WHERE at < ? AND NOT (kind = 'grant' AND released = 0)",
                (before,))  # fmt: skip

    def open_grants_before(self, before: float, *, limit: int = 1024) -> list[MeteringId]:
        """Call grants made before ``before`` and not yet given back, oldest first."""
        rows = self._q(
            "SELECT id, kind, licence_id, budget, released FROM metering_ids"
            " WHERE kind = 'grant' AND released = 0 AND at < ? ORDER BY at LIMIT ?",
            (before, limit),
        ).fetchall()
        return [MeteringId(str(r[0]), str(r[1]), r[2], None if r[3] is None else int(r[3]),
                           bool(r[4])) for r in rows]  # fmt: skip

    # --- used proofs (a proof of possession is good once) --------------------------------

    def use_proof(self, ident: str, *, expires_at: float, now: float) -> bool:
        """Record the proof ``ident`` as used until ``expires_at``; False if it
        was used before (and that use has not expired). Atomic on both
        engines: of two transactions inserting one id, one inserts, the other
        finds it (PostgreSQL: the replicas' writers are serialised, and the
        primary key decides in any case)."""
        self._q("DELETE FROM used_proofs WHERE expires_at < ?", (now,))
        cur = self._q(
            "INSERT INTO used_proofs (id, expires_at) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
            (ident, expires_at),
        )
        return bool(cur.rowcount == 1)

    def count_used_proofs(self) -> int:
        return int(self._one("SELECT count(*) FROM used_proofs")[0])

    # --- audit ---------------------------------------------------------------------------------

    def audit_head(self) -> tuple[int, bytes] | None:
        row = self._one("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        return None if row is None else (int(row[0]), bytes(row[1]))

    def insert_audit(self, row: AuditRow) -> None:
        self._q(
            f"INSERT INTO audit ({_AUDIT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.seq, row.ts, row.event, row.actor, row.licence_id, row.model_id, row.detail,
             row.prev_hash, row.hash),
        )  # fmt: skip

    def audit_rows(self) -> Iterator[AuditRow]:
        for r in self._q(f"SELECT {_AUDIT_COLS} FROM audit ORDER BY seq"):
            yield AuditRow(int(r[0]), float(r[1]), str(r[2]), r[3], r[4], r[5], str(r[6]),
                           bytes(r[7]), bytes(r[8]))  # fmt: skip

    def audit_row(self, seq: int) -> AuditRow | None:
        r = self._one(f"SELECT {_AUDIT_COLS} FROM audit WHERE seq = ?", (seq,))
        if r is None:
            return None
        return AuditRow(int(r[0]), float(r[1]), str(r[2]), r[3], r[4], r[5], str(r[6]),
                        bytes(r[7]), bytes(r[8]))  # fmt: skip


class SqliteStore(Store):
    """:class:`Store` on one SQLite file (WAL, ``synchronous=FULL``)."""

    kind = "sqlite"
    errors = (sqlite3.Error,)

    def __init__(self, conn: sqlite3.Connection, *, path: str | None = None) -> None:
        self.conn = conn
        self.path = path

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = False) -> SqliteStore:
        return cls(connect(path, create=create), path=os.fspath(path))

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(sql, params)

    def begin(self) -> None:
        # IMMEDIATE takes the write lock up front, so a concurrent writer (e.g.
        # rotate-master while a stray process holds the DB) fails here, not halfway.
        self.conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        self.conn.execute("ROLLBACK")

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def close(self) -> None:
        self.conn.close()

    def audit_high_water(self) -> int:
        try:
            row = self.conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'audit'"
            ).fetchone()
        except sqlite3.OperationalError:
            return 0
        return 0 if row is None else int(row[0])

    # --- SQLite housekeeping (the server's checkpointer thread) ---------------------

    def disable_autocheckpoint(self) -> None:
        self.conn.execute("PRAGMA wal_autocheckpoint=0")

    def checkpoint(self, mode: str = "PASSIVE") -> None:
        assert mode in ("PASSIVE", "TRUNCATE")
        self.conn.execute(f"PRAGMA wal_checkpoint({mode})")


def open_store(database: str | os.PathLike[str], *, create: bool = False) -> Store:
    """A :class:`Store` for ``database``: a ``postgresql://`` URL or a SQLite path."""
    db = os.fspath(database)
    if db.startswith(("postgresql://", "postgres://")):
        from .store_pg import PostgresStore

        pg: Store = PostgresStore.open(db, create=create)
        return pg
    return SqliteStore.open(db, create=create)


# --- the SQLite connection itself ------------------------------------------------------


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
        conn.executescript(_SCHEMA + METERING_SCHEMA + PROOF_SCHEMA + SERVICE_SCHEMA)
        set_meta(conn, "schema_version", SCHEMA_VERSION)
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on a raw SQLite connection (tests, tools)."""
    with SqliteStore(conn).transaction():
        yield conn


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    return SqliteStore(conn).get_meta(key)


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    SqliteStore(conn).set_meta(key, value)
