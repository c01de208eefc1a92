"""``vault run`` and ``vault demo`` as a user runs them."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tests.models import mlp
from vault.core.crypto import PublisherKey
from vault.sealing import seal


def _sealed_for_alice(keyserver: Any, m: Any, model_id: str, out: Path) -> None:
    """``m`` sealed to ``out``, registered, and alice's tier-0 licence beside it."""
    res = seal(m, model_id=model_id, signing_key=PublisherKey.load(keyserver.publisher_key_path),
               output=out)  # fmt: skip
    keyserver.register(res.model_id, res.key_id, res.key, res.digest)
    keyserver.issue(res.model_id, same_user=True).save(out.parent / "alice.licence")  # tier 0


def test_vault_run_prints_and_writes_outputs(keyserver: Any, tmp_path: Path) -> None:
    _sealed_for_alice(keyserver, mlp(), "cli-model", tmp_path / "m.vault")
    np.save(tmp_path / "x.npy", np.ones((3, 8), np.float32))
    out = subprocess.run(
        [sys.executable, "-m", "vault", "run", str(tmp_path / "m.vault"), "--licence", str(tmp_path / "alice.licence"),
         "--input", f"x={tmp_path / 'x.npy'}", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "logits: float32 [3, 5]" in out.stdout
    assert np.load(tmp_path / "out" / "logits.npy").shape == (3, 5)
    bad = subprocess.run(
        [sys.executable, "-m", "vault", "run", str(tmp_path / "m.vault"), "--licence", str(tmp_path / "alice.licence"),
         "--input", f"nope={tmp_path / 'x.npy'}", "--no-save"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.startswith("vault: error[bad_input]")
    assert "missing input 'x' (float32 [N, 8]): give it as --input x=FILE.npy" in bad.stderr


def test_vault_run_never_uses_an_output_name_as_a_path(keyserver: Any, tmp_path: Path) -> None:
    """Output names come from the package; ``../../../../tmp/x`` is a valid
    ONNX name. It must land inside --output-dir, under a sanitised name."""
    import secrets

    from onnx import TensorProto, helper

    escape = f"../../../../tmp/vault-escape-{secrets.token_hex(4)}"
    m = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], [escape]), helper.make_node("Neg", ["x"], ["a/b:0"])],
            "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info(escape, TensorProto.FLOAT, [2]),
             helper.make_tensor_value_info("a/b:0", TensorProto.FLOAT, [2])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )  # fmt: skip
    m.ir_version = 8
    _sealed_for_alice(keyserver, m, "escape", tmp_path / "e.vault")
    np.save(tmp_path / "x.npy", np.ones(2, np.float32))
    target = Path(escape.replace("../../../..", "")).with_suffix(".npy")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "vault", "run", str(tmp_path / "e.vault"), "--licence",
             str(tmp_path / "alice.licence"), "--input", f"x={tmp_path / 'x.npy'}",
             "--output-dir", str(tmp_path / "out" / "deep")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert not target.exists()
        written = sorted(p.name for p in (tmp_path / "out" / "deep").iterdir())
        assert written == sorted([f"{escape.replace('/', '_').lstrip('.')}.npy", "a_b_0.npy"])
        assert not list((tmp_path / "out").glob("*.npy"))
    finally:
        target.unlink(missing_ok=True)


def test_vault_demo_runs_and_leaves_nothing_behind() -> None:
    before = set(glob.glob(f"{tempfile.gettempdir()}/vault-demo-*"))
    out = subprocess.run(
        [sys.executable, "-m", "vault", "demo"], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "next call refused: LicenceRevokedError" in out.stdout
    assert "seccomp" in out.stdout and "audit chain OK" in out.stdout
    assert set(glob.glob(f"{tempfile.gettempdir()}/vault-demo-*")) <= before
    if os.geteuid() == 0 and os.path.exists("/usr/bin/python3"):
        # root here (as in CI): the demo shows tier 1, read back from the worker's health
        assert "TIER 1: local daemon" in out.stdout, out.stdout
        assert "released" in out.stdout and "dev-" in out.stdout  # released to the device
    else:
        assert "falling back to tier 0" in out.stdout, out.stdout


def test_vault_run_saves_string_outputs_as_text(keyserver: Any, tmp_path: Path) -> None:
    """A string output is an object array, which `.npy` refuses without
    pickle: `vault run` ended in a traceback after a header-only file, and the
    outputs after it were never written. It is saved as a text array now,
    and every output after it too."""
    from onnx import TensorProto, helper

    m = helper.make_model(
        helper.make_graph(
            [helper.make_node("Cast", ["ids"], ["names"], to=TensorProto.STRING),
             helper.make_node("Add", ["ids", "ids"], ["twice"])],
            "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
            [helper.make_tensor_value_info("names", TensorProto.STRING, [2, 3]),
             helper.make_tensor_value_info("twice", TensorProto.INT64, [2, 3])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )  # fmt: skip
    m.ir_version = 8
    _sealed_for_alice(keyserver, m, "strs", tmp_path / "s.vault")
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    np.save(tmp_path / "ids.npy", ids)
    out = subprocess.run(
        [sys.executable, "-m", "vault", "run", str(tmp_path / "s.vault"), "--licence",
         str(tmp_path / "alice.licence"), "--input", f"ids={tmp_path / 'ids.npy'}",
         "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    names = np.load(tmp_path / "out" / "names.npy", allow_pickle=False)
    assert names.tolist() == [[str(i) for i in row] for row in ids.tolist()]
    assert np.array_equal(np.load(tmp_path / "out" / "twice.npy"), ids * 2)
