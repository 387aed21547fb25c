"""The audit throttle (`cloud.audit.throttle.AuditThrottle`) on a settable clock."""

from cloud.audit.throttle import AuditThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_admits_the_first_entry_then_one_per_interval_counting_what_it_suppressed() -> None:
    clock = Clock()
    throttle = AuditThrottle(60.0, clock)
    key = ("kiosk-a", "PERMISSION_DENIED")
    assert throttle.admit(key) == 0
    assert [throttle.admit(key) for _ in range(3)] == [None, None, None]
    clock.now += 59.9
    assert throttle.admit(key) is None
    clock.now += 0.1  # the interval since the last entry, not since the last suppression
    assert throttle.admit(key) == 4
    assert throttle.admit(key) is None
    clock.now += 600
    assert throttle.admit(key) == 1
    assert throttle.admit(key) is None


def test_keys_are_throttled_apart() -> None:
    throttle = AuditThrottle(60.0, Clock())
    assert throttle.admit(("kiosk-a", "PERMISSION_DENIED")) == 0
    assert throttle.admit(("kiosk-a", "RESOURCE_EXHAUSTED")) == 0  # another status
    assert throttle.admit(("kiosk-b", "PERMISSION_DENIED")) == 0  # another device
    assert throttle.admit(("kiosk-a", "PERMISSION_DENIED")) is None


def test_an_interval_of_zero_admits_every_entry() -> None:
    throttle = AuditThrottle(60.0, Clock())
    assert [throttle.admit("k") for _ in range(3)] == [0, None, None]
    throttle.every_s = 0.0
    assert [throttle.admit("k") for _ in range(2)] == [2, 0]
