"""Altered copies of train texts for the teacher to label."""

from cloud.training.augment import augment

TEXTS = ["how do I top up my card", "my card payment was declined", "what is the exchange rate today"]


def test_each_text_gets_its_copies_in_order_made_of_the_texts_words() -> None:
    out = augment(TEXTS, 3, seed=0)
    assert len(out) == 9
    words = {w for t in TEXTS for w in t.split()}
    for i, text in enumerate(out):
        assert text and set(text.split()) <= words
        # Every edit keeps the start of its own text (a drop keeps most words, a swap all, a mix the first half).
        own = TEXTS[i // 3].split()
        assert set(text.split()) & set(own)


def test_copies_are_seeded_and_differ_from_the_texts() -> None:
    assert augment(TEXTS, 4, seed=1) == augment(TEXTS, 4, seed=1) != augment(TEXTS, 4, seed=2)
    assert any(t not in TEXTS for t in augment(TEXTS, 4, seed=1))
    assert augment(TEXTS, 0, seed=0) == []
