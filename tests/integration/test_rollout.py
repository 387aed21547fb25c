"""Blue/green rollout of an expert: a real cloud (`tandem cloud serve`: Ray Serve, vLLM on CPU,
the mTLS proxy) serving a tiny BERT classifier while a device's cloud client escalates without
pause; `tandem cloud rollout-expert` brings a second signed checkpoint up beside it, switches
the routes and deletes the old one, and no escalation fails. Also the edge's side alone,
against a scripted cloud: an application deleted after a switch costs no request."""

import asyncio
import csv
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from benchmarks.system import Cloud, cloud, cloud_config
from cloud.training.config import FitConfig, TrainConfig
from edge.config import CloudLinkConfig
from edge.errors import CloudCallError
from tandem.contract import SIGNATURE_FILE
from tandem.signing import generate_key, load_private_key, public_path, sign_artifact, trust
from tandem.v1 import expert_pb2, expert_pb2_grpc
from tests.tiny_bert import build_tiny_bert

from .conftest import serve_cloud

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

EXPERT = "tiny-expert"
INTENTS = {
    "balance": ["what is my balance", "how much money is in my account", "show my current balance"],
    "transfer": ["send money to my sister", "transfer fifty euros to john", "pay my landlord from my account"],
    "lost_card": ["i lost my card", "my card was stolen", "block my card please"],
}
OPENERS = ["", "hi, ", "please ", "hello there, "]
# A few seconds of training: a tiny model from scratch needs high rates.
FIT = FitConfig(epochs=2, max_examples=200, lr=3e-3, head_lr=1e-2, batch_size=16, max_length=32)
CLIENTS = 3  # escalations in flight at once, without pause
DRAIN_S = 3.0  # the client re-asks its routes every second; an escalation lasts far less


