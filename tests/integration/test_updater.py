"""The model updater against the real registry servicer: pull, verify, warm, swap under load;
refuse unsigned, wrongly signed, corrupt and truncated versions, downgrades, tampered
promotions and revoked keys; take signed rollbacks and rotated keys; keep the old one when a
new one does not load or fails its probe; serve the pulled version after a restart; refuse an
unsigned configured artifact."""

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from cloud.feedback.store import FeedbackStore
from cloud.registry.models import PROMOTED, PROMOTED_SIGNATURE, ModelRegistry
from cloud.registry.service import FleetServicer
from edge.config import CloudLinkConfig, PolicyConfig, UpdaterConfig
from edge.errors import ArtifactError
from tandem.contract import SIGNATURE_FILE
from tandem.signing import (
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    public_path,
    revoke,
    sign_artifact,
    trust,
)
from tandem.v1 import edge_pb2

from .conftest import GatedStudent, running_daemon, serving

pytestmark = pytest.mark.integration

TASK = "banking77"


@dataclass
class Cloud:
    models: ModelRegistry
    target: str
    key: Path  # the private key the registry's versions and promotions are signed with
    keyring: Path  # the edges' keyring: trusts `key` and the key that signed the configured student
    root: Path
    audit: "Audit"

    def publish(self, student_dir: Path, name: str, edit: Callable[[Path], None] = lambda d: None,
                key: Path | None = None) -> str:
        """Publishes and promotes a signed copy of the student as version `<version>-<name>`
        (the registry's next sequence), after `edit` changed its files (before signing)."""
        directory = Path(shutil.copytree(student_dir, self.root / "build" / name))
        manifest = json.loads((directory / "manifest.json").read_text())
        manifest["version"] = f"{manifest['version']}-{name}"
        manifest["created_at"] = datetime.now(UTC).isoformat()
        manifest["sequence"] = self.models.next_sequence(TASK)
        (directory / "manifest.json").write_text(json.dumps(manifest))
        edit(directory)
        sign_artifact(directory, load_private_key(key or self.key))
        version = self.models.publish(TASK, directory)
        self.models.promote(TASK, version, load_private_key(key or self.key))
        return version

    def published(self, version: str, name: str) -> Path:
        return self.models.path(TASK, version) / name

    def promotion_files(self) -> dict[str, bytes]:
        return {name: (self.root / "registry" / TASK / name).read_bytes() for name in (PROMOTED, PROMOTED_SIGNATURE)}

    def replay(self, files: dict[str, bytes]) -> None:
        """Puts back promotion files that were valid once (an attacker who controls the registry's storage)."""
        for name, data in files.items():
            (self.root / "registry" / TASK / name).write_bytes(data)


