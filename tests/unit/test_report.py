"""The suite's verdicts: which targets are met, against which limits."""

from typing import Any

from benchmarks.report import targets
from benchmarks.suite import _saturated


def _run(p50: float, accuracy: float, fallback_rate: float = 0.0) -> dict[str, Any]:
    return {"p50_ms": p50, "accuracy": accuracy, "fallback_rate": fallback_rate}


def _report(cloud_only_fallbacks: float = 0.0, lateness_ms: float = 1.0) -> dict[str, Any]:
    return {
        "runs": {"edge_only": _run(4.0, 0.89), "cloud_only": _run(50.0, 0.927, cloud_only_fallbacks),
                 "cascade": _run(4.5, 0.921)},
        "floors": {"raw_onnx": {"paced_p50_ms": 1.0}, "grpc_echo": {"paced_p50_ms": 2.5},
                   "vllm_offline": {"p50_ms": 8.5, "rps": 400.0}},
        "generator": [{"offered_rps": r, "achieved_rps": r * 0.99, "errors": {}, "send_lateness_p99_ms": lateness_ms}
                      for r in (1000, 2000, 3000)],
        "step_response": {"capacity_rps": 120.0},
    }


def test_targets_are_judged_against_limits_from_the_same_run() -> None:
    t = targets(_report())
    assert t["cascade p50 <= 1.2 x edge_only p50"]["met"] and t["cascade p50 <= 1.2 x edge_only p50"]["limit"] == 4.8
    assert t["cascade accuracy >= cloud_only - 1 pt"]["met"]
    assert t["generator sustains >= 2000 req/s offered"]["value"] == 3000
    # Ratios to physical floors are reported, never judged.
    assert t["edge_only p50 / floor (paced raw ONNX + paced gRPC echo p50)"] == {
        "value": 4.0, "limit": 3.5, "ratio": 4.0 / 3.5, "met": None}
    assert t["cloud capacity served / vLLM offline rps"]["ratio"] == 0.3


def test_a_degraded_baseline_or_a_late_generator_meets_nothing() -> None:
    # cloud_only partly answered by the student is no baseline for the accuracy target.
    assert not targets(_report(cloud_only_fallbacks=0.2))["cascade accuracy >= cloud_only - 1 pt"]["met"]
    # A generator sending 5 ms late adds 5 ms to what it measures: not sustained.
    assert targets(_report(lateness_ms=5.0))["generator sustains >= 2000 req/s offered"]["value"] == 0.0


def test_saturation_is_the_cloud_failing_to_answer() -> None:
    assert not _saturated({"fallback_rate": 0.01, "errors": {}})
    assert _saturated({"fallback_rate": 0.2, "errors": {}})
    assert _saturated({"fallback_rate": 0.0, "errors": {"UNAVAILABLE": 1}})
