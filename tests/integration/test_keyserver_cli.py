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
