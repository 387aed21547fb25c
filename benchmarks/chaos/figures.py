"""The chaos run's figures, for the run and for each fault, as `chaos.json` holds them, and
its targets."""

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.chaos.config import ChaosConfig
from benchmarks.chaos.faults import Fault
from benchmarks.chaos.ledger import OWED_KIND, Reconciled, StoreScan, reconcile, scan_store, window
from benchmarks.chaos.parts import RssSampler
from benchmarks.chaos.rig import Rig
from benchmarks.chaos.traffic import Outcome, percentile

def figures(cfg: ChaosConfig, timeline: dict[str, Any], outcomes: list[Outcome], door: list[Outcome], rig: Rig,
            sampler: RssSampler, destroyed: set[str], final: dict[str, float], compact: Callable[[], int],
            started: float) -> dict[str, Any]:
    """Everything measured; `compact` compacts the store (counted before and after)."""
    faults: list[Fault] = timeline["faults"]
    refused = {(e.name, k): e.counter("tandem_edge_feedback_refused_total", kind=k)
               for e in rig.edges.values() for k in OWED_KIND.values()}
    raw = scan_store(rig.feedback_root)
    run = reconcile(outcomes, raw, refused, destroyed)
    compact()
    files_after = scan_store(rig.feedback_root).files
    overload = next(f for f in faults if f.name == "overload")
    peak = (overload.start, overload.end + 2.0)
    # The steady state the overload starts from: the settling traffic just before it. Against the
    # run's first steady window, growth over the faults before (restarts, a swap) counts too.
    rss = sampler.ratio((overload.start - cfg.settle_s, overload.start), peak)
    rss_vs_start = sampler.ratio(timeline["steady_window"], peak)
    steady = window(outcomes, *timeline["steady_window"])
    left = sampler.left_behind()
    return {
        **_answers(outcomes),
        "feedback_accepted": run.owed - int(sum(refused.values())),
        "feedback_refused": int(sum(refused.values())),
        "feedback_lost": run.lost,
        "feedback_duplicated": run.duplicated,
        "feedback_expired": int(final["dead"]),
        "feedback_destroyed": len(destroyed),
        "feedback_left_in_outboxes": int(final["outbox"]),
        "escalations_answered": run.escalations_answered,
        "escalations_unrecorded": run.escalations_unrecorded,
        "recovery_s_max": _max_recovery(faults),
        "rss_ratio_max": max(rss.values()),
        "rss_ratio": rss,
        "rss_ratio_max_vs_start": max(rss_vs_start.values()),
        "rss_peak_mb": sampler.peaks_mb(),
        "orphans": len(left),
        "orphan_processes": left,
        "fallback_p50_ms_during_outage": _fallback_p50_ms(outcomes, faults),
        "edge_only_p50_ms": _ms(percentile((o.latency_s for o in steady if o.source == "EDGE"), 50)),
        "store_files_per_1000_records": 1000 * files_after / max(1, raw.records),
        "store_files_per_1000_records_before_compaction": 1000 * raw.files / max(1, raw.records),
        "store_records": raw.records,
        "capacity_rps": timeline["capacity_rps"],
        "overload_rps": overload.details["offered_rps"],
        "door_shed": _door(door),
        "faults": [_fault(f, outcomes, raw, i, faults, timeline["end"], destroyed) for i, f in enumerate(faults)],
        "duration_s": timeline["end"] - started,
        "config": cfg.model_dump(mode="json"),
    }


