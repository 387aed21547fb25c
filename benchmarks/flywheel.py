"""`tandem bench flywheel`: the learning loop, measured round by round.

Round 0 distils a cold student from a 10% labelled seed of banking77 train. Then, each
round: the next slice of the rest of train streams through a real edge daemon into the real
cloud (escalations are recorded there, fallbacks and audit samples arrive from the edge's
outbox), a distillation round retrains, gates and promotes, and the edge pulls and swaps
the new version. After every round, on the test split: the student's accuracy, the
cascade's accuracy at the default policy, and the escalation rate the cascade needs to
stay within `tolerance` of the expert.
"""

import asyncio
import json
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
from benchmarks.processes import Server
from benchmarks.plots import plot_flywheel
from benchmarks.system import ROOT, Cloud, cloud, cloud_config, edge_config, edge_daemon
from tandem.settings import TandemSettings
from tandem.signing import public_path
from tandem.v1 import edge_pb2, edge_pb2_grpc

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
    distill: dict[str, Any] = Field(
        default_factory=dict, description="DistillConfig fields for every round (e.g. student epochs, use_ray)."
    )


def run_flywheel(cfg: FlywheelConfig, out: Path) -> dict[str, Any]:
    from cloud.training.config import DistillConfig

    with tempfile.TemporaryDirectory(prefix="tandem-flywheel-") as tmp:
        work = Path(tmp)
        distill = DistillConfig(
            **{**cfg.distill, "seed_fraction": cfg.seed_fraction, "registry_dir": work / "registry",
               "feedback_uri": str(work / "feedback"), "signing_key": work / "keys" / "signing.pem"}
        )
        result = asyncio.run(_rounds(cfg, distill, work))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot = plot_flywheel(result["rounds"], out.with_suffix(".png"))
    print(_table(result) + f"\n\nplot: {plot}\n{out}")
    return result


async def _rounds(cfg: FlywheelConfig, distill: Any, work: Path) -> dict[str, Any]:
    from cloud.registry import ModelRegistry
    from cloud.training.data import load_splits
    from cloud.training.distill import run_distill
    from cloud.training.distill_data import traffic_examples

    splits = load_splits(distill.splits_config(), distill.student)
    task = distill.task
    test = task.load("test")
    expert_ok = _expert_correct(distill, splits)
    traffic = traffic_examples(task, splits, cfg.seed_fraction, distill.student.max_length)
    per_round = cfg.traffic_per_round or len(traffic) // cfg.rounds
    registry = ModelRegistry(distill.registry_root())

    print(f"\n== round 0: cold student from {cfg.seed_fraction:.0%} of train ==", flush=True)
    first = run_distill(distill, feedback=[])
    rows = [_evaluate(0, first, registry, task, test, expert_ok, cfg)]
    threshold = _default_threshold()
    cloud_cfg = cloud_config({EXPERT}, registry_dir=str(distill.registry_root()), feedback_uri=distill.feedback_store_uri())
    with cloud(cloud_cfg) as c, edge_daemon(_edge_cfg(task.name, registry.path(task.name, first["version"]), c, work,
                                                      distill)) as daemon:
        for r in range(1, cfg.rounds + 1):
            chunk = traffic[(r - 1) * per_round: r * per_round]
            print(f"\n== round {r}: {len(chunk)} queries of traffic at {cfg.traffic_rps:g} req/s ==", flush=True)
            served = await _stream(daemon, task.name, chunk, cfg.traffic_rps, r)
            await _settle(distill.feedback_store_uri(), task.name)
            result = run_distill(distill)
            if result["promoted"]:
                await _await_version(daemon, task.name, test[0].text, result["version"])
            rows.append({**_evaluate(r, result, registry, task, test, expert_ok, cfg), "traffic": served})
    return {
        "config": json.loads(cfg.model_dump_json()),
        "expert_test_accuracy": float(expert_ok.mean()),
        "default_threshold": threshold,
        "rounds": rows,
    }


def _edge_cfg(task: str, student: Path, c: Cloud, work: Path, distill: Any) -> dict[str, Any]:
    return edge_config(
        task, student, c.target,
        feedback={"outbox": str(work / "edge" / "outbox.sqlite3")},
        updater={"enabled": True, "poll_interval_s": 5.0, "models_dir": str(work / "edge" / "models"),
                 "public_key": str(public_path(distill.signing_key_path()))},
    )


def _default_threshold() -> float:
    """The shipped edge config's threshold: the default operating point."""
    return float(yaml.safe_load((ROOT / "edge" / "edge.yaml").read_text())["policy"]["threshold"])


async def _stream(daemon: Server, task: str, chunk: list[Any], rate: float, r: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        stub = edge_pb2_grpc.EdgeStub(channel)
        run = await replay([stub.Infer], task, chunk, poisson(rate, count=len(chunk), seed=r), f"traffic-{r}")
    print(f"traffic: escalated {run['escalation_rate']:.1%}, accuracy {run['accuracy']:.1%}, errors {run['errors']}", flush=True)
    return {k: run[k] for k in ("answered", "accuracy", "escalation_rate", "fallback_rate", "p50_ms", "p99_ms", "errors")}


async def _settle(uri: str, task: str, quiet_s: float = 5.0, limit_s: float = 120.0) -> int:
    """Waits until the feedback store stops growing (the experts and the edge outbox flush)."""
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
    print(f"feedback store: {count} records", flush=True)
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
                print(f"edge serves {version}", flush=True)
                return
            await asyncio.sleep(1.0)
    raise TimeoutError(f"the edge did not swap to {version} within {limit_s:.0f} s")


def _expert_correct(distill: Any, splits: Any) -> np.ndarray:
    from cloud.training.distill import teacher_logits

    logits, _ = teacher_logits(distill.teacher_path(), splits.label_names, splits.test.ids)
    return logits.argmax(-1) == splits.test.labels


def _evaluate(r: int, result: dict[str, Any], registry: Any, task: Any, test: list[Any], expert_ok: np.ndarray,
              cfg: FlywheelConfig) -> dict[str, Any]:
    """The promoted student (the one edges serve after this round) on the test split."""
    from edge.student import Student

    student = Student(registry.path(task.name, registry.promoted(task.name)))
    probs = student.predict([e.text for e in test])
    labels = np.array([student.labels.index(e.label) for e in test])
    confidence, student_ok = probs.max(-1), probs.argmax(-1) == labels
    accuracy, rate = cascade_accuracy(confidence, student_ok, expert_ok, _default_threshold())
    row = {
        "round": r,
        "version": student.version,
        "candidate": result["version"],
        "promoted": result["promoted"],
        "escalation_rate_for_target": escalation_rate_for_target(confidence, student_ok, expert_ok, cfg.tolerance),
        "student_accuracy": float(student_ok.mean()),
        "cascade_accuracy": accuracy,
        "cascade_escalation_rate": rate,
        "retrain_seconds": result["seconds"],
    }
    print(json.dumps(row), flush=True)
    return row


def _table(result: dict[str, Any]) -> str:
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
        lines.append(f"escalation rate for target: {drop:.0%} lower after {last['round']} rounds (target >= 40%)")
    return "\n".join(lines)
