"""Insiders with write access to the key server's database (issue 10).

The attack, as reported: with the server running, insert an admin row with
one's own key, use it to issue a licence and obtain a key, then drop the
triggers, delete the audit records, re-hash the chain and restore the
triggers: ``audit --verify`` said "OK" with the same head as before.

Here the insider is ``nobody`` with write access to the database files (not
to the key server's directory, its master key or the anchor), running
Debian's ``/usr/bin/python3`` with nothing but the standard library. Each
step is performed for real; the forged rows are refused and reported, and
the re-hashed log still passes the chain check alone (the control) but
fails against the signed checkpoints in the anchor.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.conftest import ROOT, KeyServerProcess
from tests.prereq import require
from vault.core import crypto as _crypto
from vault.core.errors import UnknownLicenceError
from vault.core.keyclient import KeyServerClient
from vault.core.licence import Licence

SYSTEM_PYTHON = "/usr/bin/python3"
MODEL, KEY_ID, DIGEST = "insider-model", "k1", "sha256:" + "ab" * 32

# The insider's tools: stdlib only, the chain rule re-implemented from the docs.
INSERT_ROWS = r"""
import json, sqlite3, sys, time
db, evil_pub, evil_pub2, victim = sys.argv[1:5]
c = sqlite3.connect(db, isolation_level=None)
c.execute("PRAGMA busy_timeout=5000")
admin_mac = c.execute("SELECT mac FROM licences WHERE role = 'admin'").fetchone()[0]
c.execute("BEGIN IMMEDIATE")
# an admin row with the insider's own key (no tag: the insider has no master key)
c.execute("INSERT INTO licences (licence_id, holder, role, model_id, client_public_key, issued_at,"
          " grace, used_calls) VALUES ('lic-evil', 'mallory', 'admin', NULL, ?, ?, 0, 0)",
          (evil_pub, time.time()))
# a caller row for the model, wearing the real admin row's tag
c.execute("INSERT INTO licences (licence_id, holder, role, model_id, client_public_key, issued_at,"
          " grace, used_calls, mac) VALUES ('lic-evil2', 'mallory', 'caller', ?, ?, ?, 0, 0, ?)",
          (sys.argv[5], evil_pub2, time.time(), admin_mac))
# an edit of a genuine licence: lift its quota
c.execute("UPDATE licences SET max_calls = 1000000 WHERE licence_id = ?", (victim,))
c.execute("COMMIT")
print("inserted")
"""

REWRITE_AUDIT = r"""
import hashlib, json, sqlite3, sys
db = sys.argv[1]
DOMAIN = b"vault-audit/v1\x00"
def canonical(seq, ts, event, actor, lic, model, detail):
    return json.dumps([seq, repr(float(ts)), event, actor, lic, model, detail],
                      separators=(",", ":"), ensure_ascii=True).encode()
c = sqlite3.connect(db, isolation_level=None)
c.execute("PRAGMA busy_timeout=5000")
before = c.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
c.execute("BEGIN IMMEDIATE")
c.execute("DROP TRIGGER audit_no_update")
c.execute("DROP TRIGGER audit_no_delete")
rows = c.execute("SELECT seq, ts, event, actor, licence_id, model_id, detail FROM audit"
                 " ORDER BY seq").fetchall()
evil = [r for r in rows if r[4] in ("lic-evil", "lic-evil2") or "lic-evil" in r[6]]
first = min(r[0] for r in evil)
keep = [r for r in rows if r[0] >= first and r not in evil]
c.execute("DELETE FROM audit WHERE seq >= ?", (first,))
prev = c.execute("SELECT hash FROM audit WHERE seq = ?", (first - 1,)).fetchone()[0]
seq = first
for _, ts, event, actor, lic, model, detail in keep:   # renumber and re-hash the rest
    h = hashlib.sha256(DOMAIN + prev + canonical(seq, ts, event, actor, lic, model, detail)).digest()
    c.execute("INSERT INTO audit (seq, ts, event, actor, licence_id, model_id, detail, prev_hash,"
              " hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (seq, ts, event, actor, lic, model,
              detail, prev, h))
    prev, seq = h, seq + 1
