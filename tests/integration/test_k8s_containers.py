"""The Kubernetes containers' commands, run for real.

deploy/k8s/*.yaml name what each container runs (``vault`` + its ``args``,
the image's entrypoint) and which files it reads where (Secrets,
ConfigMaps, claims); deploy/README.md has the commands that make those
Secrets. Here, in a private host (tests/nshost.py: its own network, the
manifests' paths, the cluster's DNS names in its /etc/hosts):

- PostgreSQL listens at the documented ``postgres.vault.svc:5432``; the
  documented ``VAULT_DATABASE_URL=... vault keyserver init ks`` runs as written;
- each Secret's files are laid out as the kubelet mounts them (a read-only
  mount; the files behind ``..data`` links, mode 0440 as ``defaultMode:
  0400`` with an ``fsGroup`` gives), the ConfigMap likewise, the models claim
  read-only;
- the key server's container command runs with ``$(DATABASE_URL)``
  expanded from its Secret as the kubelet does; its tcp probe connects and
  its anchor (the replica's own volume) receives checkpoints;
- the worker service's container command serves the repository (with one
  package it cannot load), its probes answer on the manifest's paths, and a
  caller's call goes through over ZeroMQ; its Open Inference Protocol doors
  serve over TLS with the certificate deploy/README.md's ``openssl`` command
  made (the ``kubectl create secret tls`` Secret's ``tls.crt``/``tls.key``),
  verified against that certificate at the Service's DNS name
  (``vault-worker.vault.svc``): the documented ``curl`` with a token minted
  by ``vault licence token`` answers what onnxruntime computes, a call without
  a token is refused with 401, and tritonclient's gRPC client gets the same
  answer (and ``UNAUTHENTICATED`` without a token).

What is not reproduced: the image build (Dockerfile: tests/unit/test_deploy.py)
and the uid (the commands run as root here, against read-only mounts).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.docflows import ROOT, Flow, block
from tests.models import mlp
from tests.nshost import NsHost, require_nshost
from tests.postgres import find_bindir
from tests.prereq import require

K8S = ROOT / "deploy" / "k8s"


def _docs() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        out.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return out


def _workload(kind: str, name: str) -> dict[str, Any]:
    (w,) = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return w


# ``kubectl create secret tls NAME --cert=PATH --key=PATH``: the Secret's keys
TLS_KEYS = {"--cert": "tls.crt", "--key": "tls.key"}


def _created() -> dict[str, dict[str, str]]:
    """deploy/README.md's ``kubectl create secret|configmap``: name -> {key: source}
    (``secret generic``'s ``--from-file``/``--from-literal``, ``secret tls``'s
    ``--cert``/``--key``, in their ``--opt=value`` or ``--opt value`` forms)."""
    out: dict[str, dict[str, str]] = {}
    text = "\n".join(  # the key server's block, then the worker service's
        block("deploy/README.md", first).text
        for first in ("docker build", "create secret generic vault-worker-licence")
    )
    for cmd in text.replace("\\\n", " ").splitlines():
        words = shlex.split(cmd, comments=True)
        if "create" not in words:
            continue
        at = words.index("create")
        kind = words[at + 1]
        name = words[at + 3] if kind == "secret" else words[at + 2]
        items: dict[str, str] = {}
        if kind == "secret" and words[at + 2] == "tls":
            for i, w in enumerate(words):
                opt, eq, value = w.partition("=")
                if opt in TLS_KEYS:
                    items[TLS_KEYS[opt]] = value if eq else words[i + 1]
            assert set(items) == set(TLS_KEYS.values()), cmd  # kubectl needs both
        for w in words:
            if w.startswith("--from-file="):
                src = w.split("=", 1)[1]
                items[os.path.basename(src.rstrip("/")) if not src.endswith("/") else src] = src
            elif w.startswith("--from-literal="):
                key, value = w.split("=", 1)[1].split("=", 1)
                items[key] = "literal:" + value
        out[name] = items
    return out


def _kubelet_layout(host: NsHost, mount: str, files: dict[str, bytes], mode: int) -> None:
    """``files`` as the kubelet's atomic writer mounts a Secret or ConfigMap:
    DIR/..<stamp>/KEY, DIR/..data -> ..<stamp>, DIR/KEY -> ..data/KEY, then
    the mount read-only."""
    stage = host.workdir / ".kubelet" / mount.strip("/").replace("/", "_")
    real = stage / "..2026_12_06_00_00_00.000000000"
    real.mkdir(parents=True)
    for key, data in files.items():
        (real / key).write_bytes(data)
        os.chmod(real / key, mode)
        os.chown(real / key, 0, 10001)
        (stage / key).symlink_to(f"..data/{key}")
    (stage / "..data").symlink_to(real.name)
    host.run(["sh", "-c", f"mkdir -p {mount} && mount --bind {stage} {mount} && "
              f"mount -o remount,bind,ro {mount}"], check=True)  # fmt: skip


def _secret_files(spec: dict[str, str], cwd: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for key, src in spec.items():
        if src.startswith("literal:"):
            files[key] = src[len("literal:") :].encode()
        elif src.endswith("/"):  # a directory: one key per file
            for f in sorted((cwd / src).iterdir()):
                files[f.name] = f.read_bytes()
        else:
            files[key] = (cwd / src).read_bytes()
    return files


def _mounts(host: NsHost, pod: dict[str, Any], created: dict[str, dict[str, str]],
            cwd: Path) -> None:  # fmt: skip
    (c,) = pod["containers"]
    vols = {v["name"]: v for v in pod["volumes"]}
    for m in c["volumeMounts"]:
        v = vols.get(m["name"])
        if v is None or "emptyDir" in v:
            continue  # a volumeClaimTemplate, or /tmp: the host's own
        if "secret" in v:
            name, mode = v["secret"]["secretName"], v["secret"].get("defaultMode", 0o644)
        elif "configMap" in v:
            name, mode = v["configMap"]["name"], v["configMap"].get("defaultMode", 0o644)
        else:
            continue  # a claim: filled by the test
        assert m.get("readOnly") is True, m
        _kubelet_layout(host, m["mountPath"], _secret_files(created[name], cwd),
                        mode | 0o040)  # fmt: skip  # fsGroup: group-readable


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """The kubelet's $(VAR) expansion of a container's args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


