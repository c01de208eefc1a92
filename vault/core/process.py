"""Stopping a child process we started: politely, then firmly.

Example::

    proc = subprocess.Popen([...])
    try:
        ...
    finally:
        stop_process(proc)
"""

from __future__ import annotations

import subprocess
from typing import Any

__all__ = ["stop_process"]


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)
