"""A real key server, sealed packages and licences for the vault rows.

:class:`VaultEnv` starts ``python -m keyserver serve`` on a fresh directory
(port chosen by the OS), seals models with the publisher key, registers
their keys and issues one licence per model. :meth:`VaultEnv.open_local`
is ``vault.open``; :meth:`VaultEnv.serve_tcp` starts a ``python -m worker``
on ``tcp://`` with CURVE and returns ``vault.connect`` to it.

Everything it starts is stopped by :meth:`VaultEnv.close` (also a context
manager). When a piece is missing (the worker or client not there yet) the
constructor or the call raises :class:`~benchmarks.harness.Unavailable`.

Example::

    with VaultEnv(tmpdir) as env:
        pkg, lic = env.seal(models.mlp(), "mlp")
        with env.open_local(pkg, lic) as m:
            m.compute(feeds)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from vault.core.process import stop_process

from .harness import Unavailable, die_with_parent

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


class VaultEnv:
    def __init__(self, workdir: str | os.PathLike[str], *, lease_ttl: float = 60.0) -> None:
        self.dir = Path(workdir)
        self.ks_dir = self.dir / "ks"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._models: list[Any] = []
        # tcp workers (serve_tcp) and their lifelines' write ends
        self._workers: list[tuple[subprocess.Popen[bytes], int]] = []
        self.tcp_note = ""
        self._daemon_sock: str | None = None
        try:
            import vault.client  # noqa: F401
            from keyserver import init_dir
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(
                f"vault client or key server not importable ({type(exc).__name__}: {exc})"
            ) from None
        init_dir(self.ks_dir, address="tcp://127.0.0.1:7700")
        self.log = open(self.dir / "keyserver.log", "wb")
        cmd = [sys.executable, "-u", "-m", "keyserver", "serve", str(self.ks_dir),
               "--bind", "tcp://127.0.0.1:0", "--lease-ttl", str(lease_ttl)]  # fmt: skip
        # stdout carries the one JSON ready line; the log lines go to stderr
        self.ks = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.log, env=_env(), preexec_fn=die_with_parent
        )
        self._procs.append(self.ks)
        from vault.core.errors import VaultError
        from vault.core.launch import read_ready_line

        assert self.ks.stdout is not None
        try:
            with self.ks.stdout:
                ready = read_ready_line(self.ks.stdout, timeout=30, proc=self.ks, what="key server")
        except VaultError as exc:
            self.close()
            raise Unavailable(f"key server did not start: {exc}") from None
        self.address = str(ready["address"])
        from vault.core.licence import Licence

        self.admin_path = self.ks_dir / "admin.licence"
        lic = Licence.load(self.admin_path)
        lic.keyserver_address = self.address
        lic.save(self.admin_path)

    # -- packages ---------------------------------------------------------------------

    def seal(self, model: Any, model_id: str) -> tuple[Path, Path]:
        """Seal ``model`` (ModelProto or path), register its key, issue a licence."""
        from vault.core.crypto import PublisherKey
        from vault.core.keyclient import KeyServerClient
        from vault.core.licence import Licence
        from vault.sealing import seal

        out = self.dir / f"{model_id}.vault"
        r = seal(
            model,
            model_id=model_id,
            signing_key=PublisherKey.load(self.ks_dir / "publisher.key"),
            output=out,
        )
        lic_path = self.dir / f"{model_id}.licence"
        with KeyServerClient(Licence.load(self.admin_path)) as ks:
            ks.register_key(
                model_id=r.model_id, key_id=r.key_id, key=r.key, package_digest=r.digest
            )
            lic = ks.issue(r.model_id, holder="bench", same_user=True)  # tier 0: a local worker
        lic.save(lic_path)
        r.wipe_key()
        return out, lic_path

    def device_licence(self, model_id: str) -> Path:
        """A licence for the local daemon's enrolled device (tier 1)."""
        from vault.core.keyclient import KeyServerClient
        from vault.core.licence import Licence

        path = self.dir / f"{model_id}.t1.licence"
        with KeyServerClient(Licence.load(self.admin_path)) as ks:
            ks.issue(model_id, holder="bench-t1").save(path)
        return path

    def daemon(self) -> str:
        """``vault daemon`` (tier 1) on this key server, started on first use:
        its socket. Unavailable where workers cannot get their own uid."""
        if self._daemon_sock:
            return self._daemon_sock
        from vault.app.demo import _start_daemon, _tier1_setup
        from vault.core.device import init_device, record_keyserver
        from vault.core.keyclient import KeyServerClient
        from vault.core.licence import Licence

        setup, why = _tier1_setup()
        if setup is None:
            raise Unavailable(why)
        os.chmod(self.dir, 0o711)  # the workers' uid reaches its socket directory below
        dev = init_device(self.dir / "device")
        admin = Licence.load(self.admin_path)
        with KeyServerClient(admin) as ks:
            ks.enroll_device(device_id=dev.device_id, public_key=dev.public_key)
        record_keyserver(self.dir / "device", address=admin.keyserver_address,
                         public_key=admin.keyserver_public_key)  # fmt: skip
        proc, sock = _start_daemon(str(self.dir), str(self.dir / "device"), setup)
        self._procs.append(proc)
        self._daemon_sock = sock
        return sock

    # -- workers ----------------------------------------------------------------------

    def open_local(
        self, package: Path, licence: Path, *, local_channel: bool = True, **kw: Any
    ) -> Any:
        """``vault.open``; ``local_channel=False``: its calls over ZeroMQ, as
        before the direct local channel (``VAULT_LOCAL_CHANNEL=0``)."""
        import vault

        old = os.environ.get("VAULT_LOCAL_CHANNEL")
        if not local_channel:
            os.environ["VAULT_LOCAL_CHANNEL"] = "0"
        try:
            m = vault.open(package, licence=licence, **kw)
        finally:
            if old is None:
                os.environ.pop("VAULT_LOCAL_CHANNEL", None)
            else:
                os.environ["VAULT_LOCAL_CHANNEL"] = old
        self._models.append(m)
        return m

    def serve_tcp(
        self, package: Path, licence: Path, *, threads: int | None = None,
        curve_only_too: bool = False,
    ) -> Any:  # fmt: skip
        """Start ``python -m worker`` on tcp://127.0.0.1 with CURVE and an
        allow-list holding the licence's client key; return ``vault.connect`` to
        it (calls sealed, keys over CURVE: the default). ``curve_only_too``:
        also a second caller of the same worker whose calls stay on CURVE
        (``VAULT_SEALED=0``, the path before sealed calls), as a pair."""
        m = self._serve_tcp(package, licence, threads, probe=True)
        self.tcp_note = "stock worker"
        if not curve_only_too:
            return m
        import vault

        old = os.environ.get("VAULT_SEALED")
        os.environ["VAULT_SEALED"] = "0"
        try:
            c = vault.connect(m._endpoint, licence=licence, server_key=m._remote.server_key)  # noqa: SLF001
        finally:
            if old is None:
                del os.environ["VAULT_SEALED"]
            else:
                os.environ["VAULT_SEALED"] = old
        c.timeout = 120
        self._models.append(c)
        return m, c

    def _serve_tcp(self, package: Path, licence: Path, threads: int | None, probe: bool) -> Any:
        import vault
        from vault.core.licence import Licence

        lic = Licence.load(licence)
        allow = self.dir / f"allow-{package.stem}"
        allow.mkdir(exist_ok=True)
        (allow / "bench.pub").write_text(lic.client_public_key + "\n")
        from vault.core.launch import read_ready_line, spawn_worker

        status_r, status_w = os.pipe()
        # a lifeline: the worker leaves when this process does, however it ends
        # (a killed benchmark must leave no worker behind)
        life_r, life_w = os.pipe()
        args = [str(package), "--endpoint", "tcp://127.0.0.1:*", "--licence", str(licence),
                "--allow", str(allow), "--status-fd", str(status_w),
                "--lifeline-fd", str(life_r)]  # fmt: skip
        if threads:
            args += ["--threads", str(threads)]
        try:
            proc = spawn_worker(args, pass_fds=[status_w, life_r], cwd=str(self.dir))
        except BaseException:
            os.close(status_r)
            os.close(life_w)
            raise
        finally:
            os.close(status_w)
            os.close(life_r)
        self._procs.append(proc)
        self._workers.append((proc, life_w))
        try:
            msg = read_ready_line(status_r, timeout=120, proc=proc)
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"tcp worker failed ({type(exc).__name__}: {exc})") from None
        finally:
            os.close(status_r)
        try:
            m = vault.connect(
                msg["endpoint"],
                licence=licence,
                server_key=msg["server_key"],
                timeout=5 if probe else 60,
            )
        except Exception as exc:  # noqa: BLE001
            proc.terminate()
            proc.wait()
            raise Unavailable(f"no CURVE handshake ({type(exc).__name__}: {exc})") from None
        m.timeout = 120
        m._bench_pid = msg.get("pid")  # noqa: SLF001 - for VmHWM
        m._bench_sealed_port = msg.get("sealed_port")  # noqa: SLF001 - for an emulated link
        self._models.append(m)
        return m

    def end_section(self) -> None:
        """Close the models and stop the tcp workers opened so far; the key
        server and the daemon stay for the next section. Each section's
        workers otherwise lived to the end of the run: 17 idle ones (the
        latency section's) sat beside the oip section, whose load generator
        the REST door's batching gain at 32 callers then lost
        (docs/benchmarks.md, "Stop 33")."""
        for m in self._models:
            try:
                m.close()
            except Exception:  # noqa: BLE001
                pass
        self._models.clear()
        for p, lifeline in self._workers:
            if p.poll() is None:
                stop_process(p, 5)
            os.close(lifeline)
            self._procs.remove(p)
        self._workers.clear()

    def close(self) -> None:
        self.end_section()  # the models and tcp workers first, then the rest
        for p in reversed(self._procs):
            if p.poll() is None:
                stop_process(p, 5)
        self._procs.clear()
        log = getattr(self, "log", None)
        if log is not None:
            log.close()

    def __enter__(self) -> VaultEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