def _http(host: NsHost, port: int, path: str) -> tuple[int, str]:
    code = ("import urllib.request, urllib.error, sys\n"
            f"try:\n r = urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=30)\n"
            " print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n print(e.code); print(e.read().decode())\n")  # fmt: skip
    r = host.run([sys.executable, "-c", code], text=True, check=True)
    status, _, body = r.stdout.partition("\n")
    return int(status), body


def test_the_containers_commands_run_against_a_real_key_server_and_packages(
    tmp_path: Path,
) -> None:
    require_nshost()
    bindir = find_bindir()
    require(bindir is not None, "PostgreSQL server binaries (apt-get install postgresql)")
    require(shutil.which("setpriv") is not None, "setpriv, to run PostgreSQL unprivileged")
    require(shutil.which("openssl") is not None, "openssl, deploy/README.md's TLS certificate")
    require(shutil.which("curl") is not None, "curl, the customer's documented call")
    from tests.postgres import postgres_server

    created = _created()
    service = _workload("Service", "vault-worker")["metadata"]["name"]
    dns = f"{service}.vault.svc"  # the Service's name in the documented namespace
    # ... at an address of the host that is not loopback (a cluster IP's stand-in):
    # doors bound to loopback only would not answer there
    with NsHost(tmp_path, hosts=["postgres.vault.svc", "vault-keyserver.vault.svc"],
                addresses={dns: "10.96.0.10"}) as host:  # fmt: skip
        flow = Flow(host, tmp_path)
        with postgres_server(port=5432, wrap=lambda cmd: host.command(cmd, "/")):
            # the vendor's one-time steps, as written (key server init, `vault worker keygen`)
            flow.shell(block("deploy/README.md", "vault keyserver init ks --address"))
            ks = _workload("StatefulSet", "vault-keyserver")["spec"]["template"]["spec"]
            _mounts(host, ks, created, tmp_path)
            (kc,) = ks["containers"]
            env = {e["name"]: _secret_files(created[e["valueFrom"]["secretKeyRef"]["name"]],
                                            tmp_path)[e["valueFrom"]["secretKeyRef"]["key"]]
                   .decode() for e in kc["env"]}  # fmt: skip
            host.run(["mkdir", "-p", "/var/lib/vault/anchor"], check=True)  # its own claim
            flow.background(shlex.join(["vault", *_expand(kc["args"], env)]), env=env,
                            where="keyserver.yaml")  # fmt: skip
            port = kc["ports"][0]["containerPort"]
            probe = host.run([sys.executable, "-c", "import socket; "
                              f"socket.create_connection(('127.0.0.1', {port}), 10)"])  # fmt: skip
            assert probe.returncode == 0  # the tcp readiness probe

            # the vendor's service artefacts, through this key server (README's commands)
            for name, seed in (("digits-mlp", 1), ("digits-rf", 2), ("digits-old", 3)):
                (tmp_path / f"{name}.onnx").write_bytes(mlp(64, 16, 10, seed=seed)
                                                        .SerializeToString())  # fmt: skip
            flow.run("mkdir -p models && vault seal digits-mlp.onnx --model-id digits-mlp "
                     "--licence ks/admin.licence -o models/digits-mlp.vault && vault seal "
                     "digits-rf.onnx --model-id digits-rf --licence ks/admin.licence "
                     "-o models/digits-rf.vault && vault seal digits-old.onnx --model-id "
                     "digits-old --key-out old.key --signing-key ks/publisher.key "
                     "-o models/digits-old.vault")  # fmt: skip
            flow.run("vault device init svc-device && vault device enroll svc-device "
                     "--licence ks/admin.licence --service && vault licence issue --all-models --to "
                     "service --licence ks/admin.licence -o service.licence && vault licence "
                     "issue digits-mlp --to alice --kind call --licence ks/admin.licence "
                     "-o alice.licence")  # fmt: skip
            # the protocol's certificate, as written; the Secret is `create secret tls`'s
            flow.shell(block("deploy/README.md", "openssl req -x509"))
            assert created["vault-worker-tls"] == {"tls.crt": "tls.crt", "tls.key": "tls.key"}

            dep = _workload("Deployment", "vault-worker")["spec"]["template"]["spec"]
            _mounts(host, dep, created, tmp_path)
            (wc,) = dep["containers"]
            models = next(m["mountPath"] for m in wc["volumeMounts"] if m["name"] == "models")
            host.run(["sh", "-c", f"mkdir -p {models} && cp {tmp_path}/models/*.vault {models}/"
                      f" && mount --bind {models} {models} && mount -o remount,bind,ro {models}"],
                     check=True)  # fmt: skip
            ready = flow.background(shlex.join(["vault", *wc["args"]]),
                                    where="worker-service.yaml")  # fmt: skip
            states = {m: v["state"] for m, v in ready["models"].items()}
            assert states == {"digits-mlp": "READY", "digits-rf": "READY",
                              "digits-old": "UNAVAILABLE"}  # fmt: skip
            ports = {p["name"]: p["containerPort"] for p in wc["ports"]}
            for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
                status, _ = _http(host, ports["metrics"], wc[probe_name]["httpGet"]["path"])
                assert status == 200, probe_name
            status, body = _http(host, ports["metrics"], "/v2/models/digits-old/ready")
            assert status == 400 and json.loads(body)["reason"]["code"] == "keyserver"
            call = (
                "import vault, numpy as np\n"
                f"m = vault.connect('tcp://127.0.0.1:{ports['zmq']}', licence='alice.licence',"
                " server_key='keys/worker.key', model='digits-mlp')\n"
                "print(m.compute({'x': np.ones((2, 64), np.float32)})['logits'].shape)\n"
            )
            r = host.run([sys.executable, "-c", call], cwd=tmp_path, text=True)
            assert r.returncode == 0 and r.stdout.strip() == "(2, 10)", r.stderr[-3000:]
            _protocol_doors(host, flow, tmp_path, dns, ports)
            # this replica's own anchor has the checkpoints of what it released
            anchor = host.run(["cat", "/var/lib/vault/anchor/checkpoints"], text=True, check=True)
            assert anchor.stdout.count("\n") >= 1
            # the service's log: JSON lines, and the bad package's reason once per attempt
            log = [json.loads(x) for x in Path(ready["_stderr"]).read_text().splitlines()]
            assert any(r["event"] == "model_unavailable" and r["model"] == "digits-old"
                       for r in log)  # fmt: skip