def _rows(seed: int, n: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = list(INTENTS)[rng.integers(len(INTENTS))]
        rows.append((OPENERS[rng.integers(len(OPENERS))] + INTENTS[label][rng.integers(3)], label))
    return rows


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rollout")


@pytest.fixture(scope="module")
def teachers(work: Path) -> tuple[Path, Path, Path, Path]:
    """The task file, two signed teacher checkpoints (the second newer) and the keyring that trusts their key."""
    from cloud.training.teacher import train_teacher
    from tandem.tasks import Task

    for split, seed, n in (("train", 1, 240), ("test", 2, 60)):
        with (work / f"{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *_rows(seed, n)])
    task_file = work / "tiny.yaml"
    task_file.write_text(yaml.safe_dump({"name": "tiny", "train": str(work / "train.csv"),
                                         "test": str(work / "test.csv"), "labels": list(INTENTS)}))
    base = build_tiny_bert(work / "base", [e.text for e in Task.from_file(task_file).load("train")])
    key = work / "keys" / "signing.pem"
    generate_key(key)
    trust(work / "keyring.json", public_path(key))
    versions = []
    for name, seed in (("v1", 0), ("v2", 1)):
        cfg = TrainConfig(task=task_file, teacher=FIT.model_copy(update={"base_model": str(base)}), seed=seed)
        train_teacher(cfg, work / name)
        sign_artifact(work / name, load_private_key(key))
        versions.append(work / name)
        time.sleep(1.1)  # manifests order by creation time, to the second in the version name
    return task_file, versions[0], versions[1], work / "keyring.json"


@pytest.fixture(scope="module")
def running(work: Path, teachers: tuple[Path, Path, Path, Path]) -> Iterator[Cloud]:
    task_file, v1, _, keyring = teachers
    cfg = cloud_config(experts=set(), feedback_uri=str(work / "feedback"), registry_dir=str(work / "registry"),
                       receipt_key=str(work / "receipt.key"), keyring=str(keyring), rollout={"drain_s": DRAIN_S})
    cfg["tasks"] = {"tiny": {"task": str(task_file), "expert": EXPERT}}
    cfg["experts"] = [{"name": EXPERT, "kind": "classify", "model": str(v1), "dtype": "float32", "max_model_len": 64,
                       # Half a CPU each: the old and the new version run side by side on 2 cores.
                       "deployment": {"num_cpus": 0.5, "health_check_period_s": 2, "health_check_timeout_s": 30}}]
    with cloud(cfg) as c:
        yield c


class Escalations:
    """A device's cloud client (edge/cloud_client.py, over mTLS) escalating without pause from
    CLIENTS tasks in a thread of its own, until stopped; keeps every answer's expert and every failure."""

    def __init__(self, link: dict[str, object]) -> None:
        self._link = CloudLinkConfig.model_validate({**link, "deadline_ms": 20_000, "routes_refresh_s": 1.0})
        self.answers: list[tuple[float, str]] = []  # (time answered, expert)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()))

    def __enter__(self) -> "Escalations":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def wait_for(self, count: int, timeout_s: float = 120) -> None:
        stop_at = time.monotonic() + timeout_s
        start = len(self.answers)
        while len(self.answers) < start + count and time.monotonic() < stop_at and not self.failures:
            time.sleep(0.1)

    async def _run(self) -> None:
        from edge.cloud_client import CloudClient

        client = CloudClient(self._link)
        try:
            await asyncio.gather(*(self._escalate(client, i) for i in range(CLIENTS)))
        finally:
            await client.close()

    async def _escalate(self, client: object, worker: int) -> None:
        texts = [t for phrases in INTENTS.values() for t in phrases]
        while not self._stop.is_set():
            request = expert_pb2.EscalateRequest(request_id=uuid.uuid4().hex, task="tiny",
                                                 text=texts[len(self.answers) % len(texts)])
            try:
                answer = await client.escalate(request)  # type: ignore[attr-defined]
            except CloudCallError as exc:
                self.failures.append(f"worker {worker}: {exc.code.name} {exc}")
                continue
            self.answers.append((time.monotonic(), answer.expert))


def _rollout(c: Cloud, checkpoint: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tandem_cli", "cloud", "rollout-expert", "--config", str(c.config),
                           "--expert", EXPERT, "--checkpoint", str(checkpoint)],
                          capture_output=True, text=True, timeout=900)


def test_a_new_expert_version_replaces_the_old_with_no_failed_escalation(
    running: Cloud, teachers: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    _, v1, v2, _ = teachers
    tampered = Path(shutil.copytree(v2, tmp_path / "tampered"))
    with (tampered / "model.safetensors").open("r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    unsigned = Path(shutil.copytree(v2, tmp_path / "unsigned"))
    (unsigned / SIGNATURE_FILE).unlink()
    with Escalations(running.link("rollout-client")) as stream:
        stream.wait_for(10)
        refused = {name: _rollout(running, path) for name, path in (("tampered", tampered), ("unsigned", unsigned))}
        stream.wait_for(10)  # the old version still answers
        refused_at = time.monotonic()
        rolled = _rollout(running, v2)
        switched_at = time.monotonic()
        during = [expert for at, expert in stream.answers if refused_at <= at <= switched_at]
        log.info("rollout of %s took %.1f s, %d escalations answered meanwhile (%s), %d failed:\n%s", v2,
                 switched_at - refused_at, len(during), sorted(set(during)), len(stream.failures), rolled.stdout)
        stream.wait_for(20)
        older = _rollout(running, v1)
    assert rolled.returncode == 0, rolled.stderr[-3000:]
    new = json.loads(rolled.stdout.splitlines()[-1])
    assert new["application"] == f"{EXPERT}.{new['version']}" and new["model"] == str(v2)
    assert refused["tampered"].returncode == 1 and "does not match its signed sha256" in refused["tampered"].stderr
    assert refused["unsigned"].returncode == 1 and "unsigned" in refused["unsigned"].stderr
    assert older.returncode == 1 and "not newer than the serving" in older.stderr

    assert stream.failures == [], "no escalation may fail or fall back during the rollout"
    before = {expert for at, expert in stream.answers if at < refused_at}
    after = [expert for at, expert in stream.answers if at > switched_at]
    assert before == {EXPERT}, "the old version answered until the switch, the refused checkpoints changed nothing"
    assert len(after) >= 20 and set(after) == {new["application"]}
    with grpc.insecure_channel(f"127.0.0.1:{yaml.safe_load(running.config.read_text())['grpc_port']}") as channel:
        with pytest.raises(grpc.RpcError) as gone:
            expert_pb2_grpc.ExpertStub(channel).Escalate(expert_pb2.EscalateRequest(task="tiny", text="hi"),
                                                          metadata=[("application", EXPERT)], timeout=30)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND, "the old application is deleted"


async def test_an_escalation_to_an_application_deleted_after_a_switch_is_sent_to_the_new_one() -> None:
    from edge.cloud_client import CloudClient

    async with serve_cloud() as (scripted, target):
        scripted.routes = {"banking77": "expert.v1"}
        client = CloudClient(CloudLinkConfig(target=target, insecure=True, routes_refresh_s=60))
        try:
            request = expert_pb2.EscalateRequest(request_id="r", task="banking77", text="where is my card")
            await client.escalate(request)
            scripted.routes = {"banking77": "expert.v2"}  # switched, and v1 deleted before this edge re-asked
            answer = await client.escalate(request)
        finally:
            await client.close()
    assert answer.expert == "scripted"
    assert [metadata["application"] for _, metadata in scripted.seen] == ["expert.v1", "expert.v1", "expert.v2"]
    assert len(scripted.routes_asked) == 2, "asked again at once on NOT_FOUND, not after routes_refresh_s"


async def test_known_routes_are_refreshed_in_the_background_once_they_are_old() -> None:
    from edge.cloud_client import CloudClient

    async with serve_cloud() as (scripted, target):
        scripted.routes = {"banking77": "expert.v1"}
        client = CloudClient(CloudLinkConfig(target=target, insecure=True, routes_refresh_s=0.2))
        request = expert_pb2.EscalateRequest(request_id="r", task="banking77", text="where is my card")
        try:
            await client.escalate(request)
            scripted.routes = {"banking77": "expert.v2", "draining": "expert.v1"}  # v1 still answers
            await asyncio.sleep(0.3)
            await client.escalate(request)  # on v1, while the routes are asked again
            for _ in range(50):  # until the background answer has arrived
                await asyncio.sleep(0.05)
                await client.escalate(request)
                if scripted.seen[-1][1]["application"] == "expert.v2":
                    break
        finally:
            await client.close()
    applications = [metadata["application"] for _, metadata in scripted.seen]
    assert applications[:2] == ["expert.v1", "expert.v1"] and applications[-1] == "expert.v2"
