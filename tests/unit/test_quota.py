"""The per-device daily feedback quota (`cloud.feedback.quota.DeviceQuota`), with a settable
day and an in-memory loader in place of the feedback store."""

import asyncio
from collections import Counter
from datetime import date

import pytest

from cloud.errors import QuotaExceeded, StoreUnavailable
from cloud.feedback.quota import DeviceQuota

DAY1, DAY2 = date(2024, 3, 1), date(2024, 3, 2)


class Store:
    """What each device stored per day; records the days it was asked for."""

    def __init__(self, counts: dict[date, Counter[str]] | None = None) -> None:
        self.counts = counts or {}
        self.asked: list[date] = []

    async def load(self, day: date) -> Counter[str]:
        self.asked.append(day)
        await asyncio.sleep(0)  # let concurrent charges interleave, as a real store read does
        return Counter(self.counts.get(day, {}))


class Day:
    def __init__(self, day: date) -> None:
        self.day = day

    def __call__(self) -> date:
        return self.day


async def test_charges_up_to_the_quota_and_refuses_past_it_with_its_message() -> None:
    quota = DeviceQuota(Store().load, per_day=3, today=Day(DAY1))
    assert await quota.charge("kiosk-a", 2) == DAY1
    with pytest.raises(QuotaExceeded) as info:
        await quota.charge("kiosk-a", 2)
    assert str(info.value) == ("device 'kiosk-a' stored 2 feedback records today (UTC): 2 more would pass its quota "
                               "of 3 records per day (fleet.device_quota_per_day)")
    assert quota.used("kiosk-a") == 2  # a refused batch is not charged
    await quota.charge("kiosk-a", 1)  # exactly the quota passes
    await quota.charge("kiosk-b", 3)  # per device
    assert (quota.used("kiosk-a"), quota.used("kiosk-b")) == (3, 3)


async def test_loads_what_devices_stored_once_per_day() -> None:
    store, today = Store({DAY1: Counter({"kiosk-a": 2}), DAY2: Counter({"kiosk-b": 1})}), Day(DAY1)
    quota = DeviceQuota(store.load, per_day=3, today=today)
    with pytest.raises(QuotaExceeded, match="stored 2 feedback records today"):  # a restart remembers
        await quota.charge("kiosk-a", 2)
    await quota.charge("kiosk-a", 1)
    assert store.asked == [DAY1]
    today.day = DAY2  # a new UTC day: counts from the store again, not carried over
    await quota.charge("kiosk-a", 3)
    assert quota.used("kiosk-b") == 1 and store.asked == [DAY1, DAY2]


async def test_concurrent_first_batches_keep_one_load_and_cannot_both_pass() -> None:
    store = Store({DAY1: Counter({"kiosk-a": 1})})
    quota = DeviceQuota(store.load, per_day=3, today=Day(DAY1))
    results = await asyncio.gather(quota.charge("kiosk-a", 2), quota.charge("kiosk-a", 2), return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["QuotaExceeded", "date"]
    assert quota.used("kiosk-a") == 3  # the first load is kept; the second batch's load does not reset it


async def test_refunds_give_back_what_was_not_stored_on_the_day_it_was_charged() -> None:
    today = Day(DAY1)
    quota = DeviceQuota(Store().load, per_day=3, today=today)
    day = await quota.charge("kiosk-a", 3)
    quota.refund("kiosk-a", 2, day)  # duplicates, or a failed write
    await quota.charge("kiosk-a", 2)
    assert quota.used("kiosk-a") == 3
    today.day = DAY2
    await quota.charge("kiosk-a", 1)
    quota.refund("kiosk-a", 3, day)  # a refund from yesterday leaves today's count alone
    assert quota.used("kiosk-a") == 1


async def test_a_failed_load_charges_nothing_and_is_retried() -> None:
    calls = 0

    async def load(day: date) -> Counter[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreUnavailable("feedback store failed: OSError: gone")
        return Counter()

    quota = DeviceQuota(load, per_day=3, today=Day(DAY1))
    with pytest.raises(StoreUnavailable):
        await quota.charge("kiosk-a", 1)
    assert await quota.charge("kiosk-a", 3) == DAY1 and calls == 2
