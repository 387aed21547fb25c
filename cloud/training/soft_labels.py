"""The teacher's side of distillation: its outputs on texts, and the loss that pulls a student to them."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

from cloud.training.data import tokenizer
from cloud.training.loop import Loss, encode, predict_outputs
from tandem.contract import MANIFEST_FILE, Manifest

NO_LABEL = -1  # an example without a hard label: it learns from the teacher's soft label alone


def teacher_logits(
    teacher_dir: Path, label_names: list[str], texts: list[str], max_length: int
) -> tuple[np.ndarray, str]:
    """The teacher's logits for every text, and the teacher's version (its directory if unversioned)."""
    logits, _, version = teacher_outputs(teacher_dir, label_names, texts, max_length)
    return logits, version


def teacher_outputs(
    teacher_dir: Path, label_names: list[str], texts: list[str], max_length: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """The teacher's logits and last [CLS] hidden state for every text, and its version.

    The teacher reads the texts through its own tokenizer (its checkpoint's), keeping
    `max_length` of its tokens: its base model, and so its tokenizer, may differ from the student's.
    """
    if not (teacher_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"no teacher checkpoint at {teacher_dir}: run `tandem train teacher` or set teacher_dir"
        )
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if labels != label_names:
        raise ValueError(f"teacher_dir {teacher_dir}: its labels are not the task's, in the task's order")
    version = Manifest.read(teacher_dir).version if (teacher_dir / MANIFEST_FILE).is_file() else str(teacher_dir)
    ids = encode(tokenizer(str(teacher_dir)), texts, max_length)
    return *predict_outputs(model, ids, desc="teacher soft labels"), version


def distillation_loss(teacher: np.ndarray, labels: np.ndarray, temperature: float, alpha: float,
                      teacher_cls: np.ndarray | None = None, hidden_weight: float = 0.0) -> Loss:
    """alpha·T²·KL(teacher_T ‖ student_T) + (1 − alpha)·cross-entropy with the hard labels
    [+ hidden_weight·MSE(student's last [CLS] hidden state, the teacher's `teacher_cls`)].

    Examples without a hard label (NO_LABEL) add nothing to the second term, which is still
    divided by the whole batch so that each example weighs the same. T² keeps the soft term's
    gradients on the hard term's scale (Hinton et al., 2015). The hidden term needs the same
    width in both: a student cut from the teacher (`compact`).
    """
    # Copies: in a Ray task the arrays are read-only views of the object store.
    soft = torch.log_softmax(torch.tensor(teacher) / temperature, dim=-1)
    targets = torch.tensor(labels, dtype=torch.long)
    cls = None if teacher_cls is None or hidden_weight == 0 else torch.tensor(teacher_cls)

    def loss(output: SequenceClassifierOutput, batch: np.ndarray) -> torch.Tensor:
        logits = output.logits
        student = torch.log_softmax(logits / temperature, dim=-1)
        kl = F.kl_div(student, soft[batch], log_target=True, reduction="batchmean")
        ce = F.cross_entropy(logits, targets[batch], ignore_index=NO_LABEL, reduction="sum") / len(batch)
        total = alpha * temperature**2 * kl + (1 - alpha) * ce
        if cls is not None:
            total = total + hidden_weight * F.mse_loss(output.hidden_states[-1][:, 0], cls[batch])
        return total

    return loss
