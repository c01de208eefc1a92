from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from keyserver import init_dir, layout, rotate_master, store
from vault.core import crypto as _crypto
from vault.core.errors import ConfigError, IntegrityError, KeyServerError
from vault.core.licence import Licence


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_init_creates_every_file_with_private_modes(tmp_path, capsys):
    d = tmp_path / "ks"
    created = init_dir(d, address="tcp://10.0.0.1:7700")
    for name in ("master.key", "server.secret", "publisher.key", "audit.key", "admin.licence"):
        assert _mode(d / name) == 0o600, name
    assert _mode(d) == 0o700
    assert (d / "publisher.pub").exists() and (d / "keyserver.db").exists()
    admin = Licence.load(d / "admin.licence")
    assert admin.is_admin and admin.keyserver_address == "tcp://10.0.0.1:7700"
    assert admin.keyserver_public_key == created["server public key"]
    publisher = _crypto.PublisherKey.load(d / "publisher.key")
    assert base64.b64decode(admin.publisher_key) == publisher.public_raw
    secret = json.loads((d / "server.secret").read_text())
    assert secret["public"] == created["server public key"]
    conn = store.connect(d / "keyserver.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.get_meta(conn, "address") == "tcp://10.0.0.1:7700"
        master = layout.load_master(d, conn)
        assert len(master) == 32
    finally:
        conn.close()
    with pytest.raises(ConfigError, match="already holds a key server"):
        init_dir(d)


def _add_key(d, key: bytearray) -> None:
    conn = store.connect(d / "keyserver.db")
    try:
        master = layout.load_master(d, conn)
        with store.transaction(conn):
            conn.execute(
                "INSERT INTO keys VALUES ('m', 'k', 'd', ?, 0)",
                (_crypto.wrap_key(master, key, key_id="k", model_id="m"),),
            )
    finally:
        conn.close()


def _unwrap(d) -> bytearray:
    conn = store.connect(d / "keyserver.db")
    try:
        master = layout.load_master(d, conn)
        [wrapped] = conn.execute("SELECT wrapped FROM keys").fetchone()
        return _crypto.unwrap_key(master, wrapped, key_id="k", model_id="m")
    finally:
        conn.close()


def test_rotation_and_its_crash_windows(tmp_path):
    d = tmp_path / "ks"
    init_dir(d)
    key = _crypto.generate_key()
    _add_key(d, key)
    assert rotate_master(d) == 1 and _unwrap(d) == key

    # crash after writing master.key.new, before the DB commit: stale file removed
    (d / "master.key.new").write_bytes(os.urandom(32))
    (d / "master.key.new").chmod(0o600)
    assert _unwrap(d) == key and not (d / "master.key.new").exists()

    # crash after the DB commit, before the rename: the rename is completed
    before = (d / "master.key").read_bytes()
    rotate_master(d)
    after = (d / "master.key").read_bytes()
    os.replace(d / "master.key", d / "master.key.new")
    (d / "master.key").write_bytes(before)
    (d / "master.key").chmod(0o600)
    assert _unwrap(d) == key
    assert (d / "master.key").read_bytes() == after and not (d / "master.key.new").exists()

    # a master file that matches nothing: refuse, do not guess
    (d / "master.key").write_bytes(os.urandom(32))
    with pytest.raises(IntegrityError):
        _unwrap(d)


def test_lock_is_exclusive(tmp_path):
    d = tmp_path / "ks"
    init_dir(d)
    with layout.exclusive_lock(d):
        with pytest.raises(KeyServerError, match="running"):
            with layout.exclusive_lock(d):
                pass
    with layout.exclusive_lock(d):
        pass
