"""Cheap altered copies of train texts, for the teacher to label softly.

A distilled student learns the teacher's whole output distribution, not just its argmax; texts
near the train texts, but not in them, show it more of that distribution. They need no true
label (the teacher's soft labels are the target), so crude edits are fine.
"""

import numpy as np

WORD_DROP = 0.15  # each word's chance to be dropped in a drop edit


def augment(texts: list[str], copies: int, seed: int) -> list[str]:
    """`copies` altered versions of each text, in order (all of text 0's, then text 1's, ...):
    words dropped, two neighbouring words swapped, or the text's first half joined to the
    second half of another text."""
    rng = np.random.default_rng(seed)
    words = [t.split() for t in texts]
    out = []
    for w in words:
        for _ in range(copies):
            edit = rng.integers(3)
            if edit == 0:
                kept = [x for x in w if rng.random() >= WORD_DROP]
                out.append(" ".join(kept or w))
            elif edit == 1 and len(w) > 1:
                i = int(rng.integers(len(w) - 1))
                out.append(" ".join(w[:i] + [w[i + 1], w[i]] + w[i + 2 :]))
            else:
                other = words[int(rng.integers(len(words)))]
                out.append(" ".join(w[: (len(w) + 1) // 2] + other[len(other) // 2 :]))
    return out
