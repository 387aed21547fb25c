"""A throttle for repeated audit entries: at most one entry per key every `every_s` seconds.

A caller that repeats a refused request in a loop must not grow the hash-chained audit log at
its request rate, yet the log must still show how often it tried: each entry that gets through
carries the number of occurrences suppressed since the previous one of its key.
"""

import math
import time
from collections.abc import Callable, Hashable


class AuditThrottle:
    """Decides, per key, whether an audit entry is appended now, and with what `suppressed`
    count. Pure logic: the caller appends."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        """`clock`: seconds on a monotonic scale (injectable for tests)."""
        self.every_s = every_s
        self._clock = clock
        self._last: dict[Hashable, tuple[float, int]] = {}  # key -> (last entry, occurrences suppressed since)

    def admit(self, key: Hashable) -> int | None:
        """None if an entry of `key` went through less than `every_s` ago (this occurrence is
        counted as suppressed); otherwise how many were suppressed since that entry, and the
        window restarts now. It restarts whether or not the caller's append then succeeds, so
        that a failing audit log is not retried at the request rate either."""
        now = self._clock()
        last, suppressed = self._last.get(key, (-math.inf, 0))
        if now - last < self.every_s:
            self._last[key] = (last, suppressed + 1)
            return None
        self._last[key] = (now, 0)
        return suppressed
