"""A key server directory: what ``init`` creates, loading the master key,
and master-key rotation.

::

    DIR/keyserver.db      SQLite (WAL): licences, wrapped keys, leases, audit
    DIR/master.key        32-byte master key, 0600 (wraps every package key)
    DIR/server.secret     the server's CURVE key pair (JSON, 0600)
    DIR/server.pub        the server's CURVE public key (Z85 text)
    DIR/publisher.key     the publisher's Ed25519 signing key, 0600
    DIR/publisher.pub     its public half
    DIR/audit.key         the key server's Ed25519 key for audit checkpoints, 0600
    DIR/audit.pub         its public half (``audit --verify --anchor`` checks with it)
    DIR/admin.licence     the admin licence (issue, revoke, list, register keys)
    DIR/keyserver.lock    flock held by a running server (and by rotate-master)

Example::

    created = init_dir("ks", address="tcp://127.0.0.1:7700")
    with exclusive_lock("ks"):
        rotate_master("ks")
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import zmq

from vault.core import crypto as _crypto
from vault.core.errors import ConfigError, IntegrityError, KeyServerError
from vault.core.files import read_secret_file
from vault.core.licence import Licence, write_private_file

from . import audit
from .policy import LicenceRecord
from .rowauth import RowAuth
from .store import SqliteStore, Store

__all__ = [
    "DEFAULT_ADDRESS",
    "Paths",
    "exclusive_lock",
    "init_dir",
    "load_audit_key",
    "load_master",
    "master_id",
    "new_licence_id",
    "rotate_master",
]

from .commands import DEFAULT_ADDRESS  # one default, where the CLI parser is


@dataclass(frozen=True)
class Paths:
    root: str

    def _p(self, name: str) -> str:
        return os.path.join(self.root, name)

    @property
    def db(self) -> str:
        return self._p("keyserver.db")

    @property
    def master(self) -> str:
        return self._p("master.key")

    @property
    def master_new(self) -> str:
        return self._p("master.key.new")

    @property
    def server_secret(self) -> str:
        return self._p("server.secret")

    @property
    def server_public(self) -> str:
        return self._p("server.pub")

    @property
    def publisher_key(self) -> str:
        return self._p("publisher.key")

    @property
    def publisher_pub(self) -> str:
        return self._p("publisher.pub")

    @property
    def audit_key(self) -> str:
        return self._p("audit.key")

    @property
    def audit_pub(self) -> str:
        return self._p("audit.pub")

    @property
    def admin_licence(self) -> str:
        return self._p("admin.licence")

    @property
    def lock(self) -> str:
        return self._p("keyserver.lock")


def master_id(master: bytes | bytearray) -> str:
    """A public fingerprint of the master key (a hash of a 256-bit secret),
    stored in the DB so a mismatched master file is caught at start-up."""
    return hashlib.sha256(b"vault-master-id/v1\x00" + bytes(master)).hexdigest()[:32]


def new_licence_id() -> str:
    return "lic-" + os.urandom(8).hex()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def exclusive_lock(root: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``DIR/keyserver.lock``: one server per directory, and no
    rotation under a running server (which holds the old master in memory)."""
    path = Paths(os.fspath(root)).lock
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:  # a read-only directory (a mounted Secret) or not ours
        raise ConfigError(
            f"{path}: cannot take the key server's lock ({exc.strerror}); a directory the "
            "server cannot write (replicas' shared files) needs a PostgreSQL store: "
            "$VAULT_DATABASE_URL or --database-file"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise KeyServerError(
                f"{root}: a key server (or another rotate-master) is running on this directory"
            ) from exc
        yield
    finally:
        os.close(fd)  # closing releases the flock


def init_dir(
    root: str | os.PathLike[str], *, address: str = DEFAULT_ADDRESS, database: str | None = None
) -> dict[str, str]:
    """Create a fresh key server directory; returns {what: path or value}.

    ``database``: a PostgreSQL URL whose schema, meta and admin row are
    created here (the replicas' shared store); by default ``DIR/keyserver.db``.
    Refuses a directory or database that already holds a key server (no
    silent overwrite of a master key).

    ``DIR`` is made private whatever existed before: mode 0700 (an existing
    0755 directory included), owned by whoever runs ``init`` (a directory of
    another user is refused: its owner could read or swap what is written
    there), and every file written in it is 0600 (the database holds holder
    names, quotas, usage, devices and the audit; SQLite gives its ``-wal``
    and ``-shm`` files the database's own mode).
    """
    paths = Paths(os.fspath(root))
    os.makedirs(paths.root, mode=0o700, exist_ok=True)
    st = os.stat(paths.root)
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"{paths.root} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}): "
            "a key server directory must be its own user's"
        )
    os.chmod(paths.root, 0o700)
    if os.path.exists(paths.db) or (database is not None and os.path.exists(paths.master)):
        raise ConfigError(f"{paths.root} already holds a key server; refusing to overwrite it")
    old_umask = os.umask(0o077)  # every file made below is 0600 from its first byte
    try:
        return _init_files(paths, address=address, database=database)
    finally:
        os.umask(old_umask)


