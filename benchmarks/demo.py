"""`tandem demo` (`make demo`): the whole system on this machine, then a report.

Trains or reuses the models, benchmarks the edge daemon, starts the cloud (Ray Serve +
vLLM, with its registry and feedback store) and an edge daemon as real processes, replays
banking77 test queries through the edge, runs one round of the learning loop (a cold
student, traffic, feedback, distillation, the gate, a signed rollout the edge swaps in),
then stops the cloud and replays more (the device keeps answering), and reports.
"""

import asyncio
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import grpc

from benchmarks.edge_bench import EdgeBenchConfig, run_edge_bench
from benchmarks.flywheel import SAMPLERS, FlywheelConfig, Loop, format_rounds
from benchmarks.latency import LatencyRecorder
from benchmarks.system import cloud, edge_config, edge_daemon
from cloud.prepare import SMOLLM2_DIR, ensure_trained, local_train_config, prepare_smollm2
from tandem import envs
from tandem.settings import load_config
from tandem.tasks import Example
from tandem.v1 import edge_pb2, edge_pb2_grpc

log = logging.getLogger(__name__)

QUERIES = 400        # with the cloud up
OUTAGE_QUERIES = 50  # after the cloud is stopped
RATE_RPS = 40.0
LOOP_TRAFFIC = 2000  # train queries streamed in the learning-loop round


def run_demo(config: Path | None, out: Path) -> int:
    started = time.perf_counter()
    train_cfg = local_train_config(config)
    teacher = ensure_trained(train_cfg, "teacher")
    student = ensure_trained(train_cfg, "student")
    prepare_smollm2(envs.TANDEM_CACHE_DIR / "models" / SMOLLM2_DIR)
    print(_model_report(teacher, student))

    print("\n== edge daemon benchmark ==")
    bench = load_config(EdgeBenchConfig, None).model_copy(update={"student": train_cfg.model_dir("student")})
    run_edge_bench(bench, out / "edge_bench.json")

    # The loop's registry, feedback store and keys live in the results folder, fresh each run.
    work = out / "loop"
    shutil.rmtree(work, ignore_errors=True)
    loop = Loop(FlywheelConfig(rounds=1, traffic_per_round=LOOP_TRAFFIC, samplers=["weighted"], new_intent=False), work)
    cold = loop.cold_start()
    task = train_cfg.task.name
    examples = random.Random(0).sample(train_cfg.task.load("test"), QUERIES + OUTAGE_QUERIES)
    with cloud(loop.cloud_config()) as c:
        # The loop's round first: the test queries replayed next must not reach its training data.
        with edge_daemon(loop.edge_config(c, SAMPLERS["weighted"])) as learner:
            loop.rows = [cold, asyncio.run(loop.round(1, learner, loop.data.traffic[:LOOP_TRAFFIC]))]
        main_edge = edge_config(task, train_cfg.model_dir("student"), c, "kiosk-1",
                                feedback={"outbox": str(work / "outbox.sqlite3")})
        log.info("the system: edge daemon -> Ray Serve gRPC -> vLLM classify expert, %d queries", QUERIES)
        with edge_daemon(main_edge) as edge:
            answers = asyncio.run(_replay(edge.port, task, examples[:QUERIES]))
            log.info("stopping the cloud; the edge keeps answering %d more queries", OUTAGE_QUERIES)
            c.server.process.terminate()
            c.server.process.wait(timeout=60)
            answers += asyncio.run(_replay(edge.port, task, examples[QUERIES:]))
    report = {**_system_report(answers, teacher["metrics"]["test_accuracy"]), "learning_loop": loop.result({"weighted": loop.rows})}
    (out / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    print(_format_system(report))
    print("\n== learning loop (one round; banking77 test split) ==\n" + format_rounds(report["learning_loop"]))
    print(f"\ndemo took {time.perf_counter() - started:.0f} s; results in {out}")
    return 0


async def _replay(port: int, task: str, examples: list[Example]) -> list[dict[str, Any]]:
    """Sends each example at RATE_RPS (open loop); returns one record per answer."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = edge_pb2_grpc.EdgeStub(channel)
        start = time.perf_counter()

        async def one(i: int, example: Example) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, start + i / RATE_RPS - time.perf_counter()))
            sent = time.perf_counter()
            r = await stub.Infer(edge_pb2.InferRequest(task=task, text=example.text.encode()), timeout=10)
            return {"source": edge_pb2.Source.Name(r.source), "correct": r.label == example.label,
                    "latency_s": time.perf_counter() - sent, "reason": r.reason}

        return await asyncio.gather(*(one(i, e) for i, e in enumerate(examples)))


def _system_report(answers: list[dict[str, Any]], expert_accuracy: float) -> dict[str, Any]:
    paths = {}
    for source in ("EDGE", "CLOUD", "EDGE_FALLBACK"):
        rows = [a for a in answers if a["source"] == source]
        rec = LatencyRecorder()
        for a in rows:
            rec.record(a["latency_s"])
        paths[source] = {
            "share": len(rows) / len(answers),
            "count": len(rows),
            "p50_ms": rec.percentile_ms(50) if rows else None,
            "p99_ms": rec.percentile_ms(99) if rows else None,
            "accuracy": sum(a["correct"] for a in rows) / len(rows) if rows else None,
        }
    with_cloud = answers[:QUERIES]
    return {
        "paths": paths,
        "queries": len(answers),
        "escalation_rate": sum(a["source"] == "CLOUD" for a in with_cloud) / len(with_cloud),
        "cascade_accuracy": sum(a["correct"] for a in with_cloud) / len(with_cloud),
        "expert_accuracy_test_split": expert_accuracy,
        "overall_accuracy": sum(a["correct"] for a in answers) / len(answers),
        "fallback_reasons": sorted({a["reason"] for a in answers if a["source"] == "EDGE_FALLBACK"}),
    }


def _model_report(teacher: dict[str, Any], student: dict[str, Any]) -> str:
    s = student["metrics"]
    return "\n".join([
        "\n== models (banking77 test split) ==",
        f"teacher  {teacher['layers']} layers  accuracy {teacher['metrics']['test_accuracy']:.1%}",
        f"student  {student['layers']} layers ({student['layers'] / teacher['layers']:.2f}x the teacher's per-query compute)"
        f"  int8 accuracy {s['test_accuracy']:.1%} (fp32 {s['test_accuracy_fp32']:.1%})",
        f"         ECE {s['test_ece_uncalibrated']:.3f} uncalibrated -> {s['test_ece']:.3f} at T={student['temperature']:.2f}",
    ])


def _format_system(r: dict[str, Any]) -> str:
    lines = [f"\n{'path':14} {'share':>6} {'count':>6} {'p50 ms':>8} {'p99 ms':>8} {'accuracy':>9}"]
    for source, p in r["paths"].items():
        if p["count"]:
            lines.append(f"{source:14} {p['share']:6.1%} {p['count']:6d} {p['p50_ms']:8.2f} {p['p99_ms']:8.2f} {p['accuracy']:9.1%}")
    lines += [
        f"\nwith the cloud up ({QUERIES} queries): escalation rate {r['escalation_rate']:.1%}, "
        f"cascade accuracy {r['cascade_accuracy']:.1%} (classify expert alone: {r['expert_accuracy_test_split']:.1%} on the test split)",
        f"all {r['queries']} queries, cloud stopped for the last {OUTAGE_QUERIES}: accuracy {r['overall_accuracy']:.1%}, "
        f"0 failed; fallback reasons {r['fallback_reasons']}",
    ]
    return "\n".join(lines)
