"""The pruned vocabulary: small, still segments unseen words, and its ids index the right rows."""

import json

from tokenizers import Tokenizer

from cloud.training.base_model import tokenizer_json
from cloud.training.vocab import prune_tokenizer

TEXTS = ["How do I top up my card?", "My card payment was declined twice", "what is the exchange rate"]


def _tokenizers() -> tuple[Tokenizer, Tokenizer, list[int]]:
    pruned, old_ids = prune_tokenizer(tokenizer_json(None), TEXTS)
    tokenizers = Tokenizer.from_str(tokenizer_json(None).decode()), Tokenizer.from_str(pruned.decode())
    for tok in tokenizers:
        tok.no_padding()  # the file pads to 128: the edge and training pad per batch
    return *tokenizers, old_ids


def test_the_texts_encode_to_the_same_pieces_and_ids_map_back_to_the_base_rows() -> None:
    base, pruned, old_ids = _tokenizers()
    assert len(old_ids) < 500 < base.get_vocab_size()  # specials, the texts' pieces, ASCII single characters
    for text in TEXTS:
        b, p = base.encode(text), pruned.encode(text)
        assert p.tokens == b.tokens
        assert [old_ids[i] for i in p.ids] == b.ids  # row i of the pruned table is base row old_ids[i]


def test_an_unseen_word_is_segmented_into_kept_pieces_not_unk() -> None:
    _, pruned, _ = _tokenizers()
    encoding = pruned.encode("cryptocurrency zyxwvut")
    assert "[UNK]" not in encoding.tokens
    assert encoding.tokens[0] == "[CLS]" and encoding.tokens[-1] == "[SEP]"
    assert pruned.decode(encoding.ids) == "cryptocurrency zyxwvut"


def test_special_ids_and_padding_follow_the_new_numbering() -> None:
    _, pruned, old_ids = _tokenizers()
    spec = json.loads(prune_tokenizer(tokenizer_json(None), TEXTS)[0])
    base_vocab = json.loads(tokenizer_json(None))["model"]["vocab"]
    for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        assert old_ids[pruned.token_to_id(token)] == base_vocab[token]
    assert spec["padding"]["pad_id"] == pruned.token_to_id("[PAD]") == 0
    assert spec["post_processor"]["special_tokens"]["[CLS]"]["ids"] == [pruned.token_to_id("[CLS]")]


def test_a_script_the_texts_do_not_use_is_left_out() -> None:
    _, pruned, _ = _tokenizers()
    assert pruned.token_to_id("ж") is None and pruned.token_to_id("z") is not None
    assert pruned.encode("жук").tokens[1:-1] == ["[UNK]"]


def test_pruning_is_deterministic() -> None:
    assert prune_tokenizer(tokenizer_json(None), TEXTS) == prune_tokenizer(tokenizer_json(None), list(TEXTS))
