"""Exponential backoff with jitter, for loops that retry a failing call."""

import random
from collections.abc import Callable
from typing import Literal

Jitter = Literal["full", "equal"]


class Backoff:
    """Waits that double after each failure, from `initial_s` up to `max_s`, and start over
    after a success.

    Jitter keeps clients that failed together (a cloud outage) from all retrying at the same
    instant: "full" draws each wait from [0, backoff], "equal" from [backoff / 2, backoff],
    which spreads a little less but never retries at once.
    """

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        jitter: Jitter = "equal",
        chance: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError(f"need 0 < initial_s ({initial_s}) <= max_s ({max_s})")
        self._initial_s = initial_s
        self._max_s = max_s
        self._jitter = jitter
        self._chance = chance
        self._backoff_s = initial_s

    def next_wait_s(self) -> float:
        """After a failure: how long to wait before the next attempt. Doubles the backoff."""
        backoff_s = self._backoff_s
        self._backoff_s = min(backoff_s * 2, self._max_s)
        if self._jitter == "full":
            return backoff_s * self._chance()
        return backoff_s * (0.5 + self._chance() / 2)

    def reset(self) -> None:
        """After a success: the next failure waits about `initial_s` again."""
        self._backoff_s = self._initial_s
