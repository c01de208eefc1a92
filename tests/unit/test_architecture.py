"""The layers are a rule, not a habit: import-linter's contracts in
pyproject.toml hold for the tree as it is, and a wrong import breaks them with
a message that names the rule."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(LINT)] if LINT.exists() else [sys.executable, "-m", "importlinter.cli"]
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [*cmd, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_import_contracts_hold() -> None:
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 kept, 0 broken" in res.stdout


def _copy_tree(dst: Path) -> None:
    for name in ("vault", "worker", "keyserver"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")


def test_worker_importing_the_application_breaks_the_layers(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    with open(tmp_path / "worker" / "ops.py", "a") as fh:
        fh.write("\nfrom vault.app import cli as _upward  # noqa: E402,F401\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "layers: vault.app > vault.hybrid > (worker | keyserver" in res.stdout
    assert "BROKEN" in res.stdout
    assert "worker.ops -> vault.app.cli" in res.stdout


def test_foundation_importing_the_key_server_breaks_both_rules(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    with open(tmp_path / "vault" / "core" / "package.py", "a") as fh:
        fh.write("\nimport keyserver.store as _upward  # noqa: E402,F401\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "only the application layer imports the worker or the key server BROKEN" in res.stdout
    assert "vault.core.package -> keyserver.store" in res.stdout


def test_worker_and_keyserver_never_import_each_other(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    with open(tmp_path / "keyserver" / "audit.py", "a") as fh:
        fh.write("\nimport worker.lease as _sideways  # noqa: E402,F401\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "keyserver.audit -> worker.lease" in res.stdout
