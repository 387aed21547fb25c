"""The promotion gate on synthetic outcomes: escalations needed for the target, and per-label regressions."""

import numpy as np
import pytest

from cloud.training.config import DistillConfig
from cloud.training.gate import Outcomes, judge, regressed_labels

N_LABELS, PER_LABEL = 10, 20
LABELS = np.repeat(np.arange(N_LABELS), PER_LABEL)
NAMES = [f"intent_{i}" for i in range(N_LABELS)]
EXPERT_OK = np.ones(len(LABELS), bool)  # target: the expert's 100%, minus gate_accuracy_below_expert (0 here)


def _student(wrong: np.ndarray, seed: int = 0) -> Outcomes:
    """Wrong on `wrong` (indices), and least confident there: each error costs one escalation."""
    confidence = np.random.default_rng(seed).uniform(0.6, 1.0, len(LABELS)).astype(np.float32)
    confidence[wrong] = np.linspace(0.1, 0.5, len(wrong), dtype=np.float32)
    return Outcomes(confidence, ~np.isin(np.arange(len(LABELS)), wrong))


def _judge(candidate: Outcomes, promoted: Outcomes | None, **cfg: float) -> dict:
    return judge(candidate, promoted, EXPERT_OK, LABELS, NAMES,
                 DistillConfig(gate_accuracy_below_expert=0.0, **cfg))


SPREAD = np.arange(0, 200, 10)  # 20 errors, two per label


def test_nothing_promoted_passes() -> None:
    gate = _judge(_student(SPREAD), None)
    assert gate["passed"] and gate["promoted_escalation_rate"] is None and gate["regressed_labels"] == []
    assert gate["candidate_escalation_rate"] == 0.10 and gate["target_accuracy"] == 1.0 and gate["examples"] == 200


def test_a_candidate_needing_fewer_escalations_by_the_margin_passes() -> None:
    many = np.arange(0, 180, 3)  # 60 errors, 6 per label
    gate = _judge(_student(many[:40]), _student(many), min_escalation_drop=0.1)
    assert gate["candidate_escalation_rate"] == 0.2 and gate["promoted_escalation_rate"] == 0.3
    assert gate["passed"] and gate["regressed_labels"] == []  # exactly the margin: 0.3 - 0.2 < 0.1 in floats
    assert not _judge(_student(many[:41]), _student(many), min_escalation_drop=0.1)["passed"]


def test_a_candidate_needing_more_escalations_is_refused() -> None:
    gate = _judge(_student(SPREAD), _student(SPREAD[:16]))
    assert gate["candidate_escalation_rate"] > gate["promoted_escalation_rate"] and not gate["passed"]
    assert gate["regressed_labels"] == []


def test_a_candidate_for_a_new_label_set_need_not_be_cheaper_but_must_not_regress_a_label() -> None:
    """A newly named intent has no validation texts: the old labels' cannot show what it adds."""
    same = _judge(_student(SPREAD), _student(SPREAD))
    assert not same["passed"]
    new = judge(_student(SPREAD), _student(SPREAD), EXPERT_OK, LABELS, NAMES, DistillConfig(gate_accuracy_below_expert=0.0),
                new_label_set=True)
    assert new["passed"] and new["new_label_set"]
    lost = np.arange(60, 70)  # all ten of intent_3's first half
    regressing = judge(_student(lost), _student(SPREAD), EXPERT_OK, LABELS, NAMES,
                       DistillConfig(gate_accuracy_below_expert=0.0), new_label_set=True)
    assert not regressing["passed"] and regressing["regressed_labels"] == ["intent_3"]


def test_a_candidate_as_accurate_but_worse_at_knowing_it_is_refused() -> None:
    """Same errors, but the candidate is sure of them: the cascade must escalate far more."""
    promoted = _student(SPREAD)
    candidate = Outcomes(np.where(promoted.correct, promoted.confidence, 1.0).astype(np.float32), promoted.correct)
    gate = _judge(candidate, promoted)
    assert gate["candidate_accuracy"] == gate["promoted_accuracy"] == 0.9
    assert gate["candidate_escalation_rate"] == 1.0 and not gate["passed"]


def test_a_candidate_better_overall_that_loses_a_label_is_refused() -> None:
    # Half of intent_3's texts: 9 the promoted student gets right, and 1 it gets wrong too; it wins 1 back (70).
    gate = _judge(_student(np.arange(60, 70)), _student(SPREAD))
    assert gate["candidate_escalation_rate"] == 0.05 < gate["promoted_escalation_rate"] - gate["min_escalation_drop"]
    assert gate["regressed_labels"] == ["intent_3"] and not gate["passed"]


@pytest.mark.parametrize(
    "losses, wins, regressed",
    [
        (5, 0, True),  # p = 1/32
        (4, 0, False),  # p = 1/16
        (7, 1, True),  # p = 9/256
        (6, 1, False),  # p = 8/128
        (0, 9, False),  # better is never a regression
    ],
)
def test_regressed_labels_is_an_exact_one_sided_sign_test(losses: int, wins: int, regressed: bool) -> None:
    # One label of 13 texts: `losses` the promoted model got right, `wins` the candidate did; both right on the rest.
    promoted = np.array([True] * losses + [False] * wins + [True] * (13 - losses - wins))
    candidate = np.array([False] * losses + [True] * wins + [True] * (13 - losses - wins))
    labels = np.full(13, 4)
    assert regressed_labels(candidate, promoted, labels, 0.05) == ([4] if regressed else [])


def test_texts_both_get_wrong_are_no_evidence() -> None:
    both_wrong = np.zeros(13, bool)
    assert regressed_labels(both_wrong, both_wrong, np.zeros(13, int), 0.05) == []