c.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'audit'", (seq - 1,))
c.execute("CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit"
          " BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END")
c.execute("CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit"
          " BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END")
c.execute("COMMIT")
print(json.dumps({"deleted": len(evil), "events": [r[2] for r in evil], "head_before": before[0]}))
"""


def _as_nobody(cmd: list[str]) -> list[str]:
    nb = pwd.getpwnam("nobody")
    return ["setpriv", f"--reuid={nb.pw_uid}", f"--regid={nb.pw_gid}", "--clear-groups", *cmd]


def _run_as_nobody(script: str, *args: str) -> str:
    res = subprocess.run(
        _as_nobody([SYSTEM_PYTHON, "-I", "-B", "-c", script, *args]),
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, capture_output=True, text=True,
        cwd="/", timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout


def _vault(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "vault", *args], capture_output=True, text=True,
                          env=env, timeout=60)  # fmt: skip


@pytest.fixture
def insider_setup() -> Iterator[dict[str, Any]]:
    require(os.geteuid() == 0 and shutil.which("setpriv") is not None
            and os.path.exists(SYSTEM_PYTHON), "root, setpriv and /usr/bin/python3 to act as nobody")  # fmt: skip
    from keyserver import init_dir

    base = Path(tempfile.mkdtemp(prefix="vault-insider-"))
    ks = None
    try:
        os.chmod(base, 0o711)
        d = base / "ks"
        init_dir(d, address="tcp://127.0.0.1:7700")
        os.chmod(d, 0o711)  # nobody may reach the database files, not list or write the dir
        anchor_dir = base / "anchor"
        anchor_dir.mkdir(mode=0o755)
        anchor = anchor_dir / "audit.anchor"
        ks = KeyServerProcess(d, lease_ttl=2.0)
        ks.extra_args = ["--anchor", str(anchor)]
        ks.start()
        ks.register(MODEL, KEY_ID, _crypto.generate_key(), DIGEST)
        for name in ("keyserver.db", "keyserver.db-wal", "keyserver.db-shm"):
            os.chmod(d / name, 0o666)  # the insider: write access to the database
        yield {"ks": ks, "dir": d, "anchor": anchor}
    finally:
        if ks is not None:
            ks.kill()
        shutil.rmtree(base, ignore_errors=True)


def _licence_for(real: Licence, licence_id: str, public: bytes, secret: bytes) -> Licence:
    return Licence.from_json({**real.to_json(), "licence_id": licence_id,
                              "client": {"public_key": public.decode(),
                                         "secret_key": secret.decode()}})  # fmt: skip


def _release(lic: Licence) -> Any:
    with KeyServerClient(lic, timeout=5) as ks:
        return ks.release(model_id=MODEL, key_id=KEY_ID, package_digest=DIGEST)


def test_insider_rows_are_refused_and_a_rewritten_log_fails_against_the_anchor(insider_setup):
    ks, d, anchor = insider_setup["ks"], insider_setup["dir"], insider_setup["anchor"]
    bob = ks.issue(MODEL, holder="bob", max_calls=3, same_user=True)  # tier 0: its own key asks
    assert _release(bob).key  # bob's genuine licence works (and its release is audited)
    admin = Licence.load(ks.admin_licence)
    evil_pub, evil_sec = zmq.curve_keypair()
    evil2_pub, evil2_sec = zmq.curve_keypair()

    # 1. insert an admin row with one's own key, a caller row, and edit bob's quota
    out = _run_as_nobody(INSERT_ROWS, str(d / "keyserver.db"), evil_pub.decode(),
                         evil2_pub.decode(), bob.licence_id, MODEL)  # fmt: skip
    assert "inserted" in out

    # 2. use them: issue a licence, obtain a key -- refused, as if the rows did not exist
    forged_admin = _licence_for(admin, "lic-evil", evil_pub, evil_sec)
    with KeyServerClient(forged_admin, timeout=5) as client, pytest.raises(UnknownLicenceError):
        client.issue(MODEL, holder="mallory-2")
    with pytest.raises(UnknownLicenceError):
        _release(_licence_for(admin, "lic-evil2", evil2_pub, evil2_sec))  # a moved tag
    with pytest.raises(UnknownLicenceError):
        _release(bob)  # an edited genuine row is refused too
    # ... and reported: the log, the audit, the admin's list
    refused = {r["licence"] for r in ks.events("row_refused", table="licences")}
    assert {"lic-evil", "lic-evil2", bob.licence_id} <= refused
    with ks.admin() as client:
        rows = {r["licence_id"]: r for r in client.list()}
    assert rows["lic-evil"]["authentic"] is False and rows[bob.licence_id]["authentic"] is False
    assert rows[admin.licence_id]["authentic"] is True
    ok = _vault("keyserver", "audit", str(d), "--verify", "--anchor", str(anchor))
    assert ok.returncode == 0, ok.stderr  # nothing rewritten yet: the anchor agrees
    assert ok.stdout.count("row_refused") >= 3

    # 3. drop the triggers, delete the records, re-hash the chain, restore the triggers
    out = _run_as_nobody(REWRITE_AUDIT, str(d / "keyserver.db"))
    assert '"deleted":' in out and "row_refused" in out
    # control: the hash chain alone is fooled, exactly as reported
    chain_only = _vault("keyserver", "audit", str(d), "--verify", "--quiet")
    assert chain_only.returncode == 0 and "audit chain OK" in chain_only.stdout
    # the signed checkpoints outside the database are not
    anchored = _vault("keyserver", "audit", str(d), "--verify", "--quiet", "--anchor", str(anchor))
    assert anchored.returncode == 1
    assert "TAMPERED" in anchored.stderr and "the log was rewritten" in anchored.stderr
    # the insider cannot rewrite the anchor itself
    res = subprocess.run(_as_nobody([SYSTEM_PYTHON, "-I", "-c",
                                     f"open({str(anchor)!r}, 'a').write('x')"]),
                         capture_output=True, text=True, cwd="/", timeout=30)  # fmt: skip
    assert res.returncode != 0 and "Permission denied" in res.stderr
    # nor read it (its lines time every batch of decisions): the key server made it
    # 0600 in a directory anyone may enter; control: a 0644 copy there is read
    copy = anchor.parent / "copy.anchor"
    shutil.copy(anchor, copy)
    os.chmod(copy, 0o644)
    for path, readable in ((anchor, False), (copy, True)):
        res = subprocess.run(_as_nobody([SYSTEM_PYTHON, "-I", "-c",
                                         f"print(len(open({str(path)!r}).read()))"]),
                             capture_output=True, text=True, cwd="/", timeout=30)  # fmt: skip
        assert (res.returncode == 0) is readable, (path, res.stderr)
    assert stat.S_IMODE(anchor.stat().st_mode) == 0o600


def test_master_rotation_keeps_rows_authentic_and_forged_rows_refused(insider_setup):
    ks, d, anchor = insider_setup["ks"], insider_setup["dir"], insider_setup["anchor"]
    alice = ks.issue(MODEL, holder="alice", same_user=True)  # tier 0
    evil_pub, evil_sec = zmq.curve_keypair()
    _run_as_nobody(INSERT_ROWS, str(d / "keyserver.db"), evil_pub.decode(),
                   zmq.curve_keypair()[0].decode(), alice.licence_id + "-none", MODEL)  # fmt: skip
    assert ks.stop() == 0
    rotated = _vault("keyserver", "rotate-master", str(d))
    assert rotated.returncode == 0, rotated.stderr
    ks.start()
    assert _release(alice).key  # re-tagged under the new master: still admitted
    forged_admin = _licence_for(Licence.load(ks.admin_licence), "lic-evil", evil_pub, evil_sec)
    with KeyServerClient(forged_admin, timeout=5) as client, pytest.raises(UnknownLicenceError):
        client.issue(MODEL, holder="x")  # rotation did not launder the forged row
    with ks.admin() as client:
        assert client.issue(MODEL, holder="carol").licence_id  # the real admin still works
    ok = _vault("keyserver", "audit", str(d), "--verify", "--quiet", "--anchor", str(anchor))
    assert ok.returncode == 0, ok.stderr
