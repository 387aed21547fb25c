"""Rollouts without Ray: the route store and the fleet's GetRoutes over it (a restarted
replica), the fleet's label sets following the task file, and the checks a checkpoint must
pass before it is deployed."""

import os
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from cloud.app import LiveLabelSets, _label_sets
from cloud.config import CloudConfig
from cloud.feedback.records import LabelSet
from cloud.feedback.store import FeedbackStore
from cloud.registry.models import ModelRegistry
from cloud.registry.routes import ExpertVersion, RouteStore
from cloud.registry.service import FleetServicer
from cloud.rollout import RolloutRefused, _check_newer, application_name, verified_checkpoint
from cloud.training.artifact import write_manifest
from tandem.settings import load_config
from tandem.signing import generate_key, load_private_key, public_path, sign_artifact, trust
from tandem.v1 import fleet_pb2
from tests.fleet_server import serving

NOW = datetime(2026, 11, 30, tzinfo=timezone.utc)
TASK = {"name": "t", "train": "unused.csv", "test": "unused.csv", "labels": ["card_arrival", "lost_card"]}


def _version(application: str, version: str = "v2", sequence: int = 0, at: datetime = NOW) -> ExpertVersion:
    return ExpertVersion(application=application, model="/models/x", version=version, sequence=sequence, created_at=at)


def test_the_route_store_names_each_experts_serving_application_and_keeps_it_in_its_file(tmp_path: Path) -> None:
    store = RouteStore(tmp_path / ".cloud" / "routes.json")
    by_task = {"t": "e", "t-llm": "llm"}
    assert store.routes(by_task) == by_task  # before any rollout: each expert's own application
    store.switch("e", _version("e.v2"))
    assert store.routes(by_task) == {"t": "e.v2", "t-llm": "llm"}
    assert RouteStore(store.path).experts() == {"e": _version("e.v2")}  # another reader: a restarted replica
    store.reset()
    assert RouteStore(store.path).routes(by_task) == by_task


def test_a_broken_routes_file_keeps_the_routes_read_before(tmp_path: Path) -> None:
    store = RouteStore(tmp_path / "routes.json")
    store.switch("e", _version("e.v2"))
    assert store.application("e") == "e.v2"
    store.path.write_text("{not json")
    assert store.application("e") == "e.v2", "not the config's application, which the rollout deleted"


async def test_a_restarted_fleet_replica_routes_to_the_rolled_out_version(tmp_path: Path) -> None:
    routes_file = tmp_path / "routes.json"
    RouteStore(routes_file).switch("e", _version("e.v2"))

    def fleet() -> FleetServicer:
        return FleetServicer(FeedbackStore(str(tmp_path / "feedback")), ModelRegistry(tmp_path / "registry"),
                             routes={"t": "e"}, insecure=True, route_store=RouteStore(routes_file))

    async with serving(fleet()) as stub:
        first = await stub.GetRoutes(fleet_pb2.GetRoutesRequest(), timeout=10)
    RouteStore(routes_file).switch("e", _version("e.v3", version="v3"))
    async with serving(fleet()) as stub:  # a new replica, as Serve starts after a crash
        second = await stub.GetRoutes(fleet_pb2.GetRoutesRequest(), timeout=10)
    assert dict(first.applications) == {"t": "e.v2"} and dict(second.applications) == {"t": "e.v3"}


def test_the_fleet_reads_a_task_files_new_label_set_without_a_restart(tmp_path: Path) -> None:
    task_file = tmp_path / "t.yaml"
    task_file.write_text(yaml.safe_dump(TASK))
    config = tmp_path / "cloud.yaml"
    config.write_text(yaml.safe_dump({"tasks": {"t": {"task": "t.yaml", "expert": "e"}},
                                      "experts": [{"name": "e", "kind": "generate", "model": "m"}]}))
    labels = LiveLabelSets(config, _label_sets(load_config(CloudConfig, config)), check_every_s=0)
    assert labels["t"] == LabelSet(frozenset({"card_arrival", "lost_card", "out_of_scope"}), 1)
    task_file.write_text(yaml.safe_dump({**TASK, "labels": [*TASK["labels"], "crypto"], "label_set_version": 2}))
    assert labels["t"] == LabelSet(frozenset({"card_arrival", "lost_card", "crypto", "out_of_scope"}), 2)
    task_file.write_text("labels: [")  # an edit half made: the label sets read before stay
    assert labels["t"].version == 2 and "t" in labels


