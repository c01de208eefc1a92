"""A private "machine" for tests that run documented commands exactly as
written: its own network namespace (so ``tcp://0.0.0.0:7701``, ``:9100``,
``localhost:5432`` are free and private) and its own mount namespace, where
the system paths the docs name (``/opt/vault``, ``/var/lib/vault``, ``/srv``,
``/run/vault``) are on empty in-memory file systems (``/opt``, ``/srv``,
``/var/lib``, ``/run``) and ``/etc`` is a private
copy (``useradd`` and ``/etc/hosts`` entries such as ``host`` or
``vault-keyserver.vault.svc`` stay inside). Nothing it does touches this
machine's real paths, ports or users.

Commands enter it with ``nsenter``; every process left in its network
namespace is killed (SIGKILL) when it closes, even when the test fails.

Example::

    with NsHost(tmp_path, hosts=["host", "vendor"]) as h:
        h.run(["bash", "-c", "vault keyserver init ks"], cwd=tmp_path)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.prereq import require

__all__ = ["NsHost", "require_nshost"]

# whole directories, so that no mount point is ever made on the real file system
PRIVATE_TMPFS = ("/opt", "/srv", "/var/lib", "/run")


def require_nshost() -> None:
    require(os.geteuid() == 0, "root, for network and mount namespaces")
    for tool in ("unshare", "nsenter", "ip", "mount"):
        require(shutil.which(tool) is not None, f"{tool} (util-linux / iproute2)")


class NsHost:
    def __init__(self, workdir: Path, *, hosts: Sequence[str] = (),
                 addresses: Mapping[str, str] | None = None) -> None:  # fmt: skip
        """``hosts``: names of 127.0.0.1; ``addresses``: name -> an IPv4 address
        of this host that is not loopback (on ``lo``, like a Service's cluster IP),
        so that a server bound to loopback only is not reachable by that name."""
        require_nshost()
        self.workdir = workdir
        self.hosts = list(hosts)
        self.addresses = dict(addresses or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self._netns = ""
        self._children: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> NsHost:
        # the anchor process: it holds the namespaces until close()
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "private", "--", "sleep", "infinity"],
            start_new_session=True,
        )  # fmt: skip
        self.pid = self.proc.pid
        deadline = time.monotonic() + 30
        while True:  # unshare execs sleep once the namespaces exist
            try:
                if os.readlink(f"/proc/{self.pid}/exe").endswith("sleep"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "unshare did not start"
            time.sleep(0.01)
        self._netns = os.readlink(f"/proc/{self.pid}/ns/net")
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _setup(self) -> None:
        etc = self.workdir / ".host-etc"
        etc.mkdir()
        subprocess.run(["cp", "-a", "/etc/.", str(etc)], check=True, capture_output=True)
        hosts = etc / "hosts"
        if hosts.is_symlink():
            hosts.unlink()
        names = " ".join(["localhost", *self.hosts])
        extra = "".join(f"{ip} {name}\n" for name, ip in self.addresses.items())
        hosts.write_text(f"127.0.0.1 {names}\n::1 localhost\n{extra}")
        mounts = [f"mount --bind {etc} /etc"]
        for path in PRIVATE_TMPFS:
            mounts.append(f"mount -t tmpfs -o mode=0755 tmpfs {path}")
        addrs = [f"ip addr add {ip}/32 dev lo" for ip in sorted(set(self.addresses.values()))]
        script = " && ".join(["ip link set lo up", *addrs, *mounts])
        self.run(["sh", "-c", script], check=True)

    def command(self, args: Sequence[str], cwd: str | os.PathLike[str] | None = None) -> list[str]:
        """``args`` as run inside this host, in ``cwd`` (nsenter would otherwise
        start them in the anchor's directory, ``/``)."""
        wd = os.fspath(cwd) if cwd is not None else str(self.workdir)
        return ["nsenter", f"--target={self.pid}", "--net", "--mount", f"--wd={wd}", "--", *args]

    def run(self, args: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        kw.setdefault("capture_output", True)
        return subprocess.run(self.command(args, kw.pop("cwd", None)), **kw)

    def popen(self, args: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(self.command(args, kw.pop("cwd", None)), **kw)
        self._children.append(proc)  # reaped in close()
        return proc

    def pids(self) -> Iterator[int]:
        """Every process in this host's network namespace (the anchor excepted)."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.pid:
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/net") == self._netns:
                    yield int(entry)
            except OSError:
                continue

    def close(self) -> None:
        if self.proc is None:
            return
        if self._netns:
            # SIGKILL: a graceful stop would only wait on peers that are dying
            # too (a service reporting usage to a key server killed beside it)
            left = list(self.pids())
            deadline = time.monotonic() + 30
            while left:
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.02)
                left = list(self.pids())
                assert time.monotonic() < deadline, f"processes left in the host: {left}"
        for child in self._children:  # nsenter processes whose commands were just killed
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self._children.clear()
        self.proc.kill()
        self.proc.wait()
        self.proc = None
