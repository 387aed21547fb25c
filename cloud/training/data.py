"""Train / validation / test splits of a task, as token ids and label indices."""

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from cloud.training.base_model import minilm_dir
from cloud.training.config import FitConfig, TrainConfig
from cloud.training.loop import encode
from tandem.tasks import Example


@dataclass(frozen=True)
class Split:
    ids: list[list[int]]
    labels: np.ndarray


@dataclass(frozen=True)
class Splits:
    label_names: list[str]
    train: Split
    val: Split
    test: Split


def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))


def load_splits(cfg: TrainConfig, fit: FitConfig) -> Splits:
    """Holds out `val_fraction` of train (seeded) for calibration; caps train at `max_examples`."""
    names = cfg.task.label_names()
    index = {name: i for i, name in enumerate(names)}
    examples = cfg.task.load("train")
    order = np.random.default_rng(cfg.seed).permutation(len(examples))
    n_val = int(len(examples) * cfg.val_fraction)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]][: fit.max_examples]
    tok = tokenizer()

    def split(rows: list[Example]) -> Split:
        unknown = {e.label for e in rows} - index.keys()
        if unknown:
            raise ValueError(f"task {cfg.task.name}: labels not in the label set: {sorted(unknown)[:5]}")
        ids = encode(tok, [e.text for e in rows], fit.max_length)
        return Split(ids, np.array([index[e.label] for e in rows]))

    return Splits(names, split(train), split(val), split(cfg.task.load("test")))