@pytest.fixture()
def signed(tmp_path: Path) -> tuple[CloudConfig, Path]:
    """A cloud config with a keyring, and a checkpoint of its expert signed under it."""
    key = tmp_path / "keys" / "signing.pem"
    generate_key(key)
    trust(tmp_path / "keyring.json", public_path(key))
    checkpoint = tmp_path / "teacher"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights" * 100)
    (checkpoint / "config.json").write_text("{}")
    write_manifest(checkpoint, "teacher", "t", "model.safetensors")
    sign_artifact(checkpoint, load_private_key(key))
    cfg = CloudConfig.model_validate({"keyring": str(tmp_path / "keyring.json"),
                                      "tasks": {"t": {"task": TASK, "expert": "e"}},
                                      "experts": [{"name": "e", "kind": "classify", "model": "m"}]})
    return cfg, checkpoint


def test_a_checkpoint_signed_under_the_keyring_is_deployable(signed: tuple[CloudConfig, Path]) -> None:
    cfg, checkpoint = signed
    manifest = verified_checkpoint(cfg, cfg.experts[0], checkpoint)
    assert manifest.kind == "teacher" and application_name("e", manifest.version) == f"e.{manifest.version}"


@pytest.mark.parametrize(("damage", "refusal"), [
    ("tampered", "does not match its signed sha256"),
    ("unsigned", "unsigned"),
    ("unlisted", "not in the signed manifest"),
    ("no_keyring", "keyring: not set"),
    ("other_task", "manifest task 'other'"),
])
def test_a_checkpoint_that_does_not_verify_is_refused(signed: tuple[CloudConfig, Path], tmp_path: Path,
                                                      damage: str, refusal: str) -> None:
    cfg, checkpoint = signed
    if damage == "tampered":
        with (checkpoint / "model.safetensors").open("r+b") as f:
            f.write(b"W")
    elif damage == "unsigned":
        (checkpoint / "manifest.sig").unlink()
    elif damage == "unlisted":
        (checkpoint / "pytorch_model.bin").write_bytes(b"other weights")
    elif damage == "no_keyring":
        cfg = cfg.model_copy(update={"keyring": None})
    elif damage == "other_task":
        cfg = CloudConfig.model_validate({**cfg.model_dump(mode="json"),
                                          "tasks": {"t": {"task": {**TASK, "name": "other"}, "expert": "e"}}})
        shutil.rmtree(checkpoint)
        checkpoint.mkdir()
        (checkpoint / "model.safetensors").write_bytes(b"weights")
        write_manifest(checkpoint, "teacher", "t", "model.safetensors")
        sign_artifact(checkpoint, load_private_key(tmp_path / "keys" / "signing.pem"))
        refusal = "manifest task 't'"
    with pytest.raises(RolloutRefused, match=refusal):
        verified_checkpoint(cfg, cfg.experts[0], checkpoint)


def test_a_version_not_newer_than_the_serving_one_is_refused() -> None:
    serving = _version("e.v2", version="v2", sequence=0, at=NOW)
    _check_newer(_version("e.v3", version="v3", at=NOW + timedelta(hours=1)), serving)
    _check_newer(_version("e.v3", version="v3", sequence=1, at=NOW - timedelta(hours=1)), serving)  # sequence first
    _check_newer(_version("e.v3", version="v3"), None)  # the config's checkpoint has no manifest
    with pytest.raises(RolloutRefused, match="not newer"):
        _check_newer(_version("e.v1", version="v1", at=NOW - timedelta(hours=1)), serving)
    with pytest.raises(RolloutRefused, match="already serves"):
        _check_newer(_version("e.v2", version="v2"), serving)
    assert os.sep not in application_name("e", "v3")
    with pytest.raises(RolloutRefused, match="not a valid name"):
        application_name("e" * 100, "v" * 40)
