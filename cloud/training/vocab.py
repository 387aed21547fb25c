"""A WordPiece vocabulary pruned to what a task's texts use.

Most of a small BERT's parameters are its embedding table (MiniLM: 30,522 rows of 384). A task
uses a few thousand of those pieces; the rest only cost download size. The pruned vocabulary
keeps the special tokens, every piece the texts encode to, and every single-character piece
(word-initial and `##` continuation) of the scripts the texts are written in, so that WordPiece
still segments an unseen word of those scripts into kept pieces instead of [UNK]. It is a pure
function of the base tokenizer and the texts, so a checker can rebuild it.
"""

import json
import unicodedata
from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer


def prune_tokenizer(base_json: bytes, texts: Iterable[str]) -> tuple[bytes, list[int]]:
    """The pruned tokenizer.json, and for each of its ids (in order) the base id it replaces:
    embedding rows are `base_embeddings[old_ids]`. Kept pieces keep their base order."""
    spec = json.loads(base_json)
    if spec["model"]["type"] != "WordPiece":
        raise ValueError(f"vocabulary task: the base tokenizer is a {spec['model']['type']} model; only a WordPiece "
                         "vocabulary is pruned (set vocabulary: base)")
    vocab: dict[str, int] = spec["model"]["vocab"]
    old_ids = sorted(_kept_ids(base_json, vocab, spec, list(texts)))
    new_id = {old: new for new, old in enumerate(old_ids)}
    by_old = {i: token for token, i in vocab.items()}
    spec["model"]["vocab"] = {by_old[old]: new for new, old in enumerate(old_ids)}
    _renumber(spec, new_id)
    return json.dumps(spec, ensure_ascii=False).encode(), old_ids


def _kept_ids(base_json: bytes, vocab: dict[str, int], spec: dict[str, Any], texts: list[str]) -> set[int]:
    tok = Tokenizer.from_str(base_json.decode())
    tok.no_padding()
    tok.no_truncation()
    used = {i for e in tok.encode_batch(texts) for i in e.ids}
    special = {t["id"] for t in spec["added_tokens"]}
    scripts = {_script(c) for text in texts for c in tok.normalizer.normalize_str(text) if c.isalpha()}
    prefix = spec["model"]["continuing_subword_prefix"]
    chars = {
        i for token, i in vocab.items()
        if len(piece := token.removeprefix(prefix)) == 1 and (piece.isascii() or _script(piece) in scripts)
    }
    return used | special | chars


def _script(char: str) -> str:
    """A letter's script, as the first word of its Unicode name (LATIN, CYRILLIC, CJK, ...)."""
    return unicodedata.name(char, "UNKNOWN").split(" ", 1)[0]


def _renumber(spec: dict[str, Any], new_id: dict[int, int]) -> None:
    """Moves every id the tokenizer.json names outside its vocab (added tokens, the
    post-processor's special tokens, padding) to the pruned numbering."""
    for token in spec["added_tokens"]:
        token["id"] = new_id[token["id"]]
    post = spec.get("post_processor") or {}
    for token in post.get("special_tokens", {}).values():
        token["ids"] = [new_id[i] for i in token["ids"]]
    for key in ("cls", "sep"):  # BertProcessing names its two tokens as (token, id)
        if key in post:
            post[key] = [post[key][0], new_id[post[key][1]]]
    if spec.get("padding"):
        spec["padding"]["pad_id"] = new_id[spec["padding"]["pad_id"]]