def _answers(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    errors = Counter(o.code for o in outcomes if not o.answered)
    return {
        "requests": len(outcomes),
        "answered": sum(o.answered for o in outcomes),
        "failed": sum(errors.values()),
        "errors": dict(errors),
        "sources": dict(Counter(o.source for o in outcomes if o.answered)),
        "p99_ms": _ms(percentile((o.latency_s for o in outcomes), 99)),
    }


def _fault(f: Fault, outcomes: Sequence[Outcome], raw: StoreScan, i: int, faults: Sequence[Fault], end: float,
           destroyed: set[str]) -> dict[str, Any]:
    until = faults[i + 1].start if i + 1 < len(faults) else end
    during = window(outcomes, f.start, max(f.end, f.start + 1.0))
    refused = {(f.details["edge"], k): n for k, n in f.details.get("refused_by_kind", {}).items()}
    ledger: Reconciled = reconcile(window(outcomes, f.start, until), raw, refused, destroyed)
    return {
        "name": f.name,
        **{k: v for k, v in _answers(window(outcomes, f.start, until)).items() if k != "p99_ms"},
        "p99_ms_during": _ms(percentile((o.latency_s for o in during), 99)),
        "fault_s": f.end - f.start,
        "back_s": None if f.back is None else f.back - f.start,
        "recovery_s": None if f.recovered is None or f.back is None else max(0.0, f.recovered - f.back),
        "feedback_lost": ledger.lost,
        "feedback_duplicated": ledger.duplicated,
        "escalations_answered": ledger.escalations_answered,
        "escalations_unrecorded": ledger.escalations_unrecorded,
        **f.details,
    }


def _max_recovery(faults: Sequence[Fault]) -> float | None:
    """The slowest recovery; None if a fault never recovered."""
    times = [None if f.recovered is None or f.back is None else max(0.0, f.recovered - f.back) for f in faults]
    return None if None in times else max(t for t in times if t is not None)


def _fallback_p50_ms(outcomes: Sequence[Outcome], faults: Sequence[Fault], first_few: int = 5) -> float | None:
    """Fallback p50 while the whole cloud is down, after each edge's first `first_few`
    fallbacks (the breaker's failure threshold: those wait out the deadline)."""
    kill = next(f for f in faults if f.name == "cloud_kill")
    seen: Counter[str] = Counter()
    kept = []
    for o in sorted(window(outcomes, kill.start, kill.back or kill.end), key=lambda o: o.sent):
        if o.source == "EDGE_FALLBACK":
            seen[o.edge] += 1
            if seen[o.edge] > first_few:
                kept.append(o.latency_s)
    return _ms(percentile(kept, 50))


def _door(door: Sequence[Outcome]) -> dict[str, Any]:
    shed = [o for o in door if o.code == "RESOURCE_EXHAUSTED"]
    return {
        "offered": len(door),
        "answered": sum(o.answered for o in door),
        "shed": len(shed),
        "other_errors": dict(Counter(o.code for o in door if not o.answered and o.code != "RESOURCE_EXHAUSTED")),
        "shed_p50_ms": _ms(percentile((o.latency_s for o in shed), 50)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def targets(r: dict[str, Any]) -> dict[str, bool]:
    """Issue 11's targets, each met or not."""
    recovery = r["recovery_s_max"]
    fallback, edge_only = r["fallback_p50_ms_during_outage"], r["edge_only_p50_ms"]
    return {
        "every request answered": r["failed"] == 0 and r["answered"] == r["requests"],
        "no feedback lost or duplicated": r["feedback_lost"] == 0 and r["feedback_duplicated"] == 0,
        "every answered escalation recorded": r["escalations_unrecorded"] == 0,
        "recovery within 30 s": recovery is not None and recovery <= 30,
        "RSS under overload at most 1.5x steady": r["rss_ratio_max"] <= 1.5,
        "no process left": r["orphans"] == 0,
        "fallback p50 within 2x edge-only during the outage": (
            fallback is not None and edge_only is not None and fallback <= 2 * edge_only),
        "at most 10 store files per 1,000 records": r["store_files_per_1000_records"] <= 10,
    }


def format_report(r: dict[str, Any]) -> str:
    """The run's table, each fault's row, and the targets."""
    lines = [
        f"requests {r['requests']:,}: answered {r['answered']:,}, failed {r['failed']:,} {r['errors'] or ''}",
        f"feedback: accepted {r['feedback_accepted']:,}, lost {r['feedback_lost']}, duplicated "
        f"{r['feedback_duplicated']}, refused at the edge {r['feedback_refused']}, expired {r['feedback_expired']}, "
        f"destroyed on purpose {r['feedback_destroyed']}",
        f"escalations: answered {r['escalations_answered']:,}, unrecorded {r['escalations_unrecorded']}",
        f"capacity {r['capacity_rps']:.1f}/s, overload offered {r['overload_rps']:.0f}/s; RSS ratio max "
        f"{r['rss_ratio_max']:.2f} ({r['rss_ratio_max_vs_start']:.2f} against the run's start); orphans {r['orphans']}",
        "peak RSS, MB: " + ", ".join(f"{role} {mb:.0f}" for role, mb in r["rss_peak_mb"].items()),
        f"fallback p50 during the outage {_num(r['fallback_p50_ms_during_outage'])} ms against edge-only "
        f"{_num(r['edge_only_p50_ms'])} ms",
        f"store files per 1,000 records: {r['store_files_per_1000_records_before_compaction']:.0f} before "
        f"compaction, {r['store_files_per_1000_records']:.1f} after",
        f"door: {r['door_shed']['shed']} of {r['door_shed']['offered']} shed (p50 "
        f"{_num(r['door_shed']['shed_p50_ms'])} ms), {r['door_shed']['answered']} answered",
        "",
        f"{'fault':<28}{'requests':>9}{'failed':>7}{'p99 ms':>9}{'back s':>8}{'recovery s':>11}{'lost':>6}"
        f"{'dup':>5}{'unrec':>6}",
    ]
    for f in r["faults"]:
        lines.append(f"{f['name']:<28}{f['requests']:>9}{f['failed']:>7}{_num(f['p99_ms_during']):>9}"
                     f"{_num(f['back_s']):>8}{_num(f['recovery_s']):>11}{f['feedback_lost']:>6}"
                     f"{f['feedback_duplicated']:>5}{f['escalations_unrecorded']:>6}")
    lines.append("")
    lines += [f"{'met' if ok else 'MISSED':>6}  {name}" for name, ok in targets(r).items()]
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"
