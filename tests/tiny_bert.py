"""A tiny, randomly initialised BERT checkpoint with its own WordPiece tokenizer, saved as a
Hugging Face directory (config, weights, tokenizer.json): a base model that is not the default,
for tests that prove nothing assumes it."""

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from tokenizers.processors import TemplateProcessing
from tokenizers.trainers import WordPieceTrainer
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from cloud.training.config import FitConfig

# A three-intent banking task the tiny BERT learns in seconds: each text a phrase of its intent
# between an opener and a closer.
INTENTS = {
    "balance": ["what is my balance", "how much money is in my account", "show my current balance",
                "check the balance of my savings account"],
    "transfer": ["send money to my sister", "transfer fifty euros to john", "pay my landlord from my account",
                 "move money between my accounts"],
    "lost_card": ["i lost my card", "my card was stolen", "block my card please", "someone took my wallet and card"],
}
OPENERS = ["", "hi, ", "please ", "can you tell me ", "hello there, "]
CLOSERS = ["", " now", " today", " thanks", " asap", "?"]
# A few seconds of training: a tiny model from scratch needs high rates and a few passes.
TINY_FIT = FitConfig(epochs=3, max_examples=300, lr=3e-3, head_lr=1e-2, batch_size=16, max_length=32)


def tiny_rows(intents: dict[str, list[str]], seed: int, n: int) -> list[tuple[str, str]]:
    """`n` seeded (text, label) rows of `intents`."""
    rng = np.random.default_rng(seed)
    labels = list(intents)
    rows = []
    for _ in range(n):
        label = labels[rng.integers(len(labels))]
        phrase = intents[label][rng.integers(len(intents[label]))]
        rows.append((OPENERS[rng.integers(len(OPENERS))] + phrase + CLOSERS[rng.integers(len(CLOSERS))], label))
    return rows


SPECIAL = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
           "mask_token": "[MASK]"}


def build_tiny_bert(directory: Path, texts: list[str], vocab_size: int = 300, hidden: int = 64, layers: int = 2,
                    seed: int = 0) -> Path:
    """Writes the checkpoint into `directory`: a WordPiece vocabulary of at most `vocab_size`
    tokens learnt from `texts`, and a BERT of `layers` layers, `hidden` wide, in heads of 32
    (the smallest vLLM's CPU attention takes). 64 wide, it learns a few keyword intents in a few
    seconds from any seed; 32 wide (one head), from some seeds only."""
    tokenizer = _wordpiece(texts, vocab_size)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL).save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        pad_token_id=tokenizer.token_to_id(SPECIAL["pad_token"]),
    )
    BertModel(config).save_pretrained(directory)
    return directory


def _wordpiece(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(WordPiece(unk_token=SPECIAL["unk_token"]))
    tokenizer.normalizer = BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = BertPreTokenizer()
    tokenizer.train_from_iterator(texts, WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values())))
    cls, sep = SPECIAL["cls_token"], SPECIAL["sep_token"]
    tokenizer.post_processor = TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))],
    )
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer
