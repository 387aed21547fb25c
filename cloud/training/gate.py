"""The promotion gate: a candidate replaces the promoted student only if users pay less for it.

What users pay for is escalations: the gate compares the share of validation texts each
student must escalate for the cascade (student, expert below the threshold) to reach the target
accuracy, and refuses a candidate that is significantly worse on any single label.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from cloud.training.config import DistillConfig
from cloud.training.data import Split
from cloud.training.export import onnx_logits
from cloud.training.loop import encode
from cloud.training.operating_point import binomial_cdf, escalation_rate_for_target
from tandem.contract import LABELS_FILE, MODEL_FILE, TOKENIZER_FILE, OutOfScope
from tandem.open_set import answer_labels, probabilities


@dataclass(frozen=True)
class Outcomes:
    """An artifact's answers to a split's texts, as the edge gives them."""

    confidence: np.ndarray  # the edge's confidence: the top calibrated probability, out of scope included
    correct: np.ndarray  # whether that answer is the text's label


def artifact_outcomes(directory: Path, split: Split, label_names: list[str], fields: Mapping[str, Any]) -> Outcomes:
    """The artifact in `directory` on `split`, computed as the edge does (`edge.student.Student`):
    each text alone (int8 activations are scaled per input), through the artifact's own tokenizer
    and `max_length` (a new base model brings a new one), then `tandem.open_set.probabilities` at
    its temperature and out-of-scope boundary. `fields`: its manifest's (temperature, max_length,
    out_of_scope), before or after it is written. Answers are compared by label name, so an
    artifact with another label order is judged fairly."""
    ids = encode(Tokenizer.from_file(str(directory / TOKENIZER_FILE)), split.texts, fields["max_length"])
    own: list[str] = json.loads((directory / LABELS_FILE).read_text())
    boundary = None if fields.get("out_of_scope") is None else OutOfScope.model_validate(fields["out_of_scope"])
    logits = onnx_logits(directory / MODEL_FILE, ids, batch_size=1)
    probs = probabilities(logits / fields["temperature"], own, boundary)
    answers = np.array(answer_labels(own, boundary))[probs.argmax(-1)]
    # Test texts of the out-of-scope label carry the index after the task's labels (`data.load_splits`).
    return Outcomes(probs.max(-1), answers == np.array(answer_labels(label_names, boundary))[split.labels])


def judge(candidate: Outcomes, promoted: Outcomes | None, expert_ok: np.ndarray, labels: np.ndarray,
          label_names: list[str], cfg: DistillConfig, new_label_set: bool = False) -> dict[str, Any]:
    """Compares the candidate with the promoted student on the validation split (`labels`: each
    text's label index; `expert_ok`: whether the expert answers it correctly), measured now rather
    than trusted from a stored number that may come from another split. Passes with nothing
    promoted; otherwise only if the candidate needs at least `min_escalation_drop` fewer
    escalations for the cascade to reach the expert's accuracy minus `gate_accuracy_below_expert`,
    and no label regressed (`regressed_labels`). A candidate for a newer label set than the
    promoted one's (`new_label_set`: an operator named a new intent) need not be cheaper on the
    old labels' texts, which cannot show what it adds; it must still regress no label. Returns the
    comparison for the manifest and the audit log."""
    tolerance = cfg.gate_accuracy_below_expert
    candidate_rate = escalation_rate_for_target(candidate.confidence, candidate.correct, expert_ok, tolerance)
    promoted_rate = None if promoted is None else escalation_rate_for_target(
        promoted.confidence, promoted.correct, expert_ok, tolerance)
    regressed = [] if promoted is None else regressed_labels(candidate.correct, promoted.correct, labels,
                                                             cfg.label_alpha)
    # Rates are k/n: a drop of exactly the margin must not fail on float rounding.
    cheaper = (promoted_rate is None or new_label_set
               or promoted_rate - candidate_rate >= cfg.min_escalation_drop - 1e-9)
    return {
        "split": "val",
        "examples": len(labels),
        "expert_accuracy": float(expert_ok.mean()),
        "target_accuracy": float(expert_ok.mean()) - tolerance,
        "candidate_escalation_rate": candidate_rate,
        "promoted_escalation_rate": promoted_rate,
        "min_escalation_drop": cfg.min_escalation_drop,
        "new_label_set": new_label_set,
        "candidate_accuracy": float(candidate.correct.mean()),
        "promoted_accuracy": None if promoted is None else float(promoted.correct.mean()),
        "label_alpha": cfg.label_alpha,
        "regressed_labels": [label_names[i] for i in regressed],
        "passed": bool(cheaper and not regressed),
    }


def regressed_labels(candidate_correct: np.ndarray, promoted_correct: np.ndarray, labels: np.ndarray,
                     alpha: float) -> list[int]:
    """The labels (indices, ascending) on whose texts the candidate is significantly worse than
    the promoted model: an exact one-sided sign test (McNemar's, exact) per label on the paired
    outcomes. Of a label's texts that exactly one model gets right, the candidate loses `losses`
    and wins `wins`; with no difference between the models each is a fair coin, so the p-value is
    P(Binomial(losses + wins, 1/2) >= losses). Texts both get right or both get wrong carry no
    evidence either way."""
    regressed = []
    for label in np.unique(labels):
        rows = labels == label
        losses = int(np.sum(promoted_correct[rows] & ~candidate_correct[rows]))
        wins = int(np.sum(candidate_correct[rows] & ~promoted_correct[rows]))
        if binomial_cdf(wins, losses + wins, 0.5) <= alpha:  # P(X >= losses) = P(X <= wins) by symmetry
            regressed.append(int(label))
    return regressed
