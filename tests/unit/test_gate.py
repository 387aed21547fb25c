import pytest

from cloud.training.gate import passes


@pytest.mark.parametrize(
    "candidate, promoted, min_gain, expected",
    [
        (0.10, None, 0.005, True),  # nothing promoted: any candidate that answers
        (815 / 1000, 810 / 1000, 0.005, True),  # exactly the gain: 0.815 - 0.81 < 0.005 in floats
        (814 / 1000, 810 / 1000, 0.005, False),
        (0.900, 0.900, 0.0, True),  # no gain required: a tie promotes
        (0.899, 0.900, 0.0, False),
    ],
)
def test_gate_needs_the_configured_gain_over_the_promoted_version(
    candidate: float, promoted: float | None, min_gain: float, expected: bool
) -> None:
    assert passes(candidate, promoted, min_gain) is expected
