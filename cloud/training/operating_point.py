"""A student's escalation thresholds: the cascade arithmetic, the fitted threshold, and the
risk-controlled thresholds (Learn-then-Test).

Everywhere here, as on the edge, an answer is kept locally when `confidence >= threshold` and
escalated when `confidence < threshold`. Fitted thresholds are confidences observed on the
held-out split, so that the same comparison, in float32 or float64, escalates exactly the
texts it escalated there. Numpy only: benchmarks import it too.
"""

import math

import numpy as np

from cloud.training.config import OperatingPointConfig
from tandem.contract import OperatingPoint, RiskThreshold


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
    accuracy = (student_ok.sum() + _gains(order, student_ok, expert_ok)) / n
    target = expert_ok.mean() - tolerance
    k = int(np.argmax(accuracy >= target - 1e-12))  # exists: k = n gives the expert's accuracy
    return k / n


def _gains(order: np.ndarray, student_ok: np.ndarray, expert_ok: np.ndarray) -> np.ndarray:
    """Correct answers gained by escalating the first k queries of `order`, for k = 0..n."""
    return np.concatenate([[0], np.cumsum(expert_ok[order].astype(int) - student_ok[order].astype(int))])


def candidate_thresholds(confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every threshold that escalates a different set of `confidence`, ascending, and how many
    each escalates: the distinct confidences (the lowest escalates none), then one just above the
    highest (escalates all; capped at 1, which keeps answers of confidence exactly 1)."""
    values = np.unique(confidence)  # sorted
    above = np.nextafter(values[-1], np.inf) if values[-1] < 1 else values[-1]
    thresholds = np.append(values, above)
    return thresholds, np.searchsorted(np.sort(confidence), thresholds, side="left")


def fit_operating_point(
    confidence: np.ndarray, student_ok: np.ndarray, expert_ok: np.ndarray,
    calib_confidence: np.ndarray, calib_ok: np.ndarray, cfg: OperatingPointConfig,
) -> OperatingPoint:
    """The student's operating point: a threshold fitted on the validation split for
    `cfg.objective`, and the risk-controlled thresholds certified on the calibration split.

    `confidence`, `student_ok`: the edge's confidence in, and the correctness of, the student's
    answer to each validation text (calibrated, out of scope included, as the edge computes them);
    `expert_ok`: whether the expert answers it correctly. `calib_*`: the same on the calibration
    split, which must be apart from validation. The threshold is a validation confidence, so
    `fitted` (what it achieves there) is exactly what `confidence < threshold` gives.
    """
    _check_lengths(confidence=confidence, student_ok=student_ok, expert_ok=expert_ok)
    _check_lengths(calib_confidence=calib_confidence, calib_ok=calib_ok)
    n = len(confidence)
    thresholds, escalated = candidate_thresholds(confidence)
    if cfg.objective == "escalation_rate":
        target = cfg.escalation_rate
        # The closest achievable share (ties in confidence escalate together); a tie goes to fewer escalations.
        pick = int(np.argmin(np.abs(escalated / n - target)))
    else:
        target = max(0.0, float(expert_ok.mean()) - cfg.accuracy_below_expert)
        gains = _gains(np.argsort(confidence, kind="stable"), student_ok, expert_ok)
        accuracy = (student_ok.sum() + gains[escalated]) / n
        reached = accuracy >= target - 1e-12  # accuracies are k/n: equality must not fail on rounding
        pick = int(np.argmax(reached)) if reached.any() else len(thresholds) - 1
    threshold = float(thresholds[pick])
    accuracy, rate = cascade_accuracy(confidence, student_ok, expert_ok, threshold)
    fitted = {"escalation_rate": rate, "cascade_accuracy": accuracy, "expert_accuracy": float(expert_ok.mean()),
              "student_accuracy": float(student_ok.mean()), "examples": float(n)}
    return OperatingPoint(
        threshold=threshold, objective=cfg.objective, target=target, fitted=fitted, risk_delta=cfg.risk_delta,
        risk_examples=len(calib_confidence),
        risk=risk_thresholds(calib_confidence, calib_ok, sorted(cfg.risk_epsilons), cfg.risk_delta),
    )


def _check_lengths(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f"need one value per text, at least one text: lengths {lengths}")


def risk_thresholds(confidence: np.ndarray, correct: np.ndarray, epsilons: list[float], delta: float) -> list[RiskThreshold]:
    """For each epsilon, the lowest threshold t certified to keep the error rate among kept
    answers, R(t) = P(wrong | confidence >= t), at most epsilon with probability >= 1 - delta
    over the draw of the calibration split: Learn-then-Test (Angelopoulos et al., 2021).

    The test of "R(t) > epsilon" at one t: given how many calibration answers t keeps, n_t,
    those answers are iid draws from the answers of confidence >= t, so their errors k_t are
    Binomial(n_t, R(t)), and p_t = P(Binomial(n_t, epsilon) <= k_t) is a valid p-value (exact,
    no normal approximation): when R(t) > epsilon, P(p_t <= delta) <= delta.

    Many thresholds are tested, so they are tested in a fixed sequence, from the highest down
    (the least risky first), each at level delta, stopping at the first that is not rejected.
    This controls the family-wise error at delta: a threshold with R(t) > epsilon is certified
    only if the first such threshold in the sequence is rejected, which has probability <= delta;
    so the lowest certified threshold, which is returned, has R(t) <= epsilon with probability
    >= 1 - delta. The candidates are the distinct calibration confidences: between two of them
    the kept set, and so p_t, does not change, so this tests every t in [0, 1] in descending order.

    A threshold that keeps fewer than log(delta) / log(1 - epsilon) answers cannot be certified
    even with no error, and would end the sequence at once: the sequence starts at the highest
    threshold keeping that many for the smallest epsilon, the same start for every epsilon: a
    larger epsilon then never gets a higher threshold, and does not start where a single error
    among its first few answers would end its sequence. The start depends only on counts of
    confidences, not on errors; it is exact when R does not fall as t falls (less confident
    answers are no more often right), the usual case. None: no threshold is certified, and
    every answer escalates.
    """
    _check_lengths(confidence=confidence, correct=correct)
    if not 0 < delta < 1 or not all(0 < e < 1 for e in epsilons):
        raise ValueError(f"delta {delta} and epsilons {epsilons} must be in (0, 1)")
    thresholds, escalated = candidate_thresholds(confidence)
    kept = len(confidence) - escalated[:-1]  # the last candidate keeps nothing
    order = np.argsort(confidence, kind="stable")
    errors = np.concatenate([np.cumsum((~correct[order].astype(bool))[::-1])[::-1], [0]])[escalated[:-1]]
    start = math.ceil(math.log(delta) / math.log(1 - min(epsilons)))
    tested = np.flatnonzero(kept >= start)[::-1]  # descending thresholds, from the start down
    return [RiskThreshold(epsilon=e, threshold=_lowest_certified(thresholds, kept, errors, tested, e, delta))
            for e in epsilons]


def _lowest_certified(thresholds: np.ndarray, kept: np.ndarray, errors: np.ndarray, tested: np.ndarray,
                      epsilon: float, delta: float) -> float | None:
    certified = None
    for i in tested:
        if binomial_cdf(int(errors[i]), int(kept[i]), epsilon) > delta:
            break
        certified = float(thresholds[i])
    return certified


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (lgamma) so that large n neither
    overflows nor underflows."""
    if k >= n:
        return 1.0
    if k < 0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))
