"""Secret files are used only when no other user could have planted, read or
swapped them (vault/core/files.py; docs/threat-model.md, "Secret files").

Every loader of a secret is tried: a licence, a device key, a service's CURVE
secret (``--server-secret``, ``worker.key_secret``), a publisher's (or the
audit's) signing key, the key server's master key and CURVE secret, a TLS
private key, a database URL file. The attacker is ``nobody``, who plants
copies of genuine secrets (valid bytes: only where they came from is wrong)
in a directory it may write; the victim is root (who bypasses file
permissions, so only the loader's own check stands in the way) and, in the
second test, nobody itself. The control for each: the same bytes, 0600, the
user's own, in a private directory, are used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_worker_hardening import (
    SYSTEM_PYTHON,
    _as_nobody,
    _nobody,
    _nobody_env,
    nobody_python,  # noqa: F401 - a fixture
)
from vault.core.errors import ConfigError

# what a secret directory holds here, each file genuine
FILES = ("admin.licence", "device.key", "keyserver.json", "worker.key_secret", "publisher.key",
         "master.key", "server.secret", "tls.key", "database.url")  # fmt: skip


def _tls_key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def genuine() -> Iterator[tuple[Path, dict[str, bytes]]]:
    """A key server directory, a device, a service key pair, a TLS key: made by
    root, offline (no server runs in this module)."""
    from keyserver import init_dir
    from vault.core.curvekeys import write_certificates
    from vault.core.device import init_device, record_keyserver

    base = Path(tempfile.mkdtemp(prefix="vault-secrets-"))
    os.chmod(base, 0o755)
    try:
        ks = base / "ks"
        init_dir(ks, address="tcp://127.0.0.1:7700")
        dev = base / "device"
        init_device(dev)
        record_keyserver(dev, address="tcp://127.0.0.1:7700", public_key="P" * 40)
        svc = base / "svc"
        svc.mkdir(mode=0o700)
        write_certificates(svc)
        data = {
            "admin.licence": (ks / "admin.licence").read_bytes(),
            "device.key": (dev / "device.key").read_bytes(),
            "keyserver.json": (dev / "keyserver.json").read_bytes(),
            "worker.key_secret": (svc / "worker.key_secret").read_bytes(),
            "publisher.key": (ks / "publisher.key").read_bytes(),
            "master.key": (ks / "master.key").read_bytes(),
            "server.secret": (ks / "server.secret").read_bytes(),
            "tls.key": _tls_key(),
            "database.url": b"postgresql://ks:s3cret@127.0.0.1:5432/vault\n",
        }
        yield ks, data
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _loaders(ks: Path) -> dict[str, Callable[[Path], Any]]:
    """Each secret's loader, given the directory that holds the files."""
    import argparse

    from keyserver.commands import database_url
    from keyserver.layout import load_master, load_server_keys
    from keyserver.store import SqliteStore
    from vault.core.crypto import PublisherKey
    from vault.core.curvekeys import load_secret_certificate
    from vault.core.device import Device
    from vault.core.licence import Licence
    from worker.service.oip.server import OipConfig, OipServer

    def master(d: Path) -> Any:
        st = SqliteStore.open(ks / "keyserver.db")
        try:
            return load_master(d, st)
        finally:
            st.close()

    cert = ks / "server.pub"  # any readable file stands for the certificate
    return {
        "licence": lambda d: Licence.load(d / "admin.licence"),
        "device key": lambda d: Device.load(d),
        "CURVE secret": lambda d: load_secret_certificate(d / "worker.key_secret"),
        "signing key": lambda d: PublisherKey.load(d / "publisher.key"),
        "master key": master,
        "key server CURVE secret": load_server_keys,
        "TLS key": lambda d: OipServer.check(
            OipConfig(http_port=0, tls=(str(cert), str(d / "tls.key")))
        ),
        "database URL file": lambda d: database_url(
            argparse.Namespace(database_file=str(d / "database.url"), database=None), {}
        ),
    }


def _lay_out(d: Path, data: dict[str, bytes], *, mode: int = 0o600) -> None:
    for name, content in data.items():
        fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
        os.chmod(d / name, mode)
    (d / "keyserver.json").chmod(0o644)  # public: the key server a device dials


def _plant_as_nobody(d: Path, data: dict[str, bytes]) -> None:
    """nobody writes the files itself (0600, its own), as an attacker would."""
    for name, content in data.items():
        r = subprocess.run(_as_nobody(["/bin/sh", "-c", 'umask 077; cat > "$1"', "sh",
                                       str(d / name)]),
                           input=content, capture_output=True, timeout=30)  # fmt: skip
        assert r.returncode == 0, r.stderr.decode()
        assert (d / name).stat().st_uid == _nobody().pw_uid


def _outcomes(ks: Path, d: Path) -> dict[str, str]:
    out = {}
    for what, load in _loaders(ks).items():
        try:
            load(d)
            out[what] = "used"
        except ConfigError as exc:
            out[what] = exc.message
    return out


