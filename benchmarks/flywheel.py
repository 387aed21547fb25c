"""`tandem bench flywheel`: the learning loop, measured round by round.

Round 0 distils a cold student from a 10% labelled seed of banking77 train. Then, each
round: the next slice of the rest of train streams through a real edge daemon into the real
cloud (the experts' signed answers, fallbacks and audit samples arrive from the edge's
outbox), a distillation round retrains, gates and promotes, and the edge pulls and swaps
the new version. After every round, on the test split: the student's accuracy, the
cascade's accuracy at the default policy, and the escalation rate the cascade needs to
stay within `tolerance` of the expert.
"""

import asyncio
import json
import logging
import random
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from benchmarks.cascade import cascade_accuracy, escalation_rate_for_target
from benchmarks.edge_load import replay
from benchmarks.loadgen import poisson
from benchmarks.plots import plot_flywheel
from benchmarks.system import ROOT, Cloud, cloud, cloud_config, edge_config, edge_daemon
from tandem.settings import TandemSettings
from tandem.signing import generate_key, public_path, trust
from tandem.subprocesses import Server
from tandem.v1 import edge_pb2, edge_pb2_grpc

log = logging.getLogger(__name__)

EXPERT = "banking77-classifier"


class FlywheelConfig(TandemSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_FLYWHEEL_")

    rounds: int = Field(3, ge=1, description="Retraining rounds after round 0.")
    seed_fraction: float = Field(0.1, gt=0, lt=1, description="Labelled share of train the cold student starts from.")
    traffic_per_round: int | None = Field(
        None, ge=1, description="Queries streamed per round; None: the rest of train split evenly over the rounds."
    )
    traffic_rps: float = Field(100.0, gt=0, description="Poisson arrival rate of the streamed traffic.")
    tolerance: float = Field(0.01, ge=0, description="How far below the expert's accuracy the cascade may be.")
    seed: int = Field(0, description="Orders the traffic.")
    audit_rate: float = Field(
        0.01, ge=0, le=1, description="The edge's audit sample of confident local answers (feedback.audit_rate). "
        "The retrainer labels every feedback text with the teacher, so audits are training data too.",
    )
    distill: dict[str, Any] = Field(
        default_factory=dict, description="DistillConfig fields for every round (e.g. student epochs, use_ray)."
    )


def run_flywheel(cfg: FlywheelConfig, out: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tandem-flywheel-") as tmp:
        result = asyncio.run(_rounds(cfg, Path(tmp)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot = plot_flywheel(result["rounds"], out.with_suffix(".png"))
    print(format_rounds(result) + f"\n\nplot: {plot}\n{out}")
    return result


async def _rounds(cfg: FlywheelConfig, work: Path) -> dict[str, Any]:
    loop = Loop(cfg, work)
    per_round = cfg.traffic_per_round or len(loop.traffic) // cfg.rounds
    rows = [loop.cold_start()]
    with cloud(loop.cloud_config()) as c, edge_daemon(loop.edge_config(c)) as daemon:
        for r in range(1, cfg.rounds + 1):
            rows.append(await loop.round(r, daemon, loop.traffic[(r - 1) * per_round: r * per_round]))
    return loop.result(rows)


class Loop:
    """The learning loop in a scratch registry and feedback store (under `work`): a cold
    student, then rounds of traffic through a real edge daemon into a real cloud, each
    followed by distillation, the gate, and the edge's pull and swap."""

    def __init__(self, cfg: FlywheelConfig, work: Path) -> None:
        from benchmarks.traffic import traffic_examples
        from cloud.registry import ModelRegistry
        from cloud.training.config import DistillConfig
        from cloud.training.data import load_splits

        self.cfg = cfg
        self.work = work
        self.distill = DistillConfig(
            **{**cfg.distill, "seed_fraction": cfg.seed_fraction, "registry_dir": work / "registry",
               "feedback_uri": str(work / "feedback"), "signing_key": work / "keys" / "signing.pem"}
        )
        self.task = self.distill.task
        splits = load_splits(self.distill.splits_config(), self.distill.student)
        self.test = self.task.load("test")
        self.expert_ok = _expert_correct(self.distill, splits)
        # Shuffled (seeded): banking77's train file is sorted by label, and traffic is not.
        self.traffic = traffic_examples(self.task, splits, cfg.seed_fraction, self.distill.student.max_length)
        random.Random(cfg.seed).shuffle(self.traffic)
        self.registry = ModelRegistry(self.distill.registry_root())
        self.threshold = _default_threshold()
        # The retrainer's key, and the edge's keyring trusting it (what `tandem keys new|trust` do).
        generate_key(self.distill.signing_key_path())
        self.keyring = work / "edge" / "keyring.json"
        trust(self.keyring, public_path(self.distill.signing_key_path()))

    def cold_start(self) -> dict[str, Any]:
        """Round 0: a student from the labelled seed alone, promoted as the first version."""
        from cloud.training.distill import run_distill

        log.info("learning loop, round 0: a cold student from %.0f%% of train", 100 * self.cfg.seed_fraction)
        return self._evaluate(0, run_distill(self.distill, feedback=[]))

    def cloud_config(self) -> dict[str, Any]:
        return cloud_config({EXPERT}, registry_dir=str(self.distill.registry_root()),
                            feedback_uri=self.distill.feedback_store_uri())

    def edge_config(self, c: Cloud) -> dict[str, Any]:
        """An edge serving the promoted student, recording feedback and pulling updates."""
        promoted = self.registry.path(self.task.name, self.registry.promoted(self.task.name))
        return edge_config(
            self.task.name, promoted, c, "learner",
            feedback={"outbox": str(self.work / "edge" / "outbox.sqlite3"), "audit_rate": self.cfg.audit_rate},
            updater={"enabled": True, "poll_interval_s": 5.0, "models_dir": str(self.work / "edge" / "models"),
                     "keyring": str(self.keyring)},
        )

    async def round(self, r: int, daemon: Server, chunk: list[Any]) -> dict[str, Any]:
        """Streams `chunk` through the daemon, retrains from the feedback, rolls out, measures."""
        from cloud.training.distill import run_distill

        log.info("learning loop, round %d: %d queries of traffic at %g req/s", r, len(chunk), self.cfg.traffic_rps)
        served = await _stream(daemon, self.task.name, chunk, self.cfg.traffic_rps, r)
        records = await _settle(self.distill.feedback_store_uri(), self.task.name)
        result = run_distill(self.distill)
        if result["promoted"]:
            await _await_version(daemon, self.task.name, self.test[0].text, result["version"])
        return {**self._evaluate(r, result), "traffic": served, "feedback_records": records}

    def result(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "config": json.loads(self.cfg.model_dump_json()),
            "expert_test_accuracy": float(self.expert_ok.mean()),
            "default_threshold": self.threshold,
            "rounds": rows,
        }

    def _evaluate(self, r: int, result: dict[str, Any]) -> dict[str, Any]:
        """The promoted student (the one edges serve after this round) on the test split."""
        from edge.student import Student

        student = Student.load(self.registry.path(self.task.name, self.registry.promoted(self.task.name)))
        probs = student.predict([e.text for e in self.test])
        labels = np.array([student.labels.index(e.label) for e in self.test])
        confidence, student_ok = probs.max(-1), probs.argmax(-1) == labels
        accuracy, rate = cascade_accuracy(confidence, student_ok, self.expert_ok, self.threshold)
        row = {
            "round": r,
            "version": student.version,
            "candidate": result["version"],
            "promoted": result["promoted"],
            "escalation_rate_for_target": escalation_rate_for_target(confidence, student_ok, self.expert_ok, self.cfg.tolerance),
            "student_accuracy": float(student_ok.mean()),
            "cascade_accuracy": accuracy,
            "cascade_escalation_rate": rate,
            "retrain_seconds": result["seconds"],
        }
        log.info("round %d: %s", r, json.dumps(row))
        return row


def _default_threshold() -> float:
    """The shipped edge config's threshold: the default operating point."""
    return float(yaml.safe_load((ROOT / "edge" / "edge.yaml").read_text())["policy"]["threshold"])


async def _stream(daemon: Server, task: str, chunk: list[Any], rate: float, r: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        stub = edge_pb2_grpc.EdgeStub(channel)
        run = await replay([stub.Infer], task, chunk, poisson(rate, count=len(chunk), seed=r), f"traffic-{r}")
    log.info("traffic: escalated %.1f%%, accuracy %.1f%%, errors %s",
             100 * run["escalation_rate"], 100 * run["accuracy"], run["errors"])
    return {k: run[k] for k in ("answered", "accuracy", "escalation_rate", "fallback_rate", "p50_ms", "p99_ms", "errors")}


async def _settle(uri: str, task: str, quiet_s: float = 5.0, limit_s: float = 120.0) -> int:
    """Waits until the feedback store stops growing (the edge's outbox has drained)."""
    from cloud.feedback.store import FeedbackStore

    deadline = time.monotonic() + limit_s
    count, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = FeedbackStore(uri).read(task).num_rows
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        await asyncio.sleep(1.0)
    log.info("feedback store: %d records", count)
    return count


async def _await_version(daemon: Server, task: str, text: str, version: str, limit_s: float = 120.0) -> None:
    """Asks the daemon to poll now (SIGHUP) and waits until it answers with `version`."""
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + limit_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        stub = edge_pb2_grpc.EdgeStub(channel)
        while time.monotonic() < deadline:
            r = await stub.Infer(edge_pb2.InferRequest(task=task, text=text.encode()), timeout=10)
            if r.model_version == version:
                log.info("edge swapped to %s", version)
                return
            await asyncio.sleep(1.0)
    raise TimeoutError(f"the edge did not swap to {version} within {limit_s:.0f} s")


def _expert_correct(distill: Any, splits: Any) -> np.ndarray:
    from cloud.training.distill import teacher_logits

    logits, _ = teacher_logits(distill.teacher_path(), splits.label_names, splits.test.texts, distill.student.max_length)
    return logits.argmax(-1) == splits.test.labels


def format_rounds(result: dict[str, Any]) -> str:
    lines = [f"expert (teacher) test accuracy {result['expert_test_accuracy']:.1%}; default threshold "
             f"{result['default_threshold']:g}",
             f"{'round':>5} {'promoted':>8} {'escalation for target':>22} {'student acc':>11} {'cascade acc':>11} "
             f"{'cascade esc':>11} {'retrain s':>9}"]
    for row in result["rounds"]:
        lines.append(f"{row['round']:5d} {str(row['promoted']):>8} {row['escalation_rate_for_target']:22.1%} "
                     f"{row['student_accuracy']:11.1%} {row['cascade_accuracy']:11.1%} {row['cascade_escalation_rate']:11.1%} "
                     f"{row['retrain_seconds']:9.0f}")
    first, last = result["rounds"][0], result["rounds"][-1]
    if first["escalation_rate_for_target"]:
        drop = 1 - last["escalation_rate_for_target"] / first["escalation_rate_for_target"]
        target = " (target: >= 40% after 3 rounds)" if last["round"] >= 3 else ""
        lines.append(f"escalation rate for target: {drop:.0%} lower after {last['round']} round(s){target}")
    return "\n".join(lines)
