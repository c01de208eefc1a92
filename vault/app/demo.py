"""``vault demo``: the whole flow in a temp dir, in a few seconds.

Key server (a subprocess on a free local port, 1 s leases) → an image
classifier pipeline built with ``onnx.helper`` (pre: resize + normalise; model:
a small CNN; post: softmax + top-k) → seal → register its key → a device made
and enrolled, and ``vault daemon`` started on it (tier 1) → issue a licence →
open through the daemon (a worker under its own uid) → compute → the worker's
hardening report and tier, read back from the kernel → the audit trail →
revoke → the next call refused. Everything it started is stopped and the temp
dir removed, whatever happens.

Tier 1 needs the daemon to start workers under another uid, so the demo needs
root for it (it uses ``vault-worker`` if that user exists, else ``nobody``)
and an interpreter and install that user can read. Without them it says why
and shows tier 0 (a ``--same-user`` licence) instead.

Example::

    $ vault demo
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from ..core.errors import ConfigError, LicenceError, VaultError
from ..core.launch import read_ready_line
from ..core.process import stop_process

__all__ = ["build_classifier", "run_demo"]

_OPSET = 18  # Resize with ``axes`` (so the batch dimension stays free)


def build_classifier(size: int = 16, classes: int = 10, seed: int = 0) -> tuple[Any, Any, Any]:
    """(pre, model, post) ONNX models: uint8 images of any size -> top-3 classes."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def model(
        nodes: list[Any], ins: list[Any], outs: list[Any], inits: list[Any], name: str
    ) -> Any:
        m = helper.make_model(helper.make_graph(nodes, name, ins, outs, inits),
                              opset_imports=[helper.make_opsetid("", _OPSET)])  # fmt: skip
        m.ir_version = 8
        return m

    def t(name: str, arr: np.ndarray) -> Any:
        return numpy_helper.from_array(arr, name)

    vi = helper.make_tensor_value_info
    pre = model(
        [helper.make_node("Cast", ["image"], ["imgf"], to=TensorProto.FLOAT),
         helper.make_node("Resize", ["imgf", "", "", "size"], ["resized"], axes=[2, 3], mode="linear"),
         helper.make_node("Div", ["resized", "c255"], ["unit"]),
         helper.make_node("Sub", ["unit", "mean"], ["centred"]),
         helper.make_node("Div", ["centred", "std"], ["x"])],
        [vi("image", TensorProto.UINT8, ["N", 3, "H", "W"])],
        [vi("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [t("size", np.array([size, size], np.int64)), t("c255", np.array(255, np.float32)),
         t("mean", np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)),
         t("std", np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1))],
        "preprocess",
    )  # fmt: skip

    def w(*shape: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    net = model(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c2"], ["r2"]),
         helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
         helper.make_node("Flatten", ["g"], ["f"]),
         helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"])],
        [vi("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [vi("logits", TensorProto.FLOAT, ["N", classes])],
        [t("w1", w(8, 3, 3, 3)), t("b1", w(8)), t("w2", w(16, 8, 3, 3)), t("b2", w(16)),
         t("w3", w(16, classes)), t("b3", w(classes))],
        "cnn",
    )  # fmt: skip
    post = model(
        [helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
         helper.make_node("TopK", ["probs", "k"], ["top_scores", "top_classes"], axis=-1)],
        [vi("logits", TensorProto.FLOAT, ["N", classes])],
        [vi("probs", TensorProto.FLOAT, ["N", classes]), vi("top_scores", TensorProto.FLOAT, ["N", 3]),
         vi("top_classes", TensorProto.INT64, ["N", 3])],
        [t("k", np.array([3], np.int64))],
        "postprocess",
    )  # fmt: skip
    return pre, net, post


EXAMPLE_MODELS = {"digits-mlp": (32, 1), "digits-rf": (48, 2), "digits-old": (16, 3)}


def write_example_models(directory: str) -> list[str]:
    """The README's example models, for a reader who has none: three
    classifiers of 64 float32 features (``x: [N, 64]`` -> ``logits: [N, 10]``),
    a hidden layer of 32, 48 and 16, random weights; built with
    ``onnx.helper``. An existing file is refused (ConfigError), never
    overwritten. Returns the paths written."""
    from onnx import TensorProto, helper, numpy_helper

    paths = [os.path.join(directory, f"{name}.onnx") for name in EXAMPLE_MODELS]
    there = [p for p in paths if os.path.lexists(p)]
    if there:
        raise ConfigError(f"{there[0]} exists: not overwritten (choose another directory)")
    os.makedirs(directory, exist_ok=True)
    vi = helper.make_tensor_value_info
    for path, (hidden, seed) in zip(paths, EXAMPLE_MODELS.values()):
        rng = np.random.default_rng(seed)
        inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), n)
                 for n, shape in (("w1", (64, hidden)), ("b1", (hidden,)), ("w2", (hidden, 10)),
                                  ("b2", (10,)))]  # fmt: skip
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w1"], ["h0"]),
             helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]),
             helper.make_node("MatMul", ["h", "w2"], ["l0"]),
             helper.make_node("Add", ["l0", "b2"], ["logits"])],
            os.path.basename(path)[: -len(".onnx")],
            [vi("x", TensorProto.FLOAT, ["N", 64])], [vi("logits", TensorProto.FLOAT, ["N", 10])],
            inits,
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
        model.ir_version = 8
        with open(path, "xb") as fh:
            fh.write(model.SerializeToString())
    return paths


