"""Each device's daily feedback quota: how many records a device may store per UTC day.

The counts live in memory, but the first batch of each day loads them from the feedback store
(`FeedbackStore.device_counts`), so that a restart (or a new replica) neither forgets nor
double-counts what a device already stored today.
"""

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from datetime import date, datetime, timezone

from cloud.errors import QuotaExceeded

DEVICE_QUOTA_PER_DAY = 20_000

# Records stored on a UTC day per device id. The owner supplies it, bounded and with its own
# errors (the servicer's timeout and StoreUnavailable), so this module touches no store or thread.
CountLoader = Callable[[date], Awaitable[Mapping[str, int]]]


def utc_today() -> date:
    return datetime.now(timezone.utc).date()


class DeviceQuota:
    """Charges batches against a per-device quota of `per_day` records per UTC day."""

    def __init__(self, load: CountLoader, per_day: int = DEVICE_QUOTA_PER_DAY,
                 today: Callable[[], date] = utc_today) -> None:
        """`load(day)`: the records each device stored on `day`, read once per day.
        `today`: the current UTC date (injectable for tests)."""
        self._load = load
        self._per_day = per_day
        self._today = today
        self._day: date | None = None  # the day `_used` counts
        self._used: Counter[str] = Counter()
        # One load at a time: the first batches of a day (a fleet reconnecting) would otherwise
        # each scan the whole day of the store.
        self._loading = asyncio.Lock()

    async def charge(self, device: str, count: int) -> date:
        """Counts `count` records against `device`'s quota of today (UTC), which it returns,
        or QuotaExceeded. Called before storing, so that concurrent batches cannot both pass."""
        today = self._today()
        if self._day != today:
            async with self._loading:
                if self._day != today:  # not loaded by a batch this one waited for
                    counts = await self._load(today)  # errors propagate: nothing is charged
                    self._day, self._used = today, Counter(counts)
        used = self._used[device]
        if used + count > self._per_day:
            raise QuotaExceeded(f"device {device!r} stored {used} feedback records today (UTC): {count} more would pass "
                                f"its quota of {self._per_day} records per day (fleet.device_quota_per_day)")
        self._used[device] += count
        return today

    def refund(self, device: str, count: int, day: date) -> None:
        """Gives back `count` records charged on `day` that were not stored (duplicates, or a
        failed write): the quota counts what is stored. A refund from a day since rolled over
        is dropped, since that day's counts are gone and today's must not shrink."""
        if day == self._day:
            self._used[device] -= count

    def used(self, device: str) -> int:
        """Records charged to `device` on the day last loaded."""
        return self._used[device]
