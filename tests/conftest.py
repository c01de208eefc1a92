"""Shared fixtures: a real key server in a real process.

Fixtures (names are stable; other test packages rely on them):

``enrolled_device`` -> :class:`vault.core.device.Device`
    ``keyserver.device()``: an enrolled device for the ``keyserver`` fixture.

``keyserver_dir`` -> ``pathlib.Path``
    A freshly initialised key server directory (``keyserver.init_dir``) in a
    private tmp dir: ``keyserver.db``, ``master.key``, ``server.secret``,
    ``server.pub``, ``publisher.key``, ``publisher.pub``, ``admin.licence``.

``keyserver`` -> :class:`KeyServerProcess`
    ``python -m keyserver serve DIR --bind tcp://127.0.0.1:0 --lease-ttl 2``
    started on ``keyserver_dir`` and ready (its JSON ready line read with
    ``vault.core.launch.read_ready_line`` from its stdout; ``.ready`` holds it).
    Attributes: ``.dir``, ``.address`` (the real ``tcp://127.0.0.1:PORT``),
    ``.admin_licence`` (path; the file is rewritten to hold ``.address``),
    ``.publisher_key_path`` (``publisher.key``), ``.proc`` (``Popen``),
    ``.log_path``, ``.lease_ttl``. Methods: ``admin()`` (a ``KeyServerClient``
    for the admin licence), ``issue(model_id, **limits) -> Licence``,
    ``device() -> Device`` (a device made in the key server's tmp dir and
    enrolled, once per server: key releases are made as it),
    ``client(licence) -> KeyServerClient`` (talking as that device),
    ``register(model_id, key_id, key, package_digest)``, ``stop()``
    (SIGTERM, returns the exit code), ``kill()`` (SIGKILL), ``start()``
    (same port), ``restart()``, ``output() -> bytes`` (its log so far),
    ``events(event, **fields)`` (its JSON log records of that event),
    ``audit(licence_id=None)`` (its audit records).
    Always killed at teardown, even when the test fails.

Example::

    def test_x(keyserver):
        lic = keyserver.issue("m", max_calls=10)
        with KeyServerClient(lic) as ks:
            ks.ping()
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vault.core.device import Device, init_device, record_keyserver
from vault.core.keyclient import KeyServerClient
from vault.core.launch import read_ready_line
from vault.core.licence import Licence

ROOT = Path(__file__).resolve().parents[1]


def served_ready(
    proc: subprocess.Popen[bytes], timeout: float = 60.0
) -> tuple[dict[str, Any] | None, bytes]:
    """The one JSON ready line ``vault worker serve`` prints on stdout once its
    initial load has finished and it listens (``{"ready": true, "endpoint",
    "server_key", "models", ...}``; ``"ready": false`` when no model can take
    calls), and what it printed up to there (None if it exits or ``timeout``
    passes first)."""
    import json
    import select
    import time

    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 0.5)
        if r:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            for line in buf.decode().splitlines():
                if line.startswith("{") and line.endswith("}"):
                    msg = json.loads(line)
                    if msg.get("ready") is True or "endpoint" in msg:
                        return msg, buf
    return None, buf


def served_endpoint(
    proc: subprocess.Popen[bytes], timeout: float = 60.0
) -> tuple[str | None, bytes]:
    """The endpoint in ``vault worker serve``'s ready line, and what it printed
    up to there (None if it exits or ``timeout`` passes first)."""
    ready, buf = served_ready(proc, timeout)
    return (str(ready["endpoint"]) if ready else None), buf


class KeyServerProcess:
    def __init__(self, directory: Path, *, lease_ttl: float = 2.0) -> None:
        self.dir = directory
        self.admin_licence = directory / "admin.licence"
        self.publisher_key_path = directory / "publisher.key"
        self.log_path = directory / "server.log"
        self.lease_ttl = lease_ttl
        self.address = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}
        self.extra_args: list[str] = []
        self._log: Any = None
        self._device: Device | None = None
        self._device_lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------

    def start(self, *, timeout: float = 20.0) -> None:
        """Start (or restart on the same port) and wait for the ready line."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._close_log()
        bind = self.address or "tcp://127.0.0.1:0"
        cmd = [sys.executable, "-u", "-m", "keyserver", "serve", str(self.dir),
               "--bind", bind, "--lease-ttl", str(self.lease_ttl)]  # fmt: skip
        if self.address:
            cmd += ["--advertise", self.address]
        cmd += self.extra_args
        self._log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        # stdout carries the one JSON ready line; the log lines go to stderr
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, env=env)
        assert self.proc.stdout is not None
        try:
            with self.proc.stdout:
                self.ready = read_ready_line(
                    self.proc.stdout, timeout=timeout, proc=self.proc, what="key server"
                )
        except Exception as exc:
            self.kill()
            out = self.output().decode(errors="replace")
            raise RuntimeError(f"key server did not start: {exc}\n{out}") from exc
        if not self.address:
            self.address = str(self.ready["address"])
            lic = Licence.load(self.admin_licence)
            lic.keyserver_address = self.address
            lic.save(self.admin_licence)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code (0 on a clean stop)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up (crash simulation)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
        self._close_log()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def output(self) -> bytes:
        return self.log_path.read_bytes() if self.log_path.exists() else b""

    def audit(self, licence_id: str | None = None) -> list[Any]:
        """The audit records (``keyserver.audit.AuditRecord``: ``event``,
        ``ts``, ``licence_id``, ``detail``...) of this SQLite key server, of
        ``licence_id`` when given, in order."""
        from keyserver import audit, store

        st = store.SqliteStore.open(self.dir / "keyserver.db")
        try:
            return [r for r in audit.records(st) if licence_id in (None, r.licence_id)]
        finally:
            st.close()

    def events(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        """The server's log records (one JSON object a line, vault.core.logs)
        of ``event`` whose fields include ``fields``."""
        import json

        out = []
        for line in self.output().decode(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            if rec.get("event") == event and all(rec.get(k) == v for k, v in fields.items()):
                out.append(rec)
        return out

    # --- conveniences ------------------------------------------------------------

    def admin(self, timeout: float = 10.0) -> KeyServerClient:
        return KeyServerClient(Licence.load(self.admin_licence), timeout=timeout)

    def issue(self, model_id: str, *, holder: str = "alice", **limits: Any) -> Licence:
        with self.admin() as ks:
            return ks.issue(model_id, holder=holder, **limits)

    def enroll(self, directory: Path, *, service: bool = True) -> Device:
        """Make a device in ``directory``, enroll it and fix its key server
        (this one), as ``vault device enroll DIR [--service]`` does (by default
        as a worker service's: most tests' devices run one)."""
        dev = init_device(directory)
        with self.admin() as ks:
            ks.enroll_device(device_id=dev.device_id, public_key=dev.public_key, service=service)
            lic = ks.licence
        record_keyserver(directory, address=lic.keyserver_address,
                         public_key=lic.keyserver_public_key)  # fmt: skip
        return Device.load(directory)

    def device(self) -> Device:
        """This server's test device (made and enrolled on first use)."""
        with self._device_lock:  # tests share one server between threads
            if self._device is None:
                self._device = self.enroll(self.dir.parent / "device")
            return self._device

    def client(self, licence: Licence, **kw: Any) -> KeyServerClient:
        """A key client that asks as :meth:`device`, with ``licence``'s proof."""
        return KeyServerClient(licence, device=self.device(), **kw)

    def register(
        self, model_id: str, key_id: str, key: bytes | bytearray, package_digest: str
    ) -> None:
        with self.admin() as ks:
            ks.register_key(
                model_id=model_id, key_id=key_id, key=key, package_digest=package_digest
            )


@pytest.fixture
def keyserver_dir(tmp_path: Path) -> Path:
    from keyserver import init_dir

    d = tmp_path / "ks"
    init_dir(d, address="tcp://127.0.0.1:7700")
    return d


@pytest.fixture
def enrolled_device(keyserver: KeyServerProcess) -> Device:
    return keyserver.device()


@pytest.fixture
def keyserver(keyserver_dir: Path) -> Iterator[KeyServerProcess]:
    ks = KeyServerProcess(keyserver_dir, lease_ttl=2.0)
    try:
        ks.start()
        yield ks
    finally:
        ks.kill()
