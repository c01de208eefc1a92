"""What every benchmark section gets: one :class:`Context`.

A section is a module with ``section(ctx) -> dict`` (its rows and derived
figures, JSON-able). The context carries the mode (``quick``), a logger, a
private work directory, and the shared fixtures built on first use and
stopped once at the end: the vault environment (key server, sealing, local
and tcp workers, all started through :mod:`vault.core.launch`) and the raw
pyzmq echo server that every "same bytes over the same transport" floor
uses.

Example::

    def section(ctx: Context) -> dict[str, Any]:
        env = ctx.env          # None when the vault stack is unavailable (reason in ctx.env_error)
        echo = ctx.echo
        ...
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .harness import Unavailable

__all__ = ["Context"]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Context:
    def __init__(self, *, quick: bool, log: Callable[[str], None] = _stderr) -> None:
        self.quick = quick
        self.log = log
        self.workdir = Path(tempfile.mkdtemp(prefix="vault-bench-"))
        self._env: Any = None
        self.env_error: str | None = None
        self._echo: Any = None

    @property
    def env(self) -> Any:
        """The :class:`benchmarks.vaultenv.VaultEnv`, or None (see ``env_error``)."""
        if self._env is None and self.env_error is None:
            from .vaultenv import VaultEnv

            try:
                self._env = VaultEnv(self.workdir)
            except Unavailable as exc:
                self.env_error = str(exc)
                self.log(f"vault rows unavailable: {exc}")
        return self._env

    @property
    def echo(self) -> Any:
        """The raw pyzmq echo server (:class:`benchmarks.floors.EchoServer`), started once."""
        if self._echo is None:
            from .floors import EchoServer

            self._echo = EchoServer().__enter__()
        return self._echo

    def end_section(self) -> None:
        """What a section opened on the shared environment is closed before
        the next one runs (:meth:`VaultEnv.end_section`)."""
        if self._env is not None:
            self._env.end_section()

    def close(self) -> None:
        if self._echo is not None:
            self._echo.__exit__(None, None, None)
            self._echo = None
        if self._env is not None:
            self._env.close()
            self._env = None
        shutil.rmtree(self.workdir, ignore_errors=True)