def _init_files(paths: Paths, *, address: str, database: str | None) -> dict[str, str]:
    master = _crypto.generate_key()
    server_public, server_secret = zmq.curve_keypair()
    admin_public, admin_secret = zmq.curve_keypair()
    publisher = _crypto.PublisherKey.generate()
    publisher_b64 = base64.b64encode(publisher.public_raw).decode()
    now = time.time()
    licence_id = new_licence_id()
    try:
        # Secrets first, DB last: a DB present means a complete directory.
        write_private_file(paths.master, bytes(master))
        write_private_file(
            paths.server_secret,
            json.dumps(
                {"public": server_public.decode(), "secret": server_secret.decode()}
            ).encode(),
        )
        with open(paths.server_public, "w") as fh:
            fh.write(server_public.decode() + "\n")
        os.chmod(paths.server_public, 0o600)
        publisher.save(paths.publisher_key, paths.publisher_pub)
        _crypto.PublisherKey.generate().save(paths.audit_key, paths.audit_pub)
        admin = Licence(
            licence_id=licence_id,
            holder="admin",
            keyserver_address=address,
            keyserver_public_key=server_public.decode(),
            client_public_key=admin_public.decode(),
            client_secret_key=admin_secret.decode(),
            publisher_key=publisher_b64,
            model_id=None,
            role="admin",
        )
        admin.save(paths.admin_licence)
        tmp_db = paths.db + ".init"
        st: Store
        if database is not None:
            from .store_pg import PostgresStore

            st = PostgresStore.open(database, create=True)
        else:
            for leftover in (tmp_db, tmp_db + "-wal", tmp_db + "-shm"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
            st = SqliteStore.open(tmp_db, create=True)
        try:
            with st.transaction():
                if st.get_meta("master_id") is not None:
                    raise ConfigError("the database already holds a key server; refusing it")
                for k, v in {
                    "address": address,
                    "server_public_key": server_public.decode(),
                    "publisher_key": publisher_b64,
                    "master_id": master_id(master),
                    "created_at": repr(now),
                }.items():
                    st.set_meta(k, v)
                rows = RowAuth(master)
                st.insert_licence(rows.seal(
                    LicenceRecord(licence_id, "admin", "admin", None, admin_public.decode(), now,
                                  None, None, None, 0.0, None, 0, kind="admin")
                ))  # fmt: skip
                rows.wipe()
                audit.append(
                    st, ts=now, event="initialised", actor="init", licence_id=licence_id,
                    detail={"role": "admin", "address": address},
                )  # fmt: skip
            if isinstance(st, SqliteStore):
                st.checkpoint("TRUNCATE")
        finally:
            st.close()
        if database is None:
            os.chmod(tmp_db, 0o600)
            os.replace(tmp_db, paths.db)
        _fsync_dir(paths.root)
    finally:
        _crypto.zeroize(master)
    return {
        "server public key": server_public.decode(),
        "address": address,
        "database": "postgresql" if database is not None else paths.db,
        "master key": paths.master,
        "server keys": paths.server_secret,
        "publisher key": paths.publisher_key,
        "publisher public key": paths.publisher_pub,
        "audit checkpoint key": paths.audit_key,
        "admin licence": paths.admin_licence,
        "admin licence id": licence_id,
    }


def load_audit_key(root: str | os.PathLike[str]) -> _crypto.PublisherKey:
    """The key server's checkpoint signing key; made on first use for a
    directory initialised before it existed."""
    paths = Paths(os.fspath(root))
    if not os.path.exists(paths.audit_key):
        _crypto.PublisherKey.generate().save(paths.audit_key, paths.audit_pub)
    return _crypto.PublisherKey.load(paths.audit_key)


def load_server_keys(root: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) Z85 CURVE keys of the server."""
    path = Paths(os.fspath(root)).server_secret
    data = json.loads(read_secret_file(path, limit=64 << 10, what="server's secret CURVE key"))
    return data["public"].encode(), data["secret"].encode()


def _read_master(path: str) -> bytearray:
    data = bytearray(read_secret_file(path, limit=4096, what="master key"))
    if len(data) != _crypto.KEY_SIZE:
        raise ConfigError(f"{path}: not a master key file")
    return data


def load_master(root: str | os.PathLike[str], st: Store | sqlite3.Connection) -> bytearray:
    """Read the master key and check it against the DB's ``master_id``.

    Finishes an interrupted rotation: if the DB already names the key in
    ``master.key.new`` (the crash came after the DB commit, before the
    rename), the rename is completed here; a stale ``master.key.new`` from a
    rotation that never committed is removed.
    """
    if isinstance(st, sqlite3.Connection):
        st = SqliteStore(st)
    paths = Paths(os.fspath(root))
    want = st.get_meta("master_id")
    master = _read_master(paths.master)
    if master_id(master) == want:
        if os.path.exists(paths.master_new):
            os.unlink(paths.master_new)  # rotation that never committed
        return master
    if os.path.exists(paths.master_new):
        new = _read_master(paths.master_new)
        if master_id(new) == want:
            os.replace(paths.master_new, paths.master)
            _fsync_dir(paths.root)
            _crypto.zeroize(master)
            return new
        _crypto.zeroize(new)
    _crypto.zeroize(master)
    raise IntegrityError(f"{paths.master} does not match the key server database")


def rotate_master(root: str | os.PathLike[str], *, database: str | None = None) -> int:
    """Re-wrap every package key under a fresh master key; returns how many.

    Crash order (each step leaves a loadable directory):

    1. write ``master.key.new`` (fsync). Crash here: the DB still names the
       old key; :func:`load_master` deletes the stale file.
    2. one transaction: re-wrap every key, set ``master_id``, audit record.
       Licence rows are re-tagged under the new master's row key (a row
       that fails its old tag stays refused: rotation launders nothing).
       Crash before COMMIT: the store rolls it back, as in 1. Crash after
       COMMIT: the DB names the new key; :func:`load_master` finds it in
       ``master.key.new`` and completes step 3.
    3. rename ``master.key.new`` over ``master.key`` (atomic), fsync the dir.

    Call it with the server stopped (``exclusive_lock`` enforces this).
    ``database`` names the store (a PostgreSQL URL); by default ``DIR/keyserver.db``.
    """
    from .store import open_store

    paths = Paths(os.fspath(root))
    st = open_store(database or paths.db)
    try:
        old = load_master(paths.root, st)
        new = _crypto.generate_key()
        try:
            write_private_file(paths.master_new, bytes(new))
            _fsync_dir(paths.root)
            with st.transaction():
                rows = st.keys()
                for row in rows:
                    ids = {"key_id": row.key_id, "model_id": row.model_id}
                    key = _crypto.unwrap_key(old, row.wrapped, **ids)
                    try:
                        st.set_wrapped(row.model_id, row.key_id, _crypto.wrap_key(new, key, **ids))
                    finally:
                        _crypto.zeroize(key)
                old_rows, new_rows = RowAuth(old), RowAuth(new)
                refused = []
                for lic in st.licences():
                    if old_rows.authentic(lic):
                        st.update_licence(new_rows.seal(lic))
                    else:
                        refused.append(lic.licence_id)
                st.ensure_metering_ids()  # a database made before the service designations
                for dev in st.devices():
                    if old_rows.device_authentic(dev):
                        st.update_device(new_rows.seal_device(dev))
                    else:
                        refused.append(dev.device_id)
                    tag = st.service_device_tag(dev.device_id)  # its designation as a service
                    if tag is None:
                        continue
                    try:
                        good = old_rows.ok("service_devices", [dev.device_id], bytes.fromhex(tag))
                    except ValueError:
                        good = False
                    if good:
                        new_tag = new_rows.tag("service_devices", [dev.device_id]).hex()
                        st.update_service_device(dev.device_id, new_tag)
                    else:
                        refused.append(f"service:{dev.device_id}")
                old_rows.wipe()
                new_rows.wipe()
                st.set_meta("master_id", master_id(new))
                audit.append(
                    st, ts=time.time(), event="master_rotated", actor="rotate-master",
                    detail={"keys": len(rows), "master_id": master_id(new),
                            "refused_rows": refused},
                )  # fmt: skip
            os.replace(paths.master_new, paths.master)
            _fsync_dir(paths.root)
            return len(rows)
        finally:
            _crypto.zeroize(old)
            _crypto.zeroize(new)
    finally:
        st.close()