class Audit:
    """The servicer's audit log, as a list."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, dict]] = []

    def append(self, event: str, actor: str, **data: object) -> dict:
        self.entries.append((event, data))
        return {}


@pytest.fixture()
async def cloud(tmp_path: Path, student_key: Path) -> AsyncIterator[Cloud]:
    key = tmp_path / "keys" / "registry.key"
    generate_key(key)
    keyring = tmp_path / "keyring.json"
    for public in (public_path(key), public_path(student_key)):
        trust(keyring, public)
    models = ModelRegistry(tmp_path / "registry")
    audit = Audit()
    servicer = FleetServicer(FeedbackStore(str(tmp_path / "feedback")), models, insecure=True, audit=audit)
    async with serving(servicer) as target:
        yield Cloud(models, target, key, keyring, tmp_path, audit)


def _updating(cloud: Cloud, models_dir: Path, target: str | None = None) -> dict:
    return {
        "policy": PolicyConfig(mode="edge_only"),
        "cloud": CloudLinkConfig(target=target or cloud.target, insecure=True),
        # Polled by the test: the daemon's own loop would first poll within the hour.
        "updater": UpdaterConfig(enabled=True, keyring=cloud.keyring, models_dir=models_dir, poll_interval_s=3600),
    }


def _version(student_dir: Path) -> str:
    return json.loads((student_dir / "manifest.json").read_text())["version"]


async def _infer(stub, text: str = "where is my card?") -> edge_pb2.InferResponse:
    return await stub.Infer(edge_pb2.InferRequest(task=TASK, text=text.encode()), timeout=10)


async def test_hot_swap_under_concurrent_load_fails_no_request(
    student_dir: Path, cloud: Cloud, tmp_path: Path, banking_texts: list[str]
) -> None:
    old = _version(student_dir)
    async with running_daemon(student_dir, **_updating(cloud, tmp_path / "edge-models")) as (daemon, stub):
        seen: list[list[str]] = [[] for _ in range(6)]
        failures: list[grpc.aio.AioRpcError] = []
        done = asyncio.Event()

        async def caller(versions: list[str], offset: int) -> None:
            i = offset
            while not done.is_set():
                try:
                    versions.append((await _infer(stub, banking_texts[i % len(banking_texts)])).model_version)
                except grpc.aio.AioRpcError as exc:
                    failures.append(exc)
                i += 1

        load = [asyncio.ensure_future(caller(versions, 30 * n)) for n, versions in enumerate(seen)]
        await asyncio.sleep(0.5)
        new = cloud.publish(student_dir, "v2")
        outcome = await daemon.updater.poll()
        await asyncio.sleep(0.5)
        done.set()
        await asyncio.gather(*load)
        info = {v: daemon.registry.get_sample_value("tandem_edge_model_info", {"task": TASK, "version": v})
                for v in (old, new)}
        updated = daemon.registry.get_sample_value("tandem_edge_model_updates_total",
                                                   {"task": TASK, "outcome": "updated"})
    assert outcome == {TASK: "updated"} and updated == 1
    assert failures == [], f"{len(failures)} requests failed during the swap: {failures[:3]}"
    for versions in seen:
        # Each caller saw the old version, then the new one, and never the old one again.
        assert versions[0] == old and versions[-1] == new
        assert versions == sorted(versions, key=lambda v: v == new)
    assert info == {old: None, new: 1.0}
    assert sorted(p.name for p in (tmp_path / "edge-models" / TASK).iterdir()) == [new, "state.json"]
    assert [(e, d["version"]) for e, d in cloud.audit.entries if e == "rollout_ack"] == [("rollout_ack", new)]


async def test_a_swap_away_from_a_hung_version_completes_and_updates_go_on(
    student_dir: Path, cloud: Cloud, tmp_path: Path
) -> None:
    fields = _updating(cloud, tmp_path / "edge-models")
    fields["updater"] = fields["updater"].model_copy(update={"swap_drain_timeout_s": 0.2})
    async with running_daemon(student_dir, **fields) as (daemon, stub):
        runtime = daemon.tasks[TASK]
        hung = GatedStudent(runtime.serving.student)
        await runtime.swap(hung, drain_timeout_s=5)  # serving now: its model runs hang until released
        stuck = asyncio.ensure_future(stub.Infer(edge_pb2.InferRequest(task=TASK, text=b"queued"), timeout=60))
        await asyncio.to_thread(hung.entered.wait, 10)
        new = cloud.publish(student_dir, "v2")
        outcome = await daemon.updater.poll()  # returns, though the old version never answers its queue
        answer = await _infer(stub)
        newer = cloud.publish(student_dir, "v3")
        again = await daemon.updater.poll()  # the updater's lock was released
        hung.release.set()
        late = await stuck  # the old version still answers what it held
        timeouts = daemon.registry.get_sample_value("tandem_edge_swap_drain_timeouts_total", {"task": TASK})
    assert outcome == {TASK: "updated"} and answer.model_version == new
    assert again == {TASK: "updated"} and late.model_version == _version(student_dir)
    assert newer != new and timeouts == 1


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda cloud, v, other: cloud.published(v, SIGNATURE_FILE).write_bytes(b""), id="unsigned"),
        pytest.param(None, id="wrong-key"),
        pytest.param(lambda cloud, v, other: _flip_a_byte(cloud.published(v, "model.onnx")), id="corrupt-byte"),
        pytest.param(lambda cloud, v, other: _truncate(cloud.published(v, "tokenizer.json")), id="truncated"),
        pytest.param(lambda cloud, v, other: cloud.published(v, "labels.json").write_text('["x"]'),
                     id="replaced-file"),
        pytest.param(lambda cloud, v, other: _edit_promotion(cloud, rollback_of="anything"), id="promotion-edited"),
        pytest.param(lambda cloud, v, other: (cloud.root / "registry" / TASK / PROMOTED_SIGNATURE).write_bytes(b""),
                     id="promotion-unsigned"),
        pytest.param(lambda cloud, v, other: cloud.models.promote(TASK, v, load_private_key(other)),
                     id="promotion-untrusted-key"),
        pytest.param(lambda cloud, v, other: cloud.published(v, "manifest.json").write_bytes(
            cloud.published(v, "manifest.json").read_bytes().replace(b'"sequence": 1', b'"sequence": 9')),
                     id="manifest-not-the-promoted-one"),
    ],
)
async def test_unverifiable_versions_are_rejected_and_the_old_one_keeps_serving(
    student_dir: Path, cloud: Cloud, tmp_path: Path, damage
) -> None:
    other_key = tmp_path / "keys" / "other.key"
    generate_key(other_key)
    models_dir = tmp_path / "edge-models"
    async with running_daemon(student_dir, **_updating(cloud, models_dir)) as (daemon, stub):
        if damage is None:
            bad = cloud.publish(student_dir, "bad", key=other_key)
        else:
            bad = cloud.publish(student_dir, "bad")
            damage(cloud, bad, other_key)
        first = await daemon.updater.poll()
        again = await daemon.updater.poll()
        answer = await _infer(stub)
    # Refused at every poll, never remembered: a key rotation or a corrupt transfer can heal.
    assert first == again == {TASK: "rejected"}
    assert answer.model_version == _version(student_dir)
    assert not (models_dir / TASK / "state.json").exists()
    assert list((models_dir / TASK).glob("*")) == [], "nothing of it is kept"


def _edit_promotion(cloud: Cloud, **fields: object) -> None:
    path = cloud.root / "registry" / TASK / PROMOTED
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}, indent=2) + "\n")


async def _serving_version(stub) -> str:
    return (await _infer(stub)).model_version


async def test_a_downgrade_is_refused_and_a_signed_rollback_is_taken(
    student_dir: Path, cloud: Cloud, tmp_path: Path
) -> None:
    async with running_daemon(student_dir, **_updating(cloud, tmp_path / "edge-models")) as (daemon, stub):
        v2 = cloud.publish(student_dir, "v2")
        old_promotion = cloud.promotion_files()  # validly signed, for v2
        await daemon.updater.poll()
        v3 = cloud.publish(student_dir, "v3")
        assert await daemon.updater.poll() == {TASK: "updated"}
        cloud.replay(old_promotion)  # v2 again: older than v3, and not a rollback of it
        downgrade = await daemon.updater.poll()
        after_downgrade = await _serving_version(stub)
        cloud.models.promote(TASK, v3, load_private_key(cloud.key))
        cloud.models.promote(TASK, v2, load_private_key(cloud.key), rollback_of=v3)
        rollback = await daemon.updater.poll()
        after_rollback = await _serving_version(stub)
        rollback_promotion = cloud.promotion_files()
        v4 = cloud.publish(student_dir, "v4")
        forward = await daemon.updater.poll()
        cloud.replay(rollback_promotion)  # a rollback of v3, replayed to an edge serving v4
        replayed = await daemon.updater.poll()
        serving = await _serving_version(stub)
    assert downgrade == {TASK: "rejected"} and after_downgrade == v3
    assert rollback == {TASK: "updated"} and after_rollback == v2
    assert forward == {TASK: "updated"} and replayed == {TASK: "rejected"} and serving == v4


async def test_a_rotated_key_is_taken_once_trusted_and_a_revoked_key_is_refused(
    student_dir: Path, cloud: Cloud, tmp_path: Path
) -> None:
    new_key = tmp_path / "keys" / "rotated.key"
    generate_key(new_key)
    async with running_daemon(student_dir, **_updating(cloud, tmp_path / "edge-models")) as (daemon, stub):
        rotated = cloud.publish(student_dir, "rotated", key=new_key)
        untrusted = await daemon.updater.poll()
        trust(cloud.keyring, public_path(new_key))  # the running edge reads its keyring again
        trusted = await daemon.updater.poll()
        after_rotation = await _serving_version(stub)
        revoke(cloud.keyring, key_id(load_public_key(public_path(cloud.key))))
        cloud.publish(student_dir, "old-key")
        revoked = await daemon.updater.poll()
        serving = await _serving_version(stub)
    assert untrusted == {TASK: "rejected"} and trusted == {TASK: "updated"} and after_rotation == rotated
    assert revoked == {TASK: "rejected"} and serving == rotated


@pytest.mark.parametrize("damage", [pytest.param(lambda d: (d / SIGNATURE_FILE).unlink(), id="unsigned"),
                                    pytest.param(lambda d: (d / "labels.json").write_text('["x"]'), id="altered")])
async def test_the_configured_artifact_must_verify_when_the_updater_is_on(
    artifact_copy: Path, cloud: Cloud, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    damage(artifact_copy)
    with pytest.raises(ArtifactError, match="does not verify against updater.keyring"):
        async with running_daemon(artifact_copy, **_updating(cloud, tmp_path / "edge-models")):
            pass


def _drop_a_label(directory: Path) -> None:
    labels = json.loads((directory / "labels.json").read_text())
    (directory / "labels.json").write_text(json.dumps(labels[:-1]))


def _nan_temperature(directory: Path) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["temperature"] = 1e-300  # loads (positive), but every probability comes out NaN
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit", [pytest.param(_drop_a_label, id="fails-to-load"),
                                  pytest.param(_nan_temperature, id="fails-the-probe")])
async def test_a_signed_version_that_cannot_serve_is_rolled_back(
    student_dir: Path, cloud: Cloud, tmp_path: Path, edit: Callable[[Path], None]
) -> None:
    async with running_daemon(student_dir, **_updating(cloud, tmp_path / "edge-models")) as (daemon, stub):
        bad = cloud.publish(student_dir, "bad", edit)
        outcome = await daemon.updater.poll()
        answer = await _infer(stub)
    assert outcome == {TASK: "failed"} and answer.model_version == _version(student_dir)
    assert bad in json.loads((tmp_path / "edge-models" / TASK / "state.json").read_text())["failed"]


async def test_a_pulled_version_survives_a_restart_and_the_previous_one_is_kept(
    student_dir: Path, cloud: Cloud, tmp_path: Path
) -> None:
    models_dir = tmp_path / "edge-models"
    async with running_daemon(student_dir, **_updating(cloud, models_dir)) as (daemon, _):
        second = cloud.publish(student_dir, "v2")
        await daemon.updater.poll()
        third = cloud.publish(student_dir, "v3")
        await daemon.updater.poll()
    async with contextlib.AsyncExitStack() as stack:
        # Restarted with the cloud unreachable: only what is on disk can make it serve v3.
        empty = FleetServicer(FeedbackStore(str(tmp_path / "f2")), ModelRegistry(tmp_path / "r2"), insecure=True)
        async with serving(empty) as t:
            dead = t
        _, stub = await stack.enter_async_context(running_daemon(student_dir, **_updating(cloud, models_dir, dead)))
        answer = await _infer(stub)
    state = json.loads((models_dir / TASK / "state.json").read_text())
    assert answer.model_version == third
    assert (state["current"], state["previous"]) == (third, second)
    assert sorted(p.name for p in (models_dir / TASK).iterdir()) == sorted([second, third, "state.json"])
