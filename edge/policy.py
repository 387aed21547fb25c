"""The escalation policy: local answer or cloud, decided from calibrated confidence.

Every decision carries its reason, which the daemon returns and counts in metrics. The
threshold is the serving student's own, from its signed manifest (`OperatingPoint`): the one
fitted for the trainer's objective, or in risk mode the one certified for the configured
epsilon; `policy.threshold` pins one instead. A request is decided at the threshold of the
student that answered it, so a swap changes model and threshold together.
"""

import bisect
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from edge.config import PolicyConfig
from tandem.contract import Manifest, OperatingPoint, RiskThreshold

log = logging.getLogger(__name__)

# Decision reasons (stable strings: they are metric label values and API output).
CONFIDENT = "confident"
BELOW_THRESHOLD = "below_threshold"
BELOW_RISK_THRESHOLD = "below_risk_threshold"
RISK_UNCERTIFIED = "risk_uncertified"  # risk mode, and the student certifies no threshold for epsilon
BELOW_TARGET_QUANTILE = "below_target_quantile"
BUDGET_EXHAUSTED = "budget_exhausted"
EDGE_ONLY = "edge_only"
CLOUD_ONLY = "cloud_only"

# The threshold of a student without an operating point (artifacts from before fitted
# thresholds, tests' tiny ones) where the config pins none: the edge's default until then.
FALLBACK_THRESHOLD = 0.5
# Cutoffs adopted per task and kept: the serving student's, and replaced ones still answering
# their queue, whose requests must not make the policy adopt (and log) them again.
RECENT_CUTOFFS = 4


@dataclass(frozen=True)
class Decision:
    escalate: bool
    reason: str


@dataclass(frozen=True)
class Cutoff:
    """Where a policy escalates for one student: below `threshold` (math.inf: every answer), as `reason`."""

    threshold: float
    reason: str


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def try_take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class WindowQuantile:
    """Exact quantiles of the last `size` values.

    A sorted list beside a FIFO: O(size) per insert, which for a few thousand
    floats is a memmove of microseconds, and exact, unlike streaming sketches.
    """

    def __init__(self, size: int) -> None:
        self._fifo: deque[float] = deque()
        self._sorted: list[float] = []
        self._size = size

    def __len__(self) -> int:
        return len(self._fifo)

    def add(self, value: float) -> None:
        if len(self._fifo) == self._size:
            old = self._fifo.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._fifo.append(value)
        bisect.insort(self._sorted, value)

    def quantile(self, q: float) -> float:
        """The smallest value with at least a share `q` of the window at or below it."""
        if not self._sorted:
            raise ValueError("quantile of an empty window")
        return self._sorted[max(math.ceil(q * len(self._sorted)) - 1, 0)]


def cutoff(cfg: PolicyConfig, manifest: Manifest) -> Cutoff:
    """Where `cfg` escalates for the student `manifest` describes; logs which threshold it is,
    as a warning where it is not one fitted to the student."""
    name = f"{manifest.task} version {manifest.version}"
    point = manifest.operating_point
    if cfg.mode == "edge_only":
        return Cutoff(0.0, EDGE_ONLY)
    if cfg.mode == "cloud_only":
        return Cutoff(math.inf, CLOUD_ONLY)
    if cfg.mode == "risk":
        assert cfg.epsilon is not None  # PolicyConfig requires it in risk mode
        return _risk_cutoff(name, point, cfg.epsilon)
    if cfg.threshold is not None:
        log.info("%s: escalating below the pinned policy.threshold %g", name, cfg.threshold)
        return Cutoff(cfg.threshold, BELOW_THRESHOLD)
    if point is None:
        log.warning("%s carries no fitted threshold (manifest operating_point) and policy.threshold pins none: "
                    "escalating below the fallback %g", name, FALLBACK_THRESHOLD)
        return Cutoff(FALLBACK_THRESHOLD, BELOW_THRESHOLD)
    log.info("%s: escalating below its fitted threshold %g (objective %s, target %g)",
             name, point.threshold, point.objective, point.target)
    return Cutoff(point.threshold, BELOW_THRESHOLD)


def risk_entry(point: OperatingPoint | None, epsilon: float) -> RiskThreshold | None:
    """The entry of `point.risk` with the largest epsilon at most `epsilon` (its bound is then
    within the configured one); None if there is none."""
    entries = [] if point is None else [entry for entry in point.risk if entry.epsilon <= epsilon]
    return max(entries, key=lambda entry: entry.epsilon, default=None)


def _risk_cutoff(name: str, point: OperatingPoint | None, epsilon: float) -> Cutoff:
    entry = risk_entry(point, epsilon)
    if point is None or entry is None or entry.threshold is None:
        why = ("carries no operating point" if point is None else
               f"certifies no threshold for an error of at most {epsilon:g} among local answers")
        log.warning("%s %s: risk mode escalates every request (reason %s)", name, why, RISK_UNCERTIFIED)
        return Cutoff(math.inf, RISK_UNCERTIFIED)
    log.info("%s: escalating below %g, certified for an error of at most %g among local answers with "
             "probability %g (policy.epsilon %g)", name, entry.threshold, entry.epsilon, 1 - point.risk_delta, epsilon)
    return Cutoff(entry.threshold, BELOW_RISK_THRESHOLD)


class Policy:
    """One task's decisions, each at the threshold of the student whose answer it decides.

    `on_threshold` hears each newly adopted threshold (the daemon's gauge)."""

    def __init__(self, cfg: PolicyConfig, clock: Callable[[], float] = time.monotonic,
                 on_threshold: Callable[[float], None] = lambda threshold: None) -> None:
        self._cfg = cfg
        self._window = WindowQuantile(cfg.window)
        self._bucket = TokenBucket(cfg.budget_per_s, cfg.budget_burst, clock) if cfg.budget_per_s else None
        self._on_threshold = on_threshold
        self._recent: deque[tuple[Manifest, Cutoff]] = deque(maxlen=RECENT_CUTOFFS)

    def adopt(self, manifest: Manifest) -> Cutoff:
        """The cutoff for `manifest`'s student, worked out (logged, reported) once per student
        served: the same version swapped in again is adopted again."""
        for seen, found in self._recent:
            if seen is manifest:  # identity: one Student holds one manifest for its life
                return found
        found = cutoff(self._cfg, manifest)
        self._recent.append((manifest, found))
        self._on_threshold(found.threshold)
        return found

    def decide(self, confidence: float, manifest: Manifest) -> Decision:
        """Escalate or not, for an answer of `manifest`'s student with `confidence`."""
        wanted = self._wanted(confidence, self.adopt(manifest))
        if wanted.escalate and self._bucket is not None and not self._bucket.try_take():
            return Decision(False, BUDGET_EXHAUSTED)
        return wanted

    def _wanted(self, confidence: float, cut: Cutoff) -> Decision:
        cfg = self._cfg
        if cfg.mode == "edge_only":
            return Decision(False, EDGE_ONLY)
        if cfg.mode == "cloud_only":
            return Decision(True, CLOUD_ONLY)
        if cfg.mode == "target_rate":
            self._window.add(confidence)
            if len(self._window) >= cfg.min_samples:
                quantile = self._window.quantile(cfg.target_rate)
                return Decision(True, BELOW_TARGET_QUANTILE) if confidence < quantile else Decision(False, CONFIDENT)
        if confidence < cut.threshold:
            return Decision(True, cut.reason)
        return Decision(False, CONFIDENT)