@pytest.mark.usefixtures("nobody_python")
def test_secrets_another_user_planted_or_could_swap_are_refused(
    genuine: tuple[Path, dict[str, bytes]],
) -> None:
    ks, data = genuine
    base = Path(tempfile.mkdtemp(prefix="vault-plant-"))
    base.chmod(0o711)  # nobody may reach the directories below, not list this one
    try:
        # 1. nobody plants the files in a directory anyone may write (not sticky)
        shared = base / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        _plant_as_nobody(shared, data)
        got = _outcomes(ks, shared)
        assert all("belongs to nobody" in v and "install -m 600" in v for v in got.values()), got
        # 2. root's own files, 0600, but in that directory (nobody could swap them)
        mine = base / "open"
        mine.mkdir()
        mine.chmod(0o777)
        _lay_out(mine, data)
        got = _outcomes(ks, mine)
        assert all("writable by other users" in v and "chmod go-w" in v for v in got.values()), got
        # 3. a directory that belongs to nobody (who can replace what is in it)
        theirs = base / "theirs"
        theirs.mkdir(mode=0o755)
        _lay_out(theirs, data)
        os.chown(theirs, _nobody().pw_uid, _nobody().pw_gid)
        got = _outcomes(ks, theirs)
        assert all("belongs to nobody" in v and "mkdir -m 700" in v for v in got.values()), got
        # 4. root's own files in a private directory, but readable by everyone
        loose = base / "loose"
        loose.mkdir(mode=0o700)
        _lay_out(loose, data, mode=0o644)
        got = _outcomes(ks, loose)
        assert all("open to other users (mode 0644)" in v and "chmod 600" in v
                   for v in got.values()), got  # fmt: skip
        # the control: the same bytes, root's, 0600, in root's private directory,
        # are used by every loader (and root's 0640, a Kubernetes Secret's mode)
        for mode in (0o600, 0o640):
            private = base / f"private-{mode:o}"
            private.mkdir(mode=0o700)
            _lay_out(private, data, mode=mode)
            got = _outcomes(ks, private)
            assert set(got.values()) == {"used"}, (mode, got)
    finally:
        shutil.rmtree(base, ignore_errors=True)


NOBODY_LOADS = """
import json, sys
from vault.core.errors import ConfigError
from vault.core.licence import Licence
out = {}
for path in sys.argv[1:]:
    try:
        out[path] = "used: " + Licence.load(path).licence_id
    except ConfigError as exc:
        out[path] = exc.message
print(json.dumps(out))
"""


@pytest.mark.usefixtures("nobody_python")
def test_nobodys_own_licence_is_used_only_from_its_own_private_file(
    genuine: tuple[Path, dict[str, bytes]],
) -> None:
    """The same rule for an unprivileged holder: its licence, 0600 in its own
    directory, is used; 0644, or in a directory root left open to all, not."""
    _, data = genuine
    base = Path(tempfile.mkdtemp(prefix="vault-nobody-"))
    os.chmod(base, 0o755)
    try:
        own = base / "own"
        own.mkdir(mode=0o700)
        os.chown(own, _nobody().pw_uid, _nobody().pw_gid)
        shared = base / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        lic = {"admin.licence": data["admin.licence"]}
        _plant_as_nobody(own, lic)
        _plant_as_nobody(shared, lic)
        loose = own / "loose.licence"
        shutil.copy(own / "admin.licence", loose)
        os.chown(loose, _nobody().pw_uid, _nobody().pw_gid)
        loose.chmod(0o644)
        roots = base / "roots"  # root's directory, root's licence left readable by all
        roots.mkdir(mode=0o755)
        handed = roots / "handed.licence"
        handed.write_bytes(data["admin.licence"])
        handed.chmod(0o644)
        paths = [str(own / "admin.licence"), str(shared / "admin.licence"), str(loose),
                 str(handed)]  # fmt: skip
        r = subprocess.run(_as_nobody([SYSTEM_PYTHON, "-B", "-c", NOBODY_LOADS, *paths]),
                           env=_nobody_env(), capture_output=True, timeout=60, cwd="/")  # fmt: skip
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        got = json.loads(r.stdout.decode().strip().splitlines()[-1])
        licence_id = json.loads(data["admin.licence"])["licence_id"]
        assert got[paths[0]] == f"used: {licence_id}"  # the control
        assert "writable by other users" in got[paths[1]], got
        assert "open to other users (mode 0644)" in got[paths[2]], got
        assert "`chmod 600" in got[paths[2]], got  # its own file: it may fix it
        # root's file: the fix is a copy of its own, never a chmod it may not do
        assert "open to other users (mode 0644)" in got[paths[3]], got
        assert "install -m 600" in got[paths[3]] and "chmod" not in got[paths[3]], got
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.usefixtures("nobody_python")
def test_the_service_refuses_a_planted_server_secret_at_start(
    genuine: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """The CLI as an operator meets it: `vault worker serve --server-secret`
    with a key nobody planted exits with the fix, before anything is bound."""
    ks, data = genuine
    shared = Path(tempfile.mkdtemp(prefix="vault-serve-"))
    try:
        shared.chmod(0o777)
        _plant_as_nobody(shared, {"worker.key_secret": data["worker.key_secret"]})
        (tmp_path / "clients").mkdir()
        # a runtime licence's file (the service refuses an admin one first); nothing
        # is asked of a key server before the secret is refused
        lic = json.loads((ks / "admin.licence").read_text())
        service = tmp_path / "service.licence"
        service.write_text(json.dumps({**lic, "kind": "runtime", "role": "user",
                                       "holder": "service", "model_id": "*"}))  # fmt: skip
        service.chmod(0o600)
        args = [sys.executable, "-m", "vault", "worker", "serve", str(tmp_path / "m.vault"),
                "--licence", str(service), "--device", str(ks.parent / "device"),
                "--bind", "tcp://127.0.0.1:0", "--allow", str(tmp_path / "clients"),
                "--server-secret"]  # fmt: skip
        r = subprocess.run([*args, str(shared / "worker.key_secret")], capture_output=True,
                           text=True, timeout=120)  # fmt: skip
        assert r.returncode == 2 and "error[config]" in r.stderr, r.stderr
        assert "belongs to nobody" in r.stderr and "server_key" not in r.stderr, r.stderr
    finally:
        shutil.rmtree(shared, ignore_errors=True)
