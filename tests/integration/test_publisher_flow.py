"""The publisher's whole command-line flow against a real key server:
``vault seal --licence admin.licence`` registers the key, ``vault licence
issue`` hands out a licence, ``vault run`` computes with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tests.models import classifier_pipeline, reference_pipeline


def _vault(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vault", *args], cwd=cwd, capture_output=True, text=True,
        timeout=120, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_seal_registers_issue_and_run(keyserver: Any, tmp_path: Path) -> None:
    pre, model, post = classifier_pipeline()
    for name, m in (("pre", pre), ("model", model), ("post", post)):
        onnx.save(m, tmp_path / f"{name}.onnx")
    admin = str(keyserver.admin_licence)  # publisher.key sits beside it: the default signing key
    r = _vault("seal", "model.onnx", "--pre", "pre.onnx", "--post", "post.onnx",
               "--model-id", "clf", "--licence", admin, "-o", "clf.vault", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "key registered with" in r.stdout

    r = _vault(
        "verify",
        "clf.vault",
        "--publisher",
        str(Path(admin).parent / "publisher.pub"),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr

    # tier 0 (no daemon on this machine): a --same-user licence, and the CLI says what it gives away
    r = _vault("licence", "issue", "clf", "--to", "carol", "--max-calls", "10", "--same-user",
               "--licence", admin, "-o", "carol.licence", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "can extract the model" in r.stdout
    r = _vault("inspect", "carol.licence", cwd=tmp_path)
    assert r.returncode == 0 and "can extract the model" in r.stdout, r.stdout + r.stderr
    assert "secret" not in r.stdout.lower()

    image = np.random.default_rng(5).integers(0, 255, (2, 8), dtype=np.uint8)
    np.save(tmp_path / "image.npy", image)
    # a runtime licence with no daemon: one clear line that says what to do
    r = _vault("licence", "issue", "clf", "--to", "erin", "--licence", admin,
               "-o", "erin.licence", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = _vault("run", "clf.vault", "--licence", "erin.licence", "--input", "image=image.npy",
               "--no-save", cwd=tmp_path, env={"VAULT_DAEMON": ""})  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "vault daemon" in r.stderr and "--same-user" in r.stderr
    r = _vault("run", "clf.vault", "--licence", "carol.licence", "--input", "image=image.npy",
               "--output-dir", "out", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    want = reference_pipeline([pre, model, post], {"image": image})
    np.testing.assert_allclose(np.load(tmp_path / "out" / "probs.npy"), want["probs"], rtol=1e-5)
    np.testing.assert_array_equal(
        np.load(tmp_path / "out" / "top_indices.npy"), want["top_indices"]
    )

    # a licence for another model cannot open this one
    r = _vault("licence", "issue", "other-model", "--to", "dave", "--same-user", "--licence",
               admin, "-o", "dave.licence", "--force", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = _vault("run", "clf.vault", "--licence", "dave.licence", "--input", "image=image.npy",
               "--no-save", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2
    assert "error[wrong_model]" in r.stderr
