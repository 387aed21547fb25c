"""The suite's and `tandem bench load`'s PNG plots (matplotlib, no display needed)."""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window, even where a display exists

import matplotlib.pyplot as plt  # noqa: E402


def plot_all(r: dict[str, Any], out: Path) -> dict[str, str]:
    """Writes the plots into `out`; returns title -> file name."""
    plots = {
        "latency CDF per path": _latency_cdf(r["runs"], out / "latency_cdf.png"),
        "accuracy and p99 against escalation rate": _sweep(r["sweep"], r["runs"], out / "accuracy_escalation.png"),
        "throughput against offered load": _throughput(r["step_response"], out / "throughput.png"),
    }
    return {title: path.name for title, path in plots.items()}


def plot_load(r: dict[str, Any], out: Path) -> dict[str, str]:
    """`tandem bench load`'s plots in `out`; returns title -> file name."""
    plots = {
        "latency CDF per path": _latency_cdf({"load": r}, out / "latency_cdf.png"),
        "rate over time": _rate_over_time(r["timeline"], out / "rate.png"),
    }
    return {title: path.name for title, path in plots.items()}


def _rate_over_time(t: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    # Each bin's edges, its last one too, so that the last bin is drawn as wide as the others.
    edges = [i * t["bin_s"] for i in range(len(t["offered"]) + 1)]
    for key, style in (("answered", "-"), ("failed", "-"), ("offered", "k:")):
        rates = [n / t["bin_s"] for n in t[key]]
        ax.step(edges, [*rates, rates[-1]], style, where="post", label=key)
    ax.set_xlabel("seconds from the start (scheduled sends; answers and failures when they came back)")
    ax.set_ylabel("requests per second")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Rate over time")
    return _save(fig, path)


def _latency_cdf(runs: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, run in runs.items():
        for p, points in sorted(run["cdf"].items()):
            ms, pct = zip(*points)
            ax.plot(ms, pct, label=f"{name}: {p}")
    ax.set_xscale("log")
    ax.set_xlabel("latency from scheduled send (ms, log scale)")
    ax.set_ylabel("percentile")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:  # a run with no answers has no curve
        ax.legend(fontsize=8)
    ax.set_title("Latency CDF per run and path")
    return _save(fig, path)


def _sweep(points: list[dict[str, Any]], runs: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    rates = [p["escalation_rate"] for p in points]
    ax.plot(rates, [100 * p["accuracy"] for p in points], "o-", label="cascade accuracy")
    for p in points:
        ax.annotate(f"t={p['threshold']:g}", (p["escalation_rate"], 100 * p["accuracy"]), fontsize=7,
                    xytext=(3, -10), textcoords="offset points")
    for name, color in (("edge_only", "tab:grey"), ("cloud_only", "tab:green")):
        ax.axhline(100 * runs[name]["accuracy"], linestyle="--", color=color, alpha=0.7, label=f"{name} accuracy")
    ax.set_xlabel("escalation rate")
    ax.set_ylabel("accuracy (%)")
    p99 = ax.twinx()
    p99.plot(rates, [p["p99_ms"] for p in points], "s:", color="tab:red", label="cascade p99")
    p99.set_ylabel("p99 latency (ms)", color="tab:red")
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = p99.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, loc="lower right", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.set_title("Threshold sweep: accuracy and p99 against escalation rate")
    return _save(fig, path)


def _throughput(s: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    offered = [st["offered_rps"] for st in s["steps"]]
    answered_by_cloud = [st["throughput_rps"] * st["by_path"].get("escalated", {}).get("share", 0) for st in s["steps"]]
    ax.plot(offered, [st["throughput_rps"] for st in s["steps"]], "o-", label="answered (all paths)")
    ax.plot(offered, answered_by_cloud, "s-", label="answered by the cloud")
    ax.plot(offered, offered, ":", color="grey", label="offered")
    if s["saturated_at_rps"] is not None:
        ax.axvline(s["saturated_at_rps"], color="tab:red", alpha=0.5, label="cloud saturated")
    ax.set_xlabel("offered load (req/s)")
    ax.set_ylabel("throughput (req/s)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Step response: {s['edges']} simulated edges, every request escalated")
    return _save(fig, path)


def plot_flywheel(result: dict[str, Any], path: Path) -> Path:
    """The learning loop's curves over rounds: the escalation rate needed per audit sampler, and
    the cascade at each student's fitted threshold against the old fixed one."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for sampler, curve in result["sampling"].items():
        left.plot(range(len(curve)), [100 * x for x in curve], "o-", label=f"{sampler} audits")
    left.set_title("escalation rate needed for expert - 1 pt", fontsize=9)
    rows = result["rounds"]
    rounds = [r["round"] for r in rows]
    for prefix, label in (("cascade_", "fitted threshold"), ("fixed_threshold_", f"fixed {result['fixed_threshold']:g}")):
        accuracy = "cascade_accuracy" if prefix == "cascade_" else "fixed_threshold_cascade_accuracy"
        right.plot(rounds, [100 * r[accuracy] for r in rows], "o-", label=f"accuracy, {label}")
        right.plot(rounds, [100 * r[f"{prefix}escalation_rate"] for r in rows], "s--", label=f"escalated, {label}")
    right.set_title("cascade on the test split", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("round")
        ax.set_ylabel("%")
        ax.set_xticks(rounds)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Learning loop on banking77: each round retrains on the traffic's feedback")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
