"""``vault ARGS`` run in this process, for the CLI tests."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from pathlib import Path


def vault_in_process(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``vault ARGS`` run in this process (the same entry point as the
    command, without an interpreter start each time), in ``cwd``."""
    from vault.app.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(args))
            except SystemExit as exc:  # --help, or a usage error
                rc = int(exc.code or 0)
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())
