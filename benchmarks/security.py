"""`tandem bench security --out FILE.json`: the trust measures on the real system.

Starts the cloud (Ray Serve + the vLLM classify expert) behind its mTLS proxy (nginx) with a
fleet CA of its own, then:
- the attack table (`benchmarks.attacks`): each attack, what must happen, what did;
- the fuzzers (`benchmarks.fuzz`): `fuzz_inputs` inputs to Edge.Infer and Edge.Correct on a real
  edge daemon, and to every cloud RPC through the proxy as an enrolled device;
- what TLS costs: escalations through the proxy and plaintext straight to Serve's port,
  interleaved one by one so that machine noise falls on both; the overhead is the caller's
  latency less the expert's own compute time (`expert_ms`);
- that one edge keeps one TLS session: the proxy's access log, by connection;
- the poisoning attack (`benchmarks.poisoning`): one enrolled device's 5,000 trigger
  corrections through the proxy, then a retraining round.
"""

import asyncio
import json
import logging
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from benchmarks.attacks import (FLEET, Target, audit_attack, report, supply_chain_attacks, transport_attacks,
                               write_attacks)
from benchmarks.fuzz import fuzz_rpc
from benchmarks.latency import LatencyRecorder
from benchmarks.system import Cloud, cloud, cloud_config, edge_config, edge_daemon
from cloud.identity import DEVICE_METADATA, PROXY_TOKEN_METADATA
from cloud.registry import ModelRegistry
from tandem.settings import TandemSettings
from tandem.v1 import edge_pb2, edge_pb2_grpc, expert_pb2, expert_pb2_grpc, fleet_pb2

log = logging.getLogger(__name__)

EXPERT = "banking77-classifier"
TEXT = "my card has not arrived"  # a valid text, which the fuzzers' near-valid inputs keep


