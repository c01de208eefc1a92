"""The Kubernetes manifests in deploy/k8s/ and the Dockerfile that builds the
image they name: valid against the Kubernetes schemas (kubernetes-validate,
strict), hardened as the threat model says, and consistent with the real CLI
(every container's arguments parse with ``vault``'s own parser)."""

from __future__ import annotations

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


@pytest.mark.parametrize("name", ["vault-worker", "vault-keyserver"])
def test_deployments_are_hardened(name: str) -> None:
    spec = _one("Deployment", name)["spec"]["template"]["spec"]
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
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    ann = tpl["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == args.metrics_port
    assert ann["prometheus.io/path"] == "/metrics"
    assert ports["zmq"] == int(args.bind.rsplit(":", 1)[1])
    # the drain finishes before Kubernetes sends SIGKILL
    assert args.drain_timeout < tpl["spec"]["terminationGracePeriodSeconds"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/tmp" in mounts  # the workers' ipc:// directories on a read-only root


def test_keyserver_takes_its_secrets_from_secrets() -> None:
    from keyserver.commands import DATABASE_ENV

    (c,) = _one("Deployment", "vault-keyserver")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env[DATABASE_ENV]["valueFrom"]["secretKeyRef"]["name"] == "vault-keyserver-db"
    # the URL (its password) never in the arguments, which every user on the node reads
    assert not any("$(" in a or "postgresql" in a or a == "--database" for a in c["args"])
    vols = _one("Deployment", "vault-keyserver")["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("secret", {}).get("secretName") == "vault-keyserver-dir" for v in vols)


def test_disruption_budgets_select_the_deployments() -> None:
    for name in ("vault-worker", "vault-keyserver"):
        pdb = _one("PodDisruptionBudget", name)
        labels = _one("Deployment", name)["spec"]["template"]["metadata"]["labels"]
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
