"""A compact student's starting checkpoint, cut from the fine-tuned teacher.

The teacher already knows the task: its embeddings (the rows of the task's vocabulary, see
`vocab`), its first `layers` layers with each feed-forward block cut to its `intermediate_size`
most active neurons, its pooler and its classifier head. The cut is written as a Hugging Face
checkpoint with the pruned tokenizer.json, and `student_fit` points the student's
`FitConfig.base_model` at it, so every step that reads the student's base model (its
tokenizer, `build_classifier`, the export, the candidate check) reads the compact one.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification

from cloud.training.augment import augment
from cloud.training.base_model import TOKENIZER_JSON, tokenizer_json
from cloud.training.config import FitConfig
from cloud.training.data import Split, tokenizer
from cloud.training.loop import collate, encode, fit_loss
from cloud.training.soft_labels import NO_LABEL, distillation_loss, teacher_outputs
from cloud.training.vocab import prune_tokenizer
from tandem.fsio import atomic_dir

# Texts whose feed-forward activations rank the neurons: enough for a stable ranking, seconds to run.
IMPORTANCE_TEXTS = 2000


def student_fit(fit: FitConfig, texts: list[str], teacher_dir: Path) -> FitConfig:
    """`fit` with `base_model` set to its compact checkpoint (built once, under the teacher's
    parent directory) when it starts from the teacher; `fit` itself otherwise. `texts`: the
    training texts (`data.training_texts`), whose wordpieces the pruned vocabulary keeps: not the
    held-out ones, which must look to the student as unseen text does."""
    if fit.init != "teacher" or fit.base_model is not None:  # not cut, or cut already
        return fit
    if not (teacher_dir / "config.json").is_file():
        raise FileNotFoundError(f"no teacher checkpoint at {teacher_dir}: the student (init teacher) is cut from "
                                "it; run `tandem train teacher` first")
    pruned, old_ids = (prune_tokenizer(tokenizer_json(str(teacher_dir)), texts) if fit.vocabulary == "task"
                       else (tokenizer_json(str(teacher_dir)), None))
    key = hashlib.sha256(b"".join([
        _weights_digest(teacher_dir), pruned,
        json.dumps([fit.layers, fit.intermediate_size, fit.max_length]).encode(),
    ])).hexdigest()[:16]
    out = teacher_dir.parent / "student-base" / key
    if not (out / "config.json").is_file():
        model = compact_classifier(teacher_dir, old_ids, fit, texts)
        with atomic_dir(out) as scratch:
            model.save_pretrained(scratch)
            (scratch / TOKENIZER_JSON).write_bytes(pruned)
    return fit.model_copy(update={"base_model": str(out)})


def distil_from_teacher(model: BertForSequenceClassification, fit: FitConfig, teacher_dir: Path,
                        label_names: list[str], train: Split, temperature: float, alpha: float, seed: int) -> None:
    """Trains `model` on `train` plus `fit.augment` altered copies of its texts, against the
    teacher's logits and [CLS] states (one teacher pass over all of them) and `train`'s hard
    labels where known (`soft_labels.distillation_loss`)."""
    if fit.base_model is None:
        raise ValueError("init teacher: base_model unset; `student_fit` sets it to the cut of the teacher")
    extra = augment(train.texts, fit.augment, seed)
    labels = np.concatenate([train.labels, np.full(len(extra), NO_LABEL)])
    logits, cls, _ = teacher_outputs(teacher_dir, label_names, train.texts + extra, fit.max_length)
    loss = distillation_loss(logits, labels, temperature, alpha, cls, fit.hidden_weight)
    ids = train.ids + encode(tokenizer(fit.base_model), extra, fit.max_length)
    fit_loss(model, ids, loss, fit, seed, desc="student")


def _weights_digest(teacher_dir: Path) -> bytes:
    h = hashlib.sha256()
    with (teacher_dir / "model.safetensors").open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.digest()


@torch.no_grad()
def compact_classifier(teacher_dir: Path, old_ids: list[int] | None, fit: FitConfig,
                       texts: list[str]) -> BertForSequenceClassification:
    """The teacher cut down: vocabulary rows `old_ids` (None: all), the first `fit.layers`
    layers, `fit.intermediate_size` neurons per feed-forward block, `fit.max_length` positions."""
    teacher = BertForSequenceClassification.from_pretrained(teacher_dir).eval()
    tc = teacher.config
    layers = fit.layers or tc.num_hidden_layers
    if layers > tc.num_hidden_layers:
        raise ValueError(f"layers {layers}: the teacher has {tc.num_hidden_layers}")
    width = fit.intermediate_size or tc.intermediate_size
    if width > tc.intermediate_size:
        raise ValueError(f"intermediate_size {width}: the teacher's is {tc.intermediate_size}")
    keep = _important_neurons(teacher, layers, width, tokenizer_json(str(teacher_dir)), texts, fit.max_length)
    rows = torch.arange(tc.vocab_size) if old_ids is None else torch.tensor(old_ids)
    config = BertConfig(**{**tc.to_dict(), "vocab_size": len(rows), "num_hidden_layers": layers,
                           "intermediate_size": width, "max_position_embeddings": fit.max_length,
                           "pad_token_id": 0})
    student = BertForSequenceClassification(config).eval()
    state = teacher.state_dict()
    cut = {
        "bert.embeddings.word_embeddings.weight": state["bert.embeddings.word_embeddings.weight"][rows],
        "bert.embeddings.position_embeddings.weight": state["bert.embeddings.position_embeddings.weight"][
            : fit.max_length],
    }
    for i, neurons in enumerate(keep):
        p = f"bert.encoder.layer.{i}."
        cut[p + "intermediate.dense.weight"] = state[p + "intermediate.dense.weight"][neurons]
        cut[p + "intermediate.dense.bias"] = state[p + "intermediate.dense.bias"][neurons]
        cut[p + "output.dense.weight"] = state[p + "output.dense.weight"][:, neurons]
    own = student.state_dict()
    student.load_state_dict({name: cut.get(name, state.get(name)) for name in own})
    return student


def _important_neurons(teacher: BertForSequenceClassification, layers: int, width: int, tok_json: bytes,
                       texts: list[str], max_length: int) -> list[torch.Tensor]:
    """Per layer, the `width` feed-forward neurons with the largest mean |activation| on the
    task's texts times the norm of their output weights (what removing them changes), sorted."""
    from tokenizers import Tokenizer

    sample = texts[:: max(1, len(texts) // IMPORTANCE_TEXTS)]
    ids = encode(Tokenizer.from_str(tok_json.decode()), sample, max_length)
    totals = [torch.zeros(teacher.config.intermediate_size) for _ in range(layers)]
    hooks = []
    for i in range(layers):
        def record(_module, _inputs, output, i=i):  # noqa: ANN001 (torch's hook signature)
            totals[i] += output.abs().sum(dim=(0, 1))
        hooks.append(teacher.bert.encoder.layer[i].intermediate.register_forward_hook(record))
    try:
        for start in range(0, len(ids), 128):
            input_ids, mask = collate(ids[start : start + 128])
            teacher(input_ids=input_ids, attention_mask=mask)  # padding rows add little: ranking only
    finally:
        for hook in hooks:
            hook.remove()
    keep = []
    for i, total in enumerate(totals):
        score = total * teacher.bert.encoder.layer[i].output.dense.weight.norm(dim=0)
        keep.append(torch.sort(torch.topk(score, width).indices).values)
    return keep


def parameter_count(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def onnx_parameter_count(onnx_bytes: bytes) -> int:
    """Parameters of an exported model: the elements of its weight initializers (int8 weights
    count once; their scales and zero points are quantisation overhead, not parameters)."""
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    sizes = {i.name: int(np.prod(i.dims)) for i in graph.initializer}
    return sum(n for name, n in sizes.items() if not name.endswith(("_scale", "_zero_point")))
