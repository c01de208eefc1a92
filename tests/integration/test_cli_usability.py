"""The first hour with the command line (issue 18, item 7 and item 1's hint):
what a new vendor types wrong, and what they then read.

Each is checked where a user sees it: the exit code, stderr, the exception
type. Most run ``vault``'s ``main()`` in this process (no server needed);
the broken pipe runs the real command in a real shell pipeline.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import zmq
from onnx import TensorProto, helper

import vault
from tests.conftest import KeyServerProcess
from tests.models import mlp, postprocess
from tests.sealed import sealed_model
from vault.app.cli import main
from vault.core.crypto import PublisherKey
from vault.core.keyclient import KeyServerClient
from vault.core.licence import Licence


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse: usage errors (2), --help and --version (0)
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _main(["--version"], capsys)
    assert rc == 0 and out.startswith("vault ")


@pytest.mark.parametrize(
    "args",
    [
        ["worker", "serve", "m.vault", "--licence", "s.licence", "--instances", "0"],
        ["worker", "serve", "m.vault", "--licence", "s.licence", "--instances", "two"],
        ["worker", "serve", "m.vault", "--licence", "s.licence", "--metrics-port", "99999"],
        ["worker", "serve", "m.vault", "--licence", "s.licence", "--max-batch", "-3"],
        ["worker", "serve", "m.vault", "--licence", "s.licence", "--request-timeout", "nan"],
        ["keyserver", "serve", "ks", "--lease-ttl", "0"],
        ["licence", "issue", "m", "--to", "a", "--max-calls", "-1", "--licence", "a.licence"],
        ["licence", "issue", "m", "--to", "a", "--rate", "fast", "--licence", "a.licence"],
        ["daemon", "--standby", "-1"],
        ["profile", "m.onnx", "-o", "p.json", "--repeats", "0"],
    ],
    ids=lambda a: " ".join(a[:2] + a[-2:]),
)
def test_a_wrong_argument_type_is_a_usage_error(args: list[str], capsys: Any) -> None:
    rc, _, err = _main(args, capsys)
    assert rc == 2 and "usage: vault" in err and "Traceback" not in err, err


def test_a_broken_pipe_ends_quietly(tmp_path: Path) -> None:
    r = subprocess.run(["bash", "-c", f"{sys.executable} -m vault keyserver init ks | head -3"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert len(r.stdout.splitlines()) == 3
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert (tmp_path / "ks" / "admin.licence").exists()  # the command did its work first
    # control: a program that writes on the same way without handling it does show one
    ctl = subprocess.run(["bash", "-c", f"{sys.executable} -c 'for i in range(100000): "
                          "print(i)' | head -3"], capture_output=True, text=True)  # fmt: skip
    assert "BrokenPipeError" in ctl.stderr


def _licence(tmp_path: Path, **kw: Any) -> Path:
    pub, sec = zmq.curve_keypair()
    ks_pub, _ = zmq.curve_keypair()
    path = tmp_path / "service.licence"
    Licence("lic-svc", "service", "tcp://127.0.0.1:9", ks_pub.decode(), pub.decode(),
            sec.decode(), model_id="*", **kw).save(path)  # fmt: skip
    return path


def test_serve_without_a_device_says_what_to_give(tmp_path: Path, capsys: Any) -> None:
    """The README's old command (no --device, a runtime licence): refused at
    once, with the operator's fix, before any worker starts."""
    lic = _licence(tmp_path)
    (tmp_path / "models").mkdir()
    rc, _, err = _main(["worker", "serve", "--repository", str(tmp_path / "models"),
                        "--licence", str(lic), "--bind", "tcp://127.0.0.1:0",
                        "--allow", str(tmp_path)], capsys)  # fmt: skip
    assert rc == 2, err
    assert "give --device DIR" in err and "vault device init DIR" in err
    assert "vault device enroll DIR" in err and "vault daemon" not in err


def test_run_help_says_it_uses_the_daemon(capsys: Any) -> None:
    rc, out, _ = _main(["run", "--help"], capsys)
    assert rc == 0 and "daemon" in out and "spawns a local worker" not in out


def _two_outputs() -> onnx.ModelProto:
    """``x`` -> ``logits`` and ``embedding``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])
    e = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 5])
    nodes = [helper.make_node("Identity", ["x"], ["logits"]),
             helper.make_node("Relu", ["x"], ["embedding"])]  # fmt: skip
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y, e]),
                          opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    m.ir_version = 8
    return m


def test_sealing_with_post_says_which_outputs_it_drops(tmp_path: Path, capsys: Any) -> None:
    PublisherKey.generate().save(tmp_path / "p.key", tmp_path / "p.pub")
    (tmp_path / "post.onnx").write_bytes(postprocess(5).SerializeToString())

    def seal(model: onnx.ModelProto) -> str:
        (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
        rc, _, err = _main(["seal", str(tmp_path / "m.onnx"), "--post", str(tmp_path / "post.onnx"),
                            "--model-id", "m", "--key-out", str(tmp_path / "k"),
                            "--signing-key", str(tmp_path / "p.key"),
                            "-o", str(tmp_path / "m.vault")], capsys)  # fmt: skip
        assert rc == 0, err
        return err

    err = seal(_two_outputs())
    assert "warning: model outputs ['embedding'] are not read by post" in err
    assert "does not return them" in err
    # control: a model whose outputs post reads entirely: no such warning
    assert "not read by post" not in seal(mlp(5, 8, 5))


def test_compute_with_a_bare_array_is_a_typed_error(tmp_path: Path) -> None:
    with sealed_model(tmp_path, mlp()) as (m, _):
        with pytest.raises(vault.InputError, match=r"takes a dict .* compute\(\{'x': arr\}\)"):
            m.compute(np.ones((1, 8), np.float32))  # type: ignore[arg-type]
        assert m.compute({"x": np.ones((1, 8), np.float32)})["logits"].shape == (1, 5)


def test_the_key_servers_log_has_the_common_fields_in_both_formats(
    keyserver: KeyServerProcess,
) -> None:
    started = keyserver.events("started")  # JSON by default
    assert started and list(started[0])[:4] == ["ts", "level", "component", "event"]
    assert started[0]["component"] == "keyserver" and started[0]["level"] == "info"
    bob = keyserver.issue("m", holder="bob")
    assert keyserver.events("issued", holder="bob", models="m")
    assert keyserver.stop() == 0
    keyserver.extra_args = ["--log-format", "text", "--log-level", "warning"]
    before = len(keyserver.output().splitlines())
    keyserver.start()
    keyserver.issue("m", holder="carol")  # "issued" is info: below the level
    with KeyServerClient(bob) as ks, pytest.raises(vault.PermissionDeniedError):
        ks.issue("m", holder="mallory")  # a caller's licence cannot issue: "denied", a warning
    assert keyserver.stop() == 0
    text = keyserver.output().decode().splitlines()[before:]
    assert len(text) == 1, text
    ts, level, component, event, *fields = text[0].split()
    assert ts.endswith("Z") and (level, component, event) == ("WARNING", "keyserver:", "denied")
    assert "op=issue" in fields and "code=permission_denied" in fields
