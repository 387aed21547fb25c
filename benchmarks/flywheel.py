"""`tandem bench flywheel`: the learning loop, measured round by round.

Round 0 distils a cold student from a 10% labelled seed of banking77 train. Then, each
round: the next slice of the rest of train streams through a real edge daemon into the real
cloud (the experts' signed answers, fallbacks and audit samples arrive from the edge's
outbox), a distillation round retrains, gates and promotes, and the edge pulls and swaps
the new version. After every round, on the test split: the student's accuracy, the
cascade's accuracy at the student's own fitted threshold and at the old fixed one, and the
escalation rate the cascade needs to stay within `tolerance` of the expert.

The rounds run once per audit sampler (`samplers`), from the same round 0, under the same
upload budget; the first sampler's rounds are the report's. Then the final student's size,
its risk-controlled mode on the test split, the cascade at the default policy, and (with
`new_intent`) the cloud learning withheld intents from the field (`benchmarks.new_intent`).
"""

import asyncio
import json
import logging
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from cloud.training.operating_point import cascade_accuracy, escalation_rate_for_target
from benchmarks.edge_load import replay
from benchmarks.loadgen import poisson
from benchmarks.plots import plot_flywheel
from benchmarks.system import Cloud, cloud, cloud_config, edge_config, edge_daemon
from tandem.settings import TandemSettings
from tandem.signing import generate_key, public_path, trust
from tandem.subprocesses import Server
from tandem.v1 import edge_pb2, edge_pb2_grpc

log = logging.getLogger(__name__)

EXPERT = "banking77-classifier"
# The edge's audit weighting (`feedback.audit_weighting`) of each sampler the benchmark compares.
SAMPLERS = {"weighted": "margin", "uniform": "uniform"}


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
        0.01, ge=0, le=1, description="The edge's audit budget: the share of local answers uploaded as AUDIT records "
        "(feedback.audit_rate). The retrainer labels every feedback text with the teacher, so audits are training data.",
    )
    samplers: list[Literal["weighted", "uniform"]] = Field(
        ["weighted", "uniform"], min_length=1, description="Audit samplers to run the rounds with, each from the same "
        "round 0 and budget: weighted toward uncertain answers (the edge's default), or uniform. The first is reported "
        "as `rounds`.",
    )
    fixed_threshold: float = Field(
        0.7, gt=0, le=1, description="The fixed threshold edges shipped with before per-student thresholds: the "
        "cascade is also measured at it, for comparison.",
    )
    new_intent: bool = Field(True, description="Also measure the cloud learning withheld intents from the field.")
    distill: dict[str, Any] = Field(
        default_factory=dict, description="DistillConfig fields for every round (e.g. student epochs, use_ray)."
    )


def run_flywheel(cfg: FlywheelConfig, out: Path) -> dict[str, Any]:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tandem-flywheel-") as tmp:
        result = asyncio.run(_run(cfg, Path(tmp)))
        # Written now too: the new-intent stage takes a while, and the rounds are worth keeping if it fails.
        out.write_text(json.dumps(result, indent=2) + "\n")
        if cfg.new_intent:
            from benchmarks.new_intent import measure_new_intent

            result["new_intent"] = measure_new_intent(Path(tmp) / "new-intent")
            out.write_text(json.dumps(result, indent=2) + "\n")
    plot = plot_flywheel(result, out.with_suffix(".png"))
    print(format_rounds(result) + f"\n\nplot: {plot}\n{out}")
    return result


async def _run(cfg: FlywheelConfig, work: Path) -> dict[str, Any]:
    """Round 0 once, then the rounds once per sampler, each from a copy of round 0's registry."""
    loop = Loop(cfg, work / "round-0")
    cold = loop.cold_start()
    arms = {}
    for sampler in cfg.samplers:
        arm = loop.fork(work / sampler)
        arms[sampler] = await arm.rounds(cold, SAMPLERS[sampler])
    return arms[cfg.samplers[0]].result({s: a.rows for s, a in arms.items()})


