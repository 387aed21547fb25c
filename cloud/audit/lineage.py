"""`tandem audit show VERSION`: a version's lineage from the audit log, written for people."""

from typing import Any

from cloud.audit.log import AuditLog


def show_lineage(log: AuditLog, version: str) -> str | None:
    """What `version` was trained on, how it was judged and signed, where it went; None if the
    log does not mention it."""
    entries = log.lineage(version)
    if not entries:
        return None
    lines = [version]
    acks = []
    for e in entries:
        data = e.get("data", {})
        head = f"  {e.get('time')} [{e.get('seq')}] {e.get('actor')}:"
        match e.get("event"):
            case "publish":
                lines += [f"{head} published, sequence {data.get('sequence')}, parent {data.get('parent') or 'none'}",
                          f"    signed by key {data.get('key_id')}; manifest sha256 {data.get('manifest_sha256')}",
                          *_lineage(data.get("lineage", {})), f"    gate: {_gate(data.get('gate', {}))}"]
            case "promote":
                lines.append(f"{head} promoted (previous: {data.get('previous') or 'none'}), sequence "
                             f"{data.get('sequence')}, signed by key {data.get('key_id')}")
            case "reject_candidate":
                lines.append(f"{head} rejected: {data.get('reason')}")
            case "key_use":
                lines.append(f"{head} key {data.get('key_id')} signed the {data.get('signed')}")
            case "rollout_ack":
                acks.append(f"{data.get('device')} at {e.get('time')}")
            case event:
                details = ", ".join(f"{k} {v}" for k, v in sorted(data.items()))
                lines.append(f"{head} {event}: {details}")
    lines.append(f"  rollout acknowledged by {len(acks)} edge(s)" + "".join(f"\n    {a}" for a in acks))
    return "\n".join(lines)


def _lineage(lineage: dict[str, Any]) -> list[str]:
    used = ", ".join(f"{kind} {n}" for kind, n in sorted(lineage.get("feedback_examples", {}).items())) or "none"
    corrections = lineage.get("feedback_corrections", {})
    distill = lineage.get("distill", {})
    lines = [
        f"    trained on {lineage.get('train_examples')} examples: {lineage.get('labelled_examples')} from the "
        f"labelled seed, feedback used: {used} ({lineage.get('feedback_dropped', 0)} dropped)",
        f"    corrections: {corrections.get('corroborated_by_devices', 0)} corroborated by "
        f"{distill.get('corroboration_devices', '?')}+ devices, {corrections.get('corroborated_by_teacher', 0)} "
        f"by the teacher, {corrections.get('soft_only', 0)} trained from soft labels only",
        f"    teacher: {distill.get('teacher')}",
    ]
    partitions = lineage.get("feedback_partitions", {})
    lines.append("    feedback partitions read:" + ("" if partitions else " none"))
    for partition, kinds in partitions.items():
        lines.append(f"      {partition}: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    return lines


def _gate(gate: dict[str, Any]) -> str:
    """The gate's verdict: the escalation rate each version needs on the validation split to
    reach the target accuracy, and the labels the candidate regressed on."""
    promoted = gate.get("promoted_escalation_rate")
    against = "nothing promoted" if promoted is None else f"{promoted:.1%} for the promoted version"
    verdict = "passed" if gate.get("passed") else "failed"
    regressed = gate.get("regressed_labels") or []
    return (f"{verdict}: needs {gate.get('candidate_escalation_rate', float('nan')):.1%} escalated for "
            f"{gate.get('target_accuracy', float('nan')):.1%} on {gate.get('examples')} {gate.get('split')} examples "
            f"against {against} (min drop {gate.get('min_escalation_drop')}); regressed labels: "
            f"{', '.join(regressed) if regressed else 'none'}")
