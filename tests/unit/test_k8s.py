"""The manifests in k8s/: valid against the Kubernetes API schemas, consistent with the cloud
config they deploy, and least privilege (who holds which Secret, which ports are reachable)."""

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cloud.config import CloudConfig
from cloud.proxy import TOKEN_PLACEHOLDER, render_nginx_conf
from tandem.contract import MESSAGE_MAX_BYTES
from tandem.settings import load_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.32"
# Not resources: the kustomization and a Prometheus scrape config.
NOT_RESOURCES = {"kustomization.yaml", "prometheus.yaml"}
SIGNING_KEY = "tandem-signing-key"
STORE_CREDENTIALS = "tandem-feedback-s3"
RECEIPT_KEY = "tandem-receipt-key"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def resource(name: str, kind: str, resource_name: str | None = None) -> dict[str, Any]:
    return next(d for d in documents(name) if d["kind"] == kind
                and resource_name in (None, d["metadata"]["name"]))


def ray_groups() -> dict[str, dict[str, Any]]:
    """The RayService's groups by name ("head" for the head group)."""
    cluster = resource("rayservice.yaml", "RayService")["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def pods() -> dict[str, dict[str, Any]]:
    """Every pod spec the manifests create, by a short name."""
    cronjob = resource("retrain-cronjob.yaml", "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    daemonset = resource("edge-daemonset.yaml", "DaemonSet")["spec"]["template"]["spec"]
    return {**{f"ray-{n}": g["template"]["spec"] for n, g in ray_groups().items()}, "retrain": cronjob, "edge": daemonset}


def secrets(pod: dict[str, Any]) -> set[str]:
    """The Secrets a pod can read: env, envFrom and volumes."""
    names = {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    for container in pod["containers"]:
        names |= {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
        names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                  if "secretKeyRef" in e.get("valueFrom", {})}
    return names


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == name)


def mounts(pod: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """Mount path -> (the volume, readOnly) of container `name`."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: {**volumes[m["name"]], "readOnly": m.get("readOnly", False)}
            for m in container(pod, name).get("volumeMounts", [])}


@pytest.fixture(scope="module")
def cloud() -> CloudConfig:
    return load_config(CloudConfig, ROOT / "cloud/cloud.prod.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml") if p.name not in NOT_RESOURCES))
def test_every_manifest_validates_against_the_kubernetes_schemas(name: str) -> None:
    for doc in documents(name):
        if doc["kind"] == "RayService":
            # A custom resource: no schema here. Its pod templates are Kubernetes' own type.
            assert doc["apiVersion"] == "ray.io/v1"
            for group, spec in ray_groups().items():
                template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": spec["template"]}
                kubernetes_validate.validate(template, KUBERNETES_VERSION, strict=True)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_applies_every_manifest_and_the_proxy_files() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {p.name for p in K8S.glob("*.yaml")} - NOT_RESOURCES
    (generated,) = kustomization["configMapGenerator"]
    assert all((K8S / f).is_file() for f in generated["files"])
    volumes = {v["name"]: v for v in pods()["ray-head"]["volumes"]}
    assert volumes["proxy-config"]["configMap"]["name"] == generated["name"]
    # The RayService refers to it by name, which kustomize would not rewrite in a custom resource.
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True


def test_the_proxy_config_is_what_the_prod_cloud_config_generates(cloud: CloudConfig) -> None:
    shipped = (K8S / "tls-proxy/nginx.conf.template").read_text()
    assert shipped == render_nginx_conf(cloud.proxy, cloud.grpc_port, TOKEN_PLACEHOLDER), (
        "run `tandem cloud proxy-config --config cloud/cloud.prod.yaml > k8s/tls-proxy/nginx.conf.template`")
    script = (K8S / "tls-proxy/run-proxy.sh").read_text()
    defaults = dict(re.findall(r"^(\w+)=\$\{TANDEM_PROXY_\w+:-(.+)\}$", script, re.MULTILINE))
    head = pods()["ray-head"]
    proxy_mounts = mounts(head, "tls-proxy")
    assert defaults["prefix"] == str(cloud.proxy.prefix) and "emptyDir" in proxy_mounts[defaults["prefix"]]
    assert defaults["pki"] == str(cloud.proxy.ca_dir) and proxy_mounts[defaults["pki"]]["secret"]["secretName"]
    assert container(head, "tls-proxy")["ports"] == [{"containerPort": cloud.proxy.port, "name": "tls"}]


def test_only_the_proxy_port_is_reachable_from_outside(cloud: CloudConfig) -> None:
    serve_ports = {cloud.grpc_port, cloud.http_port}
    service = resource("rayservice.yaml", "Service")
    assert [p["port"] for p in service["spec"]["ports"]] == [cloud.proxy.port] and service["spec"]["ports"][0]["targetPort"] == "tls"
    assert service["spec"]["selector"] == ray_groups()["head"]["template"]["metadata"]["labels"]
    # KubeRay's head Service exposes the Ray container's ports: Serve's are not among them.
    for group in ray_groups().values():
        ray = group["template"]["spec"]["containers"][0]
        assert not serve_ports & {p["containerPort"] for p in ray.get("ports", [])}
    policy = resource("network-policy.yaml", "NetworkPolicy", "tandem-cloud")
    labels = policy["spec"]["podSelector"]["matchLabels"]
    assert all(labels.items() <= g["template"]["metadata"]["labels"].items() for g in ray_groups().values())
    from_anywhere = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
    assert from_anywhere == [{"ports": [{"protocol": "TCP", "port": cloud.proxy.port}]}]
    assert all(rule.get("ports") or rule["from"] == [{"podSelector": {"matchLabels": labels}}]
               for rule in policy["spec"]["ingress"]), "only the cluster's own Ray pods may reach every port"
    assert not any(p["port"] in serve_ports for rule in policy["spec"]["ingress"] for p in rule.get("ports", []))


def test_ray_token_authentication_is_on_for_the_cluster_and_its_client() -> None:
    cluster = resource("rayservice.yaml", "RayService")["spec"]["rayClusterConfig"]
    # KubeRay sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the Secret on every Ray container.
    assert cluster["authOptions"]["mode"] == "token"
    token_secret = cluster["authOptions"]["secretName"]
    retrain = pods()["retrain"]["containers"][0]
    assert env(retrain)["RAY_AUTH_MODE"] == "token"
    assert env(retrain)["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": token_secret, "key": "auth_token"}}
    assert env(retrain)["RAY_ADDRESS"].startswith("ray://")


def test_every_ray_container_knows_the_proxy_token_and_the_message_limit() -> None:
    head = pods()["ray-head"]
    token = env(container(head, "tls-proxy"))["TANDEM_PROXY_TOKEN"]
    for group in ray_groups().values():
        ray = env(group["template"]["spec"]["containers"][0])
        assert ray["TANDEM_PROXY_TOKEN"] == token
        assert int(ray["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]) == MESSAGE_MAX_BYTES


def test_every_ray_pod_reads_the_receipt_key_where_the_cloud_config_says(cloud: CloudConfig) -> None:
    """Experts sign their answers' receipts with it and the Fleet replica checks them, wherever
    Ray places either; no other pod holds it."""
    held = {name: secrets(pod) for name, pod in pods().items()}
    assert sorted(n for n, s in held.items() if RECEIPT_KEY in s) == sorted(f"ray-{g}" for g in ray_groups())
    for group in ray_groups().values():
        pod = group["template"]["spec"]
        mount = mounts(pod, pod["containers"][0]["name"])[str(cloud.receipt_key.parent)]
        assert mount["secret"]["secretName"] == RECEIPT_KEY and mount["readOnly"]
        assert cloud.receipt_key.name == "receipt.key"  # the key name `--from-file=receipt.key` gives it


def test_least_privilege(cloud: CloudConfig) -> None:
    held = {name: secrets(pod) for name, pod in pods().items()}
    assert [n for n, s in held.items() if SIGNING_KEY in s] == ["retrain"]
    # The store's one writer (the fleet) and the audit writers (the fleet, the retrainer).
    assert sorted(n for n, s in held.items() if STORE_CREDENTIALS in s) == ["ray-fleet", "retrain"]
    assert not held["ray-gpu"] & {SIGNING_KEY, STORE_CREDENTIALS}
    assert all(pod["automountServiceAccountToken"] is False for pod in pods().values())
    accounts = {d["metadata"]["name"]: d for name in ("rayservice.yaml", "retrain-cronjob.yaml", "edge-daemonset.yaml")
                for d in documents(name) if d["kind"] == "ServiceAccount"}
    assert {pod["serviceAccountName"] for pod in pods().values()} == set(accounts)
    assert all(a["automountServiceAccountToken"] is False for a in accounts.values())
    # Only the fleet group offers what the Fleet replica needs: the replica lands beside the credentials.
    offered = {n: json.loads(json.loads(g["rayStartParams"].get("resources", '"{}"'))) for n, g in ray_groups().items()}
    assert cloud.fleet.ray_resources
    assert [n for n, r in offered.items() if r.keys() & cloud.fleet.ray_resources.keys()] == ["fleet"]
    assert all(offered["fleet"][k] >= v for k, v in cloud.fleet.ray_resources.items())
    # No replica or task is scheduled on the head (beside the proxy) or next to the credentials.
    assert ray_groups()["head"]["rayStartParams"]["num-cpus"] == ray_groups()["fleet"]["rayStartParams"]["num-cpus"] == "0"
    # The Ray pods read the models; only the retrainer writes them.
    for name, pod in pods().items():
        for path, volume in mounts(pod, pod["containers"][0]["name"]).items():
            if "persistentVolumeClaim" in volume and name != "retrain":
                assert volume["readOnly"] and volume["persistentVolumeClaim"]["readOnly"], f"{name}: {path}"


def test_the_edge_reaches_the_cloud_over_tls_and_serves_on_a_unix_socket(tmp_path: Path, cloud: CloudConfig) -> None:
    from edge.config import EdgeConfig

    config_map = resource("edge-daemonset.yaml", "ConfigMap", "tandem-edge")
    edge = yaml.safe_load(config_map["data"]["edge.yaml"])
    pod = pods()["edge"]
    edge_mounts = mounts(pod, "edge")
    pki = edge_mounts["/etc/tandem/pki"]
    assert pki["readOnly"] and pki["hostPath"]["path"] == "/etc/tandem/pki"
    # The config loads where the node's files exist: here, copies under tmp_path.
    for name in ("ca.crt", "device.crt", "device.key"):
        (tmp_path / name).write_text("x")
    edge["cloud"]["tls"] = {k: str(tmp_path / Path(v).relative_to("/etc/tandem/pki")) for k, v in edge["cloud"]["tls"].items()}
    (tmp_path / "edge.yaml").write_text(yaml.safe_dump(edge))
    cfg = load_config(EdgeConfig, tmp_path / "edge.yaml")
    assert cfg.cloud.tls is not None and not cfg.cloud.insecure
    assert cfg.cloud.target.endswith(f":{cloud.proxy.port}")
    # The keyring from a ConfigMap mounted without subPath: kubelet updates it in place.
    keyring_dir = str(cfg.updater.keyring.parent)
    assert "configMap" in edge_mounts[keyring_dir] and edge_mounts[keyring_dir]["readOnly"]
    # The local API on a Unix socket in a host folder shared with local apps; probes through it.
    socket_dir = str(cfg.socket_path.parent)
    assert edge_mounts[socket_dir]["hostPath"]["path"] == socket_dir
    edge_container = container(pod, "edge")
    readiness, liveness = (edge_container[p]["exec"]["command"] for p in ("readinessProbe", "livenessProbe"))
    assert readiness[:5] == liveness[:5] == ["tandem", "edge", "health", "--target", cfg.listen]
    # The overall service only: tandem.edge.delivery and tandem.edge.updater go NOT_SERVING
    # during a cloud outage, which must not restart every edge.
    assert readiness[5:] == ["--service", "tandem.v1.Edge"] and liveness[5:] == []
    # Metrics: the one port, on the pod IP that Prometheus scrapes (loopback is unreachable).
    annotations = resource("edge-daemonset.yaml", "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert edge_container["ports"] == [{"containerPort": cfg.metrics_port, "name": "metrics"}]
    assert cfg.metrics_host == "0.0.0.0" and annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == cfg.metrics_port and annotations["prometheus.io/path"] == "/metrics"