GRPC_CALL = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url, ca, token = sys.argv[1:]
c = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=ca)
x = grpcclient.InferInput("x", [2, 64], "FP32")
x.set_data_from_numpy(np.ones((2, 64), np.float32))
out = {"ready": c.is_model_ready("digits-mlp")}
res = c.infer("digits-mlp", [x], headers={"authorization": f"Bearer {token}"})
out["logits"] = res.as_numpy("logits").tolist()
try:
    c.infer("digits-mlp", [x])
except InferenceServerException as exc:
    out["refused"] = [exc.status(), exc.message()]
print(json.dumps(out))
"""


def _protocol_doors(host: NsHost, flow: Flow, d: Path, dns: str, ports: dict[str, int]) -> None:
    """The REST and gRPC doors at the Service's DNS name, over TLS verified
    against the made certificate: the documented token and curl, a call
    without a token, tritonclient's gRPC client."""
    import numpy as np

    from tests.models import reference_pipeline

    x = np.ones((2, 64), np.float32)
    want = reference_pipeline([mlp(64, 16, 10, seed=1)], {"x": x})["logits"]
    (d / "request.json").write_text(json.dumps(
        {"inputs": [{"name": "x", "shape": [2, 64], "datatype": "FP32",
                     "data": x.ravel().tolist()}]}))  # fmt: skip
    # the vendor mints, the customer calls with curl: as written
    runs = flow.shell(block("deploy/README.md", "vault licence token alice.licence"))
    answer = json.loads(runs[-1].stdout)  # type: ignore[union-attr]
    (out,) = answer["outputs"]
    assert out["name"] == "logits" and out["shape"] == [2, 10]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(2, 10), want,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    url = f"https://{dns}:{ports['http']}/v2/models/digits-mlp/infer"
    # without a token: 401, the body never read
    r = host.run(["curl", "-sS", "--cacert", "tls.crt", "-D", "-", "-H",
                  "Content-Type: application/json", "-d", "@request.json", url],
                 cwd=d, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.partition("\n\n")  # text mode: CRLFs read as newlines
    assert head.split()[1] == "401", r.stdout
    assert "www-authenticate: bearer" in head.lower()
    assert json.loads(body)["code"] == "token_invalid", r.stdout
    # TLS really is verified: without the made certificate as CA, or at a name
    # it does not hold, curl refuses (60: CURLE_PEER_FAILED_VERIFICATION)
    for args in (["https://{dns}:{port}/v2/health/live"],
                 ["--cacert", "tls.crt", "https://localhost:{port}/v2/health/live"]):  # fmt: skip
        r = host.run(["curl", "-sS", *(a.format(dns=dns, port=ports["http"]) for a in args)],
                     cwd=d, text=True)  # fmt: skip
        assert r.returncode == 60, (args, r.returncode, r.stderr)
    # gRPC at the same name, the same certificate
    token = (d / "alice.token").read_text().strip()
    r = host.run([sys.executable, "-c", GRPC_CALL, f"{dns}:{ports['grpc']}", "tls.crt", token],
                 cwd=d, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    assert got["ready"] is True
    np.testing.assert_allclose(np.array(got["logits"], np.float32), want, rtol=1e-5, atol=1e-6)
    assert got["refused"][0] == "StatusCode.UNAUTHENTICATED", got
    assert got["refused"][1].startswith("[token_invalid]"), got
