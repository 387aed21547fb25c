"""Out of scope as one more answer: a virtual class beside a classifier's own.

The boundary is a logit for an extra "out of scope" class, appended to the classifier's
temperature-scaled logits before the softmax. It needs no out-of-scope training data: it is
fitted on held-out texts of known intents, as the value below which their largest scaled
logit falls for a chosen share of them (`known_rejection`). A text that excites no intent
more than that answers out of scope, and its probability is the class's softmax mass: the
edge's policy treats it like any other answer (confident: local; unsure: escalate).

If the model has a class of the same label (the task's data holds out-of-scope examples),
the virtual class's mass is added to it. Numpy only: the edge, the expert and training share it.
"""

import numpy as np

from tandem.contract import OutOfScope


def fit_boundary(scaled_logits: np.ndarray, label: str, known_rejection: float) -> OutOfScope:
    """The boundary that answers `label` for a `known_rejection` share of held-out known-intent
    texts, given their temperature-scaled logits."""
    logit = float(np.quantile(scaled_logits.max(axis=-1), known_rejection))
    return OutOfScope(label=label, logit=logit, known_rejection=known_rejection)


def answer_labels(labels: list[str], boundary: OutOfScope | None) -> list[str]:
    """The labels `probabilities` scores: the model's, then the out-of-scope label if it is not one."""
    if boundary is None or boundary.label in labels:
        return list(labels)
    return [*labels, boundary.label]


def probabilities(scaled_logits: np.ndarray, labels: list[str], boundary: OutOfScope | None) -> np.ndarray:
    """Softmax over the model's classes and the out-of-scope class, in `answer_labels` order."""
    z = scaled_logits
    if boundary is not None:
        z = np.concatenate([z, np.full((*z.shape[:-1], 1), boundary.logit, dtype=z.dtype)], axis=-1)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    if boundary is not None and boundary.label in labels:
        p[..., labels.index(boundary.label)] += p[..., -1]
        p = p[..., :-1]
    return p
