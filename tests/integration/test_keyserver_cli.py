"""The ``vault licence`` commands against a running key server."""

from __future__ import annotations

import stat
import subprocess
import sys

from vault.core.licence import Licence


def _vault(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vault", *args], capture_output=True, text=True, timeout=60
    )


def test_issue_list_revoke_from_the_command_line(keyserver, tmp_path):
    out_file = tmp_path / "bob.licence"
    admin = str(keyserver.admin_licence)
    keyserver.register("resnet", "k1", bytes(32), "sha256:" + "00" * 32)
    r = _vault("licence", "issue", "resnet", "--to", "bob", "--expires", "30d",
               "--max-calls", "5", "--licence", admin, "-o", str(out_file))  # fmt: skip
    assert r.returncode == 0, r.stderr
    lic = Licence.load(out_file)
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600
    assert lic.holder == "bob" and lic.model_id == "resnet" and lic.licence_id in r.stdout
    assert lic.publisher_key and lic.keyserver_address == keyserver.address
    r = _vault("license", "list", "--license", admin)
    assert r.returncode == 0 and lic.licence_id in r.stdout and "0/5" in r.stdout
    r = _vault("licence", "revoke", lic.licence_id, "--licence", admin)
    assert r.returncode == 0 and "revoked" in r.stdout
    # the licence's file where its id goes (a new vendor's first try): its id is taken
    r = _vault("licence", "revoke", str(out_file), "--licence", admin)
    assert r.returncode == 0 and f"revoked licence {lic.licence_id} (was already" in r.stdout
    r = _vault("licence", "list", "--licence", admin)
    assert "revoked" in r.stdout
    r = _vault("licence", "revoke", lic.licence_id, "--licence", str(out_file))
    assert r.returncode == 2 and "permission_denied" in r.stderr
    r = _vault("licence", "issue", "m", "--to", "x", "--expires", "soon", "--licence", admin)
    assert r.returncode == 2 and "duration" in r.stderr


def test_init_prints_the_server_key(tmp_path):
    r = _vault("keyserver", "init", str(tmp_path / "k2"), "--address", "tcp://127.0.0.1:7999")
    assert r.returncode == 0, r.stderr
    pub = (tmp_path / "k2" / "server.pub").read_text().strip()
    assert pub in r.stdout and "admin.licence" in r.stdout


READ = r"""
import json, os, sys
out = {}
for path in sys.argv[1:]:
    try:
        if os.path.isdir(path):
            out[path] = "listed %d" % len(os.listdir(path))
        else:
            out[path] = "read admin" if b"admin" in open(path, "rb").read() else "read"
    except OSError as e:
        out[path] = "denied errno %d" % e.errno
print(json.dumps(out))
"""


def _as_nobody_read(*paths: str) -> dict[str, str]:
    import json
    import pwd

    nb = pwd.getpwnam("nobody")
    out = subprocess.run(
        ["setpriv", f"--reuid={nb.pw_uid}", f"--regid={nb.pw_gid}", "--clear-groups",
         "/usr/bin/python3", "-I", "-c", READ, *paths],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_init_makes_the_directory_and_every_file_private_whatever_existed() -> None:
    """Issue 17, item 6: ``init`` into a directory that already exists (0755)
    left it 0755 and the database 0644 (holder names, quotas, usage, devices,
    the audit), readable by every local user. Now the directory is 0700 and
    every file 0600: nobody can list it or read the database no more.
    Control: the same database bytes where its modes allow, nobody reads."""
    import os
    import pwd
    import shutil
    import tempfile
    from pathlib import Path

    from tests.prereq import require

    require(os.geteuid() == 0 and shutil.which("setpriv") is not None,
            "root and setpriv, to read as nobody")  # fmt: skip
    base = Path(tempfile.mkdtemp(prefix="vault-ksinit-"))
    try:
        os.chmod(base, 0o755)  # nobody may pass through: only the modes below decide
        ks = base / "ks"
        ks.mkdir(mode=0o755)
        os.chmod(ks, 0o755)
        r = _vault("keyserver", "init", str(ks))
        assert r.returncode == 0, r.stderr
        assert stat.S_IMODE(ks.stat().st_mode) == 0o700
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in ks.iterdir()}
        assert "keyserver.db" in modes and set(modes.values()) == {0o600}, modes
        db = str(ks / "keyserver.db")
        seen = _as_nobody_read(str(ks), db)
        assert seen == {str(ks): "denied errno 13", db: "denied errno 13"}, seen
        # control: the same bytes, with the modes init used to leave
        open_dir = base / "open"
        open_dir.mkdir(mode=0o755)
        os.chmod(open_dir, 0o755)
        copy = open_dir / "keyserver.db"
        shutil.copy(db, copy)
        os.chmod(copy, 0o644)
        assert _as_nobody_read(str(copy))[str(copy)] == "read admin"
        # a directory that belongs to another user is refused, not taken over
        theirs = base / "theirs"
        theirs.mkdir()
        nb = pwd.getpwnam("nobody")
        os.chown(theirs, nb.pw_uid, nb.pw_gid)
        r = _vault("keyserver", "init", str(theirs))
        assert r.returncode == 2 and "belongs to uid" in r.stderr, r.stderr
        assert not (theirs / "keyserver.db").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_listens_where_init_said_and_warns_when_told_otherwise(tmp_path):
    """`init --address` alone moves the key server (a newcomer with port 7700
    taken gave the port to init only, and every command then timed out): serve
    listens on the recorded port; a --bind elsewhere is logged as a mismatch."""
    import json
    import os

    from tests.conftest import ROOT
    from vault.core.launch import read_ready_line
    from vault.core.process import stop_process

    port = _free_port()
    r = _vault("keyserver", "init", str(tmp_path / "ks"), "--address", f"tcp://127.0.0.1:{port}")
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def serve(*extra: str) -> tuple[dict[str, object], str]:
        log = tmp_path / f"ks{len(extra)}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "vault", "keyserver", "serve",
                                     str(tmp_path / "ks"), *extra], stdout=subprocess.PIPE,
                                    stderr=err, env=env)  # fmt: skip
            try:
                assert proc.stdout is not None
                ready = read_ready_line(proc.stdout, timeout=30, proc=proc, what="key server")
                if not extra:  # the admin licence reaches it as written
                    listing = _vault("licence", "list", "--licence",
                                     str(tmp_path / "ks" / "admin.licence"))  # fmt: skip
                    assert listing.returncode == 0, listing.stderr
            finally:
                stop_process(proc, 10)
                assert proc.stdout is not None
                proc.stdout.close()
        return ready, log.read_text()

    ready, log = serve()
    assert str(ready["address"]).endswith(f":{port}"), ready
    assert "address_mismatch" not in log
    other = _free_port()
    ready, log = serve("--bind", f"tcp://127.0.0.1:{other}")  # the control: told otherwise
    assert str(ready["address"]).endswith(f":{other}"), ready
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    (warn,) = [e for e in events if e["event"] == "address_mismatch"]
    assert warn["licences_name"] == f"tcp://127.0.0.1:{port}", warn
