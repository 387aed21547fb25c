"""The training loop: length-bucketed batches, AdamW, linear warm-up and decay."""

import math
import sys
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm
from transformers import PreTrainedModel, get_linear_schedule_with_warmup
from transformers.modeling_outputs import SequenceClassifierOutput

from cloud.training.config import FitConfig


def _refresh_s() -> float:
    """Seconds between progress updates: a terminal redraws one line in place; anywhere else
    (a Ray task's forwarded output, a log file) every update is a new line."""
    return 2.0 if sys.stderr.isatty() else 30.0


def encode(tokenizer: Tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated, unpadded."""
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return [e.ids for e in tokenizer.encode_batch(texts)]


def collate(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads to the longest sequence: (input_ids, attention_mask)."""
    width = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return input_ids, mask


def bucketed_batches(lengths: list[int], batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar lengths: little padding, random order."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [np.array(part[i : i + batch_size]) for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


# A batch's loss from the model's output (logits, hidden states) and the indices of the batch's examples.
Loss = Callable[[SequenceClassifierOutput, np.ndarray], torch.Tensor]


def cross_entropy(labels: np.ndarray) -> Loss:
    targets = torch.as_tensor(labels, dtype=torch.long)
    return lambda output, batch: F.cross_entropy(output.logits, targets[batch])


def fit(
    model: PreTrainedModel,
    ids: list[list[int]],
    labels: np.ndarray,
    cfg: FitConfig,
    seed: int,
    desc: str,
) -> None:
    """Trains `model` in place with cross-entropy on `labels`."""
    fit_loss(model, ids, cross_entropy(labels), cfg, seed, desc)


def fit_loss(model: PreTrainedModel, ids: list[list[int]], loss_fn: Loss, cfg: FitConfig, seed: int, desc: str) -> None:
    """Trains `model` in place, minimising `loss_fn` over batches of `ids`."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    lengths = [len(x) for x in ids]
    total = math.ceil(cfg.epochs * math.ceil(len(ids) / cfg.batch_size))
    head = [p for n, p in model.named_parameters() if n.startswith(("classifier.", "bert.pooler."))]
    body = [p for n, p in model.named_parameters() if not n.startswith(("classifier.", "bert.pooler."))]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr}], weight_decay=0.01
    )
    schedule = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup * total), total)
    model.train()
    step = 0
    with tqdm(total=total, desc=desc, unit="step", mininterval=_refresh_s()) as bar:
        while step < total:
            for batch in bucketed_batches(lengths, cfg.batch_size, rng)[: total - step]:
                input_ids, mask = collate([ids[i] for i in batch])
                loss = loss_fn(model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True), batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()


def predict_logits(
    model: PreTrainedModel, ids: list[list[int]], batch_size: int = 128, desc: str | None = None
) -> np.ndarray:
    """Logits for every sequence, in input order; a progress bar if `desc` is given."""
    return predict_outputs(model, ids, batch_size, desc)[0]


@torch.inference_mode()
def predict_outputs(
    model: PreTrainedModel, ids: list[list[int]], batch_size: int = 128, desc: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and the last layer's [CLS] hidden state for every sequence, in input order."""
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    logits = np.zeros((len(ids), model.config.num_labels), dtype=np.float32)
    cls = np.zeros((len(ids), model.config.hidden_size), dtype=np.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", mininterval=_refresh_s(),
                      disable=desc is None):
        rows = order[start : start + batch_size]
        input_ids, mask = collate([ids[i] for i in rows])
        output = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        logits[rows] = output.logits.numpy()
        cls[rows] = output.hidden_states[-1][:, 0].numpy()
    return logits, cls
