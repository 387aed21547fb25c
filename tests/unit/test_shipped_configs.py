"""Every config file the project ships must load through its config class."""

import os
from pathlib import Path

import pytest
import yaml

from cloud.config import CloudConfig
from edge.config import EdgeConfig
from tandem.contract import FLEET_APPLICATION
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
    cronjob = next(d for d in yaml.safe_load_all((ROOT / "k8s/retrain-cronjob.yaml").read_text()) if d["kind"] == "CronJob")
    command = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[-1] == "/app/cloud/distill.prod.yaml"


def test_prod_training_starts_from_one_multilingual_hub_model() -> None:
    from cloud.training.config import DistillConfig, TrainConfig

    train = load_config(TrainConfig, ROOT / "cloud/train.prod.yaml")
    distill = load_config(DistillConfig, ROOT / "cloud/distill.prod.yaml")
    base = train.teacher.base_model
    # A hub id (not a path, not the offline English default) of a multilingual model.
    assert base and "/" in base and not base.startswith(("/", ".", "~")) and "multilingual" in base
    # The retrainer distils the student that was shipped, from the teacher the cloud serves.
    assert train.student.base_model == base and distill.student == train.student
    cloud = load_config(CloudConfig, ROOT / "cloud/cloud.prod.yaml")
    classify = next(e for e in cloud.experts if e.kind == "classify")
    assert distill.teacher_path() == train.model_dir("teacher") == Path(classify.model)


def test_edge_config_loads() -> None:
    # The DaemonSet's: tests/unit/test_k8s.py (it names the node's certificate files).
    cfg = load_config(EdgeConfig, ROOT / "edge/edge.yaml")
    assert cfg.policy.threshold is None and cfg.feedback.audit_weighting == "margin"


def test_shipped_edge_configs_adopt_each_students_threshold() -> None:
    """No shipped edge config pins a threshold: every student's own, fitted and signed, serves."""
    daemonset = next(d for d in yaml.safe_load_all((ROOT / "k8s/edge-daemonset.yaml").read_text())
                     if d["kind"] == "ConfigMap")
    for policy in (yaml.safe_load((ROOT / "edge/edge.yaml").read_text())["policy"],
                   yaml.safe_load(daemonset["data"]["edge.yaml"])["policy"]):
        assert policy["mode"] == "threshold" and "threshold" not in policy


def test_shipped_serve_configs_are_what_the_cloud_configs_generate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cloud.topology import generate_serve_config

    # Generated into copies, at the same relative paths (the header's command shows them), so
    # that a failing run leaves the shipped files as they were.
    for name in ("cloud/cloud.yaml", "cloud/cloud.prod.yaml", "k8s/rayservice.yaml", "tasks/banking77.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text())
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("TANDEM_CLOUD_")]:
        monkeypatch.delenv(name)
    generate_serve_config(Path("cloud/cloud.yaml"), "cloud/cloud.yaml", out=Path("cloud/serve_config.yaml"))
    generate_serve_config(Path("cloud/cloud.prod.yaml"), "/app/cloud/cloud.prod.yaml", rayservice=Path("k8s/rayservice.yaml"))
    for name in ("cloud/serve_config.yaml", "k8s/rayservice.yaml"):
        assert (tmp_path / name).read_text() == (ROOT / name).read_text(), f"{name} is not what `make serve-config` generates"


def test_serve_config_has_the_fleet_then_one_application_per_expert() -> None:
    serve_cfg = yaml.safe_load((ROOT / "cloud/serve_config.yaml").read_text())
    assert serve_cfg["grpc_options"]["grpc_servicer_functions"] == [
        "cloud.ingress.add_expert_servicer", "cloud.ingress.add_fleet_servicer"]
    cloud = load_config(CloudConfig, ROOT / "cloud/cloud.yaml")
    fleet, *experts = serve_cfg["applications"]
    # First: edges ask it which expert application answers each task.
    assert fleet["name"] == FLEET_APPLICATION and fleet["import_path"] == "cloud.app:fleet_app"
    assert [a["name"] for a in experts] == [e.name for e in cloud.experts] == [a["args"]["expert"] for a in experts]
    assert all(a["import_path"] == "cloud.app:expert_app" for a in experts)
    assert all((ROOT / a["args"]["config"]).exists() for a in serve_cfg["applications"])
    rayservice = next(yaml.safe_load_all((ROOT / "k8s/rayservice.yaml").read_text()))
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["name"] == FLEET_APPLICATION


def test_the_generated_config_is_written_into_a_rayservice_manifest(tmp_path: Path) -> None:
    from cloud.topology import generate_serve_config

    manifest = tmp_path / "rayservice.yaml"
    manifest.write_text("kind: RayService\nspec:\n  serveConfigV2: |\n    old: 1\n  rayClusterConfig:\n    rayVersion: x\n")
    text = generate_serve_config(ROOT / "cloud/cloud.yaml", "/app/cloud.yaml", rayservice=manifest)
    spec = yaml.safe_load(manifest.read_text())["spec"]
    assert spec["rayClusterConfig"] == {"rayVersion": "x"}
    assert yaml.safe_load(spec["serveConfigV2"]) == yaml.safe_load(text)
    generate_serve_config(ROOT / "cloud/cloud.yaml", "/app/cloud.yaml", rayservice=manifest)  # idempotent
    assert yaml.safe_load(manifest.read_text())["spec"] == spec and manifest.read_text().count("# Generated") == 1