class Loop:
    """The learning loop in a scratch registry and feedback store (under `work`): a cold
    student, then rounds of traffic through a real edge daemon into a real cloud, each
    followed by distillation, the gate, and the edge's pull and swap."""

    def __init__(self, cfg: FlywheelConfig, work: Path, data: "LoopData | None" = None) -> None:
        from cloud.registry import ModelRegistry
        from cloud.training.config import DistillConfig

        self.cfg = cfg
        self.work = work
        self.distill = DistillConfig(
            **{**cfg.distill, "seed_fraction": cfg.seed_fraction, "registry_dir": work / "registry",
               "feedback_uri": str(work / "feedback"), "signing_key": work / "keys" / "signing.pem"}
        )
        self.task = self.distill.task
        self.data = data or LoopData(cfg, self.distill)
        self.registry = ModelRegistry(self.distill.registry_root())
        self.keyring = work / "edge" / "keyring.json"
        self.rows: list[dict[str, Any]] = []
        if data is None:  # a fork copies its parent's key and keyring
            # The retrainer's key, and the edge's keyring trusting it (what `tandem keys new|trust` do).
            generate_key(self.distill.signing_key_path())
            trust(self.keyring, public_path(self.distill.signing_key_path()))

    def fork(self, work: Path) -> "Loop":
        """A loop in `work` starting where this one is: its registry, key and keyring (no feedback)."""
        for part in ("registry", "keys", "edge"):
            shutil.copytree(self.work / part, work / part)
        return Loop(self.cfg, work, self.data)

    def cold_start(self) -> dict[str, Any]:
        """Round 0: a student from the labelled seed alone, promoted as the first version."""
        from cloud.training.distill import run_distill

        log.info("learning loop, round 0: a cold student from %.0f%% of train", 100 * self.cfg.seed_fraction)
        return self._evaluate(0, run_distill(self.distill, feedback=[]))

    async def rounds(self, cold: dict[str, Any], weighting: str) -> "Loop":
        """Rounds 1..cfg.rounds after round 0 (`cold`), the edge sampling audits by `weighting`."""
        per_round = self.cfg.traffic_per_round or len(self.data.traffic) // self.cfg.rounds
        self.rows = [cold]
        log.info("learning loop: %d rounds, audit sampling %s", self.cfg.rounds, weighting)
        with cloud(self.cloud_config()) as c, edge_daemon(self.edge_config(c, weighting)) as daemon:
            for r in range(1, self.cfg.rounds + 1):
                self.rows.append(await self.round(r, daemon, self.data.traffic[(r - 1) * per_round: r * per_round]))
        return self

    def cloud_config(self) -> dict[str, Any]:
        return cloud_config({EXPERT}, registry_dir=str(self.distill.registry_root()),
                            feedback_uri=self.distill.feedback_store_uri())

    def edge_config(self, c: Cloud, weighting: str) -> dict[str, Any]:
        """An edge serving the promoted student at its own threshold, recording feedback and pulling updates."""
        promoted = self.registry.path(self.task.name, self.registry.promoted(self.task.name))
        return edge_config(
            self.task.name, promoted, c, "learner",
            feedback={"outbox": str(self.work / "edge" / "outbox.sqlite3"), "audit_rate": self.cfg.audit_rate,
                      "audit_weighting": weighting},
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
            await _await_version(daemon, self.task.name, self.data.test[0].text, result["version"])
        return {**self._evaluate(r, result), "traffic": served, "feedback_records": records}

    def promoted_path(self) -> Path:
        return self.registry.path(self.task.name, self.registry.promoted(self.task.name))

    def result(self, arms: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """The report: this loop's rounds, each sampler's curve, and its final student measured on test."""
        from benchmarks.students import student_summary

        final = TestOutcomes.of(self.promoted_path(), self.data)
        return {
            "config": json.loads(self.cfg.model_dump_json()),
            "expert_test_accuracy": float(self.data.expert_ok.mean()),
            "fixed_threshold": self.cfg.fixed_threshold,
            "rounds": self.rows,
            "sampling": {s: [row["escalation_rate_for_target"] for row in rows] for s, rows in arms.items()},
            "student": student_summary(self.promoted_path(), self.distill.teacher_path(), self.task),
            "risk": final.risk(),
            "cascade_at_default": final.cascade_at_default(),
        }

    def _evaluate(self, r: int, result: dict[str, Any]) -> dict[str, Any]:
        """The promoted student (the one edges serve after this round) on the test split."""
        outcomes = TestOutcomes.of(self.promoted_path(), self.data)
        fixed_accuracy, fixed_rate = outcomes.cascade(self.cfg.fixed_threshold)
        row = {
            "round": r,
            "version": outcomes.version,
            "candidate": result["version"],
            "promoted": result["promoted"],
            "escalation_rate_for_target": escalation_rate_for_target(
                outcomes.confidence, outcomes.student_ok, self.data.expert_ok, self.cfg.tolerance),
            "student_accuracy": float(outcomes.student_ok.mean()),
            "threshold": outcomes.threshold,
            **{f"cascade_{k}": v for k, v in outcomes.cascade_at_default().items() if k != "expert_accuracy"},
            "fixed_threshold_cascade_accuracy": fixed_accuracy,
            "fixed_threshold_escalation_rate": fixed_rate,
            "gate": result["gate"],
            "retrain_seconds": result["seconds"],
        }
        log.info("round %d: %s", r, json.dumps({k: v for k, v in row.items() if k != "gate"}))
        return row


class LoopData:
    """What every arm of the loop shares: the test split, the expert's outcome on each test
    query, and the traffic (train texts neither seed nor held out, in a seeded random order)."""

    def __init__(self, cfg: FlywheelConfig, distill: Any) -> None:
        from benchmarks.traffic import traffic_examples
        from cloud.training.data import load_splits

        splits = load_splits(distill.splits_config(), distill.student)
        self.test = distill.task.load("test")
        self.expert_ok = _expert_correct(distill, splits)
        # Shuffled (seeded): banking77's train file is sorted by label, and traffic is not.
        self.traffic = traffic_examples(distill.task, splits, cfg.seed_fraction, distill.student.max_length)
        random.Random(cfg.seed).shuffle(self.traffic)


class TestOutcomes:
    """A student artifact on the test split: its confidence and correctness per query, and its
    manifest's operating point, against the expert's outcomes."""

    def __init__(self, manifest: Any, confidence: np.ndarray, student_ok: np.ndarray, expert_ok: np.ndarray) -> None:
        self.version = manifest.version
        self.point = manifest.operating_point
        self.threshold = None if self.point is None else self.point.threshold
        self.confidence, self.student_ok, self.expert_ok = confidence, student_ok, expert_ok

    @classmethod
    def of(cls, artifact: Path, data: LoopData) -> "TestOutcomes":
        from edge.student import Student

        student = Student.load(artifact)
        probs = student.predict([e.text for e in data.test])
        labels = np.array([student.labels.index(e.label) for e in data.test])
        return cls(student.manifest, probs.max(-1), probs.argmax(-1) == labels, data.expert_ok)

    def cascade(self, threshold: float) -> tuple[float, float]:
        return cascade_accuracy(self.confidence, self.student_ok, self.expert_ok, threshold)

    def cascade_at_default(self) -> dict[str, float]:
        """The cascade at the default policy: the student's own fitted threshold."""
        if self.threshold is None:
            raise ValueError(f"student {self.version} carries no fitted threshold (manifest operating_point)")
        accuracy, rate = self.cascade(self.threshold)
        return {"accuracy": accuracy, "expert_accuracy": float(self.expert_ok.mean()), "escalation_rate": rate}

    def risk(self) -> list[dict[str, float]]:
        """Each certified bound of the risk-controlled mode against the error it realises on test."""
        rows = []
        for entry in self.point.risk if self.point else []:
            kept = np.zeros_like(self.student_ok) if entry.threshold is None else self.confidence >= entry.threshold
            errors = int((kept & ~self.student_ok).sum())
            rows.append({"epsilon": entry.epsilon, "threshold": entry.threshold,
                         "realised_error": errors / int(kept.sum()) if kept.any() else 0.0,
                         "escalation_rate": float(1 - kept.mean())})
        return rows


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
    """The report: rounds, samplers, the final student, the risk-controlled mode and new intents."""
    lines = [f"expert (teacher) test accuracy {result['expert_test_accuracy']:.1%}; cascade at each student's fitted "
             f"threshold, and at the fixed {result['fixed_threshold']:g}",
             f"{'round':>5} {'promoted':>8} {'esc. for target':>15} {'student acc':>11} {'threshold':>9} "
             f"{'cascade acc':>11} {'cascade esc':>11} {'fixed acc':>9} {'fixed esc':>9} {'retrain s':>9}"]
    for row in result["rounds"]:
        lines.append(f"{row['round']:5d} {str(row['promoted']):>8} {row['escalation_rate_for_target']:15.1%} "
                     f"{row['student_accuracy']:11.1%} {row['threshold']:9.3f} {row['cascade_accuracy']:11.1%} "
                     f"{row['cascade_escalation_rate']:11.1%} {row['fixed_threshold_cascade_accuracy']:9.1%} "
                     f"{row['fixed_threshold_escalation_rate']:9.1%} {row['retrain_seconds']:9.0f}")
    for sampler, curve in result["sampling"].items():
        drop = 1 - curve[-1] / curve[0] if curve[0] else 0.0
        lines.append(f"escalation rate for target, {sampler} audits: {' -> '.join(f'{x:.1%}' for x in curve)} "
                     f"({drop:.0%} lower after {len(curve) - 1} rounds; target >= 60%)")
    st = result["student"]
    lines.append(f"final student: {st['params']:,} parameters ({st['params'] / st['teacher_params']:.3f} of the "
                 f"teacher's {st['teacher_params']:,}), accuracy {st['accuracy']:.1%} against the teacher's "
                 f"{st['teacher_accuracy']:.1%}, int8 {st['int8_mb']:.1f} MB")
    d = result["cascade_at_default"]
    lines.append(f"cascade at the default policy: {d['accuracy']:.1%} at {d['escalation_rate']:.1%} escalated; "
                 f"expert alone {d['expert_accuracy']:.1%}")
    for r in result["risk"]:
        lines.append(f"risk-controlled, epsilon {r['epsilon']:g}: realised error {r['realised_error']:.2%}, "
                     f"escalated {r['escalation_rate']:.1%}")
    if "new_intent" in result:
        n = result["new_intent"]
        lines.append(f"new intents from {n['examples']} field examples: recall {n['recall']:.1%}, old labels "
                     f"{n['old_labels_accuracy_drop']:+.2%} drop, {n['failed_requests_during_update']} failed "
                     "requests during the expert's update")
    return "\n".join(lines)
