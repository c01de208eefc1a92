"""Structured logs: one JSON object per line, never tensor data or node names.

Only what an operator needs to follow calls and processes goes in: the event
name, model id, licence id, request id, error *code*, timings, pids. Error
messages from a worker are left out on purpose: onnxruntime's text can name
internal nodes, and an input error can quote a caller's values.

Example::

    log = JsonLog(sys.stderr)
    log("call", model="m", licence="lic-1", code="ok", ms=1.2)
    # {"ts": "2026-11-25T09:00:00.000Z", "level": "info", "event": "call", ...}
"""

from __future__ import annotations

import json
import threading
import time
from typing import IO, Any

__all__ = ["JsonLog"]

_ALLOWED_TYPES = (str, int, float, bool, type(None))


class JsonLog:
    """A callable that writes one JSON line per event (thread-safe)."""

    def __init__(self, stream: IO[str] | None, *, level: str = "info") -> None:
        self.stream = stream
        self.verbose = level == "debug"
        self._lock = threading.Lock()

    def __call__(self, event: str, *, level: str = "info", **fields: Any) -> None:
        if self.stream is None or (level == "debug" and not self.verbose):
            return
        now = time.time()
        rec: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now % 1 * 1000):03d}Z",
            "level": level,
            "event": event,
        }
        for k, v in fields.items():
            # scalars only: a stray array or dict (a tensor, a worker's error
            # text with node names) never reaches the log
            rec[k] = v if isinstance(v, _ALLOWED_TYPES) else type(v).__name__
        line = json.dumps(rec, separators=(",", ":"))
        with self._lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass
