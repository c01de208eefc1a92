"""The service's log: :class:`vault.core.logs.Log` with ``component="service"``.

One set-up for every long-running command (the key server and the daemon use
the same class): one line per event on stderr, JSON by default, never tensor
data or node names. Only what an operator needs to follow calls and
processes goes in: the event name, model id, licence id, error *code* (and,
for a model that cannot load, its sanitised message: :func:`reason`),
timings, pids.

Example::

    log = JsonLog(sys.stderr)
    log("call", model="m", licence="lic-1", code="ok", ms=1.2)
    # {"ts": "2026-11-25T09:00:00.000Z", "level": "info", "component": "service", ...}
"""

from __future__ import annotations

from typing import IO

from vault.core.logs import Log, reason

__all__ = ["JsonLog", "reason"]


class JsonLog(Log):
    """The service's log (JSON lines unless ``fmt="text"``)."""

    def __init__(self, stream: IO[str] | None, *, level: str = "info", fmt: str = "json") -> None:
        super().__init__(stream, component="service", fmt=fmt, level=level)
