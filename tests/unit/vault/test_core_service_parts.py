"""The small core parts the service stands on: model scopes, the one log,
the service's CURVE key files."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.waiting import wait_for
from vault.core.curvekeys import (
    load_secret_certificate,
    read_public_key,
    stable_server_keys,
    write_certificates,
)
from vault.core.errors import ComputeError, ConfigError, InputError, WrongModelError
from vault.core.logs import Log, reason
from vault.core.modelscope import covers, describe, is_exact, make_scope


def test_model_scopes() -> None:
    assert make_scope(["digits-rf", "digits-mlp", "digits-rf"]) == "digits-mlp,digits-rf"
    assert make_scope(["a,b"]) == "a,b" and make_scope(["x", "*"]) == "*"
    assert covers("digits-mlp,digits-rf", "digits-rf") and not covers("digits-mlp", "digits-rf")
    assert covers("digits-*", "digits-knn") and not covers("digits-*", "digitz")
    assert covers("*", "anything") and not covers(None, "m") and not covers("", "m")
    assert covers("m", "m") and not covers("m", "m2")  # exact ids are not prefixes
    assert is_exact("m") and not is_exact("a,b") and not is_exact("a*")
    assert describe("*") == "every model of this key server"
    assert describe("a,b") == "models a, b" and describe("m") == "model m"
    for bad in (["a b"], ["*a"], ["a**"], [""], [], ["x" * 129], ["a/b"]):
        with pytest.raises(ConfigError):
            make_scope(bad)


def test_reason_keeps_the_code_and_only_the_vaults_own_words() -> None:
    assert reason(WrongModelError("licence L is not for model 'm'")) == (
        "wrong_model", "licence L is not for model 'm'")  # fmt: skip
    # onnxruntime's text (node names) and a caller's values never reach a log
    assert reason(ComputeError("Node secret_mm3 failed: [1.5, 2.5]")) == (
        "compute", ComputeError.default_message)  # fmt: skip
    assert reason(InputError("x: value 0.123456 bad"))[1] == InputError.default_message
    assert reason(OSError(2, "/home/other/secret")) == ("FileNotFoundError", "unexpected error")
    code, text = reason(WrongModelError("a\nb\x1b[31m" + "z" * 400))
    assert "\n" not in text and "\x1b" not in text and len(text) == 300 and text.endswith("...")


def test_log_formats_levels_and_scalars_only() -> None:
    out = io.StringIO()
    log = Log(out, component="service", level="info")
    log("call", level="debug", model="m")  # below the level
    log("model_unavailable", level="error", model="m", code="wrong_model", arr=[1.0, 2.0])
    (line,) = out.getvalue().splitlines()
    rec = json.loads(line)
    assert list(rec)[:4] == ["ts", "level", "component", "event"]
    assert rec["level"] == "error" and rec["arr"] == "list"  # a stray list is its type name
    text = io.StringIO()
    Log(text, component="keyserver", fmt="text")("issued", holder="a b", licence="lic-1")
    ts, level, comp, event, *fields = text.getvalue().split(None, 4)
    assert (level, comp, event) == ("INFO", "keyserver:", "issued")
    assert fields == ['holder="a b" licence=lic-1\n'] and ts.endswith("Z")
    with pytest.raises(ValueError):
        Log(out, fmt="xml")


def test_server_keys_are_kept_private_and_stable(tmp_path: Path) -> None:
    pub, sec, created = stable_server_keys(tmp_path)
    assert created and os.stat(tmp_path / "worker.key_secret").st_mode & 0o777 == 0o600
    assert stable_server_keys(tmp_path) == (pub, sec, False)  # a restart: the same pair
    # every form a caller may hold names the same key
    (tmp_path / "worker.pub").write_text(pub.decode() + "\n")
    for form in (pub.decode(), tmp_path / "worker.pub", tmp_path / "worker.key"):
        assert read_public_key(form) == pub.decode()
    # the secret certificate where the public key goes: refused, naming the
    # public one (it used to work silently, and might be handed out so)
    with pytest.raises(ConfigError, match="SECRET key") as secret:
        read_public_key(str(tmp_path / "worker.key_secret"))
    assert f"({tmp_path / 'worker.key'}," in str(secret.value)
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    if os.geteuid() != 0:  # root writes anyway; the read-only mount case is in the k8s test
        with pytest.raises(ConfigError, match="--server-secret"):
            stable_server_keys(ro)
    with pytest.raises(ConfigError):
        read_public_key(tmp_path / "nope")
    (tmp_path / "junk").write_text("not a key\n")
    with pytest.raises(ConfigError, match="not a server key"):
        read_public_key(tmp_path / "junk")
    other = tmp_path / "other"
    other.mkdir()
    fresh, _ = write_certificates(other)  # vault worker keygen: a new pair each time
    assert len(fresh) == 40 and fresh != pub
    assert zmq.curve_public(sec) == pub  # the pair kept is a real pair


def test_the_public_key_given_as_server_secret_is_named_as_such(tmp_path: Path) -> None:
    """``--server-secret keys/worker.key`` (the public certificate, 0644 as it
    should be) says the file holds no secret key, naming the secret one;
    before, it said to chmod 600 a file that holds no secret."""
    pub, sec = write_certificates(tmp_path)
    public = tmp_path / "worker.key"
    assert os.stat(public).st_mode & 0o777 == 0o644
    with pytest.raises(ConfigError, match="holds no secret key") as err:
        load_secret_certificate(public)
    assert "chmod" not in str(err.value) and "worker.key_secret" in str(err.value)
    assert load_secret_certificate(tmp_path / "worker.key_secret") == (pub, sec)
    os.chmod(tmp_path / "worker.key_secret", 0o644)  # a secret open to others: the fix
    with pytest.raises(ConfigError, match="chmod 600"):
        load_secret_certificate(tmp_path / "worker.key_secret")


def test_the_connection_bound_logs_what_it_cut_and_a_process_near_its_file_limit() -> None:
    """vault/core/peercap.py says in its log what the per-address bound shut
    down (``connections_cut``: the port, the address, how many; the first at
    once) and when the process is near its open-file limit
    (``open_files_low``). Here a bound of 2: 5 silent connections from
    127.0.0.3, 3 cut and logged; then the soft limit lowered to just above
    what is open, and the check logs it."""
    import resource

    import zmq

    from tests.integration.test_sealed_attacks import _silent_flood
    from vault.core.peercap import PeerCap, prepare

    events: list[tuple[str, dict[str, Any]]] = []
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    prepare(sock)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    cap = PeerCap(per_address=2, log=lambda event, **f: events.append((event, f)))
    cap.watch(sock, "front")
    cap.start()
    flood: list[Any] = []
    try:
        flood = _silent_flood(port, 5)
        wait_for(lambda: sum(f["count"] for e, f in events if e == "connections_cut") >= 3,
                 "three connections are cut and logged", 60)  # fmt: skip
        cut = [f for e, f in events if e == "connections_cut"]
        assert {(f["port"], f["address"], f["limit"]) for f in cut} == {("front", "127.0.0.3", 2)}
    finally:
        for c in flood:
            c.close()
        sock.close()
        cap.close()
        ctx.term()
    from vault.core.peercap import LOW_FILES

    pipes = [os.pipe() for _ in range(10)]  # enough open that a limit can sit just above
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = len(os.listdir("/proc/self/fd"))
    near = int(used / LOW_FILES)  # above what is open, under a tenth more
    resource.setrlimit(resource.RLIMIT_NOFILE, (near, hard))
    try:
        cap._check_files()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for r, w in pipes:
            os.close(r)
            os.close(w)
    low = [f for e, f in events if e == "open_files_low"]
    assert low and low[0]["limit"] == near and low[0]["open"] >= used - 1, low
