"""Reading a service's ready line: one JSON object on one line of its output.

A process we start (the key server, ``python -m keyserver serve``) says it is
serving by printing one line such as::

    {"ready": true, "address": "tcp://127.0.0.1:41234", "pid": 4242, ...}

and, when it cannot start, ``{"ready": false, "error": {"code": ..., "message": ...}}``
(raised here as the same typed error). Its output goes to a log file that the
launcher keeps (the line is followed by the server's log lines); this module
polls that file from an offset, so a restarted server's fresh line is the one
read.

Example::

    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    ready = read_ready_line("server.log", proc=proc, timeout=20)
    address = ready["address"]
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

from .errors import KeyServerUnavailableError, VaultError, from_wire

__all__ = ["parse_ready_line", "read_ready_line"]


def parse_ready_line(line: bytes | str) -> dict[str, Any] | None:
    """The ready object if ``line`` is one (``{"ready": ...}``), else None."""
    text = line.decode(errors="replace") if isinstance(line, bytes) else line
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or "ready" not in obj:
        return None
    return obj


def read_ready_line(
    path: str | os.PathLike[str],
    *,
    proc: subprocess.Popen[Any] | None = None,
    timeout: float = 20.0,
    start: int = 0,
    what: str = "key server",
) -> dict[str, Any]:
    """Wait for the first ready line written to ``path`` after byte ``start``.

    Returns the ready object (``ready`` is true). A ``{"ready": false}`` line
    raises the error it carries; a process that exits first, or no line
    within ``timeout`` seconds, raises :class:`KeyServerUnavailableError`
    with the end of the output (the launcher decides whether to kill it).
    """
    p = os.fspath(path)
    deadline = time.monotonic() + timeout
    pos = start
    pending = b""
    while True:
        exited = proc is not None and proc.poll() is not None
        try:
            with open(p, "rb") as fh:
                fh.seek(pos)
                chunk = fh.read()
        except FileNotFoundError:
            chunk = b""
        pos += len(chunk)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            obj = parse_ready_line(line)
            if obj is None:
                continue
            if obj.get("ready") is True:
                return obj
            err = obj.get("error")
            exc: VaultError = (
                from_wire(err)
                if isinstance(err, dict)
                else KeyServerUnavailableError(f"{what} failed to start")
            )
            raise exc
        if exited or time.monotonic() > deadline:
            tail = _tail(p, start)
            why = f"exited with code {proc.returncode}" if exited and proc else "is not ready"
            raise KeyServerUnavailableError(f"{what} {why} after its start:\n{tail}")
        time.sleep(0.02)


def _tail(path: str, start: int, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace")
