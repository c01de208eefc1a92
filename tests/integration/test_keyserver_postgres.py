"""The key server on a real PostgreSQL (issue 12): the same store interface and
the same guarantees as on SQLite, and two replicas sharing one database under
load, one of them killed with SIGKILL mid-load: the audit chain stays one
chain that verifies, and no key left without its audit record."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import zmq

from tests.conftest import ROOT, KeyServerProcess
from tests.postgres import postgres_server
from vault.core import crypto as _crypto
from vault.core.errors import (
    KeyServerUnavailableError,
    PermissionDeniedError,
    UnknownLicenceError,
    VaultError,
)
from vault.core.keyclient import KeyServerClient
from vault.core.licence import Licence

MODEL, KEY_ID, DIGEST = "pg-model", "k1", "sha256:" + "cd" * 32


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh database on the module's server."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin_url = pg_server.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    try:
        yield pg_server.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _vault(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "vault", *args], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def _replica(d: Path, url: str, anchor: Path, name: str) -> KeyServerProcess:
    ks = KeyServerProcess(d, lease_ttl=5.0)
    ks.log_path = d / f"{name}.log"
    ks.extra_args = ["--database", url, "--anchor", str(anchor)]
    ks.start()
    return ks


def test_key_server_on_postgresql_meters_authenticates_and_anchors(tmp_path, pg_url):
    from keyserver import init_dir

    d, anchor = tmp_path / "ks", tmp_path / "audit.anchor"
    created = init_dir(d, address="tcp://127.0.0.1:7700", database=pg_url)
    assert created["database"] == "postgresql" and not (d / "keyserver.db").exists()
    ks = _replica(d, pg_url, anchor, "a")
    try:
        assert ks.ready["database"] == "postgresql"
        key = _crypto.generate_key()
        ks.register(MODEL, KEY_ID, key, DIGEST)
        lic = ks.issue(MODEL, max_calls=5, same_user=True)  # tier 0: its own key asks
        with KeyServerClient(lic) as c:
            rel = c.release(model_id=MODEL, key_id=KEY_ID, package_digest=DIGEST)
            assert rel.key == key and rel.lease.call_budget == 5  # reserved at grant
            assert c.close_lease(lease_id=rel.lease.lease_id, calls=2) == 3  # refunded
        with ks.admin() as admin:
            [row] = [r for r in admin.list() if r["licence_id"] == lic.licence_id]
        assert (row["used_calls"], row["reserved_calls"]) == (2, 0)
        # a row written into the database by anyone else is refused and reported
        evil_pub, evil_sec = zmq.curve_keypair()
        with psycopg.connect(pg_url, autocommit=True) as c:
            c.execute(
                "INSERT INTO licences (licence_id, holder, role, model_id, client_public_key,"
                " issued_at) VALUES ('lic-evil', 'mallory', 'admin', NULL, %s, 0)",
                (evil_pub.decode(),),
            )
            with pytest.raises(psycopg.Error, match="append-only"):
                c.execute("DELETE FROM audit")
        forged = Licence.from_json({**lic.to_json(), "licence_id": "lic-evil",
                                    "client": {"public_key": evil_pub.decode(),
                                               "secret_key": evil_sec.decode()}})  # fmt: skip
        with KeyServerClient(forged, timeout=5) as c, pytest.raises(UnknownLicenceError):
            c.issue(MODEL, holder="x")
        assert ks.events("row_refused", table="licences", licence="lic-evil")
    finally:
        assert ks.stop() == 0
    out = _vault("keyserver", "audit", str(d), "--database", pg_url, "--verify",
                 "--anchor", str(anchor))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "row_refused" in out.stdout and "anchor OK" in out.stdout


def test_two_replicas_under_load_and_a_kill_9(tmp_path, pg_url):
    from keyserver import init_dir

    d = tmp_path / "ks"
    init_dir(d, address="tcp://127.0.0.1:7700", database=pg_url)
    anchors = {"a": tmp_path / "a.anchor", "b": tmp_path / "b.anchor"}
    replicas: dict[str, KeyServerProcess] = {}
    try:
        for name in ("a", "b"):
            replicas[name] = _replica(d, pg_url, anchors[name], name)
        addr = {n: r.address for n, r in replicas.items()}
        ks_a = replicas["a"]
        ks_a.register(MODEL, KEY_ID, _crypto.generate_key(), DIGEST)
        licences = [ks_a.issue(MODEL, holder=f"c{i}", same_user=True) for i in range(6)]  # tier 0

        stop = threading.Event()
        killed = threading.Event()
        got: list[tuple[str, str, bool]] = []  # (replica, lease id, after the kill)
        failed: list[str] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            lic = licences[i]
            n = 0
            while not stop.is_set():
                name = "ab"[(i + n) % 2]
                n += 1
                after = killed.is_set()
                try:
                    with KeyServerClient(lic, timeout=1.0, address=addr[name]) as c:
                        rel = c.release(model_id=MODEL, key_id=KEY_ID, package_digest=DIGEST)
                        with lock:
                            got.append((name, rel.lease.lease_id, after))
                        c.renew(lease_id=rel.lease.lease_id, calls=1)
                        c.close_lease(lease_id=rel.lease.lease_id, calls=0)
                except KeyServerUnavailableError:
                    with lock:
                        failed.append(name)
                except VaultError as exc:  # anything else is a bug of the store
                    with lock:
                        failed.append(f"{name}: {exc.code}: {exc}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(licences))]

        def served(cond: Callable[[], bool], what: str) -> None:  # a state, not a duration
            deadline = time.monotonic() + 120
            while True:
                with lock:
                    if cond():
                        return
                assert time.monotonic() < deadline, f"timed out waiting until {what}: {got}"
                time.sleep(0.02)

        for t in threads:
            t.start()
        served(lambda: all(sum(n == r for n, _, _ in got) >= 5 for r in "ab"),
               "each replica has served 5")  # fmt: skip
        ks_a.kill()  # SIGKILL mid-load: possibly inside a transaction holding the lock
        killed.set()
        served(lambda: sum(n == "b" and after for n, _, after in got) >= 5,
               "b has served 5 more after a died")  # fmt: skip
        stop.set()
        for t in threads:
            t.join(30)
        by = {name: sum(1 for n, _, _ in got if n == name) for name in "ab"}
        print(f"releases per replica: {by}, unreachable: {len(failed)}")
        assert by["a"] >= 5 and by["b"] >= 5, by
        assert any(n == "b" and after for n, _, after in got)  # b went on serving
        assert all(f in ("a", "b") for f in failed), failed  # only unreachability
        assert replicas["b"].proc is not None and replicas["b"].proc.poll() is None
    finally:
        for r in replicas.values():
            r.kill()
    # one chain, intact, matching both replicas' signed checkpoints
    for name in "ab":
        out = _vault("keyserver", "audit", str(d), "--database", pg_url, "--verify", "--quiet",
                     "--anchor", str(anchors[name]))  # fmt: skip
        assert out.returncode == 0, out.stderr
    # no key left without its audit record
    with psycopg.connect(pg_url) as c:
        rows = c.execute("SELECT detail FROM audit WHERE event = 'released'").fetchall()
        leases = {r[0] for r in c.execute("SELECT lease_id FROM leases").fetchall()}
    import json

    audited = {json.loads(r[0])["lease_id"] for r in rows}
    handed_out = {lease for _, lease, _ in got}
    assert handed_out <= audited and handed_out <= leases


def test_a_licence_proof_is_good_once_across_replicas_and_restarts(tmp_path, pg_url):
    """A holder's proof (what a daemon passes to its worker) replayed at the
    other replica, and at a restarted one: refused, the use is in the database."""
    from keyserver import init_dir

    d = tmp_path / "ks"
    init_dir(d, address="tcp://127.0.0.1:7700", database=pg_url)
    args = {"model_id": MODEL, "key_id": KEY_ID, "package_digest": DIGEST}
    replicas: dict[str, KeyServerProcess] = {}
    try:
        for name in ("a", "b"):
            replicas[name] = _replica(d, pg_url, tmp_path / f"{name}.anchor", name)
        a, b = replicas["a"], replicas["b"]
        key = _crypto.generate_key()
        a.register(MODEL, KEY_ID, key, DIGEST)
        dev = a.enroll(tmp_path / "device")
        lic = a.issue(MODEL)

        def release(replica: KeyServerProcess, proof: object) -> bytes:
            with KeyServerClient(lic, device=dev, address=replica.address, timeout=10) as c:
                return bytes(c.release(**args, proof=proof).key)

        used = {}
        for step in ("release", "authorize"):
            proof = used[step] = lic.prove(device_id=dev.device_id, **args)
            with KeyServerClient(lic, device=dev, address=a.address, timeout=10) as c:
                if step == "release":
                    assert bytes(c.release(**args, proof=proof).key) == key
                else:
                    assert c.authorize(**args, proof=proof)["licence_id"] == lic.licence_id
            with KeyServerClient(lic, device=dev, address=b.address, timeout=10) as c:
                with pytest.raises(PermissionDeniedError, match="used before"):
                    if step == "release":
                        c.release(**args, proof=proof)
                    else:
                        c.authorize(**args, proof=proof)
        # both replicas restarted (within the proof's clock-skew window): still spent
        replicas["a"].restart()
        replicas["b"].restart()
        for replica in (a, b):
            with pytest.raises(PermissionDeniedError, match="used before"):
                release(replica, used["release"])
        # the control: where the second replica does not know of the first use
        # (each process remembering its own proofs, as before: here the shared
        # record is wiped between the two), the replay gets the key again
        proof = lic.prove(device_id=dev.device_id, **args)
        assert release(a, proof) == key
        with psycopg.connect(pg_url, autocommit=True) as conn:
            assert conn.execute("DELETE FROM used_proofs").rowcount >= 3
        assert release(b, proof) == key
        # the refusals are audited as such
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute("SELECT detail FROM audit WHERE event = 'denied'").fetchall()
        assert sum("used before" in r[0] for r in rows) >= 2, rows
    finally:
        for r in replicas.values():
            r.kill()


def _wait_until_blocked(pg_url: str, pid: int) -> None:
    """Until PostgreSQL says backend ``pid`` waits for a lock (a state, read
    from pg_stat_activity, not a guess of how long that takes)."""
    deadline = time.monotonic() + 60
    with psycopg.connect(pg_url, autocommit=True) as c:
        while True:
            row = c.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                            (pid,)).fetchone()  # fmt: skip
            if row is not None and row[0] == "Lock":
                return
            assert time.monotonic() < deadline, f"backend {pid} never waited for a lock"
            time.sleep(0.01)


def test_the_advisory_lock_serialises_appends_across_replicas(tmp_path, pg_url):
    """Two replicas append at once. With the transaction-level advisory lock
    the second waits and chains onto the first; the control, the same store
    without the lock, reads the same head and its append fails."""
    from keyserver import audit, init_dir
    from keyserver.store_pg import PostgresStore

    init_dir(tmp_path / "ks", database=pg_url)

    class NoLock(PostgresStore):
        def begin(self) -> None:
            self.conn.execute("BEGIN")

    def race(cls: type[PostgresStore]) -> BaseException | None:
        a, b = cls.open(pg_url), cls.open(pg_url)
        errors: list[BaseException] = []

        def second() -> None:
            try:
                with b.transaction():
                    audit.append(b, ts=2.0, event="released", licence_id="b")
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                errors.append(exc)

        try:
            a.begin()
            audit.append(a, ts=1.0, event="released", licence_id="a")
            t = threading.Thread(target=second)
            t.start()
            _wait_until_blocked(pg_url, b.conn.info.backend_pid)  # on the lock, or a's row
            a.commit()
            t.join(10)
            problems = audit.verify(a)
        finally:
            a.close()
            b.close()
        assert problems == []
        return errors[0] if errors else None

    assert race(NoLock) is not None  # control: both read one head; one of them fails
    assert race(PostgresStore) is None  # serialised: both appended, one chain
    st = PostgresStore.open(pg_url)
    try:
        events = [(r.seq, r.licence_id) for r in audit.records(st)]
    finally:
        st.close()
    assert [lid for _, lid in events[-2:]] == ["a", "b"]


READ_PROC = r"""
import json, sys
pid, secret = sys.argv[1], sys.argv[2].encode()
out = {}
for name in ("cmdline", "environ"):
    try:
        data = open(f"/proc/{pid}/{name}", "rb").read()
        out[name] = "password" if secret in data else "no password"
    except OSError as e:
        out[name] = "denied errno %d" % e.errno
