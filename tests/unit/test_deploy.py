"""The Kubernetes manifests in deploy/k8s/ and the Dockerfile that builds the
image they name: valid against the Kubernetes schemas (kubernetes-validate,
strict), hardened as the threat model says, and consistent with the real CLI
(every container's arguments parse with ``vault``'s own parser)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from vault.app.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.30.0"


def _docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def _version() -> str:
    m = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert m is not None
    return m.group(1)


@pytest.mark.parametrize("doc", _docs(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_is_valid_kubernetes(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_an_invalid_manifest_is_caught() -> None:  # the check above can fail
    bad = _one("Deployment", "vault-worker")
    bad = {**bad, "spec": {**bad["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


WORKLOADS = [("Deployment", "vault-worker"), ("StatefulSet", "vault-keyserver")]


@pytest.mark.parametrize(("kind", "name"), WORKLOADS)
def test_workloads_are_hardened(kind: str, name: str) -> None:
    spec = _one(kind, name)["spec"]["template"]["spec"]
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert c["image"] == f"vault-sandbox:{_version()}"
        # every argument is one the CLI takes
        build_parser().parse_args(c["args"])


def test_worker_probes_and_scraping_use_the_service_endpoints() -> None:
    dep = _one("Deployment", "vault-worker")
    tpl = dep["spec"]["template"]
    (c,) = tpl["spec"]["containers"]
    args = build_parser().parse_args(c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == args.metrics_port and args.metrics_host == "0.0.0.0"
    # the Open Inference Protocol's health: ready once the initial load is done and a
    # model serves (one bad package never takes a replica out of the Service)
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "metrics"}
    ann = tpl["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == args.metrics_port
    assert ann["prometheus.io/path"] == "/metrics"
    assert ports["zmq"] == int(args.bind.rsplit(":", 1)[1])
    # sealed calls' socket: a fixed port the Service exposes (a chosen-by-the-
    # system one would be unreachable, and every caller would stay on CURVE)
    assert args.sealed_port > 0 and ports["sealed"] == args.sealed_port
    svc = _one("Service", "vault-worker")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]}["sealed"] == args.sealed_port
    # the drain finishes before Kubernetes sends SIGKILL
    assert args.drain_timeout < tpl["spec"]["terminationGracePeriodSeconds"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/tmp" in mounts  # the workers' ipc:// directories on a read-only root


def test_keyserver_takes_its_secrets_from_secrets() -> None:
    from keyserver.commands import DATABASE_ENV

    ks = _one("StatefulSet", "vault-keyserver")
    (c,) = ks["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env[DATABASE_ENV]["valueFrom"]["secretKeyRef"]["name"] == "vault-keyserver-db"
    # the URL (its password) never in the arguments, which every user on the node reads
    assert not any("$(" in a or "postgresql" in a or a == "--database" for a in c["args"])
    vols = ks["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("secret", {}).get("secretName") == "vault-keyserver-dir" for v in vols)


def test_each_keyserver_replica_has_its_own_anchor() -> None:
    """docs/keyserver.md: one anchor per replica. The anchor file is on a
    volume from the StatefulSet's volumeClaimTemplates (one claim per pod),
    never a volume the replicas share."""
    ks = _one("StatefulSet", "vault-keyserver")
    assert ks["spec"]["replicas"] >= 2
    (c,) = ks["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(c["args"])
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    where = [p for p in mounts if args.anchor.startswith(p.rstrip("/") + "/")]
    assert len(where) == 1, (args.anchor, mounts)
    templates = {t["metadata"]["name"]: t for t in ks["spec"]["volumeClaimTemplates"]}
    assert mounts[where[0]] in templates
    assert templates[mounts[where[0]]]["spec"]["accessModes"] == ["ReadWriteOnce"]
    shared = {v["name"] for v in ks["spec"]["template"]["spec"]["volumes"]}
    assert mounts[where[0]] not in shared


def test_every_claim_a_pod_mounts_is_defined() -> None:
    claims = {d["metadata"]["name"] for d in _docs() if d["kind"] == "PersistentVolumeClaim"}
    for kind, name in WORKLOADS:
        w = _one(kind, name)
        templates = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for v in w["spec"]["template"]["spec"]["volumes"]:
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, (name, v)
        mounted = {m["name"] for c in w["spec"]["template"]["spec"]["containers"]
                   for m in c["volumeMounts"]}  # fmt: skip
        declared = {v["name"] for v in w["spec"]["template"]["spec"]["volumes"]} | templates
        assert mounted <= declared, (name, mounted - declared)


def _created(kind: str, secret_type: str | None = None) -> dict[str, list[str]]:
    """``kubectl create secret|configmap`` in deploy/README.md: name -> sources
    (``secret_type``: only ``create secret generic|tls``)."""
    text = (ROOT / "deploy" / "README.md").read_text().replace("\\\n", " ")
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if "kubectl" not in words or "create" not in words:
            continue
        at = words.index("create")
        if words[at + 1] != kind or (secret_type and words[at + 2] != secret_type):
            continue
        name = words[at + 3] if kind == "secret" else words[at + 2]
        out[name] = [w.split("=", 1)[1] for w in words
                     if w.startswith(("--from-", "--cert=", "--key="))]  # fmt: skip
    return out


def test_every_secret_and_config_map_a_pod_reads_is_made_by_the_documented_commands() -> None:
    secrets, maps = _created("secret"), _created("configmap")
    for kind, name in WORKLOADS:
        w = _one(kind, name)["spec"]["template"]["spec"]
        for v in w["volumes"]:
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets, v
            if "configMap" in v:
                assert v["configMap"]["name"] in maps, v
        for c in w["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert any(src.startswith(ref["key"] + "=") for src in secrets[ref["name"]])
    # the key server's directory: every file `keyserver serve --anchor` reads
    files = {os.path.basename(src) for src in secrets["vault-keyserver-dir"]}
    assert {"master.key", "server.secret", "audit.key"} <= files


def test_worker_serves_the_open_inference_protocol_over_tls_with_call_licences() -> None:
    """REST and gRPC on named ports the Service exposes, bound to every
    address of the pod, so over TLS (the service refuses plain text off
    loopback) with the `kubectl create secret tls` Secret's files; callers
    admitted by call licences (tokens are minted from them)."""
    dep = _one("Deployment", "vault-worker")["spec"]["template"]["spec"]
    (c,) = dep["containers"]
    args = build_parser().parse_args(c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert (ports["http"], ports["grpc"]) == (args.http, args.grpc) == (8000, 8001)
    assert args.oip_host == "0.0.0.0" and not args.dangerously_serve_plaintext
    assert args.call_licences and args.device and args.allow is None
    svc = {p["name"]: p for p in _one("Service", "vault-worker")["spec"]["ports"]}
    for name in ("http", "grpc"):
        assert svc[name]["port"] == ports[name] and svc[name]["targetPort"] == name
    # the certificate and key: the files `kubectl create secret tls` makes, mounted
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in dep["volumes"]}
    for path, key in ((args.tls_cert, "tls.crt"), (args.tls_key, "tls.key")):
        mount, file = os.path.split(path)
        assert file == key and mounts[mount]["readOnly"] is True, path
        secret = vols[mounts[mount]["name"]]["secret"]
        assert secret["defaultMode"] == 0o400
        # made by `kubectl create secret tls NAME --cert=... --key=...`
        assert len(_created("secret", "tls")[secret["secretName"]]) == 2


def test_disruption_budgets_select_the_workloads() -> None:
    for kind, name in WORKLOADS:
        pdb = _one("PodDisruptionBudget", name)
        labels = _one(kind, name)["spec"]["template"]["metadata"]["labels"]
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert sel.items() <= labels.items()
        assert pdb["spec"]["minAvailable"] >= 1


def test_dockerfile_builds_the_image_the_manifests_name() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert f"vault-sandbox:{_version()}" in text
    assert re.search(r"^RUN pip install \.", text, re.M)
    user = re.search(r"^USER (\d+)", text, re.M)
    assert user is not None
    pod = _one("Deployment", "vault-worker")["spec"]["template"]["spec"]["securityContext"]
    assert int(user.group(1)) == pod["runAsUser"]
    assert re.search(r'^ENTRYPOINT \["vault"\]', text, re.M)
    for pkg in ("vault", "worker", "keyserver"):
        assert re.search(rf"^COPY {pkg} \./{pkg}", text, re.M)


def test_the_callers_service_does_not_reach_the_metrics_and_a_policy_keeps_it_in() -> None:
    """/metrics lists every licence and its calls (other customers' activity):
    it sat on the callers' Service beside 7701/8000/8001, with no policy, so
    any caller reached it. Now the callers' Service carries only the callers'
    ports and a NetworkPolicy on the worker pods admits :9100 only from
    namespaces labelled as metrics readers, every callers' port from all."""
    dep = _one("Deployment", "vault-worker")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    pod_ports = {p["name"] for p in c["ports"]}
    svc = _one("Service", "vault-worker")
    exposed = {p["targetPort"] for p in svc["spec"]["ports"]}
    assert "metrics" in pod_ports and "metrics" not in exposed
    assert exposed == pod_ports - {"metrics"}
    pol = _one("NetworkPolicy", "vault-worker")["spec"]
    assert (
        pol["podSelector"]["matchLabels"].items()
        <= dep["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pol["policyTypes"] == ["Ingress"]
    open_to_all = [r for r in pol["ingress"] if "from" not in r]
    (caller_rule,) = open_to_all
    assert {p["port"] for p in caller_rule["ports"]} == exposed
    (metrics_rule,) = [r for r in pol["ingress"] if any(p["port"] == "metrics" for p in r["ports"])]
    assert metrics_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"vault.io/metrics-reader": "true"}}}
    ]


