"""Writing a suite's results: report.json (everything), summary.json (the three runs at a
glance), report.md (tables) and the plots."""

import json
from pathlib import Path
from typing import Any

from benchmarks.plots import plot_all

SUMMARY_KEYS = ("p50_ms", "p99_ms", "accuracy", "escalation_rate", "throughput_rps", "open_recall", "known_accuracy")
PERCENTILES = ("p50_ms", "p90_ms", "p99_ms", "p99.9_ms")


def write_report(report: dict[str, Any], out: Path) -> None:
    # The measurements first: nothing below may lose them.
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    report["targets"] = targets(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    summary = {name: {k: run[k] for k in SUMMARY_KEYS} for name, run in report["runs"].items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots = plot_all(report, out)
    (out / "report.md").write_text(markdown(report, plots))
    print("\n" + _targets_table(report["targets"]))


def _target(value: float, limit: float, at_most: bool = True, met: bool | None = True) -> dict[str, Any]:
    """value / limit; `met=None` marks a ratio to a physical limit, reported, not judged."""
    ok = None if met is None else met and (value <= limit if at_most else value >= limit)
    return {"value": value, "limit": limit, "ratio": value / limit if limit else None, "met": ok}


def targets(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The system's targets, then each figure against its floor measured in the same run."""
    runs, floors = r["runs"], r["floors"]
    # Sustained: at least 95% of the offered rate answered, no errors, and sends at most 2 ms
    # late (lateness adds to every latency measured from the schedule).
    sustained = [g["offered_rps"] for g in r["generator"]
                 if g["achieved_rps"] >= 0.95 * g["offered_rps"] and not g["errors"] and g["send_lateness_p99_ms"] <= 2.0]
    edge_floor = floors["raw_onnx"]["paced_p50_ms"] + floors["grpc_echo"]["paced_p50_ms"]
    cloud_only = runs["cloud_only"]
    out = {
        "cascade p50 <= 1.2 x edge_only p50": _target(runs["cascade"]["p50_ms"], 1.2 * runs["edge_only"]["p50_ms"]),
        # Only a cloud_only run the cloud fully answered is the baseline the target means.
        "cascade accuracy >= cloud_only - 1 pt": _target(runs["cascade"]["accuracy"], cloud_only["accuracy"] - 0.01,
                                                         at_most=False, met=not cloud_only["fallback_rate"]),
        "generator sustains >= 2000 req/s offered": _target(max(sustained, default=0.0), 2000.0, at_most=False),
        "edge_only p50 / floor (paced raw ONNX + paced gRPC echo p50)": _target(runs["edge_only"]["p50_ms"], edge_floor,
                                                                               met=None),
        "cloud_only p50 / floor (edge floor + vLLM offline p50)": _target(
            cloud_only["p50_ms"], edge_floor + floors["vllm_offline"]["p50_ms"], met=None),
    }
    capacity = r["step_response"]["capacity_rps"]
    if capacity is not None:
        out["cloud capacity served / vLLM offline rps"] = _target(capacity, floors["vllm_offline"]["rps"], met=None)
    return out


def markdown(r: dict[str, Any], plots: dict[str, str]) -> str:
    lines = [
        "# Tandem load tests",
        "",
        f"Environment: {r['environment']['cpus']} CPUs, {r['environment']['memory_gb']:.0f} GB, Python "
        f"{r['environment']['python']}. Config: Poisson arrivals at {r['config']['rate_rps']:g} req/s; the same "
        "query sequence for each run. Latency is measured from each request's scheduled send time.",
        "",
        "## Targets (value / limit measured in this run)",
        "",
        _targets_table(r["targets"]),
        "",
        "## Baselines",
        "",
        _runs_table(r["runs"]),
        "",
        "## Floors",
        "",
        "| floor | p50 ms | p99 ms | paced p50 ms | req/s |",
        "|---|---:|---:|---:|---:|",
        *(f"| {name} | {f['p50_ms']:.3f} | {f['p99_ms']:.3f} | {_opt(f.get('paced_p50_ms'), '.3f')} | "
          f"{_opt(f.get('rps'), '.0f')} |" for name, f in r["floors"].items()),
        "",
        "## Generator capacity (Poisson against the raw gRPC echo)",
        "",
        "| offered req/s | achieved req/s | ratio | p99 ms | send lateness p99 ms | errors |",
        "|---:|---:|---:|---:|---:|---|",
        *(f"| {g['offered_rps']:.0f} | {g['achieved_rps']:.0f} | {g['achieved_rps'] / g['offered_rps']:.2f} | "
          f"{g['p99_ms']:.2f} | {g['send_lateness_p99_ms']:.2f} | {g['errors'] or ''} |" for g in r["generator"]),
        "",
        "## Threshold sweep",
        "",
        "| threshold | escalation rate | accuracy | p50 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|",
        *(f"| {p['threshold']:g} | {p['escalation_rate']:.1%} | {p['accuracy']:.1%} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} |"
          for p in r["sweep"]),
        "",
        _step_section(r["step_response"]),
        "",
        "## Plots",
        "",
        *(f"![{name}]({file})" for name, file in plots.items()),
        "",
    ]
    return "\n".join(lines)


def _opt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _runs_table(runs: dict[str, Any]) -> str:
    lines = [
        "| run | path | share | accuracy | p50 ms | p90 ms | p99 ms | p99.9 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        lines.append(f"| **{name}** | all | 100% | {run['accuracy']:.1%} | " + " | ".join(f"{run[p]:.2f}" for p in PERCENTILES) + " |")
        for path, stats in run["paths"].items():
            acc = run["by_path"][path]
            lines.append(f"| | {path} | {acc['share']:.1%} | {acc['accuracy']:.1%} | "
                         + " | ".join(f"{stats[p]:.2f}" for p in PERCENTILES) + " |")
    lines += [
        "",
        "| run | escalation rate | throughput req/s | errors | edge CPU (cores) | edge RSS MB | cloud queued max | cloud running max |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        lines.append(f"| {name} | {run['escalation_rate']:.1%} | {run['throughput_rps']:.1f} | {run['errors'] or 0} | "
                     f"{run['edge_cpu_cores']:.2f} | {run['edge_rss_mb_max']:.0f} | {run['cloud_queued_max']:.0f} | "
                     f"{run['cloud_running_max']:.0f} |")
    return "\n".join(lines)


def _step_section(s: dict[str, Any]) -> str:
    where = f"{s['saturated_at_rps']:g} req/s" if s["saturated_at_rps"] is not None else "not reached"
    capacity = f"{s['capacity_rps']:.0f} req/s" if s["capacity_rps"] is not None else "none measured"
    lines = [
        "## Step response (fleet mode)",
        "",
        f"{s['edges']} simulated edges in one process share one ONNX Runtime session; every request is escalated "
        f"(deadline {s['deadline_ms']:g} ms). Saturation (more than 5% of requests not answered by the cloud "
        f"in time, or any error): **{where}**; the cloud answered {capacity} at the last step below it. "
        "Past it, the edges answer locally (fallback), not with errors. One process plays the fleet and the "
        "load generator, so its CPU and send lateness are shown: high lateness means the client, not the cloud, "
        "was the limit.",
        "",
        "| offered req/s | achieved req/s | escalated | fallback | p50 ms | p99 ms | errors | send lateness p99 ms | "
        "bench CPU (cores) | cloud queued max | cloud running max |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for st in s["steps"]:
        shares = st["by_path"]
        lines.append(
            f"| {st['offered_rps']:g} | {st['throughput_rps']:.1f} | {shares.get('escalated', {}).get('share', 0):.1%} | "
            f"{shares.get('fallback', {}).get('share', 0):.1%} | {st['p50_ms']:.2f} | {st['p99_ms']:.2f} | "
            f"{st['errors'] or 0} | {st['send_lateness_p99_ms']:.2f} | {st['bench_cpu_cores']:.2f} | "
            f"{st['cloud_queued_max']:.0f} | {st['cloud_running_max']:.0f} |"
        )
    return "\n".join(lines)


def _targets_table(t: dict[str, dict[str, Any]]) -> str:
    lines = ["| target | value | limit | ratio | met |", "|---|---:|---:|---:|---|"]
    for name, v in t.items():
        met = "ratio" if v["met"] is None else "yes" if v["met"] else "NO"
        lines.append(f"| {name} | {v['value']:.4g} | {v['limit']:.4g} | {v['ratio']:.2f} | {met} |")
    return "\n".join(lines)
