"""Prerequisites a test needs from the machine (root, setpriv, useradd,
iproute2, PostgreSQL's binaries), checked one way.

Missing on a developer's machine, the test skips loudly with what to install.
Under CI (``CI`` set, as `.ci/run` runs), a missing prerequisite is a FAILURE:
CI's script provides every one, so a skip there could only hide a broken
setup, never an absent feature.
"""

from __future__ import annotations

import os

import pytest


def require(ok: bool, what: str) -> None:
    """Skip (loudly) or, under CI, fail unless ``ok``."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must provide this prerequisite: {what}")
    pytest.skip(f"LOUD SKIP: {what}")
