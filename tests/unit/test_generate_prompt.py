"""The generate expert's pure logic: its prompts, retrieval ranking and index cache (with a
stand-in embedder), runner-up labels, candidates, and scores -> distribution."""

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from cloud.experts.generate import (
    OUT_OF_SCOPE_DESCRIPTION,
    Step,
    candidate_labels,
    normalised,
    runner_up_labels,
    system_prompt,
    user_message,
)
from cloud.experts.retrieval import ExampleIndex, Neighbour, index_key, load_index
from tandem.contract import OUT_OF_SCOPE
from tandem.tasks import Example, Task, banking77

LABELS = {"card_arrival": "an ordered card has not arrived", "card_linking": "", "lost_card": "the card was lost"}


def _task(**fields: object) -> Task:
    return Task(name="t", train=Path("unused.csv"), test=Path("unused.csv"), labels=LABELS, **fields)


class LetterEmbedder:
    """Counts of the letters a, b, c, normalised: texts of the same letters are neighbours."""

    def __init__(self, fingerprint: str = "letters-1") -> None:
        self.fingerprint = fingerprint
        self.encoded = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.encoded += len(texts)
        counts = np.array([[t.count(c) + 1e-3 for c in "abc"] for t in texts], dtype=np.float32)
        return counts / np.linalg.norm(counts, axis=1, keepdims=True)


EXAMPLES = [Example("aaa", "x"), Example("bbb", "y"), Example("aab", "x"), Example("ccc", "z")]


def test_names_prompt_lists_the_names_and_describes_only_out_of_scope() -> None:
    lines = system_prompt(_task(), "names").splitlines()[1:]
    assert lines == ["- card_arrival", "- card_linking", "- lost_card", f"- {OUT_OF_SCOPE}: {OUT_OF_SCOPE_DESCRIPTION}"]


def test_descriptions_prompt_describes_the_labels_that_have_one() -> None:
    lines = system_prompt(_task(), "descriptions").splitlines()[1:]
    assert lines == ["- card_arrival: an ordered card has not arrived", "- card_linking", "- lost_card: the card was lost",
                     f"- {OUT_OF_SCOPE}: {OUT_OF_SCOPE_DESCRIPTION}"]


def test_a_task_that_names_and_describes_its_out_of_scope_label_keeps_its_words() -> None:
    task = Task(name="t", train=Path("u.csv"), test=Path("u.csv"), out_of_scope="other",
                labels={"greet": "a greeting", "other": "anything but a greeting"})
    assert system_prompt(task, "names").splitlines()[1:] == ["- greet", "- other: anything but a greeting"]


def test_the_shipped_banking77_task_describes_every_intent() -> None:
    descriptions = banking77().descriptions()
    assert len(descriptions) == 78
    assert [name for name, text in descriptions.items() if not text] == [OUT_OF_SCOPE]


def test_retrieved_examples_come_before_the_text_the_most_similar_last() -> None:
    neighbours = [Neighbour(Example("closest", "a"), 0.9), Neighbour(Example(" farther ", "b"), 0.5)]
    message = user_message("my text", neighbours)
    assert message.index("Message: farther\nIntent: b") < message.index("Message: closest\nIntent: a")
    assert message.endswith("Message: closest\nIntent: a\n\nMessage: my text\nIntent:")
    assert user_message("my text", []) == "my text"


def test_nearest_ranks_by_similarity_and_caps_at_the_index_size() -> None:
    embedder = LetterEmbedder()
    index = ExampleIndex(EXAMPLES, embedder.encode([e.text for e in EXAMPLES]))
    nearest = index.nearest(embedder.encode(["aaab"])[0], 2)
    assert [n.example.text for n in nearest] == ["aab", "aaa"] and nearest[0].similarity > nearest[1].similarity
    assert len(index.nearest(embedder.encode(["a"])[0], 10)) == len(EXAMPLES)


def test_the_index_is_embedded_once_then_read_from_the_cache(tmp_path: Path) -> None:
    embedder = LetterEmbedder()
    first = load_index(EXAMPLES, embedder, tmp_path)
    again = load_index(EXAMPLES, embedder, tmp_path)
    assert embedder.encoded == len(EXAMPLES)
    np.testing.assert_array_equal(first.vectors, again.vectors)


def test_the_cache_key_follows_the_texts_and_the_model(tmp_path: Path) -> None:
    key = index_key(EXAMPLES, LetterEmbedder())
    assert index_key(EXAMPLES, LetterEmbedder("letters-2")) != key
    assert index_key([*EXAMPLES[:3], Example("ccd", "z")], LetterEmbedder()) != key
    assert index_key([Example(e.text, "relabelled") for e in EXAMPLES], LetterEmbedder()) == key  # labels are not embedded


@pytest.mark.parametrize("content", [b"", b"torn", b"\x93NUMPY\x01\x00v\x00"])
def test_a_damaged_cache_file_is_embedded_again(tmp_path: Path, content: bytes) -> None:
    embedder = LetterEmbedder()
    (tmp_path / f"{index_key(EXAMPLES, embedder)}.npy").write_bytes(content)
    index = load_index(EXAMPLES, embedder, tmp_path)
    assert embedder.encoded == len(EXAMPLES) and index.vectors.shape == (len(EXAMPLES), 3)


def test_runner_ups_follow_the_most_probable_branches_the_answer_passed() -> None:
    labels = ["card_arrival", "card_linking", "lost_card", "lost_phone", "top_up"]
    # The answer "card_arrival": "card" then "_arrival"; at step one "lost" was likelier than "top".
    steps = [Step("", math.log(0.5), {"lost": math.log(0.3), "top": math.log(0.2), "x": -math.inf}),
             Step("card", math.log(0.9), {"_linking": math.log(0.1)})]
    assert runner_up_labels(steps, labels) == ["lost_card", "lost_phone", "top_up", "card_linking"]


def test_candidates_are_the_answer_then_the_others_up_to_k_then_out_of_scope() -> None:
    assert candidate_labels("a", ["b", "a", OUT_OF_SCOPE, "c", "d"], OUT_OF_SCOPE, 3) == ["a", "b", "c", OUT_OF_SCOPE]
    assert candidate_labels(OUT_OF_SCOPE, ["b"], OUT_OF_SCOPE, 3) == ["b", OUT_OF_SCOPE]


def test_scores_become_a_distribution_most_probable_first() -> None:
    distribution = normalised({"a": math.log(0.1), "b": math.log(0.3), "c": -1000.0})
    assert [label for label, _ in distribution] == ["b", "a", "c"]
    assert [p for _, p in distribution] == pytest.approx([0.75, 0.25, 0.0])
    # Sequence log-probs far below zero (long labels) still normalise.
    assert normalised({"a": -900.0, "b": -901.0})[0][1] == pytest.approx(1 / (1 + math.exp(-1)))
