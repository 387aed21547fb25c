"""A cascade's accuracy and escalation rate, computed from per-query outcomes.

Given, for each query of a split, the student's confidence and whether the student and
the expert answer it correctly, escalating the least confident queries gives the
cascade's accuracy at any escalation rate, exactly, without replaying traffic.
"""

import numpy as np


def cascade_accuracy(confidence: np.ndarray, student_ok: np.ndarray, expert_ok: np.ndarray, threshold: float) -> tuple[float, float]:
    """(accuracy, escalation rate) when queries below `threshold` go to the expert."""
    escalate = confidence < threshold
    return float(np.where(escalate, expert_ok, student_ok).mean()), float(escalate.mean())


def escalation_rate_for_target(
    confidence: np.ndarray, student_ok: np.ndarray, expert_ok: np.ndarray, tolerance: float = 0.01
) -> float:
    """The smallest share of queries to escalate (least confident first) for the cascade to
    reach the expert's accuracy minus `tolerance`."""
    n = len(confidence)
    order = np.argsort(confidence, kind="stable")
    # accuracy after escalating the k least confident = student total + gains so far
    gains = np.concatenate([[0], np.cumsum(expert_ok[order].astype(int) - student_ok[order].astype(int))])
    accuracy = (student_ok.sum() + gains) / n
    target = expert_ok.mean() - tolerance
    k = int(np.argmax(accuracy >= target - 1e-12))  # exists: k = n gives the expert's accuracy
    return k / n