def test_the_key_server_is_up_and_reachable_before_the_service_files_are_made() -> None:
    """A newcomer could not follow the Kubernetes steps in order: enrolling
    the service's device and sealing need the key server, which the steps
    applied last, at an in-cluster name the workstation cannot resolve. Now
    the key server's manifest is applied first, its Service's port is
    forwarded under the name the key server's licences carry, and the
    worker's objects come after."""
    text = (ROOT / "deploy" / "README.md").read_text()
    init = re.search(r"vault keyserver init ks --address tcp://([^:\s]+):(\d+)", text)
    forward = re.search(r"port-forward svc/(\S+) (\d+):(\d+)", text)
    hosts = re.search(r'echo "127\.0\.0\.1 (\S+)" \| sudo tee -a /etc/hosts', text)
    assert init and forward and hosts
    assert hosts.group(1) == init.group(1)
    assert forward.group(2) == init.group(2)
    svc = _one("Service", forward.group(1))
    assert int(forward.group(3)) in {p["port"] for p in svc["spec"]["ports"]}
    assert init.group(1).split(".")[:2] == [forward.group(1), "vault"]  # its DNS name
    order = [
        text.index(s)
        for s in (
            "apply -f deploy/k8s/keyserver.yaml",
            "port-forward svc/",
            "vault device enroll svc-device",
            "create secret generic vault-worker-device",
            "apply -f deploy/k8s/worker-service.yaml",
        )
    ]
    assert order == sorted(order)
