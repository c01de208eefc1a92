"""Every command the documentation shows runs, exactly as written.

How it works (tests/docflows.py): every command block of README.md, docs/
and deploy/ (fenced ``bash``/``sh``/``python``, or an unlabelled fence that
starts with a command) must be listed in :data:`COVERAGE`, which says who
runs it:

- ``flow:NAME``: one of the flow tests below runs it, as written, in a
  private namespace (its own ports, hosts and system paths: tests/nshost.py),
  with the files a reader brings (their ONNX models) and the flow's checks
  after it;
- ``test:NAME``: another test checks it (named);
- ``exempt: REASON``: what this machine cannot run (docker, kubectl,
  systemd), or what the suite is (the test command, the benchmarks).

**A new command block fails** :func:`test_every_documented_command_block_is_covered`
until it is covered: add it to a flow below (``flow.shell(block(PATH,
TEXT))`` runs it; ``flow.python(...)`` a Python block) and list it here, or
exempt it with the reason. An entry is a file and a piece of the block's text
that no other block of that file contains; an entry that matches no block
(the docs changed) fails too.

No network: pip is told by its environment (``PIP_NO_INDEX``,
``PIP_NO_DEPS``, ``PIP_NO_BUILD_ISOLATION``) that this machine has no index,
and the documented venv reaches this test environment's dependencies through
one ``.pth`` file (the stand-in for a package index); the commands
themselves are never changed.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from tests.docflows import (
    ROOT,
    Flow,
    block,
    copy_checkout,
    doc_blocks,
    matching,
    require_same_python,
    unit_exec_start,
)
from tests.models import (
    blocks_model,
    classifier_pipeline,
    mlp,
    postprocess,
    preprocess,
    reference_pipeline,
)
from tests.nshost import NsHost, require_nshost

COVERAGE: dict[tuple[str, str], str] = {
    (
        "README.md",
        "pip install -e '.[test]' && vault demo",
    ): "exempt: .ci/run makes a fresh venv and runs this install itself; `vault demo` is "
    "test_worker_cli::test_vault_demo_runs_and_leaves_nothing_behind",
    ("README.md", "python -m pytest -q"): "exempt: the suite itself (.ci/run runs it)",
    ("README.md", "vault --version"): "test:test_readme_synopsis_matches_the_parser",
    ("README.md", 'vault.open("model.vault", licence="alice.licence") as model'): "flow:tier1",
    ("README.md", "vault keyserver init ks"): "flow:readme",
    ("README.md", "vault device init svc-device"): "flow:readme",
    ("README.md", "curl -s localhost:9100/v2/health/ready"): "flow:readme",
    ("README.md", "with ThreadPoolExecutor(8) as pool"): "flow:readme",
    ("README.md", "curl -s localhost:9100/metrics"): "flow:readme",
    ("README.md", "vault split model.onnx --protect-from block3_out"): "flow:readme",
    ("README.md", "hybrid.compute_many(batch)"): "flow:readme",
    (
        "README.md",
        "pip install -e '.[bench]'",
    ): "exempt: the benchmarks (minutes; performance is measured there, not in tests)",
    ("docs/benchmarks.md", "python -m benchmarks"): "exempt: the benchmarks themselves",
    (
        "docs/architecture.md",
        "vault seal (vault.app.cli_package)",
    ): "exempt: a diagram of the modules, not a command",
    ("docs/service.md", "vault worker keygen keys"): "flow:service",
    ("docs/service.md", "import vault"): "flow:service",
    ("docs/protocol.md", "--http 8000 --grpc 8001 --oip-host 0.0.0.0"): "flow:protocol",
    ("docs/protocol.md", "curl -sS --fail-with-body --cacert ca.pem"): "flow:protocol (and "
    "test_oip::test_the_documented_examples_run_as_written)",
    ("docs/protocol.md", "import tritonclient.grpc as grpcclient"): "flow:protocol (and "
    "test_oip::test_the_documented_examples_run_as_written)",
    ("README.md", "vault demo --web       # a page whose head runs"): "test:test_web::"
    "test_vault_demo_web_serves_a_page_that_classifies (the command as written, in a browser)",
    ("docs/web.md", "vault demo --web"): "test:test_web::"
    "test_vault_demo_web_serves_a_page_that_classifies",
    ("docs/web.md", "vault split model.onnx --split-point f"): "test:test_web::"
    "test_the_documented_commands_split_mint_and_serve_with_cors (bash runs the block as written)",
    ("docs/hybrid.md", "vault profile model.onnx"): "flow:hybrid",
    ("docs/hybrid.md", "import vault"): "flow:hybrid",
    ("deploy/README.md", "python3 -m pip wheel"): "flow:tier1",
    ("deploy/README.md", "python3 -m venv /opt/vault/venv"): "flow:tier1",
    ("deploy/README.md", "useradd --system"): "flow:tier1",
    ("deploy/README.md", "vault device init /var/lib/vault/device"): "flow:tier1",
    (
        "deploy/README.md",
        "cp deploy/vault-daemon.service",
    ): "flow:tier1 (systemctl emulated: the flow starts the unit's ExecStart as systemd would)",
    ("deploy/README.md", 'vault.open("model.vault", licence="alice.licence") as m'): "flow:tier1",
    ("deploy/README.md", "vault device keyserver /var/lib/vault/device"): "flow:tier1",
    (
        "deploy/README.md",
        "vault keyserver init ks --address tcp://vault-keyserver",
    ): "test:test_k8s_containers (run as written against PostgreSQL at that address)",
    (
        "deploy/README.md",
        "openssl req -x509 -newkey ec",
    ): "test:test_k8s_containers (run as written; the worker container serves REST and gRPC "
    "with the certificate and key as the `vault-worker-tls` Secret mounts them)",
    (
        "deploy/README.md",
        "vault licence token alice.licence",
    ): "test:test_k8s_containers (run as written against the worker container's command, "
    "at the Service's DNS name over TLS)",
    (
        "deploy/README.md",
        "docker build",
    ): "exempt: docker and a cluster (kubectl) are not on the test machine; "
    "test_k8s_containers lays out these Secrets' files as the pods mount them and runs "
    "each container's command; test_deploy checks the Dockerfile",
    (
        "deploy/README.md",
        "kubectl -n vault port-forward svc/vault-keyserver",
    ): "exempt: a cluster (kubectl) is not on the test machine; test_deploy checks that "
    "the Service and port it forwards exist in the manifests",
    (
        "deploy/README.md",
        "kubectl -n vault create secret generic vault-worker-licence",
    ): "exempt: a cluster (kubectl) is not on the test machine; test_k8s_containers lays "
    "out these Secrets' files as the pods mount them; test_deploy checks every Secret a pod "
    "reads is made here",
}


def _uncovered(blocks: list[Any]) -> list[Any]:
    return [b for b in blocks if not any(b.path == p and t in b.text for p, t in COVERAGE)]


def test_every_documented_command_block_is_covered() -> None:
    blocks = doc_blocks()
    uncovered = _uncovered(blocks)
    assert not uncovered, "\n".join(
        f"{b.where}: this command block runs in no test ({b.key[:70]}): run it in a flow of "
        "tests/integration/test_documented_commands.py and list it in COVERAGE (or exempt it "
        "there with the reason)"
        for b in uncovered
    )
    for (path, text), how in COVERAGE.items():
        found = matching(blocks, path, text)
        assert len(found) == 1, f"COVERAGE entry {path}: {text!r} matches {len(found)} blocks"
        assert how.startswith(("flow:", "test:", "exempt: ")), how


def test_a_new_command_block_is_caught(tmp_path: Path) -> None:
    """The control of the check above: a block added to a page (here, another
    helper's new command in docs/service.md) is reported until it is covered."""
    from tests.docflows import Block

    new = Block("docs/service.md", 300, "bash", "vault worker serve --http 8000 ...\n")
    assert _uncovered([*doc_blocks(), new]) == [new]


# --- the README's synopsis: every option it names exists -------------------------------------


def test_readme_synopsis_matches_the_parser() -> None:
    """The README's command list (a synopsis with placeholders, not runnable
    as is): each `vault ...` line's sub-command exists and every --option it
    names is one that sub-command takes; `vault --version` runs."""
    from vault.app.cli import build_parser

    syn = block("README.md", "vault --version")
    parser = build_parser()
    sub: Any = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    current: Any = None
    checked = 0
    group: Any = None
    for raw in syn.text.splitlines():
        # "vault device init DIR | enroll DIR ...": each alternative names its sub-command
        for n, seg in enumerate(raw.split("#", 1)[0].split("|")):
            words = seg.split()
            if n == 0 and words[:1] == ["vault"] and len(words) > 1 and words[1][0] != "-":
                group = sub.choices[words[1]]
                current, words = group, words[2:]
            if group is None:
                continue
            inner = [a for a in group._actions if a.__class__.__name__ == "_SubParsersAction"]
            if inner and words and words[0] in inner[0].choices:
                current = inner[0].choices[words[0]]
            if current is None:
                continue
            known = {o for a in current._actions for o in a.option_strings}
            for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", seg):
                assert opt in known, f"README synopsis: {raw.strip()!r}: {opt} is not an option"
                checked += 1
    assert checked > 40
    out = subprocess.run([sys.executable, "-m", "vault", "--version"], capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert re.fullmatch(r"vault \S+\n", out.stdout), out.stdout


# --- what a reader brings: their models ------------------------------------------------------


def _save(model: onnx.ModelProto, path: Path) -> None:
    path.write_bytes(model.SerializeToString())


def _vendor_models(d: Path, *, digits: bool = True) -> None:
    """What a reader brings; ``digits`` False where the flow itself writes
    them (the README's first line: ``vault demo --models .``)."""
    if digits:
        _save(mlp(64, 32, 10, seed=1), d / "digits-mlp.onnx")
        _save(mlp(64, 48, 10, seed=2), d / "digits-rf.onnx")
        _save(mlp(64, 16, 10, seed=3), d / "digits-old.onnx")
    _save(blocks_model(), d / "model.onnx")


@pytest.fixture
def host(tmp_path: Path) -> Any:
    require_nshost()
    with NsHost(tmp_path, hosts=["host", "vendor", "a", "b"]) as h:
        yield h


# --- the README: key server to a served, batched, metered repository with a bad model -----


def test_flow_readme(host: NsHost, tmp_path: Path) -> None:
    flow = Flow(host, tmp_path)
    _vendor_models(tmp_path, digits=False)
    flow.shell(block("README.md", "vault demo --models ."))
    assert {p.name for p in tmp_path.glob("digits-*.onnx")} == {
        "digits-mlp.onnx", "digits-rf.onnx", "digits-old.onnx"}  # fmt: skip
    started = flow.shell(block("README.md", "vault device init svc-device"))
    ready = started[-1]
    assert isinstance(ready, dict)
    states = {m: v["state"] for m, v in ready["models"].items()}
    assert states == {"digits-mlp": "READY", "digits-rf": "READY", "digits-old": "UNAVAILABLE"}
    assert ready["models"]["digits-old"]["reason"]["code"] == "keyserver"

    probes = flow.shell(block("README.md", "curl -s localhost:9100/v2/health/ready"))
    outs = [r.stdout for r in probes if isinstance(r, subprocess.CompletedProcess)]
    assert json.loads(outs[0]) == {"ready": True}
    assert json.loads(outs[1])["ready"] is True
    old = json.loads(outs[2])
    assert old["state"] == "UNAVAILABLE" and old["reason"]["code"] == "keyserver"
    assert "digits-old" in old["reason"]["message"]

    calls0 = _calls(host)
    flow.python(
        block("README.md", "with ThreadPoolExecutor(8) as pool"),
        after="""
            import onnx
            from tests.models import reference_pipeline
            plain = onnx.load("digits-mlp.onnx")  # as vault demo --models wrote it
            for x, r in zip(batches, results):
                want = reference_pipeline([plain], {"x": x})["logits"]
                np.testing.assert_allclose(r["logits"], want, rtol=1e-5, atol=1e-5)
        """,
    )
    metrics = flow.shell(block("README.md", "curl -s localhost:9100/metrics"))
    text = metrics[0].stdout  # type: ignore[union-attr]
    assert 'vault_requests_total{code="ok",licence="alice",model="digits-mlp",outcome="success"}' \
        in text.replace(" 64.0", "")  # fmt: skip
    rows, calls = _calls(host)
    assert rows - calls0[0] == sum(1 + i % 4 for i in range(64))  # every row once
    assert calls - calls0[1] < 64  # batched: fewer worker calls than calls

    # the hybrid: split with the planner, serve the tail, call it
    flow.shell(block("README.md", "vault split model.onnx --protect-from block3_out"))
    flow.python(
        block("README.md", "hybrid.compute_many(batch)"),
        prelude="""
            import numpy as np
            import vault
            batch = [{"x": np.random.default_rng(i).standard_normal((2, 8)).astype(np.float32)}
                     for i in range(4)]
        """,
        after="""
            from tests.models import blocks_model, reference_pipeline
            got = hybrid.compute_many(batch)
            for b, g in zip(batch, got):
                want = reference_pipeline([blocks_model()], b)["logits"]
                np.testing.assert_allclose(g["logits"], want, rtol=1e-5, atol=1e-5)
            hybrid.close()
        """,
    )
    print(*(f"{t:6.2f}s {c}" for t, c in flow.timings), sep="\n")


def _calls(host: NsHost) -> tuple[float, float]:
    """(rows, worker calls) of digits-mlp from the service's metrics, read in the host."""
    code = ("import re, urllib.request\n"
            "t = urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=30).read()\n"
            "v = lambda n: sum(float(x) for x in re.findall(\n"
            "    n + r'\\{model=\"digits-mlp\"\\} (\\S+)', t.decode()))\n"
            "print(v('vault_batch_size_sum'), v('vault_batch_size_count'))\n")  # fmt: skip
    r = host.run([sys.executable, "-c", code], text=True, check=True)
    rows, calls = r.stdout.split()
    return float(rows), float(calls)


# --- docs/service.md: /srv/models, /etc/vault/device, call licences, keygen -------------------


def test_flow_service(host: NsHost, tmp_path: Path) -> None:
    flow = Flow(host, tmp_path)
    _vendor_models(tmp_path, digits=False)
    flow.shell(block("README.md", "vault demo --models ."))
    assert {p.name for p in tmp_path.glob("digits-*.onnx")} == {
        "digits-mlp.onnx", "digits-rf.onnx", "digits-old.onnx"}  # fmt: skip
    started = flow.shell(block("docs/service.md", "vault worker keygen keys"))
    ready = started[-1]
    assert isinstance(ready, dict) and ready["models"]["digits-mlp"]["state"] == "READY"
    r = flow.python(
        block("docs/service.md", "import vault"),
        after="""
            out = remote.compute({"x": x})
            assert out["logits"].shape == (3, 10)
            print("calls-ok")
        """,
    )
    assert "calls-ok" in r.stdout
    # the key server counted carol's calls under her call licence
    listing = flow.run("vault licence list --licence ks/admin.licence").stdout
    carol = next(line for line in listing.splitlines() if " carol " in line)
    assert re.search(r"\b\d+(\+\d+)?/1000\b", carol), carol


# --- docs/protocol.md: the Open Inference Protocol doors over TLS, a token, curl, tritonclient --


def _tls_files(d: Path) -> None:
    """ca.pem, and server.pem/server.key for localhost signed by it (what a
    vendor's own PKI hands the service)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vendor CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(cert.public_bytes(pem))
    (d / "server.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    (d / "server.key").chmod(0o600)  # a private key, as a PKI hands it over


def test_flow_protocol(host: NsHost, tmp_path: Path) -> None:
    flow = Flow(host, tmp_path)
    pre, model, post = classifier_pipeline()
    _save(pre, tmp_path / "pre.onnx")
    _save(model, tmp_path / "clf.onnx")
    _save(post, tmp_path / "post.onnx")
    _tls_files(tmp_path)
    image = np.arange(16, dtype=np.uint8).reshape(2, 8)
    (tmp_path / "request.json").write_text(
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [2, 8],
                        "datatype": "UINT8",
                        "data": image.ravel().tolist(),
                    }
                ]
            }
        )
    )
    flow.shell(block("README.md", "vault keyserver init ks"), start=1, first=3)  # its key server
    # what the page takes as given: the model sealed, the service's device and
    # licence, a customer's call licence; its prose names each command
    prose = " ".join((ROOT / "docs" / "protocol.md").read_text().split())
    for cmd in (
        "vault seal clf.onnx --pre pre.onnx --post post.onnx --model-id clf --batchable "
        "--licence ks/admin.licence -o clf.vault",
        "vault device init device",
        "vault device enroll device --licence ks/admin.licence --service",
        "vault licence issue clf --to service --licence ks/admin.licence -o service.licence",
        "vault licence issue clf --to shop --kind call --licence ks/admin.licence -o shop.licence",
    ):
        assert f"`{cmd}`" in prose, cmd
        flow.run(cmd)
    (ready,) = flow.shell(block("docs/protocol.md", "--http 8000 --grpc 8001 --oip-host 0.0.0.0"))
    assert isinstance(ready, dict) and ready["models"]["clf"]["state"] == "READY", ready
    assert (ready["http_port"], ready["grpc_port"], ready["tls"]) == (8000, 8001, True), ready
    env = {"VAULT_HTTP": "localhost:8000", "VAULT_GRPC": "localhost:8001"}
    runs = flow.shell(block("docs/protocol.md", "curl -sS --fail-with-body --cacert ca.pem"),
                      env=env)  # fmt: skip
    answers = [json.loads(r.stdout) for r in runs[1:]]  # type: ignore[union-attr]
    want = reference_pipeline([pre, model, post], {"image": image})
    got = {o["name"]: o["data"] for o in answers[0]["outputs"]}
    assert got["top_indices"] == want["top_indices"].ravel().tolist()
    assert answers[1]["inputs"][0]["name"] == "image"  # the metadata, with no token
    r = flow.python(block("docs/protocol.md", "import tritonclient.grpc as grpcclient"),
                    prelude=f"import os\nos.environ.update({env!r})\n")  # fmt: skip
    assert str(want["top_indices"]) in r.stdout, r.stdout
    print(*(f"{t:6.2f}s {c}" for t, c in flow.timings), sep="\n")


# --- docs/hybrid.md: profile, split with pre/post, serve the tail, open the split -------------


def test_flow_hybrid(host: NsHost, tmp_path: Path) -> None:
    flow = Flow(host, tmp_path)
    _vendor_models(tmp_path)
    _save(preprocess(8), tmp_path / "pre.onnx")
    _save(postprocess(5), tmp_path / "post.onnx")
    flow.shell(block("README.md", "vault keyserver init ks"), start=1, first=3)  # its key server
    flow.shell(block("docs/hybrid.md", "vault profile model.onnx"))
    flow.python(
        block("docs/hybrid.md", "import vault"),
        prelude="""
            import numpy as np
            arr = np.random.default_rng(0).integers(0, 255, (2, 8), dtype=np.uint8)
            batch = [np.random.default_rng(i).integers(0, 255, (1, 8), dtype=np.uint8)
                     for i in range(3)]
        """,
        after="""
            from tests.models import blocks_model, postprocess, preprocess, reference_pipeline
            with vault.open("clf.split", licence="alice.licence", server="tcp://vendor:7701",
                            server_key="worker.pub") as m:
                got = m.compute({"image": arr})
            want = reference_pipeline([preprocess(8), blocks_model(), postprocess(5)],
                                      {"image": arr})
            np.testing.assert_allclose(got["probs"], want["probs"], rtol=1e-5, atol=1e-6)
        """,
    )


# --- deploy/README.md: the wheel, a root-owned install, the daemon, tier 1 -------------------


def test_flow_tier1(host: NsHost, tmp_path: Path) -> None:
    """deploy/README.md on a fresh machine, as root: the wheel from a checkout,
    the venv in /opt/vault, the workers' user, the device, the unit's daemon;
    then the README's and deploy's `vault.open` through it (tier 1)."""
    require_same_python("/usr/bin/python3")
    checkout = copy_checkout(tmp_path / "checkout")
    flow = Flow(host, checkout)
    _vendor_models(checkout)
    _save(preprocess(8), checkout / "pre.onnx")
    _save(postprocess(5), checkout / "post.onnx")
    _save(mlp(8, 16, 5, seed=7), checkout / "clf.onnx")
    flow.shell(block("README.md", "vault keyserver init ks"), start=1, first=3)  # its key server
    flow.run("cp ks/admin.licence admin.licence")  # the vendor's admin, on this machine
    offline = {"PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"}  # no index: build here
    # the vendor's build machine: this environment's python3 (setuptools>=77, the
    # build's requirement, is in the test extras); the target below uses the system's
    build_path = f"{Path(sys.executable).parent}:{flow.base_env['PATH']}"
    flow.shell(block("deploy/README.md", "python3 -m pip wheel"),
               env={**offline, "PATH": build_path})  # fmt: skip
    wheel = checkout / "dist" / "vault_sandbox-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:  # the proto customers generate their stubs from
        assert "worker/service/oip/inference.proto" in zf.namelist()
    flow.shell(block("deploy/README.md", "python3 -m venv /opt/vault/venv"),
               env={**offline, "PIP_NO_DEPS": "1"})  # fmt: skip
    # the index's stand-in: the venv finds the dependencies in this test environment
    site = host.run(["/opt/vault/venv/bin/python", "-c",
                     "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    text=True, check=True).stdout.strip()  # fmt: skip
    deps = sysconfig.get_paths()["purelib"]
    host.run(["sh", "-c", f"echo {shlex.quote(deps)} > {site}/zz-test-deps.pth"], check=True)
    shown = host.run(["/opt/vault/venv/bin/python", "-c", "import vault, worker; "
                      "print(vault.__file__)"], text=True, check=True).stdout  # fmt: skip
    assert shown.startswith("/opt/vault/venv/"), shown  # the wheel's, not this checkout's
    flow.shell(block("deploy/README.md", "useradd --system"))
    flow.shell(block("deploy/README.md", "vault device init /var/lib/vault/device"))
    unit = (checkout / "deploy" / "vault-daemon.service").read_text()
    daemon: dict[str, Any] = {}

    def systemd_start() -> None:  # what systemd does for this unit: its directories, ExecStart
        host.run(["sh", "-c", "mkdir -p -m 0755 /run/vault && chmod 0700 /var/lib/vault"],
                 check=True)  # fmt: skip
        daemon.update(flow.background(unit_exec_start(unit), where="deploy/vault-daemon.service"))

    flow.shell(block("deploy/README.md", "cp deploy/vault-daemon.service"),
               emulate={"systemctl daemon-reload": systemd_start})  # fmt: skip
    # the vendor seals a model and licenses alice for it (a runtime licence, no --same-user)
    flow.run("vault seal clf.onnx --pre pre.onnx --post post.onnx --model-id clf "
             "--licence ks/admin.licence -o model.vault")  # fmt: skip
    flow.run("vault licence issue clf --to alice --licence ks/admin.licence -o alice.licence")
    r = flow.python(
        block("deploy/README.md", 'vault.open("model.vault", licence="alice.licence") as m')
    )
    assert r.stdout.strip() == "1", r.stdout  # tier 1: the daemon's worker
    flow.python(
        block("README.md", 'vault.open("model.vault", licence="alice.licence") as model'),
        prelude="""
            import numpy as np
            arr = np.random.default_rng(0).integers(0, 255, (2, 8), dtype=np.uint8)
        """,
        after="""
            from tests.models import mlp, postprocess, preprocess, reference_pipeline
            want = reference_pipeline([preprocess(8), mlp(8, 16, 5, seed=7), postprocess(5)],
                                      {"image": arr})
            np.testing.assert_allclose(out["probs"], want["probs"], rtol=1e-5, atol=1e-6)
        """,
    )
    log = [json.loads(x) for x in Path(daemon["_stderr"]).read_text().splitlines()]
    assert {r["component"] for r in log} == {"daemon"}
    assert any(r["event"] == "worker_started" and r["model"] == "clf" for r in log)
