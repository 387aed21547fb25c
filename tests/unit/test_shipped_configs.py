"""Every config file the project ships must load through its config class."""

from pathlib import Path

import pytest
import yaml

from cloud.config import CloudConfig
from edge.config import EdgeConfig
from tandem.settings import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", ["cloud/cloud.yaml", "cloud/cloud.prod.yaml"])
def test_cloud_configs_load(path: str) -> None:
    cfg = load_config(CloudConfig, ROOT / path)
    assert cfg.tasks and {t.expert for t in cfg.tasks.values()} == {e.name for e in cfg.experts}


def test_prod_config_names_hub_models_and_gpus() -> None:
    cfg = load_config(CloudConfig, ROOT / "cloud/cloud.prod.yaml")
    llm = next(e for e in cfg.experts if e.kind == "generate")
    assert "/" in llm.model and not llm.model.startswith("/") and llm.deployment.num_gpus >= 1
    assert all(e.deployment.autoscaling_config for e in cfg.experts)


def test_distill_config_loads_and_matches_the_cloud() -> None:
    from cloud.training.config import DistillConfig

    distill = load_config(DistillConfig, ROOT / "cloud/distill.prod.yaml")
    cloud = load_config(CloudConfig, ROOT / "cloud/cloud.prod.yaml")
    # The retrainer reads the store the experts write, and publishes where the cloud serves from.
    assert distill.feedback_store_uri() == cloud.feedback_uri and distill.registry_root() == cloud.registry_dir
    cronjob = yaml.safe_load((ROOT / "k8s/retrain-cronjob.yaml").read_text())
    command = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[-1] == "/app/cloud/distill.prod.yaml"


def test_edge_configs_load(tmp_path: Path) -> None:
    assert load_config(EdgeConfig, ROOT / "edge/edge.yaml").policy.threshold == 0.7
    daemonset = yaml.safe_load_all((ROOT / "k8s/edge-daemonset.yaml").read_text())
    edge_yaml = next(d for d in daemonset if d["kind"] == "ConfigMap")["data"]["edge.yaml"]
    (tmp_path / "edge.yaml").write_text(edge_yaml)
    assert load_config(EdgeConfig, tmp_path / "edge.yaml").policy.budget_per_s == 20


def test_serve_config_has_the_registry_then_one_application_per_expert() -> None:
    serve_cfg = yaml.safe_load((ROOT / "cloud/serve_config.yaml").read_text())
    assert serve_cfg["grpc_options"]["grpc_servicer_functions"] == ["tandem.v1.cloud_pb2_grpc.add_CloudServicer_to_server"]
    cloud = load_config(CloudConfig, ROOT / "cloud/cloud.yaml")
    registry, *experts = serve_cfg["applications"]
    # First: the experts record escalations through a handle to the registry.
    assert registry["name"] == cloud.registry_app and registry["import_path"] == "cloud.app:registry_builder"
    assert [a["name"] for a in experts] == [e.name for e in cloud.experts] == [a["args"]["expert"] for a in experts]
    assert all(a["import_path"] == "cloud.app:app_builder" for a in experts)
    assert all((ROOT / a["args"]["config"]).exists() for a in serve_cfg["applications"])


def test_edge_sends_each_task_to_an_expert_of_the_cloud() -> None:
    edge = load_config(EdgeConfig, ROOT / "edge/edge.yaml")
    cloud = load_config(CloudConfig, ROOT / "cloud/cloud.yaml")
    assert {t: cloud.tasks[t].expert for t in edge.tasks} == edge.cloud.applications
    assert edge.cloud.registry_application == cloud.registry_app
