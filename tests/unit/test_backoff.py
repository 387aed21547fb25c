import pytest

from tandem.backoff import Backoff


def _waits(backoff: Backoff, n: int) -> list[float]:
    return [backoff.next_wait_s() for _ in range(n)]


def test_waits_double_up_to_the_cap() -> None:
    backoff = Backoff(0.5, 3.0, chance=lambda: 1.0)
    assert _waits(backoff, 5) == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_a_success_starts_over() -> None:
    backoff = Backoff(0.5, 3.0, chance=lambda: 1.0)
    _waits(backoff, 4)
    backoff.reset()
    assert _waits(backoff, 2) == [0.5, 1.0]


def test_equal_jitter_waits_at_least_half_the_backoff() -> None:
    low = Backoff(1.0, 8.0, jitter="equal", chance=lambda: 0.0)
    high = Backoff(1.0, 8.0, jitter="equal", chance=lambda: 0.999)
    assert _waits(low, 4) == [0.5, 1.0, 2.0, 4.0]
    assert all(w == pytest.approx(b * 0.9995) for w, b in zip(_waits(high, 4), [1.0, 2.0, 4.0, 8.0], strict=True))


def test_full_jitter_draws_from_zero_to_the_backoff() -> None:
    draws = iter([0.0, 0.25, 0.5])
    backoff = Backoff(2.0, 100.0, jitter="full", chance=lambda: next(draws))
    assert _waits(backoff, 3) == [0.0, 1.0, 4.0]


@pytest.mark.parametrize(("initial_s", "max_s"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_an_impossible_range_is_refused(initial_s: float, max_s: float) -> None:
    with pytest.raises(ValueError, match="initial_s"):
        Backoff(initial_s, max_s)