def _step(n: int, text: str) -> None:
    print(f"\n[{n}] {text}", flush=True)


def _start_keyserver(
    root: str, log_path: str, lease_ttl: float
) -> tuple[subprocess.Popen[bytes], str]:
    log = open(log_path, "wb")
    cmd = [sys.executable, "-u", "-m", "keyserver", "serve", root, "--bind", "tcp://127.0.0.1:0",
           "--lease-ttl", str(lease_ttl)]  # fmt: skip
    # stdout carries the one JSON ready line; the log lines go to stderr
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    assert proc.stdout is not None
    try:
        ready = read_ready_line(proc.stdout, timeout=20, proc=proc, what="key server")
    except VaultError as exc:
        proc.kill()
        proc.wait()
        raise VaultError(f"the demo key server did not start: {exc}") from None
    finally:
        proc.stdout.close()
    return proc, str(ready["address"])


def _tier1_setup() -> tuple[dict[str, Any] | None, str]:
    """How to run the daemon here: ``({"user", "python", "sys_path"}, "")``,
    or ``(None, why not)``."""
    import importlib.util
    import pwd

    if os.geteuid() != 0:
        return None, (
            f"tier 1 needs a daemon that starts workers under their own uid (root or a "
            f"service user); this demo runs as uid {os.geteuid()}"
        )
    try:
        pw = pwd.getpwnam("vault-worker")
    except KeyError:
        pw = pwd.getpwnam("nobody")
    sys_path: list[str] = []
    for mod in ("vault", "numpy", "onnxruntime", "zmq", "cryptography", "msgpack"):
        spec = importlib.util.find_spec(mod)
        if spec is None or spec.origin is None:
            return None, f"cannot locate {mod}"
        where = os.path.dirname(os.path.dirname(os.path.realpath(spec.origin)))
        if where not in sys_path:
            sys_path.append(where)
    probe = ("import sys; sys.path[:0] = sys.argv[1].split(':'); "
             "import numpy, onnxruntime, zmq, worker.startup, vault.core.package")  # fmt: skip
    from .daemon import blocked_for, check_install

    why: list[str] = []
    for python in dict.fromkeys((os.path.realpath(sys.executable), "/usr/bin/python3")):
        if not os.path.exists(python):
            continue
        for path, read in ((python, False), *((p, True) for p in sys_path)):
            blocked = blocked_for(path, pw.pw_uid, pw.pw_gid, read=read)
            if blocked:
                why.append(blocked)
        try:
            check_install(python, sys_path)
            ok = subprocess.run(
                [python, "-I", "-B", "-c", probe, ":".join(sys_path)], user=pw.pw_uid,
                group=pw.pw_gid, extra_groups=[], env={"PATH": "/usr/bin:/bin"}, cwd="/",
                stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
            ).returncode == 0  # fmt: skip
        except (VaultError, OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return {"user": pw.pw_name, "python": python, "sys_path": sys_path}, ""
    hint = f" ({'; '.join(dict.fromkeys(why))})" if why else ""
    return None, f"no interpreter and install here that user {pw.pw_name!r} can run{hint}"


def _start_daemon(
    tmp: str, device_dir: str, setup: dict[str, Any]
) -> tuple[subprocess.Popen[bytes], str]:
    from ..core.launch import read_ready_line as read_line

    sock = os.path.join(tmp, "daemon.sock")
    cmd = [sys.executable, "-m", "vault", "daemon", "--socket", sock, "--device", device_dir,
           "--worker-user", setup["user"], "--python", setup["python"]]  # fmt: skip
    for p in setup["sys_path"]:
        cmd += ["--worker-path", p]
    log = open(os.path.join(tmp, "daemon.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    try:
        assert proc.stdout is not None
        read_line(proc.stdout, timeout=20, proc=proc, what="daemon")
    except BaseException:
        stop_process(proc, 5)
        raise
    return proc, sock


def run_demo(lease_ttl: float = 1.0) -> int:
    from keyserver import commands  # the CLI is the app layer: lazy
    from keyserver.layout import init_dir

    from ..client import open as vault_open
    from ..core.crypto import PublisherKey
    from ..core.keyclient import KeyServerClient
    from ..core.licence import Licence
    from ..sealing import seal

    ks_proc: subprocess.Popen[bytes] | None = None
    daemon: subprocess.Popen[bytes] | None = None
    model: Any = None
    with tempfile.TemporaryDirectory(prefix="vault-demo-") as tmp:
        try:
            os.chmod(tmp, 0o711)  # the workers' uid passes through to its socket dir; lists nothing
            root = os.path.join(tmp, "ks")
            _step(
                1, f"key server: init {root}, start on a free local port (lease ttl {lease_ttl:g}s)"
            )
            init_dir(root, address="tcp://127.0.0.1:0")
            ks_proc, address = _start_keyserver(root, os.path.join(tmp, "keyserver.log"), lease_ttl)
            admin_path = os.path.join(root, "admin.licence")
            admin = Licence.load(admin_path)
            admin.keyserver_address = address
            admin.save(admin_path)
            print(f"    listening on {address}")

            _step(
                2,
                "build an image classifier: pre (resize 16x16 + normalise) -> CNN -> post (softmax, top-3)",
            )
            pre, net, post = build_classifier()
            _step(3, "seal it (encrypted, signed) and register its key with the key server")
            pkg = os.path.join(tmp, "classifier.vault")
            res = seal(net, pre=pre, post=post, model_id="demo-classifier",
                       signing_key=PublisherKey.load(os.path.join(root, "publisher.key")), output=pkg)  # fmt: skip
            with KeyServerClient(admin) as ks:
                ks.register_key(
                    model_id=res.model_id, key_id=res.key_id, key=res.key, package_digest=res.digest
                )
                res.wipe_key()
                print(
                    f"    {os.path.basename(pkg)}: {os.path.getsize(pkg)} bytes, "
                    f"digest {res.digest[:23]}..."
                )
                _step(4, "the runtime host: a device key only root can read, enrolled; "
                         "`vault daemon` on it (tier 1)")  # fmt: skip
                setup, why_not = _tier1_setup()
                sock = None
                if setup is not None:
                    from ..core.device import init_device, record_keyserver

                    dev = init_device(os.path.join(tmp, "device"))
                    ks.enroll_device(device_id=dev.device_id, public_key=dev.public_key)
                    record_keyserver(os.path.join(tmp, "device"), address=address,
                                     public_key=admin.keyserver_public_key)  # fmt: skip
                    print(f"    device {dev.device_id} enrolled")
                    daemon, sock = _start_daemon(tmp, os.path.join(tmp, "device"), setup)
                    print(f"    daemon on {sock}; workers run as {setup['user']!r} "
                          f"from {setup['python']} with -I and a clean environment")  # fmt: skip
                else:
                    print(f"    no tier 1 here: {why_not}")
                    print("    falling back to tier 0: a --same-user licence (your user could "
                          "extract the model)")  # fmt: skip
                _step(5, "issue a licence to alice")
                lic = ks.issue(res.model_id, holder="alice", max_calls=100,
                               same_user=setup is None)  # fmt: skip
            lic_path = os.path.join(tmp, "alice.licence")
            lic.save(lic_path)
            print(f"    {lic.kind} licence {lic.licence_id} for {lic.model_id}, max 100 calls")

            _step(
                6,
                "open the model: the daemon's worker verifies, gets the key as the device "
                "(with alice's proof), decrypts in memory",
            )
            t0 = time.perf_counter()
            model = vault_open(pkg, licence=lic_path, daemon=sock)
            print(f"    ready in {time.perf_counter() - t0:.2f}s; inputs {model.inputs}")
            print(f"    outputs {model.outputs}")

            _step(7, "compute on two random 40x30 images")
            images = np.random.default_rng(1).integers(0, 256, (2, 3, 40, 30), dtype=np.uint8)
            out = model.compute({"image": images})
            for i in range(2):
                pairs = ", ".join(
                    f"class {c}: {s:.3f}"
                    for c, s in zip(out["top_classes"][i], out["top_scores"][i])
                )
                print(f"    image {i}: {pairs}")

            _step(8, "the worker's hardening report, read back from the kernel")
            health = model.health()
            for name, step in health["hardening"].items():
                print(f"    {name:<13} {step['status']:<8} {step['detail']}")
            print(f"    provider {health['provider']}; lease {health['lease']['state']}")
            tier = model.tier
            print(f"    TIER {tier}: {health['hardening'].get('tier', {}).get('detail', '')}")

            _step(9, "the key server's audit trail")
            commands.cmd_audit(root, verify_chain=True)

            _step(
                10,
                f"revoke alice's licence; the worker learns at its next renewal (< {lease_ttl:g}s)",
            )
            with KeyServerClient(admin) as ks:
                ks.revoke(lic.licence_id)
            deadline = time.monotonic() + 4 * lease_ttl + 2
            refused: VaultError | None = None
            while time.monotonic() < deadline and refused is None:
                try:
                    model.compute({"image": images})
                    time.sleep(0.1)
                except LicenceError as exc:
                    refused = exc
            if refused is None:
                print("    the call was NOT refused (unexpected)")
                return 1
            print(f"    next call refused: {type(refused).__name__}: {refused}")
            _step(
                11, "clean up: stop the worker, the daemon and the key server, remove the temp dir"
            )
            return 0
        finally:
            if model is not None:
                model.close()
            if daemon is not None:
                stop_process(daemon, 5)
            if ks_proc is not None:
                stop_process(ks_proc, 5)
