"""The escalation policy: local answer or cloud, decided from calibrated confidence.

Every decision carries its reason, which the daemon returns and counts in metrics.
"""

import bisect
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from edge.config import PolicyConfig

# Decision reasons (stable strings: they are metric label values and API output).
CONFIDENT = "confident"
BELOW_THRESHOLD = "below_threshold"
BELOW_TARGET_QUANTILE = "below_target_quantile"
BUDGET_EXHAUSTED = "budget_exhausted"
EDGE_ONLY = "edge_only"
CLOUD_ONLY = "cloud_only"


@dataclass(frozen=True)
class Decision:
    escalate: bool
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


class Policy:
    def __init__(self, cfg: PolicyConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._cfg = cfg
        self._window = WindowQuantile(cfg.window)
        self._bucket = TokenBucket(cfg.budget_per_s, cfg.budget_burst, clock) if cfg.budget_per_s else None

    def decide(self, confidence: float) -> Decision:
        wanted = self._wanted(confidence)
        if wanted.escalate and self._bucket is not None and not self._bucket.try_take():
            return Decision(False, BUDGET_EXHAUSTED)
        return wanted

    def _wanted(self, confidence: float) -> Decision:
        cfg = self._cfg
        if cfg.mode == "edge_only":
            return Decision(False, EDGE_ONLY)
        if cfg.mode == "cloud_only":
            return Decision(True, CLOUD_ONLY)
        if cfg.mode == "target_rate":
            self._window.add(confidence)
            if len(self._window) >= cfg.min_samples:
                cut = self._window.quantile(cfg.target_rate)
                return Decision(True, BELOW_TARGET_QUANTILE) if confidence < cut else Decision(False, CONFIDENT)
        if confidence < cfg.threshold:
            return Decision(True, BELOW_THRESHOLD)
        return Decision(False, CONFIDENT)