print(json.dumps(out))
"""


def _nobody_reads(pid: int, secret: str) -> dict[str, str]:
    import json
    import pwd

    nb = pwd.getpwnam("nobody")
    out = subprocess.run(
        ["setpriv", f"--reuid={nb.pw_uid}", f"--regid={nb.pw_gid}", "--clear-groups",
         "/usr/bin/python3", "-I", "-c", READ_PROC, str(pid), secret],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_the_database_password_is_not_in_the_command_line(tmp_path, pg_url):
    """Issue 17, item 6: ``serve --database postgresql://ks:PASSWORD@...`` put
    the password in /proc/PID/cmdline, which every local user reads. From
    $VAULT_DATABASE_URL (or --database-file) it is in no argument, and the
    environment is the owner's alone: nobody reads it in either. Control:
    the same URL on the command line, nobody reads the password (and the
    server warns)."""
    from vault.core.launch import read_ready_line

    secret = "pw-" + uuid.uuid4().hex  # trust authentication: PostgreSQL ignores it
    url = pg_url.replace("postgresql://vault@", f"postgresql://vault:{secret}@")
    d = tmp_path / "ks"
    url_file = tmp_path / "database-url"  # --database-file: a 0600 file holds the URL
    url_file.write_text(url + "\n")
    os.chmod(url_file, 0o600)
    out = _vault("keyserver", "init", str(d), "--database-file", str(url_file))
    assert out.returncode == 0 and "postgresql" in out.stdout, out.stderr
    base = {**os.environ, "PYTHONPATH": str(ROOT)}
    base.pop("VAULT_DATABASE_URL", None)
    procs = []
    try:
        for how in ("env", "file", "argument"):
            cmd = [sys.executable, "-m", "vault", "keyserver", "serve", str(d),
                   "--bind", "tcp://127.0.0.1:0"]  # fmt: skip
            env = dict(base)
            if how == "env":
                env["VAULT_DATABASE_URL"] = url
            elif how == "file":
                cmd += ["--database-file", str(url_file)]
            else:
                cmd += ["--database", url]
            log = open(tmp_path / f"{how}.log", "wb")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
            log.close()
            procs.append(proc)
            assert proc.stdout is not None
            ready = read_ready_line(proc.stdout, timeout=30, proc=proc, what="key server")
            assert ready["database"] == "postgresql"
            seen = _nobody_reads(proc.pid, secret)
            if how != "argument":
                assert seen["cmdline"] == "no password", (how, seen)
                assert seen["environ"] == "denied errno 13", (how, seen)
            else:  # control: on the command line, every local user reads it
                assert seen["cmdline"] == "password", seen
                assert b"WARNING: --database holds a password" in (tmp_path / "argument.log"
                                                                   ).read_bytes()  # fmt: skip
        out = _vault("keyserver", "audit", str(d), "--database-file", str(url_file), "--verify",
                     "--quiet")  # fmt: skip
        assert out.returncode == 0 and "audit chain OK" in out.stdout, out.stderr
        assert "WARNING" not in out.stderr
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
