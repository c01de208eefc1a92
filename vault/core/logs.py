"""One log for every long-running command: the key server, the daemon and
the worker service.

Each event is one line on stderr with the same leading fields everywhere:
``ts`` (UTC, milliseconds), ``level`` (``debug``, ``info``, ``warning``,
``error``), ``component`` (``keyserver``, ``daemon``, ``service``) and
``event`` (a stable snake_case name), then the event's own fields.
``--log-format json`` (the default) writes one JSON object per line;
``--log-format text`` the same fields as ``key=value`` after the time and
level, for a person at a terminal. ``--log-level`` drops what is below it.

Only scalars go in: a stray array or dict (a tensor, a worker's reply)
becomes its type name. Messages from errors go through :func:`reason` first,
which keeps the code and replaces the text of errors that may quote a
model's internals or a caller's values (onnxruntime's messages name nodes).

stdout carries only the command's documented ready line (one JSON object),
written with :func:`ready_line`.

Example::

    log = Log(sys.stderr, component="service", fmt="json", level="info")
    log("model_unavailable", level="error", model="m", code="wrong_model", message="...")
    # {"ts":"2026-11-25T09:00:00.000Z","level":"error","component":"service",
    #  "event":"model_unavailable","model":"m","code":"wrong_model","message":"..."}
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from typing import IO, Any

from .errors import VaultError

__all__ = ["FORMATS", "LEVELS", "Log", "add_log_options", "ready_line", "reason"]

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
FORMATS = ("json", "text")
_ALLOWED_TYPES = (str, int, float, bool, type(None))
_MAX_MESSAGE = 300
# codes whose message is the vault's or the key server's own words; any other
# code's text may come from onnxruntime or quote an input, so it is replaced
_SAFE_TEXT_CODES = frozenset({
    "config", "unknown_model", "licence", "licence_unknown", "licence_revoked",
    "licence_expired", "quota_exhausted", "rate_limited", "wrong_model", "digest_mismatch",
    "permission_denied", "keyserver", "keyserver_unavailable", "audit", "integrity",
    "format", "unsupported_version", "protocol", "worker", "worker_crashed", "timeout", "unavailable",
})  # fmt: skip
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def reason(exc: BaseException) -> tuple[str, str]:
    """``(code, message)`` of an error, fit for a log line: the code always;
    the message only when the vault wrote it (cut to 300 characters, control
    characters removed), else the error class's generic message."""
    if isinstance(exc, VaultError):
        code = exc.code
        text = exc.message if code in _SAFE_TEXT_CODES else type(exc).default_message
    else:  # a bug or an OS error: its type says enough, its text may hold paths of others
        code, text = type(exc).__name__, "unexpected error"
    text = _CONTROL.sub(" ", text).strip()
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    return code, text


class Log:
    """A callable that writes one line per event (thread-safe)."""

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        component: str = "vault",
        fmt: str = "json",
        level: str = "info",
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"log format must be one of {FORMATS}")
        if level not in LEVELS:
            raise ValueError(f"log level must be one of {tuple(LEVELS)}")
        self.stream = stream
        self.component = component
        self.fmt = fmt
        self.level = level
        self._min = LEVELS[level]
        self._lock = threading.Lock()

    @property
    def verbose(self) -> bool:
        return self._min <= LEVELS["debug"]

    def enabled(self, level: str) -> bool:
        return self.stream is not None and LEVELS.get(level, 20) >= self._min

    def __call__(self, event: str, *, level: str = "info", **fields: Any) -> None:
        if not self.enabled(level):
            return
        now = time.time()
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        rec: dict[str, Any] = {"ts": ts, "level": level, "component": self.component,
                               "event": event}  # fmt: skip
        for k, v in fields.items():
            # scalars only: a stray array or dict (a tensor, a worker's error
            # text with node names) never reaches the log
            rec[k] = v if isinstance(v, _ALLOWED_TYPES) else type(v).__name__
        line = json.dumps(rec, separators=(",", ":")) if self.fmt == "json" else _text(rec)
        with self._lock:
            try:
                assert self.stream is not None
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # a closed or broken stderr must not stop a server
                pass


def _text(rec: dict[str, Any]) -> str:
    head = (
        f"{rec.pop('ts')} {rec.pop('level').upper():<7} {rec.pop('component')}: {rec.pop('event')}"
    )
    parts = [head]
    for k, v in rec.items():
        s = v if isinstance(v, str) else json.dumps(v)
        if not s or any(c in s for c in ' "=\\'):
            s = json.dumps(s)
        parts.append(f"{k}={s}")
    return " ".join(parts)


def ready_line(fields: dict[str, Any], out: IO[str] | None = None, *, ready: bool = True) -> None:
    """The command's one documented line on stdout: ``{"ready": true, ...}``
    (``ready``: false from a command that is up but cannot serve yet, e.g. a
    worker service whose models are all unavailable; its fields say why)."""
    out = out if out is not None else sys.stdout
    print(json.dumps({"ready": ready, **fields}, sort_keys=True), file=out, flush=True)


def add_log_options(p: argparse.ArgumentParser) -> None:
    """``--log-format json|text`` and ``--log-level`` on a long-running command."""
    p.add_argument("--log-format", choices=FORMATS, default="json",
                   help="log lines on stderr: one JSON object each (default) or text")  # fmt: skip
    p.add_argument("--log-level", choices=tuple(LEVELS), default="info",
                   help="least severe level logged (debug also logs every successful call)")  # fmt: skip