class SecurityBenchConfig(TandemSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_SECURITY_")

    fuzz_inputs: int = Field(10_000, ge=1, description="Fuzzed inputs per RPC.")
    tls_calls: int = Field(400, ge=10, description="Escalations timed on each path (TLS proxy, plaintext).")
    reuse_requests: int = Field(200, ge=1, description="Escalations one edge daemon sends for the TLS-session check.")
    device_quota_per_day: int = Field(
        6000, ge=5001, description="Every device's daily feedback quota: above the attacker's 5,000 corrections, so "
        "that corroboration is what the poisoning attack tests, not the quota.",
    )
    poisoning: bool = Field(True, description="Run the poisoning attack and its retraining rounds (minutes).")
    poisoning_control: bool = Field(
        True, description="Also a round that trusts every correction (corroboration off, never promoted): shows that "
        "the attack works without the defence. One more round.",
    )
    distill: dict[str, Any] = Field(default_factory=dict, description="DistillConfig fields of the poisoning rounds.")


def run_security_bench(cfg: SecurityBenchConfig, out: Path) -> dict[str, Any]:
    # Known to this process, so that the plaintext path can be timed straight against Serve's port.
    os.environ.setdefault("TANDEM_PROXY_TOKEN", secrets.token_urlsafe(32))
    with tempfile.TemporaryDirectory(prefix="tandem-security-") as tmp:
        result = asyncio.run(_run(cfg, Path(tmp)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_report(result) + f"\n\n{out}")
    return result


async def _run(cfg: SecurityBenchConfig, work: Path) -> dict[str, Any]:
    from cloud.prepare import ensure_trained, local_train_config

    train_cfg = local_train_config(None)
    task = train_cfg.task
    ensure_trained(train_cfg, "teacher")  # the expert, and the poisoning round's teacher
    ensure_trained(train_cfg, "student")
    student = train_cfg.model_dir("student")
    settings = cloud_config({EXPERT}, feedback_uri=str(work / "feedback"), registry_dir=str(work / "registry"),
                            fleet={"device_quota_per_day": cfg.device_quota_per_day})
    with cloud(settings) as c:
        assert c.ca_dir is not None
        t = Target(proxy=c.target, serve=f"127.0.0.1:{settings['grpc_port']}", ca_dir=c.ca_dir,
                   feedback_uri=settings["feedback_uri"], registry_dir=Path(settings["registry_dir"]),
                   metrics_url=c.metrics_url, audit_uri=c.audit_uri, task=task.name, labels=task.label_names(),
                   expert=EXPERT, quota=cfg.device_quota_per_day)
        log.info("attacks: transport, writes, supply chain")
        attacks = [*await transport_attacks(t, work), *await write_attacks(t),
                   *await supply_chain_attacks(t, student, work)]
        log.info("fuzzing every RPC with %d inputs each", cfg.fuzz_inputs)
        fuzz = await _fuzz(cfg, c, t, student, work)
        log.info("TLS cost: %d escalations on each path, interleaved", cfg.tls_calls)
        texts = [e.text for e in task.load("test")]
        tls = await _tls_cost(cfg, t, texts)
        log.info("one TLS session per edge: %d escalations through an edge daemon", cfg.reuse_requests)
        reuse = await _session_reuse(c, t.task, student, work, texts[: cfg.reuse_requests])
        poisoning = await asyncio.to_thread(_poisoning, cfg, t, work) if cfg.poisoning else {}
    attacks.append(audit_attack(t, work))  # the log as the run left it, the cloud stopped
    return {
        "config": json.loads(cfg.model_dump_json()),
        "attacks": [a.as_dict() for a in attacks],
        "fuzz": fuzz,
        # None when the poisoning rounds were not run (`poisoning: false`).
        "trigger_flipped": poisoning.get("trigger_flipped"),
        "trigger_queries": poisoning.get("trigger_queries"),
        "poisoning": poisoning,
        **tls,
        "tls_session_reuse": reuse,
    }


async def _fuzz(cfg: SecurityBenchConfig, c: Cloud, t: Target, student: Path, work: Path) -> dict[str, Any]:
    known = {"task": [t.task], "label": t.labels, "version": [""], "application": [EXPERT],
             "text": [TEXT, "I can't find my PIN \U0001f600"],
             "kind": [fleet_pb2.FALLBACK, fleet_pb2.AUDIT, fleet_pb2.CORRECTION]}
    results = {}
    edge = edge_config(t.task, student, c, "fuzz-edge", feedback={"outbox": str(work / "fuzz-outbox.sqlite3")})
    with edge_daemon(edge) as daemon:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
            valid = {"task": t.task, "text": TEXT.encode(), "label": t.labels[0]}
            for method, request in (("Infer", edge_pb2.InferRequest), ("Correct", edge_pb2.CorrectRequest)):
                results[f"Edge.{method}"] = await fuzz_rpc(channel, f"/tandem.v1.Edge/{method}", request,
                                                           cfg.fuzz_inputs, known=known, valid=valid)
    record = {"record_id": "fuzz-1", "task": t.task, "kind": fleet_pb2.FALLBACK, "text": TEXT,
              "created_unix_ms": int(time.time() * 1000)}
    promoted = ModelRegistry(t.registry_dir).promoted(t.task) or ""
    cloud_rpcs = [("Fleet", name, getattr(fleet_pb2, request), FLEET, valid) for name, request, valid in (
        ("ReportFeedback", "ReportFeedbackRequest", {"records": [record]}),
        ("GetManifest", "GetManifestRequest", {"task": t.task}),
        ("FetchModel", "FetchModelRequest", {"task": t.task}),
        ("GetRoutes", "GetRoutesRequest", {}),
        ("AckRollout", "AckRolloutRequest", {"task": t.task, "version": promoted}))]
    cloud_rpcs.append(("Expert", "Escalate", expert_pb2.EscalateRequest, (("application", EXPERT),),
                       {"task": t.task, "text": TEXT}))
    async with t.channel("fuzzer") as channel:
        for service, name, request, metadata, valid in cloud_rpcs:
            results[f"{service}.{name}"] = await fuzz_rpc(channel, f"/tandem.v1.{service}/{name}", request,
                                                          cfg.fuzz_inputs, metadata=metadata, known=known, valid=valid)
    for name, r in results.items():
        log.info("fuzz %s: %d inputs, %d crashes, %d INTERNAL/UNKNOWN, %d unnamed rejections; %s", name, r.inputs,
                 r.crashes, r.internal_or_unknown, r.unnamed_rejections, dict(r.codes))
    return {name: r.as_dict() for name, r in results.items()}


async def _tls_cost(cfg: SecurityBenchConfig, t: Target, texts: list[str]) -> dict[str, Any]:
    """Escalation overhead (latency less expert_ms) through the proxy and straight to Serve."""
    direct_metadata = (("application", EXPERT), (DEVICE_METADATA, "bench-plain"),
                       (PROXY_TOKEN_METADATA, os.environ["TANDEM_PROXY_TOKEN"]))
    recorders = {"tls": LatencyRecorder(), "plaintext": LatencyRecorder()}
    async with t.channel("bench-tls") as tls, grpc.aio.insecure_channel(t.serve) as plain:
        paths = {"tls": (expert_pb2_grpc.ExpertStub(tls), (("application", EXPERT),)),
                 "plaintext": (expert_pb2_grpc.ExpertStub(plain), direct_metadata)}
        for i in range(cfg.tls_calls + 20):
            for name, (stub, metadata) in paths.items():
                request = expert_pb2.EscalateRequest(request_id=f"tls-{name}-{i}", task=t.task, text=texts[i % len(texts)])
                sent = time.perf_counter()
                answer = await stub.Escalate(request, metadata=metadata, timeout=30)
                if i >= 20:  # the first calls warm both paths up
                    recorders[name].record(time.perf_counter() - sent - answer.expert_ms / 1e3)
    return {"tls_overhead_p50_ms": recorders["tls"].percentile_ms(50),
            "plaintext_overhead_p50_ms": recorders["plaintext"].percentile_ms(50),
            "tls_overhead_p99_ms": recorders["tls"].percentile_ms(99),
            "plaintext_overhead_p99_ms": recorders["plaintext"].percentile_ms(99)}


async def _session_reuse(c: Cloud, task: str, student: Path, work: Path, texts: list[str]) -> dict[str, Any]:
    """`texts` escalated through one edge daemon, then its lines in the proxy's access log by connection."""
    device = "kiosk-reuse"
    edge = edge_config(task, student, c, device, policy={"mode": "cloud_only"},
                       feedback={"outbox": str(work / "reuse-outbox.sqlite3")})
    with edge_daemon(edge) as daemon:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
            stub = edge_pb2_grpc.EdgeStub(channel)
            for text in texts:
                await stub.Infer(edge_pb2.InferRequest(task=task, text=text.encode()), timeout=30)
    connections: dict[str, int] = {}
    for line in (c.proxy_prefix / "logs" / "access.log").read_text().splitlines():
        fields = line.split()
        if f"CN={device}" in line and len(fields) > 2:
            connections[fields[1]] = max(connections.get(fields[1], 0), int(fields[2]))
    return {"device": device, "escalations": len(texts), "tls_connections": len(connections),
            "requests_per_connection": sorted(connections.values(), reverse=True)}


def _poisoning(cfg: SecurityBenchConfig, t: Target, work: Path) -> dict[str, Any]:
    from benchmarks.poisoning import run_poisoning
    from cloud.training.config import DistillConfig

    distill = DistillConfig(**{**cfg.distill, "registry_dir": work / "loop-registry", "feedback_uri": t.feedback_uri,
                               "signing_key": work / "keys" / "retrainer.pem", "dev_keys": True})

    def send(records: list[fleet_pb2.FeedbackRecord]) -> None:
        asyncio.run(_send_as_attacker(t, records))

    return run_poisoning(distill, t.feedback_uri, send=send, undefended=cfg.poisoning_control)


async def _send_as_attacker(t: Target, records: list[fleet_pb2.FeedbackRecord]) -> None:
    from benchmarks.poisoning import ATTACKER_DEVICE

    async with t.channel(ATTACKER_DEVICE) as channel:
        for start in range(0, len(records), 1000):
            outcome = await report(channel, *records[start: start + 1000])
            if outcome != "OK":
                raise RuntimeError(f"the attacker's corrections were refused: {outcome}")


def security_targets_met(r: dict[str, Any]) -> bool:
    """Every attack ended as expected, no fuzzed input crashed a server, got INTERNAL or UNKNOWN,
    or a refusal without its field, no trigger query flipped, and each edge kept one TLS session."""
    fuzz_clean = all(f["crashes"] == f["internal_or_unknown"] == f["unnamed_rejections"] == 0 for f in r["fuzz"].values())
    return (all(a["passed"] for a in r["attacks"]) and fuzz_clean and r["trigger_flipped"] in (0, None)
            and r["tls_session_reuse"]["tls_connections"] == 1)


def format_report(r: dict[str, Any]) -> str:
    lines = ["== attacks ==", f"{'attack':58} {'expected':22} {'pass':5} observed"]
    for a in r["attacks"]:
        lines.append(f"{a['name'][:58]:58} {a['expected'][:22]:22} {'yes' if a['passed'] else 'NO':5} {a['observed'][:90]}")
    lines += ["\n== fuzz ==", f"{'rpc':22} {'inputs':>7} {'crashes':>8} {'internal/unknown':>17} {'unnamed':>8}"]
    for name, f in r["fuzz"].items():
        lines.append(f"{name:22} {f['inputs']:7d} {f['crashes']:8d} {f['internal_or_unknown']:17d} {f['unnamed_rejections']:8d}")
    if r["trigger_flipped"] is not None:
        p = r["poisoning"]
        lines += ["\n== poisoning ==",
                  f"{p['attack_records']:,} trigger corrections from one device; after retraining {r['trigger_flipped']} of "
                  f"{r['trigger_queries']} trigger queries get the attacker's label; test accuracy "
                  f"{p['test_accuracy_before']:.1%} -> {p['test_accuracy_after']:.1%}"]
        if "undefended_trigger_flipped" in p:
            lines.append(f"without corroboration (every correction a hard label): {p['undefended_trigger_flipped']} of "
                         f"{r['trigger_queries']} flipped, test accuracy {p['undefended_test_accuracy']:.1%}")
    reuse = r["tls_session_reuse"]
    lines += ["\n== TLS ==",
              f"escalation overhead p50: {r['tls_overhead_p50_ms']:.2f} ms through the mTLS proxy, "
              f"{r['plaintext_overhead_p50_ms']:.2f} ms plaintext to Serve (TLS adds "
              f"{r['tls_overhead_p50_ms'] - r['plaintext_overhead_p50_ms']:+.2f} ms)",
              f"one edge, {reuse['escalations']} escalations: {reuse['tls_connections']} TLS connection(s), "
              f"requests per connection {reuse['requests_per_connection'][:5]}"]
    return "\n".join(lines)
