"""Train / validation / test splits of a task, as token ids and label indices."""

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from cloud.training.base_model import tokenizer_json
from cloud.training.config import FitConfig, TrainConfig
from cloud.training.loop import encode
from tandem.tasks import Example


@dataclass(frozen=True)
class Split:
    ids: list[list[int]]
    labels: np.ndarray
    texts: list[str]  # what `ids` encode: a teacher with another tokenizer encodes them its own way


@dataclass(frozen=True)
class Splits:
    label_names: list[str]
    train: Split
    val: Split  # fits the temperature, the boundary and the threshold; decides the gate
    calib: Split  # the risk-controlled mode's calibration split, apart from val
    test: Split
    base_model: str | None = None  # whose tokenizer encoded the ids (FitConfig.base_model)


def tokenizer(base_model: str | None = None) -> Tokenizer:
    """The tokenizer of `base_model` (FitConfig.base_model; None: the default)."""
    return Tokenizer.from_str(tokenizer_json(base_model).decode())


def training_texts(cfg: TrainConfig) -> list[str]:
    """The texts of train that no split holds out: what a student may learn from (its vocabulary too)."""
    return [e.text for e in _partition(cfg, cfg.task.load("train"))[2]]


def _partition(cfg: TrainConfig, examples: list[Example]) -> tuple[list[Example], list[Example], list[Example]]:
    """(validation, calibration, train): a seeded permutation, `val_fraction` then `risk_fraction` held out."""
    order = np.random.default_rng(cfg.seed).permutation(len(examples))
    n_val = int(len(examples) * cfg.val_fraction)
    n_held = n_val + int(len(examples) * cfg.operating_point.risk_fraction)
    return ([examples[i] for i in order[:n_val]], [examples[i] for i in order[n_val:n_held]],
            [examples[i] for i in order[n_held:]])


def load_splits(cfg: TrainConfig, fit: FitConfig) -> Splits:
    """Holds out `val_fraction` of train (seeded) for validation, and the next `risk_fraction` as the
    risk-controlled mode's calibration split; caps train at `max_examples`."""
    examples = cfg.task.load("train")
    names = cfg.task.model_labels(examples)
    index = {name: i for i, name in enumerate(names)}
    # Test texts of the out-of-scope label, where the model has no class of it, take the index of
    # the class the boundary adds (`tandem.open_set.answer_labels`).
    test_index = {cfg.task.oos_label: len(names), **index}
    val, calib, train = _partition(cfg, examples)
    train = train[: fit.max_examples]
    tok = tokenizer(fit.base_model)

    def split(rows: list[Example], index: dict[str, int]) -> Split:
        unknown = {e.label for e in rows} - index.keys()
        if unknown:
            raise ValueError(f"task {cfg.task.name}: labels not in the label set: {sorted(unknown)[:5]}")
        texts = [e.text for e in rows]
        return Split(encode(tok, texts, fit.max_length), np.array([index[e.label] for e in rows]), texts)

    return Splits(names, split(train, index), split(val, index), split(calib, index),
                  split(cfg.task.load("test"), test_index),
                  fit.base_model)
