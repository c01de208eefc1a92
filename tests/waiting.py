"""Waiting for a state in tests: poll ``cond`` until it holds.

A test waits for what it needs (a model ready, a worker gone, an answer),
never for a duration: a loaded CI machine (load 3-5 on 2 cores) outlasts any
fixed sleep. The deadline only turns a broken system into a failed test
instead of a hung one, so it is generous.

Example::

    wait_for(lambda: not svc.model_ready("m"), "the model is not ready")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(cond: Callable[[], T], what: str, timeout: float = 120.0) -> T:
    """``cond()``'s first truthy value; an AssertionError naming ``what`` past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)
